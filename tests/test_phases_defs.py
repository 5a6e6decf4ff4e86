"""Definitions that must stay right on a collapsing run: mean-aware traps and alpha
(grokjax.htsr.extended_metrics, rand_spectrum), the persistent early-warning rule, the
length-independent pre-grokking edge and the phase windows (grokjax.phases).

Ground truth: Gaussian noise with a planted mean (a rank-1 spike that a shuffle keeps but
centring removes), a planted block of large entries (localised: a trap either way), and
planted persistent signals among isolated blips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from grokjax import htsr


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
    ext = htsr.extended_metrics(W, seed=0, k_shuffles=4)
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
    ext = htsr.extended_metrics(gaussian((200, 784), 3), seed=1, k_shuffles=2)
    assert ext["traps_raw"] == ext["traps_centred"] == 0
    assert math.isnan(ext["trap_uniform_overlap"]) and math.isnan(ext["trap_uniform_overlap_u"])


@pytest.mark.parametrize("shape", [(200, 784), (200, 200), (10, 200)])
def test_planted_block_is_a_trap_in_both_counts(shape):
    W = with_block(shape, 7)
    ext = htsr.extended_metrics(W, seed=0, k_shuffles=3)
    n_pool = htsr.n_shuffles_for(min(shape))
    assert ext["traps_raw"] >= n_pool and ext["traps_centred"] >= n_pool
    assert ext["traps_k_mean"] >= n_pool and ext["traps_centred_k_mean"] >= n_pool
    # A localised trap: far from the uniform vector on the long side.
    assert min(ext["trap_uniform_overlap_u"], ext["trap_uniform_overlap_v"]) < 0.3


def test_k_mean_is_the_mean_over_the_documented_draws():
    W = np.random.RandomState(4).standard_t(2.0, size=(200, 200)) / np.sqrt(200)
    k, seed = 4, 11
    ext = htsr.extended_metrics(W, seed=seed, k_shuffles=k)
    gens = [np.random.RandomState(seed)] + [htsr.k_shuffle_rng(seed, i) for i in range(1, k)]
    raw = [htsr.rand_spectrum(W, g)["num_spikes"] for g in gens]
    gens = [np.random.RandomState(seed)] + [htsr.k_shuffle_rng(seed, i) for i in range(1, k)]
    cen = [htsr.rand_spectrum(W, g, centred=True)["num_spikes"] for g in gens]
    assert len(set(raw)) > 1  # heavy tails: the count depends on the shuffle
    assert ext["traps_raw"] == raw[0] and ext["traps_centred"] == cen[0]
    assert ext["traps_k_mean"] == pytest.approx(np.mean(raw), abs=1e-15)
    assert ext["traps_centred_k_mean"] == pytest.approx(np.mean(cen), abs=1e-15)
    assert htsr.extended_metrics(W, seed=seed, k_shuffles=k) == ext


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
        assert cen["num_spikes"] == htsr.extended_metrics(W, seed=seed, k_shuffles=1)["traps_centred"] == 0


def test_extended_weights_draw_zero_is_the_analysis_permutation():
    weights = {"fc1": gaussian((784, 200), 1), "fc2": with_mean((200, 200), 2, 0.3),
               "fc3": with_block((200, 10), 3)}
    rows = htsr.analyze_weights(weights, rng=np.random.RandomState(42))
    ext = htsr.extended_weights(weights, seed=42, k_shuffles=2, rng=np.random.RandomState(42))
    assert [ext[r["name"]]["traps_raw"] for r in rows] == [r["traps"] for r in rows]
    assert [r["traps"] for r in rows][:2] == [0, 1] and ext["fc2"]["traps_centred"] == 0
    per_layer = htsr.extended_weights(weights, seed=42, k_shuffles=2)
    assert [per_layer[r["name"]]["traps_raw"] for r in htsr.analyze_weights(weights, seed=42)] == \
        [r["traps"] for r in htsr.analyze_weights(weights, seed=42)]


def test_centred_alphas_ignore_the_removed_means():
    W = np.random.RandomState(6).standard_t(3.0, size=(200, 784)) / 28
    ext = htsr.extended_metrics(W, seed=0, k_shuffles=1)
    assert ext["alpha_centred"] == htsr.fit_power_law(htsr.esd(W - W.mean()))["alpha"]
    assert ext["lambda_max_centred"] == htsr.esd(W - W.mean())[-1]
    shifted = htsr.extended_metrics(W + 0.2, seed=0, k_shuffles=1)
    assert shifted["alpha_centred"] == pytest.approx(ext["alpha_centred"], rel=1e-9)
    assert htsr.analyze_matrix(W + 0.2, seed=0)["alpha"] < htsr.analyze_matrix(W, seed=0)["alpha"] - 0.5
    # Row and column offsets are removed by the double centring only.
    rs = np.random.RandomState(1)
    offsets = W + 0.1 * rs.standard_normal((200, 1)) + 0.1 * rs.standard_normal((1, 784))
    moved = htsr.extended_metrics(offsets, seed=0, k_shuffles=1)
    assert moved["alpha_dcentred"] == pytest.approx(ext["alpha_dcentred"], rel=1e-9)
    assert moved["alpha_centred"] != pytest.approx(ext["alpha_centred"], rel=1e-3)


def test_extended_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        htsr.extended_metrics(np.full((3, 4), np.nan), seed=0)
    with pytest.raises(ValueError):
        htsr.extended_metrics(gaussian((20, 30), 0), seed=0, k_shuffles=0)
    with pytest.raises(TypeError):
        htsr.extended_metrics(gaussian((20, 30), 0), seed=1.5)
