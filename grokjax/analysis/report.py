"""The paper's tables from analysed runs: phases, Tables 1, 2 and 4, and early warnings.

Every table is computed from the tidy outputs of `grokjax.analysis.pipeline` (layer and step tables of
one or more runs) and the phases of each run (`grokjax.analysis.phases.detect_phases`), and is written
as a tidy CSV (one number per row: wd, engine, layer, metric, phase, mean, std, n) plus a
markdown rendering in the paper's layout, mean ± std over the runs of each weight decay
(sample std, ddof = 1; a single run shows its value alone).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from grokjax.analysis import modadd_report, outdir, paper, phase_tables
from grokjax.analysis.figures import make_figures
from grokjax.analysis.phase_tables import format_cell
from grokjax.analysis.phases import (NO_GROKKING, PHASE_TITLES, PHASES, PRE_STATUSES, WARNING_STATUS_MEANINGS,
                                     PhaseOptions, detect_phases, early_warnings, nearest_step, phase_steps,
                                     phase_title, warning_counts)
from grokjax.analysis.pipeline import AnalysisError, AnalysisOptions, analyze_run, write_table
from grokjax.analysis.runs import find_named_runs, read_runs
from grokjax.ckpt import CheckpointError

RUN_KEYS = ("run", "wd", "seed")
# (layer, column, row label) of each table; Table 4 is FC1's MP fit of W^rand (paper App. D).
TABLE1_ROWS = (("fc1", "alpha", "FC1 α"), ("fc2", "alpha", "FC2 α"), ("mean", "alpha", "average α (FC1, FC2)"))
TABLE2_ROWS = (("fc1", "traps", "FC1 traps"), ("fc2", "traps", "FC2 traps"))
TABLE4_ROWS = (("fc1", "rand_sigma_mp", "σ_mp of W^rand"), ("fc1", "mp_ks", "KS statistic"),
               ("fc1", "mp_pvalue", "p-value"), ("fc1", "traps", "# traps"))


def run_phases(steps: pd.DataFrame, options: PhaseOptions | None = None) -> pd.DataFrame:
    """One row per run: run, wd, seed, the `detect_phases` columns, and `<phase>_ckpt`.

    `<phase>_ckpt` is the checkpoint every output reads that phase at: the phase step itself
    when its checkpoint was analysed (status 'ok'), else the nearest analysed one in
    log(1 + step) (`grokjax.analysis.phases.nearest_step`), NaN when the run has none.
    """
    rows = []
    for (run, wd, seed), df in steps.groupby(list(RUN_KEYS), sort=True):
        analysed = df.loc[df["status"] == "ok", "step"] if "status" in df else df["step"]
        df = df[df["test/acc"].notna()] if "test/acc" in df else df.iloc[:0]
        if df.empty:
            continue
        ph = detect_phases(df["step"], df["train/acc"], df["test/acc"], options=options)
        at = {f"{p}_ckpt": nearest_step(analysed, s) for p, s in phase_steps(ph).items()}
        rows.append(dict(run=run, wd=wd, seed=seed, **ph, **at))
    return pd.DataFrame(rows)


def phase_checkpoints(ph: dict) -> dict[str, float]:
    """{'pre', 'grok', 'anti'} -> the checkpoint step the phase is read at (a `run_phases` row)."""
    return {p: ph[f"{p}_ckpt"] for p in PHASES}


def _phase_label(ph: dict, phase: str) -> str:
    """'20,000', or '20,000 (read at 19,966: no analysed checkpoint at 20,000)'."""
    target, used = ph[f"{phase}_step"], ph[f"{phase}_ckpt"]
    if not np.isfinite(target):
        return "–"
    if not np.isfinite(used):
        return f"{target:,.0f} (no analysed checkpoint)"
    if used != target:
        return f"{target:,.0f} (read at {used:,.0f}: no analysed checkpoint at {target:,.0f})"
    return f"{target:,.0f}"


def values_at_phases(layers: pd.DataFrame, phases_df: pd.DataFrame, rows) -> pd.DataFrame:
    """Long table: one row per (run, engine, layer, metric, phase) with the value at that phase.

    'mean' as a layer is the FC1+FC2 mean of the metric (NaN if either is NaN). Values are
    read at the run's `<phase>_ckpt` (`step_used`; see `run_phases`), the same checkpoint for
    every engine; an engine that did not analyse it gives NaN.
    """
    out = []
    for ph in phases_df.itertuples(index=False):
        mine = layers[layers["run"] == ph.run]
        for engine, eng_df in mine.groupby("engine", sort=False):
            for phase, target in phase_steps(ph._asdict()).items():
                used = ph._asdict()[f"{phase}_ckpt"]
                at = eng_df[eng_df["step"] == used].set_index("layer") if np.isfinite(used) else None
                for layer, col, _ in rows:
                    if at is None:
                        v = math.nan
                    elif layer == "mean":
                        v = float(at.reindex(["fc1", "fc2"])[col].astype(float).mean(skipna=False))
                    else:
                        v = float(at[col].get(layer, math.nan)) if col in at else math.nan
                    out.append(dict(run=ph.run, wd=ph.wd, steps=ph.final_step, seed=ph.seed, engine=engine,
                                    layer=layer, metric=col,
                                    phase=phase, step=target, step_used=used, value=v))
    return pd.DataFrame(out)


def summarize_phases(long: pd.DataFrame) -> pd.DataFrame:
    """mean, std (ddof 1) and n of `value` per (wd, steps, engine, layer, metric, phase); steps
    is the run's final step, so runs of different lengths are never pooled."""
    keys = ["wd", "steps", "engine", "layer", "metric", "phase"]
    if long.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n", "steps_used"])
    g = long.groupby(keys, sort=False)
    out = g["value"].agg(mean="mean", std="std", n="count")
    # The checkpoints the values were read at, per run (see run_phases).
    out["steps_used"] = g["step_used"].agg(
        lambda v: " ".join("–" if not np.isfinite(x) else f"{x:.0f}" for x in v))
    return out.reset_index()


