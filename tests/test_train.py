"""Trainer: protocol details, float64, scan chunks (its torch parity: test_sparse_pixels.py, every column set)."""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokjax.train import schedule, engine
from grokjax.train.config import ConfigError, TrainConfig, parse_steps
from grokjax.data import SUBSET_SHA256, select_subset, to_inputs, verify

CFG = TrainConfig(out="unused")


def test_mnist_verified_and_subset_hash(mnist):
    assert verify(mnist) == []
    idx = select_subset(mnist["y_train"], 100, 0)
    assert hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest() == SUBSET_SHA256
    assert list(idx[:5]) == [13830, 52831, 48180, 18563, 7451]
    labels = mnist["y_train"][idx]
    assert (labels == np.repeat(np.arange(10), 100)).all()  # class-block order
    other = select_subset(mnist["y_train"], 100, 1)
    assert not np.array_equal(other, idx)


def test_inputs_are_pixel_over_255_row_major(mnist):
    x = to_inputs(mnist["x_test"][:2])
    assert x.dtype == np.float64 and x.shape == (2, 784)
    assert x[1, 28 * 5 + 7] == mnist["x_test"][1, 5, 7] / 255.0


def test_init_bounds_and_scale():
    params = engine.init_state(CFG).params
    for name, fan_in in (("fc1", 784), ("fc2", 200), ("fc3", 200)):
        bound = 8.0 / np.sqrt(fan_in)
        for leaf in params[name].values():
            a = np.asarray(leaf)
            assert np.abs(a).max() <= bound
            if a.size >= 200:  # uniform over the whole interval, centred
                assert np.abs(a).max() > 0.95 * bound
                assert abs(a.mean()) < 0.2 * bound
    assert params["fc1"]["kernel"].shape == (784, 200)
    l2 = np.sqrt(sum(float(jnp.sum(a ** 2)) for a in jax.tree.leaves(params)))
    assert 92.5 < l2 < 95.0  # expected 93.67 (protocol sanity values)


def test_every_param_and_optimizer_leaf_is_float64():
    state = engine.init_state(CFG)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    floats = [a for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)]
    others = [a for a in leaves if not jnp.issubdtype(a.dtype, jnp.floating)]
    assert len(floats) == 18 and all(a.dtype == jnp.float64 for a in floats)  # params, mu, nu
    # The only non-float leaf is Adam's integer step count.
    assert len(others) == 1 and jnp.issubdtype(others[0].dtype, jnp.integer) and others[0].shape == ()


def test_loss_is_mean_over_batch_and_classes():
    params = engine.init_state(CFG).params
    rng = np.random.default_rng(0)
    x = rng.random((7, 784))
    y = np.eye(10)[rng.integers(0, 10, 7)]
    from grokjax.train.model import forward

    out = np.asarray(forward(params, jnp.asarray(x)))
    assert float(engine.mse_loss(params, x, y)) == pytest.approx(((out - y) ** 2).sum() / 70, rel=1e-14)


def test_authors_schedule_has_191_points():
    for n, last, freq in ((10**7, 9_933_383, 66_667), (10**5, 99_383, 667)):
        s = schedule.authors_log_steps(n)
        assert len(s) == 191 and s[-1] == last
        assert set(range(30)) <= set(s) and 140 in s and 145 not in s and freq in s
    e = schedule.eval_steps(10**7, 20)
    assert e[-1] == 10**7 and set(schedule.authors_log_steps(10**7)) <= set(e)
    gaps = np.diff(np.log10(e[e > 1000]))
    assert gaps.max() < 0.06  # dense on a log axis: about 20 points a decade


def test_chunk_lengths_bounded():
    seen = set()
    for n in range(0, 5000, 7):
        parts = schedule.chunk_lengths(n, 256)
        assert sum(parts) == n
        seen |= set(parts)
    assert seen <= {256, 128, 64, 32, 16, 8, 4, 2, 1}


def test_parse_steps():
    assert parse_steps("1e7") == 10_000_000 and parse_steps("100_000") == 100_000
    for bad in ("1.5", "abc", "1e-3", "nan"):
        with pytest.raises(ConfigError):
            parse_steps(bad)
    with pytest.raises(ConfigError):
        TrainConfig(steps=-5)


