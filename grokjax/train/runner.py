"""The run loop: run directory, evaluation schedule, checkpoints, resume, progress.

`run(cfg)` trains one seed; `run(cfg, seeds=[0, 1, 2, 3])` trains several seeds at once,
vmapped inside the same scan (sharded over devices when there are several), each seed
writing its own run directory `<out>/seed<k>` in the usual format; `run(cfg, seeds=[0, 1],
wds=[0, 0.01])` trains every (weight decay, seed) pair the same way into `<out>/wd<wd>_seed<k>`.

A run directory holds config.json (every resolved knob, package versions, device),
metrics.jsonl (one JSON object per evaluated step) and checkpoints/ (see `grokjax.ckpt`);
`grokjax.rundir` owns its file names and formats, `grokjax.train.workdir` creates, checks and
resumes it, and `grokjax.train.provenance` says what it records of the software and machine. Rerunning the same command resumes from the
latest full state and ends bitwise identical to an uninterrupted run; a different config on
the same directory is refused.

Progress goes to stderr (`grokjax.train.progress`); `grokjax.train.export` writes a run's
portable record. What differs between the tasks (data, state, chunk, evaluation, monitor
inputs) is `grokjax.train.tasks`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from grokjax import ckpt, rundir
from grokjax.rundir import SWEEP_FILE
from grokjax.train import distributed
from grokjax.train.config import ConfigError, TrainConfig, format_duration
from grokjax.train.distributed import Alone, Group, config_digest
from grokjax.train.engine import TrainState
from grokjax.train.progress import Progress
from grokjax.train.replicas import Replica, ReplicaAxis, restore, state_tree
from grokjax.train.provenance import segment_fields, xla_cpu_threads
from grokjax.train.stops import StopRequest, signal_for_test
from grokjax.train.schedule import authors_log_steps, chunk_lengths, eval_steps
from grokjax.train.sweep import Sweep, make_sweep
from grokjax.train.tasks import task_of
from grokjax.train.workdir import science_notes

class NonFiniteError(RuntimeError):
    """The loss or the parameter norm stopped being finite."""


class Paused(Exception):
    """The run stopped cleanly (time limit or signal) with a full state at `step`."""

    def __init__(self, step: int, total: int, elapsed: float, reason: str):
        self.step, self.total, self.elapsed, self.reason = step, total, elapsed, reason
        super().__init__(f"paused at step {step} of {total} after {format_duration(elapsed)} ({reason}); "
                         "rerun the same command to continue")


def run(cfg: TrainConfig, *, seeds: list[int] | None = None, wds: list[float] | None = None,
        mnist: dict | None = None, on_chunk: Callable[[int], None] | None = None, group: Group | None = None,
        stop: StopRequest | None = None) -> list[Path]:
    """Trains (or resumes) a run and returns its run directories.

    Args:
        cfg: the configuration. With `seeds` or `wds`, `cfg.out` is the parent directory.
        seeds: several seeds trained together (vmapped); each gets `<out>/seed<k>`.
        wds: a sweep: every (weight decay, seed) pair, seeds from `seeds` (default `cfg.seed`),
            trained together with one weight decay per replica; each gets `<out>/wd<wd>_seed<k>`.
        mnist: preloaded MNIST arrays (default: `load_mnist`; unused by --task modadd).
        on_chunk: called after each chunk is dispatched, with the step that chunk trains up to
            (it may still be computing). An exception raised there ends the run at once,
            without flushing anything, as a crash in the middle of a segment would.
        group: the processes of a sweep over several processes (`grokjax.train.distributed.Group`):
            the replicas are sharded over the global mesh, this process writes the run
            directories of its own replicas (process 0 also `<out>/sweep.json`), and every
            stop, save and resume decision is taken together. Default: this process alone
            (`distributed.Alone`, the same decisions through the same calls).
        stop: the process's stop request (`grokjax.train.stops`; the CLI holds one for the
            process's whole life); default: one installed for this call, with `cfg.time_limit`.

    Raises:
        ConfigError: bad run directory. NonFiniteError: the run diverged (checkpoints kept).
        Paused: the time limit was reached or a SIGTERM/SIGINT arrived; a full state at the
            current step is on disk and rerunning continues bitwise as if never stopped.
    """
    group = group if group is not None else Alone()
    digest = config_digest(cfg.to_dict(), seeds, wds)
    group.check_same(digest)
    sweep = make_sweep(cfg, seeds=seeds, wds=wds)
    cfg, cfgs = sweep.shared, list(sweep.replicas)
    for note in science_notes(cfg):
        print(f"WARNING: {note}; recorded in config.json", file=sys.stderr)
    steps = eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid)
    authors = set(int(s) for s in authors_log_steps(cfg.steps))
    with _held(stop, cfg.time_limit) as stop:
        replicas = []
        try:
            axis = _replica_axis(sweep, group, digest)
            replicas = [Replica(c, steps, process_local=group.count > 1) for c in cfgs[axis.lo:axis.hi]]
            _train(sweep, replicas, steps=steps, authors=authors, mnist=mnist, stop=stop, axis=axis,
                   on_chunk=on_chunk)
            return [r.dir for r in replicas]
        except Paused:
            raise  # every process pauses at the same step
        except BaseException as e:
            group.abort(f"{type(e).__name__}: {e}")  # the other processes stop too (PeerError)
            raise
        finally:
            for r in replicas:
                r.close()


def _replica_axis(sweep: Sweep, group: Group, digest: str) -> ReplicaAxis:
    """Where the sweep's replicas live. Over several processes: the global mesh (this process's
    replicas), a note when the processes' XLA thread counts differ, and process 0's `sweep.json`."""
    cfg, cfgs = sweep.shared, list(sweep.replicas)
    if group.count == 1:
        return ReplicaAxis(len(cfgs), stacked=sweep.stacked, group=group)
    layout = distributed.layout(len(cfgs), group)
    threads = [json.loads(v) for v in group.gather(json.dumps(xla_cpu_threads()))]
    if len(set(threads)) > 1:
        print(f"NOTE: the processes' XLA CPU thread counts differ ({', '.join(map(str, threads))}): their float64 "
              "sums may round differently from a one-process sweep's; set the same PJRT_NPROC in every process "
              "to keep them bitwise", file=sys.stderr)
    if group.index == 0:
        _write_manifest(cfg, cfgs, group, layout.sharded, digest, threads)
    return ReplicaAxis(len(cfgs), stacked=True, group=group, layout=layout)


def _held(stop: StopRequest | None, time_limit: float):
    """The caller's stop request as it is, or a new one installed for this run."""
    return contextlib.nullcontext(stop) if stop is not None else StopRequest(time_limit)


