"""The one-layer transformer of Nanda et al. 2023 in Flax, and a last-position fast path.

Architecture (the paper's App. H; Nanda et al.'s `transformers.py` with num_layers=1,
use_ln=False): token embedding + learned positional embedding; one attention layer of
n_heads heads of width d_head with a causal mask, W_Q, W_K, W_V, W_O without biases,
scores divided by sqrt(d_head); a residual MLP d_model -> d_mlp -> ReLU -> d_model with
biases (Nanda et al.'s b_in, b_out); no LayerNorm anywhere; a separate unembedding without
bias onto all p + 1 tokens. The logits that the loss reads are those at the last ('=')
position.

Parameters (string keys; y = x @ W throughout):
    embed (vocab, d_model), pos_embed (n_ctx, d_model),
    W_Q, W_K, W_V (d_model, n_heads, d_head), W_O (n_heads, d_head, d_model),
    fc1 {kernel (d_model, d_mlp), bias (d_mlp,)}, fc2 {kernel (d_mlp, d_model), bias (d_model,)},
    unembed (d_model, vocab).
Every matrix is (d_in, d_out). Nanda et al. store W_E, W_Q, W_K, W_V, W_O, W_in and W_out
as (d_out, d_in) (their W_E is (d_model, vocab), their W_Q (heads, d_head, d_model)), so
those are transposed here; their W_pos and W_U already have this layout.

`forward` computes every position (the reference); `forward_last` only what the loss needs,
the last position's logits; `forward_last_tables` the same with the keys, values and query
taken from per-token tables. The three agree to ~1e-15 relative in float64.

Init, as Nanda et al.'s `torch.randn(...) / sqrt(n)`: every weight is N(0, 1/d_model), except
the unembedding, N(0, 1/vocab); the MLP biases start at zero. Draws are float64, then cast,
so the float32 model starts from the same numbers rounded.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from grokjax.modadd.config import ModAddConfig

N_CTX = 3  # [a, b, '=']


def _normal(std: float):
    """An initializer drawing N(0, std^2) in float64 and casting to the requested dtype."""
    def init(key, shape, dtype=jnp.float64):
        return (jax.random.normal(key, shape, jnp.float64) * std).astype(dtype)
    return init


def _zeros(key, shape, dtype=jnp.float64):
    return jnp.zeros(shape, dtype)


class Transformer(nn.Module):
    """tokens (batch, n <= n_ctx) int -> logits (batch, n, vocab) at every position."""

    vocab: int = 114
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = N_CTX
    dtype: jnp.dtype = jnp.float64

    @nn.compact
    def __call__(self, tokens):
        d, h, k, dt = self.d_model, self.n_heads, self.d_head, self.dtype
        std = 1.0 / math.sqrt(d)
        embed = self.param("embed", _normal(std), (self.vocab, d), dt)
        pos = self.param("pos_embed", _normal(std), (self.n_ctx, d), dt)
        w_q = self.param("W_Q", _normal(std), (d, h, k), dt)
        w_k = self.param("W_K", _normal(std), (d, h, k), dt)
        w_v = self.param("W_V", _normal(std), (d, h, k), dt)
        w_o = self.param("W_O", _normal(std), (h, k, d), dt)
        fc1 = nn.Dense(self.d_mlp, dtype=dt, param_dtype=dt, kernel_init=_normal(std), bias_init=_zeros, name="fc1")
        fc2 = nn.Dense(d, dtype=dt, param_dtype=dt, kernel_init=_normal(std), bias_init=_zeros, name="fc2")
        unembed = self.param("unembed", _normal(1.0 / math.sqrt(self.vocab)), (d, self.vocab), dt)

        n = _check_tokens(tokens, self.n_ctx)
        x = jnp.take(embed, tokens, axis=0) + pos[:n]
        q = jnp.einsum("bpd,dhk->bphk", x, w_q)
        kk = jnp.einsum("bpd,dhk->bphk", x, w_k)
        v = jnp.einsum("bpd,dhk->bphk", x, w_v)
        scores = jnp.einsum("bqhk,bphk->bhqp", q, kk) / math.sqrt(k)
        causal = jnp.tril(jnp.ones((n, n), bool))
        attn = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        z = jnp.einsum("bhqp,bphk->bqhk", attn, v)
        x = x + jnp.einsum("bqhk,hkd->bqd", z, w_o)
        x = x + fc2(nn.relu(fc1(x)))
        return x @ unembed


def _check_tokens(tokens, n_ctx: int) -> int:
    """The sequence length of a (batch, n) integer token array; a clear error otherwise (trace time)."""
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= n_ctx or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array (batch, n) with 1 <= n <= {n_ctx}, "
                         f"got {tokens.dtype} {tokens.shape}")
    return tokens.shape[1]


def make_model(cfg: ModAddConfig) -> Transformer:
    """The `Transformer` of `cfg`."""
    return Transformer(vocab=cfg.vocab, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                       d_mlp=cfg.d_mlp, dtype=jnp.dtype(cfg.dtype))


def init_params(key: jax.Array, cfg: ModAddConfig) -> dict:
    """Fresh parameters (the module docstring's tree and init) from `key`."""
    tokens = jnp.zeros((1, N_CTX), jnp.int32)
    return dict(make_model(cfg).init(key, tokens)["params"])


def model_of(params: dict) -> Transformer:
    """The `Transformer` whose parameter tree is `params` (sizes and dtype read from the shapes)."""
    vocab, d = params["embed"].shape
    _, h, k = params["W_Q"].shape
    return Transformer(vocab=vocab, d_model=d, n_heads=h, d_head=k, d_mlp=params["fc1"]["kernel"].shape[1],
                       n_ctx=params["pos_embed"].shape[0], dtype=params["embed"].dtype)


def forward(params: dict, tokens: jax.Array) -> jax.Array:
    """Logits (batch, n, vocab) at every position: `Transformer().apply` on `params`."""
    return model_of(params).apply({"params": params}, tokens)


def forward_last(params: dict, tokens: jax.Array) -> jax.Array:
    """Logits (batch, vocab) at the last position only: `forward(params, tokens)[:, -1]`.

    Computes what the last position needs: keys and values of every position, the query of
    the last one (which the causal mask lets see all of them, so no mask is applied), and the
    attention output, MLP and unembedding of that position only. The same products as
    `forward` for that position, so equal up to the order of summation (tests/test_modadd_model.py).
    """
    n = _check_tokens(tokens, params["pos_embed"].shape[0])
    x = jnp.take(params["embed"], tokens, axis=0) + params["pos_embed"][:n]
    kk = jnp.einsum("bpd,dhk->bphk", x, params["W_K"])
    v = jnp.einsum("bpd,dhk->bphk", x, params["W_V"])
    last = x[:, -1]
    q = jnp.einsum("bd,dhk->bhk", last, params["W_Q"])
    scores = jnp.einsum("bhk,bphk->bhp", q, kk) / math.sqrt(params["W_Q"].shape[-1])
    z = jnp.einsum("bhp,bphk->bhk", jax.nn.softmax(scores, axis=-1), v)
    r = last + jnp.einsum("bhk,hkd->bd", z, params["W_O"])
    fc1, fc2 = params["fc1"], params["fc2"]
    r = r + nn.relu(r @ fc1["kernel"] + fc1["bias"]) @ fc2["kernel"] + fc2["bias"]
    return r @ params["unembed"]


def forward_last_tables(params: dict, tokens: jax.Array) -> jax.Array:
    """`forward_last` with the keys, values and query computed once per vocabulary entry.

    Position i's input is embed[token] + pos_embed[i], so its key and value (and, at the
    last position, its query) are rows of the table (embed + pos_embed[i]) @ W, gathered by
    token: vocab rows per position instead of batch rows, and the same products row by
    row. The attention scores and the weighted sum of values are elementwise products
    summed over d_head and over positions. Equal to `forward(params, tokens)[:, -1]` up to
    the order of summation (tests/test_modadd_model.py).
    """
    n = _check_tokens(tokens, params["pos_embed"].shape[0])
    d = params["embed"].shape[1]
    _, h, k = params["W_Q"].shape

    def rows(i, name):
        table = (params["embed"] + params["pos_embed"][i]) @ params[name].reshape(d, h * k)
        return jnp.take(table, tokens[:, i], axis=0).reshape(-1, h, k)

    kk = jnp.stack([rows(i, "W_K") for i in range(n)], axis=1)  # (batch, n, heads, d_head)
    v = jnp.stack([rows(i, "W_V") for i in range(n)], axis=1)
    q = rows(n - 1, "W_Q")
    last = jnp.take(params["embed"] + params["pos_embed"][n - 1], tokens[:, -1], axis=0)
    scores = jnp.sum(q[:, None] * kk, axis=-1) / math.sqrt(k)  # (batch, n, heads)
    z = jnp.sum(jax.nn.softmax(scores, axis=1)[..., None] * v, axis=1)  # (batch, heads, d_head)
    r = last + z.reshape(z.shape[0], h * k) @ params["W_O"].reshape(h * k, d)
    fc1, fc2 = params["fc1"], params["fc2"]
    r = r + nn.relu(r @ fc1["kernel"] + fc1["bias"]) @ fc2["kernel"] + fc2["bias"]
    return r @ params["unembed"]
