"""The authors' training loop in PyTorch (float64), for parity tests and the benchmark.

It mirrors the notebook: Sequential(Flatten, Linear, ReLU, Linear, ReLU, Linear), MSELoss
(mean) against one-hot targets, torch.optim.AdamW(lr, weight_decay) with its default
implementation, and a fixed cycle of batches (block t mod n_batches at update t). At each
requested evaluation step t the model is evaluated *before* update t. It imports torch at
module level; the only other modules that import torch are the modular-addition transformer's
reference (`grokjax.bench.torch_modadd`) and the benchmark command (`grokjax.bench.cli`, inside
its functions), and the numpy stand-in for torch's Linear init is `grokjax.bench.init`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from grokjax.rundir import LAYERS



def build_model(params: dict) -> nn.Sequential:
    """A float64 torch MLP holding `params` ({layer: {kernel (in,out), bias}}; weight = kernel.T)."""
    width = params["fc1"]["kernel"].shape[1]
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).double()
    with torch.no_grad():
        for name, idx in zip(LAYERS, (1, 3, 5)):
            model[idx].weight.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(params[name]["kernel"]).T)))
            model[idx].bias.copy_(torch.from_numpy(np.array(params[name]["bias"], dtype=np.float64)))
    return model


def model_params(model: nn.Sequential) -> dict:
    """The model's parameters back in the JAX layout, as float64 numpy."""
    return {name: {"kernel": model[idx].weight.detach().numpy().T.copy(), "bias": model[idx].bias.detach().numpy().copy()}
            for name, idx in zip(LAYERS, (1, 3, 5))}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, elementwise-mean MSE) over the whole set."""
    out = model(x)
    acc = (out.argmax(-1) == labels).double().mean().item()
    loss = ((out - torch.eye(10, dtype=torch.float64)[labels]) ** 2).mean().item()
    return acc, loss


def recorder(evaluate, model, train, test, records: list):
    """`record(t)`: appends {step, train/acc, train/loss[, test/acc, test/loss]} of `model` to
    `records`, with `evaluate(model, x, labels) -> (acc, loss)` on `train` and `test` ((x, labels)
    pairs; test's x None: no test metrics). Shared by the torch references."""
    def record(t):
        rec = {"step": t}
        rec["train/acc"], rec["train/loss"] = evaluate(model, *train)
        if test[0] is not None:
            rec["test/acc"], rec["test/loss"] = evaluate(model, *test)
        records.append(rec)

    return record


def train_reference(params: dict, x_train: np.ndarray, y_train: np.ndarray, perm: np.ndarray, steps: int, *,
                    wd: float, lr: float = 5e-4, batch: int = 200, eval_at=(), x_test=None, y_test=None,
                    threads: int | None = None):
    """Runs the authors' loop from `params` for `steps` updates.

    Args:
        params: initial parameters, JAX layout.
        x_train, y_train: the 1k subset (float64 (n,784), int labels) in subset order.
        perm: batch order over subset positions; block b = perm[b*batch:(b+1)*batch].
        eval_at: steps t at which to record metrics before update t (t == steps: after the loop).

    Returns:
        (final params in JAX layout, list of records {step, train/acc, train/loss, test/acc, test/loss}).
    """
    if threads:
        torch.set_num_threads(threads)
    model = build_model(params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    loss_fn = nn.MSELoss()
    xt = torch.from_numpy(np.array(x_train, np.float64))
    yt = torch.from_numpy(np.array(y_train, np.int64))
    onehot = torch.eye(10, dtype=torch.float64)[yt]
    blocks = [torch.from_numpy(np.asarray(perm[b:b + batch], np.int64)) for b in range(0, len(perm), batch)]
    batches = [(xt[i], onehot[i]) for i in blocks]
    xs = torch.from_numpy(np.array(x_test, np.float64)) if x_test is not None else None
    ys = torch.from_numpy(np.array(y_test, np.int64)) if y_test is not None else None
    eval_at = set(int(s) for s in eval_at)
    records = []
    record = recorder(evaluate, model, (xt, yt), (xs, ys), records)

    for t in range(steps):
        if t in eval_at:
            record(t)
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    if steps in eval_at:
        record(steps)
    return model_params(model), records
