"""Training of the modular-addition transformer: loss, AdamW with warm-up, scan chunks, evaluation.

The step is Nanda et al.'s: the whole training split in one batch, cross-entropy of the
last-position logits over all p + 1 tokens with a float64 log-softmax
(`cross_entropy_high_precision`), then torch.optim.AdamW(lr, weight_decay, betas) with the
learning rate of update t set to lr * min(t / warmup, 1) (their LambdaLR). Steps run in a
jitted `lax.scan` over chunks with the state donated and the split resident on the device,
as the MLP's engine does; the state has the engine's `TrainState` fields. The loss reads
only the last position, so the step trains through a fast path that computes only what that
position needs (`FORWARDS`; `DEFAULT_FORWARD`); the full forward is kept as the reference.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grokjax.modadd.config import ModAddConfig
from grokjax.modadd.data import Split
from grokjax.modadd.model import forward, forward_last, forward_last_tables, init_params

# The forwards a step can train with: the last-position fast path, the same with per-token
# tables for keys, values and query, and the full forward over every position (the reference).
FORWARDS = ("last", "tables", "full")
# The fastest of them on CPU (experiments/bench_modadd.py, docs/modadd.md); all three agree to ~1e-15.
DEFAULT_FORWARD = "tables"
_LAST = {"last": forward_last, "tables": forward_last_tables}


class TrainState(NamedTuple):
    """Everything a resumed run needs (with the config): the MLP engine's `TrainState` fields.

    `key` is carried so that one checkpoint layout serves both tasks; the full-batch step
    draws no randomness and never reads it.
    """

    params: Any
    opt_state: Any
    step: jax.Array  # int64 number of updates done
    key: jax.Array  # uint32 PRNG key data (unused by this task's step)


def lr_schedule(cfg: ModAddConfig) -> Callable[[jax.Array], jax.Array]:
    """count -> lr * min(count / warmup, 1) in float64, cast to cfg.dtype (constant lr when warmup is 0).

    `count` is the number of updates already applied (optax's schedule count), so update 0
    runs at lr 0, as torch's LambdaLR(lambda step: min(step/10, 1)) sets it at construction.
    The cast keeps float32 updates float32 (a float64 scalar would promote them).
    """
    dtype = jnp.dtype(cfg.dtype)

    def schedule(count):
        if cfg.warmup == 0:
            return jnp.asarray(cfg.lr, dtype)
        frac = jnp.minimum(jnp.asarray(count, jnp.float64) / cfg.warmup, 1.0)
        return (cfg.lr * frac).astype(dtype)

    return schedule


def make_optimizer(cfg: ModAddConfig, wd=None) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW: eps outside the sqrt, decay of every parameter, warm-up schedule.

    `wd` (a traced per-replica scalar in a sweep) replaces `cfg.wd`; the state's structure
    does not depend on it.
    """
    return optax.adamw(learning_rate=lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0,
                       weight_decay=cfg.wd if wd is None else wd, mask=None)


def init_state(cfg: ModAddConfig, seed: int | None = None) -> TrainState:
    """Fresh state: parameters from fold 0 of `jax.random.PRNGKey(seed)`, `key` its fold 1."""
    root = jax.random.PRNGKey(cfg.seed if seed is None else seed)
    params = init_params(jax.random.fold_in(root, 0), cfg)
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params),
                      step=jnp.zeros((), jnp.int64), key=jax.random.fold_in(root, 1))


def _logits(params, tokens, fwd: str) -> jax.Array:
    if fwd not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {fwd!r}")
    return _LAST[fwd](params, tokens) if fwd in _LAST else forward(params, tokens)[:, -1]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean of -log softmax(logits)[label], the log-softmax in float64 (Nanda et al.'s high precision)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float64), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def loss_fn(params, tokens, labels, fwd: str = DEFAULT_FORWARD) -> jax.Array:
    """The training loss of `params` on (tokens, labels): `cross_entropy` of the last-position logits."""
    return cross_entropy(_logits(params, tokens, fwd), labels)


def make_step(cfg: ModAddConfig, fwd: str = DEFAULT_FORWARD) -> Callable[..., tuple[TrainState, jax.Array]]:
    """One full-batch update `step(state, data, wd=None) -> (state, loss before the update)`.

    `data` is a `Split` of device arrays; `wd` a per-replica weight decay (None: cfg.wd);
    `fwd` one of `FORWARDS`: 'last' (the fast path), 'tables' (the fast path with per-token
    tables) or 'full' (every position, the reference).
    """
    if fwd not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {fwd!r}")

    def step(state: TrainState, data: Split, wd=None):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, data.train_tokens, data.train_labels, fwd)
        updates, opt_state = make_optimizer(cfg, wd).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1, state.key), loss

    return step


def make_train_chunk(cfg: ModAddConfig, fwd: str = DEFAULT_FORWARD, n_seeds: int | None = None, *, wds=None):
    """A jitted `chunk(state, data, length) -> (state, last loss)` running `length` steps in one `lax.scan`.

    The state is donated; `length` is static (use a few fixed lengths, as the MLP runner's
    `schedule.chunk_lengths`). With `n_seeds` the state carries a leading replica axis and the
    step is vmapped over it (the data is shared); `wds` then gives each replica its weight
    decay. The returned loss is that of the chunk's last step, before its update (a cheap
    finiteness probe).
    """
    step = make_step(cfg, fwd)
    if wds is not None:
        wds = np.asarray(wds, np.float64)
        if n_seeds is None or wds.shape != (n_seeds,):
            raise ValueError(f"wds needs one weight decay per replica ({n_seeds}), got {wds.tolist()}")
    if n_seeds is not None:
        step = jax.vmap(step, in_axes=(0, None, None if wds is None else 0))

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
    def chunk(state, data, length: int):
        wd = None if wds is None else jnp.asarray(wds)

        def body(s, _):
            return step(s, data, wd)

        state, losses = jax.lax.scan(body, state, None, length=length)
        return state, losses[-1]

    return chunk


def run_steps(cfg: ModAddConfig, state: TrainState, data: Split, n: int, *, chunk: int = 256,
              fwd: str = DEFAULT_FORWARD, chunk_fn=None) -> TrainState:
    """Runs n steps through scan chunks of at most `chunk` steps (for tests and benchmarks)."""
    if n < 0 or chunk < 1:
        raise ValueError(f"need n >= 0 and chunk >= 1, got n={n}, chunk={chunk}")
    chunk_fn = chunk_fn or make_train_chunk(cfg, fwd)
    done = 0
    while done < n:
        length = min(chunk, n - done)
        state, _ = chunk_fn(state, data, length)
        done += length
    return state


def evaluate(params, data: Split) -> dict[str, jax.Array]:
    """Loss and accuracy on both splits (accuracy: argmax over all p + 1 logits equals the label), and ||params||."""
    out = {}
    for split, tokens, labels in (("train", data.train_tokens, data.train_labels),
                                  ("test", data.test_tokens, data.test_labels)):
        logits = _logits(params, tokens, DEFAULT_FORWARD)
        out[f"{split}/loss"] = cross_entropy(logits, labels)
        out[f"{split}/acc"] = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float64))
    out["params/l2"] = jnp.sqrt(sum(jnp.sum(a.astype(jnp.float64) ** 2) for a in jax.tree.leaves(params)))
    return out


def make_evaluate(n_seeds: int | None = None):
    """Jitted `evaluate`, vmapped over a leading replica axis of params when `n_seeds` is set."""
    fn = evaluate if n_seeds is None else jax.vmap(evaluate, in_axes=(0, None))
    return jax.jit(fn)
