"""Golechha's progress measures as the authors computed them (docs/protocol.md §Progress measures), in numpy float64.

Per parameter set {fc1, fc2, fc3} x {kernel (in, out), bias}:

* activation sparsity A_s of FC1's post-ReLU activations on the fixed evaluation images
  (`paper_text=True`: on all 1,000 training images, the paper's eq. 8):
  hard = fraction of (image, neuron) entries < tau, smooth = mean sigmoid((tau - a)/beta);
  tau = 1, beta = 0.3 (the authors' notebook);
* absolute weight entropy H_abs(W) = -sum |w| ln(|w| + 1e-8) of FC1's weights (the paper's
  measure; FC2 and FC3 are extra columns), biases excluded;
* approximate local circuit complexity Lambda_LC: KL(softmax(orig) + 1e-8 || softmax(pert)
  + 1e-8) per image, without renormalisation, where the perturbed network has every weight
  matrix masked and biases kept. Default (the authors' notebook): inverted dropout p = 0.5
  (survivors x2), mean over the fixed 200 images. `paper_text=True` (App. B eq. 10): 10% of
  the weights zeroed, no rescale, summed over all 1,000 training images;
* the l2 norms: all parameters (the authors' primary) and weights only (paper eq. 7).

The fixed evaluation images. The authors took the first batch of a separately shuffled
DataLoader: a random 200-image subset of the 1k training subset, fixed for the run. Here it
is `fixed_subset(n_train, 200, seed)`: positions (into the class-sorted 1k subset of
`grokjax.data.select_subset`) drawn without replacement by
`np.random.default_rng(SeedSequence([FIXED_SUBSET_TAG, seed]))`, where `seed` is the run's
`config.seed`. The torch draw itself cannot be replayed, so this is a seed-level stand-in.

Dropout masks come from `np.random.default_rng(SeedSequence([MASK_TAG, seed, step]))`, so a
checkpoint's Lambda_LC is reproducible and does not depend on which worker computed it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from grokjax.data import load_mnist, select_subset, to_inputs
from grokjax.rundir import LAYERS

# Constant first words of the SeedSequences, so that these streams never coincide with
# another use of the same run seed.
FIXED_SUBSET_TAG = 0x5EED200
MASK_TAG = 0xD0D0
# Smoothing inside log and after softmax, as in the authors' notebook.
EPS = 1e-8

Params = Mapping[str, Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgressOptions:
    """Options of the progress measures; the defaults are the authors' notebook [A].

    Attributes:
        tau: sparsity threshold on post-ReLU FC1 activations ([A]: 1.0).
        beta: temperature of the smooth sparsity sigmoid ([A]: 0.3).
        n_fixed: size of the fixed evaluation subset drawn from the 1k training images
            ([A]: 200, one batch).
        paper_text: the paper's App. B reading of Lambda_LC (10% zeroed, no rescale, sum over
            all training images) instead of [A]'s (dropout 0.5 x2, mean over the fixed 200).
            With paper_text, sparsity is also taken over all training images (eq. 8 sums
            over the training set) instead of the fixed subset.
        drop: override of the masked fraction (None: 0.5, or 0.1 with paper_text); 0 gives
            Lambda_LC = 0 exactly.
        n_masks: masks averaged per checkpoint ([A]: 1, a single fresh mask per log step).
    """

    tau: float = 1.0
    beta: float = 0.3
    n_fixed: int = 200
    paper_text: bool = False
    drop: float | None = None
    n_masks: int = 1

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.n_fixed < 1:
            raise ValueError(f"n_fixed must be >= 1, got {self.n_fixed}")
        if self.drop is not None and not 0 <= self.drop < 1:
            raise ValueError(f"drop must lie in [0, 1), got {self.drop}")
        if self.n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {self.n_masks}")

    @property
    def lc_drop(self) -> float:
        """Fraction of each weight matrix masked for Lambda_LC."""
        if self.drop is not None:
            return self.drop
        return 0.1 if self.paper_text else 0.5

    @property
    def lc_rescale(self) -> bool:
        """Inverted dropout (survivors / (1 - p)) in [A]; plain zeroing in the paper text."""
        return not self.paper_text

    @property
    def lc_reduce(self) -> str:
        """'mean' over the fixed images [A] or 'sum' over all training images (paper)."""
        return "sum" if self.paper_text else "mean"


def fixed_subset(n_train: int, size: int, seed: int) -> np.ndarray:
    """Positions (into the 1k training subset) of the fixed evaluation images, int64."""
    if size > n_train:
        raise ValueError(f"cannot draw {size} evaluation images from {n_train}")
    rng = np.random.default_rng(np.random.SeedSequence([FIXED_SUBSET_TAG, int(seed)]))
    return rng.choice(n_train, size, replace=False).astype(np.int64)


def mask_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of the dropout masks of checkpoint `step` of a run with seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence([MASK_TAG, int(seed), int(step)]))


def hidden(params: Params, x: np.ndarray, layer: str = "fc1") -> np.ndarray:
    """Post-ReLU activations after `layer` (fc1 or fc2), shape (n, width)."""
    h = np.maximum(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0.0)
    if layer == "fc2":
        h = np.maximum(h @ params["fc2"]["kernel"] + params["fc2"]["bias"], 0.0)
    return h


def predict(params: Params, x: np.ndarray) -> np.ndarray:
    """The MLP's raw outputs (logits), numpy float64: relu, relu, linear."""
    h = hidden(params, x, "fc2")
    return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def activation_sparsity(a: np.ndarray, tau: float = 1.0, beta: float = 0.3) -> tuple[float, float]:
    """(hard, smooth) sparsity of activations `a`: mean 1[a < tau], mean sigmoid((tau - a)/beta)."""
    a = np.asarray(a, dtype=np.float64)
    hard = float(np.mean(a < tau))
    # sigmoid(z) = 0.5 (1 + tanh(z/2)) never overflows, unlike 1/(1 + exp(-z)).
    smooth = float(np.mean(0.5 * (1.0 + np.tanh((tau - a) / (2.0 * beta)))))
    return hard, smooth


