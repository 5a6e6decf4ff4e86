"""Tables 1 and 2 over phase windows: one checkpoint's value beside the window's median and IQR.

With `clip_xmax`, alpha jumps between neighbouring checkpoints, so a table that reads one
checkpoint per phase can mislead. Each cell here has two numbers per run: the value at the
phase's checkpoint (the paper's reading, kept as its own column) and the median with the
interquartile range over the phase's window of analysed evaluations
(`grokjax.analysis.phases.phase_windows`: the last quarter decade of the pre-grokking plateau; every
evaluation within 0.5 points of the peak test accuracy; the collapse's minimum within 0.5
points, or the last quarter decade when nothing collapsed). A fourth column reads every run
at 10^5 steps, the paper's nominal pre-grokking point, with the quarter decade before it as
its window.

Rows are the raw WeightWatcher-compatible metrics plus, when the layer table has them, the
mean-aware ones of `grokjax.analysis.meanaware.extended_metrics` (`alpha_centred`, `traps_k_mean`,
`traps_centred`); rows whose column is absent or all NaN are left out. Runs are grouped by
(weight decay, run length): runs of different lengths are never pooled into one ±.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from grokjax.analysis.phases import PHASE_TITLES, PhaseOptions, nearest_step, phase_title, phase_windows

# The paper reads pre-grokking at ~1e5 steps (its Tables 1, 2, 4).
NOMINAL_STEP = 100_000
COLUMNS = ("pre", "nominal", "grok", "anti")
NOMINAL_TITLE = "10^5 steps (paper's pre-grokking)"
GROUP_KEYS = ("wd", "steps", "engine", "layer", "metric", "phase")

TABLE1_ROWS = (("fc1", "alpha", "FC1 α"), ("fc2", "alpha", "FC2 α"), ("mean", "alpha", "average α (FC1, FC2)"),
               ("fc1", "alpha_centred", "FC1 α, W − mean"), ("fc2", "alpha_centred", "FC2 α, W − mean"),
               ("mean", "alpha_centred", "average α, W − mean"))
TABLE2_ROWS = (("fc1", "traps", "FC1 traps"), ("fc2", "traps", "FC2 traps"),
               ("fc1", "traps_k_mean", "FC1 traps, mean of K shuffles"),
               ("fc2", "traps_k_mean", "FC2 traps, mean of K shuffles"),
               ("fc1", "traps_centred", "FC1 traps, W − mean"), ("fc2", "traps_centred", "FC2 traps, W − mean"))


def format_cell(mean: float, std: float, n: int, metric: str) -> str:
    """A table cell: the mean alone for one run, else mean ± std; digits by metric (traps of
    one run as counts, the KS statistic to 4, sigma_mp to 3, the p-value to 3 significant)."""
    if n == 0 or not np.isfinite(mean):
        return "–"
    if metric == "mp_pvalue":
        txt = f"{mean:.3g}"
        return txt if n == 1 else f"{txt} ± {std:.2g}"
    digits = 4 if metric == "mp_ks" else (3 if metric == "rand_sigma_mp" else 2)
    if metric.startswith("traps") and n == 1:  # traps, traps_centred: counts
        digits = 0
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def available_rows(layers: pd.DataFrame, rows) -> tuple:
    """The rows whose metric column exists in `layers` with at least one finite value."""
    keep = []
    for layer, col, label in rows:
        if col not in layers:
            continue
        want = ("fc1", "fc2") if layer == "mean" else (layer,)
        vals = pd.to_numeric(layers.loc[layers["layer"].isin(want), col], errors="coerce")
        if np.isfinite(vals.to_numpy(float)).any():
            keep.append((layer, col, label))
    return tuple(keep)


def _series(eng_df: pd.DataFrame, layer: str, col: str) -> pd.Series:
    """step -> value of one engine's metric; 'mean' is the FC1+FC2 mean (NaN if either is)."""
    if layer == "mean":
        wide = eng_df[eng_df["layer"].isin(["fc1", "fc2"])].pivot_table(
            index="step", columns="layer", values=col, aggfunc="first", dropna=False)
        wide = wide.reindex(columns=["fc1", "fc2"]).astype(float)
        return wide.mean(axis=1, skipna=False)
    sub = eng_df[eng_df["layer"] == layer]
    return pd.Series(sub[col].astype(float).to_numpy(), index=sub["step"].to_numpy()).groupby(level=0).first()


