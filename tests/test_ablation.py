"""Correlation-trap ablation (grokjax.analysis.ablation): planted traps found and removed, the shuffle
replayed exactly, the counts equal to the analysis', and the experiment on a short real run.

Planted traps are a few large entries in Gaussian noise: each survives any shuffle as a
rank-one spike of W^rand (tests/test_htsr.py has the detection side for the engine itself).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grokjax.analysis import ablation, htsr, meanaware, progress

from grokjax import ckpt
from grokjax.analysis.pipeline import checkpoint_seed, weights_of

ROOT = Path(__file__).resolve().parents[1]
Q_FC1 = 784 / 200


def gaussian(shape, seed):
    """Pure noise N(0, 1/N): no traps."""
    return np.random.RandomState(seed).standard_normal(shape) / np.sqrt(max(shape))


def planted(shape, seed, n_entries=8, size=2.5):
    """Gaussian noise plus n_entries entries raised by size x its top singular value."""
    W = gaussian(shape, seed)
    rs = np.random.RandomState(seed + 1000)
    flat = rs.choice(W.size, n_entries, replace=False)
    rows, cols = np.unravel_index(flat, shape)
    W[rows, cols] += size * np.sqrt(htsr.esd(W)[-1])
    return W, (rows, cols)


def test_permutation_replays_the_count_shuffle():
    W = gaussian((200, 784), 0)
    a, b = np.random.RandomState(5), np.random.RandomState(5)
    p = ablation.permutation(W.size, a)
    # WeightWatcher's own operation: shuffle a flattened copy with the legacy generator.
    flat = W.flatten()
    b.shuffle(flat)
    np.testing.assert_array_equal(ablation.permute(W, p), flat.reshape(W.shape))
    # The generator ends in the same state, so the next layer's shuffle is the same too.
    assert a.randint(2**31) == b.randint(2**31)
    # Exact round trips, both ways.
    np.testing.assert_array_equal(ablation.unpermute(ablation.permute(W, p), p), W)
    A = gaussian((200, 784), 1)
    np.testing.assert_array_equal(ablation.permute(ablation.unpermute(A, p), p), A)
    assert sorted(p.tolist()) == list(range(W.size))


@pytest.mark.parametrize("variant", ["noise", "subtract"])
def test_planted_traps_are_found_and_removed(variant):
    W, (rows, cols) = planted((200, 784), 1)
    modes = ablation.find_traps(W, 0)
    row = htsr.analyze_matrix(W, seed=0)
    assert modes.traps == row["traps"] == 8 and modes.n_removable == 8
    assert np.all(modes.s[:8] ** 2 > modes.threshold) and modes.s[8] ** 2 < modes.threshold

    W2, again = ablation.remove_traps(W, 0, variant=variant, noise_seed=3)
    assert again.traps == modes.traps
    Wr = ablation.permute(W, modes.perms[0])
    Wr2 = ablation.permute(W2, modes.perms[0])
    ev_before, ev_after = htsr.esd(Wr), htsr.esd(Wr2)
    # Nothing is left beyond the edge. 'subtract' leaves the bulk as it was, inside the
    # original fit's edge; 'noise' spreads the traps' energy over all entries, which widens
    # the bulk (here by ~50 %), so it is judged by a refit, as the analysis would judge W'.
    if variant == "subtract":
        assert np.max(ev_after) * modes.W_scale**2 < modes.threshold
    refit = htsr.fit_mp(ev_after, Q_FC1, 200)
    assert refit["num_spikes"] == 0
    # KS against MP: before, the 8 traps alone put it at 8/200; after, the bulk (the 8
    # emptied directions left out) fits MP as well as pure noise does (~0.015-0.025).
    ks_before = htsr.mp_ks_test(ev_before, modes.sigma_mp, Q_FC1)["mp_ks"]
    bulk = ev_after[8:]
    ks_after = htsr.mp_ks_test(bulk, htsr.fit_mp(bulk, Q_FC1, 200)["sigma_mp"], Q_FC1)["mp_ks"]
    assert ks_before >= 0.04 and ks_after < 0.03
    # W' differs from W mostly at the planted entries.
    d2 = (W2 - W) ** 2
    planted_share = d2[rows, cols].sum() / d2.sum()
    # 'noise' adds R with T's own spread, so about half the change is the noise by design.
    assert planted_share > (0.85 if variant == "subtract" else 0.35)
    assert set(np.argsort(d2.ravel())[-8:]) == set(np.ravel_multi_index((rows, cols), W.shape))


def test_no_traps_returns_W_unchanged():
    W = gaussian((200, 784), 2)
    modes = ablation.find_traps(W, 4)
    assert modes.ok and modes.traps == 0 and modes.n_removable == 0
    for variant in ("noise", "subtract"):
        W2, _ = ablation.remove_traps(W, 4, variant=variant)
        assert W2 is not W and W2.dtype == np.float64
        np.testing.assert_array_equal(W2, W)
    np.testing.assert_array_equal(ablation.remove_modes(W, modes, [], variant="noise",
                                                        noise_rng=np.random.default_rng(0)), W)


def test_counts_equal_the_analysis():
    """Walking one stream through the layers (the analysis' way) and per-layer generators."""
    fc1, _ = planted((784, 200), 3, n_entries=3)
    fc2, _ = planted((200, 200), 4, n_entries=2)
    fc3, _ = planted((200, 10), 5, n_entries=1, size=3.0)
    weights = {"fc1": fc1, "fc2": fc2, "fc3": fc3}
    rows = htsr.analyze_weights(weights, rng=np.random.RandomState(11))
    rng = np.random.RandomState(11)
    found = {name: ablation.find_traps(W, rng) for name, W in weights.items()}
    for r in rows:
        m = found[r["name"]]
        assert m.traps == r["traps"] and sum(m.traps_per_shuffle) == r["traps"]
        assert len(m.perms) == r["n_shuffles"]
    assert [found[k].n_removable for k in ("fc1", "fc2")] == [3, 2]
    assert found["fc3"].traps >= 5 and found["fc3"].n_removable >= 1  # pooled: first shuffle's share
    by_seed = htsr.analyze_weights(weights, seed=7)
    for i, r in enumerate(by_seed):
        assert ablation.find_traps(weights[r["name"]], htsr.layer_rng(7, i)).traps == r["traps"]
    # The centred count: the same permutations applied to W - mean(W).
    ext = meanaware.extended_weights(weights, seed=11, k_shuffles=1, rng=np.random.RandomState(11))
    rng = np.random.RandomState(11)
    for name, W in weights.items():
        centred = ablation.find_traps(W, rng, centred=True)
        assert centred.centred and centred.traps == ext[name]["traps_centred"]
        assert ablation.find_traps(W, 3, centred=True).traps == htsr.rand_spectrum(W, 3, centred=True)["num_spikes"]


def test_mean_trap_is_uniform_and_centring_removes_it():
    """A shifted mean survives shuffling as a rank-1 outlier whose vectors are uniform."""
    W = gaussian((200, 200), 6) + 0.05
    modes = ablation.find_traps(W, 0)
    assert modes.n_removable == 1
    (t,) = ablation.trap_details(modes)
    assert t["u_uniform_overlap"] > 0.95 and t["v_uniform_overlap"] > 0.95
    assert abs(t["footprint_mean"] - 0.05) < 0.01 and t["footprint_top5_mass"] < 0.1
    assert ablation.find_traps(ablation.remove_mean(W), 0).traps == 0
    # The centred count sees no trap, so its variants leave W as it is; 'subtract' takes
    # out about the mean.
    assert ablation.find_traps(W, 0, centred=True).traps == 0
    np.testing.assert_array_equal(ablation.remove_traps(W, 0, variant="subtract_centred")[0], W)
    assert abs(np.mean(ablation.remove_traps(W, 0, variant="subtract")[0])) < 0.005
    # A planted entry is localised instead.
    (p,) = ablation.trap_details(ablation.find_traps(planted((200, 200), 6, n_entries=1)[0], 0))
    assert p["u_uniform_overlap"] < 0.3 and p["footprint_top5_mass"] > 0.3


def test_control_draws_bulk_modes_only():
    W, _ = planted((200, 200), 8, n_entries=3)
    modes = ablation.find_traps(W, 1)
    draws = [ablation.random_bulk_modes(modes, 3, np.random.default_rng(d)) for d in range(20)]
    assert all(len(set(d)) == 3 and min(d) >= modes.n_removable for d in draws)
    assert len({tuple(d) for d in draws}) > 10
    assert draws[0] == ablation.random_bulk_modes(modes, 3, np.random.default_rng(0))
    W2 = ablation.remove_modes(W, modes, draws[0], variant="subtract")
    assert ablation.find_traps(W2, 1).traps == modes.traps  # bulk removal leaves the traps


def test_bad_inputs():
    W = gaussian((20, 30), 0)
    modes = ablation.find_traps(W, 0)
    with pytest.raises(ablation.AblationError, match="variant"):
        ablation.remove_traps(W, 0, variant="zero")
    with pytest.raises(ablation.AblationError, match="out of range"):
        ablation.remove_modes(W, modes, [20], variant="subtract")
    with pytest.raises(ablation.AblationError, match="shape"):
        ablation.remove_modes(W.T, modes, [0], variant="subtract")
    with pytest.raises(ablation.AblationError, match="noise_rng"):
        ablation.remove_modes(W, modes, [0], variant="noise")
    with pytest.raises(ablation.AblationError, match="n_draws"):
        ablation.AblationOptions(n_draws=1)
    with pytest.raises(ValueError, match="non-finite"):
        ablation.find_traps(np.full((5, 5), np.nan), 0)


# --------------------------------------------------------------------------------------
# A short real run


@pytest.fixture(scope="module")
def real_run(run300):
    """300 training steps, evaluated and checkpointed at 10 log-spaced steps (helpers.RUN300, shared)."""
    return run300


@pytest.fixture(scope="module")
def data(real_run, mnist):
    return ablation.load_eval_data(json.loads((real_run / "config.json").read_text())["config"], mnist)


def _with(params, **kernels):
    return {k: {"kernel": kernels.get(k, v["kernel"]), "bias": v["bias"]} for k, v in params.items()}


def test_evaluator_equals_direct_prediction(real_run, data):
    params = ckpt.load_params(real_run, 300)
    x, y = data["test"]
    ev = ablation.Evaluator(params, x, y)
    np.testing.assert_array_equal(ev.logits(), progress.predict(params, x))
    modes = ablation.checkpoint_traps(params, step=300, run_seed=0)
    k = weights_of(params)
    rng = np.random.default_rng(0)
    fc2 = ablation.remove_modes(k["fc2"], modes["fc2"], ablation.random_bulk_modes(modes["fc2"], 2, rng),
                                variant="noise", noise_rng=rng)
    fc1, fc3 = ablation.remove_mean(k["fc1"]), ablation.remove_mean(k["fc3"])
    for replaced in ({"fc2": fc2}, {"fc3": fc3}, {"fc1": fc1, "fc3": fc3}):
        direct = progress.predict(_with(params, **replaced), x)
        np.testing.assert_array_equal(ev.logits(replaced), direct)
        assert ev.accuracy(replaced) == np.mean(np.argmax(direct, axis=1) == y)
    # The unchanged network's accuracy is the trainer's (JAX) logged one, to rounding of ties.
    logged = {json.loads(line)["step"]: json.loads(line) for line in (real_run / "metrics.jsonl").open()}
    assert abs(ev.accuracy() - logged[300]["test/acc"]) <= 2e-4
    assert abs(ablation.Evaluator(params, *data["train"]).accuracy() - logged[300]["train/acc"]) <= 1e-3


def test_ablate_checkpoint_with_a_planted_trap(real_run, data):
    params = ckpt.load_params(real_run, 300)
    W0 = params["fc2"]["kernel"]
    W = W0.copy()
    plant = 3 * np.sqrt(htsr.esd(W)[-1])
    W[5, 9] += plant
    params = _with(params, fc2=W)
    res = ablation.ablate_checkpoint(params, step=300, run_seed=0, data=data, n_draws=5)
    counted = htsr.analyze_weights(weights_of(params), rng=np.random.RandomState(checkpoint_seed(0, 300)))
    assert res["traps"] == {r["name"]: r["traps"] for r in counted}
    assert res["traps"]["fc2"] >= 1
    df = pd.DataFrame(res["rows"]).set_index(["layer", "variant"])
    assert {"fc2", "all"} <= set(df.index.get_level_values(0))
    for v in ("noise", "subtract"):
        r = df.loc[("fc2", v)]
        assert r["traps_removed"] == res["traps"]["fc2"] and r["n_control"] == 5 and r["test_acc_control_std"] >= 0
    # The row's accuracy is the network with W' computed on its own, and W' undoes the plant.
    modes = ablation.checkpoint_traps(params, step=300, run_seed=0)["fc2"]
    W_sub = ablation.remove_modes(W, modes, range(modes.n_removable), variant="subtract")
    assert abs(W_sub[5, 9] - W0[5, 9]) < 0.15 * plant
    assert df.loc[("fc2", "subtract"), "test_acc_ablated"] == ablation.Evaluator(params, *data["test"]).accuracy(
        {"fc2": W_sub})
    assert df.loc[("fc2", "subtract"), "train_acc_ablated"] == ablation.Evaluator(params, *data["train"]).accuracy(
        {"fc2": W_sub})
    assert np.isnan(df.loc[("fc2", "mean"), "test_acc_control_mean"])
    (trap,) = [t for t in res["trap_rows"] if t["layer"] == "fc2"][:1]
    assert trap["footprint_top5_mass"] > 0.3 and trap["u_uniform_overlap"] < 0.3


def _spectra_main():
    from grokjax.analysis.cli import main  # noqa: PLC0415  (the code behind analysis/spectra.py)

    return main


def test_cli_ablate_traps(real_run, tmp_path, capsys):
    """spectra.py --ablate-traps on a copy of the run whose last checkpoint carries a planted FC2 trap."""
    d = tmp_path / "planted"
    d.mkdir()
    for f in ("config.json", "metrics.jsonl"):
        shutil.copy(real_run / f, d / f)
    steps = ckpt.list_param_steps(real_run)
    trap_step = steps[-3]
    mngr = ckpt.params_manager(d, set(steps))
    for s in steps:
        p = ckpt.load_params(real_run, s)
        if s == trap_step:
            p["fc2"]["kernel"][5, 9] += 3 * np.sqrt(htsr.esd(p["fc2"]["kernel"])[-1])
        assert ckpt.save_params(mngr, s, p)
    mngr.wait_until_finished()
    mngr.close()

    main = _spectra_main()
    out = tmp_path / "out"
    code = main([str(d), "--engine", "native", "--workers", "1", "--no-progress", "--out", str(out),
                 "--ablate-traps", "--no-figures"])
    assert code == 0, capsys.readouterr().err
    assert "ablation:" in capsys.readouterr().out
    table = pd.read_csv(out / "ablation.csv")
    for col in ("step", "layer", "traps", "variant", "test_acc", "test_acc_ablated", "test_acc_control_mean",
                "test_acc_control_std", "train_acc_ablated"):
        assert col in table.columns, col
    assert not (out / "figures" / "fig_ablation.png").exists()
    assert ablation.plot_ablation(table, out / "fig_ablation.png").stat().st_size > 10_000
    assert (out / "ablation_traps.csv").is_file()
    # One row per (step, layer set, variant); the planted step is there, with an FC2 set.
    assert not table.duplicated(["run", "step", "layer", "variant"]).any()
    assert set(table["variant"]) == set(ablation.VARIANTS)
    assert {"fc2", "all"} <= set(table.loc[table["step"] == trap_step, "layer"])
    assert "grok" in "".join(table["phase"].fillna(""))
    layers = pd.read_parquet(out / "all_layers.parquet")
    at = layers[(layers["engine"] == "native") & (layers["step"] == trap_step) & (layers["layer"] == "fc2")]
    fc2 = table[(table["step"] == trap_step) & (table["layer"] == "fc2")].set_index("variant")
    assert (fc2["traps"] == at["traps"].iloc[0]).all() and at["traps"].iloc[0] >= 1
    assert fc2.loc["subtract", "traps_removed"] == at["traps"].iloc[0]
    assert fc2.loc["subtract_centred", "traps_removed"] >= 1  # a planted entry is no mean
    traps = pd.read_csv(out / "ablation_traps.csv")
    assert set(traps["step"]) == {trap_step} and set(traps["count"]) == {"raw", "centred"}
    # Steps without traps: the removal variants leave the network as it was.
    clean = table[(table["traps"] == 0) & table["variant"].isin(["noise", "subtract"])]
    assert len(clean) and (clean["test_acc_ablated"] == clean["test_acc"]).all()
    assert (clean["test_acc_control_std"] == 0).all()
    others = table[table["step"] != trap_step]
    assert len(others) and ((others["test_acc"] - others["test_acc_logged"]).abs() <= 2e-4).all()

    # Bad input: one line, exit 2.
    with pytest.raises(SystemExit) as e:
        main([str(d), "--ablate-traps", "--ablate-draws", "1"])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("spectra.py: error: ") and ">= 2" in err[0]


def test_phase_steps_far_from_every_kept_checkpoint_are_skipped_not_misplaced():
    """A run continued from its export keeps no params checkpoint near its early phase steps: those
    are reported as missing, while a phase step with a checkpoint within the tolerance maps to it."""
    steps = np.unique(np.round(np.logspace(0, 7, 141)).astype(int))
    peak = int(steps[np.argmin(np.abs(steps - 700_000))])
    test = np.where(steps <= peak, 0.1 + 0.75 * steps / peak, 0.85 - 0.4 * (steps - peak) / (1e7 - peak))
    metrics = pd.DataFrame({"step": steps, "train/acc": np.ones(len(steps)), "test/acc": test})
    late = [int(s) for s in steps if s >= 5_000_000]  # 5.0e6, 5.6e6, ... 10^7
    chosen, missing = ablation.choose_steps(metrics, late, {late[1]: 1.0, late[-1]: 0.0})
    assert missing["grok"] == peak and "anti" not in missing
    assert set(chosen) == {late[1], late[-1]} and chosen[late[-1]] == "anti" and chosen[late[1]] == ""
    # A kept checkpoint 0.05 decade from the peak (within the tolerance) stands for it.
    near = int(peak * 10 ** 0.05)
    chosen, missing = ablation.choose_steps(metrics, [near] + late, {})
    assert "grok" not in missing and "grok" in chosen[near].split("+")
