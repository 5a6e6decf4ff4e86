"""A training call's replicas as one validated value: the shared config, each replica's own.

`make_sweep(cfg, seeds=..., wds=...)` checks the seeds and weight decays once and expands them
into the replicas `grokjax.train.runner.run` trains together in one compiled scan: one seed
(`cfg.out` itself), several seeds (`<out>/seed<k>`) or a sweep of (weight decay, seed) pairs
(`<out>/wd<wd>_seed<k>`, weight decays in the given order, then seeds). Each replica's config
is resolved as its run directory started (`workdir.as_started`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from grokjax.train.config import LEGACY_FIELDS, ConfigError, TrainConfig
from grokjax.train.workdir import as_started, wd_name


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The replicas of one training call.

    Attributes:
        shared: the compiled program's settings (every replica's but seed, wd and out; its wd
            is replica 0's).
        replicas: each replica's config: its seed, weight decay and run directory (`out`).
        stacked: whether the replicas form a vmapped axis (seeds or wds given), even of one.
    """

    shared: TrainConfig
    replicas: tuple[TrainConfig, ...]
    stacked: bool

    @property
    def wd_vector(self) -> list[float] | None:
        """The per-replica weight decays the step needs; None when all replicas share one
        (the step then uses `shared.wd`)."""
        wds = [c.wd for c in self.replicas]
        return wds if len(set(wds)) > 1 else None


def make_sweep(cfg: TrainConfig, *, seeds: list[int] | None = None, wds: list[float] | None = None) -> Sweep:
    """Validates and expands a training call's seeds and weight decays (module docstring).

    Raises:
        ConfigError: seeds not distinct (or empty), weight decays not distinct finite numbers
            >= 0 (or empty), or run directories started with different values of a field that
            did not exist when some of them started (`LEGACY_FIELDS`).
    """
    if seeds is not None and (len(seeds) < 1 or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    if wds is not None:
        if len(wds) < 1 or len(set(wds)) != len(wds) or not all(w >= 0 and math.isfinite(w) for w in wds):
            raise ConfigError(f"weight decays (--wds) must be distinct finite numbers >= 0, got {wds}")
        cfgs = [dataclasses.replace(cfg, wd=float(w), seed=s, out=str(Path(cfg.out) / f"wd{wd_name(w)}_seed{s}"))
                for w in wds for s in (seeds if seeds is not None else [cfg.seed])]
    elif seeds is not None:
        cfgs = [dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed{s}")) for s in seeds]
    else:
        cfgs = [cfg]
    cfgs = [as_started(c) for c in cfgs]
    for name in LEGACY_FIELDS:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise ConfigError(f"these run directories differ in {name} (some were started before the "
                              "field existed); train them separately")
    # The compiled chunk's shared settings; a sweep's weight decays go to it per replica.
    shared = dataclasses.replace(cfg, **{name: getattr(cfgs[0], name) for name in LEGACY_FIELDS}, wd=cfgs[0].wd)
    return Sweep(shared=shared, replicas=tuple(cfgs), stacked=seeds is not None or wds is not None)
