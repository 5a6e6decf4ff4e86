"""Nanda et al.'s modular-addition transformer and training step in PyTorch, for parity and the benchmark.

An independent implementation of `grokjax.modadd`: the forward follows Nanda et al.'s
`transformers.py` (einsums over every position, the causal mask as `tril(scores) - 1e10 *
(1 - mask)`, logits of every position, then the last one), the loss is their
`cross_entropy_high_precision`, the optimizer torch.optim.AdamW(lr, weight_decay, betas, eps)
with LambdaLR(lambda step: min(step / warmup, 1)), one full-batch update per step. The
model is built from given parameters in the JAX layout (`grokjax.modadd.model`), so both
start from the same numbers. Only this module (of the modadd code) imports torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from grokjax.bench.torch_reference import recorder

# JAX parameter paths, in the order of the torch module's parameters.
_PATHS = (("embed",), ("pos_embed",), ("W_Q",), ("W_K",), ("W_V",), ("W_O",), ("fc1", "kernel"), ("fc1", "bias"),
          ("fc2", "kernel"), ("fc2", "bias"), ("unembed",))


def _name(path: tuple[str, ...]) -> str:
    return "_".join(path)


class TorchTransformer(nn.Module):
    """The float64 torch twin of `grokjax.modadd.model.Transformer`, holding JAX-layout tensors."""

    def __init__(self, params: dict):
        super().__init__()
        for path in _PATHS:
            value = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
            arr = np.array(value, dtype=np.float64)
            self.register_parameter(_name(path), nn.Parameter(torch.from_numpy(arr)))
        self.d_head = self.W_Q.shape[-1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, n) -> logits (batch, n, vocab)."""
        n = tokens.shape[1]
        x = self.embed[tokens] + self.pos_embed[:n]
        q = torch.einsum("bpd,dhk->bhpk", x, self.W_Q)
        k = torch.einsum("bpd,dhk->bhpk", x, self.W_K)
        v = torch.einsum("bpd,dhk->bhpk", x, self.W_V)
        scores = torch.einsum("bhpk,bhqk->bhqp", k, q)
        mask = torch.tril(torch.ones((n, n), dtype=x.dtype))
        masked = torch.tril(scores) - 1e10 * (1 - mask)
        attn = torch.softmax(masked / math.sqrt(self.d_head), dim=-1)
        z = torch.einsum("bhpk,bhqp->bqhk", v, attn)
        return self._mlp_unembed(x + torch.einsum("bqhk,hkd->bqd", z, self.W_O))

    def _mlp_unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The residual after attention (..., d_model) -> logits (..., vocab): MLP, residual, unembedding."""
        hidden = torch.relu(x @ self.fc1_kernel + self.fc1_bias)
        x = x + hidden @ self.fc2_kernel + self.fc2_bias
        return x @ self.unembed

    def forward_last(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, n) -> the last position's logits (batch, vocab), computing only what they need.

        The same function as `forward(tokens)[:, -1]`, written out for one query: the keys and
        values of every position, the last position's query, its attention row (the causal mask
        hides nothing from the last position), its residual, MLP and unembedding. The rounding
        differs from `forward` in the last bits (shorter sums in other orders)."""
        n = tokens.shape[1]
        x = self.embed[tokens] + self.pos_embed[:n]
        k = torch.einsum("bpd,dhk->bhpk", x, self.W_K)
        v = torch.einsum("bpd,dhk->bhpk", x, self.W_V)
        last = x[:, -1]
        q = torch.einsum("bd,dhk->bhk", last, self.W_Q)
        scores = torch.einsum("bhpk,bhk->bhp", k, q)
        attn = torch.softmax(scores / math.sqrt(self.d_head), dim=-1)
        z = torch.einsum("bhpk,bhp->bhk", v, attn)
        return self._mlp_unembed(last + torch.einsum("bhk,hkd->bd", z, self.W_O))

    def params(self) -> dict:
        """The parameters in the JAX layout, as float64 numpy."""
        out: dict = {}
        for path in _PATHS:
            arr = getattr(self, _name(path)).detach().numpy().copy()
            if len(path) == 1:
                out[path[0]] = arr
            else:
                out.setdefault(path[0], {})[path[1]] = arr
        return out


def cross_entropy_high_precision(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log_softmax(logits in float64)[label] (Nanda et al.'s helper)."""
    logprobs = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return -torch.gather(logprobs, index=labels[:, None], dim=-1).mean()


@torch.no_grad()
def evaluate(model: TorchTransformer, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, loss) of the last-position logits over a whole split."""
    logits = model(tokens)[:, -1]
    acc = (logits.argmax(-1) == labels).double().mean().item()
    return acc, cross_entropy_high_precision(logits, labels).item()


def train_reference(params: dict, train_tokens: np.ndarray, train_labels: np.ndarray, steps: int, *,
                    lr: float = 1e-3, wd: float = 1.0, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                    warmup: int = 10, eval_at=(), test_tokens=None, test_labels=None, threads: int | None = None,
                    positions: str = "all"):
    """Runs Nanda et al.'s loop from `params` for `steps` full-batch updates.

    Args:
        params: initial parameters, JAX layout (`grokjax.modadd.model`).
        train_tokens, train_labels: the training split, (n, 3) and (n,) integers.
        warmup: update t runs at lr * min(t / warmup, 1); 0 means a constant lr.
        eval_at: steps t at which to record metrics before update t (t == steps: after the loop).
        threads: torch intra-op threads (None: leave torch's setting).
        positions: "all" computes every position, as Nanda et al.'s code (the reference); "last"
            only what the loss reads (`TorchTransformer.forward_last`), the same function about
            2.3 times cheaper, for long parity runs once "all" and "last" are shown to agree.

    Returns:
        (final params in the JAX layout, list of records {step, train/acc, train/loss[, test/...]}).
    """
    if steps < 0 or warmup < 0:
        raise ValueError(f"need steps >= 0 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    if threads:
        torch.set_num_threads(threads)
    model = TorchTransformer(params)
    logits = (lambda tokens: model(tokens)[:, -1]) if positions == "all" else model.forward_last
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=betas, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda t: min(t / warmup, 1)) if warmup else (lambda t: 1.0))
    x = torch.from_numpy(np.asarray(train_tokens, np.int64))
    y = torch.from_numpy(np.asarray(train_labels, np.int64))
    xs = None if test_tokens is None else torch.from_numpy(np.asarray(test_tokens, np.int64))
    ys = None if test_labels is None else torch.from_numpy(np.asarray(test_labels, np.int64))
    eval_at = {int(s) for s in eval_at}
    records = []
    record = recorder(evaluate, model, (x, y), (xs, ys), records)

    for t in range(steps):
        if t in eval_at:
            record(t)
        loss = cross_entropy_high_precision(logits(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    if steps in eval_at:
        record(steps)
    return model.params(), records


def make_torch_step(params: dict, train_tokens: np.ndarray, train_labels: np.ndarray, *, lr: float = 1e-3,
                    wd: float = 1.0, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8, warmup: int = 10):
    """A no-argument callable running one update of the reference loop (for the benchmark's timing)."""
    model = TorchTransformer(params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=betas, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda t: min(t / warmup, 1)) if warmup else (lambda t: 1.0))
    x = torch.from_numpy(np.asarray(train_tokens, np.int64))
    y = torch.from_numpy(np.asarray(train_labels, np.int64))

    def step() -> float:
        loss = cross_entropy_high_precision(model(x)[:, -1], y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.item()

    return step