@pytest.fixture(scope="module")
def setup(mnist):
    data = engine.make_data(CFG, mnist)
    perm = engine.batch_perm(CFG)
    return data, perm


def test_batch_order_is_the_authors_permutation(setup):
    _, perm = setup
    assert sorted(perm) == list(range(1000))
    np.testing.assert_array_equal(perm, np.random.RandomState(0).permutation(1000))
    # numpy's legacy RandomState(0).permutation(1000), written out: batch 0 starts 993, 859, ...
    assert list(perm[:5]) == [993, 859, 298, 553, 672] and list(perm[200:203]) == [687, 500, 332]
    assert list(perm[995:]) == [835, 192, 629, 559, 684]


def test_step_t_trains_on_block_t_mod_5(setup):
    """Both step paths (`make_step`, the scan chunk) train step t on block t mod 5 of the order."""
    data, _ = setup
    # A hand-made order: block b (positions 200b .. 200b+199) holds the rows r with r % 5 == b.
    perm = np.concatenate([np.arange(b, 1000, 5) for b in range(5)])
    assert list(perm[:3]) == [0, 5, 10] and list(perm[200:203]) == [1, 6, 11] and list(perm[-2:]) == [994, 999]
    state0 = engine.init_state(CFG)
    x, y, eye = np.asarray(data.x_train), np.asarray(data.y_train), np.eye(10)

    def loss_of_rows(residue):  # the batch loss of the rows r with r % 5 == residue, at the initial params
        rows = [r for r in range(1000) if r % 5 == residue]
        return float(engine.mse_loss(state0.params, x[rows], eye[y[rows]]))

    want = [loss_of_rows(b) for b in range(5)]
    assert min(abs(a - b) for i, a in enumerate(want) for b in want[i + 1:]) > 1e-6 * max(want)  # told apart
    cols = jnp.asarray(engine.pixel_columns(CFG, perm, data.x_train))
    step, chunk = jax.jit(engine.make_step(CFG)), engine.make_train_chunk(CFG)
    for t, block in ((0, 0), (1, 1), (4, 4), (5, 0), (7, 2), (13, 3), (999_999, 4), (10**7 - 3, 2)):
        s = state0._replace(step=jnp.asarray(t, jnp.int64))  # the loss returned is that of step t's batch
        _, by_step = step(s, jnp.asarray(perm), data, cols)
        _, by_chunk = chunk(jax.tree.map(jnp.array, s), jnp.asarray(perm), data, 1, cols)
        assert float(by_step) == pytest.approx(want[block], rel=1e-12), t
        assert float(by_chunk) == pytest.approx(want[block], rel=1e-12), t


@pytest.mark.parametrize("mode,grad", [("off", "autodiff"), ("batch", "autodiff"), ("subset", "autodiff"),
                                       ("off", "pretransposed"), ("subset", "pretransposed")])
def test_scan_chunks_equal_plain_step_loop(setup, mode, grad):
    data, perm_np = setup
    perm = jnp.asarray(perm_np)
    cfg = TrainConfig(out="unused", skip_zero_pixels=mode, fc1_weight_grad=grad)
    step = jax.jit(engine.make_step(cfg))
    cols = engine.pixel_columns(cfg, perm_np, data.x_train)
    cols = None if cols is None else jnp.asarray(cols)
    s1 = engine.init_state(cfg)
    for _ in range(23):
        s1, _ = step(s1, perm, data, cols)
    s2 = engine.run_steps(dataclasses.replace(cfg, chunk=8), engine.init_state(cfg), perm, data, 23)
    assert int(s2.step) == 23
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        if mode == "off" and grad == "autodiff":  # the same XLA products in both programs: bit for bit
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:  # FC1's narrowed or pretransposed products may be compiled differently in the two programs
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-15)


def test_reshuffle_changes_batches_but_keeps_float64(setup):
    data, perm = setup
    cfg = TrainConfig(out="unused", reshuffle=True, chunk=2)
    a = engine.run_steps(cfg, engine.init_state(cfg), jnp.asarray(perm), data, 10)
    b = engine.run_steps(CFG, engine.init_state(CFG), jnp.asarray(perm), data, 10)
    assert a.params["fc1"]["kernel"].dtype == jnp.float64
    assert not np.allclose(np.asarray(a.params["fc1"]["kernel"]), np.asarray(b.params["fc1"]["kernel"]))
