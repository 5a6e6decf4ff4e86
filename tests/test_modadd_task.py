"""`--task modadd`: the transformer through the runner, the CLI, the monitor, export and the spectra.

Tiny settings (p = 11, d_model 16) keep each run to seconds; the equalities are the MLP's:
resume bitwise, sweeps to 1e-12 relative (another XLA program), the MLP's config unchanged.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from grokjax import ckpt, rundir
from grokjax.train.config import ConfigError, TrainConfig
from grokjax.train.runner import Paused, run
from grokjax.train.workdir import prepare_run_dir

# chunk 1: one scan program a run (chunks of 2 would compile a second, for the odd gaps between evaluations)
TINY = dict(task="modadd", p=11, d_model=16, n_heads=2, d_head=8, d_mlp=32, steps=120, log_points_per_decade=4,
            authors_grid=False, chunk=1, full_save_secs=0, progress=False, monitor=False)
TINY_FLAGS = ["--task", "modadd", "--p", "11", "--d_model", "16", "--n_heads", "2", "--d_head", "8", "--d_mlp", "32",
              "--steps", "120", "--log_points_per_decade", "4", "--authors_grid", "false", "--chunk", "1",
              "--full_save_secs", "0", "--progress", "false"]
# The MLP's config.json keys, in order, before the task existed (an MLP run's config.json is unchanged).
MLP_KEYS = ("wd", "steps", "seed", "data_seed", "lr", "b1", "b2", "eps", "batch", "width", "init_scale",
            "n_per_class", "reshuffle", "dtype", "log_points_per_decade", "authors_grid", "chunk", "full_save_secs",
            "out", "overwrite", "progress", "cache_dir", "idx_dir", "time_limit", "monitor", "keep_params",
            "skip_zero_pixels", "fc1_weight_grad")


def _records(d):
    return [{k: v for k, v in json.loads(line).items() if k != "time/wall"}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def _same_params(a, b):
    for (ka, va), (kb, vb) in zip(_leaves(a), _leaves(b), strict=True):
        assert ka == kb
        np.testing.assert_array_equal(va, vb, err_msg=ka)


def _close_params(a, b):
    for (ka, va), (kb, vb) in zip(_leaves(a), _leaves(b), strict=True):
        assert ka == kb
        np.testing.assert_allclose(va, vb, rtol=1e-12, atol=1e-13, err_msg=ka)


def _cli(root, *args, timeout=300):
    env = {**os.environ, "GROKJAX_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(root / "experiments" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run, in-process."""
    return run(TrainConfig(out=str(tmp_path_factory.mktemp("modadd") / "ref"), **TINY))[0]


