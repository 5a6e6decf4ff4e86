"""Native HTSR engine: power-law alpha and correlation traps, numpy/scipy only.

It re-implements the parts of WeightWatcher 0.7.5.5 (the version the paper used) that the
project reports, so that ~300 checkpoints x 3 layers are analysed in seconds instead of
minutes; docs/htsr.md says which WeightWatcher function each piece mirrors, what differs on
purpose (the MP sigma search evaluated in one pass; NaN + status instead of -1; the KS test)
and how the engines are seeded.

* `esd(W)`: the squared singular values of W (eigenvalues of W^T W, not divided by N).
* `fit_power_law(evals)`: WeightWatcher's power-law MLE with KS-chosen xmin and its
  `fix_fingers='clip_xmax'`.
* `shuffle_fit(W, rng)`: the one primitive behind every correlation-trap count and shuffled
  spectrum: W^rand (an elementwise permutation of W, WeightWatcher's shuffle, 5 pooled
  shuffles when min(shape) < 100), its pooled ESD and the Marchenko-Pastur fit (`fit_mp`)
  whose spikes are the traps (`RandESD`). `shuffle_esd`, `rand_spectrum`, `shuffle_spectra`,
  `analyze_matrix`'s trap columns, `grokjax.analysis.meanaware` and the trap ablation all
  call it.
* `analyze_matrix(W)`, `analyze_weights(weights)`: one row per layer with the columns of
  `ROW_COLUMNS`. A `RandomState(s)` walked through the layers reproduces WeightWatcher's
  `analyze()` after `np.random.seed(s)`.
* `mp_ks_test`: the KS test of W^rand's ESD against the fitted law (not in WeightWatcher).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.stats

# WW's absolute cutoff below which eigenvalues are not fitted (constants.EVALS_THRESH).
EVALS_THRESH = 1e-5
# WW's DEFAULT_MAX_FINGERS; also the value max_fingers is forced back to (see notes).
DEFAULT_MAX_FINGERS = 10
# fit_clipped_powerlaw's min_alpha: clipping stops without a fix once alpha <= 2.
CLIP_MIN_ALPHA = 2.0
# random_eigenvalues pools this many shuffles when M is below SMALL_M.
SMALL_M = 100
SMALL_M_SHUFFLES = 5
# resid_mp: KDE bandwidth, grid size, density floor and out-of-support penalty.
KDE_BANDWIDTH = 0.1
KDE_GRID_POINTS = 1000
KDE_DENSITY_FLOOR = 0.01
MP_PENALTY = 1000.0
# Absolute slack under which two KS distances count as a possible tie (see _ww_fit).
_D_TIE_TOL = 1e-11
# Soft cap on the number of float64 elements in one block of the KS scan.
_SCAN_BLOCK_ELEMS = 1 << 21
# Nodes of the angular grid used to integrate the MP density for its CDF.
_MP_CDF_NODES = 4097

FIX_FINGERS_CHOICES = (None, "clip_xmax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HTSROptions:
    """Options of the native HTSR pass; the defaults are the paper's WeightWatcher call.

    Attributes:
        fix_fingers: 'clip_xmax' (WW's finger fix, the paper's setting) or None (plain fit).
        max_fingers: WW's max_fingers; WW resets it to 10 unless it is at least half the
            number of eigenvalues, and so does this engine. None also means 10.
        finger_thresh: how far (in alpha) a clipped fit must drop below the unclipped
            alpha to be accepted.
        randomize: compute correlation traps (W^rand shuffles + MP fit + KS test).
        evals_thresh: eigenvalues at or below this absolute value are not fitted.
        blas_threads: BLAS threads used by analyze_matrix / analyze_weights (None: leave
            BLAS alone). The SVDs here are small (<= 200 x 784): with OpenBLAS's default
            2 threads they ran 40-50x slower than with 1 on the 2-core VM while other
            jobs kept the cores busy, so the default is 1 and parallelism belongs to the
            caller (one process per core). Needs threadpoolctl, which is installed with
            scikit-learn (a weightwatcher dependency); without it the limit is skipped.
    """

    fix_fingers: str | None = "clip_xmax"
    max_fingers: int | None = DEFAULT_MAX_FINGERS
    finger_thresh: float = 1.0
    randomize: bool = True
    evals_thresh: float = EVALS_THRESH
    blas_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.fix_fingers not in FIX_FINGERS_CHOICES:
            raise ValueError(f"fix_fingers must be one of {FIX_FINGERS_CHOICES}, got {self.fix_fingers!r}")
        if self.max_fingers is not None and self.max_fingers < 1:
            # WW's valid_params rejects this too.
            raise ValueError(f"max_fingers must be >= 1 or None, got {self.max_fingers}")
        if not self.finger_thresh >= 0:
            raise ValueError(f"finger_thresh must be >= 0, got {self.finger_thresh}")
        if not self.evals_thresh >= 0:
            raise ValueError(f"evals_thresh must be >= 0, got {self.evals_thresh}")
        if self.blas_threads is not None and self.blas_threads < 1:
            raise ValueError(f"blas_threads must be >= 1 or None, got {self.blas_threads}")


_thread_controller: Any = None


@contextlib.contextmanager
def blas_thread_limit(n_threads: int | None) -> Iterator[None]:
    """Limits BLAS/LAPACK threads to n_threads inside the block (no-op for None).

    Uses threadpoolctl when it is importable (the controller is created once: building it
    costs ~5 ms, a limit afterwards ~15 us); otherwise does nothing.
    """
    global _thread_controller
    if n_threads is None:
        yield
        return
    if _thread_controller is None:
        try:
            import threadpoolctl
        except ImportError:
            _thread_controller = False
        else:
            _thread_controller = threadpoolctl.ThreadpoolController()
    if _thread_controller is False:
        yield
        return
    with _thread_controller.limit(limits=n_threads, user_api="blas"):
        yield


class _FitError(Exception):
    """A power-law fit WW would abort with an exception (and report as 'failed')."""


@dataclasses.dataclass(frozen=True)
class _Fit:
    """One WWFit result: the chosen xmin and its alpha, KS distance, standard error."""

    alpha: float
    xmin: float
    xmax: float
    D: float
    sigma: float


# --------------------------------------------------------------------------------------
# ESD and shuffles


def as_matrix(W: Any) -> np.ndarray:
    """Checks that W is a finite 2-D array and returns it as float64 (copied like WW)."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {W.shape}")
    if min(W.shape) < 1:
        raise ValueError(f"empty weight matrix of shape {W.shape}")
    W = W.astype(np.float64)
    if not np.all(np.isfinite(W)):
        raise ValueError("weight matrix has non-finite entries")
    return W


