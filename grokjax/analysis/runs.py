"""The runs an analysis reads: found, named and checked once, handed to every consumer.

`find_named_runs(root)` finds the run directories at or below `root`
(`grokjax.rundir.find_runs`) and names each one (`run_names`); `read_runs` checks and reads
them (`read_run`, through `grokjax.analysis.preflight`). The report (`grokjax.analysis.report.make_report`) and the trap
ablation (`grokjax.analysis.ablation.ablate_runs`) take the same `Run` values, so a run is
found, named and read (and its warnings printed) once per analysis.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pandas as pd

from grokjax.analysis import preflight
from grokjax.analysis.preflight import AnalysisError
from grokjax.rundir import find_runs


@dataclasses.dataclass(frozen=True)
class Run:
    """What the analysis needs to know about a run directory."""

    path: Path
    name: str
    config: dict  # the TrainConfig fields
    created: str
    metrics: pd.DataFrame  # one row per valid evaluated step, sorted
    steps: tuple[int, ...]  # checkpoints to analyse (complete, with a metrics record)
    skipped: dict = dataclasses.field(default_factory=dict)  # step -> why its checkpoint is unusable
    fingerprints: dict = dataclasses.field(default_factory=dict)  # step -> SHA-256 of its checkpoint
    recorded: dict = dataclasses.field(default_factory=dict)  # step -> in-loop monitor record

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def wd(self) -> float:
        return float(self.config.get("wd", math.nan))


def read_run(run_dir: str | os.PathLike, name: str | None = None, *, strict: bool = False) -> Run:
    """Checks and reads a run directory (`grokjax.analysis.preflight.check_run`).

    The problems that leave a part out are issued as `AnalysisWarning`s (raised as one
    AnalysisError with `strict`).

    Raises:
        AnalysisError: the run cannot be analysed (one line per problem).
    """
    d = Path(run_dir)
    check = preflight.check_run(d)
    if check.errors:
        raise AnalysisError("\n".join(check.errors))
    preflight.report(check.warnings, strict)
    return Run(path=d, name=name or d.name, config=check.config, created=check.created, metrics=check.metrics,
               steps=check.steps, skipped=dict(check.skipped), fingerprints=dict(check.fingerprints),
               recorded=dict(check.recorded))


def run_names(root: Path, run_dirs: list[Path]) -> dict[str, Path]:
    """Run name -> directory: the path relative to the input root ('.' becomes the directory's name)."""
    return {(d.relative_to(root).as_posix() if d != root else d.resolve().name) or d.resolve().name: d
            for d in run_dirs}


def find_named_runs(root: str | os.PathLike) -> dict[str, Path]:
    """Run name -> directory for every run at or below `root` (`grokjax.rundir.find_runs`).

    Raises:
        AnalysisError: no run directory under root.
    """
    root = Path(root)
    run_dirs = find_runs(root)
    if not run_dirs:
        raise AnalysisError(f"no run directories (with config.json) under {root}")
    return run_names(root, run_dirs)


def read_runs(named: dict[str, Path], *, strict: bool = False) -> dict[str, Run]:
    """`read_run` of every named run directory, every one checked before any long computation.

    Raises:
        AnalysisError: runs that cannot be analysed (one line per problem, every run checked).
    """
    runs, errors = {}, []
    for name, d in named.items():
        try:
            runs[name] = read_run(d, name, strict=strict)
        except AnalysisError as e:
            errors.append(str(e))
    if errors:
        raise AnalysisError("\n".join(errors))
    return runs
