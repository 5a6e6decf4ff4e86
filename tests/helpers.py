"""Small shared helpers for the tests."""

import math


def torch_init(rng, width=200, scale=8.0):
    """PyTorch's default Linear init (weights and biases U(+-1/sqrt(fan_in))) times scale, numpy."""
    out = {}
    for name, (fan_in, fan_out) in {"fc1": (784, width), "fc2": (width, width), "fc3": (width, 10)}.items():
        b = scale / math.sqrt(fan_in)
        out[name] = {"kernel": rng.uniform(-b, b, (fan_in, fan_out)), "bias": rng.uniform(-b, b, fan_out)}
    return out
