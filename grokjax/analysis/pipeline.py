"""Analyse a run directory: HTSR metrics, progress measures and norms at every checkpoint.

`analyze_run(run_dir, options)` restores every saved params step (`grokjax.ckpt`), runs the
native HTSR engine (`grokjax.analysis.htsr`) and, with engine 'ww' or 'both', WeightWatcher 0.7.5.5
(`grokjax.analysis.wwadapter`), computes the progress measures (`grokjax.analysis.progress`), and returns two
tidy tables:

* layers: one row per (run, step, layer, engine) with the engine's columns (alpha,
  raw_alpha, xmin, xmax, D, sigma, num_pl_spikes, num_fingers, status, lambda_max,
  num_evals, norm, traps, traps_per_shuffle, n_shuffles, rand_sigma_mp, rand_bulk_max,
  rand_bulk_min, max_rand_eval, mp_ks, mp_pvalue, mp_status, N, M, Q);
* steps: one row per (run, step): the metrics.jsonl record, params/l2 and
  params/l2_weights recomputed from the checkpoint, the progress measures, per engine
  `<engine>/alpha_<layer>`, `<engine>/alpha_mean` (FC1+FC2, as the paper's tables),
  `<engine>/traps_<layer>`, the seconds each part took (time/load, time/native, time/ww,
  time/progress), and a status ('ok'; 'no_checkpoint': evaluated, no checkpoint saved;
  'unreadable': the checkpoint is empty, incomplete or cannot be restored, and is skipped).

Before anything is computed, `read_run` checks the run directory (`grokjax.analysis.preflight`):
invalid metrics lines are dropped (with the checkpoint of their step), unusable checkpoints
skipped, each with one AnalysisWarning line, or an AnalysisError with `strict`.

Shuffles: checkpoint `step` of a run with seed s is analysed with the legacy stream
`RandomState(checkpoint_seed(s, step))` walked through fc1, fc2, fc3 in order, and WW is
called after `np.random.seed(checkpoint_seed(s, step))`: both engines see the same W^rand,
so their trap counts differ only through the MP fit.

Results are cached next to the run (`<run_dir>/analysis/{layers,steps}.{parquet,csv}` and
`key.json`). The key hashes the options, the engine code and versions, and the run's identity
(its config and creation time); with the same key, rows of checkpoints already analysed are
reused, as long as the checkpoint's bytes are unchanged (its fingerprint, stored in key.json),
and only new or changed checkpoints are computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from grokjax import ckpt, rundir
from grokjax.analysis import htsr, meanaware, modadd, phases, pool, preflight, progress, wwadapter
from grokjax.analysis.preflight import AnalysisError  # noqa: F401  (raised here; importers take it from either module)
from grokjax.analysis.htsr import HTSROptions
from grokjax.analysis.progress import ProgressOptions
from grokjax.analysis.runs import Run, read_run  # noqa: F401  (read_run: the run layer, re-exported)
from grokjax.rundir import LAYERS

MONITOR_K_SHUFFLES = 10  # grokjax.analysis.monitor.K_SHUFFLES
ANALYSIS_VERSION = 2  # 2: the native rows carry the mean-aware, K-shuffle columns
ENGINES = ("native", "ww", "both")
TABLE_LAYER_COLUMNS = ("run", "wd", "seed", "step", "layer", "engine")
# Step-table columns computed from a checkpoint (the rest come from metrics.jsonl or are derived).
COMPUTED_STEP_COLUMNS = ("progress/sparsity", "progress/sparsity_smooth", "progress/entropy_fc1",
                         "progress/entropy_fc2", "progress/entropy_fc3", "progress/circuit", "params/l2",
                         "params/l2_weights", "time/load", "time/native", "time/progress",
                         *(c for c in modadd.MEASURE_COLUMNS if c != "params/l2"))
_SEED_TAG = 0xA1FA


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnalysisOptions:
    """How a run is analysed. Only `htsr` and `progress` enter the cache key; cached rows
    are matched per checkpoint and engine.

    Attributes:
        engine: 'native' (grokjax.analysis.htsr), 'ww' (WeightWatcher 0.7.5.5) or 'both'. The
            progress measures and norms are computed whatever the engine.
        htsr: options of both engines' HTSR pass (the paper's clip_xmax + randomize).
        progress: options of the progress measures.
        use_monitor: read the native rows (when `htsr` and `k_shuffles` are the monitor's) and
            the progress measures (when `progress` is the default too) of steps that the in-loop
            monitor recorded from its record instead of the checkpoint.
        k_shuffles: shuffles averaged in the native engine's mean-aware columns
            (`meanaware.extended_metrics`: traps_k_mean, traps_centred, alpha_centred, ...); 0: none.
        ww_stride: WW runs on every ww_stride-th checkpoint plus the first, the last and
            the phase steps (WW costs ~2.5-6 s per checkpoint, the native engine ~0.1 s).
        workers: worker processes (checkpoints are always read in workers, never here).
        progress_bar: show a tqdm bar over checkpoints.
        reuse: reuse cached rows when the key matches (and the checkpoint's bytes are unchanged).
        write: write the tables and key next to the run.
        strict: an input problem (a dropped metrics line, an unreadable or missing
            checkpoint, ...) is an AnalysisError instead of an AnalysisWarning.
    """

    engine: str = "both"
    htsr: HTSROptions = dataclasses.field(default_factory=HTSROptions)
    progress: ProgressOptions = dataclasses.field(default_factory=ProgressOptions)
    ww_stride: int = 1
    k_shuffles: int = MONITOR_K_SHUFFLES
    use_monitor: bool = True
    workers: int = 2
    progress_bar: bool = True
    reuse: bool = True
    write: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.ww_stride < 1:
            raise ValueError(f"ww_stride must be >= 1, got {self.ww_stride}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def engines(self) -> tuple[str, ...]:
        """The engines to run, native first."""
        return ("native", "ww") if self.engine == "both" else (self.engine,)


def _one_line(text: str, limit: int = 400) -> str:
    """A message on one line, without TensorStore's spec dump, at most `limit` characters."""
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkpoint_seed(run_seed: int, step: int) -> int:
    """The shuffle seed of one checkpoint (a 32-bit int, valid for np.random.seed)."""
    return int(np.random.SeedSequence([_SEED_TAG, int(run_seed), int(step)]).generate_state(1)[0])


def weights_of(params: dict) -> dict[str, np.ndarray]:
    """{fc1, fc2, fc3} -> kernel (in, out); the spectrum does not depend on the orientation.
    A transformer's tree (--task modadd) gives its 8 matrices (`modadd.weight_matrices`)."""
    if modadd.is_modadd_params(params):
        return modadd.weight_matrices(params)
    return {k: np.asarray(params[k]["kernel"], dtype=np.float64) for k in LAYERS}


def layer_names(config: dict) -> tuple[str, ...]:
    """The analysed matrices of a run, by its config.json's task (an MLP run names none)."""
    return modadd.MATRICES if config.get("task", "mnist_mlp") == "modadd" else LAYERS


def input_spec(config: dict, seed: int, options: AnalysisOptions) -> dict:
    """The arguments of `load_inputs` for a run's progress measures (by its config.json)."""
    if config.get("task", "mnist_mlp") == "modadd":
        return dict(task="modadd", p=int(config["p"]), frac_train=float(config["frac_train"]),
                    split_seed=int(config["split_seed"]))
    return dict(n_per_class=int(config.get("n_per_class", 100)), data_seed=int(config.get("data_seed", 0)),
                seed=seed, n_fixed=options.progress.n_fixed)


def load_inputs(spec: dict) -> dict:
    """The progress measures' inputs of `input_spec`: MNIST images, or the transformer's pairs."""
    if spec.get("task") == "modadd":
        return modadd.load_inputs(spec["p"], spec["frac_train"], spec["split_seed"])
    return progress.load_inputs(**spec)


def _error_rows(weights: dict, message: str) -> list[dict]:
    return [dict(name=k, N=max(W.shape), M=min(W.shape), Q=max(W.shape) / min(W.shape), status="error",
                 mp_status="error", error=message) for k, W in weights.items()]


def htsr_rows(weights: dict, *, engine: str, seed: int, options: HTSROptions) -> list[dict]:
    """One engine's per-layer rows (keys as in `grokjax.analysis.htsr.analyze_matrix`, plus engine).

    A matrix the engine rejects (non-finite entries) gives rows with status 'error'.
    """
    try:
        if engine == "native":
            rows = htsr.analyze_weights(weights, options=options, rng=np.random.RandomState(seed))
        else:
            rows = wwadapter.analyze_weights_ww(weights, seed=seed, randomize=options.randomize,
                                                fix_fingers=options.fix_fingers)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
        rows = _error_rows(weights, f"{type(e).__name__}: {e}")
    return [dict(r, engine=engine) for r in rows]


def monitor_rows_compatible(options: AnalysisOptions) -> bool:
    """Whether the in-loop monitor's native HTSR rows are what these options would compute."""
    return options.htsr == HTSROptions() and options.k_shuffles == MONITOR_K_SHUFFLES and options.use_monitor


def monitor_compatible(options: AnalysisOptions) -> bool:
    """Whether the in-loop monitor's records hold all these options would compute (the HTSR rows
    and the progress measures)."""
    return monitor_rows_compatible(options) and options.progress == ProgressOptions()


def _with_extended(rows: list[dict], weights: dict, seed: int, options: AnalysisOptions,
                   rand_out: dict | None = None) -> list[dict]:
    """Adds `meanaware.extended_weights` (mean-aware, K-shuffle columns) to the native rows.

    Draw 0 walks the same RandomState(seed) stream as the native rows, so its `traps_raw`
    equals their `traps`, and its W^rand eigenvalues (into `rand_out`, per layer) are
    `htsr.shuffle_spectra(weights, seed)`'s.
    """
    try:
        ext = meanaware.extended_weights(weights, seed=seed, k_shuffles=options.k_shuffles,
                                         rng=np.random.RandomState(seed), options=options.htsr, rand_out=rand_out)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
        return [dict(r, extended_error=f"{type(e).__name__}: {e}") for r in rows]
    return [dict(r, **{k: v for k, v in ext.get(r["name"], {}).items() if k not in r}) for r in rows]


def analyze_checkpoint(params: dict, *, step: int, run_seed: int, options: AnalysisOptions,
                       inputs: dict[str, np.ndarray], engines: tuple[str, ...] = ("native",),
                       with_progress: bool = True, rand_out: dict | None = None) -> tuple[list[dict], dict]:
    """Analyses one parameter set.

    Args:
        params: {fc1, fc2, fc3} x {kernel, bias} numpy arrays.
        step, run_seed: identify the checkpoint (they key the shuffles and dropout masks).
        options: AnalysisOptions (its htsr and progress fields are used).
        inputs: `progress.load_inputs(...)` images.
        engines: which HTSR engines to run.
        with_progress: compute the progress measures and norms.
        rand_out: if given (and the native engine runs with k_shuffles > 0), receives per
            layer the W^rand eigenvalues the trap count used (`htsr.shuffle_spectra`'s
            `evals`), taken from the K-shuffle pass instead of drawn again.

    Returns:
        (layer rows with 'layer', 'engine' and 'step', step row with the computed columns).
    """
    weights = weights_of(params)
    seed = checkpoint_seed(run_seed, step)
    layer_rows, step_row = [], {"step": int(step)}
    for engine in engines:
        t0 = time.perf_counter()
        rows = htsr_rows(weights, engine=engine, seed=seed, options=options.htsr)
        if engine == "native" and options.k_shuffles > 0:
            rows = _with_extended(rows, weights, seed, options, rand_out)
        for r in rows:
            r["layer"] = r.pop("name")
            r["step"] = int(step)
            layer_rows.append(r)
        step_row[f"time/{engine}"] = time.perf_counter() - t0
    if with_progress:
        t0 = time.perf_counter()
        if inputs.get("task") == "modadd":
            step_row.update(modadd.compute_measures(params, inputs))
        else:
            step_row.update(progress.compute_progress(params, x_fixed=inputs["x_fixed"], x_all=inputs["x_all"],
                                                      options=options.progress, seed=run_seed, step=step))
        step_row["time/progress"] = time.perf_counter() - t0
    return layer_rows, step_row


# --------------------------------------------------------------------------------------
# Workers

_WORKER: dict = {}


def _init_worker(run_dir: str, run_seed: int, options: AnalysisOptions, input_spec: dict | None) -> None:
    """Per-process state. Workers load the images themselves (from the offline MNIST cache),
    so that nothing large travels through the spawn pipe."""
    pool.quiet_worker_stderr()
    inputs = load_inputs(input_spec) if input_spec is not None else {}
    _WORKER.update(run_dir=run_dir, run_seed=run_seed, options=options, inputs=inputs)
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def _task(step: int, engines: tuple[str, ...], with_progress: bool) -> tuple[list[dict], dict]:
    """One checkpoint's rows; an unreadable checkpoint gives ([], {'step', 'error'})."""
    t0 = time.perf_counter()
    try:
        params = ckpt.load_params(_WORKER["run_dir"], step)
    except ckpt.CheckpointError as e:
        return [], {"step": int(step), "error": str(e)}
    load = time.perf_counter() - t0
    layers, row = analyze_checkpoint(params, step=step, run_seed=_WORKER["run_seed"], options=_WORKER["options"],
                                     inputs=_WORKER["inputs"], engines=engines, with_progress=with_progress)
    if with_progress:
        row["time/load"] = load
    return layers, row


def _run_tasks(run: Run, tasks: list[tuple[int, tuple[str, ...], bool]], options: AnalysisOptions,
               input_spec: dict | None) -> list[tuple[list[dict], dict]]:
    """Runs the checkpoint tasks in the analysis' worker pool (`grokjax.analysis.pool`)."""
    return pool.run_tasks(_task, tasks, initializer=_init_worker,
                          initargs=(str(run.path), run.seed, options, input_spec), workers=options.workers,
                          desc=run.name, progress_bar=options.progress_bar)


# --------------------------------------------------------------------------------------
# Cache


def _source_hash(*modules) -> str:
    """A digest of the modules' source text (wherever the checkout lies)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_key(run: Run, options: AnalysisOptions) -> dict:
    """The inputs that decide the cached rows.

    Checkpoint steps and engines are matched row by row (a new checkpoint, or WW asked for
    after a native-only pass, computes only what is missing), so they are not in the key.
    """
    return {
        "analysis_version": ANALYSIS_VERSION,
        "htsr": dataclasses.asdict(options.htsr),
        "progress": dataclasses.asdict(options.progress),
        "k_shuffles": options.k_shuffles,
        "code": _source_hash(htsr, meanaware, progress, modadd),
        "ww_version": wwadapter.ww_version(),
        "ww_code": _source_hash(wwadapter),
        "run": {"config": run.config, "created": run.created},
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _load_cache(cache_dir: Path, digest: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, str]] | None:
    """(layers, steps, {step: checkpoint fingerprint}) of the cache, or None if absent or stale."""
    try:
        stored = json.loads((cache_dir / "key.json").read_text())
        if stored.get("digest") != digest:
            return None
        prints = {int(k): str(v) for k, v in stored.get("fingerprints", {}).items()}
        return pd.read_parquet(cache_dir / "layers.parquet"), pd.read_parquet(cache_dir / "steps.parquet"), prints
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def write_table(df: pd.DataFrame, path_stem: Path) -> None:
    """Writes df as <stem>.parquet and <stem>.csv, each atomically (`rundir.atomic_write`)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(path_stem.with_suffix(".parquet"), lambda tmp: df.to_parquet(tmp, index=False))
    rundir.atomic_write(path_stem.with_suffix(".csv"), lambda tmp: df.to_csv(tmp, index=False))


def _write_cache(cache_dir: Path, key: dict, digest: str, layers: pd.DataFrame, steps: pd.DataFrame,
                 fingerprints: dict[int, str], strict: bool) -> None:
    """Writes the cache; the fingerprints of the analysed checkpoints guard each row's reuse."""
    ok = sorted(int(s) for s in steps.loc[steps["status"] == "ok", "step"])
    try:
        write_table(layers, cache_dir / "layers")
        write_table(steps, cache_dir / "steps")
        payload = {"digest": digest, "key": key, "fingerprints": {str(s): fingerprints[s] for s in ok}}
        rundir.atomic_write_text(cache_dir / "key.json", json.dumps(payload, indent=1, default=str) + "\n")
    except OSError as e:
        preflight.report([f"{cache_dir}: could not write the analysis cache ({e.strerror or e})"], strict)


# --------------------------------------------------------------------------------------
# Tables


def ww_steps(run: Run, stride: int) -> set[int]:
    """Checkpoints WW analyses: every stride-th, the first, the last and the checkpoints the
    phases are read at (`phases.nearest_step` of each phase step, as in the tables)."""
    steps = list(run.steps)
    if not steps:
        return set()
    chosen = set(steps[::stride]) | {steps[0], steps[-1]}
    if stride > 1 and {"train/acc", "test/acc"} <= set(run.metrics.columns) and len(run.metrics):
        ph = phases.detect_phases(run.metrics["step"], run.metrics["train/acc"], run.metrics["test/acc"])
        at = (phases.nearest_step(steps, s) for s in phases.phase_steps(ph).values())
        chosen |= {int(s) for s in at if np.isfinite(s)}
    return chosen


def _wide_columns(layers: pd.DataFrame, engines: tuple[str, ...]) -> pd.DataFrame:
    """Per-step `<engine>/alpha_<layer>`, `<engine>/alpha_mean`, `<engine>/traps_<layer>`, and where
    the rows carry them the mean-aware columns (`<engine>/alpha_centred_<layer>`,
    `<engine>/traps_centred_<layer>`, `<engine>/traps_k_mean_<layer>`, ...) and
    `<engine>/alpha_centred_mean`. The means are over FC1 and FC2 (the paper's tables); for the
    transformer's 8 matrices (--task modadd) over all 8 (its App. H)."""
    names = modadd.MATRICES if "embed" in set(layers["layer"]) else LAYERS
    averaged = list(names) if names == modadd.MATRICES else ["fc1", "fc2"]
    out = pd.DataFrame({"step": pd.Series(sorted(layers["step"].unique()) if len(layers) else [], dtype=np.int64)})
    for engine in engines:
        sub = layers[layers["engine"] == engine]
        if sub.empty:
            continue
        extra = [(c, c) for c in ("alpha_centred", "alpha_dcentred", "traps_k_mean", "traps_centred",
                                  "traps_centred_k_mean", "mean_over_std") if c in sub.columns]
        for col, name in (("alpha", "alpha"), ("traps", "traps"), *extra):
            wide = sub.pivot_table(index="step", columns="layer", values=col, aggfunc="first", dropna=False)
            wide = wide.reindex(columns=list(names))
            wide.columns = [f"{engine}/{name}_{c}" for c in wide.columns]
            out = out.merge(wide.reset_index(), on="step", how="left")
        out[f"{engine}/alpha_mean"] = out[[f"{engine}/alpha_{k}" for k in averaged]].mean(axis=1, skipna=False)
        if f"{engine}/alpha_centred_fc1" in out.columns:
            out[f"{engine}/alpha_centred_mean"] = out[[f"{engine}/alpha_centred_{k}"
                                                       for k in averaged]].mean(axis=1, skipna=False)
    return out


def _assemble(run: Run, layer_rows: pd.DataFrame, computed: pd.DataFrame, engines: tuple[str, ...]) -> tuple[
        pd.DataFrame, pd.DataFrame]:
    """Adds run/wd/seed, orders the columns, and builds the per-step table."""
    ident = {"run": run.name, "wd": run.wd, "seed": run.seed}
    layers = layer_rows.copy()
    for k, v in ident.items():
        layers[k] = v
    layers["_engine_rank"] = layers["engine"].map({e: i for i, e in enumerate(("native", "ww"))})
    layers = layers.sort_values(["_engine_rank", "step", "layer"]).drop(columns="_engine_rank").reset_index(drop=True)
    front = list(TABLE_LAYER_COLUMNS)
    layers = layers[front + [c for c in layers.columns if c not in front]]

    # The norms recomputed from the checkpoint replace the logged ones (equal to rounding);
    # steps without a checkpoint keep the logged values.
    logged = run.metrics.drop(columns=[c for c in ("run", "wd", "seed", "status") if c in run.metrics.columns])
    logged = logged.rename(columns={"params/l2": "_logged_l2", "params/l2_weights": "_logged_l2_weights"})
    steps = logged.merge(computed, on="step", how="outer", indicator=True)
    steps["status"] = steps["_merge"].map({"both": "ok", "left_only": "no_checkpoint",
                                           "right_only": "no_metrics"}).astype(str)
    steps.loc[steps["step"].isin(list(run.skipped)) & (steps["status"] == "no_checkpoint"), "status"] = "unreadable"
    for col in ("params/l2", "params/l2_weights"):
        if f"_logged_{col[7:]}" in steps.columns:
            steps[col] = steps[col].astype(float).fillna(steps[f"_logged_{col[7:]}"])
    steps = steps.drop(columns=[c for c in steps.columns if c.startswith("_")])
    if len(layers):
        steps = steps.merge(_wide_columns(layers, engines), on="step", how="left")
    for k, v in ident.items():
        steps[k] = v
    steps = steps.sort_values("step").reset_index(drop=True)
    front = ["run", "wd", "seed", "step", "status"]
    return layers, steps[front + [c for c in steps.columns if c not in front]]


@dataclasses.dataclass(frozen=True)
class AnalysisPlan:
    """What `analyze_run` reuses and what it computes for one run (`plan_run`).

    Attributes:
        run: the run, as read.
        key, digest, cache_dir: the cache key of these options (`cache_key`), its digest and
            the cache folder, `<run>/analysis`.
        cached_ok: the steps with status 'ok' in the cache found (empty without one).
        have_layers: cached layer rows these options ask for (and whose checkpoint is unchanged).
        other_layers: cached layer rows of engines or steps not asked for this time (kept in
            the cache: WW rows are costly).
        have_computed: cached computed step columns (`COMPUTED_STEP_COLUMNS`, time/ww).
        from_monitor: results read from the in-loop monitor's record, in `_task`'s shape.
        tasks: (step, engines, with_progress) for the workers: what only a checkpoint gives.
        input_spec: `progress.load_inputs` arguments when a task computes progress measures.
    """

    run: Run
    key: dict
    digest: str
    cache_dir: Path
    cached_ok: frozenset
    have_layers: pd.DataFrame
    other_layers: pd.DataFrame
    have_computed: pd.DataFrame
    from_monitor: list
    tasks: list
    input_spec: dict | None


def plan_run(run: Run, options: AnalysisOptions) -> AnalysisPlan:
    """Decides, per step and engine, what comes from the cache, what from the in-loop monitor's
    record and what a worker computes from the checkpoint; reads nothing but the cache."""
    cache_dir = run.path / rundir.ANALYSIS_DIR
    key = cache_key(run, options)
    digest = _digest(key)
    cached = _load_cache(cache_dir, digest) if options.reuse else None
    want_ww = ww_steps(run, options.ww_stride) if "ww" in options.engines else set()

    have_layers = other_layers = pd.DataFrame(columns=["step", "engine"])
    have_computed = pd.DataFrame(columns=["step"])
    cached_ok: set[int] = set()
    if cached is not None:
        c_layers, c_steps, c_prints = cached
        cached_ok = set(int(s) for s in c_steps.loc[c_steps["status"] == "ok", "step"])
        # Rows are reused only for checkpoints whose bytes are those that were analysed.
        same = [s for s in run.steps if c_prints.get(s) == run.fingerprints.get(s)]
        c_steps = c_steps[(c_steps["status"] == "ok") & c_steps["step"].isin(same)]
        cols = ["step"] + [c for c in (*COMPUTED_STEP_COLUMNS, "time/ww") if c in c_steps.columns]
        have_computed = c_steps[cols]
        c_layers = c_layers[c_layers["step"].isin(same)].drop(
            columns=[c for c in ("run", "wd", "seed") if c in c_layers.columns])
        wanted = c_layers["engine"].isin(options.engines) & (
            (c_layers["engine"] != "ww") | c_layers["step"].isin(want_ww))
        have_layers, other_layers = c_layers[wanted], c_layers[~wanted]
    done = set(zip(have_layers["step"].astype(int), have_layers["engine"]))
    done_steps = set(have_computed["step"].astype(int))

    # Steps the in-loop monitor recorded are read from its record where it holds what these
    # options compute: the native rows when the HTSR options are the monitor's, the progress
    # measures when the progress options are too (`--paper-text` recomputes only the measures);
    # only what it lacks (WeightWatcher rows, other measures) needs the checkpoint.
    from_monitor = []
    use_rows, use_measures = monitor_rows_compatible(options), monitor_compatible(options)
    kept = {s for s in run.steps if not str(run.fingerprints.get(s, "")).startswith("monitor:")}
    tasks = []
    for s in run.steps:
        engines = tuple(e for e in options.engines if (e == "native" or s in want_ww) and (s, e) not in done)
        need_progress = s not in done_steps
        take_rows = use_rows and "native" in engines
        take_measures = use_measures and need_progress
        if s in run.recorded and (take_rows or take_measures):
            rec = run.recorded[s]
            from_monitor.append(([dict(r, engine="native") for r in rec["layers"]] if take_rows else [],
                                 {**rec["measures"], "step": s} if take_measures else {"step": s}))
            if take_rows:
                engines = tuple(e for e in engines if e != "native")
            if take_measures:
                need_progress = False
        if s not in kept:  # no checkpoint: nothing more can be computed for this step
            continue
        if engines or need_progress:
            tasks.append((s, engines, need_progress))

    spec = input_spec(run.config, run.seed, options) if any(t[2] for t in tasks) else None
    return AnalysisPlan(run=run, key=key, digest=digest, cache_dir=cache_dir, cached_ok=frozenset(cached_ok),
                        have_layers=have_layers, other_layers=other_layers, have_computed=have_computed,
                        from_monitor=from_monitor, tasks=tasks, input_spec=spec)


def merge_run(plan: AnalysisPlan, results: list[tuple[list[dict], dict]],
              options: AnalysisOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merges the cached rows with `results` (the monitor's and the workers', `_task`'s shape),
    drops the steps whose checkpoint failed to restore (an AnalysisWarning, an AnalysisError
    with `options.strict`), builds the two tables (`_assemble`) and writes the cache when it
    changed."""
    run, have_layers = plan.run, plan.have_layers
    other_layers, have_computed = plan.other_layers, plan.have_computed
    failed = {row["step"]: row["error"] for _, row in results if "error" in row}
    if failed:
        preflight.report([f"step {s} skipped: {_one_line(msg, 300)}" for s, msg in sorted(failed.items())],
                         options.strict)
        run = dataclasses.replace(run, skipped={**run.skipped, **failed},
                                  steps=tuple(s for s in run.steps if s not in failed))
        results = [r for r in results if r[1]["step"] not in failed]
        have_layers = have_layers[~have_layers["step"].isin(list(failed))]
        other_layers = other_layers[~other_layers["step"].isin(list(failed))]
        have_computed = have_computed[~have_computed["step"].isin(list(failed))]

    new_layers = [r for layers, _ in results for r in layers]
    layer_df = pd.concat([have_layers, pd.DataFrame(new_layers)], ignore_index=True) if new_layers else have_layers
    rows = [row for _, row in results if row.get("time/progress") is not None]
    computed = pd.concat([have_computed, pd.DataFrame(rows)], ignore_index=True) if rows else have_computed
    # Engine timings of steps whose progress row was cached land on that row.
    for engine in options.engines:
        times = {row["step"]: row[f"time/{engine}"] for _, row in results if f"time/{engine}" in row}
        if times:
            old = computed[f"time/{engine}"] if f"time/{engine}" in computed.columns else np.nan
            new = computed["step"].map(times)
            computed[f"time/{engine}"] = new.where(new.notna(), old)
    computed = computed.astype({"step": np.int64}).sort_values("step").reset_index(drop=True)
    layer_df["step"] = layer_df["step"].astype(np.int64)
    layers, steps = _assemble(run, layer_df, computed, options.engines)
    # A cache that would only be written again as it is stays untouched.
    if options.write and (plan.tasks or plan.cached_ok != set(int(s) for s in computed["step"])):
        # Rows of engines not asked for this time stay in the cache (WW rows are costly).
        kept = _assemble(run, other_layers.astype({"step": np.int64}), computed, ())[0] if len(other_layers) else None
        _write_cache(plan.cache_dir, plan.key, plan.digest, pd.concat([layers, kept], ignore_index=True)
                     if kept is not None else layers, steps, run.fingerprints, options.strict)
    steps.attrs["computed_checkpoints"] = len(plan.tasks)
    return layers, steps


def analyze_run(run_dir: str | os.PathLike | Run, options: AnalysisOptions | None = None, *,
                name: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Analyses every usable params checkpoint of a run (see the module docstring):
    `plan_run`, the planned tasks in the worker pool, then `merge_run`.

    A checkpoint that cannot be restored is skipped with an AnalysisWarning (its row has
    status 'unreadable'); with `options.strict` it is an AnalysisError, raised before the
    cache is written.

    Args:
        run_dir: a run directory (config.json, metrics.jsonl, checkpoints/params/<step>),
            or a `Run` from `read_run` (its checks are not repeated).
        options: AnalysisOptions.
        name: the value of the `run` column (default: the directory name).

    Returns:
        (layer table, step table), see the module docstring.

    Raises:
        AnalysisError: the run cannot be analysed (see `read_run`), or a problem with `strict`.
    """
    options = options or AnalysisOptions()
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir, name, strict=options.strict)
    plan = plan_run(run, options)
    results = plan.from_monitor + _run_tasks(run, plan.tasks, options, plan.input_spec)
    return merge_run(plan, results, options)
