"""Modular addition: the pairs and their split, the config's checks, the transformer and its fast path."""

import dataclasses
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokjax.modadd import data, model, step
from grokjax.modadd.config import ModAddConfig

CFG = ModAddConfig()


def test_all_pairs_tokens_and_labels():
    tokens, labels = data.all_pairs(7)
    assert tokens.shape == (49, 3) and tokens.dtype == np.int32 and labels.dtype == np.int32
    a, b = 3, 5
    i = a * 7 + b
    assert tokens[i].tolist() == [3, 5, 7] and labels[i] == 1
    np.testing.assert_array_equal(labels, (tokens[:, 0] + tokens[:, 1]) % 7)
    assert (tokens[:, 2] == 7).all()


def test_split_is_nanda_gen_train_test():
    # Their code: pairs (i, j, p) in this order, random.seed(seed); random.shuffle(pairs); first int(frac * p^2).
    p, frac, seed = 113, 0.3, 0
    pairs = [(i, j, p) for i in range(p) for j in range(p)]
    random.seed(seed)
    random.shuffle(pairs)
    div = int(frac * len(pairs))
    split = data.make_split(ModAddConfig(p=p, frac_train=frac, split_seed=seed))
    assert split.train_tokens.tolist() == [list(t) for t in pairs[:div]]
    assert split.test_tokens.tolist() == [list(t) for t in pairs[div:]]
    assert len(split.train_labels) == CFG.n_train == 3830 and len(split.test_labels) == 113**2 - 3830
    np.testing.assert_array_equal(split.train_labels, split.train_tokens[:, :2].sum(1) % p)


def test_split_seed_and_fraction_change_the_split():
    a = data.make_split(CFG)
    b = data.make_split(dataclasses.replace(CFG, split_seed=1))
    c = data.make_split(dataclasses.replace(CFG, frac_train=0.5))
    assert not np.array_equal(a.train_tokens, b.train_tokens)
    assert len(c.train_tokens) == int(0.5 * 113**2)
    keys = {tuple(t) for t in a.train_tokens} | {tuple(t) for t in a.test_tokens}
    assert len(keys) == 113**2  # disjoint and complete


@pytest.mark.parametrize("kwargs, msg", [
    (dict(p=1), "p must be an integer >= 2"),
    (dict(frac_train=0.0), "frac_train must lie strictly between 0 and 1"),
    (dict(frac_train=1.0), "frac_train must lie strictly between 0 and 1"),
    (dict(p=3, frac_train=0.05), "leaves 0 of 9 pairs"),
    (dict(dtype="float16"), "dtype must be float64 or float32"),
    (dict(wd=-1.0), "wd must be a finite number >= 0"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(warmup=-1), "warmup must be a non-negative integer"),
    (dict(n_heads=0), "n_heads must be an integer >= 1"),
    (dict(b2=1.0), "b1 and b2 must lie in"),
])
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ModAddConfig(**kwargs)


def test_parameter_tree_shapes_and_nanda_init():
    params = model.init_params(jax.random.PRNGKey(0), CFG)
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {"embed": (114, 128), "pos_embed": (3, 128), "W_Q": (128, 4, 32), "W_K": (128, 4, 32),
                      "W_V": (128, 4, 32), "W_O": (4, 32, 128), "fc1": {"kernel": (128, 512), "bias": (512,)},
                      "fc2": {"kernel": (512, 128), "bias": (128,)}, "unembed": (128, 114)}
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
    # N(0, 1/d_model) everywhere except W_U ~ N(0, 1/vocab); MLP biases zero. With n >= 14k draws the
    # sample std is within 2% of the true one (its relative s.e. is ~1/sqrt(2n) < 0.6%).
    for name, leaf in [("embed", params["embed"]), ("W_Q", params["W_Q"]), ("W_O", params["W_O"]),
                       ("fc1", params["fc1"]["kernel"]), ("fc2", params["fc2"]["kernel"])]:
        assert abs(float(jnp.std(leaf)) * math.sqrt(128) - 1) < 0.02, name
        assert abs(float(jnp.mean(leaf))) < 0.01, name
    assert abs(float(jnp.std(params["unembed"])) * math.sqrt(114) - 1) < 0.02
    assert not params["fc1"]["bias"].any() and not params["fc2"]["bias"].any()
    # Different tensors draw different numbers (per-name streams), and another seed another init.
    assert not np.allclose(params["W_Q"], params["W_K"])
    other = model.init_params(jax.random.PRNGKey(1), CFG)
    assert not np.allclose(params["embed"], other["embed"])


