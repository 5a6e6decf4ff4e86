"""This project's Tables 1, 2 and 4 beside the paper's own numbers: the `paper_comparison` table.

`PAPER` holds the paper's numbers as it prints them. Tables 1 and 2 are mean ± std over its
seeds (how many is not stated); Table 4 is FC1 of one selected WD = 0 run, without a spread.
The paper reads its phases at nominal steps: pre-grokking at ~10^5, grokking (the test
accuracy peak) at 10^6 and anti-grokking (the collapse) at 10^7. This project reads them at
each run's own phase edges (`grokjax.analysis.phases.detect_phases`), and Tables 1 and 2 also
at 10^5 steps (`phase_tables.NOMINAL_STEP`); the paper's pre-grokking number is shown beside
both. Each of this project's cells is the value at the phase's checkpoint, mean ± std over the
group's runs (the 'checkpoint' column of Tables 1, 2 and 4).

A paper row is compared with the WeightWatcher-compatible metric it reports (`alpha`,
`traps`) and with its mean-aware variant (`alpha_centred`, `traps_centred`: the spectrum of
W − mean(W), see `grokjax.analysis.meanaware.extended_metrics`), where the layer table has it. The
paper gives Table 2 for WD = 0 and for WD > 0 (one row set for every positive weight
decay), Tables 1 and 4 for WD = 0 only; a group without paper numbers is left out.
"""

from __future__ import annotations

import math

import pandas as pd

from grokjax.analysis.phase_tables import NOMINAL_TITLE, format_cell
from grokjax.analysis.phases import PHASE_TITLES, phase_title

# Our phase columns, and the paper's phase each one is compared with.
COLUMNS = ("pre", "nominal", "grok", "anti")
PAPER_PHASE = {"pre": "pre", "nominal": "pre", "grok": "grok", "anti": "anti"}
PAPER_STEPS = {"pre": "~10^5", "grok": "10^6", "anti": "10^7"}

# (table, weight decay: "0" or ">0", layer, metric) -> {paper phase: (mean, std, as printed)}.
# std is NaN where the paper prints none.
_N = math.nan
PAPER = {
    ("Table 1", "0", "fc1", "alpha"): {"pre": (4.0, 1.3, "4.0 ± 1.3"), "grok": (3.2, 0.6, "3.2 ± 0.6"),
                                       "anti": (1.0, 0.40, "1.0 ± 0.40")},
    ("Table 1", "0", "fc2", "alpha"): {"pre": (4.6, 0.5, "4.6 ± 0.5"), "grok": (2.4, 0.1, "2.4 ± 0.1"),
                                       "anti": (1.4, 0.24, "1.4 ± 0.24")},
    ("Table 1", "0", "mean", "alpha"): {"pre": (4.3, 0.70, "4.3 ± 0.70"), "grok": (2.8, 0.30, "2.8 ± 0.30"),
                                        "anti": (1.2, 0.23, "1.2 ± 0.23")},
    ("Table 2", "0", "fc1", "traps"): {"pre": (0.0, _N, "0"), "grok": (0.0, _N, "0"),
                                       "anti": (6.33, 5.44, "6.33 ± 5.44")},
    ("Table 2", "0", "fc2", "traps"): {"pre": (0.0, _N, "0"), "grok": (0.0, _N, "0"),
                                       "anti": (1.00, 0.00, "1.00 ± 0.00")},
    ("Table 2", ">0", "fc1", "traps"): {"pre": (0.0, _N, "0"), "grok": (0.0, _N, "0"),
                                        "anti": (2.00, 0.00, "2.00 ± 0.00")},
    ("Table 2", ">0", "fc2", "traps"): {"pre": (0.0, _N, "0"), "grok": (0.0, _N, "0"),
                                        "anti": (1.00, 0.00, "1.00 ± 0.00")},
    ("Table 4", "0", "fc1", "rand_sigma_mp"): {"pre": (1.002, _N, "≈ 1.002"), "grok": (0.999, _N, "≈ 0.999"),
                                               "anti": (0.949, _N, "≈ 0.949")},
    ("Table 4", "0", "fc1", "mp_ks"): {"pre": (0.0120, _N, "0.0120"), "grok": (0.0212, _N, "0.0212"),
                                       "anti": (0.3044, _N, "0.3044")},
    ("Table 4", "0", "fc1", "mp_pvalue"): {"pre": (1.0, _N, "≈ 1.0"), "grok": (1.0, _N, "≈ 1.0"),
                                           "anti": (1.877e-5, _N, "1.877e-5")},
    ("Table 4", "0", "fc1", "traps"): {"pre": (0.0, _N, "0"), "grok": (0.0, _N, "0"), "anti": (9.0, _N, "9")},
}
# The metrics of this project compared with each paper metric (the first is the paper's own).
VARIANTS = {"alpha": ("alpha", "alpha_centred"), "traps": ("traps", "traps_centred")}
LABELS = {"fc1": "FC1", "fc2": "FC2", "mean": "average (FC1, FC2)"}
METRIC_LABELS = {"alpha": "α", "alpha_centred": "α, W − mean", "traps": "traps", "traps_centred": "traps, W − mean",
                 "rand_sigma_mp": "σ_mp of W^rand", "mp_ks": "KS statistic", "mp_pvalue": "p-value"}
