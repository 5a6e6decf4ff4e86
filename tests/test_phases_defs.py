"""Definitions that must stay right on a collapsing run: mean-aware traps and alpha
(grokjax.analysis.meanaware.extended_metrics, htsr.rand_spectrum), the persistent early-warning rule, the
length-independent pre-grokking edge and the phase windows (grokjax.analysis.phases).

Ground truth: Gaussian noise with a planted mean (a rank-1 spike that a shuffle keeps but
centring removes), a planted block of large entries (localised: a trap either way), and
planted persistent signals among isolated blips.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grokjax.analysis import htsr, meanaware


@pytest.fixture(scope="module", autouse=True)
def single_thread_blas():
    with htsr.blas_thread_limit(1):
        yield


def gaussian(shape, seed):
    """Pure noise N(0, 1/N): its shuffled ESD lies inside the MP bulk."""
    return np.random.RandomState(seed).standard_normal(shape) / np.sqrt(max(shape))


def with_mean(shape, seed, mean_over_std):
    W = gaussian(shape, seed)
    return W + mean_over_std * W.std()


def with_block(shape, seed):
    """Noise plus a 4x4 block of entries 3/4 of the noise's top singular value."""
    W = gaussian(shape, seed)
    W[:4, :4] += 0.75 * np.sqrt(htsr.esd(W)[-1])
    return W


# --------------------------------------------------------------------------------------
# extended_metrics and rand_spectrum


@pytest.mark.parametrize("shape", [(200, 784), (200, 200)])
def test_planted_mean_is_one_raw_trap_and_no_centred_trap(shape):
    W = with_mean(shape, 7, 0.3)
    ext = meanaware.extended_metrics(W, seed=0, k_shuffles=4)
    assert htsr.analyze_matrix(W, seed=0)["traps"] == 1
    assert ext["traps_raw"] == 1 and ext["traps_k_mean"] == 1.0
    assert ext["traps_centred"] == 0 and ext["traps_centred_k_mean"] == 0.0
    # The trap is the mean: its singular vectors are nearly uniform.
    assert ext["trap_uniform_overlap_u"] > 0.95 and ext["trap_uniform_overlap_v"] > 0.95
    assert ext["trap_uniform_overlap"] == max(ext["trap_uniform_overlap_u"], ext["trap_uniform_overlap_v"])
    assert ext["rand_edge_ratio_raw"] > 2 and ext["rand_edge_ratio_centred"] < 1.05
    assert ext["mean_over_std"] == pytest.approx(0.3, abs=0.01)
    # The documented bias of the MP fit: the spike takes mu^2 / (mu^2 + std^2) of the trace
    # (Q > 1); WW's Q = 1 law has a fixed support, so its sigma stays near 1.
    expected = 1 / math.sqrt(1 + 0.3 ** 2) if shape[0] != shape[1] else 1.0
    assert ext["rand_sigma_mp_raw"] == pytest.approx(expected, abs=0.01)
    assert ext["rand_sigma_mp_centred"] == pytest.approx(1.0, abs=0.02)


def test_noise_without_mean_has_no_trap_and_nan_overlap():
    ext = meanaware.extended_metrics(gaussian((200, 784), 3), seed=1, k_shuffles=2)
    assert ext["traps_raw"] == ext["traps_centred"] == 0
    assert math.isnan(ext["trap_uniform_overlap"]) and math.isnan(ext["trap_uniform_overlap_u"])


@pytest.mark.parametrize("shape", [(200, 784), (200, 200), (10, 200)])
def test_planted_block_is_a_trap_in_both_counts(shape):
    W = with_block(shape, 7)
    ext = meanaware.extended_metrics(W, seed=0, k_shuffles=3)
    n_pool = htsr.n_shuffles_for(min(shape))
    assert ext["traps_raw"] >= n_pool and ext["traps_centred"] >= n_pool
    assert ext["traps_k_mean"] >= n_pool and ext["traps_centred_k_mean"] >= n_pool
    # A localised trap: far from the uniform vector on the long side.
    assert min(ext["trap_uniform_overlap_u"], ext["trap_uniform_overlap_v"]) < 0.3


