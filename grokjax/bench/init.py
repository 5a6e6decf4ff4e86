"""PyTorch's default `nn.Linear` initialisation in numpy, for tests and benchmarks.

torch draws a Linear layer's weight and bias from U(-1/sqrt(fan_in), +1/sqrt(fan_in)); the
paper multiplies both by 8 (`init_scale`). The trainer draws its init with `jax.random`
(`grokjax.train.model.init_params`); this function gives the same distribution from a numpy
generator, so that tests and benchmarks can make initial-like weights without JAX or torch.
"""

from __future__ import annotations

import math

import numpy as np

from grokjax.rundir import LAYERS



def torch_init(rng: np.random.Generator | np.random.RandomState, width: int = 200, *, scale: float = 8.0,
               shape: tuple[int, ...] | None = None):
    """Draws from `rng` scale × U(±1/sqrt(fan_in)), PyTorch's default Linear init times `scale`.

    Args:
        rng: a numpy Generator or legacy RandomState; the draws consume it in the order below.
        width: hidden width of the MLP 784-width-width-10 (ignored with `shape`).
        scale: the factor on the bound (the paper's init_scale, 8).
        shape: draw one weight matrix in torch's layout (out, in), fan_in = shape[-1], and
            return it (a single `rng.uniform` call).

    Returns:
        Without `shape`: the MLP's parameters {fc1, fc2, fc3: {kernel (in, out), bias (out,)}},
        drawn layer by layer, kernel then bias (JAX layout, as `grokjax.ckpt.load_params`
        returns them). With `shape`: one float64 array of that shape.
    """
    if shape is not None:
        bound = scale / math.sqrt(shape[-1])
        return rng.uniform(-bound, bound, size=tuple(shape))
    out = {}
    for name, (fan_in, fan_out) in zip(LAYERS, ((784, width), (width, width), (width, 10))):
        bound = scale / math.sqrt(fan_in)
        out[name] = {"kernel": rng.uniform(-bound, bound, (fan_in, fan_out)), "bias": rng.uniform(-bound, bound, fan_out)}
    return out
