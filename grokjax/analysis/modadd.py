"""The modular-addition transformer's weights: its 8 matrices, their HTSR rows, the embedding's Fourier energy,
and the progress measures of the analysis (`compute_measures`: Fourier energy, restricted and excluded losses).

Numpy only: it reads a parameter tree (`grokjax.modadd.model`'s layout, numpy or device
arrays) and never imports the training code. The 8 matrices are those of the paper's
App. H, each as one 2-D array in the model's own orientation (y = x @ W):

    embed   (vocab, d_model)       token embedding W_E, the '=' row included
    W_Q, W_K, W_V (d_model, n_heads * d_head)   the heads side by side: head h is columns
                                   h * d_head .. (h + 1) * d_head
    W_O     (n_heads * d_head, d_model)         the heads stacked: head h is those rows
    fc1     (d_model, d_mlp)       the MLP's W_in
    fc2     (d_mlp, d_model)       the MLP's W_out
    unembed (d_model, vocab)       W_U

Heads are concatenated into one matrix per projection (as a single d_model x d_model map,
which is how the layer acts on the residual stream); `head_matrices` gives the per-head
view. Orientation does not change a matrix's ESD, and a uniform shuffle of W's entries
transposed is a uniform shuffle of W^T's, so alpha and the trap counts do not depend on it
in distribution (a given seed draws a different permutation in another orientation).
Biases and the positional embedding are not analysed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from grokjax.analysis import htsr, meanaware

MATRICES = ("embed", "W_Q", "W_K", "W_V", "W_O", "fc1", "fc2", "unembed")
_PROJECTIONS = ("W_Q", "W_K", "W_V")


def _array(params: Mapping[str, Any], *path: str) -> np.ndarray:
    node: Any = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"parameter {'/'.join(path)} is missing: not a modadd transformer's parameter tree")
        node = node[key]
    return np.asarray(node, dtype=np.float64)


def weight_matrices(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The 8 matrices of the module docstring, float64 numpy, in `MATRICES` order."""
    q = _array(params, "W_Q")
    if q.ndim != 3:
        raise ValueError(f"W_Q must be (d_model, n_heads, d_head), got shape {q.shape}")
    out = {"embed": _array(params, "embed")}
    for name in _PROJECTIONS:
        w = _array(params, name)
        out[name] = w.reshape(w.shape[0], -1)
    w_o = _array(params, "W_O")
    out["W_O"] = w_o.reshape(-1, w_o.shape[-1])
    out["fc1"] = _array(params, "fc1", "kernel")
    out["fc2"] = _array(params, "fc2", "kernel")
    out["unembed"] = _array(params, "unembed")
    return out


