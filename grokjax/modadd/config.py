"""The modular-addition configuration: one frozen dataclass, Nanda et al.'s values as defaults.

The paper (its Appendix H) states the architecture and none of the training settings, so
every default here comes from the public code of Nanda et al. 2023, "Progress measures for
grokking via mechanistic interpretability" (its `transformers.py`: `Config`, `Trainer`,
`gen_train_test`). docs/modadd.md lists each default with its source.
"""

from __future__ import annotations

import dataclasses
import math

DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModAddConfig:
    """Every knob of the modular-addition task; vary it with `dataclasses.replace`."""

    # The modulus. 113 in the paper (App. H) and in Nanda et al.; the vocabulary is p + 1
    # (the numbers 0..p-1 and '=' as token p). Any p >= 2 is accepted (tests use small ones).
    p: int = 113
    # Fraction of the p^2 pairs in the training split (Nanda et al.'s frac_train; the paper
    # gives none). The split holds floor(frac_train * p^2) pairs.
    frac_train: float = 0.3
    # Seed of the train/test split: Python's random.Random(split_seed).shuffle of the pairs,
    # Nanda et al.'s gen_train_test (their seed 0), so split_seed=0 is their split.
    split_seed: int = 0
    # Seed of the initial parameters (jax.random.PRNGKey(seed); the split has its own seed).
    seed: int = 0
    # Width of the residual stream (Nanda et al.'s d_model; the paper: 128).
    d_model: int = 128
    # Attention heads and their width (4 x 32 in the paper and in Nanda et al.).
    n_heads: int = 4
    d_head: int = 32
    # Hidden width of the MLP (4 d_model = 512 in the paper and in Nanda et al.).
    d_mlp: int = 512
    # AdamW, as torch.optim.AdamW(lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98)) in Nanda et
    # al.'s Trainer; eps is torch's default. The decay applies to every parameter.
    lr: float = 1e-3
    wd: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    # Linear learning-rate warm-up: update t (t = 0, 1, ...) uses lr * min(t / warmup, 1), as
    # Nanda et al.'s LambdaLR(lambda step: min(step/10, 1)); so update 0 has lr 0. 0: no warm-up.
    warmup: int = 10
    # Parameter and activation dtype; the loss's log-softmax is always float64 (Nanda et al.'s
    # cross_entropy_high_precision). float64 like the MLP; float32 as an option.
    dtype: str = "float64"

    def __post_init__(self):
        for name in ("p", "d_model", "n_heads", "d_head", "d_mlp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "p" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'p' else 1}, got {v!r}")
        for name in ("seed", "split_seed", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.frac_train, (int, float)) and 0 < self.frac_train < 1):
            raise ValueError(f"frac_train must lie strictly between 0 and 1, got {self.frac_train!r}")
        n_train = int(self.frac_train * self.p**2)
        if not 1 <= n_train < self.p**2:
            raise ValueError(f"frac_train={self.frac_train} leaves {n_train} of {self.p**2} pairs for training; "
                             "both splits must be non-empty")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.wd) and self.wd >= 0):
            raise ValueError(f"wd must be a finite number >= 0, got {self.wd!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps >= 0):
            raise ValueError("b1 and b2 must lie in [0, 1) and eps must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float64 or float32, got {self.dtype!r}")

    @property
    def vocab(self) -> int:
        """Vocabulary size: the p numbers and '='."""
        return self.p + 1

    @property
    def n_train(self) -> int:
        """Number of training pairs, floor(frac_train * p^2) as in Nanda et al."""
        return int(self.frac_train * self.p**2)
