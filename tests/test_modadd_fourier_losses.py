"""Nanda et al.'s restricted and excluded losses (grokjax.analysis.modadd.fourier_losses)."""

import numpy as np
import pytest

from grokjax.analysis import modadd

P = 13


def _pairs():
    a, b = np.divmod(np.arange(P * P), P)
    return a, b, (a + b) % P


def _key_logits(freqs, scale=5.0):
    """Logits built from the key frequencies only: sum_k cos(w_k (a + b - c)), the Fourier
    multiplication algorithm's output, plus a per-output constant."""
    a, b, _ = _pairs()
    c = np.arange(P)
    out = np.zeros((P * P, P + 1))  # one extra output ('='), ignored
    for k in freqs:
        out[:, :P] += scale * np.cos(2 * np.pi * k * (a[:, None] + b[:, None] - c[None, :]) / P)
    out[:, :P] += np.linspace(0, 1, P)[None, :]
    return out


def test_logits_of_the_key_frequencies_alone():
    a, b, labels = _pairs()
    train = np.arange(0, P * P, 3)
    logits = _key_logits([2, 5])
    r = modadd.fourier_losses(logits, labels, train, [2, 5])
    # kept to the key directions (plus the mean), the logits are unchanged
    assert r["restricted_loss"] == pytest.approx(r["full_loss"], abs=1e-10)
    # removed, only the per-output constant is left: every pair sees the same logits
    const = np.linspace(0, 1, P)
    want = float(np.mean(np.log(np.exp(const).sum()) - const[labels[train]]))
    assert r["excluded_loss"] == pytest.approx(want, abs=1e-10)
    assert r["full_loss"] < 0.1 < r["excluded_loss"]


def test_other_frequencies_do_not_count():
    _, _, labels = _pairs()
    logits = _key_logits([3])
    r = modadd.fourier_losses(logits, labels, np.arange(P * P), [4])
    # the logits live on frequency 3: restricting to 4 leaves the constant only, excluding 4 changes nothing
    assert r["excluded_loss"] == pytest.approx(r["train_loss"], abs=1e-10)
    assert r["restricted_loss"] > r["full_loss"] + 1.0


def test_key_frequencies_from_the_embedding():
    rng = np.random.default_rng(0)
    a = np.arange(P)
    embed = np.zeros((P + 1, 8))
    embed[:P, 0] = 3 * np.cos(2 * np.pi * 4 * a / P)
    embed[:P, 1] = 2 * np.sin(2 * np.pi * 6 * a / P)
    embed[:P, 2:] = 0.01 * rng.standard_normal((P, 6))
    assert modadd.key_frequencies(embed, n=2) == [4, 6]


def test_bad_inputs():
    _, _, labels = _pairs()
    with pytest.raises(ValueError, match="all pairs"):
        modadd.fourier_losses(np.zeros((10, 13)), labels, [0], [1])
    with pytest.raises(ValueError, match="key frequencies"):
        modadd.fourier_losses(_key_logits([1]), labels, [0], [P])
