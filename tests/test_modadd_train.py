"""Modular addition training: warm-up schedule, scan chunks, sweeps, float32, parity with the torch reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokjax.modadd import data, step
from grokjax.modadd.config import ModAddConfig

CFG = ModAddConfig()
SMALL = ModAddConfig(p=31, d_model=32, n_heads=2, d_head=16, d_mlp=64)  # 288 training pairs


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def rel_diff(got: dict, ref: dict) -> float:
    """max |got - ref| over every parameter, relative to the largest |ref| entry."""
    a, b = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    return max(np.abs(x - y).max() for x, y in zip(a, b)) / max(np.abs(y).max() for y in b)


def test_learning_rate_schedule_is_nanda_lambdalr():
    sched = step.lr_schedule(CFG)
    got = [float(sched(t)) for t in range(14)]
    assert got == [1e-3 * min(t / 10, 1) for t in range(14)]
    assert got[0] == 0.0 and got[5] == 1e-3 * 0.5 and got[13] == 1e-3
    assert float(step.lr_schedule(dataclasses.replace(CFG, warmup=0))(0)) == 1e-3
    assert step.lr_schedule(dataclasses.replace(CFG, dtype="float32"))(3).dtype == jnp.float32


def test_first_update_has_lr_zero_and_only_moves_the_moments():
    dev = data.to_device(data.make_split(SMALL))
    s0 = step.init_state(SMALL)
    p0 = _host(s0.params)
    s1, _ = jax.jit(step.make_step(SMALL))(s0, dev)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(_host(s1.params))):
        np.testing.assert_array_equal(a, b)
    assert int(s1.step) == 1 and np.abs(np.asarray(s1.opt_state[0].mu["embed"])).max() > 0
    s2, _ = jax.jit(step.make_step(SMALL))(s1, dev)
    assert rel_diff(_host(s2.params), p0) > 1e-5


@pytest.mark.parametrize("fwd", ["last", "tables", "full"])
def test_scan_chunks_equal_a_plain_loop(fwd):
    dev = data.to_device(data.make_split(SMALL))
    one = jax.jit(step.make_step(SMALL, fwd))
    s1 = step.init_state(SMALL)
    for _ in range(23):
        s1, _ = one(s1, dev)
    s2 = step.run_steps(SMALL, step.init_state(SMALL), dev, 23, chunk=8, fwd=fwd)
    assert int(s2.step) == 23
    # Separate XLA programs: the order of summation may differ in the last bits.
    assert rel_diff(_host(s1.params), _host(s2.params)) <= 1e-13
    assert rel_diff(_host(s1.opt_state), _host(s2.opt_state)) <= 1e-12


def test_replica_sweep_equals_separate_runs():
    dev = data.to_device(data.make_split(SMALL))
    wds = [1.0, 0.1, 0.0]
    seeds = [0, 1, 2]
    states = [step.init_state(SMALL, seed=s) for s in seeds]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    chunk = step.make_train_chunk(SMALL, n_seeds=3, wds=wds)
    stacked, losses = chunk(stacked, dev, 12)
    assert losses.shape == (3,)
    for i, (seed, wd) in enumerate(zip(seeds, wds)):
        cfg = dataclasses.replace(SMALL, wd=wd)
        alone = step.run_steps(cfg, step.init_state(cfg, seed=seed), dev, 12)
        assert rel_diff(_host(jax.tree.map(lambda a: a[i], stacked.params)), _host(alone.params)) <= 1e-12
    with pytest.raises(ValueError, match="one weight decay per replica"):
        step.make_train_chunk(SMALL, n_seeds=2, wds=wds)
    with pytest.raises(ValueError, match="forward must be one of"):
        step.make_train_chunk(SMALL, "middle")


def test_float32_runs_in_float32():
    cfg = dataclasses.replace(SMALL, dtype="float32")
    dev = data.to_device(data.make_split(cfg))
    s = step.run_steps(cfg, step.init_state(cfg), dev, 20, chunk=10)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s.params))
    ref = step.run_steps(SMALL, step.init_state(SMALL), data.to_device(data.make_split(SMALL)), 20, chunk=10)
    d = rel_diff(_host(s.params), _host(ref.params))
    assert 0 < d < 1e-3, d  # float32 rounding, not a different trajectory
    m = step.make_evaluate()(s.params, dev)
    assert np.isfinite(float(m["train/loss"]))


def test_evaluate_metrics_by_hand():
    dev = data.to_device(data.make_split(SMALL))
    params = step.init_state(SMALL).params
    m = {k: float(v) for k, v in step.make_evaluate()(params, dev).items()}
    from grokjax.modadd.model import forward  # noqa: PLC0415

    logits = np.asarray(forward(params, dev.test_tokens))[:, -1]
    labels = np.asarray(dev.test_labels)
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert m["test/loss"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-12)
    assert m["test/acc"] == np.mean(logits.argmax(1) == labels)
    l2 = np.sqrt(sum((np.asarray(a) ** 2).sum() for a in jax.tree.leaves(params)))
    assert m["params/l2"] == pytest.approx(l2, rel=1e-12)


def _torch_run(cfg, p0, split, n, **kwargs):
    from grokjax.bench.torch_modadd import train_reference  # noqa: PLC0415

    args = dict(lr=cfg.lr, wd=cfg.wd, betas=(cfg.b1, cfg.b2), eps=cfg.eps, warmup=cfg.warmup)
    args.update(kwargs)
    return train_reference(p0, split.train_tokens, split.train_labels, n, **args)


# The full-size parity: Nanda et al.'s model and optimizer at their defaults, on a 2.5 % training split
# (319 pairs instead of 3,830). A full-batch update is a mean over the split, so its size changes
# no operation of the model or the step; the 30 % split would only multiply the test's cost by twelve.
PARITY = dataclasses.replace(CFG, frac_train=0.025)


def test_parity_with_torch_reference(torch_one_thread):
    """The full-size model and step (`PARITY`), 200 full-batch float64 updates (warm-up included)
    from the same init.

    JAX trains through its default forward (the per-token-table fast path); the torch reference
    computes only the '=' position (`positions="last"`, 2.3 times cheaper here), which
    `test_small_parity_and_its_teeth` shows equal to Nanda et al.'s every-position forward."""
    split = data.make_split(PARITY)
    dev = data.to_device(split)
    state = step.init_state(PARITY)
    p0 = _host(state.params)
    n = 200
    state = step.run_steps(PARITY, state, dev, n, chunk=100)
    ref, recs = _torch_run(PARITY, p0, split, n, eval_at=[n], test_tokens=split.test_tokens,
                           test_labels=split.test_labels, positions="last")
    got = _host(state.params)
    diff = rel_diff(got, ref)
    print(f"modadd parity after {n} steps: relative difference {diff:.3e}, moved {rel_diff(got, p0):.3f}")
    assert diff <= 1e-10, f"JAX vs torch relative difference {diff:.3e}"
    # Both trained: the parameters moved far more than the two disagree.
    moved = rel_diff(got, p0)
    assert moved > 0.05 and diff <= 1e-8 * moved, (moved, diff)
    m = {k: float(v) for k, v in step.make_evaluate()(state.params, dev).items()}
    for split_name, n_split in (("train", len(split.train_labels)), ("test", len(split.test_labels))):
        k = f"{split_name}/acc"  # the same number of correct answers (the means may round differently)
        assert round(m[k] * n_split) == round(recs[0][k] * n_split), k
    assert m["train/loss"] == pytest.approx(recs[0]["train/loss"], rel=1e-9)
    assert m["test/loss"] == pytest.approx(recs[0]["test/loss"], rel=1e-9)
    assert m["train/loss"] < 0.5 * np.log(114)  # it learned something in 200 steps


