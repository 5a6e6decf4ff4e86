"""Native HTSR engine: power-law alpha and correlation traps, numpy/scipy only.

This module re-implements the parts of WeightWatcher 0.7.5.5 (the version the paper used)
that the project reports, so that ~200 checkpoints x 3 layers can be analysed in seconds
instead of minutes. The reference is the installed WeightWatcher source; the numbered
notes below say which WW function each piece mirrors.

1. ESD (`combined_eigenvalues`): the squared singular values of W (the eigenvalues of
   W^T W, *not* divided by N), from `scipy.linalg.svd(compute_uv=False)` on a float64
   copy -- WW's `svd_method='accurate'` path -- keeping the top M = min(shape).

2. Power-law fit (`fit_powerlaw` -> `pl_fit` -> `WWFit.fit_power_law`): eigenvalues
   <= 1e-5 (absolute) are dropped; for every candidate xmin = x_i except the largest
   eigenvalue, alpha_i = 1 + k / sum_j ln(x_j / x_i) over the k-point tail, and
   D_i = max |1 - (x_j/x_i)^(1-alpha_i) - t/k| (t = 0..k-1), or D_i = 1 when alpha_i <= 1.
   xmin is the first argmin of D. WW loops over candidates; here the tail sums come from
   one cumulative sum and all D_i from one (blocked) 2-D array, with an exact WW-style
   recomputation for near-ties so that the argmin (and hence xmin) is WW's.

3. `fix_fingers='clip_xmax'` (`fit_clipped_powerlaw`), reproduced statement by statement:
   max_fingers is reset to 10 unless it is >= half the number of eigenvalues; the loop
   drops the top idx = 2, 3, ..., max_fingers-1 eigenvalues (never just 1), stops at the
   first fit whose alpha is more than `finger_thresh` below the *unclipped* alpha
   (num_fingers = idx - 1) or whose alpha is <= 2 (no fingers clipped); then, always,
   up to three "check" fits on the top idx+1..idx+3 removed are run and only logged in
   WW -- but they can raise. Any fit on fewer than 2 eigenvalues raises in WW (argmin of
   an empty sequence), which is why a 10-eigenvalue layer such as FC3 fails in WW. Such
   a failure is reported here as status 'failed' with NaN fit columns, while raw_alpha
   keeps the unclipped fit.

4. Correlation traps (`apply_random_esd` + `random_eigenvalues` + `mp_fit`): W^rand is an
   elementwise permutation of W's entries (legacy `RandomState.shuffle` on the C-order
   flattened copy, W in its given orientation); for M < 100 five shuffles are pooled.
   WW then draws one more (discarded) shuffle for its softrank/distance columns; this
   engine advances the generator by that shuffle too, so a `RandomState(s)` here walks the
   same stream as WW's global RNG after `np.random.seed(s)`.
   The pooled ESD is rescaled to mean 1 and a Marchenko-Pastur sigma is fitted by
   WW's residual (see `fit_mp`); traps = rescaled eigenvalues > lambda_+ + sqrt(TW) with
   TW = Q^-1/2 lambda_+^(2/3) M^(-2/3). For Q = 1 WW fits the singular values to a
   quarter circle of fixed support [0, 2] whose height is 1/sigma^2.

What differs from WW on purpose: the MP sigma search (WW refits a scikit-learn KDE at
each of ~215 objective calls; the KDE does not depend on sigma, so here it is computed
once and the same residual is evaluated on the same grid in one vectorised pass, then
polished with the same `scipy.optimize.fmin` from the same start point), failures are
NaN + status instead of -1, and the KS test of the MP fit (`mp_ks_test`), which WW does
not have.

Seeding: `analyze_matrix(W, seed=s)` shuffles with `np.random.RandomState(s)`, i.e. the
same permutations WW uses for a one-layer model after `np.random.seed(s)`.
`analyze_weights(weights, seed=s)` gives layer i its own generator
`RandomState(SeedSequence([s, i]))`, so a layer's shuffles do not depend on the other
layers; pass `rng=np.random.RandomState(s)` instead to walk one stream through the layers
in WW's order (this reproduces WW's multi-layer `analyze()` after `np.random.seed(s)`).

Beyond WW: `rand_spectrum` exposes the W^rand eigenvalues and MP fit behind the trap count
(`shuffle_spectra` walks a model's layers as `analyze_weights(rng=...)` does), `mp_density`
is the fitted law's density, and `extended_metrics` / `extended_weights` separate a growing
mean of W's entries (a rank-1 spike that a shuffle keeps) from heavy, localised entries:
centred trap counts and alphas, the trap count averaged over K seeded shuffles, and the
trap's overlap with the uniform vector.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def _as_matrix(W: Any) -> np.ndarray:
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
    return _squared_svals(_as_matrix(W))


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


def _shuffled(W: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """One W^rand: WW's flatten (C order) -> RandomState.shuffle -> reshape."""
    flat = W.flatten()
    rng.shuffle(flat)
    return flat.reshape(W.shape)


