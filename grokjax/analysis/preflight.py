"""Checks of a run directory before the analysis reads it: config.json, metrics.jsonl and
the params checkpoints.

`check_run(run_dir)` returns what can be analysed, plus one line per problem, each naming
the file (and the line and step where there is one):

* errors (the run cannot be analysed): config.json missing, not JSON, written in a newer
  format, or without the fields the analysis uses; no params checkpoint; no metrics.jsonl
  or no valid record in it.
* warnings (the bad part is left out, the same way in every output): a metrics line that
  is torn, not an object, without an integer step, or with an accuracy that is missing,
  NaN or outside [0, 1] (the line is dropped, and a checkpoint of that step is not
  analysed); a repeated step (the later line is used); config fields this code does not
  know (a newer trainer; they are ignored); a checkpoint directory that is empty,
  incomplete or unreadable (the step is skipped); checkpoints with no metrics record (not
  analysed); evaluated steps without a checkpoint (one line per run; their rows have
  status 'no_checkpoint').

`report(lines, strict)` issues the warnings as `AnalysisWarning`, or with `strict` raises
them as one error. Every params checkpoint gets a fingerprint (the SHA-256 of its files),
so that cached results are reused only for checkpoints whose bytes are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path

import pandas as pd

from grokjax import rundir

PARAMS_DIR = "checkpoints/params"  # as grokjax.ckpt.PARAMS_DIR (not imported: it pulls in Orbax)
# The config fields the analysis reads (the shuffle and dropout seeds, the training subset,
# the weight-decay grouping of the tables), with their checks.
CONFIG_FIELDS = {
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "data_seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "n_per_class": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "wd": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
}
# The same for a run of the modular-addition transformer (config.json's task is "modadd"):
# the seeds, the split its progress measures read and the weight decay.
MODADD_CONFIG_FIELDS = {
    "seed": CONFIG_FIELDS["seed"],
    "wd": CONFIG_FIELDS["wd"],
    "p": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
    "frac_train": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
    "split_seed": CONFIG_FIELDS["data_seed"],
}
TASKS = ("mnist_mlp", "modadd")
ACCURACIES = ("train/acc", "test/acc")
# Files every complete params checkpoint holds (Orbax StandardCheckpointer, OCDBT format).
CHECKPOINT_FILES = ("default/_METADATA", "default/manifest.ocdbt")
_STEP_IN_TEXT = re.compile(r'"step"\s*:\s*(\d+)')


class AnalysisError(ValueError):
    """A bad analysis input: no run, no checkpoints, unreadable config or metrics."""


class AnalysisWarning(UserWarning):
    """A problem with an analysis input that is left out (an error with --strict)."""


@dataclasses.dataclass(frozen=True)
class RunCheck:
    """The analysable parts of a run directory and the problems found."""

    config: dict
    created: str
    metrics: pd.DataFrame  # valid records only, one per step, sorted
    steps: tuple[int, ...]  # checkpoints to analyse: complete, and with a metrics record
    skipped: dict[int, str]  # metrics steps whose checkpoint is present but unusable -> why
    fingerprints: dict[int, str]  # step -> SHA-256 of the checkpoint's files (or of the monitor record)
    errors: list[str]
    warnings: list[str]
    recorded: dict = dataclasses.field(default_factory=dict)  # step -> the monitor's record (grokjax.analysis.monitor)


def report(lines: list[str], strict: bool) -> None:
    """Issues each line as an AnalysisWarning; with `strict`, raises them as one AnalysisError."""
    if not lines:
        return
    if strict:
        raise AnalysisError("\n".join(lines))
    for line in lines:
        warnings.warn(line, AnalysisWarning, stacklevel=3)


def check_config(run_dir: Path) -> tuple[dict, str, list[str], list[str]]:
    """A run's config.json (`rundir.read_config_payload`) -> (config fields, creation time,
    errors, warnings)."""
    path = Path(run_dir) / rundir.CONFIG_FILE
    try:
        payload = rundir.read_config_payload(run_dir)
    except rundir.RunDirError as e:
        return {}, "", [str(e)], []
    config = payload["config"]
    task = config.get("task", "mnist_mlp")
    if task not in TASKS:
        return config, "", [f"{path}: unknown task {task!r} (written by a newer grokjax?)"], []
    fields = MODADD_CONFIG_FIELDS if task == "modadd" else CONFIG_FIELDS
    errors = [f"{path}: field {k!r} is {'missing' if k not in config else f'invalid ({config[k]!r})'}"
              for k, ok in fields.items() if k not in config or not ok(config[k])]
    unknown = sorted(set(config) - set(rundir.CONFIG_KEYS))
    warns = [f"{path}: unknown field(s) {', '.join(unknown)} (written by a newer grokjax?); ignored"] if unknown else []
    return config, str(payload.get("created", "")), errors, warns


def _accuracy_problem(rec: dict) -> str | None:
    for k in ACCURACIES:
        v = rec.get(k)
        if k not in rec:
            return f"{k} is missing"
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return f"{k} is not a number ({v!r})"
        if not math.isfinite(v):
            return f"{k} is {v}"
        if not 0 <= v <= 1:
            return f"{k} is {v}, outside [0, 1]"
    return None


def check_metrics(path: Path) -> tuple[pd.DataFrame, dict[int, str], list[str], list[str]]:
    """metrics.jsonl -> (valid records, {step: why dropped}, errors, warnings).

    A dropped line whose step is known (from the record, or read from the torn text) is
    listed in the second value so that its checkpoint is left out too.
    """
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return pd.DataFrame(), {}, [f"{path}: missing"], []
    except (OSError, UnicodeDecodeError) as e:
        return pd.DataFrame(), {}, [f"{path}: unreadable ({type(e).__name__}: {e})"], []
    records: dict[int, tuple[int, dict]] = {}
    dropped: dict[int, str] = {}
    warns = []
    for no, text in enumerate(lines, 1):
        where = f"{path} line {no}"
        try:
            rec = json.loads(text)
        except ValueError:
            m = _STEP_IN_TEXT.search(text)
            if m:
                dropped[int(m.group(1))] = "torn metrics line"
                where += f" (step {int(m.group(1))})"
            warns.append(f"{where}: not valid JSON (a torn or corrupt line); dropped")
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            warns.append(f"{where}: not a record with a non-negative integer 'step'; dropped")
            continue
        problem = _accuracy_problem(rec)
        if problem:
            dropped[step] = f"metrics line {no} dropped"
            warns.append(f"{where} (step {step}): {problem}; dropped")
            continue
        if step in records:
            warns.append(f"{where} (step {step}): repeats line {records[step][0]}; the later line is used")
        records[step] = (no, rec)
        dropped.pop(step, None)
    if not records:
        return pd.DataFrame(), dropped, [f"{path}: no valid records"], warns
    df = pd.DataFrame.from_records([rec for _, rec in records.values()])
    return df.sort_values("step").reset_index(drop=True), dropped, [], warns


def fingerprint(step_dir: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file of a checkpoint (OSError if unreadable)."""
    h = hashlib.sha256()
    for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(step_dir).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _checkpoint_problem(step_dir: Path) -> str | None:
    if not any(p.is_file() for p in step_dir.rglob("*")):
        return "empty checkpoint directory"
    missing = [f for f in CHECKPOINT_FILES if not (step_dir / f).is_file()]
    if missing:
        return f"incomplete checkpoint (no {', '.join(missing)})"
    return None


