"""The run directory's lifecycle on the training side: create or check it, write config.json,
resume it as it started, and name a sweep's replicas.

`grokjax.rundir` owns the file names and formats; this module decides what a new or resumed
run writes and refuses (a different config, a foreign directory).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from grokjax import rundir
from grokjax.rundir import CONFIG_FILE, RunDirError
from grokjax.train.config import LEGACY_FIELDS, ConfigError, TrainConfig
from grokjax.train.provenance import device_info, versions, xla_cpu_threads


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Creates or checks the run directory and writes config.json for a new run.

    Raises:
        ConfigError: the directory is unwritable, holds something else, or holds a run with a
            different config (unless `cfg.overwrite`).
    """
    d = Path(cfg.out)
    cfg_file = d / CONFIG_FILE
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d} exists and is not a directory")
    if cfg_file.exists() and not cfg.overwrite:
        try:
            old = rundir.read_config(d)
        except RunDirError as e:
            raise ConfigError(f"{e}; pass --overwrite to start over") from None
        old_task = old.get("task", "mnist_mlp")  # config.json of an MLP run names no task
        if old_task != cfg.task:
            raise ConfigError(f"{d} holds a --task {old_task} run, not --task {cfg.task}; "
                              "use another --out or pass --overwrite")
        new = cfg.science()
        if cfg.task == "mnist_mlp":
            old = {**LEGACY_FIELDS, **old}  # a run started before a field existed ran with its old value
        diff = sorted(k for k in set(old) | set(new) if k in new and old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ConfigError(f"{d} holds a run with a different config ({shown}); "
                              "use another --out or pass --overwrite")
        return d
    if d.exists() and any(d.iterdir()):
        # --overwrite only ever deletes a grokjax run directory, never an arbitrary folder.
        if not (cfg.overwrite and cfg_file.exists()):
            raise ConfigError(f"{d} is not empty and holds no {CONFIG_FILE}; use another --out")
        shutil.rmtree(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        payload = {"config": cfg.to_dict(), "versions": versions(), "device": device_info(),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "notes": science_notes(cfg)}
        rundir.write_config(d, payload)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {d}: {e.strerror or e}") from None
    return d


def as_started(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the old value of each science field its run directory was started without.

    A run directory whose config.json predates `skip_zero_pixels` ran dense and resumes dense,
    so that its trajectory does not change mid-run (said in one line). A resume with another
    XLA CPU thread count than the run started with is said in one line too (see
    `xla_cpu_threads`); it is the user's to fix, with `PJRT_NPROC`.
    """
    if cfg.overwrite or not rundir.is_run(cfg.out):
        return cfg
    try:
        payload = rundir.read_config_payload(cfg.out)
    except RunDirError:
        return cfg  # prepare_run_dir reports it
    old = payload["config"]
    if old.get("task", "mnist_mlp") != cfg.task:
        return cfg  # prepare_run_dir refuses it
    was, now = (payload.get("device") or {}).get("xla_cpu_threads"), xla_cpu_threads()
    if was and now and was != now:
        print(f"NOTE: {cfg.out} was started with {was} XLA CPU threads and resumes with {now}: float64 sums may "
              f"round differently, so the trajectory may drift in the low bits; set PJRT_NPROC={was} to keep them",
              file=sys.stderr)
    if cfg.task != "mnist_mlp":
        return cfg  # the legacy fields are the MLP's
    changes = {k: v for k, v in LEGACY_FIELDS.items() if k not in old and getattr(cfg, k) != v}
    if changes:
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        print(f"NOTE: {cfg.out} was started before {', '.join(changes)} existed: it resumes with {shown}, "
              "as it started", file=sys.stderr)
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def wd_name(wd: float) -> str:
    """The weight decay as it appears in a sweep's directory names: 0, 0.01, 1e-05."""
    text = repr(float(wd))
    return text[:-2] if text.endswith(".0") else text


def science_notes(cfg: TrainConfig) -> list[str]:
    """Deviations from the paper's protocol, recorded in config.json and printed loudly."""
    notes = []
    if cfg.dtype != "float64":
        notes.append(f"dtype={cfg.dtype}: NOT the paper's float64 (speed study only)" if cfg.task == "mnist_mlp"
                     else f"dtype={cfg.dtype}: NOT this project's float64 (Nanda et al. trained in float32)")
    if cfg.reshuffle:
        notes.append("reshuffle=True: Omnigrok's per-epoch reshuffle, NOT the authors' fixed 5-batch cycle")
    return notes
