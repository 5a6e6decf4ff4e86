"""The early-warning grid, alpha fits and the seeds report on planted runs (grokjax.analysis.seeds)."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grokjax.analysis import seeds

ROOT = Path(__file__).resolve().parents[1]


def _run(name, wd, seed, test_acc, alpha, traps=None, traps_c=None):
    n = len(test_acc)
    steps = np.arange(n) * 1000
    traps = np.zeros(n) if traps is None else np.asarray(traps, float)
    traps_c = np.zeros(n) if traps_c is None else np.asarray(traps_c, float)
    alpha = np.asarray(alpha, float)
    return pd.DataFrame({
        "run": name, "wd": wd, "seed": seed, "step": steps, "status": "ok",
        "train/acc": 1.0, "test/acc": np.asarray(test_acc, float),
        "native/alpha_fc1": alpha, "native/alpha_centred_fc1": alpha + 0.1,
        "native/alpha_mean": alpha + 0.5, "native/alpha_centred_mean": alpha + 0.6,
        "native/traps_fc1": traps, "native/traps_fc2": 0.0,
        "native/traps_centred_fc1": traps_c, "native/traps_centred_fc2": 0.0,
    })


# test accuracy: rises to 0.9 at index 3, then falls 3 points an evaluation
ACC = [0.1, 0.3, 0.6, 0.9, 0.87, 0.84, 0.81, 0.78, 0.75, 0.60, 0.45, 0.40]
ALPHA = [5, 5, 4, 3, 2.5, 2.2, 1.9, 2.1, 1.8, 1.7, 1.6, 1.5]


def _row(grid, signal, rule, collapse):
    r = grid[(grid["signal"] == signal) & (grid["rule"] == rule) & (grid["collapse"] == collapse)]
    assert len(r) == 1
    return r.iloc[0]


def test_grid_steps_leads_and_points_lost():
    grid = seeds.warning_grid(_run("a", 0.0, 0, ACC, ALPHA, traps=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]))
    # collapse definitions, from the peak (0.9 at step 3000)
    r = _row(grid, "fc1_alpha<2", "first", "drop5")
    assert r["collapse_step"] == 5000 and r["signal_step"] == 6000  # 0.84 is the first <= 0.85
    assert r["lead_steps"] == -1000 and r["outcome"] == "late"
    assert r["lost_pp"] == pytest.approx(9.0)
    # three consecutive evaluations: the streak 1.8, 1.7, 1.6 starts at 8000, fires at 10000
    r = _row(grid, "fc1_alpha<2", "3x", "drop25")
    assert r["onset_step"] == 8000 and r["signal_step"] == 10000
    assert r["collapse_step"] == 9000 and r["outcome"] == "late"
    r = _row(grid, "fc1_alpha<2", "first", "below0.5")
    assert r["collapse_step"] == 10000 and r["lead_steps"] == 4000 and r["outcome"] == "warned"
    # the raw trap already held at the peak: it fires there, no points lost
    r = _row(grid, "traps>=1", "3x", "drop10")
    assert r["held_at_peak"] and r["signal_step"] == 5000 and r["onset_step"] == 3000
    assert r["collapse_step"] == 7000 and r["outcome"] == "warned"
    assert _row(grid, "traps>=1", "3x", "drop2")["outcome"] == "late"  # 0.87 at 4000 is 3 points down
    # a signal that never fires on a collapsing run is missed
    assert _row(grid, "traps_centred>=1", "first", "drop10")["outcome"] == "missed"
    # the average alpha here is alpha + 0.5 >= 2.0 everywhere: "< 2" is strict, it never fires
    r = _row(grid, "mean_alpha<2", "first", "drop5")
    assert math.isnan(r["signal_step"]) and r["outcome"] == "missed"


def test_grid_false_alarm_without_collapse():
    flat = [0.1, 0.5, 0.9, 0.895, 0.89, 0.9, 0.895, 0.89, 0.9, 0.9]
    grid = seeds.warning_grid(_run("c", 0.01, 0, flat, [5, 4, 3, 1.9, 1.9, 1.9, 3, 3, 3, 3]))
    assert set(grid.loc[grid["signal"] == "fc1_alpha<2", "outcome"]) == {"false_alarm"}
    assert math.isnan(_row(grid, "fc1_alpha<2", "3x", "drop2")["collapse_step"])
    assert _row(grid, "traps>=1", "first", "drop2")["outcome"] == "quiet"


def test_alpha_fits_cross_run_prediction():
    # two runs where accuracy is an exact line in alpha (a = 0.2 + 0.1 alpha) after the peak: zero error
    acc = [0.1, 0.5, 0.9, 0.8, 0.7, 0.6, 0.5]
    alpha = [9, 9, 7, 6, 5, 4, 3]
    steps = pd.concat([_run("a", 0.0, 0, acc, alpha), _run("b", 0.0, 1, acc[:3] + [0.75, 0.65, 0.55, 0.45],
                                                                alpha[:3] + [5.5, 4.5, 3.5, 2.5])])
    corr, pred = seeds.alpha_fits(steps)
    c = corr[corr["alpha"] == "fc1_alpha"]
    assert np.allclose(c["pearson"], 1.0) and np.allclose(c["spearman"], 1.0)
    p = pred[pred["alpha"] == "fc1_alpha"]
    assert len(p) == 2 and np.allclose(p["mae_pp"], 0.0, atol=1e-9)
    assert np.allclose(p["slope"], 0.1)
    # another weight decay is never predicted from this one
    more = pd.concat([steps, _run("w", 0.01, 0, acc, alpha)])
    assert set(seeds.alpha_fits(more)[1].query("wd == 0.01")["run"]) == set()


def test_cli_refuses_a_folder_without_analysis(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "seeds.py"), str(tmp_path / "nothing"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "all_layers.parquet" in r.stderr
    assert not out.exists()


def test_report_from_committed_analysis(tmp_path):
    """The committed 10^7 run: the grid, fits and tables beside both papers are written."""
    src = ROOT / "results" / "wd0_1e7" / "analysis"
    res = seeds.write_seeds_report([src], tmp_path / "s", figures=False)
    grid = pd.read_csv(tmp_path / "s" / "early_warning_grid.csv")
    steps = pd.read_parquet(src / "all_steps.parquet")
    te = steps.loc[steps["test/acc"].notna()].sort_values("step")
    peak_i = te["test/acc"].to_numpy().argmax()
    below = te.iloc[peak_i:][te["test/acc"].iloc[peak_i:] < 0.5]
    assert set(grid.loc[grid["collapse"] == "below0.5", "collapse_step"]) == {below["step"].iloc[0]}
    assert "paper v2" in res["report"].read_text()
    cmp = pd.read_csv(tmp_path / "s" / "paper_comparison_v1_v2.csv")
    row = cmp[(cmp["table"] == "Table 1") & (cmp["layer"] == "fc1") & (cmp["metric"] == "alpha")
              & (cmp["phase"] == "anti")]
    assert list(row["paper_v2_text"]) == ["0.9 ± 0.4"]


def test_runs_in_progress_are_left_out_of_tables_and_grid(tmp_path):
    src = ROOT / "results" / "wd0_1e7" / "analysis"
    layers = pd.read_parquet(src / "all_layers.parquet")
    steps = pd.read_parquet(src / "all_steps.parquet")
    # a second, unfinished copy of the run, under another name, stopped at 10^6
    cut = steps[steps["step"] <= 10**6].assign(run="partial", seed=7)
    (tmp_path / "a").mkdir()
    cut.to_parquet(tmp_path / "a" / "all_steps.parquet")
    layers[layers["step"] <= 10**6].assign(run="partial", seed=7).to_parquet(tmp_path / "a" / "all_layers.parquet")
    res = seeds.write_seeds_report([src, tmp_path / "a"], tmp_path / "s", figures=False, complete_at=10**7)
    grid = pd.read_csv(tmp_path / "s" / "early_warning_grid.csv")
    assert set(grid["run"]) == {"wd0_1e7"}
    assert "| partial | 1,000,000 |" in res["report"].read_text()
    with pytest.raises(seeds.AnalysisError, match="no run has reached"):
        seeds.write_seeds_report([tmp_path / "a"], tmp_path / "t", figures=False, complete_at=10**7)