def weight_entropy(W: np.ndarray, eps: float = EPS) -> float:
    """Absolute weight entropy -sum |w| ln(|w| + eps) (natural log, no normalisation)."""
    a = np.abs(np.asarray(W, dtype=np.float64))
    return float(-np.sum(a * np.log(a + eps)))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max for stability."""
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def kl_rows(logits_p: np.ndarray, logits_q: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Per-row KL(softmax(p) + eps || softmax(q) + eps), the smoothed, unrenormalised KL of [A]."""
    P = softmax(logits_p) + eps
    Q = softmax(logits_q) + eps
    return np.sum(P * (np.log(P) - np.log(Q)), axis=-1)


def perturb(params: Params, rng: np.random.Generator, drop: float, rescale: bool) -> dict:
    """A copy of params with each weight matrix masked (Bernoulli(drop) zeroed), biases kept.

    Masks are drawn for fc1, fc2, fc3 in that order, one uniform per entry (entry kept when
    u >= drop); with `rescale` the survivors are divided by 1 - drop (inverted dropout).
    """
    out = {}
    for name in LAYERS:
        W = params[name]["kernel"]
        keep = rng.random(W.shape) >= drop
        scale = 1.0 / (1.0 - drop) if rescale else 1.0
        out[name] = {"kernel": np.where(keep, W * scale, 0.0), "bias": params[name]["bias"]}
    return out


def circuit_complexity(params: Params, x: np.ndarray, rng: np.random.Generator, *, drop: float,
                       rescale: bool, reduce: str = "mean", n_masks: int = 1) -> float:
    """Approximate local circuit complexity: KL(orig || masked) per image, mean or sum.

    Args:
        params: the parameter set.
        x: input images (n, 784).
        rng: source of the masks (`mask_rng(seed, step)`).
        drop: masked fraction of each weight matrix.
        rescale: inverted dropout (x 1/(1-drop)) on the survivors.
        reduce: 'mean' or 'sum' over the images.
        n_masks: average the result over this many independent masks.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    base = predict(params, x)
    values = []
    for _ in range(n_masks):
        kl = kl_rows(base, predict(perturb(params, rng, drop, rescale), x))
        values.append(np.mean(kl) if reduce == "mean" else np.sum(kl))
    return float(np.mean(values))


def l2_norms(params: Params) -> tuple[float, float]:
    """(all parameters, weights only) l2 norms: the authors' and paper eq. 7's."""
    sq_w = sum(float(np.sum(np.square(params[k]["kernel"]))) for k in LAYERS)
    sq_b = sum(float(np.sum(np.square(params[k]["bias"]))) for k in LAYERS)
    return float(np.sqrt(sq_w + sq_b)), float(np.sqrt(sq_w))


def compute_progress(params: Params, *, x_fixed: np.ndarray, x_all: np.ndarray | None, options: ProgressOptions,
                     seed: int, step: int) -> dict[str, float]:
    """All progress measures of one checkpoint, as namespaced columns.

    Args:
        params: {fc1, fc2, fc3} x {kernel (in, out), bias}.
        x_fixed: the fixed evaluation images (n_fixed, 784), float64 pixel/255.
        x_all: all training images (needed only with options.paper_text, which computes
            both sparsity and Lambda_LC on them).
        options: ProgressOptions.
        seed: the run's seed (keys the dropout masks together with step).
        step: the checkpoint's step.

    Returns:
        progress/sparsity, progress/sparsity_smooth, progress/entropy_fc1 (the paper's
        H_abs), progress/entropy_fc2, progress/entropy_fc3, progress/circuit, params/l2,
        params/l2_weights.
    """
    x_lc = x_fixed
    if options.paper_text:
        if x_all is None:
            raise ValueError("paper_text sparsity and Lambda_LC need all training images (x_all)")
        x_lc = x_all
    hard, smooth = activation_sparsity(hidden(params, x_lc), options.tau, options.beta)
    lc = circuit_complexity(params, x_lc, mask_rng(seed, step), drop=options.lc_drop, rescale=options.lc_rescale,
                            reduce=options.lc_reduce, n_masks=options.n_masks)
    l2, l2_w = l2_norms(params)
    row = {"progress/sparsity": hard, "progress/sparsity_smooth": smooth}
    for k in LAYERS:
        row[f"progress/entropy_{k}"] = weight_entropy(params[k]["kernel"])
    row.update({"progress/circuit": lc, "params/l2": l2, "params/l2_weights": l2_w})
    return row


def load_inputs(n_per_class: int, data_seed: int, seed: int, n_fixed: int = 200,
                mnist: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The images the measures use: {'x_fixed': (n_fixed, 784), 'x_all': (n_train, 784)}.

    Args:
        n_per_class, data_seed: the run's training subset (config fields of the same name).
        seed: the run's seed (keys the fixed subset).
        n_fixed: size of the fixed subset.
        mnist: preloaded MNIST arrays (default: `grokjax.data.load_mnist()`, offline cache).
    """
    mnist = mnist if mnist is not None else load_mnist(verbose=False)
    idx = select_subset(mnist["y_train"], n_per_class, data_seed)
    x_all = to_inputs(mnist["x_train"][idx])
    return {"x_fixed": x_all[fixed_subset(len(idx), n_fixed, seed)], "x_all": x_all}
