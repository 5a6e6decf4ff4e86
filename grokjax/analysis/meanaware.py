"""Mean-aware HTSR metrics: what a growing mean of W's entries does to alpha and the trap count.

Shuffling keeps the mean of W's entries, so a growing mean is a rank-1 spike of W^rand that
WeightWatcher counts as a correlation trap, and the same spike lowers W's own alpha
(docs/htsr.md, "The mean spike"). `extended_metrics` (one matrix) and `extended_weights` (a
model) separate it from heavy, localised entries: centred trap counts and alphas, the trap
count averaged over K seeded shuffles, and the top trap's overlap with the uniform vector.
Every shuffle and trap count is `grokjax.analysis.htsr.shuffle_fit`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from grokjax.analysis import htsr

# SeedSequence tag of the extra shuffles of `extended_metrics` (shuffles 1..K-1).
_K_SHUFFLE_TAG = 0x4B53


def _uniform_overlaps(A: np.ndarray) -> tuple[float, float]:
    """|<u, 1/sqrt(n)>| for the top left and right singular vectors of A (via the small Gram)."""
    rows, cols = A.shape
    if rows >= cols:
        _, vecs = np.linalg.eigh(A.T @ A)
        v = vecs[:, -1]
        u = A @ v
    else:
        _, vecs = np.linalg.eigh(A @ A.T)
        u = vecs[:, -1]
        v = A.T @ u
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    return float(abs(np.sum(u)) / np.sqrt(rows)), float(abs(np.sum(v)) / np.sqrt(cols))


def k_shuffle_rng(seed: int, k: int) -> np.random.RandomState:
    """The generator of `extended_metrics`'s extra shuffle k >= 1: RandomState(SeedSequence([tag, seed, k]))."""
    return np.random.RandomState(np.random.SeedSequence([_K_SHUFFLE_TAG, int(seed), int(k)]).generate_state(4))


EXTENDED_COLUMNS = ("w_mean", "w_std", "mean_over_std", "traps_raw", "traps_k_mean", "traps_centred",
                    "traps_centred_k_mean", "k_shuffles", "rand_sigma_mp_raw", "rand_sigma_mp_centred",
                    "rand_edge_ratio_raw", "rand_edge_ratio_centred", "trap_uniform_overlap",
                    "trap_uniform_overlap_u", "trap_uniform_overlap_v", "lambda_max_centred", "alpha_centred",
                    "alpha_dcentred")