@pytest.mark.parametrize("fwd", ["last", "tables", "full"])
def test_small_parity_and_its_teeth(fwd, torch_one_thread):
    """On a small model: parity for every forward against the torch reference computing every position, and
    against its last-position path; the two torch paths agree; a changed weight decay, warm-up or beta2 is
    caught."""
    split = data.make_split(SMALL)
    dev = data.to_device(split)
    state = step.init_state(SMALL)
    p0 = _host(state.params)
    n = 60
    got = _host(step.run_steps(SMALL, state, dev, n, chunk=30, fwd=fwd).params)  # one program: 2 x 30
    ref, _ = _torch_run(SMALL, p0, split, n)
    assert rel_diff(got, ref) <= 1e-10
    if fwd == "last":
        last, _ = _torch_run(SMALL, p0, split, n, positions="last")
        assert rel_diff(got, last) <= 1e-10
        assert 0 < rel_diff(last, ref) <= 1e-12  # other sums, so not bitwise: the same function
        with pytest.raises(ValueError, match="positions must be"):
            _torch_run(SMALL, p0, split, 1, positions="first")
        for change in (dict(wd=0.9), dict(warmup=0), dict(warmup=9), dict(betas=(0.9, 0.99))):
            other, _ = _torch_run(SMALL, p0, split, n, **change)
            assert rel_diff(got, other) > 1e-7, change