def test_k_mean_is_the_mean_over_the_documented_draws():
    W = np.random.RandomState(4).standard_t(2.0, size=(200, 200)) / np.sqrt(200)
    k, seed = 4, 11
    ext = meanaware.extended_metrics(W, seed=seed, k_shuffles=k)
    gens = [np.random.RandomState(seed)] + [meanaware.k_shuffle_rng(seed, i) for i in range(1, k)]
    raw = [htsr.rand_spectrum(W, g)["num_spikes"] for g in gens]
    gens = [np.random.RandomState(seed)] + [meanaware.k_shuffle_rng(seed, i) for i in range(1, k)]
    cen = [htsr.rand_spectrum(W, g, centred=True)["num_spikes"] for g in gens]
    assert len(set(raw)) > 1  # heavy tails: the count depends on the shuffle
    assert ext["traps_raw"] == raw[0] and ext["traps_centred"] == cen[0]
    assert ext["traps_k_mean"] == pytest.approx(np.mean(raw), abs=1e-15)
    assert ext["traps_centred_k_mean"] == pytest.approx(np.mean(cen), abs=1e-15)
    assert meanaware.extended_metrics(W, seed=seed, k_shuffles=k) == ext


def test_rand_spectrum_is_the_trap_counts_spectrum():
    for shape, seed in (((200, 784), 3), ((10, 200), 5)):
        W = with_mean(shape, 2, 0.4)
        spec = htsr.rand_spectrum(W, seed)
        row = htsr.analyze_matrix(W, seed=seed)
        np.testing.assert_array_equal(spec["evals"], htsr.shuffle_esd(W, seed))
        assert spec["num_spikes"] == row["traps"] and spec["sigma_mp"] == row["rand_sigma_mp"]
        assert spec["bulk_max"] == row["rand_bulk_max"] and spec["bulk_min"] == row["rand_bulk_min"]
        assert spec["n_shuffles"] == row["n_shuffles"] and spec["Q"] == row["Q"]
        assert spec["max_rand_eval"] == row["max_rand_eval"]
        # The threshold in original units separates the counted eigenvalues.
        assert np.count_nonzero(spec["evals"] > spec["threshold"]) == spec["num_spikes"]
        assert spec["tw_margin"] == pytest.approx(
            np.sqrt(spec["bulk_max_rescaled"] ** (2 / 3) * spec["M"] ** (-2 / 3) / np.sqrt(spec["Q"])), rel=1e-12)
        cen = htsr.rand_spectrum(W, seed, centred=True)
        assert cen["num_spikes"] == meanaware.extended_metrics(W, seed=seed, k_shuffles=1)["traps_centred"] == 0


def test_shuffle_spectra_are_the_spectra_the_analysis_counts():
    weights = {"fc1": gaussian((784, 200), 1), "fc2": with_mean((200, 200), 2, 0.3),
               "fc3": with_block((200, 10), 3)}
    rows = htsr.analyze_weights(weights, rng=np.random.RandomState(42))
    spectra = htsr.shuffle_spectra(weights, 42)
    assert list(spectra) == ["fc1", "fc2", "fc3"]
    for r in rows:
        spec = spectra[r["name"]]
        assert spec["num_spikes"] == r["traps"] and spec["sigma_mp"] == r["rand_sigma_mp"]
        assert spec["max_rand_eval"] == r["max_rand_eval"] and spec["evals"].size == r["n_shuffles"] * r["M"]
        # Stored eigenvalues (in any order) give back the same fit: the figures' path without checkpoint.
        np.testing.assert_equal(htsr.pooled_spectrum(spec["evals"][::-1], spec["N"], spec["M"]), spec)
    assert [spectra[n]["num_spikes"] for n in spectra] == [0, 1, 5]  # fc3 pools 5 shuffles
    # The walk goes on after a layer: without fc1 in front, fc2 is shuffled differently.
    alone = htsr.shuffle_spectra({"fc2": weights["fc2"]}, 42)["fc2"]["evals"]
    assert not np.array_equal(alone, spectra["fc2"]["evals"])