def window_values(layers: pd.DataFrame, steps: pd.DataFrame, phases_df: pd.DataFrame, rows, *,
                  options: PhaseOptions | None = None) -> pd.DataFrame:
    """Long table: one row per (run, engine, layer, metric, phase) with the checkpoint value
    and the window statistics.

    The checkpoint value is read at the phase's `<phase>_ckpt` column of `phases_df` when it
    has one, else at the analysed step nearest the phase step in log(1 + step). The window is
    `phase_windows` on the run's evaluations, intersected with this engine's analysed
    steps where the metric is finite. 'nominal' reads NOMINAL_STEP (runs shorter than it
    give NaN) with the window [NOMINAL_STEP * 10^-w, NOMINAL_STEP].

    Returns:
        Columns run, wd, steps (the run's final step), seed, collapsed, engine, layer,
        metric, phase, step (the phase step), step_used, value, win_median, win_q25,
        win_q75, win_n, win_first, win_last.
    """
    options = options or PhaseOptions()
    out = []
    for ph in phases_df.to_dict("records"):
        run_steps = steps[steps["run"] == ph["run"]]
        run_steps = run_steps[run_steps["test/acc"].notna()]
        windows = phase_windows(run_steps["step"], run_steps["test/acc"], ph, options=options)
        reaches = ph["final_step"] >= NOMINAL_STEP
        evals = np.sort(run_steps["step"].to_numpy(np.int64))
        lo = NOMINAL_STEP * 10.0 ** -options.edge_window_decades
        windows["nominal"] = evals[(evals >= lo) & (evals <= NOMINAL_STEP)] if reaches else evals[:0]
        targets = {"pre": ph["pre_step"], "grok": ph["grok_step"], "anti": ph["anti_step"],
                   "nominal": NOMINAL_STEP if reaches else math.nan}
        mine = layers[layers["run"] == ph["run"]]
        for engine, eng_df in mine.groupby("engine", sort=False):
            analysed = np.unique(eng_df["step"].to_numpy(np.int64))
            for phase in COLUMNS:
                target = targets[phase]
                used = ph.get(f"{phase}_ckpt", math.nan) if phase != "nominal" else math.nan
                if not (isinstance(used, (int, float, np.integer, np.floating)) and np.isfinite(used)):
                    used = nearest_step(analysed, target)
                for layer, col, _ in rows:
                    series = _series(eng_df, layer, col) if col in eng_df else pd.Series(dtype=float)
                    value = float(series.get(used, math.nan)) if np.isfinite(used) else math.nan
                    w = series.reindex(windows[phase]).dropna()
                    q = w.quantile([0.25, 0.5, 0.75]).to_numpy() if len(w) else np.full(3, math.nan)
                    out.append(dict(run=ph["run"], wd=ph["wd"], steps=ph["final_step"], seed=ph["seed"],
                                    collapsed=ph["collapsed"], engine=engine, layer=layer, metric=col, phase=phase,
                                    step=target, step_used=used, value=value, win_median=q[1], win_q25=q[0],
                                    win_q75=q[2], win_n=len(w), win_first=w.index.min() if len(w) else math.nan,
                                    win_last=w.index.max() if len(w) else math.nan))
    return pd.DataFrame(out)