def extended_metrics(W: Any, *, seed: int, k_shuffles: int = 10, rng: np.random.RandomState | None = None,
                     options: htsr.HTSROptions | None = None, rand_out: dict | None = None) -> dict:
    """Mean-aware HTSR metrics of one weight matrix, as one flat dict of floats.

    A growing mean of W's entries is a rank-1 spike that survives the shuffle (counted as a
    trap) and lowers alpha (docs/htsr.md, "The mean spike"). These columns separate it from
    heavy, localised entries:

    * w_mean, w_std, mean_over_std: of W's entries (std with ddof 0).
    * traps_raw: the WeightWatcher-compatible count of the first shuffle (equal to
      `analyze_matrix`'s `traps` for the same generator state: `rng`, or RandomState(seed)).
    * traps_centred: the count from the same permutation(s) applied to W - mean(W).
    * traps_k_mean, traps_centred_k_mean: the two counts averaged over k_shuffles
      independently seeded draws: draw 0 is the one above, draw k >= 1 uses
      `k_shuffle_rng(seed, k)`. Each draw is a full WW-compatible count (it pools 5
      shuffles when min(shape) < 100, as WW does), so the means are on the same scale as
      `traps`. NaN if any draw's MP fit failed.
    * rand_sigma_mp_raw / _centred: the fitted MP sigma of draw 0 (rescaled units);
      rand_edge_ratio_raw / _centred: the largest rescaled W^rand eigenvalue of draw 0
      over the fitted bulk edge lambda_+ (a trap needs it above 1 + sqrt(TW)/lambda_+).
    * trap_uniform_overlap_u / _v: for the top trap of draw 0 (the largest eigenvalue,
      which is a trap whenever traps_raw > 0), |<u, 1/sqrt(n)>| of its left and right
      singular vectors in W's orientation (1 for the uniform vector, ~1/sqrt(n) for a
      localised one); trap_uniform_overlap is the larger of the two. NaN without a trap.
    * lambda_max_centred, alpha_centred: the top eigenvalue and the power-law alpha
      (`fit_power_law` with `options`' finger fix, clip_xmax by default) of the ESD of
      W - mean(W); alpha_dcentred: the same for the double-centred W (row and column means
      removed, grand mean added back). A failed fit is NaN, as in `fit_power_law`.
    * k_shuffles: K, as a float.

    The MP fit does not remove the mean spike; docs/htsr.md ("The mean spike") says how it
    biases sigma_mp and why the raw count still follows the bulk. The centred columns remove
    the mean before the shuffle, so their fit sees the bulk alone.

    Cost: 2 K SVDs of W^rand and 2 K MP fits (x5 when min(shape) < 100), plus two SVDs
    and power-law fits: about 0.3-0.5 s for a 784 x 200 matrix with K = 10 on one core.

    Args:
        W: 2-D weight matrix, any orientation (the shuffle flattens it in C order).
        seed: int; seeds draw 0 when rng is None and keys draws 1..K-1.
        k_shuffles: K >= 1.
        rng: a legacy RandomState for draw 0 instead of RandomState(seed), advanced as
            `analyze_matrix` advances it (the pooled shuffles, then WW's discarded one), so
            a stream walked through the layers matches `analyze_weights(rng=...)`.
        options: htsr.HTSROptions for the power-law fits and the BLAS thread limit.
        rand_out: if given, receives draw 0's pooled W^rand eigenvalues (ascending, original
            units) under the key "evals": with `rng` walked as `shuffle_spectra` walks it,
            exactly that function's `evals`, without drawing them a second time.

    Returns:
        dict with the `EXTENDED_COLUMNS` keys, floats.
    """
    options = options or htsr.HTSROptions()
    if k_shuffles < 1:
        raise ValueError(f"k_shuffles must be >= 1, got {k_shuffles}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    W = htsr.as_matrix(W)
    with htsr.blas_thread_limit(options.blas_threads):
        return _extended(W, int(seed), int(k_shuffles), rng, options, rand_out)


def _extended(W: np.ndarray, seed: int, k_shuffles: int, rng: np.random.RandomState | None,
              options: htsr.HTSROptions, rand_out: dict | None = None) -> dict:
    """extended_metrics' body, for a validated float64 W."""
    mu, sd = float(np.mean(W)), float(np.std(W))
    raw_counts, centred_counts = [], []
    first: dict[str, Any] = {}
    for k in range(k_shuffles):
        gen = (rng if rng is not None else np.random.RandomState(seed)) if k == 0 else k_shuffle_rng(seed, k)
        # draw 0 advances a walked stream as analyze_matrix does (WW's discarded shuffle too)
        raw = htsr.shuffle_fit(W, gen, ww_extra_draw=(k == 0 and rng is not None))
        cen = raw.centred_copy()
        raw_counts.append(raw.traps)
        centred_counts.append(cen.traps)
        if k == 0:
            first = dict(raw=raw, cen=cen)
            if rand_out is not None:
                rand_out["evals"] = raw.evals

    def edge_ratio(rand: htsr.RandESD) -> float:
        return float(rand.evals[-1] * rand.fit["W_scale"] ** 2 / rand.fit["bulk_max_rescaled"])

    raw, cen = first["raw"], first["cen"]
    ov_u = ov_v = np.nan
    if raw.ok and raw.traps > 0:
        top = raw.mats[int(np.argmax([e[-1] for e in raw.draw_evals]))]
        ov_u, ov_v = _uniform_overlaps(top)
    fit_kw = dict(fix_fingers=options.fix_fingers, max_fingers=options.max_fingers,
                  finger_thresh=options.finger_thresh, evals_thresh=options.evals_thresh)
    centred_W = W - mu
    evals_c = htsr.esd(centred_W)
    dcentred_W = W - W.mean(axis=0, keepdims=True) - W.mean(axis=1, keepdims=True) + mu
    return dict(
        w_mean=mu, w_std=sd, mean_over_std=mu / sd if sd > 0 else np.nan,
        traps_raw=float(raw.traps), traps_k_mean=float(np.mean(raw_counts)),
        traps_centred=float(cen.traps), traps_centred_k_mean=float(np.mean(centred_counts)),
        k_shuffles=float(k_shuffles),
        rand_sigma_mp_raw=float(raw.fit["sigma_mp"]), rand_sigma_mp_centred=float(cen.fit["sigma_mp"]),
        rand_edge_ratio_raw=edge_ratio(raw), rand_edge_ratio_centred=edge_ratio(cen),
        trap_uniform_overlap=float(np.nanmax([ov_u, ov_v])) if np.isfinite(ov_u) else np.nan,
        trap_uniform_overlap_u=ov_u, trap_uniform_overlap_v=ov_v,
        lambda_max_centred=float(evals_c[-1]),
        alpha_centred=float(htsr.fit_power_law(evals_c, **fit_kw)["alpha"]),
        alpha_dcentred=float(htsr.fit_power_law(htsr.esd(dcentred_W), **fit_kw)["alpha"]),
    )


def extended_weights(weights: Mapping[str, Any], *, seed: int, k_shuffles: int = 10,
                     rng: np.random.RandomState | None = None, options: htsr.HTSROptions | None = None,
                     rand_out: dict | None = None) -> dict[str, dict]:
    """`extended_metrics` over the layers of a model, seeded like `analyze_weights`.

    Layer i's draw 0 uses `htsr.layer_rng(seed, i)`, or, when rng is given, the one stream
    walked through the layers in WW's order (then draw 0 of every layer is the
    permutation `analyze_weights(weights, rng=RandomState(s))` counts, for rng =
    RandomState(s)). Draws k >= 1 of layer i use `k_shuffle_rng(seed_i, k)` with
    seed_i = SeedSequence([seed, i]).generate_state(1)[0], independent across layers.

    With `rand_out` (a dict), rand_out[name] receives layer name's draw-0 W^rand eigenvalues
    (see `extended_metrics`); with `rng` = RandomState(s) they are `shuffle_spectra(weights,
    s)[name]["evals"]`, bit for bit.

    Returns:
        layer name -> `extended_metrics` dict.
    """
    out = {}
    for i, (name, W) in enumerate(weights.items()):
        seed_i = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        gen = rng if rng is not None else htsr.layer_rng(seed, i)
        spectra: dict | None = {} if rand_out is not None else None
        out[name] = extended_metrics(W, seed=seed_i, k_shuffles=k_shuffles, rng=gen, options=options,
                                     rand_out=spectra)
        if rand_out is not None:
            rand_out[name] = spectra["evals"]
    return out
