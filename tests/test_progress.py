"""Progress measures (grokjax.analysis.progress): hand-computed values on tiny matrices and the
init-scale sanity values of docs/protocol.md §Sanity values."""

import math

import numpy as np
import pytest

from grokjax.analysis import progress
from grokjax.analysis.progress import ProgressOptions
from helpers import torch_init as _torch_init


def _tiny_params():
    """A 2-3-3-2 network whose activations are easy to follow by hand."""
    return {
        "fc1": {"kernel": np.array([[1.0, -1.0, 0.5], [2.0, 0.0, -0.5]]), "bias": np.array([0.0, 0.5, 0.0])},
        "fc2": {"kernel": np.eye(3), "bias": np.zeros(3)},
        "fc3": {"kernel": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]), "bias": np.array([0.0, 0.1])},
    }


def test_sparsity_by_hand():
    a = np.array([[0.0, 0.5, 1.0, 2.0]])
    hard, smooth = progress.activation_sparsity(a, tau=1.0, beta=0.3)
    assert hard == 0.5  # 0 and 0.5 are below tau; 1.0 is not (strict <)
    expected = np.mean([1 / (1 + math.exp(-(1.0 - v) / 0.3)) for v in a.ravel()])
    assert smooth == pytest.approx(expected, rel=1e-12)


def test_sparsity_through_fc1():
    x = np.array([[1.0, 1.0], [0.0, 1.0]])
    h = progress.hidden(_tiny_params(), x)
    # x @ W1 + b1 = [[3, -0.5, 0], [2, 0.5, -0.5]] -> relu
    np.testing.assert_allclose(h, [[3.0, 0.0, 0.0], [2.0, 0.5, 0.0]])
    hard, _ = progress.activation_sparsity(h)
    assert hard == pytest.approx(4 / 6)


def test_entropy_by_hand():
    W = np.array([[0.5, -0.25], [0.0, 1.0]])
    expected = -(0.5 * math.log(0.5 + 1e-8) + 0.25 * math.log(0.25 + 1e-8) + 1.0 * math.log(1.0 + 1e-8))
    assert progress.weight_entropy(W) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.log(2), rel=1e-6)  # 0.5 ln2 + 0.25 ln4 = ln 2


def test_kl_by_hand():
    p, q = np.array([[0.0, 0.0]]), np.array([[0.0, math.log(3.0)]])
    # P = (1/2, 1/2), Q = (1/4, 3/4); the +1e-8 smoothing moves the result by ~1e-8.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert progress.kl_rows(p, q)[0] == pytest.approx(expected, abs=1e-7)
    assert progress.kl_rows(p, p)[0] == 0.0


def test_circuit_complexity_zero_without_masking():
    params, x = _tiny_params(), np.random.default_rng(0).normal(size=(7, 2))
    lc = progress.circuit_complexity(params, x, progress.mask_rng(0, 5), drop=0.0, rescale=True)
    assert lc == 0.0
    opts = ProgressOptions(drop=0.0)
    row = progress.compute_progress(params, x_fixed=x, x_all=None, options=opts, seed=0, step=5)
    assert row["progress/circuit"] == 0.0


