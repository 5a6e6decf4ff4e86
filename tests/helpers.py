"""Small shared helpers for the tests."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from grokjax import ckpt
from grokjax.bench.init import torch_init  # noqa: F401  (PyTorch's default Linear init x 8, numpy)

try:
    import fcntl
except ImportError:  # not POSIX: every pytest-xdist worker builds its own copy
    fcntl = None

# The small run most run-level tests train: 120 steps, 3 evaluation points per decade (9 evaluations, each over the
# 10,000 test images, and checkpointed: most of a run's cost once its programs are compiled), chunks of 2. Each chunk
# length is its own XLA program (about 1.4 CPU-s to compile at width 200): chunks of 2 need two (lengths 1 and 2),
# chunks of 16 five, and the persistent cache spares a compilation only for a program it has seen.
SMALL = dict(steps=120, log_points_per_decade=3, authors_grid=False, chunk=2, progress=False, full_save_secs=0,
             monitor=False)

# A 300-step run evaluated (and checkpointed, with the monitor's records) at 10 log-spaced steps.
RUN300 = dict(steps=300, log_points_per_decade=3, authors_grid=False, chunk=2, progress=False, full_save_secs=0)


def build_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once per test session and then only read.

    Under pytest-xdist the workers share it: the first one to ask builds it while the others
    wait, so a run that several test modules read is trained once, whichever worker runs them.
    A build that failed is started again by the next test that asks."""
    worker = os.environ.get("PYTEST_XDIST_WORKER") is not None and fcntl is not None
    base = tmp_path_factory.getbasetemp()
    base = base.parent if worker else base  # the session's folder, above each worker's own
    d, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with open(base / f"shared-{name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            build(d)
            done.touch()
    return d


# The CLI run that the interrupted CLI tests (SIGTERM, kill -9) resume and compare with the uninterrupted one
# (the `cli_reference` fixture, trained once a session): 400 steps at 6 evaluation points a decade (17 params
# checkpoints); the signal comes once 6 exist (step 7), with ~393 steps (~196 chunks) still to train.
CLI_RUN = ["--steps", "400", "--log_points_per_decade", "6", "--authors_grid", "false", "--chunk", "2",
           "--full_save_secs", "0", "--progress", "false", "--monitor", "false"]


def interrupt(root, args: list[str], run_dir: Path, *, n_ckpts: int, sig: int) -> tuple[int, str]:
    """Trains `run.py args` into `run_dir` and sends it `sig` once it holds `n_ckpts` params
    checkpoints. Returns its exit code and stderr."""
    env = {**os.environ, "GROKJAX_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, str(root / "experiments" / "run.py"), *args, "--out", str(run_dir)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(ckpt.list_param_steps(run_dir)) < n_ckpts and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before the signal"
        p.send_signal(sig)
        err = p.communicate(timeout=240)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err
