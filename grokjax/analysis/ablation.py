"""Correlation-trap ablation: take the traps the HTSR analysis counts out of the weights and
measure what the network does without them.

The operation follows WeightWatcher 0.8.0's `remove_traps.py` (not the version the paper
used, 0.7.5.5, which only counts traps), on the native engine's own trap count, so that the
traps removed are exactly the ones counted:

1. `htsr.shuffle_fit` draws W^rand with the count's own permutations (the same generator
   state, WW's extra shuffle included), fits the MP bulk of the pooled ESD and counts the
   traps; the count rescales the eigenvalues to mean 1, i.e. it looks at W_scale * W.
2. The SVD of the normalised first shuffle W_scale * W^rand: its top-k modes, k = the traps
   that shuffle holds (`RandESD.traps_per_draw`), are the traps, so k is the analysis' count
   bit for bit.
3. Each trap mode sigma u v^T is mapped back through the inverse permutation to W's own
   element positions, and the normalisation is undone: the trap's footprint T in W.
4. Variants: 'noise' (WeightWatcher's) W' = W - T + R per trap, R Gaussian with exactly T's
   mean and standard deviation (a standard normal draw centred and scaled to mean 0, std 1
   first, as WeightWatcher does); 'subtract' W' = W - T; and the reference 'mean',
   W' = W - mean(W), with no trap search at all. 'noise' keeps the traps' energy and
   spreads it over all entries, so the W^rand bulk widens; 'subtract' leaves the bulk as it
   was. A trap that is the weights' mean (docs/htsr.md, "The mean spike") has singular
   vectors close to the uniform vector: `trap_details` reports that overlap.

Control: k modes chosen at random among the bulk modes of the same W^rand (those below the
threshold), removed in the same way and with the same variant, k = the number of traps.

The centred count (`htsr.shuffle_fit(..., centred=True)`, `traps_centred` of
`meanaware.extended_metrics`): the same permutations applied to W - mean(W), so the mean's rank-1
outlier is gone before the fit; `find_traps(..., centred=True)` finds those traps, and their
footprints are removed from W (its mean stays). The variants 'noise_centred' and
'subtract_centred' remove them.

Layers with M = min(shape) < 100 (FC3, 10 x 200): the count pools 5 shuffles of W (one trap
counts up to 5 times). Removal there uses the first of those shuffles and removes its modes
above the pooled fit's threshold; `TrapModes.traps` is the pooled count the analysis reports,
`TrapModes.n_removable` the first shuffle's share of it (the two are equal for FC1 and FC2).

Seeds. A checkpoint's shuffles come from `RandomState(pipeline.checkpoint_seed(run_seed,
step))` walked through fc1, fc2, fc3 as in `grokjax.analysis.pipeline` (`checkpoint_traps`). The
replacement noise of a layer's traps comes from
`default_rng(SeedSequence([NOISE_TAG, shuffle_seed, layer index, c]))`, control draw d from
`default_rng(SeedSequence([CONTROL_TAG, shuffle_seed, layer index, d, c]))` (first the modes,
then the noise; c = 0 for the analysis' count, 1 for the centred one), so a layer's W' is
the same in every layer set and every worker.

The experiment (`ablate_run`, `ablate_runs`) evaluates the network on all 10,000 test and
the run's 1,000 training images at the phase steps (end of pre-grokking, test-accuracy peak,
anti-grokking or final step, collapse onset; each mapped to the nearest kept params checkpoint,
if one lies within PHASE_STEP_TOLERANCE_DECADES, else skipped with a warning) and at every kept
checkpoint where the analysis counts a trap in any layer (the
analysis' count: its tables do not hold the centred one). A checkpoint with one FC2 trap
costs about 3 s on one busy CPU core (two SVDs and MP fits per layer and count, ~100
forward passes of the 1,000 or 10,000 images, most of them from FC2 on: the activations
below the changed layer are kept), so every trap step is affordable even for a 10^7-step run.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.linalg  # noqa: E402

from grokjax import ckpt  # noqa: E402
from grokjax.analysis import htsr, phases, pool  # noqa: E402
from grokjax.analysis.htsr import permutation, permute  # noqa: E402,F401  (the ablation's shuffle, re-exported)
from grokjax.analysis.pipeline import (AnalysisError, AnalysisOptions, analyze_run, checkpoint_seed,  # noqa: E402
                                       weights_of)
from grokjax.analysis.preflight import AnalysisWarning  # noqa: E402
from grokjax.analysis.runs import Run, find_named_runs, read_run, read_runs  # noqa: E402
from grokjax.data import load_mnist, select_subset, to_inputs  # noqa: E402
from grokjax.rundir import LAYERS  # noqa: E402

VARIANTS = ("noise", "subtract", "mean", "noise_centred", "subtract_centred")
# variant -> (count, how the footprint is removed); 'mean' searches no traps.
_VARIANT_PARTS = {"noise": ("raw", "noise"), "subtract": ("raw", "subtract"), "mean": (None, "mean"),
                  "noise_centred": ("centred", "noise"), "subtract_centred": ("centred", "subtract")}
COUNTS = ("raw", "centred")
ALL_LAYERS = "all"
# First words of the SeedSequences of the replacement noise and the control draws.
NOISE_TAG = 0x7EA9
CONTROL_TAG = 0xC0B7
# Share of the entries whose absolute mass `trap_details` reports (WeightWatcher's top 5 %).
TOP_MASS_PERCENT = 5.0
TABLE_COLUMNS = ("run", "wd", "seed", "step", "phase", "layer", "traps", "traps_centred", "traps_removed", "variant",
                 "test_acc",
                 "test_acc_ablated", "test_acc_control_mean", "test_acc_control_std", "train_acc", "train_acc_ablated",
                 "train_acc_control_mean", "train_acc_control_std", "n_control", "control_status",
                 "uniform_overlap_max", "test_acc_logged")


class AblationError(AnalysisError):
    """The ablation cannot be done as asked (bad option, failed fit, trap counts disagree)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationOptions:
    """How the trap-ablation experiment is run.

    Attributes:
        n_draws: random bulk-mode draws of the control (its mean and sample std, ddof = 1).
        trap_steps: besides the phase steps, every kept checkpoint with traps > 0 in a layer.
        workers: worker processes (checkpoints are restored in workers, never in the caller).
        progress_bar: show a tqdm bar over checkpoints.
    """

    n_draws: int = 5
    trap_steps: bool = True
    workers: int = 2
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.n_draws < 2:
            raise AblationError(f"n_draws must be >= 2 (a spread needs two draws), got {self.n_draws}")
        if self.workers < 1:
            raise AblationError(f"workers must be >= 1, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class TrapModes:
    """One layer's shuffles, the MP fit of their pooled ESD, and the SVD of the first one.

    Attributes:
        shape: W's shape.
        perms: one flat permutation per pooled shuffle: W^rand_k.ravel() == W.ravel()[perms[k]].
        W_scale: the trap count's normalisation (rescaled evals = W_scale^2 * evals).
        bulk_max: lambda_+ of the fit, rescaled units.
        threshold: lambda_+ + sqrt(TW), rescaled units; modes above it are traps.
        sigma_mp: the fitted MP scale (rescaled units).
        centred: whether the shuffles are of W - mean(W) (the centred count).
        traps: the analysis' count, pooled over the shuffles (NaN when the fit failed).
        traps_per_shuffle: how many of them each shuffle holds.
        status: the MP fit's status ('success' or 'failed').
        U, s, Vt: SVD of the normalised first shuffle W_scale * W^rand_1, s descending.
    """

    shape: tuple[int, int]
    perms: tuple[np.ndarray, ...]
    W_scale: float
    bulk_max: float
    threshold: float
    sigma_mp: float
    centred: bool
    traps: float
    traps_per_shuffle: tuple[int, ...]
    status: str
    U: np.ndarray
    s: np.ndarray
    Vt: np.ndarray

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def n_removable(self) -> int:
        """Trap modes of the first shuffle (the ones removal takes out); 0 if the fit failed."""
        return self.traps_per_shuffle[0] if self.ok else 0


# --------------------------------------------------------------------------------------
# The operation on one matrix


def unpermute(A: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The inverse of `permute`: puts each element of a shuffled matrix back where it came from."""
    out = np.empty(A.size, dtype=A.dtype)
    out[perm] = np.asarray(A).ravel()
    return out.reshape(A.shape)


def find_traps(W, rng: np.random.RandomState | int, *, centred: bool = False) -> TrapModes:
    """The trap modes of W, from the shuffles the native trap count draws (`htsr.shuffle_fit`).

    Args:
        W: the weight matrix in the orientation the analysis sees (a kernel, (in, out)).
        rng: a legacy RandomState in the state the analysis reaches this layer with (advanced
            as `htsr.analyze_matrix` advances it, WW's discarded extra shuffle included), or
            an int seed (`RandomState(seed)`, as `htsr.analyze_matrix(W, seed=...)`).
        centred: the centred count: the same permutations applied to W - mean(W).

    Returns:
        TrapModes. When the MP fit fails, status is 'failed', traps NaN and nothing is removable.
    """
    # One BLAS thread, as the native engine runs its SVDs (the same singular values, and
    # much faster on a busy machine).
    with htsr.blas_thread_limit(1):
        rand = htsr.shuffle_fit(W, rng, centred=centred, ww_extra_draw=True)
        per_shuffle = rand.traps_per_draw()
        mp = rand.fit
        if rand.ok:
            if sum(per_shuffle) != mp["num_spikes"]:
                raise AblationError(f"per-shuffle trap counts {per_shuffle} do not add up to {mp['num_spikes']}")
            U, s, Vt = scipy.linalg.svd(mp["W_scale"] * rand.mats[0], full_matrices=False)
        else:
            shape = rand.mats[0].shape
            U, s, Vt = np.empty((shape[0], 0)), np.empty(0), np.empty((0, shape[1]))
    return TrapModes(shape=rand.mats[0].shape, perms=rand.perms, W_scale=float(mp["W_scale"]),
                     bulk_max=float(mp["bulk_max_rescaled"]), threshold=float(mp["tw_threshold"]),
                     sigma_mp=float(mp["sigma_mp"]), centred=centred, traps=float(mp["num_spikes"]),
                     traps_per_shuffle=per_shuffle, status=mp["status"], U=U, s=s, Vt=Vt)


def mode_footprint(modes: TrapModes, j: int) -> np.ndarray:
    """Mode j of the first shuffle, s_j u_j v_j^T, at W's element positions and in W's units."""
    return unpermute(modes.s[j] * np.outer(modes.U[:, j], modes.Vt[j]), modes.perms[0]) / modes.W_scale


def matched_noise(T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with exactly T's mean and standard deviation (WeightWatcher's R)."""
    G = rng.standard_normal(T.shape)
    G = G - np.mean(G)
    g_std = np.std(G)
    return np.mean(T) + np.std(T) * (G / g_std)


def remove_modes(W, modes: TrapModes, indices: Sequence[int], *, variant: str,
                 noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """W with the footprints of the first shuffle's modes `indices` removed.

    Args:
        W: the weight matrix `modes` was computed from.
        modes: `find_traps(W, ...)`.
        indices: mode indices into modes.s (descending order); 0..n_removable-1 are the traps.
        variant: 'noise' (W - T_j + R_j per mode, R_j from noise_rng) or 'subtract' (W - T_j).
        noise_rng: the generator of the replacement noise (needed for 'noise').

    Returns:
        A new float64 array; bitwise equal to W when indices is empty.
    """
    if variant not in ("noise", "subtract"):
        raise AblationError(f"variant must be 'noise' or 'subtract' for mode removal, got {variant!r}")
    if variant == "noise" and noise_rng is None:
        raise AblationError("the 'noise' variant needs noise_rng")
    W = htsr.as_matrix(W)
    if W.shape != modes.shape:
        raise AblationError(f"W has shape {W.shape}, the modes were found on {modes.shape}")
    out = W.copy()
    for j in indices:
        if not 0 <= j < modes.s.size:
            raise AblationError(f"mode index {j} out of range 0..{modes.s.size - 1}")
        T = mode_footprint(modes, int(j))
        out = out - T
        if variant == "noise":
            out = out + matched_noise(T, noise_rng)
    return out


def remove_traps(W, rng: np.random.RandomState | int, *, variant: str = "noise",
                 noise_seed: int = 0) -> tuple[np.ndarray, TrapModes]:
    """W with all its counted traps removed (see the module docstring), and the trap modes.

    Args:
        W: the weight matrix (the orientation the analysis sees).
        rng: the shuffle generator, as for `find_traps`.
        variant: one of VARIANTS: 'noise', 'subtract' (the analysis' count), their '_centred'
            forms (the centred count's traps), or 'mean' (W - mean(W); rng is then not used).
        noise_seed: seeds `default_rng(SeedSequence([NOISE_TAG, noise_seed]))` for 'noise'.

    Raises:
        AblationError: unknown variant, or the MP fit of W^rand failed (traps undefined).
    """
    if variant not in VARIANTS:
        raise AblationError(f"variant must be one of {VARIANTS}, got {variant!r}")
    count, how = _VARIANT_PARTS[variant]
    modes = find_traps(W, rng, centred=count == "centred")
    if variant == "mean":
        return remove_mean(W), modes
    if not modes.ok:
        raise AblationError("the MP fit of W^rand failed: its traps are undefined")
    noise_rng = np.random.default_rng(np.random.SeedSequence([NOISE_TAG, int(noise_seed)]))
    return remove_modes(W, modes, range(modes.n_removable), variant=how, noise_rng=noise_rng), modes


def remove_mean(W) -> np.ndarray:
    """The reference ablation: W - mean(W)."""
    W = htsr.as_matrix(W)
    return W - np.mean(W)


def random_bulk_modes(modes: TrapModes, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct modes drawn uniformly among the first shuffle's bulk (non-trap) modes.

    Raises:
        AblationError: fewer than k bulk modes.
    """
    bulk = np.arange(modes.n_removable, modes.s.size)
    if k > bulk.size:
        raise AblationError(f"cannot draw {k} bulk modes from {bulk.size}")
    return sorted(int(j) for j in rng.choice(bulk, size=k, replace=False))


def _top_mass(T: np.ndarray, percent: float) -> float:
    a = np.sort(np.abs(T).ravel())
    k = max(1, int(np.ceil(percent / 100.0 * a.size)))
    total = float(np.sum(a))
    return float(np.sum(a[-k:]) / total) if total > 0 else 0.0


def trap_details(modes: TrapModes) -> list[dict]:
    """One dict per removable trap j (1-based `trap`): its rescaled eigenvalue, the threshold,
    its size over the bulk edge, the overlaps |<u, 1/sqrt(n)>| and |<v, 1/sqrt(m)>| of its
    W^rand singular vectors with the uniform vector (near 1: the trap is the weights' mean),
    and its footprint T's mean, std and share of absolute mass in the top 5 % of entries
    (near 1: localised on a few entries, near 0.05: spread evenly)."""
    rows = []
    for j in range(modes.n_removable):
        u, v = modes.U[:, j], modes.Vt[j]
        T = mode_footprint(modes, j)
        rows.append(dict(trap=j + 1, eval=float(modes.s[j] ** 2), threshold=modes.threshold,
                         eval_over_bulk_max=float(modes.s[j] ** 2 / modes.bulk_max),
                         u_uniform_overlap=float(abs(np.sum(u)) / np.sqrt(u.size)),
                         v_uniform_overlap=float(abs(np.sum(v)) / np.sqrt(v.size)),
                         footprint_mean=float(np.mean(T)), footprint_std=float(np.std(T)),
                         footprint_top5_mass=_top_mass(T, TOP_MASS_PERCENT)))
    return rows


# --------------------------------------------------------------------------------------
# The network


def checkpoint_traps(params: Mapping, *, step: int, run_seed: int, centred: bool = False) -> dict[str, TrapModes]:
    """Trap modes of fc1, fc2, fc3 of one checkpoint, with the analysis' shuffle stream
    (`RandomState(checkpoint_seed(run_seed, step))` walked through the layers in order);
    `centred` gives the centred count's traps under the same permutations."""
    rng = np.random.RandomState(checkpoint_seed(run_seed, step))
    return {name: find_traps(W, rng, centred=centred) for name, W in weights_of(params).items()}


class Evaluator:
    """The MLP in numpy float64 on fixed images, with the hidden activations of the unchanged
    network kept so that a change in fc2 or fc3 recomputes only the layers from it on."""

    def __init__(self, params: Mapping, x: np.ndarray, y: np.ndarray):
        self.params = {k: {"kernel": np.asarray(params[k]["kernel"], dtype=np.float64),
                           "bias": np.asarray(params[k]["bias"], dtype=np.float64)} for k in LAYERS}
        self.y = np.asarray(y)
        self._inputs = {"fc1": np.asarray(x, dtype=np.float64)}
        h = self._inputs["fc1"]
        for i, name in enumerate(LAYERS):
            h = self._layer(name, self.params[name]["kernel"], h)
            if i + 1 < len(LAYERS):
                self._inputs[LAYERS[i + 1]] = h
        self._logits = h

    def _layer(self, name: str, W: np.ndarray, h: np.ndarray) -> np.ndarray:
        z = h @ W + self.params[name]["bias"]
        return z if name == LAYERS[-1] else np.maximum(z, 0.0)

    def logits(self, replaced: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Outputs with the kernels in `replaced` ({layer: W'}) swapped in."""
        replaced = replaced or {}
        unknown = set(replaced) - set(LAYERS)
        if unknown:
            raise AblationError(f"unknown layers {sorted(unknown)}")
        if not replaced:
            return self._logits
        first = min(LAYERS.index(k) for k in replaced)
        h = self._inputs[LAYERS[first]]
        for name in LAYERS[first:]:
            h = self._layer(name, replaced.get(name, self.params[name]["kernel"]), h)
        return h

    def accuracy(self, replaced: Mapping[str, np.ndarray] | None = None) -> float:
        """Fraction of images whose largest output is their label."""
        return float(np.mean(np.argmax(self.logits(replaced), axis=1) == self.y))


def load_eval_data(config: Mapping, mnist: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple]:
    """{'train': (x, y) of the run's training subset, 'test': (x, y) of all 10,000 test images}."""
    mnist = mnist if mnist is not None else load_mnist(verbose=False)
    idx = select_subset(mnist["y_train"], int(config.get("n_per_class", 100)), int(config.get("data_seed", 0)))
    return {"train": (to_inputs(mnist["x_train"][idx]), np.asarray(mnist["y_train"][idx])),
            "test": (to_inputs(mnist["x_test"]), np.asarray(mnist["y_test"]))}


# --------------------------------------------------------------------------------------
# One checkpoint


def ablate_checkpoint(params: Mapping, *, step: int, run_seed: int, data: Mapping[str, tuple],
                      n_draws: int = 5) -> dict:
    """The ablation rows of one checkpoint.

    Layer sets: each layer with a removable trap (of either count) alone, and 'all' (fc1,
    fc2 and fc3 together: every counted trap removed, and for 'mean' every layer centred).
    Per set and variant one row: accuracies unchanged and ablated, and for the trap variants
    the control's mean and sample std (ddof 1) over n_draws draws of as many random bulk
    modes per layer, removed the same way. `traps` is the analysis' count of the set,
    `traps_centred` the centred count, `traps_removed` the modes the row's variant removed.

    Returns:
        dict with rows (list of dicts, `TABLE_COLUMNS` without run/wd/seed/phase/
        test_acc_logged), trap_rows (`trap_details` + step, layer, count, traps) and traps
        ({layer: the analysis' pooled count}).
    """
    modes = {c: checkpoint_traps(params, step=step, run_seed=run_seed, centred=c == "centred") for c in COUNTS}
    shuffle_seed = checkpoint_seed(run_seed, step)
    evaluators = {split: Evaluator(params, *data[split]) for split in ("test", "train")}
    base = {split: ev.accuracy() for split, ev in evaluators.items()}
    kernels = weights_of(params)
    k = {c: {name: modes[c][name].n_removable for name in LAYERS} for c in COUNTS}

    ablated: dict[str, dict[str, np.ndarray]] = {"mean": {name: remove_mean(kernels[name]) for name in LAYERS}}
    control: dict[str, list[dict]] = {}
    short: dict[str, set] = {}  # layers with fewer bulk modes than traps: no control
    for variant, (c, how) in _VARIANT_PARTS.items():
        if c is None:
            continue
        tag = COUNTS.index(c)  # 0 for the analysis' count, 1 for the centred one
        ablated[variant] = {}
        for i, name in enumerate(LAYERS):
            if k[c][name] > 0:
                noise = np.random.default_rng(np.random.SeedSequence([NOISE_TAG, shuffle_seed, i, tag]))
                ablated[variant][name] = remove_modes(kernels[name], modes[c][name], range(k[c][name]), variant=how,
                                                      noise_rng=noise)
        control[variant], short[variant] = [], set()
        for d in range(n_draws):
            draw = {}
            for i, name in enumerate(LAYERS):
                if k[c][name] == 0:
                    continue
                # The same bulk modes for both removal methods of a count.
                rng = np.random.default_rng(np.random.SeedSequence([CONTROL_TAG, shuffle_seed, i, d, tag]))
                try:
                    chosen = random_bulk_modes(modes[c][name], k[c][name], rng)
                except AblationError:
                    short[variant].add(name)
                    continue
                draw[name] = remove_modes(kernels[name], modes[c][name], chosen, variant=how, noise_rng=rng)
            control[variant].append(draw)

    details = {c: {name: trap_details(modes[c][name]) for name in LAYERS} for c in COUNTS}
    sets = [(name, (name,)) for name in LAYERS if k["raw"][name] or k["centred"][name]] + [(ALL_LAYERS, LAYERS)]
    rows = []
    for set_name, layers in sets:
        overlaps = [min(t["u_uniform_overlap"], t["v_uniform_overlap"]) for name in layers
                    for t in details["raw"][name]]
        for variant in VARIANTS:
            c, _ = _VARIANT_PARTS[variant]
            mine = {name: W for name, W in ablated[variant].items() if name in layers}
            row = dict(step=int(step), layer=set_name, traps=float(sum(modes["raw"][n].traps for n in layers)),
                       traps_centred=float(sum(modes["centred"][n].traps for n in layers)),
                       traps_removed=int(sum(k[c][n] for n in layers)) if c else 0, variant=variant,
                       test_acc=base["test"], train_acc=base["train"],
                       uniform_overlap_max=max(overlaps) if overlaps else np.nan)
            for split, ev in evaluators.items():
                row[f"{split}_acc_ablated"] = ev.accuracy(mine)
            missing = short.get(variant, set()) & set(layers)
            if c is None or missing:
                row.update(n_control=0, control_status="none" if c is None else
                           "too_few_bulk_modes_" + "+".join(sorted(missing)))
                for split in evaluators:
                    row[f"{split}_acc_control_mean"] = row[f"{split}_acc_control_std"] = np.nan
            else:
                row.update(n_control=n_draws, control_status="ok")
                for split, ev in evaluators.items():
                    accs = [ev.accuracy({n: W for n, W in draw.items() if n in layers}) for draw in control[variant]]
                    row[f"{split}_acc_control_mean"] = float(np.mean(accs))
                    row[f"{split}_acc_control_std"] = float(np.std(accs, ddof=1))
            rows.append(row)
    trap_rows = [dict(step=int(step), layer=name, count=c, traps=modes[c][name].traps, **t)
                 for c in COUNTS for name in LAYERS for t in details[c][name]]
    return {"rows": rows, "trap_rows": trap_rows, "traps": {name: modes["raw"][name].traps for name in LAYERS}}


# --------------------------------------------------------------------------------------
# Runs


PHASE_STEP_TOLERANCE_DECADES = phases.PHASE_STEP_TOLERANCE_DECADES  # the phase steps' tolerance (phases.steps_near)


def choose_steps(metrics: pd.DataFrame, kept: Sequence[int], traps_by_step: Mapping[int, float], *,
                 trap_steps: bool = True) -> tuple[dict[int, str], dict[str, int]]:
    """({step: phase label} of the checkpoints to ablate, {phase: its step} of the phase steps
    with no kept checkpoint within PHASE_STEP_TOLERANCE_DECADES).

    The phase steps of `phases.detect_phases` (pre: end of pre-grokking, grok: the
    test-accuracy peak, anti: the collapse minimum or the final step, drop: the collapse
    onset), each at the nearest kept checkpoint (`phases.nearest_step`); with trap_steps, every kept step whose
    analysis counts a trap in some layer (label '' unless it is also a phase step).
    """
    kept_arr = np.asarray(sorted(int(s) for s in kept), dtype=np.int64)
    chosen, missing = phases.steps_near(kept_arr, phases.phase_targets(metrics))
    if trap_steps:
        for s in kept_arr:
            if traps_by_step.get(int(s), 0) > 0:
                chosen.setdefault(int(s), [])
    return {s: "+".join(labels) for s, labels in sorted(chosen.items())}, missing


_WORKER: dict = {}


def _init_worker(run_dir: str, run_seed: int, config: dict, n_draws: int) -> None:
    pool.quiet_worker_stderr()
    _WORKER.update(run_dir=run_dir, run_seed=run_seed, n_draws=n_draws, data=load_eval_data(config))
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def _task(step: int) -> dict:
    params = ckpt.load_params(_WORKER["run_dir"], step)
    try:
        with htsr.blas_thread_limit(1):
            return ablate_checkpoint(params, step=step, run_seed=_WORKER["run_seed"], data=_WORKER["data"],
                                     n_draws=_WORKER["n_draws"])
    except ValueError as e:  # e.g. non-finite weights
        raise AblationError(f"{_WORKER['run_dir']} step {step}: {e}") from None


def _run_tasks(run: Run, steps: list[int], options: AblationOptions) -> list[dict]:
    """Ablates the steps in the analysis' worker pool (Orbax restores stay out of the caller)."""
    return pool.run_tasks(_task, [(s,) for s in steps], initializer=_init_worker,
                          initargs=(str(run.path), run.seed, run.config, options.n_draws), workers=options.workers,
                          desc=f"{run.name} ablation", progress_bar=options.progress_bar)


def ablate_run(run_dir: str | os.PathLike | Run, *, options: AblationOptions | None = None,
               analysis: AnalysisOptions | None = None, name: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trap ablation of one run (see the module docstring).

    The trap counts come from the native analysis of the run (`analyze_run`, cached next to
    the run; pass the options it was made with so that the cache is reused); the traps each
    checkpoint's ablation finds must equal them, layer by layer.

    Returns:
        (ablation table: one row per (step, layer set, variant), `TABLE_COLUMNS`;
        trap table: one row per (step, layer, count, removable trap), `trap_details` columns).

    Raises:
        AnalysisError: no run or no checkpoints. AblationError: counts that disagree.
        ckpt.CheckpointError: an unreadable checkpoint.
    """
    options = options or AblationOptions()
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir, name)
    # The native counts, from the run's analysis cache when it is current (the report has
    # just written it when called from spectra.py, so --rerun does not recompute it twice).
    analysis = dataclasses.replace(analysis or AnalysisOptions(), engine="native", reuse=True,
                                   progress_bar=options.progress_bar)
    layers, _ = analyze_run(run, analysis)
    native = layers[layers["engine"] == "native"]
    counts = {(int(r.step), r.layer): float(r.traps) for r in native.itertuples(index=False)}
    traps_by_step: dict[int, float] = {}
    for (s, _), t in counts.items():
        traps_by_step[s] = traps_by_step.get(s, 0.0) + (t if np.isfinite(t) else 0.0)
    # the steps whose params checkpoint is on disk (a monitor record alone cannot be ablated)
    on_disk = set(ckpt.list_param_steps(run.path))
    chosen, missing = choose_steps(run.metrics, [s for s in run.steps if s in on_disk], traps_by_step,
                                   trap_steps=options.trap_steps)
    if missing:
        warnings.warn(f"{run.name}: no params checkpoint near the phase step(s) "
                      + ", ".join(f"{label} {step:,}" for label, step in missing.items())
                      + ": not ablated there", AnalysisWarning, stacklevel=2)
    if not chosen:
        raise AnalysisError(f"{run.name}: no params checkpoint to ablate (the trap ablation needs them: "
                            "--keep_params log or all)")
    results = _run_tasks(run, list(chosen), options)

    logged = run.metrics.set_index("step")["test/acc"] if "test/acc" in run.metrics.columns else pd.Series(dtype=float)
    rows, trap_rows = [], []
    for res in results:
        step = res["rows"][0]["step"]
        for layer, mine in res["traps"].items():
            theirs = counts.get((step, layer), np.nan)
            if not (mine == theirs or (np.isnan(mine) and np.isnan(theirs))):
                raise AblationError(f"{run.name} step {step} {layer}: the ablation finds {mine} traps, "
                                    f"the analysis counts {theirs}")
        ident = dict(run=run.name, wd=run.wd, seed=run.seed)
        extra = dict(phase=chosen[step], test_acc_logged=float(logged.get(step, np.nan)))
        rows += [dict(ident, **extra, **r) for r in res["rows"]]
        trap_rows += [dict(ident, **t) for t in res["trap_rows"]]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    order = {v: i for i, v in enumerate(VARIANTS)}
    table["_set"] = table["layer"].map({**{n: i for i, n in enumerate(LAYERS)}, ALL_LAYERS: len(LAYERS)})
    table["_var"] = table["variant"].map(order)
    table = table.sort_values(["step", "_set", "_var"]).drop(columns=["_set", "_var"]).reset_index(drop=True)
    trap_cols = ["run", "wd", "seed", "step", "layer", "count", "traps", "trap", "eval", "threshold",
                 "eval_over_bulk_max",
                 "u_uniform_overlap", "v_uniform_overlap", "footprint_mean", "footprint_std", "footprint_top5_mass"]
    traps = pd.DataFrame(trap_rows, columns=trap_cols).sort_values(["step", "layer", "count", "trap"]).reset_index(
        drop=True)
    return table, traps


def ablate_runs(root: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                options: AblationOptions | None = None, analysis: AnalysisOptions | None = None,
                figures: bool = True, runs: dict[str, Run] | None = None) -> dict:
    """`ablate_run` on every run under root; writes ablation.csv, ablation_traps.csv and
    figures/fig_ablation.png into out_dir (default `<root>/analysis`).

    Args:
        runs: the runs under root as `grokjax.analysis.runs.read_runs` gives them (the report's,
            `make_report(...)["runs"]`); None: found and read here.

    Returns:
        dict with out_dir, table, traps and figure (the PNG path or None).
    """
    root = Path(root)
    if runs is None:
        runs = read_runs(find_named_runs(root))  # every run checked before any long computation
    tables, traps = [], []
    for run in runs.values():
        t, tr = ablate_run(run, options=options, analysis=analysis)
        tables.append(t)
        traps.append(tr)
    table, trap_table = pd.concat(tables, ignore_index=True), pd.concat(traps, ignore_index=True)
    out_dir = Path(out_dir) if out_dir is not None else root / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "ablation.csv", index=False)
    trap_table.to_csv(out_dir / "ablation_traps.csv", index=False)
    figure = plot_ablation(table, out_dir / "figures" / "fig_ablation.png") if figures and len(table) else None
    return {"out_dir": out_dir, "table": table, "traps": trap_table, "figure": figure}


def plot_ablation(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Test accuracy against step, one panel per run: the original network, all traps
    removed (both variants), the control (mean +- std over the random bulk-mode draws) and
    the mean removed. Step 0 is left out (log axis)."""
    runs = list(dict.fromkeys(table["run"]))
    fig, axes = plt.subplots(len(runs), 1, figsize=(7.5, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        t = table[(table["run"] == run) & (table["layer"] == ALL_LAYERS) & (table["step"] > 0)].sort_values("step")
        by = {v: t[t["variant"] == v] for v in VARIANTS}
        ax.plot(by["noise"]["step"], by["noise"]["test_acc"], "k-o", ms=3, lw=1.4, label="original")
        ax.plot(by["noise"]["step"], by["noise"]["test_acc_ablated"], "-s", color="tab:red", ms=3, lw=1.2,
                label="traps removed (noise)")
        ax.plot(by["subtract"]["step"], by["subtract"]["test_acc_ablated"], "--^", color="tab:orange", ms=3, lw=1,
                label="traps removed (subtract)")
        c = by["noise"]
        ax.fill_between(c["step"], c["test_acc_control_mean"] - c["test_acc_control_std"],
                        c["test_acc_control_mean"] + c["test_acc_control_std"], color="tab:blue", alpha=0.25, lw=0)
        ax.plot(c["step"], c["test_acc_control_mean"], "-", color="tab:blue", lw=1,
                label="control: as many random bulk modes (noise), mean ± std")
        ax.plot(by["noise_centred"]["step"], by["noise_centred"]["test_acc_ablated"], "-.", color="tab:purple",
                lw=1, label="centred count's traps removed (noise)")
        ax.plot(by["mean"]["step"], by["mean"]["test_acc_ablated"], ":", color="0.4", lw=1.2,
                label="mean removed (all layers)")
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{run}: all layers' traps removed", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
