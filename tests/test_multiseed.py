"""Several seeds in one compiled run: vmapped equals separate runs; sharding over devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from grokjax import ckpt
from grokjax.train.config import TrainConfig
from grokjax.train.runner import run
from helpers import build_once

# 6 evaluations (0, 1, 3, 8, 22, 60): each one covers the 10,000 test images
# chunk 1: one scan program a config (the gaps 1, 2, 5, 14, 38 would need lengths 1 and 2 with chunks of 2)
SMALL = dict(steps=60, log_points_per_decade=2, authors_grid=False, chunk=1, progress=False, monitor=False)


def _assert_params_close(a, b):
    for layer in a:
        for k in a[layer]:
            np.testing.assert_allclose(a[layer][k], b[layer][k], rtol=1e-12, atol=1e-13)


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, mnist):
    """single(wd, seed): the separate run of SMALL at (wd, seed), trained once for the module's tests
    (also under pytest-xdist: helpers.build_once)."""
    def get(wd, seed):
        def build(d):
            run(TrainConfig(out=str(d / "r"), wd=wd, seed=seed, **SMALL), mnist=mnist)

        return build_once(tmp_path_factory, f"multiseed-wd{wd}-seed{seed}", build) / "r"

    return get


def test_vmapped_seeds_equal_separate_runs(tmp_path, mnist, single):
    dirs = run(TrainConfig(out=str(tmp_path / "multi"), **SMALL), seeds=[0, 3], mnist=mnist)
    assert [d.name for d in dirs] == ["seed0", "seed3"]
    for seed, d in zip((0, 3), dirs):
        single_run = single(TrainConfig(out="unused").wd, seed)  # the default weight decay
        cfg = json.loads((d / "config.json").read_text())["config"]
        assert cfg["seed"] == seed and cfg["out"] == str(d)
        assert ckpt.list_param_steps(d) == ckpt.list_param_steps(single_run)
        _assert_params_close(ckpt.load_params(d, 60), ckpt.load_params(single_run, 60))
        for a, b in zip(_metrics(d), _metrics(single_run)):
            assert a["step"] == b["step"]
            assert a["test/acc"] == b["test/acc"]
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-10)
    # Different seeds really differ.
    assert not np.allclose(ckpt.load_params(dirs[0], 60)["fc1"]["kernel"], ckpt.load_params(dirs[1], 60)["fc1"]["kernel"])


def _sharded(root, code, out):
    """The subprocess that trains `code` over two forced CPU devices, started (it trains side by side
    with the test's in-process reference)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "GROKJAX_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def _finish(proc):
    """(return code, stderr) of a `_sharded` process."""
    try:
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_sweep_of_weight_decays_equals_separate_runs(tmp_path, mnist, single):
    dirs = run(TrainConfig(out=str(tmp_path / "sweep"), **SMALL), seeds=[0, 3], wds=[0.0, 0.01], mnist=mnist)
    assert [d.name for d in dirs] == ["wd0_seed0", "wd0_seed3", "wd0.01_seed0", "wd0.01_seed3"]
    finals = []
    for d, (wd, seed) in zip(dirs, [(0.0, 0), (0.0, 3), (0.01, 0), (0.01, 3)]):
        cfg = json.loads((d / "config.json").read_text())["config"]
        assert (cfg["wd"], cfg["seed"], cfg["out"]) == (wd, seed, str(d))
        single_run = single(wd, seed)
        assert ckpt.list_param_steps(d) == ckpt.list_param_steps(single_run)
        _assert_params_close(ckpt.load_params(d, 60), ckpt.load_params(single_run, 60))
        for a, b in zip(_metrics(d), _metrics(single_run)):
            assert a["step"] == b["step"] and a["test/acc"] == b["test/acc"]
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-10)
        finals.append(ckpt.load_params(d, 60)["fc1"]["kernel"])
    assert not np.allclose(finals[0], finals[2])  # the weight decay really differs per replica


# Three sweeps over two forced CPU devices, trained by one subprocess (its start and its shared
# programs paid once) while the test gathers their references on one device: a seed axis (the
# default skip_zero_pixels=subset) and a weight-decay axis with FC1 narrowed per chunk (subset),
# both against the module's separate runs (`single`, trained once), and a weight-decay axis with
# per-batch FC1 columns (batch) against its in-process sweep.
SHARDED = {
    "seeds": (dict(SMALL), dict(seeds=[0, 3])),
    "wds-subset": ({**SMALL, "skip_zero_pixels": "subset"}, dict(seeds=[0], wds=[0.0, 0.01])),
    "wds-batch": ({**SMALL, "skip_zero_pixels": "batch"}, dict(seeds=[1], wds=[0.0, 0.01])),
}


def test_sweeps_sharded_over_two_cpu_devices(tmp_path, root, mnist, single):
    code = (
        "import grokjax, jax, sys\n"
        "from pathlib import Path\n"
        "from grokjax.train.config import TrainConfig\n"
        "from grokjax.train.runner import run\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        f"for name, (cfg, axes) in {SHARDED!r}.items():\n"
        "    run(TrainConfig(out=str(Path(sys.argv[1]) / name), **cfg), **axes)\n"
    )
    proc = _sharded(root, code, tmp_path / "sharded")
    try:
        default_wd = TrainConfig(out="unused").wd
        refs = {"seeds": {"seed0": single(default_wd, 0), "seed3": single(default_wd, 3)},
                "wds-subset": {"wd0_seed0": single(0.0, 0), "wd0.01_seed0": single(0.01, 0)}}
        cfg, axes = SHARDED["wds-batch"]
        refs["wds-batch"] = {d.name: d for d in run(TrainConfig(out=str(tmp_path / "ref"), **cfg), mnist=mnist, **axes)}
    finally:
        rc, err = _finish(proc)
    assert rc == 0, err[-2000:]
    assert err.count("sharding 2 seeds over 2 devices") == 3, err[-2000:]
    assert list(refs["wds-batch"]) == ["wd0_seed1", "wd0.01_seed1"]
    for name, ref in refs.items():
        assert sorted(p.name for p in (tmp_path / "sharded" / name).iterdir() if p.is_dir()) == sorted(ref), name
        for run_name, d in ref.items():
            _assert_params_close(ckpt.load_params(tmp_path / "sharded" / name / run_name, 60), ckpt.load_params(d, 60))
