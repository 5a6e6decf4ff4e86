"""A run's compact, portable record: `export_run` (`run.py --export RUN FOLDER`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from grokjax import ckpt, rundir
from grokjax.rundir import CONFIG_FILE, EVENTS_FILE, METRICS_FILE, MONITOR_DIR, RunDirError
from grokjax.train.config import ConfigError
from grokjax.train.schedule import nearest_per_decade

def _portable(tmp: Path, dst: Path) -> None:
    """Makes an exported record name no path of the machine it came from: config.json's `out`
    becomes the export folder as given, and Orbax's commit markers (whose text names the
    directory they were written in; only their presence matters) say only that the commit
    succeeded."""
    payload = rundir.read_config_payload(tmp)
    payload["config"]["out"] = str(dst)
    rundir.write_config(tmp, payload)
    for marker in (tmp / "checkpoints").rglob("commit_success.txt"):
        marker.write_text("Checkpoint commit was successful.")


PHASES_ITEM = "phases"  # --export_params_at: the phase steps and the final step


def params_at_steps(run_dir: str | os.PathLike, items) -> tuple[dict[int, str], dict[str, int]]:
    """({kept params step: its labels}, {label: step} of those with no kept checkpoint near it)
    for `--export_params_at`.

    Each item is a step (label: the step) or PHASES_ITEM: the run's phase steps from its
    metrics.jsonl (`grokjax.analysis.phases.phase_targets`: 'pre' the end of pre-grokking, 'grok'
    the test-accuracy peak, 'drop' the collapse onset, 'anti' the collapse minimum or the final
    step) and 'final', its last evaluation. Each is taken at the nearest params checkpoint the run
    kept within `phases.PHASE_STEP_TOLERANCE_DECADES` (0.15 decade), the rule the trap ablation
    uses to find them, so an export carrying them lets the ablation run there from the export.
    """
    import pandas as pd  # noqa: PLC0415  (only for --export_params_at)

    from grokjax.analysis import phases  # noqa: PLC0415  (as above)

    src = Path(run_dir)
    if not rundir.is_run(src):
        raise ConfigError(f"{src} holds no run (no {CONFIG_FILE}); nothing exported")
    targets: dict[str, float] = {}
    for item in items:
        if item == PHASES_ITEM:
            try:
                rows = rundir.read_metrics(src)
            except RunDirError as e:
                raise ConfigError(f"{e}; nothing exported") from None
            metrics = pd.DataFrame([r for r in rows if "test/acc" in r])
            targets.update(phases.phase_targets(metrics))
            if len(metrics):
                targets["final"] = float(metrics["step"].max())
        else:
            targets[str(int(item))] = float(item)
    chosen, missing = phases.steps_near(ckpt.list_param_steps(src), targets)
    return {s: "+".join(labels) for s, labels in sorted(chosen.items())}, missing


def export_run(run_dir: str | os.PathLike, folder: str | os.PathLike, *, params_per_decade: int = 0,
               params_at: Iterable[int] = ()) -> Path:
    """Writes a run's compact record into the new folder `folder`, itself a run directory.

    The record names no path of the source machine: config.json's `out` is set to `folder`.

    It holds config.json, metrics.jsonl, events.jsonl, the monitor's record (monitor/), the
    latest full state (checkpoints/state/<step>/) and, with `params_per_decade` > 0, about that
    many params checkpoints a decade, and the params checkpoints at the steps `params_at` (each a
    step the run kept; `params_at_steps` finds them). The analysis reads it as it reads the run; training with
    `--out folder` and the run's flags continues from the exported state, bitwise as if the run
    had never stopped. The copy is assembled in a temporary sibling folder and renamed into
    place, so a failed export leaves nothing behind. Export a paused or finished run: a full
    state written while the export copies may be missed (the previous one is then exported).

    Raises:
        ConfigError: `run_dir` holds no readable run, or `folder` exists and is not an empty folder.
    """
    src, dst = Path(run_dir), Path(folder)
    if not rundir.is_run(src):
        raise ConfigError(f"{src} holds no run (no {CONFIG_FILE}); nothing exported")
    try:
        src_config = rundir.read_config(src)
    except RunDirError as e:
        raise ConfigError(f"{e}; nothing exported") from None
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"export folder {dst} exists and is not empty; choose a new folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConfigError(f"export folder {dst} lies inside the run {src}; choose a folder outside it")
    states = ckpt.list_state_steps(src)
    if not states:
        raise ConfigError(f"{src} has no full state to export (it has not saved one yet)")
    kept = ckpt.list_param_steps(src)
    wanted = set(nearest_per_decade(kept, params_per_decade, int(src_config.get("steps", 1))))
    absent = sorted(set(int(s) for s in params_at) - set(kept))
    if absent:
        raise ConfigError(f"{src} kept no params checkpoint at step(s) {', '.join(map(str, absent))}")
    tmp = dst.with_name(f".{dst.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        for name in (CONFIG_FILE, METRICS_FILE, EVENTS_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if (src / MONITOR_DIR).is_dir():
            shutil.copytree(src / MONITOR_DIR, tmp / MONITOR_DIR)
        for step in sorted(states, reverse=True):  # the newest state that copies completely
            try:
                shutil.copytree(src / ckpt.STATE_DIR / str(step), tmp / ckpt.STATE_DIR / str(step))
                break
            except (OSError, shutil.Error):
                shutil.rmtree(tmp / ckpt.STATE_DIR / str(step), ignore_errors=True)
        else:
            raise ConfigError(f"no full state of {src} could be copied")
        for step in sorted(wanted | set(int(s) for s in params_at)):
            shutil.copytree(src / ckpt.PARAMS_DIR / str(step), tmp / ckpt.PARAMS_DIR / str(step))
        _portable(tmp, dst)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"export to {dst} failed: {e.strerror or e}") from None
    except RunDirError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"export to {dst} failed: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