def test_extended_weights_draw_zero_is_the_analysis_permutation():
    weights = {"fc1": gaussian((784, 200), 1), "fc2": with_mean((200, 200), 2, 0.3),
               "fc3": with_block((200, 10), 3)}
    rows = htsr.analyze_weights(weights, rng=np.random.RandomState(42))
    ext = meanaware.extended_weights(weights, seed=42, k_shuffles=2, rng=np.random.RandomState(42))
    assert [ext[r["name"]]["traps_raw"] for r in rows] == [r["traps"] for r in rows]
    assert [r["traps"] for r in rows][:2] == [0, 1] and ext["fc2"]["traps_centred"] == 0
    per_layer = meanaware.extended_weights(weights, seed=42, k_shuffles=2)
    assert [per_layer[r["name"]]["traps_raw"] for r in htsr.analyze_weights(weights, seed=42)] == \
        [r["traps"] for r in htsr.analyze_weights(weights, seed=42)]


def test_centred_alphas_ignore_the_removed_means():
    W = np.random.RandomState(6).standard_t(3.0, size=(200, 784)) / 28
    ext = meanaware.extended_metrics(W, seed=0, k_shuffles=1)
    assert ext["alpha_centred"] == htsr.fit_power_law(htsr.esd(W - W.mean()))["alpha"]
    assert ext["lambda_max_centred"] == htsr.esd(W - W.mean())[-1]
    shifted = meanaware.extended_metrics(W + 0.2, seed=0, k_shuffles=1)
    assert shifted["alpha_centred"] == pytest.approx(ext["alpha_centred"], rel=1e-9)
    assert htsr.analyze_matrix(W + 0.2, seed=0)["alpha"] < htsr.analyze_matrix(W, seed=0)["alpha"] - 0.5
    # Row and column offsets are removed by the double centring only.
    rs = np.random.RandomState(1)
    offsets = W + 0.1 * rs.standard_normal((200, 1)) + 0.1 * rs.standard_normal((1, 784))
    moved = meanaware.extended_metrics(offsets, seed=0, k_shuffles=1)
    assert moved["alpha_dcentred"] == pytest.approx(ext["alpha_dcentred"], rel=1e-9)
    assert moved["alpha_centred"] != pytest.approx(ext["alpha_centred"], rel=1e-3)


def test_extended_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        meanaware.extended_metrics(np.full((3, 4), np.nan), seed=0)
    with pytest.raises(ValueError):
        meanaware.extended_metrics(gaussian((20, 30), 0), seed=0, k_shuffles=0)
    with pytest.raises(TypeError):
        meanaware.extended_metrics(gaussian((20, 30), 0), seed=1.5)


# --------------------------------------------------------------------------------------
# The persistent early-warning rule

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from grokjax.analysis import phases  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_persistent_signal_fires_once_and_ignores_blips():
    steps = np.arange(0, 200, 10)
    flags = np.zeros(steps.size, bool)
    flags[[2, 5, 6, 9]] = True  # isolated blips and a pair: never 3 in a row
    flags[12:16] = True  # the planted persistent signal, from step 120
    flags[18] = True
    sig = phases.PersistentSignal(3)
    fired = [sig.update(int(s), bool(f)) for s, f in zip(steps, flags)]
    assert sum(fired) == 1 and fired.index(True) == 14  # fires at the third evaluation of the streak
    assert sig.onset == 120 and sig.fired_step == 140 and sig.fired
    assert phases.persistent_onset(steps, flags, n=3) == 120
    # The blips alone never fire; a longer n needs a longer streak.
    blips = flags.copy()
    blips[12:16] = False
    assert math.isnan(phases.persistent_onset(steps, blips, n=3))
    assert phases.persistent_onset(steps, flags, n=2) == 50 and math.isnan(phases.persistent_onset(steps, flags, n=5))
    # Unsorted input is sorted; a streak that began before start counts from start.
    perm = np.random.RandomState(0).permutation(steps.size)
    assert phases.persistent_onset(steps[perm], flags[perm]) == 120
    assert phases.persistent_onset(steps, flags, start=130) == 130
    assert math.isnan(phases.persistent_onset(steps, flags, start=140))
    late = phases.PersistentSignal(3, start=130)
    assert [late.update(int(s), bool(f)) for s, f in zip(steps, flags)].count(True) == 1 and late.onset == 130


