"""The collapse over seeds: Tables 1, 2 and 4 pooled over runs, and the early-warning grid.

Inputs are analysis folders written by `analysis/spectra.py` (each holds `all_layers.parquet`
and `all_steps.parquet` for the runs below its root); their runs are pooled by weight decay
and run length (runs of different lengths, such as a campaign's unfinished runs, are never
pooled: each length is its own group).

The early-warning grid (`warning_grid`) asks, for every run, how long before the collapse each
signal fires, under every reasonable definition of both:

* collapse: the first evaluation after the test-accuracy peak at least 2, 5, 10 or 25 points
  below the peak (`drop2` ... `drop25`), or the first one below 0.5 (`below0.5`);
* signals, searched from the peak on (an evaluation at the peak counts): FC1 alpha < 2 and the
  FC1/FC2 average alpha < 2, each raw and centred (the spectrum of W - mean(W)); the total
  FC1 + FC2 trap count >= 1, raw and centred. Each fires either on its first evaluation
  (`first`) or once it has held on 3 consecutive evaluations (`3x`, counted when the third
  arrives: the step a live monitor could raise it at; `onset_step` is the streak's first
  step). `held_at_peak` says the signal already held at the peak.

Per (run, collapse definition, signal): `signal_step`, `collapse_step`, `lead_steps` =
collapse_step - signal_step (positive: the signal came first), `lost_pp` = the test points
already lost at the signal step (peak minus test accuracy there, in percentage points), and
`outcome`: warned (signal before the collapse), late (at or after it), missed (a collapse, no
signal), false_alarm (a signal, no collapse under this definition) or quiet (neither).

`alpha_fits` treats alpha as a continuous, data-free estimate of test accuracy after the peak:
per run, the Spearman and Pearson correlation between each alpha and test accuracy over the
evaluations after the peak; then a straight line test_acc = a + b * alpha fitted on one run's
evaluations after the peak predicts every other run of the same weight decay, with the mean and
largest absolute error in points.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from grokjax.analysis import outdir, paper, report  # noqa: E402
from grokjax.analysis.phase_tables import format_cell  # noqa: E402
from grokjax.analysis.phases import PersistentSignal, detect_phases  # noqa: E402
from grokjax.analysis.preflight import AnalysisError  # noqa: E402
from grokjax.cliutil import OneLineParser  # noqa: E402

ENGINE = "native"
COLLAPSES = (("drop2", 2.0), ("drop5", 5.0), ("drop10", 10.0), ("drop25", 25.0), ("below0.5", None))
# signal name -> (step-table columns summed or read, comparison)
SIGNALS = {
    "fc1_alpha<2": (("alpha_fc1",), "lt2"),
    "fc1_alpha_centred<2": (("alpha_centred_fc1",), "lt2"),
    "mean_alpha<2": (("alpha_mean",), "lt2"),
    "mean_alpha_centred<2": (("alpha_centred_mean",), "lt2"),
    "traps>=1": (("traps_fc1", "traps_fc2"), "ge1"),
    "traps_centred>=1": (("traps_centred_fc1", "traps_centred_fc2"), "ge1"),
}
RULES = (("first", 1), ("3x", 3))
ALPHAS = {"fc1_alpha": "alpha_fc1", "fc1_alpha_centred": "alpha_centred_fc1", "mean_alpha": "alpha_mean",
          "mean_alpha_centred": "alpha_centred_mean"}

# arXiv 2602.02859 (Feb 2026, the same authors), quoted: Table 1 (mean ± std over its seeds)
# and Table 2's anti-grokking column at WD 0; the other cells are not quoted here.
PAPER_V2 = {
    ("Table 1", "fc1", "alpha"): {"pre": "5.0 ± 0.7", "grok": "3.6 ± 0.5", "anti": "0.9 ± 0.4"},
    ("Table 1", "fc2", "alpha"): {"pre": "2.9 ± 0.7", "grok": "2.3 ± 0.2", "anti": "1.3 ± 0.3"},
    ("Table 1", "mean", "alpha"): {"pre": "4.0 ± 0.6", "grok": "2.9 ± 0.2", "anti": "1.1 ± 0.3"},
    ("Table 2", "fc1", "traps"): {"anti": "7.5 ± 5.6"},
    ("Table 2", "fc2", "traps"): {"anti": "1 ± 0"},
}


def read_analyses(folders) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pooled (layers, steps) tables of `spectra.py` analysis folders; run names must differ.

    Raises:
        AnalysisError: a folder without `all_layers.parquet`/`all_steps.parquet`, or a run name
            found in two folders.
    """
    layers, steps = [], []
    for f in folders:
        f = Path(f)
        paths = [f / "all_layers.parquet", f / "all_steps.parquet"]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise AnalysisError(f"{f}: no {', '.join(missing)} (run `python analysis/spectra.py` on its root first)")
        layers.append(pd.read_parquet(paths[0]))
        steps.append(pd.read_parquet(paths[1]))
    seen: dict[str, str] = {}
    for f, s in zip(folders, steps):
        for name in s["run"].unique():
            if name in seen:
                raise AnalysisError(f"run {name!r} is in both {seen[name]} and {f}")
            seen[name] = str(f)
    return pd.concat(layers, ignore_index=True), pd.concat(steps, ignore_index=True)