def shuffle_esd(W: Any, rng: np.random.RandomState | int, *, n_shuffles: int | None = None) -> np.ndarray:
    """ESD of the elementwise-shuffled matrix W^rand, pooled over shuffles like WW.

    With a `RandomState` in the same state as WW's global RNG, the permutations (and so
    the eigenvalues) are WW's: WW calls `np.random.shuffle` on `W.flatten()`, which is the
    legacy generator's shuffle, and the number of draws depends only on W.size.

    Args:
        W: the weight matrix, in the orientation WW sees (the flattening order matters).
        rng: a legacy `np.random.RandomState` (advanced in place) or an int seed.
        n_shuffles: number of pooled shuffles; default WW's rule (5 if M < 100, else 1).

    Returns:
        The sorted pooled eigenvalues, n_shuffles * M of them.
    """
    W = _as_matrix(W)
    rng = _as_rng(rng)
    if n_shuffles is None:
        n_shuffles = n_shuffles_for(min(W.shape))
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    pooled = [_squared_svals(_shuffled(W, rng)) for _ in range(n_shuffles)]
    return np.sort(np.concatenate(pooled))


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

    Read the statistic first. The p-value assumes independent samples. Eigenvalues repel
    each other, so their empirical CDF is smoother than an iid sample's, and sigma was
    fitted on the same data: the p-value is indicative only. It also depends steeply on n
    at a given D: the paper's Table 4 pairs D = 0.3044 with p = 1.877e-5, which is the KS
    p-value of about n = 60 samples (P(D_60 >= 0.3044) = 1.98e-5), while the n = 200
    eigenvalues of FC1's W^rand would give p = 6.1e-17 at the same D. So the paper's
    p-value was not computed from one 200-eigenvalue ESD as here (perhaps from a subset or
    binned values); compare D across tables, not p. p is large for pure-noise matrices and
    tiny when the shuffled ESD is far from MP (e.g. heavy-tailed entries).

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
    N, M = max(W.shape), min(W.shape)
    Q = N / M
    n_shuffles = n_shuffles_for(M)
    rand_evals = shuffle_esd(W, rng, n_shuffles=n_shuffles)
    # WW's second, discarded shuffle (its ww_softrank / rand_distance); only the draws matter.
    rng.shuffle(np.empty(W.size))
    mp = fit_mp(rand_evals, Q, M)
    row = dict(n_shuffles=n_shuffles, max_rand_eval=float(np.max(rand_evals)), rand_sigma_mp=mp["sigma_mp"],
               rand_bulk_max=mp["bulk_max"], rand_bulk_min=mp["bulk_min"], traps=mp["num_spikes"],
               traps_per_shuffle=mp["num_spikes"] / n_shuffles, mp_ks=np.nan, mp_pvalue=np.nan,
               mp_status=mp["status"])
    if mp["status"] == "success":
        row.update(mp_ks_test(rand_evals, mp["sigma_mp"], Q))
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
    W = _as_matrix(W)
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
# W^rand as a public spectrum, and the extended (mean-aware) per-layer metrics