def _squared_svals(W: np.ndarray) -> np.ndarray:
    """Top-M squared singular values, sorted ascending, exactly as WW computes them."""
    m = min(W.shape)
    sv = scipy.linalg.svd(W, compute_uv=False)
    sv = np.sort(sv)[-m:]
    return np.sort(sv * sv)


def esd(W: Any) -> np.ndarray:
    """Empirical spectral density of W: the eigenvalues of W^T W, ascending.

    Args:
        W: a 2-D weight matrix in any orientation; it is converted to float64.

    Returns:
        The M = min(W.shape) squared singular values (no 1/N normalisation), float64.
    """
    return _squared_svals(as_matrix(W))


def _as_rng(rng: np.random.RandomState | int) -> np.random.RandomState:
    """Accepts a legacy RandomState (used as is, so it advances) or an int seed."""
    if isinstance(rng, np.random.RandomState):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.RandomState(int(rng))
    raise TypeError(f"rng must be a np.random.RandomState or an int seed, got {type(rng).__name__}")


def n_shuffles_for(M: int) -> int:
    """How many shuffles WW pools for a layer with M = min(shape) (5 if M < 100, else 1)."""
    return SMALL_M_SHUFFLES if M < SMALL_M else 1


def permutation(size: int, rng: np.random.RandomState) -> np.ndarray:
    """The flat permutation WW's shuffle applies when it draws from rng in this state.

    WW shuffles `W.flatten()` with the legacy generator; `RandomState.shuffle` draws the
    same numbers for any 1-D array of a given length, so shuffling the indices 0..size-1
    gives p with W^rand.ravel() == W.ravel()[p], and rng advances exactly as WW's does.
    """
    p = np.arange(size, dtype=np.int64)
    rng.shuffle(p)
    return p


