"""Modular addition analysis: the 8 matrices, the per-head view, the Fourier energy, HTSR against WeightWatcher."""

import jax
import numpy as np
import pytest

from grokjax.analysis import htsr, meanaware, wwadapter
from grokjax.analysis import modadd as ana
from grokjax.modadd import model
from grokjax.modadd.config import ModAddConfig


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, model.init_params(jax.random.PRNGKey(11), ModAddConfig()))


def test_eight_matrices_and_their_layout(params):
    mats = ana.weight_matrices(params)
    assert list(mats) == list(ana.MATRICES)
    assert {k: v.shape for k, v in mats.items()} == {
        "embed": (114, 128), "W_Q": (128, 128), "W_K": (128, 128), "W_V": (128, 128), "W_O": (128, 128),
        "fc1": (128, 512), "fc2": (512, 128), "unembed": (128, 114)}
    assert all(m.dtype == np.float64 for m in mats.values())
    # Head h of W_Q is columns 32h..32h+31; head h of W_O is rows 32h..32h+31.
    np.testing.assert_array_equal(mats["W_Q"][:, 64:96], params["W_Q"][:, 2, :])
    np.testing.assert_array_equal(mats["W_O"][32:64], params["W_O"][1])
    np.testing.assert_array_equal(mats["fc2"], params["fc2"]["kernel"])
    # The concatenated matrices act on the residual stream as the heads do together.
    x = np.random.RandomState(0).standard_normal((5, 128))
    z = np.einsum("bd,dhk->bhk", x, params["W_V"])
    np.testing.assert_allclose(x @ mats["W_V"] @ mats["W_O"], np.einsum("bhk,hkd->bd", z, params["W_O"]),
                               rtol=1e-12, atol=1e-12)
    heads = ana.head_matrices(params)
    assert len(heads) == 16 and heads["W_K_h3"].shape == (128, 32) and heads["W_O_h0"].shape == (32, 128)
    np.testing.assert_array_equal(np.concatenate([heads[f"W_K_h{h}"] for h in range(4)], axis=1), mats["W_K"])
    np.testing.assert_array_equal(np.concatenate([heads[f"W_O_h{h}"] for h in range(4)], axis=0), mats["W_O"])


def test_missing_parameter_is_a_clear_error(params):
    broken = {k: v for k, v in params.items() if k != "W_K"}
    with pytest.raises(KeyError, match="parameter W_K is missing"):
        ana.weight_matrices(broken)


