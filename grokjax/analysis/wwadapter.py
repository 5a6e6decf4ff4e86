"""WeightWatcher 0.7.5.5 adapter: the only module of the project that imports weightwatcher.

It runs the paper's tool beside the native engine (`grokjax.analysis.htsr`): the analysis
pipeline runs both engines by default (`--engine both`; `--engine native` leaves WW out,
`--ww-stride` runs it on fewer checkpoints), and the tests and the benchmark cross-check the
two. The in-loop monitor uses the native engine only.

Importing weightwatcher has process-wide side effects (docs/htsr.md §WeightWatcher engine): `warnings.simplefilter
("ignore")` in WW_powerlaw, `logging.basicConfig(level=INFO)` on the root logger, and
levels set on the 'weightwatcher' and 'matplotlib' loggers. The import therefore happens
lazily, inside `_import_ww`, with the warnings filters, the root logger's level and
handlers, the levels of every logger that already existed, and `logging.disable` saved
and restored around it (log records are disabled during the import so that its
torch/CUDA messages are not printed). Each WW call is wrapped the same way (`_quiet_ww_call`), with
warnings ignored inside (pandas' `from_records` deprecation warning, numpy divide
warnings), WW's own logger raised to ERROR (so an expected clip_xmax failure is not
logged as a warning -- it shows in the status column), stdout redirected, and the legacy
global numpy RNG restored after WW has been seeded with `np.random.seed(seed)`.

Without torch, WW cannot read a dict of numpy arrays (`NameError: torch`); the adapter
then gives WW's module a stand-in `torch.Tensor` class (docs/htsr.md §WeightWatcher engine). With torch installed
nothing is patched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from grokjax.analysis import htsr

REQUIRED_VERSION = "0.7.5.5"
WW_LOGGER = "weightwatcher"

_ww_module: Any = None

# WW column -> our column, for the columns copied as is.
_COPIED = {
    "alpha": "alpha",
    "raw_alpha": "raw_alpha",
    "xmin": "xmin",
    "xmax": "xmax",
    "D": "D",
    "sigma": "sigma",
    "num_pl_spikes": "num_pl_spikes",
    "num_fingers": "num_fingers",
    "lambda_max": "lambda_max",
    "num_evals": "num_evals",
    "norm": "norm",
    "rand_num_spikes": "traps",
    "rand_sigma_mp": "rand_sigma_mp",
    "rand_bulk_max": "rand_bulk_max",
    "rand_bulk_min": "rand_bulk_min",
    "max_rand_eval": "max_rand_eval",
}
_FIT_COLUMNS = ("alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes", "num_fingers")


def ww_version() -> str:
    """The installed weightwatcher version (from package metadata; does not import it)."""
    return importlib.metadata.version("weightwatcher")


@contextlib.contextmanager
def _preserved_global_state() -> Iterator[None]:
    """Saves and restores warnings filters, root logger level/handlers, logger levels, logging.disable."""
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    levels = {name: lg.level for name, lg in logging.Logger.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    disabled = logging.root.manager.disable
    with warnings.catch_warnings():
        try:
            yield
        finally:
            logging.disable(disabled)
            root.setLevel(root_level)
            root.handlers[:] = root_handlers
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _import_ww() -> Any:
    """Imports weightwatcher once, without leaking its global side effects.

    Returns:
        The `weightwatcher` package.

    Raises:
        RuntimeError: if the installed version is not 0.7.5.5 (the paper's version).
    """
    global _ww_module
    if _ww_module is not None:
        return _ww_module
    installed = ww_version()
    if installed != REQUIRED_VERSION:
        raise RuntimeError(f"weightwatcher {REQUIRED_VERSION} is required (the paper's version), found {installed}; "
                           f"install it with pip install weightwatcher=={REQUIRED_VERSION}")
    with _preserved_global_state(), contextlib.redirect_stdout(io.StringIO()):
        logging.disable(logging.CRITICAL)
        import weightwatcher
        import weightwatcher.weightwatcher as wwmod
    if weightwatcher.__version__ != REQUIRED_VERSION:
        raise RuntimeError(f"weightwatcher {REQUIRED_VERSION} is required, imported {weightwatcher.__version__}")
    if not hasattr(wwmod, "torch"):
        # WW only binds `torch` when it is importable; its state-dict reader compares
        # `type(w) == torch.Tensor`, so without torch a stand-in class is needed (docs/htsr.md §WeightWatcher engine).
        wwmod.torch = types.SimpleNamespace(Tensor=type("_NoTorchTensor", (), {}))
    _ww_module = weightwatcher
    return weightwatcher


def _drop_torch_notice(record: logging.LogRecord) -> bool:
    """Logging filter: drops WW's 'Can not load torch, stopping' (it stops nothing; the shim handles it)."""
    return not str(record.msg).startswith("Can not load torch")


@contextlib.contextmanager
def _quiet_ww_call() -> Iterator[None]:
    """Context of every WW call: global state preserved, warnings ignored, stdout dropped.

    WW's logger only lets ERROR and above through (clip_xmax failures are logged as
    warnings by WW and are reported here through the status column instead), minus the
    misleading 'Can not load torch, stopping' notice of the no-torch path.
    """
    ww_logger = logging.getLogger(WW_LOGGER)
    with _preserved_global_state(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ww_logger.setLevel(logging.ERROR)
        ww_logger.addFilter(_drop_torch_notice)
        try:
            yield
        finally:
            ww_logger.removeFilter(_drop_torch_notice)


def _run_analyze(ww: Any, model: dict, seed: int, **kwargs: Any) -> Any:
    """One `WeightWatcher().analyze` call after `np.random.seed(seed)`; the global RNG is restored after."""
    rng_state = np.random.get_state()
    try:
        with _quiet_ww_call():
            np.random.seed(seed)
            return ww.WeightWatcher().analyze(model=model, vectors=False, detX=False, plot=False,
                                              svd_method="accurate", **kwargs)
    finally:
        np.random.set_state(rng_state)


def _value(row: Any, column: str) -> float:
    """A WW detail value as float; missing, None and WW's -1 placeholders are left to the caller."""
    if column not in row.index or row[column] is None:
        return np.nan
    return float(row[column])


def _convert_row(name: str, W: np.ndarray, row: Any, randomize: bool) -> dict:
    """Maps one WW details row to the native engine's columns (see module docstring)."""
    N, M = max(W.shape), min(W.shape)
    out: dict[str, Any] = dict(name=name, N=N, M=M, Q=N / M)
    for src, dst in _COPIED.items():
        out[dst] = _value(row, src)
    out["status"] = str(row.get("status", "failed"))
    if out["status"] != "success":
        # WW fills a failed fit with -1 (and xmax None); make it NaN, never a number.
        out.update({c: np.nan for c in _FIT_COLUMNS})
    if out["raw_alpha"] == -1:
        out["raw_alpha"] = np.nan
    for c in ("num_pl_spikes", "num_fingers", "num_evals"):
        if np.isfinite(out[c]):
            out[c] = int(out[c])
    if randomize:
        n_shuffles = htsr.n_shuffles_for(M)
        ok = bool(np.isfinite(out["rand_sigma_mp"])) and out["rand_sigma_mp"] != -1
        out["mp_status"] = "success" if ok else "failed"
        if ok:
            out["traps"] = int(out["traps"])
        else:
            for c in ("traps", "rand_sigma_mp", "rand_bulk_max", "rand_bulk_min"):
                out[c] = np.nan
        out["n_shuffles"] = n_shuffles
        out["traps_per_shuffle"] = out["traps"] / n_shuffles
        out["mp_ks"] = np.nan
        out["mp_pvalue"] = np.nan
    else:
        out.update({c: np.nan for c in htsr.RAND_COLUMNS}, mp_status="not_run")
    return {c: out[c] for c in htsr.ROW_COLUMNS}


def analyze_weights_ww(weights: Mapping[str, Any], *, seed: int, randomize: bool = True,
                       fix_fingers: str | None = "clip_xmax") -> list[dict]:
    """Runs WeightWatcher 0.7.5.5 on numpy weights; rows use the native engine's columns.

    The call is `WeightWatcher().analyze(model={f"{name}.weight": W}, vectors=False,
    detX=False, plot=False, fix_fingers=..., randomize=..., svd_method='accurate')` right
    after `np.random.seed(seed)` (the global legacy RNG is restored afterwards). Columns:
    alpha, raw_alpha, num_fingers, xmin, xmax, D, sigma, num_pl_spikes, status,
    lambda_max, num_evals, norm, and with randomize traps (= rand_num_spikes),
    traps_per_shuffle, n_shuffles, rand_sigma_mp, rand_bulk_max, rand_bulk_min,
    max_rand_eval, mp_status; mp_ks and mp_pvalue are NaN (WW has no such test).
    WW's -1 placeholders of a failed fit become NaN with status 'failed'.

    raw_alpha: WW reports -1 for raw_alpha too when clip_xmax raises (FC3, 10
    eigenvalues). For such layers a second, non-random call without fix_fingers is made
    and its alpha -- WW's unclipped fit of the same eigenvalues, i.e. what raw_alpha is on
    layers where clip_xmax succeeds -- is reported as raw_alpha. Without fix_fingers,
    raw_alpha = alpha and num_fingers = 0.

    Layers WW skips (min(shape) < 10, WW's min_evals) get a row with status 'skipped'.

    Args:
        weights: layer name -> 2-D weight matrix (any orientation; converted to float64).
        seed: value for `np.random.seed` before the call (the shuffles' stream).
        randomize: compute correlation traps.
        fix_fingers: 'clip_xmax' (the paper's setting) or None.

    Returns:
        One dict per layer, in the mapping's order.
    """
    if fix_fingers not in (None, False, "clip_xmax"):
        raise ValueError(f"fix_fingers must be 'clip_xmax' or None, got {fix_fingers!r}")
    ww = _import_ww()
    mats = {name: np.asarray(W, dtype=np.float64) for name, W in weights.items()}
    model = {f"{name}.weight": W for name, W in mats.items()}
    details = _run_analyze(ww, model, seed, fix_fingers=fix_fingers or False, randomize=randomize)
    by_name = {str(r["name"]): r for _, r in details.iterrows()}
    rows = []
    for name, W in mats.items():
        if name not in by_name:
            rows.append(_skipped_row(name, W, randomize))
            continue
        row = _convert_row(name, W, by_name[name], randomize)
        if not fix_fingers:
            row["raw_alpha"] = row["alpha"]
            row["num_fingers"] = 0 if row["status"] == "success" else np.nan
        rows.append(row)
    if fix_fingers and any(r["status"] == "failed" for r in rows):
        plain = _run_analyze(ww, model, seed, fix_fingers=False, randomize=False)
        plain_alpha = {str(r["name"]): (r["alpha"], r["status"]) for _, r in plain.iterrows()}
        for r in rows:
            if r["status"] == "failed" and r["name"] in plain_alpha:
                alpha, status = plain_alpha[r["name"]]
                r["raw_alpha"] = float(alpha) if status == "success" else np.nan
    return rows


def fit_powerlaw_ww(evals: Any, *, fix_fingers: str | None = "clip_xmax", max_fingers: int = 10,
                    finger_thresh: float = 1.0) -> dict:
    """WW 0.7.5.5's `WeightWatcher().fit_powerlaw` on given eigenvalues (sorted first, as analyze does).

    This is the power-law step of `analyze()` without the SVD, to compare estimators on
    identical eigenvalues (e.g. synthetic Pareto samples). When clip_xmax fails, raw_alpha
    comes from a second call without fix_fingers, as in `analyze_weights_ww`.

    Args:
        evals: the eigenvalues.
        fix_fingers: 'clip_xmax' or None.
        max_fingers: WW's max_fingers.
        finger_thresh: WW's finger_thresh.

    Returns:
        dict with the `grokjax.analysis.htsr.fit_power_law` keys: alpha, raw_alpha, xmin, xmax, D,
        sigma, num_pl_spikes, num_fingers, status (failed fits as NaN).
    """
    if fix_fingers not in (None, False, "clip_xmax"):
        raise ValueError(f"fix_fingers must be 'clip_xmax' or None, got {fix_fingers!r}")
    ww = _import_ww()
    evals = np.sort(np.asarray(evals, dtype=np.float64).ravel())

    def call(fix: str | None) -> tuple:
        with _quiet_ww_call():
            return ww.WeightWatcher().fit_powerlaw(evals, plot=False, savefig=False, fix_fingers=fix or False,
                                                   max_fingers=max_fingers, finger_thresh=finger_thresh)

    alpha, _, xmin, xmax, D, sigma, num_pl_spikes, num_fingers, raw_alpha, status, _ = call(fix_fingers)
    if status != "success":
        plain = call(None)
        raw = float(plain[0]) if plain[9] == "success" else np.nan
        return dict(alpha=np.nan, raw_alpha=raw, xmin=np.nan, xmax=np.nan, D=np.nan, sigma=np.nan,
                    num_pl_spikes=np.nan, num_fingers=np.nan, status="failed")
    if not fix_fingers:
        raw_alpha = alpha
    return dict(alpha=float(alpha), raw_alpha=float(raw_alpha), xmin=float(xmin), xmax=float(xmax), D=float(D),
                sigma=float(sigma), num_pl_spikes=int(num_pl_spikes), num_fingers=int(num_fingers), status="success")


def _skipped_row(name: str, W: np.ndarray, randomize: bool) -> dict:
    """The row of a layer WW did not analyse (min(shape) below its min_evals): all NaN."""
    N, M = max(W.shape), min(W.shape)
    row: dict[str, Any] = dict(name=name, N=N, M=M, Q=N / M)
    row.update({c: np.nan for c in _COPIED.values()})
    row.update({c: np.nan for c in htsr.RAND_COLUMNS})
    row.update(status="skipped", mp_status="skipped" if randomize else "not_run")
    return {c: row[c] for c in htsr.ROW_COLUMNS}