def test_config_defaults_are_nanda_and_the_mlp_config_is_unchanged(tmp_path):
    cfg = TrainConfig(task="modadd", out="x")
    assert (cfg.steps, cfg.lr, cfg.wd, cfg.b1, cfg.b2, cfg.eps, cfg.warmup, cfg.dtype) == \
           (50_000, 1e-3, 1.0, 0.9, 0.98, 1e-8, 10, "float64")
    assert (cfg.p, cfg.frac_train, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (113, 0.3, 128, 4, 32, 512)
    assert cfg.batch is None and "batch" not in cfg.to_dict() and cfg.to_dict()["task"] == "modadd"
    assert TrainConfig(task="modadd", lr=5e-4, wd=0.0, out="x").lr == 5e-4  # a value given is kept
    mlp = TrainConfig(out="x")
    assert tuple(mlp.to_dict()) == MLP_KEYS and mlp.p is None  # no task field: byte-for-byte as before
    assert (mlp.lr, mlp.wd, mlp.b2, mlp.steps) == (5e-4, 0.0, 0.999, 10_000_000)
    assert all(type(v) in (int, float, str, bool, type(None)) for v in dataclasses.asdict(cfg).values())
    # a replaced config keeps its values; another task's field is refused in one line
    assert dataclasses.replace(cfg, wd=0.5).to_dict() == {**cfg.to_dict(), "wd": 0.5}
    with pytest.raises(ConfigError, match="--batch is not used by --task modadd"):
        TrainConfig(task="modadd", batch=100, out="x")
    with pytest.raises(ConfigError, match="--p is not used by --task mnist_mlp"):
        TrainConfig(p=7, out="x")
    # a run directory of one task is refused to the other (an MLP config.json names no task)
    prepare_run_dir(TrainConfig(out=str(tmp_path / "mlp"), steps=10))
    with pytest.raises(ConfigError, match="holds a --task mnist_mlp run, not --task modadd"):
        prepare_run_dir(TrainConfig(out=str(tmp_path / "mlp"), **TINY))


@pytest.mark.parametrize("args, msg", [
    (["--task", "modadd", "--batch", "200"], "--batch is not used by --task modadd"),
    (["--task", "modadd", "--n_per_class", "10", "--width", "8"], "--width, --n_per_class are not used"),
    (["--p", "7"], "--p is not used by --task mnist_mlp"),
    (["--warmup", "0"], "--warmup is not used by --task mnist_mlp"),
    (["--task", "modadd", "--frac_train", "1.5"], "frac_train must lie strictly between 0 and 1"),
    (["--task", "modadd", "--forward", "middle"], "forward must be one of"),
    (["--task", "transformer"], "task must be one of mnist_mlp, modadd"),
])
def test_cli_bad_flag_combinations_exit_2_in_one_line(root, tmp_path, args, msg):
    r = _cli(root, *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_run_completes_logs_metrics_and_refuses_the_other_task(root, tmp_path, reference):
    d = tmp_path / "cli"
    r = _cli(root, *TINY_FLAGS, "--monitor", "false", "--out", str(d))
    assert r.returncode == 0, r.stderr
    cfg = rundir.read_config(d)
    assert cfg["task"] == "modadd" and cfg["p"] == 11 and cfg["wd"] == 1.0 and "batch" not in cfg
    recs = _records(d)
    assert recs[-1]["step"] == 120
    assert set(recs[0]) >= {"step", "train/loss", "train/acc", "test/loss", "test/acc", "params/l2"}
    assert recs == _records(reference)  # the CLI and run() train the same
    _same_params(ckpt.load_params(d, 120), ckpt.load_params(reference, 120))
    before = (d / "metrics.jsonl").read_bytes()
    r = _cli(root, "--steps", "120", "--out", str(d))  # the MLP on the transformer's directory
    assert r.returncode == 2 and "holds a --task modadd run, not --task mnist_mlp" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (d / "metrics.jsonl").read_bytes() == before


def test_time_limit_pause_and_resume_are_bitwise_equal(tmp_path, reference, capsys):
    cfg = TrainConfig(out=str(tmp_path / "r"), time_limit=1.0, **TINY)

    def slow(t):  # the chunk up to step 40 (a chunk's end, between evaluations) outlasts the time limit
        if t == 40:
            time.sleep(1.2)

    with pytest.raises(Paused) as info:
        run(cfg, on_chunk=slow)
    assert 0 < info.value.step < 120
    assert ckpt.list_state_steps(tmp_path / "r")[-1] == info.value.step
    capsys.readouterr()
    run(dataclasses.replace(cfg, time_limit=0.0))  # time_limit does not change the science
    assert f"resuming {tmp_path / 'r'} from step {info.value.step}" in capsys.readouterr().err
    assert _records(tmp_path / "r") == _records(reference)
    _same_params(ckpt.load_params(tmp_path / "r", 120), ckpt.load_params(reference, 120))


def test_crash_resume_and_export_continue_bitwise(tmp_path, reference, root):
    cfg = TrainConfig(out=str(tmp_path / "r"), **TINY)

    def crash(t):
        if t >= 48:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, on_chunk=crash)
    r = _cli(root, "--export", str(tmp_path / "r"), str(tmp_path / "exported"), "--export_params", "3")
    assert r.returncode == 0, r.stderr
    assert rundir.read_config(tmp_path / "exported")["out"] == str(tmp_path / "exported")
    run(dataclasses.replace(cfg, out=str(tmp_path / "exported")))  # the export continues as the run would
    for d in (tmp_path / "exported",):
        assert _records(d) == _records(reference)
        _same_params(ckpt.load_params(d, 120), ckpt.load_params(reference, 120))


def test_seeds_and_wds_sweeps_equal_separate_runs(tmp_path, reference):
    """2-replica sweeps (one compiled, vmapped program) equal the single runs to 1e-12, as the MLP's."""
    dirs = run(TrainConfig(out=str(tmp_path / "wds"), **TINY), wds=[1.0, 0.1])
    assert [d.name for d in dirs] == ["wd1_seed0", "wd0.1_seed0"]
    _close_params(ckpt.load_params(dirs[0], 120), ckpt.load_params(reference, 120))
    single = run(TrainConfig(out=str(tmp_path / "single"), wd=0.1, **TINY))[0]
    _close_params(ckpt.load_params(dirs[1], 120), ckpt.load_params(single, 120))
    for a, b in zip(_records(dirs[1]), _records(single), strict=True):
        assert a["step"] == b["step"] and a["test/acc"] == b["test/acc"]
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-10)
    seeds = run(TrainConfig(out=str(tmp_path / "seeds"), **TINY), seeds=[0, 1])
    assert [d.name for d in seeds] == ["seed0", "seed1"]
    _close_params(ckpt.load_params(seeds[0], 120), ckpt.load_params(reference, 120))
    assert not np.allclose(ckpt.load_params(seeds[0], 120)["embed"], ckpt.load_params(seeds[1], 120)["embed"])


