"""A sweep's replicas: each one's run directory and checkpoints (`Replica`), where their arrays
live (`ReplicaAxis`: no axis for a single run, a stacked axis over the local devices, or the
global mesh of a sweep over several processes), and the full state every process resumes from
(`restore`).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from grokjax import ckpt, rundir
from grokjax.rundir import RunDirError
from grokjax.train import distributed
from grokjax.train.config import ConfigError, TrainConfig
from grokjax.train.distributed import Group
from grokjax.train.engine import TrainState
from grokjax.train.schedule import authors_log_steps, nearest_per_decade
from grokjax.train.workdir import prepare_run_dir

# keep_params=log keeps about this many params checkpoints a decade (plus the authors' steps).
LOG_PARAMS_PER_DECADE = 5


def damaged(e: RunDirError) -> ConfigError:
    """A damaged metrics log, refused in one line (the CLI's exit code 2); the file is left as it is."""
    return ConfigError(f"{e}; the file was left unchanged: repair or remove that line, or use --overwrite")


class Replica:
    """One seed's run directory, checkpoint managers and metrics file."""

    def __init__(self, cfg: TrainConfig, steps: np.ndarray, *, process_local: bool = False):
        self.cfg = cfg
        self.dir = prepare_run_dir(cfg)
        self.kept_params = kept_param_steps(cfg, steps)
        self.params = ckpt.params_manager(self.dir, self.kept_params, process_local=process_local)
        self.state = ckpt.state_manager(self.dir, cfg.steps, cfg.full_save_secs, process_local=process_local)
        self.metrics = None
        self.monitor = None
        self.kept_records: list[dict] = []

    def open_metrics(self, start: int, offset: float) -> float:
        """Drops records at or after `start` (they are recomputed) and opens for append.

        Returns:
            The wall-clock seconds already spent before `start` (from the kept records).
        """
        try:
            kept = rundir.truncate_metrics(self.dir, start)
        except RunDirError as e:
            raise damaged(e) from None
        self.kept_records = kept
        self.metrics = rundir.open_append(rundir.metrics_path(self.dir))
        return kept[-1].get("time/wall", offset) if kept else offset

    def log(self, rec: dict) -> None:
        """Appends one metrics record, flushed at once."""
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()

    def has_final_record(self) -> bool:
        """metrics.jsonl ends with the record of the final step."""
        try:
            recs = rundir.read_metrics(self.dir, before_step=self.cfg.steps + 1)
        except RunDirError as e:
            raise damaged(e) from None
        return bool(recs) and recs[-1]["step"] == self.cfg.steps

    def event(self, **fields) -> None:
        """Appends one event (start, pause, resume, warning, end) to events.jsonl."""
        rundir.append_event(self.dir, **fields)

    def last_pause(self) -> dict | None:
        """The last pause event, unless a resume followed it."""
        last = None
        for rec in rundir.read_events(self.dir):
            if rec.get("event") in ("pause", "resume"):
                last = rec
        return last if last and last.get("event") == "pause" else None

    def start_monitor(self, start: int, inputs: dict) -> None:
        from grokjax.analysis.monitor import Monitor  # noqa: PLC0415  (pandas, scipy: only with the monitor)

        self.monitor = Monitor(self.dir, run_seed=self.cfg.seed, inputs=inputs, start=start,
                               metrics=self.kept_records, on_warning=self.warn)

    def warn(self, w: dict) -> None:
        """Prints and records one live early warning (called from the monitor's thread)."""
        from grokjax.analysis.monitor import PERSISTENCE  # noqa: PLC0415  (as above)

        tqdm.write(f"WARNING: {self.dir.name}: step {w['step']}: {w['layer']} {w['signal']} "
                   f"(value {w['value']:.4g}) at {PERSISTENCE} consecutive evaluations since step {w['onset']}, "
                   "after the best test accuracy so far", file=sys.stderr)
        self.event(event="warning", **w)

    def drain_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.drain()

    def close(self, *, finished: bool = False) -> None:
        if self.monitor is not None:
            # the backfill reads params checkpoints: every save must be on disk first (a save
            # still in flight is not listed yet, and its step would be skipped)
            self.params.wait_until_finished()
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
    keep |= set(nearest_per_decade(sorted(all_steps), LOG_PARAMS_PER_DECADE, cfg.steps))
    return keep & all_steps


def state_tree(state: TrainState, perm: np.ndarray, wall: float) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": state.key,
            "batch_perm": perm, "wall": np.float64(wall)}


