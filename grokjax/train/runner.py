"""The run loop: run directory, evaluation schedule, checkpoints, resume, progress bar.

`run(cfg)` trains one seed; `run(cfg, seeds=[0, 1, 2, 3])` trains several seeds at once,
vmapped inside the same scan (sharded over devices when there are several), each seed
writing its own run directory `<out>/seed<k>` in the usual format; `run(cfg, seeds=[0, 1],
wds=[0, 0.01])` trains every (weight decay, seed) pair the same way into `<out>/wd<wd>_seed<k>`.

A run directory holds config.json (every resolved knob, package versions, device),
metrics.jsonl (one JSON object per evaluated step) and checkpoints/ (see `grokjax.ckpt`).
Rerunning the same command resumes from the latest full state and ends bitwise identical
to an uninterrupted run; a different config on the same directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from grokjax import ckpt
from grokjax.train.config import LEGACY_FIELDS, ConfigError, TrainConfig, format_duration
from grokjax.data import load_mnist
from grokjax.train.schedule import authors_log_steps, chunk_lengths, eval_steps, log_grid_steps
from grokjax.train.engine import (TrainState, batch_perm, init_state, make_data, make_evaluate, make_train_chunk,
                           pixel_columns)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
# keep_params=log keeps about this many params checkpoints a decade (plus the authors' steps).
LOG_PARAMS_PER_DECADE = 5
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grokjax")


class NonFiniteError(RuntimeError):
    """The loss or the parameter norm stopped being finite."""


class Paused(Exception):
    """The run stopped cleanly (time limit or signal) with a full state at `step`."""

    def __init__(self, step: int, total: int, elapsed: float, reason: str):
        self.step, self.total, self.elapsed, self.reason = step, total, elapsed, reason
        super().__init__(f"paused at step {step} of {total} after {format_duration(elapsed)} ({reason}); "
                         "rerun the same command to continue")


class _StopRequest:
    """Decides when a segment pauses: the time limit, or the first SIGTERM/SIGINT.

    The first signal asks the loop to finish the chunk in flight, write a full state and
    pause. A second signal restores the default handler and re-sends itself: the process
    stops at once, and the next start resumes from the last full state.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, time_limit: float):
        self.reason: str | None = None
        self.started = time.monotonic()
        self.deadline = self.started + time_limit if time_limit > 0 else math.inf
        self._old: dict = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason = name
            print(f"\n{name} received: pausing after the chunk in flight (send it again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def should_stop(self) -> str | None:
        if self.reason is None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        return self.reason

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _device_info() -> dict[str, object]:
    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs),
            "cpu": platform.processor() or platform.machine(), "host": platform.node()}


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
            old = json.loads(cfg_file.read_text())["config"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{cfg_file} is unreadable ({e}); pass --overwrite to start over") from None
        new = cfg.science()
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
        payload = {"config": cfg.to_dict(), "versions": _versions(), "device": _device_info(),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "notes": _science_notes(cfg)}
        tmp = d / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, cfg_file)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {d}: {e.strerror or e}") from None
    return d


