"""Small shared helpers for the tests."""

from grokjax.bench.init import torch_init  # noqa: F401  (PyTorch's default Linear init x 8, numpy)
