"""Tests of the native HTSR engine (grokjax.analysis.htsr) and the WeightWatcher adapter.

Ground truth comes from three places: distributions with known answers (Pareto tails,
Gaussian matrices inside the Marchenko-Pastur bulk, planted large entries), numerical
integration (the MP CDF), and WeightWatcher 0.7.5.5 itself run on the same matrices and
the same shuffle stream (weightwatcher is a test dependency; it is reached only through
grokjax.analysis.wwadapter).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.integrate

from grokjax.analysis import htsr, wwadapter
from grokjax.bench.init import torch_init

REL = 1e-8


@pytest.fixture(scope="module", autouse=True)
def single_thread_blas():
    """Both engines run their SVDs on one BLAS thread (fast on a busy 2-core machine)."""
    with htsr.blas_thread_limit(1):
        yield


def torch_init_x8(shape: tuple[int, int], seed: int) -> np.ndarray:
    """PyTorch's default nn.Linear init (U(+-1/sqrt(fan_in))) times 8; shape is (out, in)."""
    return torch_init(np.random.RandomState(seed), shape=shape)


def student_t(shape: tuple[int, int], seed: int, df: float = 2.0) -> np.ndarray:
    """Heavy-tailed entries: 8 t(df) / sqrt(fan_in)."""
    return 8 * np.random.RandomState(seed).standard_t(df, size=shape) / np.sqrt(shape[1])


