"""Phase detection, early warnings, report tables, `analyze_run` and the spectra.py CLI.

Two run directories are made here: a synthetic one (checkpoints written with grokjax.ckpt
from numpy arrays, one FC1 entry planted large enough to be a correlation trap, metrics
that grok and then collapse) and a real one (300 training steps with experiments/run.py,
checkpointed at 10 log-spaced steps to keep the suite fast). Everything is written in tmp dirs.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grokjax.analysis import figures, htsr, phases, report
from grokjax.analysis.pipeline import AnalysisOptions, analyze_run, checkpoint_seed, weights_of
from grokjax.rundir import find_runs
from helpers import torch_init as _torch_init

ROOT = Path(__file__).resolve().parents[1]
SPECTRA = ROOT / "analysis" / "spectra.py"
ENV = {**os.environ, "GROKJAX_OFFLINE": "1"}  # the installed package; no PYTHONPATH
NATIVE = AnalysisOptions(engine="native", workers=1, progress_bar=False)


# --------------------------------------------------------------------------------------
# Synthetic curves and runs


def _grok_curves(steps, collapse=True):
    """Train saturates by ~3e3; test rises around 1e4 to ~0.9, then (optionally) collapses."""
    ls = np.log10(np.maximum(steps, 1))
    train = np.minimum(1.0, 0.1 + 0.9 / (1 + np.exp(-(ls - 2.5) * 8)) + 1e-3 * (steps > 3000))
    train = np.where(steps >= 3000, 1.0, train)
    test = 0.1 + 0.8 / (1 + np.exp(-(ls - 4.0) * 6))
    if collapse:
        test = test - 0.4 / (1 + np.exp(-(ls - 4.9) * 8))
    return train, test


CKPT_STEPS = (0, 100, 3000, 10000, 30000, 100000)
TRAP_FROM = 30000


def _params_at(base, step):
    """The synthetic trajectory: the init, shrunk a little, with one huge FC1 entry from TRAP_FROM."""
    p = {k: {kk: vv * (1 - 0.1 * np.log10(1 + step) / 5) for kk, vv in v.items()} for k, v in base.items()}
    if step >= TRAP_FROM:
        p["fc1"]["kernel"][3, 7] += 40.0  # ~6 x the top singular value: a localised spike = a trap
    return p


def write_synthetic_run(d: Path, *, wd=0.0, seed=0, steps=CKPT_STEPS) -> Path:
    from grokjax import ckpt

    d.mkdir(parents=True)
    cfg = {"wd": wd, "steps": int(max(steps)), "seed": seed, "data_seed": 0, "n_per_class": 100, "width": 200,
           "init_scale": 8.0}
    (d / "config.json").write_text(json.dumps({"config": cfg, "created": "synthetic"}))
    base = _torch_init(np.random.default_rng(seed))
    mngr = ckpt.params_manager(d, set(steps))
    for s in steps:
        assert ckpt.save_params(mngr, s, _params_at(base, s))
    mngr.wait_until_finished()
    mngr.close()
    m_steps = np.unique(np.concatenate([np.round(np.logspace(0, 5, 31)).astype(int), steps]))
    train, test = _grok_curves(m_steps)
    with open(d / "metrics.jsonl", "w") as f:
        for s, tr, te in zip(m_steps, train, test):
            f.write(json.dumps({"step": int(s), "train/acc": float(tr), "test/acc": float(te), "train/loss": 0.1,
                                "test/loss": 0.2, "params/l2": 1.0, "schedule/authors": False}) + "\n")
    return d


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("synthetic") / "wd0_s0")


# --------------------------------------------------------------------------------------
# Phases


def test_phases_grok_then_collapse():
    steps = np.unique(np.round(np.logspace(0, 6, 200)).astype(int))
    train, test = _grok_curves(steps)
    ph = phases.detect_phases(steps, train, test)
    first_sat = steps[np.argmax(train >= 0.999)]
    assert ph["saturated_step"] == first_sat and ph["pre_status"] == "ok"
    # pre_step: the evaluation before test accuracy leaves its plateau (the median over
    # [s_sat, 2 s_sat]) by max(1 point, 10 % of the rise seen up to 3x the step). The
    # halfway-to-the-peak rule it replaces moved with the run's length (issue: the same
    # trajectory gave 56,695 at 1e5 steps and 93,338 at 1e6).
    sat = steps >= first_sat
    plateau = np.median(test[sat & (steps <= 2 * first_sat)])
    leave = next(i for i in np.flatnonzero(sat)
                 if test[i] >= plateau + max(0.01, 0.1 * (test[sat & (steps <= 3 * steps[i])].max() - plateau)))
    assert ph["plateau_acc"] == plateau and ph["leave_step"] == steps[leave]
    assert ph["pre_step"] == steps[leave - 1] and ph["pre_step"] > first_sat
    assert ph["pre_horizon_step"] == 3 * steps[leave]
    assert ph["test_acc_pre"] < plateau + max(0.01, 0.1 * (test.max() - plateau))
    assert ph["grok_step"] == steps[np.argmax(test)]
    after = steps > ph["grok_step"]
    assert ph["anti_step"] == steps[after][np.argmin(test[after])]
    assert ph["collapsed"] and ph["drop_pp"] > 30
    # drop_step: first step after the peak at least 5 pp below it.
    peak = test.max()
    assert ph["drop_step"] == steps[after][np.argmax(test[after] <= peak - 0.05)]
    assert ph["pre_step"] < ph["grok_step"] < ph["drop_step"] <= ph["anti_step"]


def test_phases_plateau_is_not_a_collapse():
    steps = np.unique(np.round(np.logspace(0, 6, 200)).astype(int))
    train, test = _grok_curves(steps, collapse=False)
    peak = test[steps <= 3e4][-1]
    test = np.where(steps > 3e4, peak - 0.03, test)  # a slight dip (3 pp), then a plateau, as with WD = 0.01
    ph = phases.detect_phases(steps, train, test)
    assert not ph["collapsed"] and math.isnan(ph["drop_step"])
    assert ph["anti_step"] == steps[-1]  # the final step stands for the third phase
    assert 2.9 < ph["drop_pp"] < 3.1


def test_phases_edge_cases():
    steps = np.arange(10)
    ph = phases.detect_phases(steps, np.linspace(0.1, 0.9, 10), np.linspace(0.1, 0.5, 10))
    assert ph["pre_status"] == "not_saturated" and math.isnan(ph["pre_step"])
    # Saturated only when test accuracy is already high: no pre-grokking plateau.
    train = np.array([0.1, 0.5, 0.9, 0.95, 1, 1, 1, 1, 1, 1])
    test = np.array([0.1, 0.6, 0.8, 0.85, 0.88, 0.89, 0.9, 0.9, 0.9, 0.91])
    ph = phases.detect_phases(steps, train, test)
    assert ph["pre_status"] == "test_not_low" and ph["pre_step"] == 4
    # Unsorted input is sorted first.
    ph2 = phases.detect_phases(steps[::-1], train[::-1], test[::-1])
    assert ph2["pre_step"] == 4 and ph2["grok_step"] == 9
    with pytest.raises(ValueError):
        phases.detect_phases([], [], [])


def test_early_warnings():
    steps = np.unique(np.round(np.logspace(0, 6, 120)).astype(int))
    train, test = _grok_curves(steps)
    ph = phases.detect_phases(steps, train, test)
    alpha_fc1 = np.where(steps >= 2e4, 1.5, 4.0)  # below 2 from before the peak to past the drop
    alpha_fc1[:3] = 1.0  # an early fluke long before the peak is ignored
    traps_fc1 = np.where(steps >= 5e5, 3, 0)  # traps only after the drop
    df = pd.DataFrame({"step": steps, "native/alpha_fc1": alpha_fc1, "native/alpha_fc2": 4.0,
                       "native/alpha_mean": (alpha_fc1 + 4.0) / 2, "native/traps_fc1": traps_fc1,
                       "native/traps_fc2": 0})
    rows = {(r["layer"], r["signal"]): r for r in phases.early_warnings(df, ph)}
    a = rows[("fc1", "alpha<2")]
    # The search starts at the test-accuracy peak (it used to start at the end of
    # pre-grokking): a signal already holding there counts from the peak.
    assert a["search_from"] == ph["grok_step"] > 2e4
    assert a["warn_step"] == ph["grok_step"] and a["status"] == "warned"
    assert a["lead_steps"] == ph["drop_step"] - a["warn_step"] > 0
    assert a["lead_decades"] == pytest.approx(math.log10(ph["drop_step"] / a["warn_step"]))
    assert rows[("fc1", "traps>0")]["status"] == "late"
    assert rows[("fc2", "alpha<2")]["status"] == "missed"
    assert rows[("mean", "alpha<2")]["status"] == "missed"  # (1.5 + 4) / 2 > 2
    assert ("mean", "traps>0") not in rows


# --------------------------------------------------------------------------------------
# Report tables


def _fake_tables():
    """Two WD = 0 runs with known alpha and traps at every step."""
    steps = np.unique(np.round(np.logspace(0, 6, 60)).astype(int))
    train, test = _grok_curves(steps)
    step_rows, layer_rows = [], []
    for run, seed, shift in (("a", 0, 0.0), ("b", 1, 1.0)):
        for s, tr, te in zip(steps, train, test):
            step_rows.append({"run": run, "wd": 0.0, "seed": seed, "step": s, "train/acc": tr, "test/acc": te})
            for layer, alpha in (("fc1", 3.0 + shift), ("fc2", 5.0 + shift)):
                layer_rows.append({"run": run, "wd": 0.0, "seed": seed, "step": s, "layer": layer,
                                   "engine": "native", "alpha": alpha, "traps": int(s > 1e5) * (1 + seed),
                                   "rand_sigma_mp": 1.0, "mp_ks": 0.01, "mp_pvalue": 0.9})
    return pd.DataFrame(layer_rows), pd.DataFrame(step_rows)


def test_report_tables_mean_std():
    layers, steps = _fake_tables()
    tables = report.build_tables(layers, steps)
    t1 = tables["table1_alpha"][0].set_index(["layer", "phase"])
    assert t1.loc[("fc1", "grok"), "mean"] == pytest.approx(3.5)
    assert t1.loc[("fc1", "grok"), "std"] == pytest.approx(np.std([3.0, 4.0], ddof=1))
    assert t1.loc[("mean", "pre"), "mean"] == pytest.approx(4.5)
    assert (t1["n"] == 2).all()
    t2 = tables["table2_traps"][0].set_index(["layer", "phase"])
    assert t2.loc[("fc1", "pre"), "mean"] == 0 and t2.loc[("fc1", "anti"), "mean"] == 1.5
    md = tables["table1_alpha"][1]
    # Grouped by (WD, run length); per phase the checkpoint value, then the window median
    # (mean ± std of the per-run medians, with the mean IQR); plus the 10^5-step column.
    assert ("| 0 | 1,000,000 | native | FC1 α | 3.50 ± 0.71 | 3.50 ± 0.71 (IQR 3.50–3.50) | 3.50 ± 0.71 | "
            "3.50 ± 0.71 (IQR 3.50–3.50) | 3.50 ± 0.71 | 3.50 ± 0.71 (IQR 3.50–3.50) | 3.50 ± 0.71 | "
            "3.50 ± 0.71 (IQR 3.50–3.50) | 2 |") in md
    assert "Anti-grokking (collapse): checkpoint" in md and "FC1 α, W − mean" not in md
    assert "KS statistic" in tables["table4_mp_fc1"][1]
    assert set(tables["phases"][0]["collapsed"]) == {True}


def _shaded_labels(ph: dict) -> list[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    figures.shade_phases(ax, ph, 1e6)
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    return labels


def test_flat_test_accuracy_is_reported_as_no_grokking(tmp_path):
    layers, steps = _fake_tables()
    flat = steps[steps["run"] == "b"].assign(run="flat", seed=2)
    flat["test/acc"] = 0.1 + 0.002 * np.sin(flat["step"].to_numpy())  # never rises: noise below 1 point
    layers = pd.concat([layers, layers[layers["run"] == "b"].assign(run="flat", seed=2)], ignore_index=True)
    steps = pd.concat([steps, flat], ignore_index=True)
    tables = report.build_tables(layers, steps)
    ph = tables["phases"][0].set_index("run")
    assert list(ph["grokking"]) == [True, True, False] and ph.loc["flat", "pre_status"] == "no_rise"
    md = tables["phases"][1]
    row = next(line for line in md.splitlines() if line.startswith("| flat |"))
    assert "no grokking (test accuracy never rose)" in row and "no grokking" not in md.split("| flat |")[0]
    assert "No grokking in flat: test accuracy never rose" in md
    text = report.summary_text(layers, steps, tables["phases"][0], {})
    assert [("no grokking" in line) for line in text.splitlines() if not line.startswith(" ")] == [False, False, True]
    written = report.write_tables(tables, tmp_path).read_text()
    assert "### Status labels" in written and all(f"`{k}`" in written for k in (*phases.PRE_STATUSES,
                                                                               *phases.WARNING_STATUSES))
    # The figures shade no grokking band for the flat run, one 'no grokking' band instead.
    assert _shaded_labels(ph.loc["flat"].to_dict()) == ["no grokking (test accuracy never rose)"]
    assert "grokking" in _shaded_labels(ph.loc["a"].to_dict())


# --------------------------------------------------------------------------------------
# analyze_run on the synthetic run


def test_analyze_run_synthetic(synthetic_run):
    layers, steps = analyze_run(synthetic_run, NATIVE)
    assert steps.attrs["computed_checkpoints"] == len(CKPT_STEPS)
    assert list(layers.columns[:6]) == ["run", "wd", "seed", "step", "layer", "engine"]
    assert len(layers) == 3 * len(CKPT_STEPS) and set(layers["engine"]) == {"native"}
    for col in ("alpha", "raw_alpha", "xmin", "D", "status", "traps", "rand_sigma_mp", "mp_ks", "mp_pvalue"):
        assert col in layers
    ok = steps[steps["status"] == "ok"]
    assert sorted(ok["step"]) == list(CKPT_STEPS)
    assert (steps["status"] == "no_checkpoint").sum() == len(steps) - len(CKPT_STEPS)
    for col in ("progress/sparsity", "progress/entropy_fc1", "progress/circuit", "params/l2", "native/alpha_mean",
                "native/traps_fc1", "time/native", "time/progress", "test/acc"):
        assert ok[col].notna().all(), col
    # The planted FC1 entry is a trap from TRAP_FROM on, and nowhere else.
    fc1 = layers[layers["layer"] == "fc1"].set_index("step")
    assert (fc1.loc[[s for s in CKPT_STEPS if s >= TRAP_FROM], "traps"] >= 1).all()
    assert (fc1.loc[[s for s in CKPT_STEPS if s < TRAP_FROM], "traps"] == 0).all()
    # Rows equal a direct call of the native engine with the documented shuffle seed.
    from grokjax import ckpt

    direct = htsr.analyze_weights(weights_of(ckpt.load_params(synthetic_run, 10000)),
                                  rng=np.random.RandomState(checkpoint_seed(0, 10000)))
    got = layers[layers["step"] == 10000].set_index("layer")
    for r in direct:
        assert got.loc[r["name"], "alpha"] == r["alpha"] and got.loc[r["name"], "traps"] == r["traps"]
    mean = ok.set_index("step")
    assert mean.loc[10000, "native/alpha_mean"] == pytest.approx(np.mean([direct[0]["alpha"], direct[1]["alpha"]]))
    # Written next to the run, and reused.
    for name in ("layers.parquet", "layers.csv", "steps.parquet", "steps.csv", "key.json"):
        assert (synthetic_run / "analysis" / name).is_file()
    layers2, steps2 = analyze_run(synthetic_run, NATIVE)
    assert steps2.attrs["computed_checkpoints"] == 0
    np.testing.assert_array_equal(layers2["alpha"].to_numpy(), layers["alpha"].to_numpy())
    np.testing.assert_array_equal(steps2["progress/circuit"].to_numpy(), steps["progress/circuit"].to_numpy())
    # Other options -> a different key -> recomputed.
    from grokjax.analysis.progress import ProgressOptions

    _, steps3 = analyze_run(synthetic_run, AnalysisOptions(engine="native", workers=1, progress_bar=False,
                                                           progress=ProgressOptions(paper_text=True)))
    assert steps3.attrs["computed_checkpoints"] == len(CKPT_STEPS)


def test_analyze_run_incremental(tmp_path):
    from grokjax import ckpt

    d = write_synthetic_run(tmp_path / "run", steps=CKPT_STEPS[:3])
    analyze_run(d, NATIVE)
    mngr = ckpt.params_manager(d, {CKPT_STEPS[3]})
    ckpt.save_params(mngr, CKPT_STEPS[3], _params_at(_torch_init(np.random.default_rng(0)), CKPT_STEPS[3]))
    mngr.wait_until_finished()
    mngr.close()
    layers, steps = analyze_run(d, NATIVE)
    assert steps.attrs["computed_checkpoints"] == 1
    assert sorted(layers["step"].unique()) == list(CKPT_STEPS[:4])


# --------------------------------------------------------------------------------------
# The CLI


def _spectra_main():
    from grokjax.analysis.cli import main  # noqa: PLC0415  (the code behind analysis/spectra.py)

    return main


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("spectra.py: error: ") and "Traceback" not in text
    return lines[0]


def test_cli_missing_dir_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, str(SPECTRA), str(tmp_path / "nope")], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in _one_error_line(proc.stderr)


def test_cli_bad_inputs(tmp_path, synthetic_run, capsys):
    main = _spectra_main()
    empty = tmp_path / "empty"
    empty.mkdir()
    norun = tmp_path / "norun"
    norun.mkdir()
    (norun / "notes.txt").write_text("no run here")
    nockpt = tmp_path / "nockpt"
    nockpt.mkdir()
    shutil.copy(synthetic_run / "config.json", nockpt)
    # Unreadable checkpoints, torn metrics and the rest: tests/test_bad_inputs.py.
    cases = [([str(empty)], "no run directories"), ([str(norun)], "no run directories"),
             ([str(nockpt)], "no params checkpoints"),
             ([str(synthetic_run), "--workers", "0"], "positive integer"),
             ([str(synthetic_run), "--engine", "fast"], "invalid choice")]
    for argv, expected in cases:
        try:
            code = main([*argv, "--no-progress"])
        except SystemExit as e:  # argparse errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert expected in _one_error_line(err), err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, run300):
    """300 real training steps evaluated (and checkpointed) at 10 log-spaced steps only.

    `authors_grid=False` drops the authors' 191-point rule, which would write ~170
    checkpoints for 300 steps; 0, 1, 2, 4, 8, 17, 35, 72, 147 and 300 remain. A copy of the
    session's shared run (helpers.RUN300), since the analysis writes its cache into the run.
    """
    d = tmp_path_factory.mktemp("tiny") / "wd0"
    shutil.copytree(run300, d)
    return d


def test_cli_on_trained_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    # one worker: the pool of two is test_bad_inputs.py's (the unreadable checkpoint rerun)
    cmd = [sys.executable, str(SPECTRA), str(tiny_run.parent), "--engine", "both", "--workers", "1",
           "--ww-stride", "3", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wd0 (WD=0, seed 0, 10 checkpoints)" in proc.stdout and "time: native" in proc.stdout
    for name in ("report.md", "summary.txt", "phases.csv", "table1_alpha.csv", "table2_traps.csv",
                 "table4_mp_fc1.csv", "early_warning.csv", "all_layers.parquet", "all_steps.csv"):
        assert (out / name).is_file(), name
    for fig in ("fig1_accuracy", "fig2_esd_fc2", "fig3_traps", "fig4_alpha", "fig5_progress"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000
    layers = pd.read_parquet(out / "all_layers.parquet")
    steps = pd.read_parquet(out / "all_steps.parquet")
    # WW ran on a subset (stride 3 + first + last) and agrees with the native engine.
    ww = layers[layers["engine"] == "ww"].set_index(["step", "layer"])
    nat = layers[layers["engine"] == "native"].set_index(["step", "layer"])
    assert 4 <= ww.index.get_level_values(0).nunique() < 10
    for col in ("alpha", "raw_alpha"):
        joined = nat[[col]].merge(ww[[col]], left_index=True, right_index=True, suffixes=("", "_ww"))
        joined = joined.loc[(slice(None), ["fc1", "fc2"]), :]
        np.testing.assert_allclose(joined[col], joined[f"{col}_ww"], rtol=1e-8)
    # The norms recomputed from the checkpoints equal the trainer's logged ones.
    logged = pd.read_json(tiny_run / "metrics.jsonl", lines=True).set_index("step")
    ok = steps[steps["status"] == "ok"].set_index("step")
    np.testing.assert_allclose(ok["params/l2"], logged.loc[ok.index, "params/l2"], rtol=1e-10)
    np.testing.assert_allclose(ok["params/l2_weights"], logged.loc[ok.index, "params/l2_weights"], rtol=1e-10)
    assert 0.70 <= ok.loc[0, "progress/sparsity"] <= 0.78
    assert abs(ok.loc[0, "progress/entropy_fc1"] - 39_262) < 200
    # A second call reuses every cached row (in-process: the code behind analysis/spectra.py).
    from grokjax.analysis.cli import main  # noqa: PLC0415

    capsys.readouterr()
    assert main([*cmd[2:], "--no-figures"]) == 0
    assert "(0 checkpoints computed" in capsys.readouterr().out


def test_find_runs(tmp_path, synthetic_run):
    assert find_runs(synthetic_run) == [synthetic_run]
    nested = tmp_path / "a" / "b"
    shutil.copytree(synthetic_run, nested / "run1", ignore=shutil.ignore_patterns("checkpoints"))
    (nested / "run1" / "analysis").mkdir(exist_ok=True)
    (nested / "run1" / "analysis" / "config.json").write_text("{}")  # not a run
    assert find_runs(tmp_path / "a") == [nested / "run1"]