def test_persistent_signal_refuses_bad_input():
    sig = phases.PersistentSignal(3)
    sig.update(5, True)
    with pytest.raises(ValueError):
        sig.update(5, True)  # steps must increase
    with pytest.raises(ValueError):
        sig.update(6, float("nan"))
    with pytest.raises(ValueError):
        phases.persistent_onset([1, 2, 3], [0.0, np.nan, 1.0])
    with pytest.raises(ValueError):
        phases.PersistentSignal(0)
    assert math.isnan(phases.persistent_onset([], []))


# --------------------------------------------------------------------------------------
# Pre-grokking edge, windows, titles


def _curves(steps, collapse=True):
    """Train saturates by 3e3; test plateaus at 0.14, rises around 1e4 to ~0.9, may collapse."""
    ls = np.log10(np.maximum(steps, 1))
    train = np.where(steps >= 3000, 1.0, 0.1 + 0.8 * np.clip(ls / 3.5, 0, 1))
    test = 0.14 + 0.76 / (1 + np.exp(-(ls - 4.3) * 6))
    if collapse:
        test = test - 0.4 / (1 + np.exp(-(ls - 5.5) * 8))
    return train, test


def test_pre_edge_does_not_depend_on_the_run_length():
    steps = np.unique(np.round(np.logspace(0, 7, 300)).astype(int))
    train, test = _curves(steps)
    full = phases.detect_phases(steps, train, test)
    assert full["pre_status"] == "ok" and full["saturated_step"] < full["pre_step"] < full["leave_step"]
    for end in (steps[steps >= full["pre_horizon_step"]][0], 1e5, 1e6):
        keep = steps <= end
        cut = phases.detect_phases(steps[keep], train[keep], test[keep])
        assert cut["pre_step"] == full["pre_step"] and cut["pre_status"] == "ok"
    # Cut before the horizon, the run says so.
    keep = steps <= 0.9 * full["pre_horizon_step"]
    assert phases.detect_phases(steps[keep], train[keep], test[keep])["pre_status"] == "short_run"
    # The old halfway-to-the-peak edge moves with the run's length; this one does not.
    keep = steps <= 3e4
    cut = phases.detect_phases(steps[keep], train[keep], test[keep])
    assert cut["low_end_step"] < full["low_end_step"] and cut["pre_step"] == full["pre_step"]


def test_pre_edge_of_the_committed_1e6_run_is_its_1e5_edge():
    steps = pd.read_csv(RESULTS / "wd0_1e6" / "all_steps.csv")
    steps = steps[steps["test/acc"].notna()]
    full = phases.detect_phases(steps["step"], steps["train/acc"], steps["test/acc"])
    head = steps[steps["step"] <= 100_000]
    cut = phases.detect_phases(head["step"], head["train/acc"], head["test/acc"])
    assert full["final_step"] == 1_000_000 and cut["final_step"] == 100_000
    assert cut["pre_step"] == full["pre_step"] and cut["pre_status"] == full["pre_status"] == "ok"
    assert full["pre_horizon_step"] <= 100_000
    # The 10^7 run of the same trajectory (its committed metrics, bitwise equal on the shared
    # steps) gives the same edge on the steps the two runs share up to 1e5.
    lines = (RESULTS / "wd0_1e7" / "metrics.jsonl").read_text().splitlines()
    short = pd.DataFrame([json.loads(x) for x in lines])
    short = short[short["test/acc"].notna()]
    shared = np.intersect1d(short["step"], head["step"])
    assert len(shared) >= 50
    a = head.set_index("step").loc[shared]
    b = short.set_index("step").loc[shared]
    np.testing.assert_array_equal(a["test/acc"].to_numpy(), b["test/acc"].to_numpy())
    pa = phases.detect_phases(shared, a["train/acc"], a["test/acc"])
    pb = phases.detect_phases(shared, b["train/acc"], b["test/acc"])
    assert pa["pre_step"] == pb["pre_step"]


def test_pre_edge_status_when_the_test_accuracy_never_rises():
    steps = np.arange(1, 200) * 100
    train = np.where(steps >= 1000, 1.0, 0.5)
    test = 0.15 + 0.001 * np.sin(steps)  # flat plateau with noise below 1 point
    ph = phases.detect_phases(steps, train, test)
    assert ph["pre_status"] == "no_rise" and math.isnan(ph["pre_step"]) and math.isnan(ph["leave_step"])


