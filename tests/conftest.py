"""Shared fixtures: offline MNIST (from the verified cache), small configs, the repo root."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GROKJAX_OFFLINE", "1")  # tests use no network: MNIST comes from the cache the set-up wrote
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache per test session, inherited by the CLI subprocesses: every run() builds fresh
    # jitted programs, so the same XLA programs are compiled again and again across tests. A cache hit loads the
    # executable XLA compiled for the same program and options, so results are unchanged.
    _CACHE = tempfile.mkdtemp(prefix="grokjax-test-jit-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = Path(__file__).resolve().parents[1]

import grokjax  # noqa: E402,F401  (enables x64 before JAX creates arrays)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mnist():
    from grokjax.data import load_mnist

    return load_mnist(verbose=False)


@pytest.fixture(scope="session")
def torch_one_thread():
    """PyTorch on one intra-op thread for the torch references: with two threads on a 2-core machine, torch's
    thread pool collapses whenever another process holds a core (250 steps: ~38 s instead of ~5 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, request):
    """One finished run of helpers.SMALL (defaults otherwise), shared read-only by the modules that compare with it
    (trained once per session, also under pytest-xdist: helpers.build_once)."""
    from helpers import SMALL, build_once

    from grokjax.train.config import TrainConfig
    from grokjax.train.runner import run

    def build(d):
        run(TrainConfig(out=str(d / "r"), **SMALL), mnist=request.getfixturevalue("mnist"))

    return build_once(tmp_path_factory, "small", build) / "r"


@pytest.fixture(scope="session")
def run300(tmp_path_factory, request):
    """One finished run of helpers.RUN300 (monitor on), shared read-only by test_monitor, test_ablation and
    test_analysis (trained once per session, also under pytest-xdist: helpers.build_once)."""
    from helpers import RUN300, build_once

    from grokjax.train.config import TrainConfig
    from grokjax.train.runner import run

    def build(d):
        run(TrainConfig(out=str(d / "wd0"), **RUN300), mnist=request.getfixturevalue("mnist"))

    return build_once(tmp_path_factory, "run300", build) / "wd0"


@pytest.fixture(scope="session")
def cli_reference(tmp_path_factory):
    """The uninterrupted CLI run of helpers.CLI_RUN, which the CLI runs interrupted by SIGTERM and by kill -9 must
    equal bitwise once resumed (trained once per session, also under pytest-xdist: helpers.build_once)."""
    from helpers import CLI_RUN, build_once

    def build(d):
        r = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *CLI_RUN, "--out", str(d / "ref")],
                           env={**os.environ, "GROKJAX_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    return build_once(tmp_path_factory, "cli-reference", build) / "ref"


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's command) each test is a unit of work that goes to the
# next free worker, in collection order. These long tests (subprocesses, long runs, the torch reference of the
# transformer) go first, longest first, so that the suite does not end waiting on one of them; a test not listed
# keeps its place. Run alone (no xdist), the suite keeps pytest's order.
LONG_FIRST = (
    "test_modadd_train.py::test_parity_with_torch_reference",
    "test_distributed.py::test_sigterms_and_lost_processes_interrupt_one_sweep_that_resumes_bitwise",
    "test_distributed.py::test_four_processes_of_one_device_equal_one_process",
    "test_distributed.py::test_a_lagging_monitor_ends_cleanly",
    "test_long_runs.py::test_several_pauses_of_a_sweep_resume_identically",
    "test_multiseed.py::test_sweep_of_weight_decays_equals_separate_runs",
    "test_runner.py::test_cli_smoke_and_kill_9_resume",
    "test_long_runs.py::test_cli_sigterm_pauses_with_code_75_and_resumes_identically",
    "test_multiseed.py::test_sweeps_sharded_over_two_cpu_devices",
    "test_analysis.py::test_cli_on_trained_run",
    "test_long_runs.py::test_pause_between_evaluations_then_resume_is_bitwise_identical",
    "test_runner.py::test_xla_cpu_threads_are_recorded_and_a_resume_with_another_count_is_said",
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return

    def rank(item):
        name = f"{item.path.name}::{item.originalname}"
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
