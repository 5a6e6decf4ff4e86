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

SMALL = dict(steps=60, log_points_per_decade=4, authors_grid=False, chunk=16, progress=False, monitor=False)


def _assert_params_close(a, b):
    for layer in a:
        for k in a[layer]:
            np.testing.assert_allclose(a[layer][k], b[layer][k], rtol=1e-12, atol=1e-13)


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_vmapped_seeds_equal_separate_runs(tmp_path, mnist):
    dirs = run(TrainConfig(out=str(tmp_path / "multi"), **SMALL), seeds=[0, 3], mnist=mnist)
    assert [d.name for d in dirs] == ["seed0", "seed3"]
    for seed, d in zip((0, 3), dirs):
        single = run(TrainConfig(out=str(tmp_path / f"single{seed}"), seed=seed, **SMALL), mnist=mnist)[0]
        cfg = json.loads((d / "config.json").read_text())["config"]
        assert cfg["seed"] == seed and cfg["out"] == str(d)
        assert ckpt.list_param_steps(d) == ckpt.list_param_steps(single)
        _assert_params_close(ckpt.load_params(d, 60), ckpt.load_params(single, 60))
        for a, b in zip(_metrics(d), _metrics(single)):
            assert a["step"] == b["step"]
            assert a["test/acc"] == b["test/acc"]
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-10)
    # Different seeds really differ.
    assert not np.allclose(ckpt.load_params(dirs[0], 60)["fc1"]["kernel"], ckpt.load_params(dirs[1], 60)["fc1"]["kernel"])


def test_seed_axis_sharded_over_two_cpu_devices(tmp_path, root, mnist):
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **SMALL), seeds=[1, 2], mnist=mnist)
    code = (
        "import grokjax, jax, sys\n"
        "from grokjax.train.config import TrainConfig\n"
        "from grokjax.train.runner import run\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        f"run(TrainConfig(out=sys.argv[1], **{SMALL!r}), seeds=[1, 2])\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "GROKJAX_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sharded")], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sharding 2 seeds over 2 devices" in r.stderr
    for seed, d in zip((1, 2), ref):
        _assert_params_close(ckpt.load_params(tmp_path / "sharded" / f"seed{seed}", 60), ckpt.load_params(d, 60))


def test_sweep_of_weight_decays_equals_separate_runs(tmp_path, mnist):
    dirs = run(TrainConfig(out=str(tmp_path / "sweep"), **SMALL), seeds=[0, 3], wds=[0.0, 0.01], mnist=mnist)
    assert [d.name for d in dirs] == ["wd0_seed0", "wd0_seed3", "wd0.01_seed0", "wd0.01_seed3"]
    finals = []
    for d, (wd, seed) in zip(dirs, [(0.0, 0), (0.0, 3), (0.01, 0), (0.01, 3)]):
        cfg = json.loads((d / "config.json").read_text())["config"]
        assert (cfg["wd"], cfg["seed"], cfg["out"]) == (wd, seed, str(d))
        single = run(TrainConfig(out=str(tmp_path / f"single_{d.name}"), wd=wd, seed=seed, **SMALL), mnist=mnist)[0]
        assert ckpt.list_param_steps(d) == ckpt.list_param_steps(single)
        _assert_params_close(ckpt.load_params(d, 60), ckpt.load_params(single, 60))
        for a, b in zip(_metrics(d), _metrics(single)):
            assert a["step"] == b["step"] and a["test/acc"] == b["test/acc"]
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-10)
        finals.append(ckpt.load_params(d, 60)["fc1"]["kernel"])
    assert not np.allclose(finals[0], finals[2])  # the weight decay really differs per replica


@pytest.mark.parametrize("mode", ["batch", "subset"])  # subset: FC1 narrowed per chunk, sharded
def test_sweep_sharded_over_two_cpu_devices(tmp_path, root, mnist, mode):
    small = {**SMALL, "skip_zero_pixels": mode}
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **small), seeds=[1], wds=[0.0, 0.01], mnist=mnist)
    code = (
        "import grokjax, jax, sys\n"
        "from grokjax.train.config import TrainConfig\n"
        "from grokjax.train.runner import run\n"
        "assert len(jax.devices()) == 2, jax.devices()\n"
        f"run(TrainConfig(out=sys.argv[1], **{small!r}), seeds=[1], wds=[0.0, 0.01])\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "GROKJAX_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sharded")], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sharding 2 seeds over 2 devices" in r.stderr
    for d in ref:
        _assert_params_close(ckpt.load_params(tmp_path / "sharded" / d.name, 60), ckpt.load_params(d, 60))