def test_phase_windows():
    steps = np.unique(np.round(np.logspace(0, 7, 300)).astype(int))
    train, test = _curves(steps)
    ph = phases.detect_phases(steps, train, test)
    win = phases.phase_windows(steps, test, ph)
    peak = test.max()
    np.testing.assert_array_equal(win["grok"], steps[test >= peak - 0.005])
    assert ph["grok_step"] in win["grok"] and win["grok"].size > 3
    assert win["pre"][-1] == ph["pre_step"] and win["pre"][0] >= ph["pre_step"] * 10 ** -0.25
    assert win["pre"].size >= 3
    assert ph["collapsed"] and ph["anti_step"] in win["anti"]
    after = steps > ph["grok_step"]
    np.testing.assert_array_equal(win["anti"], steps[after & (test <= ph["anti_test_acc"] + 0.005)])
    # Without a collapse the third window is the last quarter decade.
    train, test = _curves(steps, collapse=False)
    ph = phases.detect_phases(steps, train, test)
    win = phases.phase_windows(steps, test, ph)
    np.testing.assert_array_equal(win["anti"], steps[steps >= 1e7 * 10 ** -0.25])


def test_anti_title_says_when_nothing_collapsed():
    assert phases.phase_title("anti", [False, False]) == "final (no collapse)"
    assert phases.phase_title("anti", True) == "Anti-grokking (collapse)"
    assert phases.phase_title("anti", [True, False]) == "Anti-grokking (collapse) / final (no collapse)"
    assert phases.phase_title("pre", [False]) == "Pre-grokking"


# --------------------------------------------------------------------------------------
# Early warnings from the peak, persistent, with false alarms counted


def _warn_frame(steps, **cols):
    return pd.DataFrame({"step": steps, **{f"native/{k}": v for k, v in cols.items()}})


def test_early_warning_is_persistent_from_the_peak_and_counts_false_alarms():
    steps = np.unique(np.round(np.logspace(0, 7, 300)).astype(int))
    train, test = _curves(steps)
    ph = phases.detect_phases(steps, train, test)
    peak, drop = ph["grok_step"], ph["drop_step"]
    after_peak = np.flatnonzero(steps > peak)
    traps_fc2 = np.where((steps > 5e4) & (steps < peak), 1, 0)  # a trap during the rise only: ignored
    traps_fc2[after_peak[[1, 4]]] = 1  # two isolated blips after the peak: no warning
    alpha_fc1 = np.full(steps.size, 4.0)
    alpha_fc1[after_peak[6:]] = 1.8  # persistent from the 7th evaluation after the peak
    centred = np.zeros(steps.size)  # the centred trap count stays 0
    df = _warn_frame(steps, alpha_fc1=alpha_fc1, alpha_fc2=4.0, alpha_mean=(alpha_fc1 + 4) / 2, traps_fc1=0,
                     traps_fc2=traps_fc2, traps_centred_fc2=centred)
    rows = {(r["layer"], r["signal"]): r for r in phases.early_warnings(df, ph)}
    a = rows[("fc1", "alpha<2")]
    onset = steps[after_peak[6]]
    assert a["warn_step"] == onset < drop and a["status"] == "warned" and a["search_from"] == peak
    assert a["lead_steps"] == drop - onset
    assert a["lead_decades"] == pytest.approx(math.log10(drop / onset), rel=1e-12)
    assert rows[("fc2", "traps>0")]["status"] == "missed"
    assert rows[("fc2", "traps_centred>0")]["status"] == "missed"
    assert ("fc1", "traps_centred>0") not in rows and ("fc1", "alpha_centred<2") not in rows
    # Without a collapse the same persistent signal is a false alarm.
    train2, test2 = _curves(steps, collapse=False)
    test2 = np.where(steps > 1e6, test2 - 0.03, test2)  # a 3-point dip after ~1e6: no collapse
    ph2 = phases.detect_phases(steps, train2, test2)
    assert not ph2["collapsed"] and ph2["grok_step"] < 1e6
    alpha2 = np.where(steps > 2 * ph2["grok_step"], 1.8, 4.0)
    df2 = _warn_frame(steps, alpha_fc1=alpha2, alpha_fc2=4.0, alpha_mean=(alpha2 + 4) / 2, traps_fc1=0, traps_fc2=0)
    warn = []
    for run, wd, d, p in (("a", 0.0, df, ph), ("b", 0.0, df2, ph2), ("c", 0.01, df2, ph2)):
        warn += [dict(r, run=run, wd=wd, steps=p["final_step"]) for r in phases.early_warnings(d, p)]
    warn = pd.DataFrame(warn)
    per_run = phases.warning_counts(warn, keys=("run", "engine")).set_index("run")
    assert per_run.loc["a", "false_alarm"] == 0 and per_run.loc["b", "false_alarm"] == 1
    per_wd = phases.warning_counts(warn, keys=("wd", "steps", "layer", "signal"))
    fc1 = per_wd[(per_wd["layer"] == "fc1") & (per_wd["signal"] == "alpha<2")].set_index("wd")
    assert fc1.loc[0.0, "runs"] == 2 and fc1.loc[0.0, "warned"] == 1 and fc1.loc[0.0, "false_alarm"] == 1
    assert fc1.loc[0.01, "false_alarm"] == 1
    assert (per_wd[list(phases.WARNING_STATUSES)].sum(axis=1) == per_wd["rows"]).all()