def _as_started(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the old value of each science field its run directory was started without.

    A run directory whose config.json predates `skip_zero_pixels` ran dense and resumes dense,
    so that its trajectory does not change mid-run (said in one line).
    """
    f = Path(cfg.out) / CONFIG_FILE
    if cfg.overwrite or not f.is_file():
        return cfg
    try:
        old = json.loads(f.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return cfg  # prepare_run_dir reports it
    if not isinstance(old, dict):
        return cfg
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


def _science_notes(cfg: TrainConfig) -> list[str]:
    """Deviations from the paper's protocol, recorded in config.json and printed loudly."""
    notes = []
    if cfg.dtype != "float64":
        notes.append(f"dtype={cfg.dtype}: NOT the paper's float64 (speed study only)")
    if cfg.reshuffle:
        notes.append("reshuffle=True: Omnigrok's per-epoch reshuffle, NOT the authors' fixed 5-batch cycle")
    return notes


def _read_records(path: Path, before_step: int) -> list[dict]:
    """Complete JSON lines of a .jsonl log with step < before_step.

    A torn last line (a write cut by a kill) is dropped. A bad line anywhere else means the
    file was damaged, not torn: it is refused, and the file is left as it is.

    Raises:
        ConfigError: a line before the last one is not a JSON object with a step.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines) - 1:
                continue
            raise ConfigError(f"{path} line {i + 1} is corrupt (not a JSON record with a step); "
                              "the file was left unchanged: repair or remove that line, or use --overwrite")
        if rec["step"] < before_step:
            out.append(rec)
    return out


def _rewrite_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


class _Replica:
    """One seed's run directory, checkpoint managers and metrics file."""

    def __init__(self, cfg: TrainConfig, steps: np.ndarray, *, process_local: bool = False):
        self.cfg = cfg
        self.dir = prepare_run_dir(cfg)
        self.kept_params = kept_param_steps(cfg, steps)
        self.params = ckpt.params_manager(self.dir, self.kept_params, process_local=process_local)
        self.state = ckpt.state_manager(self.dir, cfg.steps, cfg.full_save_secs, process_local=process_local)
        self.metrics_path = self.dir / METRICS_FILE
        self.metrics = None
        self.monitor = None
        self.kept_records: list[dict] = []

    def open_metrics(self, start: int, offset: float) -> float:
        """Drops records at or after `start` (they are recomputed) and opens for append.

        Returns:
            The wall-clock seconds already spent before `start` (from the kept records).
        """
        kept = _read_records(self.metrics_path, start)
        self.kept_records = kept
        _rewrite_records(self.metrics_path, kept)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        return kept[-1].get("time/wall", offset) if kept else offset

    def has_final_record(self) -> bool:
        """metrics.jsonl ends with the record of the final step."""
        recs = _read_records(self.metrics_path, self.cfg.steps + 1)
        return bool(recs) and recs[-1]["step"] == self.cfg.steps

    def event(self, **fields) -> None:
        """Appends one event (pause, resume, warning) to events.jsonl."""
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        with open(self.dir / EVENTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def last_pause(self) -> dict | None:
        path = self.dir / EVENTS_FILE
        if not path.exists():
            return None
        last = None
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") in ("pause", "resume"):
                last = rec
        return last if last and last.get("event") == "pause" else None

    def start_monitor(self, start: int, inputs: dict) -> None:
        from grokjax.analysis.monitor import Monitor  # noqa: PLC0415

        self.monitor = Monitor(self.dir, run_seed=self.cfg.seed, inputs=inputs, start=start,
                               metrics=self.kept_records, on_warning=self.warn)

    def warn(self, w: dict) -> None:
        """Prints and records one live early warning (called from the monitor's thread)."""
        from grokjax.analysis.monitor import PERSISTENCE  # noqa: PLC0415

        tqdm.write(f"WARNING: {self.dir.name}: step {w['step']}: {w['layer']} {w['signal']} "
                   f"(value {w['value']:.4g}) at {PERSISTENCE} consecutive evaluations since step {w['onset']}, "
                   "after the best test accuracy so far", file=sys.stderr)
        self.event(event="warning", **w)

    def drain_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.drain()

    def close(self, *, finished: bool = False) -> None:
        if self.monitor is not None:
            self.monitor.close(finish_backfill=finished)
            self.monitor = None
        if self.metrics:
            self.metrics.close()
        for m in (self.params, self.state):
            m.wait_until_finished()
            m.close()


def kept_param_steps(cfg: TrainConfig, steps: np.ndarray) -> set[int]:
    """The evaluation steps whose params checkpoint is kept, by `cfg.keep_params`.

    all: every evaluation step and 0. log: the evaluation steps nearest to a grid of
    LOG_PARAMS_PER_DECADE points a decade, the authors' schedule, 0 and N. none: no params.
    """
    all_steps = set(int(s) for s in steps) | {0}
    if cfg.keep_params == "all":
        return all_steps
    if cfg.keep_params == "none":
        return set()
    keep = {0, int(cfg.steps)} | set(int(s) for s in authors_log_steps(cfg.steps))
    keep |= set(_nearest_per_decade(sorted(all_steps), LOG_PARAMS_PER_DECADE, cfg.steps))
    return keep & all_steps


def _state_tree(state: TrainState, perm: np.ndarray, wall: float) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": state.key,
            "batch_perm": perm, "wall": np.float64(wall)}


def _restore(replicas: list[_Replica], templates: list[dict], group=None) -> tuple[int, list[dict]] | None:
    """Newest step at which every replica has a readable full state (None: start fresh).

    With `group`, every replica of every process: the processes agree on the step.
    """
    if group is not None:
        return _restore_agreed(replicas, templates, group)
    common = set.intersection(*(set(r.state.all_steps()) for r in replicas))
    for step in sorted(common, reverse=True):
        states = []
        for r, tmpl in zip(replicas, templates):
            got = ckpt.restore_latest_state(r.state, tmpl, steps=[step])
            if got is None:
                break
            states.append(got[1])
        else:
            return step, states
    return None


def _restore_agreed(replicas: list[_Replica], templates: list[dict], group) -> tuple[int, list[dict]] | None:
    """`_restore` over several processes: the newest step at which all of them read every replica.

    After a process was killed, some replicas may hold newer states than others: those are
    deleted. An unreadable state is deleted where it was found (ckpt.restore_latest_state), and
    the processes agree again on what is left.
    """
    while True:
        common = group.common_steps(set.intersection(*(set(r.state.all_steps()) for r in replicas)))
        newest = max(common, default=-1)
        for r in replicas:  # states past the common step are recomputed (bitwise) and saved again
            for s in r.state.all_steps():
                if s > newest:
                    r.state.delete(s)
        if not common:
            return None
        step, states = newest, []
        for r, tmpl in zip(replicas, templates):
            got = ckpt.restore_latest_state(r.state, tmpl, steps=[step])
            if got is None:
                break
            states.append(got[1])
        if not group.any(len(states) < len(replicas)):
            return step, states


def _mesh_sharding(n_seeds: int):
    """Shards the seed axis over as many devices as divide n_seeds; None for one device."""
    devs = jax.devices()
    k = max(d for d in range(1, len(devs) + 1) if n_seeds % d == 0)
    if k == 1:
        return None, None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    mesh = Mesh(np.array(devs[:k]), ("seed",))
    return NamedSharding(mesh, P("seed")), NamedSharding(mesh, P())


def run(cfg: TrainConfig, *, seeds: list[int] | None = None, wds: list[float] | None = None,
        mnist: dict | None = None, crash_after_chunks: int | None = None, group=None) -> list[Path]:
    """Trains (or resumes) a run and returns its run directories.

    Args:
        cfg: the configuration. With `seeds` or `wds`, `cfg.out` is the parent directory.
        seeds: several seeds trained together (vmapped); each gets `<out>/seed<k>`.
        wds: a sweep: every (weight decay, seed) pair, seeds from `seeds` (default `cfg.seed`),
            trained together with one weight decay per replica; each gets `<out>/wd<wd>_seed<k>`.
        mnist: preloaded MNIST arrays (default: `load_mnist`).
        crash_after_chunks: testing aid: raise after dispatching this many chunks, without
            flushing anything, to simulate a crash in the middle of a segment.
        group: the processes of a sweep over several processes (`grokjax.train.distributed.Group`):
            the replicas are sharded over the global mesh, this process writes the run
            directories of its own replicas (process 0 also `<out>/sweep.json`), and every
            stop, save and resume decision is taken together.

    Raises:
        ConfigError: bad run directory. NonFiniteError: the run diverged (checkpoints kept).
        Paused: the time limit was reached or a SIGTERM/SIGINT arrived; a full state at the
            current step is on disk and rerunning continues bitwise as if never stopped.
    """
    multi = seeds is not None or wds is not None
    if group is not None:
        from grokjax.train import distributed  # noqa: PLC0415

        digest = distributed.config_digest(cfg.to_dict(), seeds, wds)
        group.check_same(digest)
    if seeds is not None and (len(seeds) < 1 or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    if wds is not None:
        if len(wds) < 1 or len(set(wds)) != len(wds) or not all(w >= 0 and math.isfinite(w) for w in wds):
            raise ConfigError(f"wds must be distinct finite numbers >= 0, got {wds}")
        cfgs = [dataclasses.replace(cfg, wd=float(w), seed=s, out=str(Path(cfg.out) / f"wd{wd_name(w)}_seed{s}"))
                for w in wds for s in (seeds if seeds is not None else [cfg.seed])]
    elif multi:
        cfgs = [dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed{s}")) for s in seeds]
    else:
        cfgs = [cfg]
    cfgs = [_as_started(c) for c in cfgs]
    if len({c.skip_zero_pixels for c in cfgs}) > 1:
        raise ConfigError("these run directories differ in skip_zero_pixels (some were started before the "
                          "field existed); train them separately")
    # The compiled chunk's shared settings; a sweep's weight decays go to it per replica.
    cfg = dataclasses.replace(cfg, skip_zero_pixels=cfgs[0].skip_zero_pixels, wd=cfgs[0].wd)
    for note in _science_notes(cfg):
        print(f"WARNING: {note}; recorded in config.json", file=sys.stderr)
    steps = eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid)
    authors = set(int(s) for s in authors_log_steps(cfg.steps))
    if group is None:
        with _StopRequest(cfg.time_limit) as stop:
            replicas = [_Replica(c, steps) for c in cfgs]
            try:
                return _train(cfg, cfgs, replicas, steps, authors, multi, mnist, crash_after_chunks, stop)
            finally:
                for r in replicas:
                    r.close()
    return _run_distributed(cfg, cfgs, steps, authors, mnist, group, digest)


def _run_distributed(cfg, cfgs, steps, authors, mnist, group, digest: str) -> list[Path]:
    """`run` for a sweep over several processes: this process's replicas, decisions taken together."""
    from grokjax.train import distributed  # noqa: PLC0415

    replicas = []
    try:
        lo, hi, sharded, replicated = distributed.layout(len(cfgs), group)
        if group.index == 0:
            _write_manifest(cfg, cfgs, group, sharded, digest)
        layout = _Layout(group, lo, sharded, replicated)
        with _StopRequest(cfg.time_limit) as stop:
            replicas = [_Replica(c, steps, process_local=True) for c in cfgs[lo:hi]]
            _train(cfg, cfgs, replicas, steps, authors, True, mnist, None, stop, layout)
            return [r.dir for r in replicas]
    except Paused:
        raise  # every process pauses at the same step
    except BaseException as e:
        group.abort(f"{type(e).__name__}: {e}")
        raise
    finally:
        for r in replicas:
            r.close()


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A sweep over several processes: the group, this process's first replica, the shardings."""

    group: object
    lo: int
    sharded: object
    replicated: object


SWEEP_FILE = "sweep.json"


def _write_manifest(cfg: TrainConfig, cfgs: list[TrainConfig], group, sharded, digest: str) -> None:
    """`<out>/sweep.json`: the replicas, which process writes each, and the configuration hash."""
    per = len(cfgs) // group.count
    payload = {"processes": group.count, "devices": int(sharded.mesh.devices.size),
               "config_hash": digest, "config": cfg.to_dict(),
               "replicas": [{"dir": Path(c.out).name, "wd": c.wd, "seed": c.seed, "process": i // per}
                            for i, c in enumerate(cfgs)],
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    d = Path(cfg.out)
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (SWEEP_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, d / SWEEP_FILE)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {d}: {e.strerror or e}") from None


def _resume_reason(replicas: list[_Replica], start: int) -> str:
    pause = replicas[0].last_pause()
    if pause is not None and pause.get("step") == start:
        return f"paused by {pause.get('reason', 'a stop')} at {pause.get('time', '?')}"
    return ("the latest full state; the previous segment stopped without pausing, "
            "so the steps after it are recomputed")


def _train(cfg, cfgs, replicas, steps, authors, multi, mnist, crash_after_chunks, stop, layout=None):
    # layout: a sweep over several processes; `replicas` are then this process's (cfgs[lo:lo+len]),
    # and every host-side array below (metrics, params, states) holds only their rows.
    lo = 0 if layout is None else layout.lo
    mine = slice(lo, lo + len(replicas))
    mnist = mnist if mnist is not None else load_mnist(cfg.cache_dir, cfg.idx_dir)
    data = make_data(cfg, mnist)
    perms = [batch_perm(c) for c in cfgs]
    fresh = [init_state(c) for c in cfgs]
    templates = [_state_tree(s, p, 0.0) for s, p in zip(fresh, perms)]
    restored = _restore(replicas, templates[mine], None if layout is None else layout.group)
    start, walls = 0, [0.0] * len(replicas)
    if restored is not None:
        start, trees = restored
        for tree, p in zip(trees, perms[mine]):
            if not np.array_equal(np.asarray(tree["batch_perm"]), p):
                raise ConfigError("the saved batch order differs from this config's; use --overwrite")
        fresh[mine] = [TrainState(t["params"], t["opt_state"], jnp.asarray(t["step"]), jnp.asarray(t["key"]))
                       for t in trees]
        walls = [float(t["wall"]) for t in trees]
        complete = start == cfg.steps and all(r.has_final_record() for r in replicas)
        if layout is not None:
            complete = not layout.group.any(not complete)
        if complete:
            print(f"already complete: {cfg.out} ({cfg.steps} steps)", file=sys.stderr)
            return [r.dir for r in replicas]
        reason = _resume_reason(replicas, start)
        print(f"resuming {cfg.out} from step {start} of {cfg.steps} ({reason})", file=sys.stderr)
        for r in replicas:
            r.event(event="resume", step=int(start), reason=reason)
    walls = [r.open_metrics(start, w) for r, w in zip(replicas, walls)]
    if cfg.monitor:
        from grokjax.analysis.progress import load_inputs  # noqa: PLC0415

        for r, c in zip(replicas, cfgs):
            r.start_monitor(start, load_inputs(c.n_per_class, c.data_seed, c.seed, mnist=mnist))

    n = len(cfgs) if multi else None
    wds = [c.wd for c in cfgs]
    chunk = make_train_chunk(cfg, n, wds=wds if len(set(wds)) > 1 else None)
    evaluate = make_evaluate(n)
    cols = pixel_columns(cfg, np.stack(perms) if multi else perms[0], np.asarray(data.x_train))
    cols = None if cols is None else jnp.asarray(cols)
    fetch = jax.device_get
    if layout is not None:
        from grokjax.train import distributed  # noqa: PLC0415

        fetch = distributed.fetch_local
        sharded, replicated = layout.sharded, layout.replicated
        state = distributed.to_global(jax.tree.map(lambda *xs: np.stack(xs), *fresh), sharded)
        perm = distributed.to_global(np.stack(perms), sharded)
        data = distributed.to_global(data, replicated)
        if cols is not None:
            cols = distributed.to_global(cols, sharded if cols.ndim == 3 else replicated)
        n_dev, n_proc = sharded.mesh.devices.size, layout.group.count
        print(f"sharding {len(cfgs)} replicas over {n_dev} devices in {n_proc} processes ({len(cfgs) // n_dev} "
              f"per device); this process writes {', '.join(r.dir.name for r in replicas)}", file=sys.stderr)
    elif multi:
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *fresh)
        perm = jnp.asarray(np.stack(perms))
        sharded, replicated = _mesh_sharding(len(cfgs))
        if sharded is not None:
            state, perm = jax.device_put((state, perm), sharded)
            data = jax.device_put(data, replicated)
            if cols is not None:
                cols = jax.device_put(cols, sharded if cols.ndim == 3 else replicated)
            n_dev = sharded.mesh.devices.size
            print(f"sharding {len(cfgs)} seeds over {n_dev} devices ({len(cfgs) // n_dev} per device)",
                  file=sys.stderr)
    else:
        state, perm = jax.tree.map(jnp.asarray, fresh[0]), jnp.asarray(perms[0])

    def pick_fn(i):
        return (lambda a: a[i]) if multi else (lambda a: a)

    t0 = time.perf_counter() - walls[0]
    t, dispatched = start, 0
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=not cfg.progress,
               desc=Path(cfg.out).name, smoothing=0.05)
    try:
        for e in (int(s) for s in steps if s >= start):
            pending = None
            for length in chunk_lengths(e - t, cfg.chunk):
                if _agreed_stop(stop, layout):
                    if pending is not None:
                        _check_probe(*pending, replicas[0])
                        bar.update(pending[2])
                    _pause(cfg, replicas, state, perms[mine], t, time.perf_counter() - t0, stop, pick_fn, fetch)
                state, last_loss = chunk(state, perm, data, length, cols)
                dispatched += 1
                if crash_after_chunks is not None and dispatched >= crash_after_chunks:
                    raise RuntimeError("simulated crash")
                if pending is not None:
                    _check_probe(*pending, replicas[0])  # blocks on the previous chunk only
                    bar.update(pending[2])
                pending = (last_loss, t + length, length)
                t += length
            if pending is not None:
                _check_probe(*pending, replicas[0])
                bar.update(pending[2])
            metrics = fetch(evaluate(state.params, data))
            params_host = fetch(state.params)
            wall = time.perf_counter() - t0
            wants = _wants_full_state(replicas[0], e)
            if layout is not None:  # one decision in every process, so that resume finds a common step
                wants = layout.group.any(wants)
            full = fetch(state) if wants else None
            if full is not None and cfg.keep_params != "all":
                # steps whose params are not kept: their monitor records are on disk before the state
                for r in replicas:
                    r.drain_monitor()
            for i, r in enumerate(replicas):
                pick = pick_fn(i)
                rec = {"step": e, **{k: float(pick(v)) for k, v in metrics.items()},
                       "time/wall": round(wall, 3), "schedule/authors": e in authors}
                if not all(math.isfinite(rec[k]) for k in ("train/loss", "test/loss", "params/l2")):
                    r.metrics.write(json.dumps(rec) + "\n")
                    r.metrics.flush()
                    raise NonFiniteError(_nonfinite_message(f"at step {e}", r))
                r.metrics.write(json.dumps(rec) + "\n")
                r.metrics.flush()
                ckpt.save_params(r.params, e, jax.tree.map(pick, params_host))
                if r.monitor is not None:
                    r.monitor.submit(e, jax.tree.map(lambda a: np.array(pick(a)), params_host), rec["test/acc"],
                                     kept=e in r.kept_params)
                if full is not None:
                    tree = _state_tree(jax.tree.map(pick, full), perms[lo + i], wall)
                    if not ckpt.save_state(r.state, e, tree, force=True):
                        raise ckpt.CheckpointError(f"full-state save at step {e} was refused")
            live = replicas[0].monitor.postfix() if replicas[0].monitor is not None else ""
            bar.set_postfix_str(f"test acc {np.mean(np.atleast_1d(metrics['test/acc'])):.4f}"
                                + (f" {live}" if live else ""), refresh=False)
    finally:
        bar.close()
    for r in replicas:
        if r.monitor is not None:
            m = r.monitor
            r.close()
            left = m.backfill_left
            print(f"monitor: {m.seconds:.1f} s of HTSR computed beside training "
                  f"({100 * m.seconds / max(stop.elapsed, 1e-9):.1f}% of this segment's wall time)"
                  + (f"; {len(m.errors)} failed, see above" if m.errors else "")
                  + (f"; {left} steps still without a record (`python -m grokjax.analysis.monitor {r.dir}` computes them; "
                     "the analysis computes them from the checkpoints otherwise)" if left else ""),
                  file=sys.stderr)
    return [r.dir for r in replicas]


def _agreed_stop(stop: _StopRequest, layout) -> str | None:
    """The stop decision at a chunk boundary; over several processes, the same in all of them."""
    if layout is None:
        return stop.should_stop()
    stop.reason = layout.group.stop_reason(stop.should_stop())
    return stop.reason


def _pause(cfg, replicas, state, perms, t: int, wall: float, stop: _StopRequest, pick_fn, fetch=jax.device_get) -> None:
    """Writes a full state at step t (also between evaluation steps), records the pause, raises Paused."""
    full = fetch(state)
    if cfg.keep_params != "all":
        for r in replicas:
            r.drain_monitor()
    for i, r in enumerate(replicas):
        if t not in r.state.all_steps():
            tree = _state_tree(jax.tree.map(pick_fn(i), full), perms[i], wall)
            if not ckpt.save_state(r.state, t, tree, force=True):
                raise ckpt.CheckpointError(f"full-state save at step {t} was refused")
        r.state.wait_until_finished()
        r.params.wait_until_finished()
        r.metrics.flush()
        r.event(event="pause", step=int(t), reason=stop.reason, elapsed=round(stop.elapsed, 1))
    raise Paused(int(t), cfg.steps, stop.elapsed, stop.reason)


def _wants_full_state(replica: _Replica, step: int) -> bool:
    """One save decision for all replicas, from the first replica's state-manager policy."""
    return bool(replica.state.should_save(step))


def _check_probe(last_loss, step: int, length: int, replica: _Replica) -> None:
    if getattr(last_loss, "is_fully_addressable", True) is False:  # a sweep over several processes
        from grokjax.train.distributed import local_rows  # noqa: PLC0415

        last_loss = local_rows(last_loss)
    if not np.all(np.isfinite(np.asarray(last_loss))):
        raise NonFiniteError(_nonfinite_message(f"within steps {step - length}..{step}", replica))


def _nonfinite_message(where: str, r: _Replica) -> str:
    r.params.wait_until_finished()
    good = ckpt.list_param_steps(r.dir)
    last = good[-1] if good else None
    return f"non-finite loss or norm {where} in {r.dir}; last good checkpoint: step {last}"


# --------------------------------------------------------------------------------------
# Export: a run's compact, portable record

def _nearest_per_decade(available: list[int], per_decade: int, final: int) -> list[int]:
    """About `per_decade` of the available steps a decade (nearest on a log grid), plus 0 and the last."""
    if per_decade <= 0 or not available:
        return []
    av = np.array(available)
    keep = {available[0], available[-1]}
    for target in log_grid_steps(max(final, 1), per_decade):
        keep.add(int(av[np.argmin(np.abs(np.log(np.maximum(av, 1)) - np.log(target)))]))
    return sorted(keep)


def _portable(tmp: Path, dst: Path) -> None:
    """Makes an exported record name no path of the machine it came from: config.json's `out`
    becomes the export folder as given, and Orbax's commit markers (whose text names the
    directory they were written in; only their presence matters) say only that the commit
    succeeded."""
    cfg_file = tmp / CONFIG_FILE
    payload = json.loads(cfg_file.read_text())
    payload["config"]["out"] = str(dst)
    cfg_file.write_text(json.dumps(payload, indent=2) + "\n")
    for marker in (tmp / "checkpoints").rglob("commit_success.txt"):
        marker.write_text("Checkpoint commit was successful.")


def export_run(run_dir: str | os.PathLike, folder: str | os.PathLike, *, params_per_decade: int = 0) -> Path:
    """Writes a run's compact record into the new folder `folder`, itself a run directory.

    The record names no path of the source machine: config.json's `out` is set to `folder`.

    It holds config.json, metrics.jsonl, events.jsonl, the monitor's record (monitor/), the
    latest full state (checkpoints/state/<step>/) and, with `params_per_decade` > 0, about that
    many params checkpoints a decade. The analysis reads it as it reads the run; training with
    `--out folder` and the run's flags continues from the exported state, bitwise as if the run
    had never stopped. The copy is assembled in a temporary sibling folder and renamed into
    place, so a failed export leaves nothing behind. Export a paused or finished run: a full
    state written while the export copies may be missed (the previous one is then exported).

    Raises:
        ConfigError: `run_dir` holds no run, or `folder` exists and is not an empty folder.
    """
    src, dst = Path(run_dir), Path(folder)
    if not (src / CONFIG_FILE).is_file():
        raise ConfigError(f"{src} holds no run (no {CONFIG_FILE}); nothing exported")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"export folder {dst} exists and is not empty; choose a new folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConfigError(f"export folder {dst} lies inside the run {src}; choose a folder outside it")
    states = ckpt.list_state_steps(src)
    if not states:
        raise ConfigError(f"{src} has no full state to export (it has not saved one yet)")
    tmp = dst.with_name(f".{dst.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        for name in (CONFIG_FILE, METRICS_FILE, EVENTS_FILE):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        from grokjax.analysis.monitor import MONITOR_DIR  # noqa: PLC0415

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
        cfg_steps = int(json.loads((src / CONFIG_FILE).read_text())["config"].get("steps", 1))
        for step in _nearest_per_decade(ckpt.list_param_steps(src), params_per_decade, cfg_steps):
            shutil.copytree(src / ckpt.PARAMS_DIR / str(step), tmp / ckpt.PARAMS_DIR / str(step))
        _portable(tmp, dst)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"export to {dst} failed: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