def _write_manifest(cfg: TrainConfig, cfgs: list[TrainConfig], group, sharded, digest: str,
                    threads: list[int | None]) -> None:
    """`<out>/sweep.json`: the replicas, which process writes each, the configuration hash, and
    each process's XLA CPU thread count (`xla_cpu_threads`)."""
    per = len(cfgs) // group.count
    payload = {"processes": group.count, "devices": int(sharded.mesh.devices.size), "xla_cpu_threads": threads,
               "config_hash": digest, "config": cfg.to_dict(),
               "replicas": [{"dir": Path(c.out).name, "wd": c.wd, "seed": c.seed, "process": i // per}
                            for i, c in enumerate(cfgs)],
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    d = Path(cfg.out)
    try:
        d.mkdir(parents=True, exist_ok=True)
        rundir.write_json(d / SWEEP_FILE, payload)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {d}: {e.strerror or e}") from None


def _resume_reason(replicas: list[Replica], start: int) -> str:
    pause = replicas[0].last_pause()
    if pause is not None and pause.get("step") == start:
        return f"paused by {pause.get('reason', 'a stop')} at {pause.get('time', '?')}"
    return ("the latest full state; the previous segment stopped without pausing, "
            "so the steps after it are recomputed")


@dataclasses.dataclass
class _Start:
    """Where a segment starts: its step, this process's replicas' states (restored, or fresh) and
    their wall-clock seconds before it."""

    step: int
    states: list[TrainState]
    walls: list[float]


def _train(sweep: Sweep, replicas: list[Replica], *, steps: np.ndarray,
           authors: set[int], mnist: dict | None, stop: StopRequest, axis: ReplicaAxis,
           on_chunk: Callable[[int], None] | None = None) -> None:
    """Trains `replicas` (this process's of the sweep's) from their latest full state to the end.

    In order: `_restore_or_init` (where to start; the resume message), the metrics logs and the
    monitors, `_Segment` (the compiled program and its inputs on the devices), `_Segment.run`
    (chunks, evaluations, checkpoints, pause), `_report_monitors`, the `end` event.
    """
    cfg, cfgs = sweep.shared, list(sweep.replicas)
    task = task_of(cfg)
    host = task.load_host(cfg, mnist)
    data = task.make_data(cfg, host)
    perms = [task.order(c) for c in cfgs]
    begin = _restore_or_init(cfg, cfgs, replicas, perms, axis)
    if begin is None:
        return
    walls = [r.open_metrics(begin.step, w) for r, w in zip(replicas, begin.walls)]
    if cfg.monitor:
        for r in replicas:
            r.start_monitor(begin.step, task.monitor_inputs(r.cfg, host))
    segment = _Segment(cfg, replicas, axis, stop, wds=sweep.wd_vector, states=begin.states, perms=perms,
                       data=data, start=begin.step, wall=walls[0], authors=authors, on_chunk=on_chunk)
    segment.run(steps)
    _report_monitors(replicas, stop)
    for r in replicas:  # the last segment's wall time, as a pause records its segment's
        r.event(event="end", step=int(cfg.steps), elapsed=round(stop.elapsed, 1))


def _abstract_state(cfg: TrainConfig, sharding) -> TrainState:
    """The shapes, dtypes and placement of `cfg`'s fresh state, as `jax.ShapeDtypeStruct`s in the
    task's TrainState (`jax.eval_shape`: nothing is compiled or run)."""
    shapes = jax.eval_shape(functools.partial(task_of(cfg).init_state, cfg))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def _restore_or_init(cfg: TrainConfig, cfgs: list[TrainConfig], replicas: list[Replica], perms: list[np.ndarray],
                     axis: ReplicaAxis) -> _Start | None:
    """Step 0 with fresh states, or the newest full state every replica can read (announced, and
    recorded as a resume event). None: the run is already complete (said in one line)."""
    mine = axis.mine(len(replicas))
    # the restore reads shapes, dtypes and placement only: a template from jax.eval_shape, so a
    # resume compiles and runs no initialization (in a multi-process sweep, every process but the
    # first compiles each program at every launch: JAX writes the compilation cache from process 0)
    here = SingleDeviceSharding(jax.local_devices()[0])
    shapes = [_abstract_state(c, here) for c in cfgs[mine]]
    templates = [state_tree(s, p, 0.0) for s, p in zip(shapes, perms[mine])]
    restored = restore(replicas, templates, axis.group)
    if restored is None:
        for r in replicas:
            r.event(event="start", step=0, **segment_fields())
        return _Start(0, [task_of(c).init_state(c) for c in cfgs[mine]], [0.0] * len(replicas))
    start, trees = restored
    for tree, p in zip(trees, perms[mine]):
        if not np.array_equal(np.asarray(tree["batch_perm"]), p):
            raise ConfigError("the saved batch order differs from this config's; use --overwrite")
    # each task's own TrainState class (the same fields)
    states = [type(s)(t["params"], t["opt_state"], *jax.device_put((np.asarray(t["step"]), np.asarray(t["key"]))))
              for s, t in zip(shapes, trees)]
    complete = not axis.group.any(not (start == cfg.steps and all(r.has_final_record() for r in replicas)))
    if complete:
        print(f"already complete: {cfg.out} ({cfg.steps} steps)", file=sys.stderr)
        return None
    reason = _resume_reason(replicas, start)
    print(f"resuming {cfg.out} from step {start} of {cfg.steps} ({reason})", file=sys.stderr)
    for r in replicas:
        r.event(event="resume", step=int(start), reason=reason, **segment_fields())
    return _Start(start, states, [float(t["wall"]) for t in trees])


class _Segment:
    """The training loop of one segment, from its start step to the end of the run or a pause.

    Each evaluation step `e` is reached in named steps: `advance_to(e)` trains the chunks up to
    it (a stop request before a chunk ends the segment in `pause`), `evaluate(e)` writes each
    replica's metrics record, and `_keep` its params checkpoint, monitor submission and, when one
    is due, full state.
    """

    def __init__(self, cfg: TrainConfig, replicas: list[Replica], axis: ReplicaAxis, stop: StopRequest, *,
                 wds: list[float] | None, states: list[TrainState], perms: list[np.ndarray], data, start: int,
                 wall: float, authors: set[int], on_chunk: Callable[[int], None] | None):
        self.cfg, self.replicas, self.axis, self.stop = cfg, replicas, axis, stop
        self.authors, self.on_chunk = authors, on_chunk
        task = task_of(cfg)
        self.chunk = task.make_chunk(cfg, axis.size, wds)
        self.evaluate_params = task.make_evaluate(axis.size)
        cols = task.columns(cfg, axis.stack(perms), data)
        cols = None if cols is None else jax.device_put(cols)
        self.perms = perms[axis.mine(len(replicas))]  # this process's replicas' batch orders
        self.state, self.perm, self.data, self.cols = axis.place(states, perms, data, cols,
                                                                 [r.dir.name for r in replicas])
        self.t = start
        self.t0 = time.perf_counter() - wall  # time/wall counts from the run's first segment
        self.pending = None  # (loss probe, step, length) of the chunk in flight
        self.compiled: set[int] = set()  # chunk lengths dispatched so far
        self.evaluated = False
        self.progress = Progress(cfg.steps, start, Path(cfg.out).name, enabled=cfg.progress)

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, steps: np.ndarray) -> None:
        """Every evaluation step from the start on: train up to it, then evaluate and keep."""
        end, start = "stopped", self.t
        try:
            for e in (int(s) for s in steps if s >= start):
                self.advance_to(e)
                self.evaluate(e)
            end = "done"
        except Paused:
            end = "paused"
            raise
        finally:
            self.progress.close(end)

    def advance_to(self, e: int) -> None:
        """Trains from the current step to step `e` in chunks, with a stop check before each.

        A chunk's finiteness probe is read only once the next chunk is queued, so that the
        device never waits for the host.
        """
        for length in chunk_lengths(e - self.t, self.cfg.chunk):
            if _agreed_stop(self.stop, self.axis.group):
                self._settle()
                self.pause()
            if length not in self.compiled:  # its first dispatch compiles
                self.compiled.add(length)
                self.progress.compiled()
            self.state, last_loss = self.chunk(self.state, self.perm, self.data, length, self.cols)
            if self.on_chunk is not None:
                self.on_chunk(self.t + length)
            self._settle()  # blocks on the previous chunk only
            self.pending = (last_loss, self.t + length, length)
            self.t += length
            if self.t == self.cfg.steps:
                self.stop.finish()  # the last chunk is dispatched: a stop from now on ends the run as done
        self._settle()

    def _settle(self) -> None:
        """Waits for the chunk in flight, checks its probe and counts its steps as done."""
        if self.pending is not None:
            _check_probe(*self.pending, self.replicas[0])
            self.progress.update(self.pending[2])
            self.pending = None

    def evaluate(self, e: int) -> None:
        """Evaluation step `e`: each replica's metrics record, then `_keep`; the progress postfix."""
        if not self.evaluated:
            self.evaluated = True
            self.progress.compiled()
        if e == self.cfg.steps:
            self.stop.finish()
            signal_for_test("final_evaluation")
        fetch, axis = self.axis.fetch, self.axis
        metrics = fetch(self.evaluate_params(self.state.params, self.data))
        params = fetch(self.state.params)
        wall = self.wall()
        full = fetch(self.state) if self._full_state_due(e) else None
        if full is not None and self.cfg.keep_params != "all":
            # steps whose params are not kept: their monitor records are on disk before the state
            self._drain_monitors()
        for i, r in enumerate(self.replicas):
            rec = {"step": e, **{k: float(axis.pick(v, i)) for k, v in metrics.items()},
                   "time/wall": round(wall, 3), "schedule/authors": e in self.authors}
            r.log(rec)
            if not all(math.isfinite(rec[k]) for k in ("train/loss", "test/loss", "params/l2")):
                raise NonFiniteError(_nonfinite_message(f"at step {e}", r))
            self._keep(i, r, e, params, rec["test/acc"], full, wall)
        live = self.replicas[0].monitor.postfix() if self.replicas[0].monitor is not None else ""
        self.progress.set_postfix(f"test acc {np.mean(np.atleast_1d(metrics['test/acc'])):.4f}"
                                  + (f" {live}" if live else ""))

    def _full_state_due(self, e: int) -> bool:
        """One save decision for all replicas (the first one's state-manager policy); over
        several processes the same in all of them, so that a resume finds a common step."""
        return self.axis.group.any(_wants_full_state(self.replicas[0], e))

    def _keep(self, i: int, r: Replica, e: int, params, test_acc: float, full, wall: float) -> None:
        """Replica i's params checkpoint and monitor submission at step `e`, and its full state when due."""
        ckpt.save_params(r.params, e, self.axis.row(params, i))
        if r.monitor is not None:
            r.monitor.submit(e, jax.tree.map(np.array, self.axis.row(params, i)), test_acc, kept=e in r.kept_params)
        if full is not None:
            self._save_state(i, r, e, full, wall)

    def _save_state(self, i: int, r: Replica, step: int, full, wall: float) -> None:
        tree = state_tree(self.axis.row(full, i), self.perms[i], wall)
        if not ckpt.save_state(r.state, step, tree, force=True):
            raise ckpt.CheckpointError(f"full-state save at step {step} was refused")

    def _drain_monitors(self) -> None:
        for r in self.replicas:
            r.drain_monitor()

    def pause(self) -> None:
        """Writes a full state at the current step (also between evaluation steps), records the
        pause in every replica's events and raises Paused."""
        t, wall = self.t, self.wall()
        full = self.axis.fetch(self.state)
        if self.cfg.keep_params != "all":
            self._drain_monitors()
        for i, r in enumerate(self.replicas):
            if t not in r.state.all_steps():
                self._save_state(i, r, t, full, wall)
            r.state.wait_until_finished()
            r.params.wait_until_finished()
            r.metrics.flush()
            r.event(event="pause", step=int(t), reason=self.stop.reason, elapsed=round(self.stop.elapsed, 1))
        raise Paused(int(t), self.cfg.steps, self.stop.elapsed, self.stop.reason)


def _report_monitors(replicas: list[Replica], stop: StopRequest) -> None:
    """Closes the monitors at the end of the run, with one line each on their cost and backlog.
    The run reached its last step, so each monitor first finishes its backfill: a finished run's
    record is complete."""
    signal_for_test("closing")
    for r in replicas:
        if r.monitor is not None:
            m = r.monitor
            r.close(finished=True)
            left = m.backfill_left
            print(f"monitor: {m.seconds:.1f} s of HTSR computed beside training "
                  f"({100 * m.seconds / max(stop.elapsed, 1e-9):.1f}% of this segment's wall time)"
                  + (f"; {m.deferred} computed from their params checkpoints after falling behind"
                     if m.deferred else "")
                  + (f"; {len(m.errors)} failed, see above" if m.errors else "")
                  + (f"; {left} steps still without a record (`python -m grokjax.analysis.monitor {r.dir}` computes them; "
                     "the analysis computes them from the checkpoints otherwise)" if left else ""),
                  file=sys.stderr)


def _agreed_stop(stop: StopRequest, group: Group) -> str | None:
    """The stop decision at a chunk boundary; over several processes, the same in all of them."""
    stop.reason = group.stop_reason(stop.should_stop())
    return stop.reason


def _wants_full_state(replica: Replica, step: int) -> bool:
    """One save decision for all replicas, from the first replica's state-manager policy."""
    return bool(replica.state.should_save(step))


def _check_probe(last_loss, step: int, length: int, replica: Replica) -> None:
    if getattr(last_loss, "is_fully_addressable", True) is False:  # a sweep over several processes
        last_loss = distributed.local_rows(last_loss)
    if not np.all(np.isfinite(np.asarray(last_loss))):
        raise NonFiniteError(_nonfinite_message(f"within steps {step - length}..{step}", replica))


def _nonfinite_message(where: str, r: Replica) -> str:
    r.params.wait_until_finished()
    good = ckpt.list_param_steps(r.dir)
    last = good[-1] if good else None
    return f"non-finite loss or norm {where} in {r.dir}; last good checkpoint: step {last}"