def markdown_table(summary: pd.DataFrame, rows, title: str, collapsed=None) -> str:
    """The paper's layout: one line per (wd, steps, engine, row label), one column per phase;
    `collapsed` (the runs' flags) titles the third column "final (no collapse)" when none did."""
    head = ["WD", "steps", "engine", "Layer, metric", *(phase_title(p, collapsed) for p in PHASES), "runs"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (wd, n_steps, engine), grp in summary.groupby(["wd", "steps", "engine"], sort=True):
        for layer, col, label in rows:
            cells, n_max = [], 0
            for phase in PHASES:
                r = grp[(grp["layer"] == layer) & (grp["metric"] == col) & (grp["phase"] == phase)]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                n_max = max(n_max, int(r["n"]))
                cells.append(format_cell(float(r["mean"]), float(r["std"]), int(r["n"]), col))
            lines.append(f"| {wd:g} | {int(n_steps):,} | {engine} | {label} | " + " | ".join(cells) + f" | {n_max} |")
    return "\n".join(lines) + "\n"


def phases_markdown(phases_df: pd.DataFrame) -> str:
    """Per-run phase steps and test accuracies; the tables read each phase at its step's
    checkpoint, and a phase step without an analysed checkpoint says where it is read instead.
    A run whose test accuracy never rose says NO_GROKKING in its grok column, and a note under
    the table names those runs."""
    head = ["run", "WD", "seed", "pre step", "grok step (peak acc)", "anti step (acc)", "collapse", "drop (pp)"]
    lines = ["### Phases per run", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in phases_df.itertuples(index=False):
        d = r._asdict()
        pre = _phase_label(d, "pre")
        if r.pre_status != "ok":
            pre += f" ({r.pre_status})"
        grok = f"{_phase_label(d, 'grok')} ({r.peak_test_acc:.4f})"
        if not r.grokking:
            grok = f"{NO_GROKKING}; max {r.peak_test_acc:.4f} at {_phase_label(d, 'grok')}"
        lines.append(f"| {r.run} | {r.wd:g} | {r.seed} | {pre} | {grok} | "
                     f"{_phase_label(d, 'anti')} ({r.anti_test_acc:.4f}) | {'yes' if r.collapsed else 'no'} | "
                     f"{r.drop_pp:.1f} |")
    flat = [str(r) for r in phases_df.loc[~phases_df["grokking"].astype(bool), "run"]] if len(phases_df) else []
    if flat:
        lines += ["", f"No grokking in {', '.join(flat)}: test accuracy never rose, so the tables' "
                      f"'{PHASE_TITLES['grok']}' column reads the maximum of a flat curve."]
    return "\n".join(lines) + "\n"


def legend_markdown() -> str:
    """The status labels of report.md: the pre-grokking edge (`phases.detect_phases`) and the
    early warning (`phases.early_warnings`)."""
    lines = ["### Status labels", "", "End of pre-grokking (the 'pre step' column of the phases table):", ""]
    lines += [f"* `{k}`: {v}" for k, v in PRE_STATUSES.items()]
    lines += ["", f"A run whose test accuracy never rose is marked '{NO_GROKKING}'.", "",
              "Early warning (the 'status' column and the outcome counts):", ""]
    lines += [f"* `{k}`: {v}" for k, v in WARNING_STATUS_MEANINGS.items()]
    return "\n".join(lines) + "\n"


def warnings_table(steps: pd.DataFrame, phases_df: pd.DataFrame, engines=("native", "ww"),
                   options: PhaseOptions | None = None) -> pd.DataFrame:
    """`phases.early_warnings` of every run and engine, with run, wd, seed columns."""
    rows = []
    for ph in phases_df.itertuples(index=False):
        df = steps[steps["run"] == ph.run]
        for engine in engines:
            if f"{engine}/alpha_fc1" not in df:
                continue
            for w in early_warnings(df, ph._asdict(), engine=engine, options=options):
                rows.append(dict(run=ph.run, wd=ph.wd, steps=ph.final_step, seed=ph.seed, **w))
    return pd.DataFrame(rows)


def warnings_markdown(warn: pd.DataFrame) -> str:
    """Early-warning rows: the first persistent alpha<2 / traps>0 step after the peak and its
    lead over the test-accuracy drop (`grokjax.analysis.phases.early_warnings`)."""
    head = ["run", "WD", "engine", "layer", "signal", "first step", "drop step", "lead (steps)", "lead (decades)",
            "status"]
    lines = ["### Early warning (from the test-accuracy peak; a signal counts from the first of ≥ 3 consecutive "
             "evaluations where it holds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v, fmt="{:,.0f}"):
        return "–" if not np.isfinite(v) else fmt.format(v)

    for r in warn.itertuples(index=False):
        lines.append(f"| {r.run} | {r.wd:g} | {r.engine} | {r.layer} | {r.signal} | {num(r.warn_step)} | "
                     f"{num(r.drop_step)} | {num(r.lead_steps)} | {num(r.lead_decades, '{:.2f}')} | {r.status} |")
    return "\n".join(lines) + "\n"


def build_tables(layers: pd.DataFrame, steps: pd.DataFrame,
                 options: PhaseOptions | None = None) -> dict[str, tuple[pd.DataFrame, str]]:
    """All report tables as {name: (tidy DataFrame, markdown)}.

    Names: phases, table1_alpha and table2_traps (`grokjax.analysis.phase_tables`: the phase
    checkpoint's value beside the median and IQR over the phase window, the paper's nominal
    10^5-step column, raw and mean-aware rows where the layer table has them),
    table4_mp_fc1 (native engine only: WW has no KS test), early_warning,
    early_warning_counts (statuses, false alarms included, per run and per (wd, steps)), and
    paper_comparison (Tables 1, 2 and 4 beside the paper's numbers: `grokjax.analysis.paper`).
    Runs are grouped by (weight decay, run length).
    """
    ph = run_phases(steps, options)
    out = {"phases": (ph, phases_markdown(ph))}
    for name, rows, title in (("table1_alpha", phase_tables.TABLE1_ROWS, "Table 1: HTSR α at the phases"),
                              ("table2_traps", phase_tables.TABLE2_ROWS, "Table 2: correlation traps at the phases")):
        out[name] = phase_tables.window_table(layers, steps, ph, rows, title, options=options)
    sub = layers[layers["engine"] == "native"]
    summary = summarize_phases(values_at_phases(sub, ph, TABLE4_ROWS))
    out["table4_mp_fc1"] = (summary, markdown_table(summary, TABLE4_ROWS, "Table 4: MP fit of FC1's W^rand at the "
                                                    "phases (KS statistic first; see grokjax.analysis.htsr.mp_ks_test)",
                                                    collapsed=list(ph["collapsed"]) if len(ph) else None))
    warn = warnings_table(steps, ph, options=options)
    out["early_warning"] = (warn, warnings_markdown(warn))
    counts = pd.concat([warning_counts(warn, keys=("run", "engine")).assign(group="run"),
                        warning_counts(warn, keys=("wd", "steps", "engine", "layer", "signal")).assign(group="wd")]
                       ) if len(warn) else pd.DataFrame()
    out["early_warning_counts"] = (counts, warning_counts_markdown(counts))
    cmp = paper.compare({name: out[name][0] for name in ("table1_alpha", "table2_traps", "table4_mp_fc1")})
    out["paper_comparison"] = (cmp, paper.comparison_markdown(cmp, ph))
    return out


def warning_counts_markdown(counts: pd.DataFrame) -> str:
    """False alarms (a persistent signal without a later drop) and the other statuses, per
    run and per (weight decay, run length)."""
    lines = ["### Early-warning outcomes per run and per weight decay", ""]
    if counts.empty:
        return "\n".join(lines + ["(no runs)"]) + "\n"
    statuses = ["warned", "late", "missed", "false_alarm", "quiet", "no_data"]
    per_run = counts[counts["group"] == "run"]
    head = ["run", "engine", *statuses]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in per_run.to_dict("records"):
        lines.append(f"| {r['run']} | {r['engine']} | " + " | ".join(str(int(r[s])) for s in statuses) + " |")
    per_wd = counts[counts["group"] == "wd"]
    head = ["WD", "steps", "engine", "layer", "signal", "runs", *statuses]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in per_wd.to_dict("records"):
        lines.append(f"| {r['wd']:g} | {int(r['steps']):,} | {r['engine']} | {r['layer']} | {r['signal']} | "
                     f"{int(r['runs'])} | " + " | ".join(str(int(r[s])) for s in statuses) + " |")
    return "\n".join(lines) + "\n"


def write_tables(tables: dict[str, tuple[pd.DataFrame, str]], out_dir: str | Path) -> Path:
    """Writes <name>.csv for each table and all markdown, then the status legend
    (`legend_markdown`), into report.md; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (df, _) in tables.items():
        df.to_csv(out_dir / f"{name}.csv", index=False)
    md = out_dir / "report.md"
    md.write_text("# Grokking / anti-grokking: HTSR tables\n\n" + "\n".join([*(m for _, m in tables.values()),
                                                                             legend_markdown()]))
    return md


def _at(layers: pd.DataFrame, engine: str, layer: str, col: str, step: float) -> float:
    if not np.isfinite(step):
        return math.nan
    r = layers[(layers["engine"] == engine) & (layers["layer"] == layer) & (layers["step"] == step)]
    return float(r[col].iloc[0]) if len(r) else math.nan


def summary_text(layers: pd.DataFrame, steps: pd.DataFrame, phases_df: pd.DataFrame, timings: dict) -> str:
    """A few lines per run: phases, alpha and traps at the phases, and engine timings."""
    lines = []
    for ph in phases_df.itertuples(index=False):
        t = timings.get(ph.run, {})
        pre = f"{ph.pre_step:,.0f}" if np.isfinite(ph.pre_step) else "–"
        peak = f"peak test acc {ph.peak_test_acc:.4f} at {ph.grok_step:,}"
        if not ph.grokking:
            peak = f"{NO_GROKKING}: max test acc {ph.peak_test_acc:.4f} at {ph.grok_step:,}"
        lines.append(f"{ph.run} (WD={ph.wd:g}, seed {ph.seed}, {t.get('checkpoints', '?')} checkpoints): "
                     f"pre-grokking ends {pre} [{ph.pre_status}], {peak}, "
                     f"{'collapse' if ph.collapsed else 'no collapse'}: "
                     f"{ph.anti_test_acc:.4f} at {ph.anti_step:,} (drop {ph.drop_pp:.1f} pp)")
        lines.append("  phases read at checkpoints: "
                     + ", ".join(f"{p} {_phase_label(ph._asdict(), p)}" for p in PHASES))
        mine = layers[layers["run"] == ph.run]
        for engine in [e for e in ("native", "ww") if e in set(mine["engine"])]:
            parts = []
            for phase, step in phase_checkpoints(ph._asdict()).items():
                if not np.isfinite(step):
                    parts.append(f"{phase}: no analysed checkpoint")
                    continue
                a1, a2 = _at(mine, engine, "fc1", "alpha", step), _at(mine, engine, "fc2", "alpha", step)
                t1, t2 = _at(mine, engine, "fc1", "traps", step), _at(mine, engine, "fc2", "traps", step)
                parts.append(f"{phase}: α {a1:.2f}/{a2:.2f} (mean {(a1 + a2) / 2:.2f}), traps {t1:.0f}/{t2:.0f}")
            lines.append(f"  {engine:6s} FC1/FC2  " + "; ".join(parts))
        engines = ", ".join(f"{'WW' if k == 'ww' else k} {t[k]:.1f} s" for k in ("native", "ww") if k in t)
        lines.append(f"  time: {engines}, progress {t.get('progress', 0):.1f} s (CPU, summed over checkpoints); "
                     f"wall {t.get('wall', 0):.1f} s"
                     f" ({t.get('computed', '?')} checkpoints computed, the rest cached)")
    return "\n".join(lines)


def make_report(root: str | Path, *, options=None, out_dir: str | Path | None = None, figures: bool = True,
                phase_options: PhaseOptions | None = None) -> dict:
    """Analyses every run under `root` and writes tables, figures and a summary.

    Outputs in `out_dir` (default `<root>/analysis`): all_layers and all_steps
    (.parquet + .csv; the per-run caches stay in each `<run>/analysis`), phases.csv,
    table1_alpha.csv, table2_traps.csv, table4_mp_fc1.csv, early_warning.csv,
    early_warning_counts.csv, paper_comparison.csv, report.md,
    summary.txt and figures/*.png. Runs of the modular-addition transformer (--task modadd)
    get its tables and figures instead (`grokjax.analysis.modadd_report`: phases.csv,
    matrices_8.csv, appendix_h.csv); runs of both tasks under one root are refused.

    Every input is checked first (`grokjax.analysis.runs.read_runs`; the result's `runs` are
    those `Run` values, for the trap ablation); everything is written to a
    staging folder next to `out_dir` and moved into place at the end (`grokjax.analysis.outdir`), so
    a failure leaves the previous outputs as they were.

    Raises:
        AnalysisError: missing or empty input, no run, a run that cannot be analysed (one
            line per problem), any input problem with `options.strict`, an `out_dir` that is
            not a writable folder, or outputs that cannot be written.
    """
    options = options or AnalysisOptions()
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "analysis"
    named = find_named_runs(root)
    with staged_outputs(out_dir) as staging:
        try:
            return _report_into(staging, out_dir, named, options, figures, phase_options)
        except CheckpointError as e:
            raise AnalysisError(f"{e}; the previous outputs are unchanged") from None


@contextlib.contextmanager
def staged_outputs(out_dir: Path) -> Iterator[Path]:
    """A new staging folder next to `out_dir` (`outdir.stage`), removed afterwards; an OSError
    while creating or writing it becomes an AnalysisError (the previous outputs are unchanged:
    only `outdir.publish` moves anything into `out_dir`)."""
    try:
        staging = outdir.stage(out_dir)
    except OSError as e:
        raise AnalysisError(e.strerror or str(e)) from None
    try:
        yield staging
    except OSError as e:
        raise AnalysisError(f"cannot write the outputs for {out_dir} ({e.strerror or e}); "
                            "the previous outputs are unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _task(runs: dict) -> str:
    """The one task of the runs (config.json's task; an MLP run names none); mixed tasks are refused."""
    tasks = {r.config.get("task", "mnist_mlp") for r in runs.values()}
    if len(tasks) > 1:
        raise AnalysisError(f"the input holds runs of several tasks ({', '.join(sorted(tasks))}); "
                            "analyse each task's runs separately")
    return tasks.pop()


def _report_into(staging: Path, out_dir: Path, named: dict[str, Path], options: AnalysisOptions, figures: bool,
                 phase_options: PhaseOptions | None) -> dict:
    """make_report's work: every output goes to `staging`, then `outdir.publish`."""
    runs = read_runs(named, strict=options.strict)  # every input checked before any long computation
    all_layers, all_steps, timings = [], [], {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        layers, steps = analyze_run(run, options, name=name)
        wall = time.perf_counter() - t0
        ok = steps[steps["status"] == "ok"]
        timings[name] = {"checkpoints": len(ok), "wall": wall, "computed": steps.attrs.get("computed_checkpoints"),
                         **{k: float(ok[f"time/{k}"].sum()) for k in (*options.engines, "progress")
                            if f"time/{k}" in ok}}
        all_layers.append(layers)
        all_steps.append(steps)
    layers, steps = pd.concat(all_layers, ignore_index=True), pd.concat(all_steps, ignore_index=True)
    write_table(layers, staging / "all_layers")
    write_table(steps, staging / "all_steps")
    modadd = _task(runs) == "modadd"
    if modadd:  # the transformer's tables and figures (its App. H)
        ph = run_phases(steps, phase_options)
        tables = modadd_report.build_tables(layers, steps, (ph, phases_markdown(ph)))
    else:
        tables = build_tables(layers, steps, phase_options)
    write_tables(tables, staging)
    phases_df = tables["phases"][0]
    text = (modadd_report.summary_text if modadd else summary_text)(layers, steps, phases_df, timings)
    (staging / "summary.txt").write_text(text + "\n")
    written = []
    if figures and len(phases_df):
        run_dirs = {n: runs[n].path for n in phases_df["run"]}
        if modadd:
            written = modadd_report.make_figures(steps, phases_df, run_dirs, staging / "figures",
                                                 {n: runs[n].config for n in phases_df["run"]})
        else:
            written = make_figures(steps, phases_df, run_dirs, staging / "figures")
    # Without --figures this time, the figures of the previous analysis stay as they were.
    outdir.publish(staging, out_dir, keep=() if figures else ("figures/",))
    return {"out_dir": out_dir, "report": out_dir / "report.md", "summary": text, "timings": timings,
            "figures": [out_dir / p.relative_to(staging) for p in written], "tables": tables, "runs": runs}