# --------------------------------------------------------------------------------------
# Tables over phase windows (grokjax.analysis.phase_tables via grokjax.analysis.report.build_tables)

from grokjax.analysis import phase_tables, report  # noqa: E402


def _run_tables(run, seed, n_steps, collapse, centred):
    """One run's step and layer tables: alpha_fc1 alternates 3/5 (a noisy clip_xmax reading)."""
    steps = np.unique(np.round(np.logspace(0, np.log10(n_steps), 240)).astype(int))
    train, test = _curves(steps, collapse=collapse)
    step_rows = pd.DataFrame({"run": run, "wd": 0.0, "seed": seed, "step": steps, "train/acc": train,
                              "test/acc": test})
    layer_rows = []
    for i, s in enumerate(steps):
        for layer in ("fc1", "fc2"):
            row = {"run": run, "wd": 0.0, "seed": seed, "step": s, "layer": layer, "engine": "native",
                   "alpha": (3.0 if i % 2 else 5.0) if layer == "fc1" else 4.0, "traps": 1.0,
                   "rand_sigma_mp": 1.0, "mp_ks": 0.01, "mp_pvalue": 0.9}
            if centred:
                row.update(alpha_centred=6.0, traps_centred=0.0, traps_k_mean=0.9)
            layer_rows.append(row)
    return pd.DataFrame(layer_rows), step_rows


def test_window_tables_report_median_iqr_and_the_checkpoint():
    layers, steps = _run_tables("a", 0, 10 ** 7, collapse=False, centred=False)
    ph = report.run_phases(steps)
    win = phases.phase_windows(steps["step"], steps["test/acc"], ph.iloc[0].to_dict())
    long = phase_tables.window_values(layers, steps, ph, phase_tables.available_rows(layers, phase_tables.TABLE1_ROWS))
    assert set(long["metric"]) == {"alpha"}  # the centred rows are absent: skipped
    fc1 = long[long["layer"] == "fc1"].set_index("phase")
    alpha = layers[layers["layer"] == "fc1"].set_index("step")["alpha"]
    for phase in ("pre", "grok", "anti"):
        w = alpha.reindex(win[phase])
        assert fc1.loc[phase, "win_n"] == len(w) > 2
        assert fc1.loc[phase, "win_median"] == pytest.approx(w.median())
        assert fc1.loc[phase, "win_q25"] == pytest.approx(w.quantile(0.25))
        assert fc1.loc[phase, "value"] == alpha[fc1.loc[phase, "step_used"]]
    assert fc1.loc["nominal", "step_used"] == steps["step"].iloc[
        np.argmin(np.abs(np.log1p(steps["step"]) - np.log1p(1e5)))]
    md = report.build_tables(layers, steps)["table1_alpha"][1]
    assert "final (no collapse): checkpoint" in md and "Anti-grokking" not in md