def permute(W: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """W^rand: W's elements (C order) rearranged by the flat permutation perm."""
    return np.asarray(W).ravel()[perm].reshape(np.shape(W))


def shuffle_esd(W: Any, rng: np.random.RandomState | int, *, n_shuffles: int | None = None) -> np.ndarray:
    """ESD of the elementwise-shuffled matrix W^rand, pooled over shuffles like WW
    (`shuffle_fit(...).evals`; with a `RandomState` in the state of WW's global RNG, WW's
    eigenvalues).

    Args:
        W: the weight matrix, in the orientation WW sees (the flattening order matters).
        rng: a legacy `np.random.RandomState` (advanced in place) or an int seed.
        n_shuffles: number of pooled shuffles; default WW's rule (5 if M < 100, else 1).

    Returns:
        The sorted pooled eigenvalues, n_shuffles * M of them.
    """
    return shuffle_fit(W, rng, n_shuffles=n_shuffles).evals


# --------------------------------------------------------------------------------------
# Power-law fit


def _ww_alpha_D_exact(data: np.ndarray, i: int) -> tuple[float, float]:
    """WWFit.fit_power_law's alpha and D for candidate i, with WW's own arithmetic."""
    log_data = np.log(data)
    n = float(data.size - i)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = 1 + n / (np.sum(log_data[i:]) - n * log_data[i])
        D = 1.0
        if alpha > 1:
            D = np.max(np.abs(1 - (data[i:] / data[i]) ** (-alpha + 1) - np.arange(n) / n))
    return float(alpha), float(D)


def _ks_distances(data: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance D_i of every candidate tail, vectorised in row blocks.

    Row i holds the tail x_i..x_n of candidate i: theoretical CDF 1 - (x_j/x_i)^(1-alpha_i)
    against the empirical steps t/k (t = j - i, k = n - i); entries left of the diagonal
    are masked to 0, which cannot change a maximum of absolute values.
    """
    n = data.size
    n_cand = n - 1
    Ds = np.ones(n_cand)
    valid = alphas > 1  # WW: D = 1 unless alpha > 1 (NaN compares False as in WW)
    rows = max(1, _SCAN_BLOCK_ELEMS // max(n, 1))
    cols = np.arange(n)
    for start in range(0, n_cand, rows):
        stop = min(start + rows, n_cand)
        idx = np.arange(start, stop)
        keep = valid[start:stop]
        if not np.any(keep):
            continue
        idx = idx[keep]
        a = alphas[idx]
        k = (n - idx).astype(np.float64)
        ratio = data[None, :] / data[idx, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            theo = 1 - ratio ** (-a[:, None] + 1)
            emp = (cols[None, :] - idx[:, None]) / k[:, None]
            gap = np.abs(theo - emp)
        gap[cols[None, :] < idx[:, None]] = 0.0
        Ds[idx] = gap.max(axis=1)
    return Ds


def _ww_fit(data: np.ndarray) -> _Fit:
    """WWFit(data) for ascending float64 data: xmin chosen by minimum KS distance.

    Raises:
        _FitError: on fewer than 2 points (WW raises from an empty argmin / index).
    """
    n = data.size
    if n < 2:
        raise _FitError(f"power-law fit needs at least 2 eigenvalues, got {n}")
    logs = np.log(data)
    # Tail sums of ln(x_j / x_i) = S_i - k_i ln x_i with S_i the suffix sum of ln x_j.
    # Centring the logs on the largest one keeps the cumulative sum's rounding small.
    centred = logs - logs[-1]
    suffix = np.cumsum(centred[::-1])[::-1][:-1]
    k = (n - np.arange(n - 1)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + k / (suffix - k * centred[:-1])
    Ds = _ks_distances(data, alphas)
    best = int(np.argmin(Ds))
    near = np.flatnonzero(Ds <= Ds[best] + _D_TIE_TOL)
    if near.size > 1:
        # A possible tie: decide it with WW's exact arithmetic, first index wins as in WW.
        exact = [_ww_alpha_D_exact(data, int(i)) for i in near]
        j = int(np.argmin([d for _, d in exact]))
        best = int(near[j])
        alphas[best], Ds[best] = exact[j]
    alpha = float(alphas[best])
    sigma = (alpha - 1) / np.sqrt(n - best)
    return _Fit(alpha=alpha, xmin=float(data[best]), xmax=float(data[-1]), D=float(Ds[best]), sigma=float(sigma))


def _clip_xmax(nz: np.ndarray, max_fingers: int, finger_thresh: float) -> tuple[_Fit, int, _Fit]:
    """WW's fit_clipped_powerlaw with xmin=None, xmax=None, min_alpha=2.

    Returns:
        (best fit, num_fingers, unclipped fit).

    Raises:
        _FitError: whenever WW's version raises (any fit on < 2 points, or an empty
            clipping loop, which is an UnboundLocalError in WW).
    """
    first = _ww_fit(nz)
    best, num_fingers = first, 0
    last = first
    idx = None
    for idx in range(2, max_fingers):
        last = _ww_fit(nz[:-idx])
        if last.alpha + finger_thresh < first.alpha:
            best, num_fingers = last, idx - 1
            break
        if last.alpha <= CLIP_MIN_ALPHA:
            break
    if idx is None:
        raise _FitError(f"clip_xmax loop is empty for max_fingers={max_fingers}")
    # WW's `if idx == max_fingers` can never hold, so these check fits always run; they
    # only log in WW, but a fit on < 2 points raises and fails the whole layer.
    for idy in range(idx + 1, idx + 4):
        check = _ww_fit(nz[:-idy])
        if np.abs(check.alpha - last.alpha) > finger_thresh:
            break
    return best, num_fingers, first


def _failed_fit(raw_alpha: float = np.nan) -> dict:
    """The power-law columns of a failed fit: NaN everywhere, raw_alpha if known."""
    return dict(alpha=np.nan, raw_alpha=raw_alpha, xmin=np.nan, xmax=np.nan, D=np.nan, sigma=np.nan,
                num_pl_spikes=np.nan, num_fingers=np.nan, status="failed")


def fit_power_law(evals: Any, *, fix_fingers: str | None = "clip_xmax", max_fingers: int | None = DEFAULT_MAX_FINGERS,
                  finger_thresh: float = 1.0, evals_thresh: float = EVALS_THRESH) -> dict:
    """Power-law fit of an ESD, reproducing WeightWatcher 0.7.5.5's `fit_powerlaw`.

    Args:
        evals: the eigenvalues (any order); those <= evals_thresh are not fitted.
        fix_fingers: 'clip_xmax' or None (see the module notes for the exact rule).
        max_fingers: as in WW: reset to 10 if None, negative, or below len(evals)/2.
        finger_thresh: alpha drop needed to accept a clipped fit.
        evals_thresh: absolute eigenvalue cutoff (WW's EVALS_THRESH).

    Returns:
        dict with alpha, raw_alpha (the unclipped alpha), xmin, xmax (largest fitted
        eigenvalue), D, sigma ((alpha-1)/sqrt(k)), num_pl_spikes (#evals >= xmin, clipped
        fingers included, as in WW), num_fingers, status ('success' or 'failed'). A
        failed fit has NaN in every numeric column except raw_alpha, which keeps the
        unclipped fit when that one succeeded.
    """
    if fix_fingers not in FIX_FINGERS_CHOICES:
        raise ValueError(f"fix_fingers must be one of {FIX_FINGERS_CHOICES}, got {fix_fingers!r}")
    evals = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    nz = evals[evals > evals_thresh]
    num_fingers = 0
    try:
        if fix_fingers == "clip_xmax":
            if max_fingers is None or max_fingers < 0 or max_fingers < 0.5 * evals.size:
                max_fingers = DEFAULT_MAX_FINGERS
            fit, num_fingers, raw = _clip_xmax(nz, max_fingers, finger_thresh)
        else:
            fit = raw = _ww_fit(nz)
    except _FitError:
        raw_alpha = np.nan
        if fix_fingers == "clip_xmax" and nz.size >= 2:
            raw_alpha = _ww_fit(nz).alpha
        return _failed_fit(raw_alpha)
    if np.isnan(fit.alpha):
        return _failed_fit(raw.alpha)
    return dict(alpha=fit.alpha, raw_alpha=raw.alpha, xmin=fit.xmin, xmax=fit.xmax, D=fit.D, sigma=fit.sigma,
                num_pl_spikes=int(np.count_nonzero(evals >= fit.xmin)), num_fingers=int(num_fingers),
                status="success")


# --------------------------------------------------------------------------------------
# Marchenko-Pastur fit and traps


def _rescale_to_mean_one(evals: np.ndarray) -> tuple[np.ndarray, float]:
    """WW's mp_fit rescaling: multiply by n / sum(evals); returns (evals, W_scale)."""
    w_scale = np.sqrt(evals.shape[0]) / np.sqrt(np.sum(evals))
    return (w_scale * w_scale) * evals, float(w_scale)


def _kde_on_grid(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """resid_mp's KDE: linear (triangular) kernel, bandwidth 0.1, on its 1000-point grid.

    scikit-learn's `KernelDensity(kernel='linear')` is exactly
    (1/(n h)) sum_i max(0, 1 - |x - x_i| / h), so it is computed directly (it agrees with
    scikit-learn to ~1e-15). Only grid points where the density exceeds 0.01 are kept,
    as in WW.

    Returns:
        (x, density) on the kept grid points.
    """
    h = KDE_BANDWIDTH
    grid = np.linspace(0, np.max(data) + 0.5, KDE_GRID_POINTS)
    pts = np.sort(data)
    lo = np.searchsorted(pts, grid - h, side="left")
    hi = np.searchsorted(pts, grid + h, side="right")
    width = int(np.max(hi - lo)) if grid.size else 0
    dens = np.zeros(grid.size)
    if width > 0:
        # Gather each grid point's neighbours within one bandwidth; others weigh 0.
        cols = lo[:, None] + np.arange(width)[None, :]
        inside = cols < hi[:, None]
        near = pts[np.minimum(cols, pts.size - 1)]
        w = np.where(inside, np.maximum(0.0, 1 - np.abs(grid[:, None] - near) / h), 0.0)
        dens = w.sum(axis=1) / (pts.size * h)
    good = dens > KDE_DENSITY_FLOOR
    return grid[good], dens[good]


def _mp_residuals(sigmas: np.ndarray, x: np.ndarray, y: np.ndarray, Q: float) -> np.ndarray:
    """WW's resid_mp(allresid=False) for many sigmas at once; one value per sigma.

    For Q == 1 the model is the quarter circle (1/(pi sigma^2)) sqrt(4 - x^2) on singular
    values; otherwise the MP density with WW's penalty of 1000 per point when the bulk edge
    b is left of the KDE mode or beyond the grid, or the lower edge a is right of the mode.
    """
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if Q == 1:
            model = np.nan_to_num((1 / (np.pi * s * s)) * np.sqrt(4 - x ** 2))
            return np.sum((model - y) ** 2, axis=1)
        q = 1 / Q
        b = np.power(s * (1 + np.sqrt(1 / Q)), 2)
        a = np.power(s * (1 - np.sqrt(1 / Q)), 2)
        model = np.nan_to_num((1 / (2 * np.pi * s * s * x * q)) * np.sqrt((b - x) * (x - a)))
        resid = np.sum((model - y) ** 2, axis=1)
    if x.size == 0:
        return resid
    x_mode = x[np.argmax(y)]
    bad = ((b < x_mode) | (b > np.max(x)) | (a > x_mode)).ravel()
    resid[bad] = MP_PENALTY * MP_PENALTY * x.size
    return resid


def _mp_bulk_edges(sigma: float, Q: float) -> tuple[float, float]:
    """(lambda_-, lambda_+) of MP with scale sigma and aspect ratio Q (WW's formulas)."""
    return (sigma * (1 - 1 / np.sqrt(Q))) ** 2, (sigma * (1 + 1 / np.sqrt(Q))) ** 2


def fit_mp(evals: Any, Q: float, M: int) -> dict:
    """Marchenko-Pastur fit of an ESD and its spike count, as WW's `mp_fit` defines them.

    Steps (WW's definitions): rescale the eigenvalues to mean 1; search sigma on WW's grid
    [0.05 s0, 2 s0) step 0.01 s0 with s0 = sqrt(lambda_max) / (1 + 1/sqrt(Q)), minimising
    WW's KDE residual (`_mp_residuals`), then polish with `scipy.optimize.fmin` from the
    best grid point (what `scipy.optimize.brute` does). The KDE is computed once, not at
    every call, and the grid is evaluated in one vectorised pass; the values are WW's to
    ~1e-15, so the grid argmin and the Nelder-Mead path are WW's and sigma agrees to
    rounding (see tests/test_htsr.py for the measured agreement).

    Args:
        evals: the eigenvalues (pooled over shuffles for W^rand), original units.
        Q: aspect ratio N/M of the matrix (N = max, M = min of its shape).
        M: min(shape) of the matrix; used only by the Tracy-Widom margin (WW uses the
            matrix's M there even when 5 shuffles are pooled).

    Returns:
        dict with sigma_mp (rescaled units), bulk_max / bulk_min (lambda_+/- in original
        units), bulk_max_rescaled, tw_threshold (lambda_+ + sqrt(TW), rescaled units),
        num_spikes (#rescaled evals above it), W_scale, mp_softrank (lambda_+ /
        max rescaled eval), status. On failure status is 'failed' and the numbers NaN.
    """
    evals = np.asarray(evals, dtype=np.float64).ravel()
    failed = dict(sigma_mp=np.nan, bulk_max=np.nan, bulk_min=np.nan, bulk_max_rescaled=np.nan,
                  tw_threshold=np.nan, num_spikes=np.nan, W_scale=np.nan, mp_softrank=np.nan, status="failed")
    if evals.size == 0 or not np.sum(evals) > 0 or not Q >= 1:
        return failed
    rescaled, w_scale = _rescale_to_mean_one(evals)
    s0 = np.sqrt(np.max(rescaled) / np.square(1.0 + 1.0 / np.sqrt(Q)))
    grid = np.mgrid[slice(0.05 * s0, 2.0 * s0, 0.01 * s0)]
    x, y = _kde_on_grid(np.sqrt(rescaled) if Q == 1 else rescaled)
    if x.size == 0 and Q != 1:
        return failed  # WW's resid_mp raises on max() of an empty density here
    values = _mp_residuals(grid, x, y, Q)
    start = grid[int(np.argmin(values))]
    polished = scipy.optimize.fmin(lambda p: _mp_residuals(p, x, y, Q)[0], start, full_output=True, disp=0)
    sigma = float(polished[0][0])
    if not np.isfinite(sigma):
        return failed
    bulk_min, bulk_max = _mp_bulk_edges(sigma, Q)
    tw = 1 / np.sqrt(Q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    threshold = bulk_max + np.sqrt(tw)
    scale2 = w_scale * w_scale
    return dict(sigma_mp=sigma, bulk_max=float(bulk_max / scale2), bulk_min=float(bulk_min / scale2),
                bulk_max_rescaled=float(bulk_max), tw_threshold=float(threshold),
                num_spikes=int(np.count_nonzero(rescaled > threshold)), W_scale=w_scale,
                mp_softrank=float(bulk_max / np.max(rescaled)), status="success")


def mp_density(x: Any, sigma: float, Q: float) -> np.ndarray:
    """Density of the Marchenko-Pastur law with scale sigma and aspect ratio Q >= 1:
    Q / (2 pi sigma^2 x) sqrt((lambda_+ - x)(x - lambda_-)) inside (lambda_-, lambda_+), 0
    outside; the law whose CDF is `mp_cdf` (eigenvalues rescaled as in `fit_mp`)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = _mp_bulk_edges(sigma, Q)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    out[inside] = Q / (2 * np.pi * sigma**2 * x[inside]) * np.sqrt((hi - x[inside]) * (x[inside] - lo))
    return out


def mp_cdf(x: Any, sigma: float, Q: float) -> np.ndarray:
    """CDF of the Marchenko-Pastur law with scale sigma and aspect ratio Q >= 1.

    The density (1/(2 pi sigma^2 lambda / Q)) sqrt((b - lambda)(lambda - a)) on [a, b]
    is integrated in the angle theta, lambda = a + (b - a)(1 - cos theta)/2, where the
    integrand is smooth (the square-root edges become sin^2); a cumulative trapezoid on a
    fine theta grid, normalised to 1, is accurate to ~1e-7. For Q = 1 this is the law of
    lambda = s^2 with s quarter-circle distributed on [0, 2 sigma].

    Args:
        x: points at which to evaluate the CDF.
        sigma: MP scale (sigma^2 is the entry variance in rescaled units).
        Q: aspect ratio, >= 1.

    Returns:
        The CDF values, same shape as x.
    """
    if not Q >= 1 or not sigma > 0:
        raise ValueError(f"need Q >= 1 and sigma > 0, got Q={Q}, sigma={sigma}")
    a, b = _mp_bulk_edges(sigma, Q)
    theta = np.linspace(0.0, np.pi, _MP_CDF_NODES)
    half = 0.5 * (b - a)
    lam = a + half * (1 - np.cos(theta))
    # f(lambda) dlambda = half^2 sin^2(theta) / (2 pi sigma^2 lambda / Q) dtheta; when a = 0
    # write sin^2/lambda = (1 + cos theta)/half to avoid 0/0 at theta = 0.
    if a > 0:
        ratio = np.sin(theta) ** 2 / lam
    else:
        ratio = (1 + np.cos(theta)) / half
    dens = half * half * ratio * Q / (2 * np.pi * sigma * sigma)
    cdf = np.concatenate(([0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(theta))))
    cdf /= cdf[-1]
    x = np.asarray(x, dtype=np.float64)
    t = np.arccos(np.clip(1 - (x - a) / half, -1.0, 1.0))
    return np.interp(t, theta, cdf)


def mp_ks_test(evals_rand: Any, sigma: float, Q: float) -> dict:
    """Kolmogorov-Smirnov test of an ESD against the fitted Marchenko-Pastur law.

    What is tested: the eigenvalues (all of them, traps included, pooled over shuffles
    when WW pools them) are rescaled to mean 1 exactly as in `fit_mp`, and compared with
    the MP law of scale `sigma` (the fitted rand_sigma_mp) and ratio Q through
    `scipy.stats.kstest` (two-sided, against `mp_cdf`). For Q = 1 the reference is the
    proper quarter circle of scale sigma (support [0, 4 sigma^2] in eigenvalues), not WW's
    fixed-support curve whose height alone depends on sigma.

    How the numbers are computed: the statistic is D = sup_x |F_n(x) - F_MP(x)|, with F_n
    the empirical CDF of the n rescaled eigenvalues (n = M = min(shape), or 5 M when five
    shuffles are pooled; 200 for FC1 and FC2) and F_MP = `mp_cdf(x, sigma, Q)`. The p-value
    is scipy's two-sided one-sample KS p-value for n samples (`scipy.stats.kstest`,
    method 'auto': the exact Kolmogorov distribution at these n), i.e. P(D_n >= D) for n
    iid draws from F_MP.

    Read the statistic first: eigenvalues are not independent and sigma is fitted on the
    same data, so the p-value is indicative only, and it falls steeply with n at a given D
    (docs/htsr.md, "KS test", on the paper's Table 4 p-value).

    Args:
        evals_rand: the W^rand eigenvalues in original units.
        sigma: the fitted MP sigma (rescaled units).
        Q: aspect ratio N/M.

    Returns:
        dict with mp_ks (the KS statistic) and mp_pvalue.
    """
    evals = np.asarray(evals_rand, dtype=np.float64).ravel()
    rescaled, _ = _rescale_to_mean_one(evals)
    res = scipy.stats.kstest(rescaled, lambda v: mp_cdf(v, sigma, Q))
    return dict(mp_ks=float(res.statistic), mp_pvalue=float(res.pvalue))


# --------------------------------------------------------------------------------------
# W^rand: the one primitive behind every trap count and shuffled spectrum


@dataclasses.dataclass(frozen=True)
class RandESD:
    """Shuffles of one matrix (W^rand), their pooled ESD and its Marchenko-Pastur fit.

    Made by `shuffle_fit`; every trap count of this package (`analyze_matrix`'s `traps`,
    the mean-aware counts of `grokjax.analysis.meanaware`, the trap ablation's modes) and
    every shuffled spectrum (`shuffle_esd`, `rand_spectrum`, `shuffle_spectra`) is one.

    Attributes:
        N, M: max and min of W's shape.
        w_mean: mean of W's entries (what `centred()` subtracts).
        centred: whether `mats` are shuffles of W - w_mean (the same permutations).
        perms: one flat permutation per pooled shuffle (`permutation`).
        mats: the shuffled matrices, W's shape: permute(W, perms[k]) (minus w_mean if centred).
        draw_evals: per shuffle, its squared singular values, ascending.
    """

    N: int
    M: int
    w_mean: float
    centred: bool
    perms: tuple[np.ndarray, ...]
    mats: tuple[np.ndarray, ...]
    draw_evals: tuple[np.ndarray, ...]

    @property
    def Q(self) -> float:
        return self.N / self.M

    @property
    def n_shuffles(self) -> int:
        return len(self.perms)

    @functools.cached_property
    def evals(self) -> np.ndarray:
        """The pooled eigenvalues of all shuffles, original units, ascending."""
        return np.sort(np.concatenate(self.draw_evals))

    @functools.cached_property
    def fit(self) -> dict:
        """`fit_mp` of the pooled eigenvalues (its num_spikes is the trap count)."""
        return fit_mp(self.evals, self.Q, self.M)

    @property
    def ok(self) -> bool:
        return self.fit["status"] == "success"

    @property
    def traps(self) -> float:
        """The pooled trap count (WW's rand_num_spikes); NaN when the fit failed."""
        return self.fit["num_spikes"]

    @property
    def threshold(self) -> float:
        """The trap threshold lambda_+ + sqrt(TW) in original units (NaN if the fit failed)."""
        return float(self.fit["tw_threshold"] / self.fit["W_scale"] ** 2) if self.ok else np.nan

    def traps_per_draw(self) -> tuple[int, ...]:
        """How many of the traps each shuffle holds: the fit's own product and comparison,
        shuffle by shuffle (they add up to `traps`); zeros when the fit failed."""
        if not self.ok:
            return tuple(0 for _ in self.perms)
        scale2 = self.fit["W_scale"] * self.fit["W_scale"]
        return tuple(int(np.count_nonzero(scale2 * ev > self.fit["tw_threshold"])) for ev in self.draw_evals)

    def centred_copy(self) -> RandESD:
        """The same permutations applied to W - mean(W) (the centred count); self if centred."""
        if self.centred:
            return self
        return _draws(self.N, self.M, self.w_mean, self.perms, tuple(m - self.w_mean for m in self.mats), True)

    def spectrum(self) -> dict:
        """The `rand_spectrum` dict of these shuffles."""
        return _spectrum_dict(self.evals, self.N, self.M, self.fit)


def _draws(N: int, M: int, w_mean: float, perms: tuple, mats: tuple, centred: bool) -> RandESD:
    return RandESD(N=N, M=M, w_mean=w_mean, centred=centred, perms=perms, mats=mats,
                   draw_evals=tuple(_squared_svals(m) for m in mats))


def shuffle_fit(W: Any, rng: np.random.RandomState | int, *, n_shuffles: int | None = None, centred: bool = False,
                ww_extra_draw: bool = False) -> RandESD:
    """Draws W^rand as WeightWatcher does, and gives its pooled ESD and MP fit (`RandESD`).

    With a `RandomState` in the state of WW's global RNG, the permutations, the eigenvalues,
    the fit and the trap count are WW's (docs/htsr.md, "Correlation traps").

    Args:
        W: the weight matrix, in the orientation WW sees (the flattening order matters).
        rng: a legacy `np.random.RandomState` (advanced in place) or an int seed.
        n_shuffles: pooled shuffles; default WW's rule (`n_shuffles_for`: 5 if M < 100, else 1).
        centred: shuffle W - mean(W) instead of W, with the same permutations.
        ww_extra_draw: after the pooled shuffles, advance rng by the one more (discarded)
            shuffle WW draws for its softrank columns, as `analyze_matrix` does.

    Raises:
        ValueError: W not a finite, non-empty 2-D array; n_shuffles < 1.
    """
    W = as_matrix(W)
    rng = _as_rng(rng)
    N, M = max(W.shape), min(W.shape)
    if n_shuffles is None:
        n_shuffles = n_shuffles_for(M)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    perms = tuple(permutation(W.size, rng) for _ in range(n_shuffles))
    if ww_extra_draw:
        rng.shuffle(np.empty(W.size))  # only the draws matter
    w_mean = np.mean(W)
    mats = tuple(permute(W, p) for p in perms)
    if centred:
        mats = tuple(m - w_mean for m in mats)
    return _draws(N, M, w_mean, perms, mats, centred)


def _spectrum_dict(evals: np.ndarray, N: int, M: int, mp: dict) -> dict:
    threshold = float(mp["tw_threshold"] / mp["W_scale"] ** 2) if mp["status"] == "success" else np.nan
    return dict(N=N, M=M, Q=N / M, n_shuffles=evals.size // M, max_rand_eval=float(evals[-1]),
                tw_margin=float(mp["tw_threshold"] - mp["bulk_max_rescaled"]), evals=evals, threshold=threshold, **mp)


# --------------------------------------------------------------------------------------
# Per-layer and per-model analysis

# The columns of a row of analyze_matrix / analyze_weights, in order.
ROW_COLUMNS = ("name", "N", "M", "Q", "num_evals", "lambda_max", "norm", "alpha", "raw_alpha", "xmin", "xmax", "D",
               "sigma", "num_pl_spikes", "num_fingers", "status", "traps", "traps_per_shuffle", "n_shuffles",
               "rand_sigma_mp", "rand_bulk_max", "rand_bulk_min", "max_rand_eval", "mp_ks", "mp_pvalue", "mp_status")
# The trap columns of a row (NaN when the traps are not computed).
RAND_COLUMNS = ("traps", "traps_per_shuffle", "n_shuffles", "rand_sigma_mp", "rand_bulk_max", "rand_bulk_min",
                "max_rand_eval", "mp_ks", "mp_pvalue")


def _traps(W: np.ndarray, rng: np.random.RandomState) -> dict:
    """Correlation-trap columns of one layer; advances rng exactly as WW's analyze()."""
    rand = shuffle_fit(W, rng, ww_extra_draw=True)
    mp = rand.fit
    row = dict(n_shuffles=rand.n_shuffles, max_rand_eval=float(np.max(rand.evals)), rand_sigma_mp=mp["sigma_mp"],
               rand_bulk_max=mp["bulk_max"], rand_bulk_min=mp["bulk_min"], traps=mp["num_spikes"],
               traps_per_shuffle=mp["num_spikes"] / rand.n_shuffles, mp_ks=np.nan, mp_pvalue=np.nan,
               mp_status=mp["status"])
    if mp["status"] == "success":
        row.update(mp_ks_test(rand.evals, mp["sigma_mp"], rand.Q))
    return row


def analyze_matrix(W: Any, *, name: str = "", options: HTSROptions | None = None, seed: int = 0,
                   rng: np.random.RandomState | None = None) -> dict:
    """HTSR metrics of one weight matrix, as one flat row.

    Args:
        W: 2-D weight matrix, any orientation (N = max, M = min of its shape, Q = N/M).
        name: layer name copied into the row.
        options: HTSROptions (defaults: the paper's clip_xmax + randomize).
        seed: seeds `np.random.RandomState(seed)` for the shuffles when rng is None; this
            is the permutation WW draws for a one-layer model after `np.random.seed(seed)`.
        rng: a legacy RandomState to draw the shuffles from instead (advanced in place,
            by the trap shuffles and then by WW's extra discarded shuffle).

    Returns:
        dict with name, N, M, Q, num_evals, lambda_max, norm (sum of eigenvalues =
        ||W||_F^2), the `fit_power_law` columns (alpha, raw_alpha, xmin, xmax, D, sigma,
        num_pl_spikes, num_fingers, status) and the trap columns: traps (pooled count =
        WW's rand_num_spikes), traps_per_shuffle, n_shuffles, rand_sigma_mp, rand_bulk_max,
        rand_bulk_min, max_rand_eval, mp_ks, mp_pvalue, mp_status. Without randomize the
        trap columns are NaN and mp_status is 'not_run'.

    Raises:
        ValueError: if W is not a finite, non-empty 2-D array.
    """
    options = options or HTSROptions()
    W = as_matrix(W)
    with blas_thread_limit(options.blas_threads):
        return _analyze(W, name, options, rng if rng is not None else np.random.RandomState(seed))


def _analyze(W: np.ndarray, name: str, options: HTSROptions, rng: np.random.RandomState) -> dict:
    """analyze_matrix's body, for a validated float64 W and a ready generator."""
    N, M = max(W.shape), min(W.shape)
    evals = _squared_svals(W)
    row: dict[str, Any] = dict(name=name, N=N, M=M, Q=N / M, num_evals=int(evals.size),
                               lambda_max=float(np.max(evals)), norm=float(np.sum(evals)))
    row.update(fit_power_law(evals, fix_fingers=options.fix_fingers, max_fingers=options.max_fingers,
                             finger_thresh=options.finger_thresh, evals_thresh=options.evals_thresh))
    if options.randomize:
        row.update(_traps(W, rng))
    else:
        row.update({c: np.nan for c in RAND_COLUMNS}, mp_status="not_run")
    return {c: row[c] for c in ROW_COLUMNS}


def layer_rng(seed: int, index: int) -> np.random.RandomState:
    """The generator analyze_weights gives layer `index`: RandomState(SeedSequence([seed, index]))."""
    return np.random.RandomState(np.random.SeedSequence([seed, index]).generate_state(4))


def analyze_weights(weights: Mapping[str, Any], *, options: HTSROptions | None = None, seed: int = 0,
                    rng: np.random.RandomState | None = None) -> list[dict]:
    """`analyze_matrix` over the layers of a model, in the mapping's order.

    Args:
        weights: layer name -> 2-D weight matrix.
        options: HTSROptions.
        seed: non-negative int; layer i shuffles with `layer_rng(seed, i)`, independent of
            the other layers.
        rng: if given, one legacy RandomState walked through all layers in WW's order
            (seed is then ignored); `RandomState(s)` reproduces WW after `np.random.seed(s)`.

    Returns:
        One row (dict) per layer, see `analyze_matrix`.
    """
    rows = []
    for i, (name, W) in enumerate(weights.items()):
        layer_gen = rng if rng is not None else layer_rng(seed, i)
        rows.append(analyze_matrix(W, name=name, options=options, rng=layer_gen))
    return rows


# --------------------------------------------------------------------------------------
# W^rand spectra for figures and records


def rand_spectrum(W: Any, rng: np.random.RandomState | int, *, n_shuffles: int | None = None,
                  centred: bool = False) -> dict:
    """The W^rand eigenvalues and their Marchenko-Pastur fit, as the trap count uses them
    (`shuffle_fit(...).spectrum()`; unlike `analyze_matrix`, no extra WW shuffle is drawn).

    Args:
        W: the weight matrix, in the orientation WW sees (the flattening order matters).
        rng: a legacy `np.random.RandomState` (advanced in place) or an int seed.
        n_shuffles: pooled shuffles; default WW's rule (5 if min(shape) < 100, else 1).
        centred: shuffle W - mean(W) instead of W, with the same permutations.

    Returns:
        dict with evals (pooled eigenvalues, original units, ascending), N, M, Q,
        n_shuffles, max_rand_eval, the `fit_mp` keys (sigma_mp, bulk_min, bulk_max in
        original units, bulk_max_rescaled, tw_threshold = lambda_+ + sqrt(TW) in rescaled
        units, num_spikes = the trap count, W_scale, mp_softrank, status), threshold (the
        trap threshold in original units: tw_threshold / W_scale^2, NaN if the fit failed)
        and tw_margin (sqrt(TW), rescaled units).
    """
    return shuffle_fit(W, rng, n_shuffles=n_shuffles, centred=centred).spectrum()


def pooled_spectrum(evals: Any, N: int, M: int) -> dict:
    """`rand_spectrum`'s dict from W^rand eigenvalues already drawn (e.g. the monitor's stored
    ones): the same `fit_mp` of the pooled eigenvalues, so the same trap count.

    Args:
        evals: the pooled eigenvalues of the shuffles (original units, any order).
        N, M: max and min of the weight matrix's shape.

    Returns:
        The `rand_spectrum` keys; n_shuffles = len(evals) // M.
    """
    evals = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    return _spectrum_dict(evals, N, M, fit_mp(evals, N / M, M))


def shuffle_spectra(weights: Mapping[str, Any], seed: int) -> dict[str, dict]:
    """Per layer, the W^rand spectrum behind the trap count of
    `analyze_weights(weights, rng=np.random.RandomState(seed))`.

    Walks RandomState(seed) through the layers, in the mapping's order, as that call does
    (`shuffle_fit` with WW's extra draw), on one BLAS thread (the default
    `HTSROptions.blas_threads`). So each layer's `num_spikes` is that row's `traps`, and
    `evals` the eigenvalues it counts.

    Returns:
        layer name -> `rand_spectrum` dict.
    """
    rng = np.random.RandomState(seed)
    with blas_thread_limit(HTSROptions().blas_threads):
        return {name: shuffle_fit(W, rng, ww_extra_draw=True).spectrum() for name, W in weights.items()}
