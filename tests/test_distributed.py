"""A sweep over local processes joined by jax.distributed (forced CPU devices).

Reference: the whole 2 x 2 grid trained by one process over four devices. Four processes x 1
device (uninterrupted, with SIGTERMs after the last step) and two processes x 2 devices (paused,
killed and resumed five times) both equal it bit for bit.

Every process here has a 4-thread XLA CPU pool (PJRT_NPROC=4): the equality holds when every
process has the same size of pool. XLA sizes the pool as the cores, but never below the
process's devices, and Eigen's GEMM blocking follows the pool's size: on a 2-core host, without
PJRT_NPROC, one process with four devices has 4 threads where the others have 2, and its float64
sums differ in the last bit from the first step on (see `grokjax.train.provenance.xla_cpu_threads`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from grokjax import ckpt
from grokjax.train.cli import build_parser
from grokjax.analysis.preflight import check_run
from helpers import build_once

# 9 evaluations (1 to 100 at 4 a decade): a launch's cost is mostly its start and compilation. Chunks of one
# step: one scan program, which every process but the first compiles at every launch (JAX writes the persistent
# compilation cache only from process 0); chunks of 2 would need a second, for the odd gaps between evaluations.
STEPS = 100
ARGS = ["--steps", str(STEPS), "--width", "64", "--log_points_per_decade", "4", "--authors_grid", "false",
        "--chunk", "1", "--full_save_secs", "0", "--progress", "false", "--monitor", "false", "--seeds", "0,1"]
WDS = "0,0.01"
RUNS = ["wd0_seed0", "wd0_seed1", "wd0.01_seed0", "wd0.01_seed1"]
TIMEOUT = 300


def _env(devices=2, nproc=4):
    env = {**os.environ, "GROKJAX_OFFLINE": "1", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if nproc is not None:
        env["PJRT_NPROC"] = str(nproc)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root, out, pid, port, extra=(), log=None, env=None):
    cmd = [sys.executable, str(root / "experiments" / "run.py"), *ARGS, "--wds", WDS, "--out", str(out),
           "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(pid), *extra]
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))  # noqa: SIM115


def _two(root, out, tmp, extra=(None, None), wait=True, tag="run", env=None):
    """Starts both processes (`env`: one for both, or a pair); returns (procs, logs), or
    (returncodes, stderr texts) with wait."""
    port = _free_port()
    logs = [tmp / f"{tag}{i}.log" for i in range(2)]
    envs = env if isinstance(env, (list, tuple)) else (env, env)
    procs = []
    try:
        for i in range(2):
            procs.append(_start(root, out, i, port, extra[i] or (), logs[i], envs[i]))
        if not wait:
            return procs, logs
        for p in procs:
            p.wait(timeout=TIMEOUT)
        return [p.returncode for p in procs], [f.read_text() for f in logs]
    finally:
        if wait:
            _kill(procs)


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _records(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time/wall"}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a, b, last=STEPS):
    assert _records(a) == _records(b), (a, b)
    steps = ckpt.list_param_steps(a)
    assert steps == ckpt.list_param_steps(b) and steps[-1] == last
    for s in steps:
        pa, pb = ckpt.load_params(a, s), ckpt.load_params(b, s)
        for layer in pa:
            for k in pa[layer]:
                assert np.array_equal(pa[layer][k], pb[layer][k]), (a, s, layer, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, root):
    """The whole grid, trained by one process over four devices (once per session, also under
    pytest-xdist: helpers.build_once)."""
    def build(d):
        cmd = [sys.executable, str(root / "experiments" / "run.py"), *ARGS, "--wds", WDS, "--out", str(d)]
        r = subprocess.run(cmd, env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr[-2000:]

    return build_once(tmp_path_factory, "distributed-reference", build)


# A SIGTERM during the final evaluation (process 0) and while closing (process 1), placed by a
# test-only hook: the run has nothing left to pause, so it ends as it would without them
# (test_a_sigterm_after_the_last_step_ends_the_sweep_as_done; the sweep equals the reference).
LATE_SIGNALS = ({**_env(1), "GROKJAX_TEST_SIGNAL_AT": "final_evaluation"},
                {**_env(1), "GROKJAX_TEST_SIGNAL_AT": "closing"}, _env(1), _env(1))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, root):
    """The 2 x 2 grid over four processes of one device, processes 0 and 1 signalled after their
    last step was dispatched (LATE_SIGNALS): its output folder and the four processes' stderr."""
    def build(d):
        port = _free_port()
        procs = []
        try:
            for i in range(4):
                cmd = [sys.executable, str(root / "experiments" / "run.py"), *ARGS, "--wds", WDS, "--out",
                       str(d / "out"), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "4",
                       "--process_id", str(i)]
                procs.append(subprocess.Popen(cmd, env=LATE_SIGNALS[i], stdout=subprocess.DEVNULL,
                                              stderr=open(d / f"p{i}.log", "w")))  # noqa: SIM115
            for p in procs:
                p.wait(timeout=TIMEOUT)
        finally:
            _kill(procs)
        assert [p.returncode for p in procs] == [0] * 4, [(d / f"p{i}.log").read_text()[-1000:] for i in range(4)]

    d = build_once(tmp_path_factory, "distributed-sweep", build)
    return d / "out", [(d / f"p{i}.log").read_text() for i in range(4)]