# SeedSequence tag of the extra shuffles of `extended_metrics` (shuffles 1..K-1).
_K_SHUFFLE_TAG = 0x4B53


def _shuffle_draws(W: np.ndarray, rng: np.random.RandomState, n_shuffles: int) -> list[np.ndarray]:
    """n_shuffles W^rand matrices drawn as `shuffle_esd` draws them (same permutations)."""
    return [_shuffled(W, rng) for _ in range(n_shuffles)]


def _mp_of_draws(mats: list[np.ndarray], Q: float, M: int) -> dict:
    """Pooled ESD of some W^rand matrices and its `fit_mp`, plus the per-draw top eigenvalues."""
    per_draw = [_squared_svals(m) for m in mats]
    evals = np.sort(np.concatenate(per_draw))
    mp = fit_mp(evals, Q, M)
    top = np.array([e[-1] for e in per_draw])
    scale2 = mp["W_scale"] ** 2
    return dict(evals=evals, top_per_draw=top, threshold=float(mp["tw_threshold"] / scale2)
                if mp["status"] == "success" else np.nan, **mp)


def rand_spectrum(W: Any, rng: np.random.RandomState | int, *, n_shuffles: int | None = None,
                  centred: bool = False) -> dict:
    """The W^rand eigenvalues and their Marchenko-Pastur fit, as the trap count uses them.

    With the same generator state, the permutations, the eigenvalues and the fit are those
    of `analyze_matrix`'s trap columns (`shuffle_esd` + `fit_mp`): `rand_spectrum(W, s)`
    gives `analyze_matrix(W, seed=s)`'s `traps` as `num_spikes`. `analyze_matrix` then
    draws one more, discarded, shuffle (WW's); this function does not.

    Args:
        W: the weight matrix, in the orientation WW sees (the flattening order matters).
        rng: a legacy `np.random.RandomState` (advanced in place) or an int seed.
        n_shuffles: pooled shuffles; default WW's rule (5 if min(shape) < 100, else 1).
        centred: shuffle W - mean(W) instead of W, with the same permutations (the
            global mean is the one structure a shuffle keeps; see `extended_metrics`).

    Returns:
        dict with evals (pooled eigenvalues, original units, ascending), N, M, Q,
        n_shuffles, max_rand_eval, the `fit_mp` keys (sigma_mp, bulk_min, bulk_max in
        original units, bulk_max_rescaled, tw_threshold = lambda_+ + sqrt(TW) in rescaled
        units, num_spikes = the trap count, W_scale, mp_softrank, status), threshold (the
        trap threshold in original units: tw_threshold / W_scale^2, NaN if the fit failed)
        and tw_margin (sqrt(TW), rescaled units).
    """
    W = _as_matrix(W)
    rng = _as_rng(rng)
    N, M = max(W.shape), min(W.shape)
    if n_shuffles is None:
        n_shuffles = n_shuffles_for(M)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    mats = _shuffle_draws(W, rng, n_shuffles)
    if centred:
        mu = np.mean(W)
        mats = [m - mu for m in mats]
    return pooled_spectrum(np.concatenate([_squared_svals(m) for m in mats]), N, M)


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
    mp = fit_mp(evals, N / M, M)
    threshold = float(mp["tw_threshold"] / mp["W_scale"] ** 2) if mp["status"] == "success" else np.nan
    return dict(N=N, M=M, Q=N / M, n_shuffles=evals.size // M, max_rand_eval=float(evals[-1]),
                tw_margin=float(mp["tw_threshold"] - mp["bulk_max_rescaled"]), evals=evals, threshold=threshold, **mp)