def _nanda_basis(p):
    """Nanda et al.'s make_fourier_basis (rows: const, cos 1, sin 1, ...), written out with numpy."""
    a = np.arange(p)
    rows, names = [np.ones(p) / np.sqrt(p)], [0]
    for k in range(1, p // 2 + 1):
        for f in (np.cos, np.sin):
            v = f(2 * np.pi * k * a / p)
            if np.linalg.norm(v) > 1e-9:
                rows.append(v / np.linalg.norm(v))
                names.append(k)
    return np.stack(rows), np.array(names)


@pytest.mark.parametrize("p", [113, 12])
def test_fourier_energy_matches_the_explicit_basis(p):
    E = np.random.RandomState(p).standard_normal((p + 1, 16))
    out = ana.embedding_fourier(E)
    basis, names = _nanda_basis(p)
    coef = basis @ E[:p]
    want = np.array([np.sum(coef[names == k] ** 2) for k in range(p // 2 + 1)])
    np.testing.assert_allclose(out["energy"], want, rtol=1e-10)
    assert out["fraction"].sum() == pytest.approx(1.0, rel=1e-12)  # Parseval
    assert out["total"] == pytest.approx(np.sum(E[:p] ** 2), rel=1e-14)
    assert out["peak_freq"] == 1 + int(np.argmax(want[1:]))
    np.testing.assert_allclose(out["component_fraction"], np.sum(coef**2, axis=1) / out["total"], rtol=1e-10,
                               atol=1e-15)


def test_fourier_energy_of_planted_and_random_embeddings():
    p, a = 113, np.arange(113)
    planted = np.zeros((114, 8))
    planted[:p, 0] = np.cos(2 * np.pi * 17 * a / p)
    planted[:p, 1] = 3 * np.sin(2 * np.pi * 17 * a / p + 0.4)
    planted[p] = 50.0  # the '=' row is not part of the transform
    out = ana.embedding_fourier({"embed": planted})
    assert out["peak_freq"] == 17 and out["peak_fraction"] == pytest.approx(1.0, abs=1e-12)
    two = planted.copy()
    two[:p, 2] = 2 * np.cos(2 * np.pi * 5 * a / p)  # energy 4 * p/2 at k=5 against (1 + 9) * p/2 at k=17
    assert ana.embedding_fourier(two)["peak_fraction"] == pytest.approx(10 / 14, rel=1e-12)
    # A random embedding spreads its energy: peak near 2/p (the paper's anti-grokking level, ~0.02).
    noise = ana.embedding_fourier(np.random.RandomState(0).standard_normal((114, 128)))
    assert 1.5 / p < noise["peak_fraction"] < 3.5 / p


@pytest.mark.parametrize("bad, msg", [
    (np.ones((10,)), "must be 2-D"),
    (np.zeros((114, 4)), "all zero"),
    (np.full((114, 4), np.nan), "non-finite"),
])
def test_fourier_bad_inputs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ana.embedding_fourier(bad)
    with pytest.raises(ValueError, match="p must lie in"):
        ana.embedding_fourier(np.ones((10, 4)), p=11)


def test_native_htsr_equals_weightwatcher_on_the_eight_matrices(params):
    seed = 3
    native = ana.analyze_params(params, rng=np.random.RandomState(seed))
    ww = wwadapter.analyze_weights_ww(ana.weight_matrices(params), seed=seed)
    assert [r["name"] for r in native] == [r["name"] for r in ww] == list(ana.MATRICES)
    for n, w in zip(native, ww):
        where = n["name"]
        for c in ("alpha", "raw_alpha", "xmin", "xmax", "D", "sigma", "lambda_max", "norm"):
            if np.isnan(w[c]):
                assert np.isnan(n[c]), (where, c)
            else:
                assert abs(n[c] - w[c]) <= 1e-8 * abs(w[c]), (where, c, n[c], w[c])
        for c in ("num_pl_spikes", "num_fingers", "status", "num_evals", "traps", "n_shuffles", "mp_status"):
            assert n[c] == w[c] or (np.isnan(n[c]) and np.isnan(w[c])), (where, c, n[c], w[c])
        assert abs(n["rand_sigma_mp"] - w["rand_sigma_mp"]) <= 1e-6 * abs(w["rand_sigma_mp"]), where
    # A fresh init is i.i.d. Gaussian: every fit succeeds and no matrix has a correlation trap.
    assert all(r["status"] == "success" for r in native)
    assert all(r["traps"] == 0 for r in native)


def test_extended_columns_and_per_head_rows(params):
    rows = ana.analyze_params(params, rng=np.random.RandomState(3), k_shuffles=2)
    plain = ana.analyze_params(params, rng=np.random.RandomState(3))
    for r, q in zip(rows, plain):
        assert set(meanaware.EXTENDED_COLUMNS) <= set(r)
        assert r["traps_raw"] == r["traps"] == q["traps"], r["name"]  # draw 0 is WW's draw
        assert np.isfinite(r["alpha_centred"])
    heads = ana.analyze_params(params, seed=1, heads=True, options=htsr.HTSROptions(randomize=False))
    assert [r["name"] for r in heads][:5] == ["W_Q_h0", "W_Q_h1", "W_Q_h2", "W_Q_h3", "W_K_h0"]
    assert len(heads) == 16 and all(r["M"] == 32 and r["N"] == 128 for r in heads)
    with pytest.raises(ValueError, match="k_shuffles must be a non-negative integer"):
        ana.analyze_params(params, k_shuffles=-1)


def test_fourier_figure_without_params_checkpoints_warns_and_is_left_out(tmp_path):
    from grokjax.analysis import modadd_report  # noqa: PLC0415

    path = tmp_path / "fig_modadd_fourier.png"
    with pytest.warns(UserWarning, match="no params checkpoints, so fig_modadd_fourier.png"):
        got = modadd_report.fig_fourier(tmp_path, {"pre": 10.0, "grok": 20.0, "anti": 30.0}, 113, path, "t")
    assert got is None and not path.exists()