def head_matrices(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The per-head view: W_Q_h{i}, W_K_h{i}, W_V_h{i} (d_model, d_head) and W_O_h{i} (d_head, d_model).

    Head i's blocks of the concatenated matrices of `weight_matrices`, in the order
    W_Q heads, W_K heads, W_V heads, W_O heads.
    """
    out = {}
    for name in _PROJECTIONS:
        w = _array(params, name)
        for h in range(w.shape[1]):
            out[f"{name}_h{h}"] = w[:, h, :]
    w_o = _array(params, "W_O")
    for h in range(w_o.shape[0]):
        out[f"W_O_h{h}"] = w_o[h]
    return out


def embedding_fourier(embed: Any, p: int | None = None) -> dict[str, Any]:
    """Energy of the token embedding over the frequencies of Z_p, and its peak fraction.

    Definition. Let E be the p x d_model block of the embedding's number rows (tokens
    0..p-1; the '=' row is left out) and C = F E its coefficients in the orthonormal real
    Fourier basis F of Z_p (Nanda et al.'s `make_fourier_basis`: the constant 1/sqrt(p), and
    for k = 1..floor(p/2) the normalised cos(2 pi k a / p) and sin(2 pi k a / p); for even
    p the k = p/2 sine is zero and absent). The energy of frequency k is the squared norm of
    its rows of C: e_0 = ||C_const||^2, e_k = ||C_cos k||^2 + ||C_sin k||^2. By Parseval
    sum_k e_k = ||E||_F^2. `fraction` is e / ||E||_F^2 (it sums to 1); `peak_fraction` is
    the largest fraction over the non-constant frequencies k >= 1 and `peak_freq` its k.
    An embedding spread evenly over the frequencies has peak_fraction near 2/p (0.018 for
    p = 113); one on a single frequency has 1. Of the p DFT frequencies, k and p - k carry the
    same energy for a real embedding, which is why the spectrum runs over k = 0..floor(p/2);
    `component_fraction` is the finer split over the p basis vectors (const, cos 1, sin 1,
    cos 2, ...), which sums pairwise to `fraction`. Computed with the real FFT along the token
    axis (e_k = 2 |X_k|^2 / p for 0 < k < p/2, |X_k|^2 / p for k = 0 and k = p/2).

    Args:
        embed: the embedding (vocab, d_model) with vocab >= p, or a parameter tree holding it
            under "embed".
        p: the modulus; default vocab - 1 (the '=' token is the last).

    Returns:
        dict with freqs (0..floor(p/2)), energy, fraction, component_fraction (arrays), total
        (||E||_F^2), peak_fraction, peak_freq.
    """
    W = _array(embed, "embed") if isinstance(embed, Mapping) else np.asarray(embed, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"the embedding must be 2-D (vocab, d_model), got shape {W.shape}")
    p = W.shape[0] - 1 if p is None else int(p)
    if not 2 <= p <= W.shape[0]:
        raise ValueError(f"p must lie in 2..{W.shape[0]} (the embedding's rows), got {p}")
    if not np.all(np.isfinite(W[:p])):
        raise ValueError("the embedding has non-finite entries")
    X = np.fft.rfft(W[:p], axis=0)  # (p // 2 + 1, d_model)
    weight = np.full(X.shape[0], 2.0)
    weight[0] = 1.0
    if p % 2 == 0:
        weight[-1] = 1.0  # the Nyquist frequency has a cosine only
    energy = weight * np.sum(np.abs(X) ** 2, axis=1) / p
    total = float(np.sum(W[:p] ** 2))
    if total == 0:
        raise ValueError("the embedding's number rows are all zero: no Fourier energy to normalise")
    fraction = energy / total
    # Per basis vector: cos k carries 2 Re(X_k)^2 / p, sin k 2 Im(X_k)^2 / p (weights as above).
    cos_e = weight * np.sum(X.real**2, axis=1) / p
    sin_e = weight * np.sum(X.imag**2, axis=1) / p
    pairs = np.stack([cos_e[1:], sin_e[1:]], axis=1).ravel()
    components = np.concatenate([cos_e[:1], pairs[: p - 1]]) / total
    k = 1 + int(np.argmax(fraction[1:]))
    return dict(freqs=np.arange(X.shape[0]), energy=energy, fraction=fraction, component_fraction=components,
                total=total, peak_fraction=float(fraction[k]), peak_freq=k)


def analyze_params(params: Mapping[str, Any], *, seed: int = 0, options: htsr.HTSROptions | None = None,
                   rng: np.random.RandomState | None = None, heads: bool = False, k_shuffles: int = 0) -> list[dict]:
    """HTSR rows of the 8 matrices (or of the per-head view) through the native engine.

    Args:
        params: the transformer's parameter tree.
        seed, options, rng: as `grokjax.analysis.htsr.analyze_weights` (rng = RandomState(s)
            walks WeightWatcher's stream after np.random.seed(s) through the matrices in order).
        heads: analyse `head_matrices` instead of `weight_matrices`.
        k_shuffles: if > 0, add `meanaware.extended_weights`'s columns (centred alpha and traps,
            K-shuffle means) with this K, seeded like `meanaware.extended_weights`; with rng,
            its draw 0 replays rng's stream from its state before the call, so that
            traps_raw equals traps matrix by matrix.

    Returns:
        One row per matrix (`htsr.ROW_COLUMNS`, plus `meanaware.EXTENDED_COLUMNS` with k_shuffles).
    """
    if isinstance(k_shuffles, bool) or not isinstance(k_shuffles, int) or k_shuffles < 0:
        raise ValueError(f"k_shuffles must be a non-negative integer, got {k_shuffles!r}")
    mats = head_matrices(params) if heads else weight_matrices(params)
    rng_state = None
    if rng is not None and k_shuffles:
        rng_state = rng.get_state()  # the extended pass replays draw 0 from the same stream
    rows = htsr.analyze_weights(mats, options=options, seed=seed, rng=rng)
    if k_shuffles:
        ext_rng = None
        if rng_state is not None:
            ext_rng = np.random.RandomState()
            ext_rng.set_state(rng_state)
        ext = meanaware.extended_weights(mats, seed=seed, k_shuffles=k_shuffles, rng=ext_rng, options=options)
        rows = [{**row, **ext[row["name"]]} for row in rows]
    return rows


def _apb_basis(p: int, freqs) -> np.ndarray:
    """Unit vectors over the p^2 inputs (order a * p + b) along cos(w_k (a + b)) and
    sin(w_k (a + b)), w_k = 2 pi k / p, for each k in `freqs` (1 <= k <= p // 2): (2 n, p^2).
    For distinct k they are orthonormal, and orthogonal to the constant vector."""
    a, b = np.divmod(np.arange(p * p), p)
    rows = []
    for k in freqs:
        k = int(k)
        if not 1 <= k <= p // 2:
            raise ValueError(f"key frequencies must lie in 1..{p // 2}, got {k}")
        for f in (np.cos, np.sin):
            v = f(2 * np.pi * k * (a + b) / p)
            n = np.linalg.norm(v)
            if n > 1e-9:  # the sine of k = p/2 (even p) is zero
                rows.append(v / n)
    return np.asarray(rows)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def key_frequencies(embed: Any, n: int = 5, p: int | None = None) -> list[int]:
    """The `n` non-constant frequencies with the most embedding Fourier energy
    (`embedding_fourier`), largest first: the key frequencies of Nanda et al. (their run had 5)."""
    f = embedding_fourier(embed, p)
    order = np.argsort(f["fraction"][1:])[::-1] + 1
    return [int(k) for k in order[:n]]


def fourier_losses(logits: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, key_freqs) -> dict[str, float]:
    """Nanda et al.'s restricted and excluded losses, from the logits of all p^2 pairs.

    `logits` (p^2, >= p) are the '=' position's logits for every pair in the order a * p + b
    (`grokjax.modadd.data.all_pairs`); only the p number outputs are used. Over the inputs, each
    output's logits are split along the key frequencies' directions cos(w_k (a + b)) and
    sin(w_k (a + b)) (`key_freqs`, 1..p//2):

    * restricted loss: the cross-entropy over all p^2 pairs of the logits kept to those
      directions plus their mean over the inputs (everything else ablated). Low when the key
      frequencies alone carry the algorithm.
    * excluded loss: the cross-entropy over the training pairs (`train_idx`) of the logits with
      those directions removed. High when the training set is fitted through them, low while
      it is memorised some other way.

    Also returns the full loss on all pairs and on the training pairs, for reference.
    """
    logits = np.asarray(logits, dtype=np.float64)
    p2 = logits.shape[0]
    p = int(round(np.sqrt(p2)))
    if p * p != p2 or logits.ndim != 2 or logits.shape[1] < p:
        raise ValueError(f"logits must be (p^2, >= p) for all pairs, got shape {logits.shape}")
    L = logits[:, :p]
    labels = np.asarray(labels)
    U = _apb_basis(p, key_freqs)
    proj = U.T @ (U @ L)
    restricted = proj + L.mean(axis=0, keepdims=True)
    excluded = L - proj
    train_idx = np.asarray(train_idx)
    return {"restricted_loss": _cross_entropy(restricted, labels),
            "excluded_loss": _cross_entropy(excluded[train_idx], labels[train_idx]),
            "full_loss": _cross_entropy(L, labels), "train_loss": _cross_entropy(L[train_idx], labels[train_idx])}


def logits_last(params: Mapping[str, Any], tokens: np.ndarray) -> np.ndarray:
    """The last position's logits (batch, vocab) in float64 numpy: `grokjax.modadd.model.forward_last`
    computed with per-token tables as `forward_last_tables` (equal to it to ~1e-12 relative,
    tests/test_modadd_task.py), so that the analysis needs no JAX."""
    tokens = np.asarray(tokens)
    embed, pos = _array(params, "embed"), _array(params, "pos_embed")
    w_q = _array(params, "W_Q")
    d, h, k = w_q.shape
    n = tokens.shape[1]

    def rows(i: int, name: str) -> np.ndarray:
        table = (embed + pos[i]) @ _array(params, name).reshape(d, h * k)
        return table[tokens[:, i]].reshape(-1, h, k)

    keys = np.stack([rows(i, "W_K") for i in range(n)], axis=1)  # (batch, n, heads, d_head)
    values = np.stack([rows(i, "W_V") for i in range(n)], axis=1)
    q = rows(n - 1, "W_Q")
    last = (embed + pos[n - 1])[tokens[:, -1]]
    scores = np.einsum("bhk,bphk->bph", q, keys) / np.sqrt(k)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    attn = scores / scores.sum(axis=1, keepdims=True)
    z = np.einsum("bph,bphk->bhk", attn, values)
    r = last + z.reshape(-1, h * k) @ _array(params, "W_O").reshape(h * k, d)
    hidden = np.maximum(r @ _array(params, "fc1", "kernel") + _array(params, "fc1", "bias"), 0.0)
    r = r + hidden @ _array(params, "fc2", "kernel") + _array(params, "fc2", "bias")
    return r @ _array(params, "unembed")


# The number of key frequencies the restricted and excluded losses use (Nanda et al.'s run had 5).
N_KEY_FREQS = 5
# The step-table columns of `compute_measures` (the analysis' progress measures of this task).
MEASURE_COLUMNS = ("progress/fourier_peak", "progress/fourier_peak_freq", "progress/key_freqs",
                   "progress/restricted_loss", "progress/excluded_loss", "params/l2")


def load_inputs(p: int, frac_train: float, split_seed: int) -> dict:
    """What `compute_measures` reads: every pair (order a * p + b), its label and the training
    pairs' indices (the run's split, `grokjax.modadd.data.split_indices`)."""
    from grokjax.modadd.data import all_pairs, split_indices  # noqa: PLC0415  (numpy only)

    tokens, labels = all_pairs(int(p))
    train_idx, _ = split_indices(int(p), float(frac_train), int(split_seed))
    return {"task": "modadd", "p": int(p), "tokens": tokens, "labels": labels, "train_idx": train_idx}


def compute_measures(params: Mapping[str, Any], inputs: dict, n_key: int = N_KEY_FREQS) -> dict[str, Any]:
    """The progress measures of one checkpoint (`MEASURE_COLUMNS`).

    fourier_peak and fourier_peak_freq are `embedding_fourier`'s peak fraction and frequency;
    the restricted and excluded losses are `fourier_losses` with this checkpoint's own `n_key`
    key frequencies (`key_frequencies`, listed in key_freqs), so that a step's measures do not
    depend on how the run ends (Nanda et al. traced them with the final checkpoint's); params/l2
    is the norm of every parameter.
    """
    p = int(inputs["p"])
    fourier = embedding_fourier(_array(params, "embed"), p)
    keys = key_frequencies(_array(params, "embed"), min(n_key, p // 2), p)
    losses = fourier_losses(logits_last(params, inputs["tokens"]), inputs["labels"], inputs["train_idx"], keys)
    sq = 0.0
    stack = [params]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend(node.values())
        else:
            sq += float(np.sum(np.asarray(node, dtype=np.float64) ** 2))
    return {"progress/fourier_peak": fourier["peak_fraction"], "progress/fourier_peak_freq": fourier["peak_freq"],
            "progress/key_freqs": " ".join(str(k) for k in keys),
            "progress/restricted_loss": losses["restricted_loss"], "progress/excluded_loss": losses["excluded_loss"],
            "params/l2": float(np.sqrt(sq))}


def is_modadd_params(params: Mapping[str, Any]) -> bool:
    """Whether a parameter tree is the transformer's (it has a token embedding)."""
    return isinstance(params, Mapping) and "embed" in params