def _steps_text(steps: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")


def check_run(run_dir: str | Path) -> RunCheck:
    """All checks of one run directory (see the module docstring)."""
    d = Path(run_dir)
    config, created, errors, warns = check_config(d)
    if errors:
        return RunCheck({}, "", pd.DataFrame(), (), {}, {}, errors, warns)
    pdir = d / PARAMS_DIR
    saved = sorted(int(p.name) for p in pdir.iterdir() if p.is_dir() and p.name.isdigit()) if pdir.is_dir() else []
    records, r_warns = _monitor_records(d)
    warns += r_warns
    if not saved and not records:
        return RunCheck(config, created, pd.DataFrame(), (), {}, {},
                        [f"{d}: no params checkpoints under {PARAMS_DIR} and no monitor record"], warns)
    metrics, dropped, m_errors, m_warns = check_metrics(rundir.metrics_path(d))
    warns += m_warns
    if m_errors:
        return RunCheck(config, created, pd.DataFrame(), (), {}, {}, m_errors, warns)
    logged = set(int(s) for s in metrics["step"])
    steps, skipped, prints, unlogged = [], {}, {}, []
    for s in saved:
        step_dir = pdir / str(s)
        if s not in logged:
            if s not in dropped:  # a dropped line's own warning already names its step
                unlogged.append(s)
            continue
        problem = _checkpoint_problem(step_dir)
        if problem is None:
            try:
                prints[s] = fingerprint(step_dir)
            except OSError as e:
                problem = f"unreadable ({type(e).__name__}: {e.strerror or e})"
        if problem:
            skipped[s] = problem
            warns.append(f"{step_dir}: {problem}; step {s} skipped")
        else:
            steps.append(s)
    if unlogged:
        warns.append(f"{pdir}: no metrics record for step(s) {_steps_text(unlogged)}; not analysed")
    recorded = {s: r for s, r in records.items() if s in logged}
    for s, rec in recorded.items():
        if s not in prints:
            prints[s] = "monitor:" + hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    steps = sorted(set(steps) | set(recorded))
    no_ckpt = sorted(logged - set(saved) - set(recorded))
    if no_ckpt:
        warns.append(f"{pdir}: no checkpoint or monitor record for {len(no_ckpt)} evaluated step(s) "
                     f"({_steps_text(no_ckpt)}); their rows have status no_checkpoint")
    return RunCheck(config, created, metrics, tuple(steps), skipped, prints, [], warns, recorded)


def _monitor_records(d: Path) -> tuple[dict[int, dict], list[str]]:
    """The in-loop monitor's records of a run (`rundir.read_records`), by step; a corrupt file is a warning."""
    try:
        return {int(r["step"]): r for r in rundir.read_records(d)}, []
    except rundir.RunDirError as e:  # names the file and the line
        return {}, [f"{e}; the monitor record is not used"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return {}, [f"{rundir.records_path(d)}: {e}; the monitor record is not used"]