def summarize_windows(long: pd.DataFrame) -> pd.DataFrame:
    """Per (wd, steps, engine, layer, metric, phase): the checkpoint value's mean, std (ddof 1)
    and n over the runs, the same for the window median, the mean window quartiles, the
    evaluations in the windows (summed), and how many of the runs collapsed."""
    cols = [*GROUP_KEYS, "mean", "std", "n", "median_mean", "median_std", "q25_mean", "q75_mean", "win_n",
            "runs", "collapsed_runs"]
    if long.empty:
        return pd.DataFrame(columns=cols)
    g = long.groupby(list(GROUP_KEYS), sort=True)
    out = g["value"].agg(mean="mean", std="std", n="count")
    out["median_mean"] = g["win_median"].mean()
    out["median_std"] = g["win_median"].std()
    out["q25_mean"] = g["win_q25"].mean()
    out["q75_mean"] = g["win_q75"].mean()
    out["win_n"] = g["win_n"].sum()
    out["runs"] = g["run"].nunique()
    out["collapsed_runs"] = g["collapsed"].sum()
    return out.reset_index()[cols]


def _digits(metric: str, n: int) -> int:
    if metric == "traps":
        return 0 if n == 1 else 2
    return 2


def _cell_single(r: pd.Series) -> str:
    n = int(r["n"])
    if n == 0 or not np.isfinite(r["mean"]):
        return "–"
    d = _digits(r["metric"], n)
    return f"{r['mean']:.{d}f}" if n == 1 else f"{r['mean']:.{d}f} ± {r['std']:.{d}f}"


def _cell_window(r: pd.Series) -> str:
    if not np.isfinite(r["median_mean"]):
        return "–"
    if int(r["runs"]) == 1:
        return f"{r['median_mean']:.2f} [{r['q25_mean']:.2f}–{r['q75_mean']:.2f}], n={int(r['win_n'])}"
    return f"{r['median_mean']:.2f} ± {r['median_std']:.2f} (IQR {r['q25_mean']:.2f}–{r['q75_mean']:.2f})"


def windows_markdown(summary: pd.DataFrame, rows, title: str) -> str:
    """One line per (wd, steps, engine, row); per phase a checkpoint column and a window column.

    The window column is 'median [q25–q75], n=<evaluations>' for one run, and over several
    runs the mean ± std of the per-run medians with the mean quartiles. The third phase is
    titled "final (no collapse)" when none of the group's runs collapsed.
    """
    lines = [f"### {title}", ""]
    for (wd, n_steps, engine), grp in summary.groupby(["wd", "steps", "engine"], sort=True):
        anti = grp[grp["phase"] == "anti"]
        collapsed = [True] * int(anti["collapsed_runs"].max()) if len(anti) else []
        if len(anti):
            collapsed += [False] * int(anti["runs"].max() - anti["collapsed_runs"].max())
        titles = {"pre": PHASE_TITLES["pre"], "nominal": NOMINAL_TITLE, "grok": PHASE_TITLES["grok"],
                  "anti": phase_title("anti", collapsed if collapsed else None)}
        head = ["WD", "steps", "engine", "Layer, metric"]
        for p in COLUMNS:
            head += [f"{titles[p]}: checkpoint", f"{titles[p]}: window median [IQR]"]
        head.append("runs")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, col, label in rows:
            cells, runs = [], 0
            for phase in COLUMNS:
                r = grp[(grp["layer"] == layer) & (grp["metric"] == col) & (grp["phase"] == phase)]
                if r.empty:
                    cells += ["–", "–"]
                    continue
                r = r.iloc[0]
                runs = max(runs, int(r["runs"]))
                cells += [_cell_single(r), _cell_window(r)]
            lines.append(f"| {wd:g} | {int(n_steps):,} | {engine} | {label} | " + " | ".join(cells) + f" | {runs} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def window_table(layers: pd.DataFrame, steps: pd.DataFrame, phases_df: pd.DataFrame, rows, title: str, *,
                 options: PhaseOptions | None = None) -> tuple[pd.DataFrame, str]:
    """(tidy summary, markdown) of one table over the rows that `layers` has."""
    rows = available_rows(layers, rows)
    summary = summarize_windows(window_values(layers, steps, phases_df, rows, options=options))
    return summary, windows_markdown(summary, rows, title)
