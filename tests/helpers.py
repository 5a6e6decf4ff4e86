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



def interrupt_beside_reference(root, args: list[str], run_dir: Path, ref: Path, log: Path, *, n_ckpts: int,
                               sig: int) -> tuple[int, str]:
    """Trains `run.py args` twice side by side: uninterrupted into `ref` (it must exit 0; its
    stderr goes to `log`), and into `run_dir`, which gets `sig` once it holds `n_ckpts` params
    checkpoints. Returns the interrupted run's exit code and stderr."""
    env = {**os.environ, "GROKJAX_OFFLINE": "1"}
    cmd = [sys.executable, str(root / "experiments" / "run.py"), *args]
    r = subprocess.Popen([*cmd, "--out", str(ref)], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(log, "w"))  # noqa: SIM115
    p = None
    try:
        p = subprocess.Popen([*cmd, "--out", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and len(ckpt.list_param_steps(run_dir)) < n_ckpts and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(sig)
        err = p.communicate(timeout=240)[1]
        r.wait(timeout=300)
    finally:
        for proc in (r, p):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert r.returncode == 0, log.read_text()[-2000:]
    return p.returncode, err