def restore(replicas: list[Replica], templates: list[dict], group: Group) -> tuple[int, list[dict]] | None:
    """The newest step at which every process reads a full state of every replica (None: start fresh).

    After a process was killed, some replicas may hold newer states than others: those are
    deleted (recomputed bitwise and saved again). An unreadable state is deleted where it was
    found (ckpt.restore_latest_state), and the processes agree again on what is left.
    """
    while True:
        common = group.common_steps(set.intersection(*(set(r.state.all_steps()) for r in replicas)))
        newest = max(common, default=-1)
        for r in replicas:
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


def mesh_sharding(n_seeds: int):
    """Shards the seed axis over as many devices as divide n_seeds; None for one device."""
    devs = jax.devices()
    k = max(d for d in range(1, len(devs) + 1) if n_seeds % d == 0)
    if k == 1:
        return None, None
    mesh = Mesh(np.array(devs[:k]), ("seed",))
    return NamedSharding(mesh, P("seed")), NamedSharding(mesh, P())


class ReplicaAxis:
    """The replicas of one compiled program, and how their arrays are laid out.

    A single run has no replica axis: its arrays are its own. Several seeds or weight decays
    are stacked on a leading axis that the chunk vmaps over, sharded over the local devices
    (as many as divide the replicas) or, in a sweep over several processes (`layout`, a
    `distributed.Layout`), over the global mesh. There a host copy (`fetch`) holds only this
    process's rows, so replica `i` below is this process's i-th, the run's `lo + i`-th.
    """

    def __init__(self, n: int, *, stacked: bool, group: Group, layout: distributed.Layout | None = None):
        self.n, self.stacked, self.layout, self.group = n, stacked or layout is not None, layout, group
        self.lo, self.hi = (0, n) if layout is None else (layout.lo, layout.hi)
        self.fetch = jax.device_get if layout is None else distributed.fetch_local

    @property
    def size(self) -> int | None:
        """The replica axis' length, as the engine takes it (None: no axis)."""
        return self.n if self.stacked else None

    def mine(self, count: int) -> slice:
        """This process's `count` replicas among the run's."""
        return slice(self.lo, self.lo + count)

    def pick(self, a, i: int):
        """Replica i's part of one host array."""
        return a[i] if self.stacked else a

    def row(self, tree, i: int):
        """Replica i's part of a host tree."""
        return jax.tree.map(lambda a: self.pick(a, i), tree)

    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Per-replica host arrays as the program takes them."""
        return np.stack(arrays) if self.stacked else arrays[0]

    def place(self, states: list[TrainState], perms: list[np.ndarray], data, cols, names: list[str]) -> tuple:
        """The program's inputs on the devices, the replica axis sharded: (state, perm, data, cols).

        `states` are this process's replicas', `perms` every replica's of the run; `names` this
        process's run directories.
        """
        if self.layout is not None:
            sharded, replicated = self.layout.sharded, self.layout.replicated
            state = distributed.rows_to_global(jax.tree.map(lambda *xs: np.stack(xs), *states), sharded,
                                               self.lo, self.n)
            perm = distributed.to_global(np.stack(perms), sharded)
            data = distributed.to_global(data, replicated)
            if cols is not None:
                cols = distributed.to_global(cols, sharded if cols.ndim == 3 else replicated)
            n_dev, n_proc = sharded.mesh.devices.size, self.layout.group.count
            print(f"sharding {self.n} replicas over {n_dev} devices in {n_proc} processes ({self.n // n_dev} "
                  f"per device); this process writes {', '.join(names)}", file=sys.stderr)
            return state, perm, data, cols
        # stacked on the host and put with device_put: the same arrays, without compiling a
        # stack program per leaf shape at every start
        if not self.stacked:
            # committed to the device, as a restored state is (Orbax's arrays are): a fresh run and
            # its resumes then call the same compiled programs (an uncommitted argument is a
            # different signature, so every resume compiled its chunks and evaluation again)
            return jax.device_put((states[0], np.asarray(perms[0])), jax.devices()[0]) + (data, cols)
        state, perm = jax.device_put((jax.tree.map(lambda *xs: np.stack(xs), *states), np.stack(perms)))
        sharded, replicated = mesh_sharding(self.n)
        if sharded is not None:
            state, perm = jax.device_put((state, perm), sharded)
            data = jax.device_put(data, replicated)
            if cols is not None:
                cols = jax.device_put(cols, sharded if cols.ndim == 3 else replicated)
            n_dev = sharded.mesh.devices.size
            print(f"sharding {self.n} seeds over {n_dev} devices ({self.n // n_dev} per device)", file=sys.stderr)
        return state, perm, data, cols