COLS = ["wd", "steps", "engine", "table", "layer", "metric", "paper_metric", "phase", "paper_phase", "value_mean",
        "value_std", "n", "paper_mean", "paper_std", "paper_text", "difference"]


def wd_kind(wd: float) -> str:
    """'0' or '>0': the paper's two weight-decay settings."""
    return "0" if float(wd) == 0.0 else ">0"


def compare(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Tidy table: one row per (wd, steps, engine, paper row, our metric, phase) with both values.

    `tables` maps 'table1_alpha', 'table2_traps' and 'table4_mp_fc1' to their tidy summaries
    (`grokjax.analysis.report.build_tables`: columns wd, steps, engine, layer, metric, phase,
    mean, std, n). `difference` is this project's mean minus the paper's.
    """
    sources = {"Table 1": tables.get("table1_alpha"), "Table 2": tables.get("table2_traps"),
               "Table 4": tables.get("table4_mp_fc1")}
    rows = []
    for (table, kind, layer, paper_metric), by_phase in PAPER.items():
        src = sources[table]
        if src is None or src.empty:
            continue
        ours = VARIANTS.get(paper_metric, (paper_metric,)) if table != "Table 4" else (paper_metric,)
        src = src[(src["layer"] == layer) & src["metric"].isin(ours) & (src["wd"].map(wd_kind) == kind)]
        for r in src.itertuples(index=False):
            if r.phase not in PAPER_PHASE:
                continue
            pm, ps, text = by_phase[PAPER_PHASE[r.phase]]
            mean = float(r.mean) if r.n else math.nan
            rows.append(dict(wd=r.wd, steps=r.steps, engine=r.engine, table=table, layer=layer, metric=r.metric,
                             paper_metric=paper_metric, phase=r.phase, paper_phase=PAPER_PHASE[r.phase],
                             value_mean=mean, value_std=float(r.std) if r.n > 1 else math.nan, n=int(r.n),
                             paper_mean=pm, paper_std=ps, paper_text=text, difference=mean - pm))
    return pd.DataFrame(rows, columns=COLS)


def comparison_markdown(cmp: pd.DataFrame, phases_df: pd.DataFrame | None = None) -> str:
    """One table per (wd, steps, engine): per row, this project's value at each phase beside
    the paper's. The third phase is titled "final (no collapse)" when none of the group's runs
    collapsed (from `phases_df`, a `report.run_phases` table)."""
    lines = ["### Against the paper: Tables 1, 2 and 4 beside its numbers", "",
             "The paper's numbers as printed (Tables 1 and 2: mean ± std over its seeds; Table 4: one run), read "
             f"at its nominal steps (pre-grokking {PAPER_STEPS['pre']}, grokking {PAPER_STEPS['grok']}, "
             f"anti-grokking {PAPER_STEPS['anti']}); this project's: the value at each run's own phase "
             "checkpoint (mean ± std over runs), and at 10^5 steps. 'W − mean' rows put the mean-aware "
             "variant beside the same paper number.", ""]
    if cmp.empty:
        return "\n".join(lines + ["(no run with numbers in the paper's tables)"]) + "\n"
    for (wd, n_steps, engine), grp in cmp.groupby(["wd", "steps", "engine"], sort=True):
        collapsed = None
        if phases_df is not None and len(phases_df):
            mine = phases_df[(phases_df["wd"] == wd) & (phases_df["final_step"] == n_steps)]
            collapsed = list(mine["collapsed"]) or None
        titles = {"pre": PHASE_TITLES["pre"], "nominal": NOMINAL_TITLE, "grok": PHASE_TITLES["grok"],
                  "anti": phase_title("anti", collapsed)}
        head = ["Table", "Layer, metric", f"{titles['pre']}: this project", f"{titles['nominal']}: this project",
                f"paper ({PAPER_STEPS['pre']})", f"{titles['grok']}: this project", f"paper ({PAPER_STEPS['grok']})",
                f"{titles['anti']}: this project", f"paper ({PAPER_STEPS['anti']})"]
        lines += [f"WD = {wd:g}, {int(n_steps):,} steps, engine {engine}:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (table, layer, metric), rows in grp.groupby(["table", "layer", "metric"], sort=False):
            at = {r.phase: r for r in rows.itertuples(index=False)}
            any_row = next(iter(at.values()))
            paper = {p: PAPER[(table, wd_kind(wd), layer, any_row.paper_metric)][p][2] for p in PAPER_STEPS}
            cell = {p: format_cell(at[p].value_mean, at[p].value_std, at[p].n, metric) if p in at else "–" for p in COLUMNS}
            label = f"{LABELS.get(layer, layer)} {METRIC_LABELS.get(metric, metric)}"
            lines.append(f"| {table} | {label} | {cell['pre']} | {cell['nominal']} | {paper['pre']} | "
                         f"{cell['grok']} | {paper['grok']} | {cell['anti']} | {paper['anti']} |")
        lines.append("")
    return "\n".join(lines) + "\n"
