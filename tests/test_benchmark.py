"""Smoke test of the benchmark CLI: runs `--quick`, checks the table and the JSON (no timing asserts)."""

import json
import math
import os
import subprocess
import sys

from grokjax.bench import core
from grokjax.train.config import TrainConfig


def test_flops_per_step_counts_the_nine_gemms():
    f = core.flops_per_step(TrainConfig(out="unused"))
    fwd = 2 * 200 * (784 * 200 + 200 * 200 + 200 * 10)
    assert f == {"forward": fwd, "weight_grads": fwd, "input_grads": 2 * 200 * (200 * 200 + 200 * 10),
                 "total": 2 * fwd + 2 * 200 * (200 * 200 + 200 * 10)}
    assert round(f["total"] / 1e6, 1) == 175.8


def test_benchmark_cli_quick_writes_table_and_json(root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(root / "experiments" / "benchmark.py"), "--quick", "--seeds", "1,2",
                           "--modes", "batch", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GROKJAX_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "JAX scan chunk (1 seed)" in proc.stdout and "torch eager" in proc.stdout and "floor" in proc.stdout
    assert "skip_zero_pixels=batch" in proc.stdout and "skip_zero_pixels=off" not in proc.stdout  # --modes
    res = json.loads(out.read_text())
    for key in ("machine", "load_after", "options", "flops_per_step", "gemm", "jax", "reference", "ratio",
                "floor_fraction", "seeds", "eval", "schedule", "torch_device", "threads"):
        assert key in res, key
    assert res["machine"]["loadavg"] and res["machine"]["cpu"]
    assert set(res["seeds"]) == {"1", "2"}
    rows = [res["jax"], res["reference"], *res["seeds"].values()]
    for r in rows:
        assert 0 < r["min"] <= r["median"] <= r["max"] and len(r["samples"]) == 2
    positive = [res["ratio"], res["floor_fraction"], res["gemm"]["rate_gflops"], res["gemm"]["floor_steps_per_s"],
                res["eval"]["seconds"], res["schedule"]["added_s"], res["flops_per_step"]["total"]]
    assert all(math.isfinite(v) and v > 0 for v in positive)
    assert res["schedule"]["n_evals"] > 191  # the authors' 191 points plus the log grid and N



def test_failed_contenders_are_named_as_in_the_table():
    _label = core._label
    assert _label("variant_nocmdbuf") == "variant nocmdbuf"
    assert _label("jax_seeds8") == "JAX vmap 8 seeds (aggregate)"
    assert _label("jax_subset") == "JAX 1 seed, skip_zero_pixels=subset"
    assert _label("jax_sweep") == "JAX sweep"