def test_window_tables_group_by_run_length_and_show_centred_rows():
    parts = [_run_tables("long", 0, 10 ** 7, collapse=True, centred=True),
             _run_tables("short", 0, 10 ** 6, collapse=True, centred=True)]
    layers = pd.concat([p[0] for p in parts], ignore_index=True)
    steps = pd.concat([p[1] for p in parts], ignore_index=True)
    tables = report.build_tables(layers, steps)
    t1, md1 = tables["table1_alpha"]
    assert set(t1["steps"]) == {10 ** 6, 10 ** 7} and (t1["runs"] == 1).all()
    assert "FC1 α, W − mean" in md1 and "| 0 | 10,000,000 |" in md1 and "| 0 | 1,000,000 |" in md1
    t2, md2 = tables["table2_traps"]
    assert {"traps", "traps_k_mean", "traps_centred"} <= set(t2["metric"])
    assert "FC2 traps, mean of K shuffles" in md2 and "FC1 traps, W − mean" in md2
    t4 = tables["table4_mp_fc1"][0]
    assert set(t4["steps"]) == {10 ** 6, 10 ** 7}


def test_paper_comparison_puts_each_value_beside_the_papers():
    from grokjax.analysis import paper  # noqa: PLC0415

    parts = [_run_tables(f"s{seed}", seed, 10 ** 7, collapse=True, centred=True) for seed in (0, 1)]
    decayed = _run_tables("wd", 0, 10 ** 7, collapse=True, centred=True)
    decayed[0]["wd"], decayed[1]["wd"] = 0.01, 0.01
    parts.append(decayed)
    layers = pd.concat([p[0] for p in parts], ignore_index=True)
    steps = pd.concat([p[1] for p in parts], ignore_index=True)
    # seed 1's FC2 alpha differs, so the WD-0 group has a spread
    layers.loc[(layers["run"] == "s1") & (layers["layer"] == "fc2"), "alpha"] = 2.0
    tables = report.build_tables(layers, steps)
    cmp, md = tables["paper_comparison"]
    wd0 = cmp[cmp["wd"] == 0.0].set_index(["table", "layer", "metric", "phase"])
    t1 = tables["table1_alpha"][0]
    t1 = t1[t1["wd"] == 0.0].set_index(["layer", "metric", "phase"])
    for phase, paper_phase in (("pre", "pre"), ("nominal", "pre"), ("grok", "grok"), ("anti", "anti")):
        r = wd0.loc[("Table 1", "fc2", "alpha", phase)]
        assert r["value_mean"] == pytest.approx(3.0) and r["value_std"] == pytest.approx(np.sqrt(2.0)) and r["n"] == 2
        assert r["paper_mean"] == paper.PAPER[("Table 1", "0", "fc2", "alpha")][paper_phase][0]
        assert r["difference"] == pytest.approx(3.0 - r["paper_mean"])
        assert wd0.loc[("Table 1", "fc1", "alpha_centred", phase), "value_mean"] == 6.0
        assert wd0.loc[("Table 1", "fc1", "alpha", phase), "value_mean"] == t1.loc[("fc1", "alpha", phase), "mean"]
    assert wd0.loc[("Table 2", "fc1", "traps", "anti"), "paper_mean"] == 6.33
    assert wd0.loc[("Table 2", "fc2", "traps_centred", "anti"), "paper_text"] == "1.00 ± 0.00"
    assert wd0.loc[("Table 4", "fc1", "mp_ks", "anti"), "paper_mean"] == 0.3044
    assert "traps_k_mean" not in set(cmp["metric"])  # the paper reports no such count
    assert not (cmp["table"].eq("Table 4") & cmp["metric"].eq("traps_centred")).any()
    # WD > 0: the paper has Table 2 only, with its own numbers
    pos = cmp[cmp["wd"] == 0.01]
    assert set(pos["table"]) == {"Table 2"}
    assert (pos.loc[(pos["layer"] == "fc1") & (pos["phase"] == "anti"), "paper_mean"] == 2.0).all()
    assert "WD = 0, 10,000,000 steps, engine native" in md and "WD = 0.01, 10,000,000 steps" in md
    assert "| Table 1 | FC2 α | 3.00 ± 1.41 | 3.00 ± 1.41 | 4.6 ± 0.5 |" in md
    assert "| Table 4 | FC1 KS statistic | 0.0100 ± 0.0000 | – | 0.0120 |" in md
    assert "Anti-grokking (collapse): this project" in md


