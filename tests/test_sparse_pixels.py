"""Skipping FC1's zero input pixels, and the step's torch parity: every column set, untouched rows exact, reshuffle, old run directories."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokjax import ckpt

from grokjax.train import engine
from grokjax.train.config import LEGACY_FIELDS, TrainConfig
from grokjax.train.runner import run
from helpers import SMALL, build_once

N_STEPS = 300


@pytest.fixture(scope="module")
def setup(mnist):
    cfg = TrainConfig(out="unused")
    data = engine.make_data(cfg, mnist)
    perm = engine.batch_perm(cfg)
    x = np.asarray(data.x_train)
    never = np.flatnonzero(~np.any(x != 0, axis=0))  # zero in all 1,000 training images
    return data, perm, never


@pytest.fixture(scope="module")
def torch_runs(setup, torch_one_thread, tmp_path_factory):
    """The torch reference after N_STEPS at a weight decay, computed once (shared by both column sets and,
    under pytest-xdist, by every worker: helpers.build_once; float64 arrays saved and read back exactly):
    (its params, its evaluation record at N_STEPS)."""
    from grokjax.bench.torch_reference import train_reference

    data, perm, _ = setup
    p0 = jax.tree.map(np.asarray, engine.init_state(TrainConfig(out="unused")).params)

    def get(wd):
        def build(d):
            ref, recs = train_reference(p0, np.asarray(data.x_train), np.asarray(data.y_train), perm, N_STEPS, wd=wd,
                                        eval_at=[N_STEPS], x_test=np.asarray(data.x_test), y_test=np.asarray(data.y_test))
            np.savez(d / "params.npz", **{f"{layer}/{k}": v for layer, leaves in ref.items() for k, v in leaves.items()})
            (d / "record.json").write_text(json.dumps(recs[0]))

        d = build_once(tmp_path_factory, f"torch-mlp-wd{wd}", build)
        with np.load(d / "params.npz") as f:
            ref = {}
            for key in f.files:
                layer, k = key.split("/")
                ref.setdefault(layer, {})[k] = f[key]
        return ref, json.loads((d / "record.json").read_text())

    return get


def _train(setup, n, **kw):
    data, perm, _ = setup
    cfg = TrainConfig(out="unused", chunk=2, **kw)  # n even: one chunk program per variant (see helpers.SMALL)
    return engine.run_steps(cfg, engine.init_state(cfg), jnp.asarray(perm), data, n)


def test_column_sets(setup):
    data, perm, never = setup
    x = np.asarray(data.x_train)
    sub = engine.pixel_columns(TrainConfig(out="u", skip_zero_pixels="subset"), perm, x)
    assert sub.ndim == 1 and len(sub) + len(never) == 784 and not set(sub) & set(never)
    per = engine.pixel_columns(TrainConfig(out="u", skip_zero_pixels="batch"), perm, x)
    assert per.shape[0] == 5 and per.shape[1] < len(sub)
    for b in range(5):
        xb = x[perm[200 * b:200 * (b + 1)]]
        nonzero = np.flatnonzero(np.any(xb != 0, axis=0))
        assert set(per[b]) - set(nonzero) == (set() if len(nonzero) == per.shape[1] else {per[b][-1]})
        assert set(nonzero) <= set(per[b]) and not xb[:, per[b][len(nonzero):]].any()  # padding: zero columns
    per_cfg = TrainConfig(out="u", skip_zero_pixels="batch")
    stacked = engine.pixel_columns(per_cfg, np.stack([perm, engine.batch_perm(per_cfg, 5)]), x)
    assert stacked.ndim == 3 and stacked.shape[:2] == (2, 5) and stacked.shape[2] >= per.shape[1]
    assert engine.pixel_columns(TrainConfig(out="u", skip_zero_pixels="off"), perm, x) is None
    assert engine.pixel_columns(TrainConfig(out="u", reshuffle=True), perm, x).tolist() == sub.tolist()


@pytest.mark.parametrize("grad", ["autodiff", "pretransposed"])
@pytest.mark.parametrize("mode", ["batch", "subset"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_parity_with_torch_reference(setup, torch_runs, mode, wd, grad):
    """N_STEPS float64 updates from the same init, against the authors' loop in torch, for both
    column sets and both FC1 weight gradients (the default step is subset + pretransposed): the
    params to 1e-10 relative, having moved far more than that; the evaluation (the default,
    subset) to the same counts of correct answers and losses to 1e-9."""
    data = setup[0]
    p0 = jax.tree.map(np.asarray, engine.init_state(TrainConfig(out="unused")).params)
    state = _train(setup, N_STEPS, wd=wd, skip_zero_pixels=mode, fc1_weight_grad=grad)
    (got, (ref, rec)) = jax.tree.map(np.asarray, state.params), torch_runs(wd)
    scale = max(np.abs(a).max() for a in jax.tree.leaves(ref))
    diff = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    assert 0 < diff / scale <= 1e-10, f"JAX ({mode}, {grad}) vs torch relative difference {diff / scale:.3e}"
    # Both trained: the parameters moved from p0 by far more than the two disagree, so the
    # agreement is that of two trajectories, not of two copies of the start.
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p0)))
    assert moved / scale > 0.05 and diff <= 1e-8 * moved, (moved / scale, diff)
    if mode == "subset":
        m = {k: float(v) for k, v in engine.make_evaluate()(state.params, data).items()}
        assert m["train/acc"] == rec["train/acc"] and m["test/acc"] == rec["test/acc"]
        assert m["train/loss"] == pytest.approx(rec["train/loss"], rel=1e-9)
        assert m["test/loss"] == pytest.approx(rec["test/loss"], rel=1e-9)


@pytest.mark.parametrize("grad", ["autodiff", "pretransposed"])
@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_never_touched_rows_are_exact(setup, mode, grad):
    _, _, never = setup
    p0 = np.asarray(engine.init_state(TrainConfig(out="unused")).params["fc1"]["kernel"])
    s0 = _train(setup, 100, skip_zero_pixels=mode, fc1_weight_grad=grad)
    w0 = np.asarray(s0.params["fc1"]["kernel"])
    np.testing.assert_array_equal(w0[never], p0[never])  # WD 0: bitwise unchanged
    assert not np.array_equal(w0, p0)
    mu, nu = s0.opt_state[0].mu["fc1"]["kernel"], s0.opt_state[0].nu["fc1"]["kernel"]
    assert not np.asarray(mu)[never].any() and not np.asarray(nu)[never].any()
    dense = np.asarray(_train(setup, 100, wd=0.01, skip_zero_pixels="off").params["fc1"]["kernel"])
    sparse = np.asarray(_train(setup, 100, wd=0.01, skip_zero_pixels=mode, fc1_weight_grad=grad)
                        .params["fc1"]["kernel"])
    np.testing.assert_array_equal(sparse[never], dense[never])  # WD > 0: decay only, bitwise as dense
    assert not np.array_equal(sparse[never], p0[never])
    assert not np.array_equal(sparse, dense)  # the other rows differ by summation order


def test_chunk_equals_plain_step_loop_with_batch_columns(setup):
    data, perm_np, _ = setup
    cfg = TrainConfig(out="unused", chunk=8)
    perm = jnp.asarray(perm_np)
    cols = jnp.asarray(engine.pixel_columns(cfg, perm_np, data.x_train))
    step = jax.jit(engine.make_step(cfg))
    s1 = engine.init_state(cfg)
    for _ in range(23):
        s1, _ = step(s1, perm, data, cols)
    s2 = engine.run_steps(cfg, engine.init_state(cfg), perm, data, 23)
    assert int(s2.step) == 23
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("grad", ["autodiff", "pretransposed"])
def test_subset_sweep_narrows_every_replica(setup, grad):
    """The subset set narrows FC1 for a whole chunk; vmapped with a weight decay per replica, each
    replica is its own run, and the rows outside the set only decay, bitwise as in a dense run."""
    data, perm_np, never = setup
    cfg = TrainConfig(out="unused", chunk=2, skip_zero_pixels="subset", fc1_weight_grad=grad)
    perms = np.stack([perm_np, engine.batch_perm(cfg, 1)])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), engine.init_state(cfg, 0), engine.init_state(cfg, 1))
    chunk = engine.make_train_chunk(cfg, 2, wds=[0.0, 0.01])
    got = engine.run_steps(cfg, stacked, jnp.asarray(perms), data, 40, chunk_fn=chunk)
    for r, (seed, wd) in enumerate([(0, 0.0), (1, 0.01)]):
        one = dataclasses.replace(cfg, wd=wd)
        ref = engine.run_steps(one, engine.init_state(one, seed), jnp.asarray(perms[r]), data, 40)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(b)[r], np.asarray(a), rtol=1e-12, atol=1e-13)
        off = dataclasses.replace(one, skip_zero_pixels="off")
        dense = engine.run_steps(off, engine.init_state(off, seed), jnp.asarray(perms[r]), data, 40)
        w, w_dense = np.asarray(got.params["fc1"]["kernel"])[r], np.asarray(dense.params["fc1"]["kernel"])
        np.testing.assert_array_equal(w[never], w_dense[never])
        p0 = np.asarray(engine.init_state(cfg, seed).params["fc1"]["kernel"])
        assert np.array_equal(w[never], p0[never]) == (wd == 0)
    assert int(got.step[0]) == int(got.step[1]) == 40


@pytest.mark.parametrize("grad", ["autodiff", "pretransposed"])
def test_reshuffle_uses_the_subset_columns(setup, grad):
    _, _, never = setup
    dense = _train(setup, 30, reshuffle=True, skip_zero_pixels="off", fc1_weight_grad="autodiff")
    for mode in ("batch", "subset"):
        got = _train(setup, 30, reshuffle=True, skip_zero_pixels=mode, fc1_weight_grad=grad)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(dense.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13)
        p0 = np.asarray(engine.init_state(TrainConfig(out="unused")).params["fc1"]["kernel"])
        np.testing.assert_array_equal(np.asarray(got.params["fc1"]["kernel"])[never], p0[never])


def test_wrong_columns_are_refused(setup):
    data, perm, _ = setup
    cfg = TrainConfig(out="unused", chunk=8)
    chunk = engine.make_train_chunk(cfg)
    with pytest.raises(ValueError, match="needs the pixel columns"):
        chunk(engine.init_state(cfg), jnp.asarray(perm), data, 2)
    off = TrainConfig(out="unused", skip_zero_pixels="off")
    cols = jnp.asarray(engine.pixel_columns(cfg, perm, data.x_train))
    with pytest.raises(ValueError, match="takes no pixel columns"):
        engine.make_train_chunk(off)(engine.init_state(off), jnp.asarray(perm), data, 2, cols)


def _crash_at(step):
    """An `on_chunk` callback: the run crashes when a chunk up to `step` or later is dispatched."""
    def on_chunk(t):
        if t >= step:
            raise RuntimeError(f"simulated crash at step {t}")
    return on_chunk


def test_old_run_directory_resumes_dense(tmp_path, mnist, capsys, small_run):
    old_fields = dict(LEGACY_FIELDS)  # dense, autodiff's FC1 gradient
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **old_fields, **SMALL), mnist=mnist)[0]
    d = tmp_path / "old"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(TrainConfig(out=str(d), **old_fields, **SMALL), mnist=mnist, on_chunk=_crash_at(8))
    f = d / "config.json"
    payload = json.loads(f.read_text())
    for name in old_fields:  # as written before the fields existed
        del payload["config"][name]
    f.write_text(json.dumps(payload))
    capsys.readouterr()
    run(TrainConfig(out=str(d), **SMALL), mnist=mnist)  # the defaults on an old directory
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "existed: it resumes with" in line]
    assert len(notes) == 1 and "skip_zero_pixels=off" in notes[0]
    for name, value in old_fields.items():  # each default that differs from how the run started
        assert (f"{name}={value}" in notes[0]) == (getattr(TrainConfig(out="u"), name) != value)
    assert not set(old_fields) & set(json.loads(f.read_text())["config"])
    for layer, leaves in ckpt.load_params(d, 120).items():
        for k, a in leaves.items():
            np.testing.assert_array_equal(a, ckpt.load_params(ref, 120)[layer][k])  # dense, bitwise
    new = small_run  # helpers.SMALL at the defaults: skip_zero_pixels=subset, fc1_weight_grad=pretransposed
    new_cfg = json.loads((new / "config.json").read_text())["config"]
    assert (new_cfg["skip_zero_pixels"], new_cfg["fc1_weight_grad"]) == ("subset", "pretransposed")
    assert not np.array_equal(ckpt.load_params(new, 120)["fc1"]["kernel"], ckpt.load_params(ref, 120)["fc1"]["kernel"])
