"""The depth-3 ReLU MLP (784-200-200-10) in Flax, with PyTorch's default init scaled by 8.

Parameters form the tree {fc1, fc2, fc3} x {kernel (in, out), bias}; kernels are the
transpose of PyTorch's (out, in) weights, and y = x @ kernel + bias.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from grokjax.rundir import LAYERS

N_IN = 784
N_OUT = 10


class MLP(nn.Module):
    """784 -> width -> ReLU -> width -> ReLU -> 10, raw linear outputs (no softmax)."""

    width: int = 200
    dtype: jnp.dtype = jnp.float64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(x))
        return nn.Dense(N_OUT, dtype=self.dtype, param_dtype=self.dtype, name="fc3")(x)


def layer_shapes(width: int) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of each layer."""
    return {"fc1": (N_IN, width), "fc2": (width, width), "fc3": (width, N_OUT)}


def init_params(key: jax.Array, width: int = 200, scale: float = 8.0, dtype=jnp.float64) -> dict:
    """PyTorch's default `nn.Linear` init, every tensor then multiplied by `scale`.

    Weights and biases are both U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with
    a=sqrt(5) reduces to this bound), drawn with jax.random in float64 and cast afterwards,
    so the float32 variant starts from the same numbers rounded.

    Returns:
        {"fc1": {"kernel": (784, width), "bias": (width,)}, "fc2": ..., "fc3": ...}
    """
    params = {}
    keys = jax.random.split(key, 2 * len(LAYERS))
    for i, (name, (fan_in, fan_out)) in enumerate(layer_shapes(width).items()):
        bound = 1.0 / jnp.sqrt(jnp.float64(fan_in))
        w = jax.random.uniform(keys[2 * i], (fan_in, fan_out), jnp.float64, -bound, bound)
        b = jax.random.uniform(keys[2 * i + 1], (fan_out,), jnp.float64, -bound, bound)
        params[name] = {"kernel": (w * scale).astype(dtype), "bias": (b * scale).astype(dtype)}
    return params


def forward(params: dict, x: jax.Array) -> jax.Array:
    """Applies the MLP (the same function as `MLP().apply({'params': params}, x)`)."""
    return MLP(width=params["fc1"]["kernel"].shape[1], dtype=params["fc1"]["kernel"].dtype).apply(
        {"params": params}, x
    )


@jax.custom_vjp
def matmul_pretransposed(x: jax.Array, xt: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w, whose gradient with respect to w is computed as xt @ g, with xt = x.T given.

    The same mathematics as autodiff's x^T g (a dot with a transposed left operand), from an
    operand laid out for a plain product, which XLA's CPU backend runs on a faster GEMM path.
    x's gradient is g @ w^T, as autodiff's (XLA drops it when nothing uses it, as for FC1's
    input images); xt, a copy of x for the gradient only, gets none.
    """
    return x @ w


def _matmul_pretransposed_fwd(x, xt, w):
    return x @ w, (xt, w)


def _matmul_pretransposed_bwd(res, g):
    xt, w = res
    return g @ w.T, None, xt @ g


matmul_pretransposed.defvjp(_matmul_pretransposed_fwd, _matmul_pretransposed_bwd)


def _fc1(x, w, xt):
    return x @ w if xt is None else matmul_pretransposed(x, xt, w)


def forward_columns(params: dict, x_cols: jax.Array, cols: jax.Array, xt: jax.Array | None = None) -> jax.Array:
    """`forward(params, x)` from the input columns `cols` only: x_cols = x[:, cols].

    Equal to `forward` up to the order of summation in FC1's product when every column of x
    outside `cols` is zero. `cols` may repeat a column whose inputs are zero (padding). The
    gradient with respect to FC1's kernel is full size, exactly zero in the rows not in `cols`.
    With `xt` (x_cols.T), FC1's weight gradient is taken as xt @ g (`matmul_pretransposed`).
    """
    w1 = jnp.take(params["fc1"]["kernel"], cols, axis=0, mode="clip")
    h = nn.relu(_fc1(x_cols, w1, xt) + params["fc1"]["bias"])
    h = nn.relu(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def forward_narrow(params: dict, x_cols: jax.Array, xt: jax.Array | None = None) -> jax.Array:
    """`forward_columns(params_full, x_cols, cols)` with FC1's kernel already narrowed to `cols`.

    params["fc1"]["kernel"] is the full kernel's rows `cols` (K, width), x_cols = x[:, cols];
    the same products as `forward_columns`, without the per-call row gather. With the full
    kernel and x it is `forward`. With `xt` (x_cols.T), FC1's weight gradient is xt @ g.
    """
    h = nn.relu(_fc1(x_cols, params["fc1"]["kernel"], xt) + params["fc1"]["bias"])
    h = nn.relu(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]