def gaussian(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Pure noise N(0, 1/N): its ESD lies inside the MP bulk."""
    return np.random.RandomState(seed).standard_normal(shape) / np.sqrt(max(shape))


def planted(shape: tuple[int, int], seed: int, kind: str) -> np.ndarray:
    """Gaussian noise plus a localised perturbation that survives shuffling (a trap).

    'single' adds 2 s1 to one entry, 'block' adds 3 s1 / 4 to a 4x4 block (s1 = the
    noise's top singular value); both stay large entries after any permutation.
    """
    W = gaussian(shape, seed)
    s1 = np.sqrt(htsr.esd(W)[-1])
    if kind == "single":
        W[3, 7] += 2 * s1
    else:
        W[:4, :4] += 3 * s1 / 4
    return W


def assert_rel(a: float, b: float, rel: float = REL, what: str = "") -> None:
    """|a - b| <= rel |b| (NaN only equals NaN)."""
    if np.isnan(b):
        assert np.isnan(a), f"{what}: {a} vs NaN"
        return
    if a == b:  # also covers alpha = inf (all-equal eigenvalues) in both engines
        return
    assert abs(a - b) <= rel * abs(b), f"{what}: {a!r} vs {b!r}"


PL_FLOAT = ("alpha", "raw_alpha", "xmin", "xmax", "D", "sigma")
PL_EXACT = ("num_pl_spikes", "num_fingers", "status")


def assert_same_fit(native: dict, ww: dict, where: str) -> None:
    """Power-law columns of the two engines agree: floats to 1e-8, counts and status exactly."""
    for c in PL_FLOAT:
        assert_rel(native[c], ww[c], what=f"{where} {c}")
    for c in PL_EXACT:
        a, b = native[c], ww[c]
        assert (a == b) or (np.isnan(a) and np.isnan(b)), f"{where} {c}: {a} vs {b}"


# --------------------------------------------------------------------------------------
# Native engine against known answers


def test_esd_is_eigenvalues_of_gram_matrix_in_any_orientation():
    W = torch_init_x8((200, 784), 0)
    ev = htsr.esd(W)
    assert ev.dtype == np.float64 and ev.shape == (200,)
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(W @ W.T), rtol=1e-10)
    np.testing.assert_allclose(htsr.esd(W.T), ev, rtol=1e-12)
    np.testing.assert_allclose(htsr.esd(8 * W), 64 * ev, rtol=1e-12)


@pytest.mark.parametrize("alpha_true", [2.5, 3.5])
def test_pareto_tail_exponent_is_recovered(alpha_true):
    # Density ~ x^-alpha above xmin=3: numpy's pareto(a) + 1 has P(X > x) = x^-a, a = alpha - 1.
    rng = np.random.RandomState(12345)
    x = 3.0 * (rng.pareto(alpha_true - 1, size=2000) + 1)
    fit = htsr.fit_power_law(x, fix_fingers=None)
    assert fit["status"] == "success"
    assert abs(fit["alpha"] - alpha_true) < 4 * fit["sigma"], fit
    # The MLE at the chosen xmin is the closed-form Hill estimator on that tail.
    tail = x[x >= fit["xmin"]]
    assert fit["num_pl_spikes"] == tail.size
    assert_rel(fit["alpha"], 1 + tail.size / np.sum(np.log(tail / fit["xmin"])), rel=1e-12)
    assert_rel(fit["sigma"], (fit["alpha"] - 1) / np.sqrt(tail.size), rel=1e-12)
    assert fit["xmax"] == x.max()


def test_failed_fit_is_nan_with_status():
    fit = htsr.fit_power_law(np.array([1e-7, 2e-6, 3.0]), fix_fingers=None)  # one eigenvalue above 1e-5
    assert fit["status"] == "failed"
    assert all(np.isnan(fit[c]) for c in ("alpha", "raw_alpha", "xmin", "D", "sigma"))


def test_mp_density_and_cdf_match_the_formula_and_its_integral():
    for Q, sigma in [(3.92, 1.0), (20.0, 0.8), (1.0, 1.1)]:
        a, b = (sigma * (1 - 1 / np.sqrt(Q))) ** 2, (sigma * (1 + 1 / np.sqrt(Q))) ** 2

        def dens(lam):
            return Q * np.sqrt(max((b - lam) * (lam - a), 0.0)) / (2 * np.pi * sigma ** 2 * lam)

        grid = np.concatenate([[a - 0.1], a + (b - a) * np.linspace(0.01, 0.99, 25), [b, b + 0.1]])
        np.testing.assert_allclose(htsr.mp_density(grid, sigma, Q), [dens(x) for x in grid], rtol=1e-12, atol=0)
        pts = a + (b - a) * np.array([0.05, 0.3, 0.5, 0.77, 0.95])
        want = [scipy.integrate.quad(dens, a, p, limit=200)[0] for p in pts]
        np.testing.assert_allclose(htsr.mp_cdf(pts, sigma, Q), want, atol=1e-6)
        assert htsr.mp_cdf(a - 0.1, sigma, Q) == 0.0 and htsr.mp_cdf(b + 0.1, sigma, Q) == 1.0


@pytest.mark.parametrize("shape", [(200, 784), (784, 200), (200, 200), (10, 200)])
def test_gaussian_matrix_has_no_traps_and_fits_mp(shape):
    row = htsr.analyze_matrix(gaussian(shape, 100), seed=0)
    assert row["traps"] == 0
    assert row["n_shuffles"] == (5 if min(shape) < 100 else 1)
    assert abs(row["rand_sigma_mp"] - 1) < 0.05
    assert row["mp_status"] == "success"
    assert row["mp_pvalue"] > 0.1
    # The bulk edge in original units brackets the pooled shuffled ESD.
    assert row["rand_bulk_max"] >= 0.95 * row["max_rand_eval"]


@pytest.mark.parametrize("shape", [(200, 784), (200, 200), (10, 200)])
@pytest.mark.parametrize("kind", ["single", "block"])
def test_planted_large_entries_are_traps(shape, kind):
    row = htsr.analyze_matrix(planted(shape, 7, kind), seed=0)
    assert row["traps"] >= row["n_shuffles"]  # at least one trap in every pooled shuffle
    assert row["traps_per_shuffle"] >= 1


def test_heavy_tailed_shuffled_esd_is_far_from_mp():
    row = htsr.analyze_matrix(student_t((200, 784), 3, df=2.0), seed=0)
    assert row["traps"] > 5
    assert row["mp_pvalue"] < 0.01


def test_seeding_is_reproducible_and_per_layer():
    weights = {"fc1": student_t((200, 784), 0), "fc2": student_t((200, 200), 1), "fc3": student_t((10, 200), 2)}
    a = htsr.analyze_weights(weights, seed=3)
    b = htsr.analyze_weights(weights, seed=3)
    assert a == b
    # Layer i shuffles with layer_rng(seed, i) whatever the other layers are.
    alone = htsr.analyze_matrix(weights["fc2"], name="fc2", rng=htsr.layer_rng(3, 1))
    assert alone == a[1]
    # shuffle_esd with a RandomState is the permutation RandomState.shuffle draws.
    rng = np.random.RandomState(9)
    flat = weights["fc3"].flatten()
    rng.shuffle(flat)
    np.testing.assert_array_equal(htsr.shuffle_esd(weights["fc3"], 9, n_shuffles=1),
                                  htsr.esd(flat.reshape(weights["fc3"].shape)))


def test_options_validation():
    with pytest.raises(ValueError):
        htsr.HTSROptions(fix_fingers="xmin_peak")
    with pytest.raises(ValueError):
        htsr.HTSROptions(max_fingers=0)
    with pytest.raises(ValueError):
        htsr.analyze_matrix(np.full((20, 30), np.nan))


# --------------------------------------------------------------------------------------
# The adapter's hygiene (first, so that the in-process import is inside the check)


def _global_state() -> tuple:
    root = logging.getLogger()
    levels = {n: lg.level for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    rng = np.random.get_state()
    return (list(warnings.filters), root.level, list(root.handlers), levels, logging.root.manager.disable,
            rng[1].tobytes(), rng[2])


def test_adapter_leaves_warnings_logging_and_rng_unchanged_and_is_silent(capsys):
    # First WeightWatcher use in this file, so normally this also covers the import (with torch).
    np.random.seed(77)
    warnings.filterwarnings("error", message="grokjax-test-marker")
    before = _global_state()
    wwadapter.analyze_weights_ww({"fc3": torch_init_x8((10, 200), 1)}, seed=0)
    wwadapter.fit_powerlaw_ww(htsr.esd(torch_init_x8((10, 200), 1)))
    after = _global_state()
    levels_before, levels_after = before[3], after[3]
    assert before[:3] == after[:3] and before[4:] == after[4:]
    assert all(levels_after[n] == lvl for n, lvl in levels_before.items())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_adapter_rows_have_the_native_columns():
    W = {"fc3": torch_init_x8((10, 200), 1), "too_small": torch_init_x8((5, 20), 2)}
    for randomize in (True, False):
        options = htsr.HTSROptions(randomize=randomize)
        native = htsr.analyze_weights(W, options=options)
        ww = wwadapter.analyze_weights_ww(W, seed=0, randomize=randomize)
        assert [list(r) for r in ww] == [list(htsr.ROW_COLUMNS)] * 2 == [list(r) for r in native]
        assert ww[1]["status"] == "skipped"  # WW skips M < 10; the native engine does not
        assert native[1]["status"] in ("success", "failed")


# --------------------------------------------------------------------------------------
# Agreement with WeightWatcher 0.7.5.5

ALPHA_CASES = {
    "x8_fc1": torch_init_x8((200, 784), 0),
    "x8_fc1_transposed": torch_init_x8((200, 784), 0).T,
    "x8_fc2_fingers": torch_init_x8((200, 200), 1),  # WW clips 7 fingers here
    "x8_fc3": torch_init_x8((10, 200), 0),  # clip_xmax succeeds (3 fingers)
    "x8_fc3_clip_fails": torch_init_x8((10, 200), 1),  # clip_xmax raises in WW
    "t2_fc1": student_t((200, 784), 0),
    "t2_fc2": student_t((200, 200), 1),
    "t3_fc3": student_t((10, 200), 2, df=3.0),
}


@pytest.fixture(scope="module")
def ww_alpha_rows():
    rows = wwadapter.analyze_weights_ww(ALPHA_CASES, seed=0, randomize=False)
    return {r["name"]: r for r in rows}


def test_adapter_requires_paper_version(monkeypatch):
    assert wwadapter.ww_version() == wwadapter.REQUIRED_VERSION == "0.7.5.5"
    # Another installed version is refused before weightwatcher is imported or called.
    monkeypatch.setattr(wwadapter, "_ww_module", None)
    monkeypatch.setattr(wwadapter, "ww_version", lambda: "0.7.4.1")
    with pytest.raises(RuntimeError, match=r"weightwatcher 0\.7\.5\.5 is required .*found 0\.7\.4\.1"):
        wwadapter.analyze_weights_ww({"fc3": torch_init_x8((10, 200), 1)}, seed=0)
    with pytest.raises(RuntimeError, match="found 0.7.4.1"):
        wwadapter.fit_powerlaw_ww(np.arange(1.0, 20.0))


@pytest.mark.parametrize("name", list(ALPHA_CASES))
def test_alpha_xmin_D_equal_to_weightwatcher(name, ww_alpha_rows):
    native = htsr.analyze_matrix(ALPHA_CASES[name], name=name, options=htsr.HTSROptions(randomize=False))
    ww = ww_alpha_rows[name]
    assert_same_fit(native, ww, name)
    for c in ("lambda_max", "norm"):
        assert_rel(native[c], ww[c], rel=1e-12, what=c)
    assert native["num_evals"] == ww["num_evals"]


def test_clip_xmax_branches_are_exercised(ww_alpha_rows):
    fingers = ww_alpha_rows["x8_fc2_fingers"]
    assert fingers["status"] == "success" and fingers["num_fingers"] > 0
    assert fingers["alpha"] < fingers["raw_alpha"] - 1.0
    failed = ww_alpha_rows["x8_fc3_clip_fails"]
    assert failed["status"] == "failed" and np.isnan(failed["alpha"])
    assert np.isfinite(failed["raw_alpha"])
    native = htsr.fit_power_law(htsr.esd(ALPHA_CASES["x8_fc3_clip_fails"]))
    assert native["status"] == "failed" and np.isnan(native["alpha"]) and np.isnan(native["D"])
    assert_rel(native["raw_alpha"], failed["raw_alpha"], what="fc3 raw_alpha")
    # The unclipped fit of the same eigenvalues is that raw_alpha.
    plain = htsr.fit_power_law(htsr.esd(ALPHA_CASES["x8_fc3_clip_fails"]), fix_fingers=None)
    assert_rel(plain["alpha"], native["raw_alpha"], rel=0, what="raw vs plain")


@pytest.mark.parametrize("fix_fingers", [None, "clip_xmax"])
def test_fit_power_law_equal_to_weightwatcher_on_identical_eigenvalues(fix_fingers):
    rng = np.random.RandomState(2024)
    samples = [3.0 * (rng.pareto(1.5, size=1000) + 1), 3.0 * (rng.pareto(2.5, size=300) + 1),
               rng.uniform(1, 2, size=10), np.exp(rng.standard_normal(150)),
               # Ties, where the order of equal eigenvalues and exact-tie argmins matter:
               np.round(np.exp(rng.standard_normal(200)), 1) + 0.1, np.repeat(np.exp(rng.standard_normal(30)), 2),
               np.ones(15)]
    for i, x in enumerate(samples):
        assert_same_fit(htsr.fit_power_law(x, fix_fingers=fix_fingers),
                        wwadapter.fit_powerlaw_ww(x, fix_fingers=fix_fingers), f"sample {i}")


TRAP_LAYERS = {
    "x8_fc1": torch_init_x8((200, 784), 10),
    "t2_fc2": student_t((200, 200), 21),
    "planted_single_fc1": planted((200, 784), 30, "single"),
    "planted_block_fc2": planted((200, 200), 31, "block"),
    "planted_single_fc3": planted((10, 200), 32, "single"),
    "gauss_fc1": gaussian((784, 200), 40),
    "gauss_fc3": gaussian((10, 200), 41),
}
TRAP_SEED = 5


@pytest.fixture(scope="module")
def trap_rows():
    """Both engines on one 7-layer model; the native pass walks WW's RNG stream."""
    ww_rows = wwadapter.analyze_weights_ww(TRAP_LAYERS, seed=TRAP_SEED)
    native_rows = htsr.analyze_weights(TRAP_LAYERS, rng=np.random.RandomState(TRAP_SEED))
    return {r["name"]: r for r in native_rows}, {r["name"]: r for r in ww_rows}


@pytest.mark.parametrize("name", list(TRAP_LAYERS))
def test_traps_equal_to_weightwatcher_on_the_same_shuffles(name, trap_rows):
    native, ww = trap_rows[0][name], trap_rows[1][name]
    assert_same_fit(native, ww, name)
    assert native["traps"] == ww["traps"]
    assert native["n_shuffles"] == ww["n_shuffles"]
    assert native["traps_per_shuffle"] == ww["traps_per_shuffle"]
    assert native["mp_status"] == ww["mp_status"] == "success"
    assert_rel(native["max_rand_eval"], ww["max_rand_eval"], rel=1e-12, what="max_rand_eval")
    # Measured: identical to the last bit; 1e-6 leaves room for another BLAS.
    assert_rel(native["rand_sigma_mp"], ww["rand_sigma_mp"], rel=1e-6, what="rand_sigma_mp")
    assert_rel(native["rand_bulk_max"], ww["rand_bulk_max"], rel=2e-6, what="rand_bulk_max")
    assert_rel(native["rand_bulk_min"], ww["rand_bulk_min"], rel=2e-6, what="rand_bulk_min")
    assert np.isnan(ww["mp_ks"]) and np.isfinite(native["mp_ks"])


def test_trap_ground_truth_in_both_engines(trap_rows):
    for rows in trap_rows:
        for name in ("planted_single_fc1", "planted_block_fc2", "planted_single_fc3"):
            assert rows[name]["traps"] >= rows[name]["n_shuffles"], name
        assert rows["planted_single_fc3"]["traps"] == 5  # the trap shows in each of 5 pooled shuffles
        for name in ("x8_fc1", "gauss_fc1", "gauss_fc3"):
            assert rows[name]["traps"] == 0, name
            assert abs(rows[name]["rand_sigma_mp"] - 1) < 0.05, name
        assert rows["t2_fc2"]["traps"] > 3


# --------------------------------------------------------------------------------------
# The adapter without torch, in a fresh process


def test_adapter_without_torch_imports_cleanly_in_a_fresh_process():
    # torch is made unimportable (a meta-path finder that raises ImportError; a None entry
    # in sys.modules would break scipy's array-API probes), so WW takes its no-torch path and the
    # adapter must install the torch.Tensor shim for dict input; the fresh process also
    # checks the import's own side effects are undone, and that nothing reaches stdout.
    script = textwrap.dedent(
        """
        import importlib.abc, json, logging, sys, warnings

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        warnings.simplefilter("default")
        warnings.filterwarnings("error", message="marker")
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("matplotlib").setLevel(logging.DEBUG)

        def state():
            root = logging.getLogger()
            levels = {n: lg.level for n, lg in logging.Logger.manager.loggerDict.items()
                      if isinstance(lg, logging.Logger)}
            return list(warnings.filters), root.level, list(root.handlers), levels, logging.root.manager.disable

        from grokjax.analysis import wwadapter  # imports numpy/scipy (which add their own filters), not WW

        before = state()
        rows = wwadapter.analyze_weights_ww({"fc1": np.random.RandomState(0).standard_normal((30, 60))},
                                            seed=0, randomize=False)
        after = state()
        sys.stderr.write(json.dumps(dict(
            filters=before[0] == after[0], root=before[1:3] == after[1:3], disable=before[4] == after[4],
            levels=all(after[3][n] == v for n, v in before[3].items()),
            imported="weightwatcher" in sys.modules, torch="torch" in sys.modules, status=rows[0]["status"],
            shim=type(sys.modules["weightwatcher.weightwatcher"].torch).__name__)))
        """
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # nothing but the report: no log lines from the import
    report = json.loads(lines[0])
    assert report == dict(filters=True, root=True, disable=True, levels=True, imported=True, torch=False,
                          status="success", shim="SimpleNamespace")