def _one_run(steps: pd.DataFrame, run: str) -> pd.DataFrame:
    df = steps[(steps["run"] == run) & steps["test/acc"].notna()].sort_values("step")
    return df.reset_index(drop=True)


def _flags(df: pd.DataFrame, cols, test: str) -> np.ndarray | None:
    names = [f"{ENGINE}/{c}" for c in cols]
    if any(n not in df for n in names):
        return None
    v = df[names].astype(float)
    if test == "lt2":
        x = v.iloc[:, 0].to_numpy()
        return np.isfinite(x) & (x < 2.0)
    total = v.sum(axis=1, skipna=False).to_numpy()
    return np.isfinite(total) & (total >= 1.0)


def _fire(steps: np.ndarray, flags: np.ndarray, start: int, n: int) -> tuple[float, float]:
    """(onset, fired) of the first streak of n flags at steps >= start; NaN if none."""
    sig = PersistentSignal(n, start=start)
    for s, f in zip(steps.tolist(), flags.tolist()):
        if sig.update(s, bool(f)):
            break
    return sig.onset, sig.fired_step


def collapse_steps(df: pd.DataFrame, i_peak: int) -> dict[str, float]:
    """Per collapse definition, its first evaluation after the peak (NaN if none)."""
    te, st = df["test/acc"].to_numpy(float), df["step"].to_numpy()
    peak, after = te[i_peak], np.arange(i_peak + 1, len(df))
    out = {}
    for name, drop in COLLAPSES:
        hit = after[te[after] <= peak - drop / 100 + 1e-12] if drop is not None else after[te[after] < 0.5]
        out[name] = float(st[hit[0]]) if hit.size else math.nan
    return out


def _outcome(signal: float, collapse: float) -> str:
    if math.isnan(collapse):
        return "quiet" if math.isnan(signal) else "false_alarm"
    if math.isnan(signal):
        return "missed"
    return "warned" if signal < collapse else "late"


def warning_grid(steps: pd.DataFrame) -> pd.DataFrame:
    """The early-warning grid of every run in `steps` (see the module docstring)."""
    rows = []
    for run in sorted(steps["run"].unique()):
        df = _one_run(steps, run)
        if df.empty:
            continue
        ph = detect_phases(df["step"], df["train/acc"], df["test/acc"])
        st, te = df["step"].to_numpy(), df["test/acc"].to_numpy(float)
        i_peak = int(np.flatnonzero(st == ph["grok_step"])[0])
        peak = te[i_peak]
        collapses = collapse_steps(df, i_peak)
        for signal, (cols, test) in SIGNALS.items():
            flags = _flags(df, cols, test)
            if flags is None:
                continue
            for rule, n in RULES:
                onset, fired = _fire(st, flags, ph["grok_step"], n)
                lost = 100 * (peak - te[st == fired][0]) if np.isfinite(fired) else math.nan
                for cname, cstep in collapses.items():
                    rows.append(dict(run=run, wd=float(df["wd"].iloc[0]), seed=int(df["seed"].iloc[0]),
                                     final_step=int(st[-1]), peak_step=int(ph["grok_step"]), peak_acc=peak,
                                     collapse=cname, collapse_step=cstep, signal=signal, rule=rule,
                                     onset_step=onset, signal_step=fired, held_at_peak=bool(flags[i_peak]),
                                     lead_steps=cstep - fired, lost_pp=lost, outcome=_outcome(fired, cstep)))
    return pd.DataFrame(rows)


