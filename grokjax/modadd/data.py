"""All p^2 modular-addition pairs, a seeded train/test split, and their device copy.

Example i = a * p + b (a, b in 0..p-1) is the token sequence [a, b, p] ('=' is token p)
with label (a + b) mod p. The split is Nanda et al.'s `gen_train_test`: the pairs in that
order, shuffled by `random.Random(split_seed)`, the first floor(frac_train * p^2) for
training. Everything is numpy on the host; `to_device` puts it on the device once.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np

from grokjax.modadd.config import ModAddConfig


class Split(NamedTuple):
    """Tokens (n, 3) int32 and labels (n,) int32 of both splits (host or device arrays)."""

    train_tokens: np.ndarray
    train_labels: np.ndarray
    test_tokens: np.ndarray
    test_labels: np.ndarray


def all_pairs(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair in the order a * p + b: tokens (p^2, 3) int32 [a, b, p], labels (a + b) mod p."""
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}")
    a, b = np.divmod(np.arange(p * p), p)
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    return tokens, ((a + b) % p).astype(np.int32)


def split_indices(p: int, frac_train: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair indices (into `all_pairs`) of the train and test splits, in shuffled order.

    `random.Random(split_seed).shuffle` of the p^2 pairs, as Nanda et al.'s `gen_train_test`
    (`random.seed(seed); random.shuffle(pairs)`): the permutation depends only on the length,
    so shuffling the indices gives their split. Train is the first floor(frac_train * p^2).
    """
    order = list(range(p * p))
    random.Random(split_seed).shuffle(order)
    div = int(frac_train * p * p)
    order = np.asarray(order, np.int64)
    return order[:div], order[div:]


def make_split(cfg: ModAddConfig) -> Split:
    """The host arrays of `cfg`'s split (train and test in their shuffled order)."""
    tokens, labels = all_pairs(cfg.p)
    tr, te = split_indices(cfg.p, cfg.frac_train, cfg.split_seed)
    return Split(tokens[tr], labels[tr], tokens[te], labels[te])


def to_device(split: Split) -> Split:
    """The same split as device arrays (one transfer; the training loop then reads them in place)."""
    import jax  # noqa: PLC0415  (the host side above needs no JAX)

    return Split(*jax.device_put(tuple(split)))  # no copy program compiled per shape, as jnp.asarray would