# --------------------------------------------------------------------------------------
# KS of the MP fit: how sigma enters the Q = 1 (FC2) reference law


def _quarter_circle_cdf(lam, sigma):
    """CDF of lambda = s^2 with s ~ (1/(pi sigma^2)) sqrt(4 sigma^2 - s^2) on [0, 2 sigma]."""
    s = np.sqrt(np.clip(lam, 0, 4 * sigma ** 2))
    return (s / 2 * np.sqrt(4 * sigma ** 2 - s ** 2) + 2 * sigma ** 2 * np.arcsin(s / (2 * sigma))) / (np.pi * sigma ** 2)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7])
def test_q1_reference_law_scales_with_sigma(sigma):
    lam = np.linspace(-0.1, 4 * sigma ** 2 + 0.1, 57)
    np.testing.assert_allclose(htsr.mp_cdf(lam, sigma, 1.0), _quarter_circle_cdf(lam, sigma), atol=1e-6)
    # Support [0, 4 sigma^2] and mean sigma^2 (the entry variance), not WW's fixed [0, 2] support.
    grid = np.linspace(0, 4 * sigma ** 2, 20001)
    mean = np.trapezoid(1 - htsr.mp_cdf(grid, sigma, 1.0), grid)
    assert mean == pytest.approx(sigma ** 2, rel=1e-4)


def test_ks_of_a_square_noise_matrix_depends_on_sigma():
    W = gaussian((200, 200), 12)
    row = htsr.analyze_matrix(W, seed=3)
    assert row["Q"] == 1 and row["mp_ks"] < 0.08 and row["mp_pvalue"] > 0.05
    evals = htsr.shuffle_esd(W, 3)
    off = htsr.mp_ks_test(evals, 1.2, 1.0)
    assert off["mp_ks"] > 3 * row["mp_ks"] and off["mp_pvalue"] < 0.01
    # D is the sup distance between the empirical CDF of the rescaled eigenvalues and mp_cdf.
    x = np.sort(evals * evals.size / evals.sum())
    F = htsr.mp_cdf(x, row["rand_sigma_mp"], 1.0)
    n = x.size
    D = max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))
    assert row["mp_ks"] == pytest.approx(D, abs=1e-12)
    # The p-value is the exact KS tail for n samples (the paper's D = 0.3044, p = 1.9e-5 is n ~ 60).
    from scipy import stats

    assert row["mp_pvalue"] == pytest.approx(stats.kstwo.sf(D, n), rel=1e-6)
    assert stats.kstwo.sf(0.3044, 60) == pytest.approx(1.877e-5, rel=0.06)
    assert stats.kstwo.sf(0.3044, 200) < 1e-16


# --------------------------------------------------------------------------------------
# --paper-text: sparsity over all training images (eq. 8)


def test_paper_text_sparsity_uses_all_training_images():
    from grokjax.analysis import progress
    from grokjax.analysis.progress import ProgressOptions
    from helpers import torch_init

    params = torch_init(np.random.default_rng(0))
    x_all = np.random.default_rng(1).uniform(0, 1, (1000, 784)) ** 3
    x_fixed = x_all[progress.fixed_subset(1000, 200, 0)]
    default = progress.compute_progress(params, x_fixed=x_fixed, x_all=x_all, options=ProgressOptions(), seed=0, step=0)
    paper = progress.compute_progress(params, x_fixed=x_fixed, x_all=x_all, options=ProgressOptions(paper_text=True),
                                      seed=0, step=0)
    assert default["progress/sparsity"] == progress.activation_sparsity(progress.hidden(params, x_fixed))[0]
    hard, smooth = progress.activation_sparsity(progress.hidden(params, x_all))
    assert paper["progress/sparsity"] == hard != default["progress/sparsity"]
    assert paper["progress/sparsity_smooth"] == smooth
    with pytest.raises(ValueError):
        progress.compute_progress(params, x_fixed=x_fixed, x_all=None, options=ProgressOptions(paper_text=True),
                                  seed=0, step=0)