def test_masks_inverted_dropout_and_paper_text():
    rng = np.random.default_rng(1)
    params = {k: {"kernel": rng.normal(size=s), "bias": rng.normal(size=s[1])}
              for k, s in {"fc1": (784, 200), "fc2": (200, 200), "fc3": (200, 10)}.items()}
    pert = progress.perturb(params, progress.mask_rng(0, 0), 0.5, rescale=True)
    W, Wp = params["fc1"]["kernel"], pert["fc1"]["kernel"]
    kept = Wp != 0
    assert abs(kept.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(Wp[kept], 2 * W[kept])  # survivors x 1/(1-p)
    np.testing.assert_array_equal(pert["fc1"]["bias"], params["fc1"]["bias"])  # biases kept
    pert = progress.perturb(params, progress.mask_rng(0, 0), 0.1, rescale=False)
    Wp = pert["fc2"]["kernel"]
    assert abs((Wp == 0).mean() - 0.1) < 0.01
    np.testing.assert_array_equal(Wp[Wp != 0], params["fc2"]["kernel"][Wp != 0])  # no rescale


def test_options_variants():
    a, p = ProgressOptions(), ProgressOptions(paper_text=True)
    assert (a.lc_drop, a.lc_rescale, a.lc_reduce) == (0.5, True, "mean")
    assert (p.lc_drop, p.lc_rescale, p.lc_reduce) == (0.1, False, "sum")
    with pytest.raises(ValueError):
        ProgressOptions(drop=1.0)
    with pytest.raises(ValueError):
        ProgressOptions(n_masks=0)


def test_masks_reproducible_and_keyed_by_step():
    params, x = _torch_init(np.random.default_rng(3)), np.random.default_rng(4).uniform(size=(20, 784))
    f = lambda step: progress.circuit_complexity(params, x, progress.mask_rng(7, step), drop=0.5, rescale=True)  # noqa: E731
    assert f(100) == f(100)
    assert f(100) != f(101)
    # 'sum' over n images is n times 'mean' for the same mask.
    s = progress.circuit_complexity(params, x, progress.mask_rng(7, 1), drop=0.1, rescale=False, reduce="sum")
    m = progress.circuit_complexity(params, x, progress.mask_rng(7, 1), drop=0.1, rescale=False, reduce="mean")
    assert s == pytest.approx(20 * m, rel=1e-12)


def test_fixed_subset():
    a = progress.fixed_subset(1000, 200, seed=0)
    assert a.dtype == np.int64 and len(np.unique(a)) == 200 and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, progress.fixed_subset(1000, 200, seed=0))
    assert not np.array_equal(a, progress.fixed_subset(1000, 200, seed=1))


def test_l2_norms():
    params = _tiny_params()
    sq_w = sum(np.sum(params[k]["kernel"] ** 2) for k in params)
    sq_b = sum(np.sum(params[k]["bias"] ** 2) for k in params)
    assert progress.l2_norms(params) == pytest.approx((math.sqrt(sq_w + sq_b), math.sqrt(sq_w)))


def test_initial_entropy_matches_closed_form():
    # docs/protocol.md §Sanity values: 156,800 (b/4 - (b/2) ln b) with b = 8/28 -> 39,262; 40 seeded draws gave 39,181-39,332.
    b = 8 / 28
    closed = 156_800 * (b / 4 - (b / 2) * math.log(b))
    assert closed == pytest.approx(39_262, abs=1)
    for seed in range(3):
        W = np.random.default_rng(seed).uniform(-b, b, (784, 200))
        assert abs(progress.weight_entropy(W) - 39_262) < 200


def test_initial_values_on_mnist():
    from grokjax.data import DataError, load_mnist

    try:
        mnist = load_mnist(sources=("cache",), verbose=False)
    except DataError:
        pytest.skip("MNIST is not cached (tests never download it)")
    inputs = progress.load_inputs(100, 0, 0, 200, mnist=mnist)
    assert inputs["x_fixed"].shape == (200, 784) and inputs["x_all"].shape == (1000, 784)
    assert inputs["x_all"].dtype == np.float64 and inputs["x_all"].max() <= 1.0
    for seed in range(3):
        params = _torch_init(np.random.default_rng(seed))
        row = progress.compute_progress(params, x_fixed=inputs["x_fixed"], x_all=inputs["x_all"],
                                        options=ProgressOptions(), seed=seed, step=0)
        assert 0.70 <= row["progress/sparsity"] <= 0.78, row
        assert row["progress/sparsity_smooth"] < row["progress/sparsity"]
        assert 5 < row["progress/circuit"] < 25  # §11: ~9-15 nats at init scale 8
        assert abs(row["params/l2"] - 93.67) < 1.0
        paper = progress.compute_progress(params, x_fixed=inputs["x_fixed"], x_all=inputs["x_all"],
                                          options=ProgressOptions(paper_text=True), seed=seed, step=0)
        assert paper["progress/circuit"] > 10 * row["progress/circuit"]  # a sum over 1,000 images
        # Eq. 8: the paper-text sparsity is over all 1,000 training images, not the 200.
        hard, _ = progress.activation_sparsity(progress.hidden(params, inputs["x_all"]))
        assert paper["progress/sparsity"] == hard != row["progress/sparsity"]
