"""The in-loop HTSR monitor: the analysis of every evaluation step, computed while the run trains.

At each evaluation step the trainer hands the parameters (host numpy) to a `Monitor`, whose
worker thread runs exactly what the analysis runs on a checkpoint
(`grokjax.analysis.pipeline.analyze_checkpoint` with the native engine: alpha with clip_xmax, raw
alpha, fingers, xmin, D, the WeightWatcher-compatible trap count, rand_sigma_mp, the MP KS
test, the mean-aware and K-shuffle columns of `meanaware.extended_metrics`, the progress measures
and the norms) and keeps the spectra the figures need. Files, under `<run>/monitor/` (names,
formats, readers and writers are `grokjax.rundir`'s: `read_records`, `write_spectra`,
`read_spectra`):

  records.jsonl        one JSON object per evaluation step, ascending:
                       {"step", "layers": [one row per layer, the analysis' columns],
                        "measures": {progress measures, norms, timings}}
  spectra/<step>.npz   per layer `<layer>/esd` (eigenvalues of W^T W, ascending) and
                       `<layer>/rand` (eigenvalues of the element-shuffled W, pooled over the
                       shuffles the trap count uses, from the same seeded stream:
                       `htsr.shuffle_spectra`)

Where it runs: a worker thread per run hands each step's parameters to one separate process
(`_RecordWorker`, shared by every monitor of the training process, one BLAS thread, nice
`MONITOR_NICE`) and writes what comes back. So the record's Python work (the MP fits' simplex
searches, the power-law scans) holds the trainer's interpreter lock only while the parameters are
sent and the record written, and on a CPU whose cores the training fills, the process takes the
cycles training leaves idle. Cost: one record is about 0.5 s of one core (most of it the
K-shuffle trap means); the spectra come from the same pass
(`pipeline.analyze_checkpoint(rand_out=...)`), not drawn again.

Durability: with `--keep_params log|none`, before every full (resume) state is written the
monitor is drained, so every record up to that step is on disk; with `all`, a step without a
record still has its params checkpoint and is recomputed from it. After a crash the resumed run
drops records at or after the resume step (they are recomputed as the run passes those steps
again) and recomputes,
from the kept params checkpoints, any earlier evaluation step that has none (a run that
began without the monitor gets its record this way).

The live early warning (`LiveWarning`) applies the documented rule of
`grokjax.analysis.phases.PersistentSignal`: after the best test accuracy so far, alpha < 2 or
traps > 0 in FC1 or FC2 at >= 3 consecutive evaluations. It fires once per layer and signal,
prints one `WARNING` line and appends a `warning` event to events.jsonl.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from grokjax import ckpt, rundir
from grokjax.analysis import htsr, modadd, pipeline
from grokjax.analysis.phases import PersistentSignal
from grokjax.cliutil import THREAD_VARS, OneLineParser
from grokjax.rundir import MONITOR_DIR, SPECTRA_DIR

PROG = "grokjax-monitor"
K_SHUFFLES = pipeline.MONITOR_K_SHUFFLES
WARNING_LAYERS = ("fc1", "fc2")
# The transformer's (--task modadd): all 8 matrices, as its App. H analyses them.
MODADD_WARNING_LAYERS = modadd.MATRICES
# (signal name, row column, test): the same signals as the post-hoc early-warning table.
LIVE_SIGNALS = (("alpha<2", "alpha", lambda v: v < 2.0), ("traps>0", "traps", lambda v: v > 0))
PERSISTENCE = 3
# Submitted steps waiting beyond this many are deferred to the backfill (recomputed from their
# params checkpoint when the worker is idle, or at the next start), so that training never waits
# and host memory stays bounded.
MAX_BACKLOG = 16
# The nice value of the process that computes the records (`_RecordWorker`): the training keeps
# its priority, so on a CPU whose cores it fills the records take the cycles it leaves idle.
MONITOR_NICE = 19


def monitor_options() -> pipeline.AnalysisOptions:
    """The analysis options the monitor computes with (the analysis' defaults, native engine)."""
    return pipeline.AnalysisOptions(engine="native", k_shuffles=K_SHUFFLES, workers=1, progress_bar=False,
                                   reuse=False, write=False)


def _jsonable(v):
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def compute_record(params: dict, *, step: int, run_seed: int, inputs: dict) -> tuple[dict, dict]:
    """(record, spectra) of one parameter set: the analysis' rows and the eigenvalues."""
    rand: dict = {}
    layers, measures = pipeline.analyze_checkpoint(params, step=step, run_seed=run_seed, options=monitor_options(),
                                                  inputs=inputs, rand_out=rand)
    weights = pipeline.weights_of(params)
    if set(rand) != set(weights):  # the K-shuffle pass failed on a layer: draw the spectra on their own
        drawn = htsr.shuffle_spectra(weights, pipeline.checkpoint_seed(run_seed, step))
        rand = {k: v["evals"] for k, v in drawn.items()}
    spectra = {}
    for name, W in weights.items():
        spectra[f"{name}/esd"] = htsr.esd(W)
        spectra[f"{name}/rand"] = rand[name]
    rec = {"step": int(step), "layers": [{k: _jsonable(v) for k, v in r.items()} for r in layers],
           "measures": {k: _jsonable(v) for k, v in measures.items()}}
    return rec, spectra


class LiveWarning:
    """The run's live early warning over a stream of evaluations (see the module docstring).

    `update(step, test_acc, rows)` returns the warnings that fire at this evaluation, each a
    dict (step, onset, layer, signal, value). A new best test accuracy restarts the search
    after it for every signal that has not fired yet.
    """

    def __init__(self, n: int = PERSISTENCE, layers: tuple[str, ...] = WARNING_LAYERS):
        self.n = n
        self.layers = layers
        self.best = -math.inf
        self.fired: set[tuple[str, str]] = set()
        self._signals: dict[tuple[str, str], PersistentSignal] = {}

    def update(self, step: int, test_acc: float, rows: list[dict]) -> list[dict]:
        if test_acc is not None and math.isfinite(test_acc) and test_acc > self.best:
            self.best = test_acc
            self._signals = {k: PersistentSignal(self.n, start=step + 1) for k in self._keys() if k not in self.fired}
        by_layer = {r.get("layer"): r for r in rows}
        out = []
        for key, sig in list(self._signals.items()):
            layer, name = key
            column, test = next((c, t) for s, c, t in LIVE_SIGNALS if s == name)
            v = by_layer.get(layer, {}).get(column)
            flag = v is not None and isinstance(v, (int, float)) and math.isfinite(v) and bool(test(v))
            if sig.update(step, flag):
                self.fired.add(key)
                del self._signals[key]
                out.append({"step": int(step), "onset": int(sig.onset), "layer": layer, "signal": name,
                            "value": float(v)})
        return out

    def _keys(self):
        return [(layer, s) for layer in self.layers for s, _, _ in LIVE_SIGNALS]


# --------------------------------------------------------------------------------------
# The record process


class _RecordWorker:
    """One process (`python -m grokjax.analysis.record_worker`) that computes the records of
    every monitor of this process, one request at a time, over a pipe of pickles. Started at the
    first request, in a session of its own (a Ctrl-C or a job's SIGTERM to the trainer's process
    group does not reach it; the trainer pauses and then ends it), with one BLAS thread; it sets
    its own nice value, and it ends when its input closes, so also when the trainer dies. A run
    started from a script needs no `__main__` guard: the user's script is never re-imported. If it
    dies, the request fails (the monitor prints one warning line) and the next one starts a new
    process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sent: set[str] = set()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, **{k: "1" for k in THREAD_VARS}}
            self._proc = subprocess.Popen([sys.executable, "-m", "grokjax.analysis.record_worker", str(MONITOR_NICE)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                          start_new_session=True)
            self._sent = set()
        return self._proc

    def _request(self, kind: str, *args):
        """Sends one request and returns the reply's value (with self._lock held)."""
        proc = self._ensure()
        try:
            pickle.dump((kind, args), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            status, value = pickle.load(proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self._stop(proc)
            raise RuntimeError(f"the monitor's record process ended ({type(e).__name__}); "
                               "the next record starts a new one") from None
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, kind: str, *args):
        """A request to the record process: 'pid', 'priority', 'params' or 'record' (see record_worker)."""
        with self._lock:
            return self._request(kind, *args)

    def record(self, params: dict, *, step: int, run_seed: int, key: str, inputs: dict) -> tuple[dict, dict]:
        """`compute_record(params, ...)` in the record process; `key` names `inputs` there (sent
        once, and again if the process let them go)."""
        with self._lock:
            send = key not in self._sent
            out = self._request("record", params, step, run_seed, key, inputs if send else None)
            if out is None:
                out = self._request("record", params, step, run_seed, key, inputs)
            self._sent.add(key)
            return out

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def shutdown(self) -> None:
        """Ends the process (at exit; a later request would start a new one)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._stop(proc)


_WORKER = _RecordWorker()
# Tests only: seconds each record waits first (a monitor made slow on purpose, to test how a
# sweep over several processes ends when one process's monitor lags).
_TEST_DELAY = float(os.environ.get("GROKJAX_TEST_MONITOR_DELAY", "0") or 0)
# Tests only: a smaller MAX_BACKLOG, so that a lagging monitor surely defers steps to its backfill
# (-1: every step whose params checkpoint is kept).
_BACKLOG = int(os.environ.get("GROKJAX_TEST_MONITOR_BACKLOG") or MAX_BACKLOG)
atexit.register(_WORKER.shutdown)


class Monitor:
    """Computes records beside the training loop in one worker thread (see the module docstring).

    The records are computed in the shared record process (`_RecordWorker`, nice
    `MONITOR_NICE`): on a 2-core CPU the training fills both cores and the records take what is
    left. The monitor falls behind only while every core is busy; beyond MAX_BACKLOG waiting
    steps, a step whose params checkpoint is kept joins the backfill (see `submit`).

    Args:
        run_dir: the run directory.
        run_seed: the run's seed (keys the shuffles and the progress subset).
        inputs: `progress.load_inputs(...)` images.
        start: the step training resumes from; records at or after it are dropped.
        metrics: the kept metrics records before `start` (their test accuracies drive the warning).
        on_warning: called with each fired warning (in the worker thread).
    """

    def __init__(self, run_dir: str | os.PathLike, *, run_seed: int, inputs: dict, start: int,
                 metrics: list[dict], on_warning: Callable[[dict], None] | None = None):
        self.dir = Path(run_dir)
        self.run_seed = run_seed
        self.inputs = inputs
        self.on_warning = on_warning
        self.latest: dict[str, dict] = {}
        self.errors: list[str] = []
        self.seconds = 0.0
        self.warning = self._live_warning()
        self._key = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"  # names self.inputs in the record process
        self._test_acc = {int(r["step"]): r.get("test/acc") for r in metrics}
        (self.dir / MONITOR_DIR / SPECTRA_DIR).mkdir(parents=True, exist_ok=True)
        kept = [r for r in rundir.read_records(self.dir) if r["step"] < start]
        self._rewrite(kept)
        have = {r["step"] for r in kept}
        for r in kept:  # the warning's state, replayed silently (its events are already written)
            self.warning.update(r["step"], self._test_acc.get(r["step"]), r["layers"])
        self._backfill = [s for s in sorted(self._test_acc) if s < start and s not in have]
        if self._backfill:
            kept_params = set(ckpt.list_param_steps(self.dir))
            self._backfill = [s for s in self._backfill if s in kept_params]
            if self._backfill:
                print(f"monitor: computing the record of {len(self._backfill)} earlier evaluation steps from "
                      "their params checkpoints, beside training", file=sys.stderr, flush=True)
        self._stop_backfill = False
        self.deferred = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="grokjax-monitor", daemon=True)
        self._thread.start()

    def _rewrite(self, records: list[dict]) -> None:
        """Replaces the records file with `records` and opens it for appending."""
        path = rundir.records_path(self.dir)
        rundir.rewrite_jsonl(path, records)
        self._file = rundir.open_append(path)

    def submit(self, step: int, params: dict, test_acc: float, *, kept: bool = False) -> None:
        """Queues one evaluation step's params (host numpy; not modified afterwards).

        With `kept` (its params checkpoint is kept) and more than MAX_BACKLOG steps waiting,
        the step joins the backfill instead: computed from its checkpoint when the worker is
        idle. Live warnings then see it later, in the replay after the backfill.
        """
        self._test_acc[int(step)] = float(test_acc)
        if kept and self._queue.qsize() > _BACKLOG:
            self._backfill.append(int(step))
            self.deferred += 1
            return
        self._queue.put((int(step), params, float(test_acc)))

    def drain(self) -> None:
        """Waits until every submitted step has its record on disk (not the backfill: it is
        recomputed from the params checkpoints after any stop)."""
        self._queue.join()

    @property
    def backfill_left(self) -> int:
        return len(self._backfill)

    def close(self, *, finish_backfill: bool = False) -> None:
        """Writes the queued records and stops the worker; the backfill goes on only if asked."""
        self._stop_backfill = not finish_backfill
        self._queue.put(None)
        self._thread.join()
        self._file.close()

    def _work(self) -> None:
        """Submitted steps first; backfill steps one at a time whenever the queue is empty."""
        closing = False
        while True:
            if self._backfill and not (closing and self._stop_backfill):
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    self._guard(self._backfill_one)
                    continue
            else:
                if closing:
                    return
                item = self._queue.get()
            if item is None:
                closing = True
                self._queue.task_done()
                continue
            step, params, acc = item
            self._test_acc[step] = acc
            self._guard(self._one, step, params)
            self._queue.task_done()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  (a monitor failure never stops training)
            msg = f"monitor: {type(e).__name__}: {e}"
            self.errors.append(msg)
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def _backfill_one(self) -> None:
        s = self._backfill.pop(0)
        if s not in ckpt.list_param_steps(self.dir):  # removed since the start
            return
        # read in the record process, never here: in a sweep over several processes a read in
        # the trainer would be a collective with the other processes (see record_worker)
        rec, spectra = self._record(_WORKER.call("params", str(self.dir), s), s)
        rundir.write_spectra(self.dir, s, spectra)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if not self._backfill:
            self._replay_warning()

    def _record(self, params: dict, step: int) -> tuple[dict, dict]:
        if _TEST_DELAY:
            time.sleep(_TEST_DELAY)  # tests only: a monitor that lags behind the training
        return _WORKER.record(params, step=step, run_seed=self.run_seed, key=self._key, inputs=self.inputs)

    def _replay_warning(self) -> None:
        """After a backfill: the warning over all records in step order; new firings are reported."""
        fresh = self._live_warning()
        for r in rundir.read_records(self.dir):
            for w in fresh.update(r["step"], self._test_acc.get(r["step"]), r["layers"]):
                if (w["layer"], w["signal"]) not in self.warning.fired and self.on_warning is not None:
                    self.on_warning(w)
        self.warning = fresh

    def _live_warning(self) -> LiveWarning:
        """The live early warning over this run's layers (the transformer's: its 8 matrices)."""
        return LiveWarning(layers=MODADD_WARNING_LAYERS if self.inputs.get("task") == "modadd" else WARNING_LAYERS)

    def _one(self, step: int, params: dict) -> None:
        t0 = time.perf_counter()
        rec, spectra = self._record(params, step)
        rundir.write_spectra(self.dir, step, spectra)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.seconds += time.perf_counter() - t0
        self.latest = {r["layer"]: r for r in rec["layers"]}
        for w in self.warning.update(step, self._test_acc.get(step), rec["layers"]):
            if self.on_warning is not None:
                self.on_warning(w)

    def postfix(self) -> str:
        """`a1 3.41 a2 2.95 T 0/1` for the progress bar (alpha and traps of FC1/FC2), or ''."""
        if not self.latest:
            return ""
        def fmt(layer, col, spec):
            v = self.latest.get(layer, {}).get(col)
            return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
        return (f"a1 {fmt('fc1', 'alpha', '.2f')} a2 {fmt('fc2', 'alpha', '.2f')} "
                f"traps {fmt('fc1', 'traps', '.0f')}/{fmt('fc2', 'traps', '.0f')}")


# The config fields the backfill reads (the progress measures' images and the shuffle seeds);
# a transformer's run (--task modadd): its split.
BACKFILL_CONFIG_KEYS = ("seed", "data_seed", "n_per_class")
MODADD_BACKFILL_CONFIG_KEYS = ("seed", "p", "split_seed")


def main(argv: list[str] | None = None) -> int:
    """`grokjax-monitor RUN [RUN ...]`: computes the missing monitor records of runs.

    Every run is checked first (config.json readable, with the fields the backfill reads,
    metrics.jsonl undamaged); a bad one is one line on stderr and exit code 2.
    """
    p = OneLineParser(prog=PROG, description="Compute the monitor record of every kept params checkpoint "
                                             "that has none (for runs trained without the monitor, or stopped).")
    p.add_argument("runs", nargs="+", help="run directories")
    args = p.parse_args(argv)
    for r in args.runs:
        if not rundir.is_run(r):
            print(f"{PROG}: error: {r} holds no run (no {rundir.CONFIG_FILE})", file=sys.stderr)
            return 2
        try:
            cfg = rundir.read_config(r)
            rundir.read_metrics(r)
        except rundir.RunDirError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        keys = MODADD_BACKFILL_CONFIG_KEYS if cfg.get("task") == "modadd" else BACKFILL_CONFIG_KEYS
        missing = [k for k in keys if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
        if missing:
            print(f"{PROG}: error: {Path(r) / rundir.CONFIG_FILE}: no integer {', '.join(missing)}", file=sys.stderr)
            return 2
    for r in args.runs:
        n = backfill(r)
        print(f"{r}: {n} records computed", file=sys.stderr)
    return 0


def backfill(run_dir: str | os.PathLike) -> int:
    """Computes the monitor record of every kept params checkpoint of a run that has none.

    Returns:
        The number of steps computed.

    Raises:
        rundir.RunDirError: config.json or metrics.jsonl is missing or damaged.
    """
    d = Path(run_dir)
    cfg = rundir.read_config(d)
    inputs = pipeline.load_inputs(pipeline.input_spec(cfg, cfg["seed"], monitor_options()))
    metrics = rundir.read_metrics(d)
    start = max([r["step"] for r in metrics], default=-1) + 1
    have = {r["step"] for r in rundir.read_records(d)}
    n = len([s for s in ckpt.list_param_steps(d) if s < start and s not in have])
    m = Monitor(d, run_seed=cfg["seed"], inputs=inputs, start=start, metrics=metrics)
    m.close(finish_backfill=True)
    return n


if __name__ == "__main__":
    sys.exit(main())