def test_numpy_logits_equal_the_model():
    import jax  # noqa: PLC0415

    from grokjax.analysis import modadd as analysis  # noqa: PLC0415
    from grokjax.modadd import model, step  # noqa: PLC0415

    mcfg = TrainConfig(**{**TINY, "out": "x"}).modadd()
    params = step.init_state(mcfg, seed=3).params
    inputs = analysis.load_inputs(11, 0.3, 0)
    want = np.asarray(model.forward(params, inputs["tokens"])[:, -1])
    got = analysis.logits_last(jax.tree.map(np.asarray, params), inputs["tokens"])
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
    m = analysis.compute_measures(jax.tree.map(np.asarray, params), inputs)
    assert set(m) == set(analysis.MEASURE_COLUMNS) and 0 < m["progress/fourier_peak"] <= 1


def test_monitor_and_spectra_give_the_8_matrices_and_the_appendix_h_tables(tmp_path, root):
    d = run(TrainConfig(out=str(tmp_path / "runs" / "m"), **{**TINY, "monitor": True, "steps": 40}))[0]
    recs = rundir.read_records(d)
    evals = [r["step"] for r in _records(d)]
    assert [r["step"] for r in recs] == evals
    from grokjax.analysis.modadd import MATRICES  # noqa: PLC0415

    assert [row["layer"] for row in recs[-1]["layers"]] == list(MATRICES)
    assert {"progress/fourier_peak", "progress/restricted_loss", "progress/excluded_loss"} <= set(recs[-1]["measures"])
    out = tmp_path / "analysis"
    r = subprocess.run([sys.executable, str(root / "analysis" / "spectra.py"), str(tmp_path / "runs"), "--engine",
                        "native", "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GROKJAX_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(out / "matrices_8.csv")
    assert set(table["matrix"]) == set(MATRICES) and {"alpha", "traps"} <= set(table["metric"])
    h = pd.read_csv(out / "appendix_h.csv")
    assert {"alpha", "traps", "test/acc", "progress/fourier_peak", "progress/restricted_loss",
            "progress/excluded_loss"} <= set(h["metric"])
    alpha = h[(h["metric"] == "alpha") & (h["phase"] == "anti")]
    assert int(alpha["n"].iloc[0]) == 8  # over the 8 matrices of the one run
    report = (out / "report.md").read_text()
    assert "The 8 matrices at the phases" in report and "App. H" in report
    # App. H's numbers sit beside ours: alpha over the 8 matrices per phase, each matrix's traps in anti-grokking
    alpha_row = next(line for line in report.splitlines() if "| α (8 matrices) |" in line)
    assert "4.10 ± 0.83 (pre), 2.02 ± 0.44 (grok), 3.89 ± 0.68 (anti)" in alpha_row
    fc2_traps = next(line for line in report.splitlines() if "| fc2 traps |" in line)
    assert fc2_traps.split("|")[-3].strip() == "7"
    assert {p.name for p in (out / "figures").iterdir()} >= {"fig1_accuracy.png", "fig_modadd_matrices.png",
                                                            "fig_modadd_measures.png", "fig_modadd_fourier.png"}
    steps = pd.read_csv(out / "all_steps.csv")
    assert "native/alpha_unembed" in steps and steps["native/alpha_mean"].notna().all()
    r = subprocess.run([sys.executable, str(root / "analysis" / "spectra.py"), str(tmp_path / "runs"),
                        "--ablate-traps", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--ablate-traps" in r.stderr