def _assert_sweep(out, errs, reference, processes):
    """Every replica of the sweep in `out` bitwise as the reference, readable by the analysis;
    its manifest and the processes' stderr (`errs`, by process) name who wrote which replica."""
    for name in RUNS:
        _assert_same_run(out / name, reference / name)
        check = check_run(out / name)  # the analysis takes every checkpoint, whichever process wrote it
        assert not check.errors and not check.skipped and check.steps[-1] == STEPS, (check.errors, check.skipped)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["processes"] == processes and manifest["devices"] == 4
    assert manifest["xla_cpu_threads"] == [4] * processes, manifest["xla_cpu_threads"]
    owner = [i * processes // len(RUNS) for i in range(len(RUNS))]
    assert [(r["dir"], r["process"]) for r in manifest["replicas"]] == list(zip(RUNS, owner))
    for i, e in enumerate(errs):
        mine = ", ".join(n for n, o in zip(RUNS, owner) if o == i)
        assert f"this process writes {mine}" in e, e[-2000:]


def test_four_processes_of_one_device_equal_one_process(sweep, reference):
    """The 2 x 2 grid over four processes of one device equals it in one process over four
    devices, every process with a 4-thread XLA CPU pool: every replica bitwise the same."""
    out, errs = sweep
    _assert_sweep(out, errs, reference, processes=4)
    for name in RUNS:
        assert json.loads((reference / name / "config.json").read_text())["device"]["xla_cpu_threads"] == 4


def test_config_mismatch_is_refused_before_training(root, tmp_path):
    codes, errs = _two(root, tmp_path / "out", tmp_path, extra=(None, ["--lr", "0.001"]))
    assert codes == [2, 2], errs
    for e in errs:
        lines = [x for x in e.splitlines() if x.startswith("run.py:")]
        assert len(lines) == 1 and "process 1 was given a different configuration than process 0" in lines[0], e
    assert not any((tmp_path / "out" / name).exists() for name in RUNS)


def test_unreachable_coordinator_gives_up_with_one_line(root, tmp_path):
    cmd = [sys.executable, str(root / "experiments" / "run.py"), *ARGS, "--wds", WDS, "--out", str(tmp_path / "o"),
           "--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2", "--process_id", "1",
           "--initialization_timeout", "3"]
    t0 = time.time()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join the other processes" in lines[0], r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, msg", [
    (["--coordinator_address", "127.0.0.1:1234"], "go together"),
    (["--coordinator_address", "nohost", "--num_processes", "2", "--process_id", "0"], "HOST:PORT"),
    (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"], "process_id must be in 0..1"),
])
def test_cli_bad_join_flags(root, tmp_path, args, msg):
    r = subprocess.run([sys.executable, str(root / "experiments" / "run.py"), *args, "--out", str(tmp_path / "x")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script, task", [("sweep.sbatch", None), ("sweep_array.sbatch", "1")])
def test_slurm_templates_render_and_parse(root, script, task):
    path = root / "experiments" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "#SBATCH --signal=B:TERM@" in text and "scontrol requeue" in text
    assert "$rc == 75 || $rc == 76" in text  # paused, or a lost process: both resume when requeued
    env = {**os.environ, "GROKJAX_DRY_RUN": "1", "OUT": "sweeps/x", "EXTRA": "--lr 1e-3"}
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = task
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    args = build_parser().parse_args(r.stdout.split("\n")[:-1])
    assert args.distributed == "auto" and args.lr == 1e-3 and args.progress is False
    assert args.out == ("sweeps/x" if task is None else "sweeps/x/shard1")
    assert args.seeds == [0, 1, 2, 3] and (args.wds == [0.001] if task else len(args.wds) == 4)


def test_a_lagging_monitor_ends_cleanly(tmp_path, root):
    """Process 1's monitor lags on purpose (a test-only delay per record), so that it defers
    steps and reads their params checkpoints while closing: process 0 waits for it before
    leaving, both exit 0, every replica's monitor record is complete, and nothing reports a
    collective error."""
    out = tmp_path / "out"
    # One replica a process (seed 0, WD 0 and 0.01; one device each). Process 1's monitor defers
    # every step to the backfill (a backlog of -1) and waits 0.75 s before each record: 100 steps at
    # 3 evaluations a decade give 8 records, at least 6 s of backfill, much of it left when the
    # training (100 chunks of one step) ends.
    lag = {**_env(1), "GROKJAX_TEST_MONITOR_DELAY": "0.75", "GROKJAX_TEST_MONITOR_BACKLOG": "-1"}
    more = ["--monitor", "true", "--steps", "100", "--log_points_per_decade", "3", "--keep_params", "all",
            "--seeds", "0"]
    codes, errs = _two(root, out, tmp_path, extra=(more, more), env=(_env(1), lag))
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    # the lag made process 1's monitor compute every record from its params checkpoint, mostly while closing
    assert errs[1].count("8 computed from their params checkpoints after falling behind") == 1, errs[1][-2000:]
    for text in errs:
        assert "Gloo" not in text and "WARNING: monitor" not in text and "Traceback" not in text, text[-2000:]
    for name in ("wd0_seed0", "wd0.01_seed0"):
        metric_steps = [r["step"] for r in _records(out / name)]
        record_steps = sorted(json.loads(ln)["step"] for ln in
                              (out / name / "monitor" / "records.jsonl").read_text().splitlines())
        assert record_steps == metric_steps, name


def _kill_one_mid_run(root, out, tmp_path, victim, tag):
    """Starts the sweep, kill -9s process `victim` once the first replica holds a full state past
    the one it started from, and returns the survivor's return code and stderr text."""
    last = max(ckpt.list_state_steps(out / RUNS[0]), default=-1) if (out / RUNS[0]).exists() else -1
    fast = ["--initialization_timeout", "10"]  # the heartbeat timeout: max(10 s, this)
    procs, logs = _two(root, out, tmp_path, extra=(fast, fast), wait=False, tag=tag)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and all(p.poll() is None for p in procs):
            steps = ckpt.list_state_steps(out / RUNS[0]) if (out / RUNS[0]).exists() else []
            if len([s for s in steps if s > last]) >= (2 if last < 0 else 1):
                break
            time.sleep(0.02)
        assert all(p.poll() is None for p in procs), "the sweep ended before the kill"
        procs[victim].kill()
        other = procs[1 - victim]
        other.wait(timeout=TIMEOUT)
    finally:
        _kill(procs)
    return other.returncode, logs[1 - victim].read_text()


def test_the_lost_process_is_named_from_the_service_error():
    from grokjax.train.supervise import lost_process

    text = ("F1203 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
            "absl::Status: UNAVAILABLE: Task /job:jax_worker/replica:0/task:1 heartbeat timeout")
    assert lost_process(text, 0) == "process 1"
    assert lost_process("UNAVAILABLE: Failed to send RPC to coordination service. Socket closed", 1) == \
        "process 0 (the coordinator)"
    # the coordinator's report lists the tasks that stopped sending heartbeats, one a line
    report = ("E1203 coordination_service.cc:1549] Use error polling to propagate the following error to all "
              "tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
              "The tasks have crashed.")
    assert lost_process(report, 0) == "process 1"


def _events(out):
    return {name: [json.loads(line) for line in (out / name / "events.jsonl").read_text().splitlines()]
            for name in RUNS}


def _sigterm_both_mid_run(root, out, tmp_path, tag):
    """Starts the sweep, sends both processes a SIGTERM once the first replica holds 3 more params
    checkpoints than it had, and returns the processes' return codes and stderr texts."""
    before = len(ckpt.list_param_steps(out / RUNS[0])) if (out / RUNS[0]).exists() else 0
    procs, logs = _two(root, out, tmp_path, wait=False, tag=tag)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if (out / RUNS[0]).exists() and len(ckpt.list_param_steps(out / RUNS[0])) >= before + 3:
                break
            time.sleep(0.02)
        assert all(p.poll() is None for p in procs), "the sweep ended before the SIGTERM"
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        _kill(procs)
    return [p.returncode for p in procs], [f.read_text() for f in logs]


def test_sigterms_and_lost_processes_interrupt_one_sweep_that_resumes_bitwise(root, tmp_path, reference):
    """Five launches of one sweep, each resuming the last.

    1. Process 1's supervising parent gets a SIGTERM just after starting its training child (a
       test-only hook), before the child has a handler: the child holds it, and both processes
       pause at step 0 with exit 75.
    2. Both processes get a SIGTERM mid-run: both pause at one common step with exit 75.
    3. kill -9 of process 0 mid-run, then 4. of process 1: each time the other stops within about
       the (shortened) heartbeat timeout, with one line naming the lost process and exit 76, no
       abort and no C++ log.
    5. The rerun finishes, and every replica equals the uninterrupted reference bitwise: two
       processes of two devices equal one process of four."""
    out = tmp_path / "out"
    codes, errs = _two(root, out, tmp_path, env=(_env(), {**_env(), "GROKJAX_TEST_SIGNAL_AT": "launch"}))
    assert codes == [75, 75], errs[0][-2000:] + errs[1][-2000:]
    assert "SIGTERM received: pausing at the next chunk boundary" in errs[1], errs[1][-2000:]
    for e in errs:
        assert f"paused at step 0 of {STEPS}" in e and "Traceback" not in e, e[-2000:]
    for events in _events(out).values():
        assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("pause", 0)], events

    codes, errs = _sigterm_both_mid_run(root, out, tmp_path, "second")
    assert codes == [75, 75], errs
    events = _events(out)
    pauses = {events[name][-1]["step"] for name in RUNS}
    assert len(pauses) == 1 and 0 < min(pauses) < STEPS, events
    for name in RUNS:
        assert [e["event"] for e in events[name]] == ["start", "pause", "resume", "pause"], events[name]

    for victim, tag in ((0, "third"), (1, "fourth")):
        code, err = _kill_one_mid_run(root, out, tmp_path, victim, tag)
        assert code == 76, err[-3000:]
        lines = [x for x in err.splitlines() if x.startswith("run.py:")]
        assert len(lines) == 1 and f"lost process {victim}" in lines[0], err[-3000:]
        assert "Traceback" not in err and "Terminating process" not in err, err[-3000:]
        if victim == 0:  # the launch after the mid-run SIGTERMs resumed from their pause
            assert "resuming" in err and "paused by SIGTERM" in err, err[-3000:]

    codes, errs = _two(root, out, tmp_path, tag="fifth")
    assert codes == [0, 0], errs
    assert all("resuming" in e and "unreadable" not in e for e in errs), errs
    _assert_sweep(out, errs, reference, processes=2)


def test_a_sigterm_after_the_last_step_ends_the_sweep_as_done(sweep, reference):
    """The sweep fixture's SIGTERMs, during the final evaluation (process 0) and while closing
    (process 1, before its monitors' drain and its run directories' closing): nothing is left to
    pause, so both processes finished their closing work and every process exited 0 (the fixture
    asserts it), every record complete and bitwise as the uninterrupted reference."""
    out, errs = sweep
    for e in errs[:2]:
        assert "the run has dispatched its last step: finishing it and its closing work" in e, e[-2000:]
        assert "SIGTERM came after the last step was dispatched: the run is complete" in e, e[-2000:]
    for e in errs:
        assert "paused" not in e and "Traceback" not in e, e[-2000:]
    for events in _events(out).values():
        assert [e["event"] for e in events] == ["start", "end"], events
    for name in RUNS:
        _assert_same_run(out / name, reference / name)
        assert check_run(out / name).steps[-1] == STEPS
