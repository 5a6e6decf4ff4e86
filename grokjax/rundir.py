"""The run directory: every file name and format in it, in one place.

A run directory holds (the training half writes it, the analysis half reads it):

    config.json               {"config": {...the task's TrainConfig fields...}, "versions", "device",
                              "created", "notes"}; "format" (absent = 1) marks a future layout
    metrics.jsonl             one JSON object per evaluated step ("step", "train/acc", ...)
    events.jsonl              start, pauses, resumes, live warnings and the end, one JSON object a line
    sweep.json                (a sweep's top folder) the manifest of its replicas
    checkpoints/state/<step>  full training states (Orbax, see `grokjax.ckpt`)
    checkpoints/params/<step> params only, for the analysis (see `grokjax.ckpt`)
    monitor/records.jsonl     the in-loop monitor's HTSR rows, one JSON object per step
    monitor/spectra/<step>.npz  eigenvalues of W^T W and W^rand per layer at that step
    analysis/                 the analysis' per-run cache and outputs

Writes that replace a file go through `atomic_write`/`atomic_write_text` (a temporary file in
the same folder, then a rename), so a kill leaves the old file or the new one, never half of
one. Append-only logs (metrics, events, monitor records) may end in a torn line after a kill:
the readers here skip a torn *last* line and refuse a bad line anywhere else with
`RunDirError`, one line naming the file and the line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SWEEP_FILE = "sweep.json"
MONITOR_DIR = "monitor"
RECORDS_FILE = "records.jsonl"
SPECTRA_DIR = "spectra"
ANALYSIS_DIR = "analysis"
# config.json carries no format marker today (format 1). A writer that changes its layout
# sets "format" to a higher integer, which readers refuse rather than misread.
CONFIG_FORMAT = 1
# The model's weight layers, as named in a params checkpoint.
LAYERS = ("fc1", "fc2", "fc3")
# The fields of config.json's "config" object that this code writes (the TrainConfig fields;
# a test keeps the two equal; a run writes those of its task). A reader warns about others: a
# newer writer's fields.
CONFIG_KEYS = ("wd", "steps", "seed", "data_seed", "lr", "b1", "b2", "eps", "batch", "width", "init_scale",
               "n_per_class", "reshuffle", "dtype", "log_points_per_decade", "authors_grid", "chunk",
               "full_save_secs", "out", "overwrite", "progress", "cache_dir", "idx_dir", "time_limit", "monitor",
               "keep_params", "skip_zero_pixels", "fc1_weight_grad", "task", "p", "frac_train", "split_seed", "d_model",
               "n_heads", "d_head", "d_mlp", "warmup", "forward")

PathLike = str | os.PathLike


class RunDirError(ValueError):
    """A file of a run directory is missing, unreadable or damaged (the message is one line)."""


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary path beside `path`, then renames it onto `path`.

    The temporary file keeps `path`'s suffix (np.savez and parquet writers look at it) and is
    removed if `write` fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replaces `path` with `text` (UTF-8) in one rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: PathLike, payload) -> None:
    """`payload` as indented JSON, replacing `path` in one rename."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- config.json


def is_run(d: PathLike) -> bool:
    """Whether `d` is a run directory (it holds config.json)."""
    return (Path(d) / CONFIG_FILE).is_file()


def find_runs(root: PathLike) -> list[Path]:
    """Run directories at or below `root`, sorted; none inside an analysis/ folder."""
    root = Path(root)
    if is_run(root):
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG_FILE)
                  if ANALYSIS_DIR not in p.relative_to(root).parts)


def read_config_payload(d: PathLike) -> dict:
    """The whole config.json of a run directory.

    Raises:
        RunDirError: missing, unreadable, not JSON, without a "config" object, or in a newer
            format than this code reads.
    """
    path = Path(d) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise RunDirError(f"{path}: no 'config' object (not a grokjax run configuration)")
    fmt = payload.get("format", CONFIG_FORMAT)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > CONFIG_FORMAT:
        raise RunDirError(f"{path}: format {fmt!r} is newer than this code reads ({CONFIG_FORMAT}); update grokjax")
    return payload