def shuffle_spectra(weights: Mapping[str, Any], seed: int) -> dict[str, dict]:
    """Per layer, the W^rand spectrum behind the trap count of
    `analyze_weights(weights, rng=np.random.RandomState(seed))`.

    Walks RandomState(seed) through the layers, in the mapping's order, as that call does: a
    layer's pooled shuffles (`rand_spectrum`), then the one extra, discarded shuffle WW draws.
    The SVDs run on one BLAS thread, as that call's (default `HTSROptions.blas_threads`). So
    each layer's `num_spikes` is that row's `traps`, and `evals` the eigenvalues it counts.

    Returns:
        layer name -> `rand_spectrum` dict (evals: the pooled eigenvalues, ascending; the
        `fit_mp` keys; threshold; ...).
    """
    rng = np.random.RandomState(seed)
    out = {}
    with blas_thread_limit(HTSROptions().blas_threads):
        for name, W in weights.items():
            W = _as_matrix(W)
            out[name] = rand_spectrum(W, rng)
            rng.shuffle(np.empty(W.size))  # WW's discarded shuffle, as in analyze_matrix
    return out


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
                     options: HTSROptions | None = None, rand_out: dict | None = None) -> dict:
    """Mean-aware HTSR metrics of one weight matrix, as one flat dict of floats.

    Why: shuffling W's entries keeps their mean mu, and mu * 1 1^T has one singular value
    |mu| sqrt(N M), so a growing mean puts one eigenvalue of about mu^2 M (in units of
    W^T W / N) above the MP edge of W^rand. WeightWatcher counts it as a correlation trap,
    although it is no localised heavy entry; its singular vectors are close to the uniform
    vector. The same rank-1 spike sits in W's own ESD and lowers the power-law alpha. These
    columns separate the two:

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

    How the MP fit handles the mean spike: it does not remove it. `fit_mp` is WW's: the
    pooled eigenvalues are rescaled to mean 1 with the spike included, so the bulk's mean
    is 1 - lambda_spike / sum(lambda) and the fitted sigma_mp is biased low, to about
    sqrt(1 - lambda_spike / sum(lambda)) = 1 / sqrt(1 + (mu / std)^2) for a noise bulk
    (0.96 at mu/std = 0.3, 0.90 at 0.5, for Q > 1); the KDE residual is fitted to the
    bulk's shape (the spike adds the same residual for every sigma whose edge lies below
    it), so the threshold still follows the bulk and the spike is counted. For Q = 1 (FC2)
    WW's quarter circle has a fixed support [0, 2] in singular values and sigma only sets
    its height, so sigma stays near 1 while the rescaled bulk shrinks: the threshold
    (4 sigma^2 + sqrt(TW)) then sits above the shrunken bulk, and the raw count is, if
    anything, conservative. A very large spike also coarsens the sigma
    grid, which is laid out from the largest eigenvalue (step 0.01 s0), and can push the
    bulk's sigma below the grid's start (0.05 s0) once the spike exceeds ~400x the edge.
    The centred columns avoid both: the mean is removed before the shuffle, so the fit
    sees the bulk alone.

    Cost: 2 K SVDs of W^rand and 2 K MP fits (x5 when min(shape) < 100), plus two SVDs
    and power-law fits: about 0.3-0.5 s for a 784 x 200 matrix with K = 10 on one core.

    Args:
        W: 2-D weight matrix, any orientation (the shuffle flattens it in C order).
        seed: int; seeds draw 0 when rng is None and keys draws 1..K-1.
        k_shuffles: K >= 1.
        rng: a legacy RandomState for draw 0 instead of RandomState(seed), advanced as
            `analyze_matrix` advances it (the pooled shuffles, then WW's discarded one), so
            a stream walked through the layers matches `analyze_weights(rng=...)`.
        options: HTSROptions for the power-law fits and the BLAS thread limit.
        rand_out: if given, receives draw 0's pooled W^rand eigenvalues (ascending, original
            units) under the key "evals": with `rng` walked as `shuffle_spectra` walks it,
            exactly that function's `evals`, without drawing them a second time.

    Returns:
        dict with the `EXTENDED_COLUMNS` keys, floats.
    """
    options = options or HTSROptions()
    if k_shuffles < 1:
        raise ValueError(f"k_shuffles must be >= 1, got {k_shuffles}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    W = _as_matrix(W)
    with blas_thread_limit(options.blas_threads):
        return _extended(W, int(seed), int(k_shuffles), rng, options, rand_out)


def _extended(W: np.ndarray, seed: int, k_shuffles: int, rng: np.random.RandomState | None,
              options: HTSROptions, rand_out: dict | None = None) -> dict:
    """extended_metrics' body, for a validated float64 W."""
    N, M = max(W.shape), min(W.shape)
    Q, n_pool = N / M, n_shuffles_for(M)
    mu, sd = float(np.mean(W)), float(np.std(W))
    raw_counts, centred_counts = [], []
    first: dict[str, Any] = {}
    for k in range(k_shuffles):
        gen = (rng if rng is not None else np.random.RandomState(seed)) if k == 0 else k_shuffle_rng(seed, k)
        mats = _shuffle_draws(W, gen, n_pool)
        if k == 0 and rng is not None:
            gen.shuffle(np.empty(W.size))  # WW's discarded shuffle, as in analyze_matrix
        raw = _mp_of_draws(mats, Q, M)
        cen = _mp_of_draws([m - mu for m in mats], Q, M)
        raw_counts.append(raw["num_spikes"])
        centred_counts.append(cen["num_spikes"])
        if k == 0:
            first = dict(raw=raw, cen=cen, mats=mats)
            if rand_out is not None:
                rand_out["evals"] = raw["evals"]

    def edge_ratio(fit: dict) -> float:
        return float(fit["evals"][-1] * fit["W_scale"] ** 2 / fit["bulk_max_rescaled"])

    raw, cen = first["raw"], first["cen"]
    ov_u = ov_v = np.nan
    if raw["status"] == "success" and raw["num_spikes"] > 0:
        top = first["mats"][int(np.argmax(raw["top_per_draw"]))]
        ov_u, ov_v = _uniform_overlaps(top)
    fit_kw = dict(fix_fingers=options.fix_fingers, max_fingers=options.max_fingers,
                  finger_thresh=options.finger_thresh, evals_thresh=options.evals_thresh)
    centred_W = W - mu
    evals_c = _squared_svals(centred_W)
    dcentred_W = W - W.mean(axis=0, keepdims=True) - W.mean(axis=1, keepdims=True) + mu
    return dict(
        w_mean=mu, w_std=sd, mean_over_std=mu / sd if sd > 0 else np.nan,
        traps_raw=float(raw["num_spikes"]), traps_k_mean=float(np.mean(raw_counts)),
        traps_centred=float(cen["num_spikes"]), traps_centred_k_mean=float(np.mean(centred_counts)),
        k_shuffles=float(k_shuffles),
        rand_sigma_mp_raw=float(raw["sigma_mp"]), rand_sigma_mp_centred=float(cen["sigma_mp"]),
        rand_edge_ratio_raw=edge_ratio(raw), rand_edge_ratio_centred=edge_ratio(cen),
        trap_uniform_overlap=float(np.nanmax([ov_u, ov_v])) if np.isfinite(ov_u) else np.nan,
        trap_uniform_overlap_u=ov_u, trap_uniform_overlap_v=ov_v,
        lambda_max_centred=float(evals_c[-1]),
        alpha_centred=float(fit_power_law(evals_c, **fit_kw)["alpha"]),
        alpha_dcentred=float(fit_power_law(_squared_svals(dcentred_W), **fit_kw)["alpha"]),
    )


def extended_weights(weights: Mapping[str, Any], *, seed: int, k_shuffles: int = 10,
                     rng: np.random.RandomState | None = None, options: HTSROptions | None = None,
                     rand_out: dict | None = None) -> dict[str, dict]:
    """`extended_metrics` over the layers of a model, seeded like `analyze_weights`.

    Layer i's draw 0 uses `layer_rng(seed, i)`, or, when rng is given, the one stream
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
        gen = rng if rng is not None else layer_rng(seed, i)
        spectra: dict | None = {} if rand_out is not None else None
        out[name] = extended_metrics(W, seed=seed_i, k_shuffles=k_shuffles, rng=gen, options=options,
                                     rand_out=spectra)
        if rand_out is not None:
            rand_out[name] = spectra["evals"]
    return out
