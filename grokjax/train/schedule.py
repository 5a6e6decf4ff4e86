"""When to evaluate: the authors' 191-point rule, the final step, and a log-spaced grid.

A record at step t describes the parameters after t updates. Evaluating never changes the
trajectory (it consumes no training randomness), so extra points only add density.
"""

from __future__ import annotations

import math

import numpy as np


def authors_log_steps(n_steps: int) -> np.ndarray:
    """The notebook's rule over t = 0..N-1: t<30, or t<150 and t%10==0, or t % ceil(N/150) == 0."""
    log_freq = math.ceil(n_steps / 150)
    early = np.concatenate([np.arange(30), np.arange(30, 150, 10)])
    steps = np.concatenate([early[early < n_steps], np.arange(0, n_steps, log_freq)])
    return np.unique(steps.astype(np.int64))


def log_grid_steps(n_steps: int, per_decade: int) -> np.ndarray:
    """About `per_decade` geometrically spaced integer steps per decade in [1, N], deduplicated."""
    if per_decade <= 0 or n_steps < 1:
        return np.zeros(0, dtype=np.int64)
    n_points = int(math.ceil(math.log10(n_steps) * per_decade)) + 1
    grid = np.unique(np.round(np.logspace(0, math.log10(n_steps), n_points)).astype(np.int64))
    return grid[(grid >= 1) & (grid <= n_steps)]


def eval_steps(n_steps: int, per_decade: int = 20, authors: bool = True) -> np.ndarray:
    """All evaluation steps: 0, N (the final state), the log grid and (default) the authors' rule."""
    base = authors_log_steps(n_steps) if authors else np.zeros(1, dtype=np.int64)
    steps = np.concatenate([base, [n_steps], log_grid_steps(n_steps, per_decade)])
    return np.unique(steps.astype(np.int64))


def chunk_lengths(n: int, max_chunk: int) -> list[int]:
    """Splits a segment of n steps into chunks: full `max_chunk`s, then powers of two.

    At most floor(log2(max_chunk)) + 2 distinct lengths are ever produced, whatever n is,
    so the number of compiled scan variants stays small and bounded.
    """
    out = [max_chunk] * (n // max_chunk)
    rest = n % max_chunk
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= bit:
            out.append(bit)
            rest -= bit
        bit >>= 1
    return out


def nearest_per_decade(available: list[int], per_decade: int, final: int) -> list[int]:
    """About `per_decade` of the available steps a decade (nearest on a log grid), plus 0 and the last."""
    if per_decade <= 0 or not available:
        return []
    av = np.array(available)
    keep = {available[0], available[-1]}
    for target in log_grid_steps(max(final, 1), per_decade):
        keep.add(int(av[np.argmin(np.abs(np.log(np.maximum(av, 1)) - np.log(target)))]))
    return sorted(keep)