def _post_peak(df: pd.DataFrame) -> pd.DataFrame:
    ph = detect_phases(df["step"], df["train/acc"], df["test/acc"])
    return df[df["step"] > ph["grok_step"]]


def alpha_fits(steps: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run correlations, cross-run predictions) of alpha against test accuracy after the peak."""
    post = {run: _post_peak(_one_run(steps, run)) for run in sorted(steps["run"].unique())}
    corr, pred = [], []
    for name, col in ALPHAS.items():
        c = f"{ENGINE}/{col}"
        data = {}
        for run, df in post.items():
            if c not in df:
                continue
            d = df[np.isfinite(df[c].astype(float))]
            if len(d) < 3:
                continue
            a, acc = d[c].to_numpy(float), d["test/acc"].to_numpy(float)
            data[run] = (float(d["wd"].iloc[0]), a, acc)
            corr.append(dict(run=run, wd=data[run][0], alpha=name, n=len(d), spearman=stats.spearmanr(a, acc)[0],
                             pearson=stats.pearsonr(a, acc)[0]))
        for fit_run, (wd, a, acc) in data.items():
            slope, icpt = np.polyfit(a, acc, 1)
            for run, (wd2, a2, acc2) in data.items():
                if run == fit_run or wd2 != wd:
                    continue
                err = 100 * np.abs(icpt + slope * a2 - acc2)
                pred.append(dict(alpha=name, wd=wd, fit_run=fit_run, slope=slope, intercept=icpt, run=run,
                                 n=len(a2), mae_pp=float(err.mean()), max_pp=float(err.max())))
    return pd.DataFrame(corr), pd.DataFrame(pred)


def tables_over_seeds(layers: pd.DataFrame, steps: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """`report.build_tables` over the pooled runs, and Tables 1 and 2 beside both papers."""
    tables = report.build_tables(layers, steps)
    cmp = tables["paper_comparison"][0].copy()
    cmp["paper_v2_text"] = [PAPER_V2.get((r.table, r.layer, r.paper_metric), {}).get(r.paper_phase, "not quoted")
                            if r.table != "Table 4" and paper.wd_kind(r.wd) == "0" else "not quoted"
                            for r in cmp.itertuples(index=False)]
    return tables, cmp


def comparison_markdown(cmp: pd.DataFrame) -> str:
    """Per (wd, steps): each row's value (mean ± std over n runs) beside both papers' numbers."""
    lines = ["## Tables 1, 2 and 4 over seeds, beside both versions of the paper", "",
             "Paper v1: the text this project was built from; paper v2: arXiv 2602.02859 (Feb 2026), quoted. "
             "Both are quoted references, read at nominal steps (~10^5, 10^6, 10^7); this project's cells are the "
             "value at each run's own phase checkpoint, mean ± std over n runs (sample std).", ""]
    if cmp.empty:
        return "\n".join(lines + ["(no run)"]) + "\n"
    for (wd, n_steps), grp in cmp.groupby(["wd", "steps"], sort=True):
        grp = grp[grp["phase"] != "nominal"].copy()
        grp["_order"] = grp["phase"].map({"pre": 0, "grok": 1, "anti": 2})
        grp = grp.sort_values(["table", "layer", "metric", "_order"], kind="stable")
        lines += [f"WD = {wd:g}, runs of {int(n_steps):,} steps:", "",
                  "| Table | Layer, metric | phase | this project | n | paper v1 | paper v2 |", "|---|---|---|---|---|---|---|"]
        for r in grp.itertuples(index=False):
            ours = format_cell(r.value_mean, r.value_std, r.n, r.metric)
            label = f"{paper.LABELS.get(r.layer, r.layer)} {paper.METRIC_LABELS.get(r.metric, r.metric)}"
            lines.append(f"| {r.table} | {label} | {r.phase} | {ours} | {r.n} | {r.paper_text} | {r.paper_v2_text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def verdict(grid: pd.DataFrame) -> pd.DataFrame:
    """Per (wd, final step, signal, rule, collapse) (runs of different lengths are never pooled): runs, how many warned/late/missed/false_alarm/quiet, and
    the range of lead steps and points already lost over the runs where the signal fired."""
    if grid.empty:
        return pd.DataFrame()
    out = []
    for key, g in grid.groupby(["wd", "final_step", "signal", "rule", "collapse"], sort=True):
        fired = g[np.isfinite(g["signal_step"])]
        counts = g["outcome"].value_counts()
        out.append(dict(zip(["wd", "final_step", "signal", "rule", "collapse"], key), runs=len(g),
                        **{k: int(counts.get(k, 0)) for k in ("warned", "late", "missed", "false_alarm", "quiet")},
                        lead_min=g["lead_steps"].min(), lead_max=g["lead_steps"].max(),
                        lost_pp_min=fired["lost_pp"].min(), lost_pp_max=fired["lost_pp"].max()))
    return pd.DataFrame(out)


def _runs_by_wd(steps: pd.DataFrame) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for (wd, run), _ in steps.groupby(["wd", "run"], sort=True):
        out.setdefault(float(wd), []).append(run)
    return out


def make_figures(steps: pd.DataFrame, grid: pd.DataFrame, out_dir: Path) -> list[Path]:
    """fig1_seeds.png (accuracies), alpha_seeds.png, traps_seeds.png (every run drawn) and
    early_warning_grid.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_wd = _runs_by_wd(steps)
    colors = {run: f"C{i}" for i, run in enumerate(sorted(steps["run"].unique()))}
    written = []

    def per_run(ax, run, col, **kw):
        df = _one_run(steps, run)
        df = df[df["step"] > 0]
        if col in df:
            ax.plot(df["step"], df[col].astype(float), color=colors[run], **kw)

    fig, axes = plt.subplots(1, len(by_wd), figsize=(6 * len(by_wd), 4), squeeze=False, sharey=True)
    for ax, (wd, runs) in zip(axes[0], by_wd.items()):
        for run in runs:
            per_run(ax, run, "test/acc", label=f"{run} test")
            per_run(ax, run, "train/acc", ls="--", lw=0.8)
        ax.set(xscale="log", xlabel="step", ylabel="accuracy", title=f"WD {wd:g}: test (solid), train (dashed)")
        ax.legend(fontsize=7)
    written.append(out_dir / "fig1_seeds.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (name, col) in zip(axes.flat, ALPHAS.items()):
        for wd, runs in by_wd.items():
            for run in runs:
                per_run(ax, run, f"{ENGINE}/{col}", ls="-" if wd == 0 else ":", label=f"{run}")
        ax.axhline(2.0, color="k", lw=0.6)
        ax.set(xscale="log", title=name.replace("_", " "), xlabel="step", ylabel="α")
    axes[0, 0].legend(fontsize=7, title="solid: WD 0, dotted: WD > 0", title_fontsize=7)
    written.append(out_dir / "alpha_seeds.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, kind in zip(axes, ("traps", "traps_centred")):
        for wd, runs in by_wd.items():
            for run in runs:
                df = _one_run(steps, run)
                cols = [f"{ENGINE}/{kind}_fc1", f"{ENGINE}/{kind}_fc2"]
                if all(c in df for c in cols):
                    ax.step(df["step"], df[cols].astype(float).sum(axis=1, skipna=False), where="post",
                            color=colors[run], ls="-" if wd == 0 else ":", label=run)
        ax.set(xscale="log", title=f"{kind.replace('_', ' ')}: FC1 + FC2", xlabel="step", ylabel="count")
    axes[0].legend(fontsize=7)
    written.append(out_dir / "traps_seeds.png")
    fig.tight_layout()
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if not grid.empty:
        g = grid[grid["collapse"] == COLLAPSES[0][0]]
        labels = [f"{s} ({r})" for s in SIGNALS for r, _ in RULES]
        runs = sorted(g["run"].unique(), key=lambda r: (g.loc[g["run"] == r, "wd"].iloc[0], r))
        m = np.full((len(labels), len(runs)), np.nan)
        for r in g.itertuples(index=False):
            m[labels.index(f"{r.signal} ({r.rule})"), runs.index(r.run)] = r.lost_pp
        fig, ax = plt.subplots(figsize=(5 + 1.6 * len(runs), 6.5))
        im = ax.imshow(m, cmap="magma_r", aspect="auto",
                       vmin=0, vmax=max(30.0, float(np.nanmax(m)) if np.isfinite(m).any() else 30))
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, "never" if not np.isfinite(v) else f"{v:.1f}", ha="center", va="center", fontsize=7,
                    color="tab:blue" if not np.isfinite(v) else ("w" if v > 15 else "k"))
        ticks = []
        for r in runs:
            row = g[g["run"] == r].iloc[0]
            df = _one_run(steps, r)
            te = df.loc[df["step"] >= row["peak_step"], "test/acc"].to_numpy(float)
            ticks.append(f"{r}\nWD {row['wd']:g}, to {row['final_step']:.2g}\n"
                         f"at most {100 * (row['peak_acc'] - te.min()):.1f} pts lost")
        ax.set_xticks(range(len(runs)), ticks, fontsize=7, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title("Test points already lost when each signal fires (searched from the peak).\n"
                     "It warns of a 'drop X' collapse when this is below X; 'never': not up to the run's last step.",
                     fontsize=8)
        fig.colorbar(im, ax=ax, label="points below the peak")
        written.append(out_dir / "early_warning_grid.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def runs_in_progress(steps: pd.DataFrame, complete_at: int) -> dict[str, int]:
    """{run: its last step} of the runs that have not reached `complete_at`."""
    last = steps.groupby("run")["step"].max()
    return {str(r): int(s) for r, s in last.items() if s < complete_at}


def progress_markdown(short: dict[str, int], complete_at: int) -> str:
    """The runs left out of the tables, the grid and the fits (still running), with their step."""
    if not short:
        return ""
    lines = [f"## Runs still in progress (drawn in the figures; left out of every table, the grid and the fits "
             f"until they reach {complete_at:,} steps)", "", "| run | last step |", "|---|---|"]
    lines += [f"| {r} | {s:,} |" for r, s in sorted(short.items())]
    return "\n".join(lines) + "\n"


def write_seeds_report(folders, out_dir, *, figures: bool = True, complete_at: int | None = None) -> dict[str, Path]:
    """Reads the analysis `folders`, writes every output into `out_dir` at once (a failure
    leaves the previous outputs as they were): tables over seeds (report.md and the CSVs of
    `report.build_tables`), paper_comparison_v1_v2.csv, early_warning_grid.csv,
    early_warning_verdict.csv, alpha_correlation.csv, alpha_prediction.csv and the figures.

    With `complete_at`, only the runs that reached that step enter the tables, the grid and the
    fits; the others (a campaign's unfinished runs) are drawn in the figures and listed in
    report.md with their last step.

    Raises:
        AnalysisError: bad inputs, no run that reached `complete_at`, or unwritable outputs.
    """
    layers, steps = read_analyses(folders)
    short = runs_in_progress(steps, complete_at) if complete_at else {}
    done = steps[~steps["run"].isin(list(short))]
    if done.empty:
        raise AnalysisError(f"no run has reached {complete_at:,} steps yet: "
                            + ", ".join(f"{r} at {s:,}" for r, s in sorted(short.items())))
    tables, cmp = tables_over_seeds(layers[~layers["run"].isin(list(short))], done)
    grid = warning_grid(done)
    corr, pred = alpha_fits(done)
    out_dir = Path(out_dir)
    with report.staged_outputs(out_dir) as staging:
        md = report.write_tables(tables, staging)
        md.write_text(md.read_text() + "\n" + comparison_markdown(cmp) + "\n" + progress_markdown(short, complete_at))
        cmp.to_csv(staging / "paper_comparison_v1_v2.csv", index=False)
        grid.to_csv(staging / "early_warning_grid.csv", index=False)
        verdict(grid).to_csv(staging / "early_warning_verdict.csv", index=False)
        corr.to_csv(staging / "alpha_correlation.csv", index=False)
        pred.to_csv(staging / "alpha_prediction.csv", index=False)
        if figures:
            make_figures(steps, grid, staging / "figures")
        outdir.publish(staging, out_dir, keep=() if figures else ("figures/",))
    return {"out_dir": out_dir, "report": out_dir / "report.md"}


def main(argv=None) -> int:
    """`python analysis/seeds.py ANALYSIS_FOLDER... --out FOLDER` (see the module docstring)."""
    ap = OneLineParser(prog="seeds.py", description="Tables 1, 2, 4 over seeds and the early-warning grid, from "
                       "analysis folders written by analysis/spectra.py.")
    ap.add_argument("folders", nargs="+", type=Path, help="analysis folders (each with all_steps.parquet)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (replaced at once)")
    ap.add_argument("--complete_at", type=lambda t: int(float(t)), default=None,
                    help="only runs that reached this step (e.g. 1e7) enter the tables, grid and fits")
    ap.add_argument("--figures", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                    help="draw the figures (default: true)")
    a = ap.parse_args(argv)
    try:
        res = write_seeds_report(a.folders, a.out, figures=a.figures, complete_at=a.complete_at)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {res['report']}")
    return 0
