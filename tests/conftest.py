"""Shared fixtures: offline MNIST (from the verified cache), small configs, the repo root."""

import atexit
import os
import shutil
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
def small_run(tmp_path_factory, mnist):
    """One finished run of helpers.SMALL (defaults otherwise), shared read-only by the modules that compare with it."""
    from helpers import SMALL

    from grokjax.train.config import TrainConfig
    from grokjax.train.runner import run

    return run(TrainConfig(out=str(tmp_path_factory.mktemp("small") / "r"), **SMALL), mnist=mnist)[0]


@pytest.fixture(scope="session")
def run300(tmp_path_factory, mnist):
    """One finished run of helpers.RUN300 (monitor on), shared read-only by test_monitor and test_ablation."""
    from helpers import RUN300

    from grokjax.train.config import TrainConfig
    from grokjax.train.runner import run

    return run(TrainConfig(out=str(tmp_path_factory.mktemp("run300") / "wd0"), **RUN300), mnist=mnist)[0]