def test_float32_init_is_float64_rounded():
    p64 = model.init_params(jax.random.PRNGKey(3), CFG)
    p32 = model.init_params(jax.random.PRNGKey(3), dataclasses.replace(CFG, dtype="float32"))
    for a, b in zip(jax.tree.leaves(p64), jax.tree.leaves(p32)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b))


def _peaky(params, scale):
    """Weights scaled up so that attention is far from uniform and many ReLUs switch."""
    return jax.tree.map(lambda a: a * scale, params)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_fast_path_equals_full_forward_on_every_pair(scale):
    params = _peaky(model.init_params(jax.random.PRNGKey(5), CFG), scale)
    tokens = jnp.asarray(data.all_pairs(113)[0])
    # jitted, as the trainer runs them (op by op, each forward would compile dozens of small programs)
    full = np.asarray(jax.jit(model.forward)(params, tokens))
    last = np.asarray(jax.jit(model.forward_last)(params, tokens))
    assert full.shape == (113**2, 3, 114) and last.shape == (113**2, 114)
    for fast in (last, np.asarray(jax.jit(model.forward_last_tables)(params, tokens))):
        err = np.abs(full[:, -1] - fast).max() / np.abs(full[:, -1]).max()
        assert err <= 1e-12, err
    # The check has teeth: the first position's logits are not the last's.
    assert np.abs(full[:, 0] - last).max() > 0.1 * np.abs(last).max()


def test_fast_path_gradient_equals_full_forward_gradient():
    params = _peaky(model.init_params(jax.random.PRNGKey(6), CFG), 2.0)
    split = data.make_split(CFG)
    tokens, labels = jnp.asarray(split.train_tokens), jnp.asarray(split.train_labels)
    grad = jax.jit(jax.grad(step.loss_fn), static_argnums=3)  # jitted, as in the trainer's step
    g_full = grad(params, tokens, labels, "full")
    for fwd in ("last", "tables"):
        g_fast = grad(params, tokens, labels, fwd)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_fast)):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max(), (fwd, jax.tree_util.keystr(path))
            assert np.abs(a).max() > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient


def test_attention_is_causal():
    params = model.init_params(jax.random.PRNGKey(7), CFG)
    a = jnp.asarray([[1, 2, 113]])
    b = jnp.asarray([[1, 2, 50]])  # a different last token
    c = jnp.asarray([[1, 9, 113]])  # a different middle token
    fa, fb, fc = (np.asarray(model.forward(params, t))[0] for t in (a, b, c))
    np.testing.assert_array_equal(fa[:2], fb[:2])  # earlier positions never see the last token
    np.testing.assert_array_equal(fa[0], fc[0])
    assert not np.allclose(fa[2], fb[2]) and not np.allclose(fa[2], fc[2])


@pytest.mark.parametrize("tokens, msg", [
    (jnp.zeros((4,), jnp.int32), "tokens must be an integer array"),
    (jnp.zeros((4, 5), jnp.int32), "1 <= n <= 3"),
    (jnp.zeros((4, 3), jnp.float64), "tokens must be an integer array"),
])
def test_bad_tokens_are_refused(tokens, msg):
    params = model.init_params(jax.random.PRNGKey(0), CFG)
    for fn in (model.forward, model.forward_last, model.forward_last_tables):
        with pytest.raises(ValueError, match=msg):
            fn(params, tokens)