def read_config(d: PathLike) -> dict:
    """The "config" object of a run's config.json (see `read_config_payload` for the errors)."""
    return read_config_payload(d)["config"]


def write_config(d: PathLike, payload: dict) -> None:
    """Writes config.json in one rename."""
    write_json(Path(d) / CONFIG_FILE, payload)


# --------------------------------------------------------------------------- JSON-lines logs


def read_jsonl(path: PathLike, *, before_step: int | None = None, need_step: bool = True) -> list[dict]:
    """The records of a JSON-lines log, in file order (an absent file has none).

    A torn last line (a write cut by a kill) is skipped. A bad line anywhere else means the file
    was damaged, not torn, and is refused. With `need_step`, every record must be an object with
    an integer "step"; `before_step` keeps only the records with a smaller step.

    Raises:
        RunDirError: one line naming the file and the bad line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and (not need_step or (isinstance(rec.get("step"), int)
                                                               and not isinstance(rec.get("step"), bool)))
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines) - 1:
                continue
            what = "a JSON record with a step" if need_step else "a JSON object"
            raise RunDirError(f"{path} line {i + 1} is corrupt (not {what})")
        if before_step is None or rec["step"] < before_step:
            out.append(rec)
    return out


def rewrite_jsonl(path: PathLike, records: list[dict]) -> None:
    """Replaces a JSON-lines log with `records`, in one rename."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def open_append(path: PathLike):
    """The log opened for appending (UTF-8); the caller writes `json.dumps(rec) + "\\n"` lines."""
    return open(path, "a", encoding="utf-8")  # noqa: SIM115


def append_jsonl(path: PathLike, rec: dict) -> None:
    """Appends one record to a JSON-lines log."""
    with open_append(path) as f:
        f.write(json.dumps(rec) + "\n")


def metrics_path(d: PathLike) -> Path:
    return Path(d) / METRICS_FILE


def read_metrics(d: PathLike, *, before_step: int | None = None) -> list[dict]:
    """metrics.jsonl's records (see `read_jsonl`)."""
    return read_jsonl(metrics_path(d), before_step=before_step)


def truncate_metrics(d: PathLike, start: int) -> list[dict]:
    """Drops metrics records at or after `start` (a resume recomputes them); returns the rest."""
    kept = read_metrics(d, before_step=start)
    rewrite_jsonl(metrics_path(d), kept)
    return kept


def append_event(d: PathLike, **fields) -> None:
    """Appends one event (start, pause, resume, warning, end) to events.jsonl, stamped with the time."""
    append_jsonl(Path(d) / EVENTS_FILE, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})


def read_events(d: PathLike) -> list[dict]:
    """events.jsonl's records; unreadable lines are skipped (the log is informational)."""
    path = Path(d) / EVENTS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# --------------------------------------------------------------------------- monitor record


def records_path(d: PathLike) -> Path:
    return Path(d) / MONITOR_DIR / RECORDS_FILE


def spectra_path(d: PathLike, step: int) -> Path:
    return Path(d) / MONITOR_DIR / SPECTRA_DIR / f"{int(step)}.npz"


def read_records(d: PathLike) -> list[dict]:
    """The monitor's records, ascending by step, one per step (a later line wins).

    Raises:
        RunDirError: a line before the last one is damaged.
    """
    out = {int(r["step"]): r for r in read_jsonl(records_path(d))}
    return [out[s] for s in sorted(out)]


def write_spectra(d: PathLike, step: int, spectra: dict[str, np.ndarray]) -> None:
    """monitor/spectra/<step>.npz, keys '<layer>/esd' and '<layer>/rand', in one rename."""
    path = spectra_path(d, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, **spectra))


def read_spectra(d: PathLike, step: int) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {'esd': eigenvalues of W^T W, 'rand': eigenvalues of W^rand}} at one step."""
    with np.load(spectra_path(d, step)) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            layer, kind = key.split("/")
            out.setdefault(layer, {})[kind] = z[key]
    return out
