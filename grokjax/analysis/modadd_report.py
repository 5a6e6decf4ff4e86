"""The report of modular-addition runs (--task modadd, the paper's App. H): tables, summary, figures.

`grokjax.analysis.report.make_report` hands runs of the transformer here once they are analysed
(`grokjax.analysis.pipeline.analyze_run`: the native HTSR rows of the 8 matrices of
`grokjax.analysis.modadd.MATRICES`, and per checkpoint the embedding's Fourier energy and Nanda
et al.'s restricted and excluded losses, `grokjax.analysis.modadd.compute_measures`).

Phases are read from test accuracy as for the MLP (`grokjax.analysis.phases.detect_phases`),
each at its checkpoint (`report.run_phases`, which the report hands in: `<phase>_ckpt`). The tables (tidy CSV plus
markdown, mean ± std over runs with the same weight decay and length, sample std):

* matrices: per matrix and phase, alpha and the trap count (and the mean-aware columns where
  the rows carry them): the 8-matrix HTSR record;
* appendix_h: per phase, test accuracy, alpha over the 8 matrices (mean ± std over every
  (run, matrix) pair), traps per matrix (likewise), the peak Fourier energy of the embedding,
  and the restricted and excluded losses: the comparison the paper's App. H makes, beside its
  numbers (`PAPER`, as printed there: mean ± std over checkpoints in each phase).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from grokjax import ckpt  # noqa: E402
from grokjax.analysis import figures, modadd  # noqa: E402
from grokjax.analysis.phase_tables import format_cell  # noqa: E402
from grokjax.analysis.phases import NO_GROKKING, PHASES, nearest_step, phase_title  # noqa: E402

MATRIX_METRICS = (("alpha", "α"), ("traps", "traps"), ("alpha_centred", "α, W − mean"),
                  ("traps_k_mean", "traps, mean of K shuffles"))
# (step-table column, row label) of the App. H table besides alpha and traps.
STEP_METRICS = (("test/acc", "test accuracy"), ("train/acc", "train accuracy"),
                ("progress/fourier_peak", "peak Fourier energy of W_E"),
                ("progress/restricted_loss", "restricted loss"), ("progress/excluded_loss", "excluded loss"),
                ("params/l2", "ℓ2 norm of the parameters"))
# The paper's App. H (arXiv 2602.02859), as printed: (metric, phase) -> its text. Test accuracy,
# alpha and traps are mean ± std over the checkpoints of each phase; traps "appear only in
# anti-grokking"; the Fourier peaks are single values. docs/modadd.md quotes them with their source.
PAPER = {("test/acc", "pre"): "0.40 ± 0.28", ("test/acc", "grok"): "0.97 ± 0.02", ("test/acc", "anti"): "0.68 ± 0.11",
         ("train/acc", "pre"): "1.0", ("train/acc", "grok"): "1.0", ("train/acc", "anti"): "1.0",
         ("alpha", "pre"): "4.10 ± 0.83", ("alpha", "grok"): "2.02 ± 0.44", ("alpha", "anti"): "3.89 ± 0.68",
         ("traps", "pre"): "0", ("traps", "grok"): "0", ("traps", "anti"): "4.88 ± 1.55",
         ("progress/fourier_peak", "grok"): "0.218", ("progress/fourier_peak", "anti"): "0.021"}
# App. H's trap count of each matrix in anti-grokking.
PAPER_TRAPS_ANTI = {"embed": 7, "W_Q": 3, "W_K": 5, "W_V": 3, "W_O": 4, "fc1": 5, "fc2": 7, "unembed": 5}
KEYS = ("wd", "steps", "engine")
MATRIX_COLORS = dict(zip(modadd.MATRICES, plt.get_cmap("tab10").colors))


def values_at_phases(layers: pd.DataFrame, steps: pd.DataFrame, phases_df: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (run, engine, matrix, metric, phase) with its value at the phase's
    checkpoint; the step-table metrics have matrix '-' (and engine 'native')."""
    out = []
    for ph in phases_df.to_dict("records"):
        base = dict(run=ph["run"], wd=ph["wd"], steps=ph["final_step"], seed=ph["seed"])
        mine, st = layers[layers["run"] == ph["run"]], steps[steps["run"] == ph["run"]].set_index("step")
        for phase in PHASES:
            used = ph[f"{phase}_ckpt"]
            for engine, eng in mine.groupby("engine", sort=False):
                at = eng[eng["step"] == used].set_index("layer") if np.isfinite(used) else eng.iloc[:0]
                for metric, _ in MATRIX_METRICS:
                    if metric not in eng or eng[metric].isna().all():
                        continue
                    for m in modadd.MATRICES:
                        v = float(at[metric].get(m, np.nan)) if len(at) else np.nan
                        out.append(dict(base, engine=engine, matrix=m, metric=metric, phase=phase,
                                        step_used=used, value=v))
            for metric, _ in STEP_METRICS:
                v = float(st[metric].get(used, np.nan)) if metric in st and np.isfinite(used) else np.nan
                out.append(dict(base, engine="native", matrix="-", metric=metric, phase=phase, step_used=used,
                                value=v))
    return pd.DataFrame(out)


def _summary(long: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """mean, std (ddof 1) and n of the finite values per `keys`."""
    if long.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n"])
    vals = long[np.isfinite(long["value"].astype(float))]
    return vals.groupby(keys, sort=False)["value"].agg(mean="mean", std="std", n="count").reset_index()


def _phase_cells(rows: pd.DataFrame, metric: str, fmt) -> list[str]:
    """One table cell per phase from summary rows (mean, std, n), '–' where a phase has none."""
    cells = []
    for phase in PHASES:
        r = rows[rows["phase"] == phase]
        cells.append("–" if r.empty else fmt(float(r["mean"].iloc[0]), float(r["std"].iloc[0]),
                                             int(r["n"].iloc[0]), metric))
    return cells


def matrices_table(long: pd.DataFrame, collapsed=None) -> tuple[pd.DataFrame, str]:
    """The 8-matrix record: per (wd, steps, engine), one line per matrix and metric, one column per phase."""
    sub = long[long["matrix"] != "-"]
    summary = _summary(sub, [*KEYS, "matrix", "metric", "phase"])
    head = ["WD", "steps", "engine", "matrix, metric", *(phase_title(p, collapsed) for p in PHASES),
            "paper (App. H, anti-grokking)", "runs"]
    lines = ["### The 8 matrices at the phases (HTSR α and correlation traps)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (wd, n_steps, engine), grp in summary.groupby(list(KEYS), sort=True):
        for metric, label in MATRIX_METRICS:
            for m in modadd.MATRICES:
                rows = grp[(grp["matrix"] == m) & (grp["metric"] == metric)]
                if rows.empty:
                    continue
                cells = _phase_cells(rows, metric, format_cell)
                paper = str(PAPER_TRAPS_ANTI[m]) if metric == "traps" else "–"
                lines.append(f"| {wd:g} | {int(n_steps):,} | {engine} | {m} {label} | " + " | ".join(cells)
                             + f" | {paper} | {int(rows['n'].max())} |")
    return summary, "\n".join(lines) + "\n"


def appendix_h_table(long: pd.DataFrame, collapsed=None) -> tuple[pd.DataFrame, str]:
    """Per phase: test accuracy, alpha and traps over the 8 matrices, the peak Fourier energy and
    the restricted and excluded losses (the module docstring); 'n' counts runs, or (run, matrix)
    pairs for alpha and traps."""
    summary = _summary(long, [*KEYS, "metric", "phase"])
    head = ["WD", "steps", "engine", "metric", *(phase_title(p, collapsed) for p in PHASES), "paper (App. H)", "n"]
    lines = ["### App. H: the transformer at the phases (mean ± std; α and traps over the 8 matrices)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("alpha", "α (8 matrices)"), ("traps", "traps per matrix"), *STEP_METRICS]
    for (wd, n_steps, engine), grp in summary.groupby(list(KEYS), sort=True):
        for metric, label in rows:
            sub = grp[grp["metric"] == metric]
            if sub.empty:
                continue
            cells = _phase_cells(sub, metric, _cell)
            paper = ", ".join(f"{v} ({p})" for (m, p), v in PAPER.items() if m == metric) or "–"
            lines.append(f"| {wd:g} | {int(n_steps):,} | {engine} | {label} | " + " | ".join(cells)
                         + f" | {paper} | {int(sub['n'].max())} |")
    lines += ["", "The paper's column is its App. H as printed (arXiv 2602.02859): test accuracy, α and traps as "
              "mean ± std over the checkpoints of each phase, here mean ± std over runs (α and traps: over "
              "(run, matrix) pairs) at each phase's one checkpoint."]
    return summary, "\n".join(lines) + "\n"


def _cell(mean: float, std: float, n: int, metric: str) -> str:
    """alpha and traps as the MLP's tables write them; the other measures to 4 significant digits."""
    if metric in ("alpha", "traps") or not np.isfinite(mean):
        return format_cell(mean, std, n, metric)
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {std:.2g}"


def build_tables(layers: pd.DataFrame, steps: pd.DataFrame,
                 phases: tuple[pd.DataFrame, str]) -> dict[str, tuple[pd.DataFrame, str]]:
    """The tables of modadd runs as {name: (tidy DataFrame, markdown)}: phases, matrices_8, appendix_h.

    `phases`: the runs' phases and their markdown (`report.run_phases`, `report.phases_markdown`).
    """
    ph = phases[0]
    long = values_at_phases(layers, steps, ph)
    collapsed = list(ph["collapsed"]) if len(ph) else None
    return {"phases": phases, "matrices_8": matrices_table(long, collapsed),
            "appendix_h": appendix_h_table(long, collapsed)}


def summary_text(layers: pd.DataFrame, steps: pd.DataFrame, phases_df: pd.DataFrame, timings: dict) -> str:
    """A few lines per run: phases, then alpha, traps and the peak Fourier energy at each phase."""
    lines = []
    for ph in phases_df.to_dict("records"):
        t = timings.get(ph["run"], {})
        peak = f"peak test acc {ph['peak_test_acc']:.4f} at {ph['grok_step']:,}"
        if not ph["grokking"]:
            peak = f"{NO_GROKKING}: max test acc {ph['peak_test_acc']:.4f} at {ph['grok_step']:,}"
        pre = f"{ph['pre_step']:,.0f}" if np.isfinite(ph["pre_step"]) else "–"
        lines.append(f"{ph['run']} (modadd, WD={ph['wd']:g}, seed {ph['seed']}, {t.get('checkpoints', '?')} "
                     f"checkpoints): pre-grokking ends {pre} [{ph['pre_status']}], {peak}, "
                     f"{'collapse' if ph['collapsed'] else 'no collapse'}: {ph['anti_test_acc']:.4f} at "
                     f"{ph['anti_step']:,} (drop {ph['drop_pp']:.1f} pp)")
        mine = layers[(layers["run"] == ph["run"]) & (layers["engine"] == "native")]
        st = steps[steps["run"] == ph["run"]].set_index("step")
        parts = []
        for phase in PHASES:
            s = ph[f"{phase}_ckpt"]
            if not np.isfinite(s):
                parts.append(f"{phase}: no analysed checkpoint")
                continue
            at = mine[mine["step"] == s]
            fourier = st["progress/fourier_peak"].get(s, np.nan) if "progress/fourier_peak" in st else np.nan
            parts.append(f"{phase} (step {s:,.0f}): α mean {at['alpha'].mean():.2f} (min {at['alpha'].min():.2f}), "
                         f"traps {at['traps'].sum():.0f}, Fourier peak {fourier:.3f}")
        lines.append("  native, 8 matrices: " + "; ".join(parts))
        lines.append(f"  time: native {t.get('native', 0):.1f} s, measures {t.get('progress', 0):.1f} s; "
                     f"wall {t.get('wall', 0):.1f} s")
    return "\n".join(lines)


def _steps_panel(ax, d: pd.DataFrame, ph: dict, cols, ylabel: str, log_y: bool = False) -> None:
    figures.shade_phases(ax, ph, float(d["step"].max()), label=False)
    for col, label, color in cols:
        if col in d and d[col].notna().any():
            sub = d[d[col].notna()]
            ax.plot(sub["step"], sub[col].astype(float), color=color, lw=1.4, label=label)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(fontsize=7, loc="best", framealpha=0.9, ncol=2)


def fig_matrices(d: pd.DataFrame, ph: dict, path: Path, title: str) -> Path:
    """Alpha (top, α = 2 dashed, the 8-matrix mean in black) and traps of the 8 matrices vs steps."""
    d = figures._positive(d)
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    alpha = [(f"native/alpha_{m}", m, MATRIX_COLORS[m]) for m in modadd.MATRICES]
    _steps_panel(axes[0], d, ph, [*alpha, ("native/alpha_mean", "mean of the 8", "black")], "HTSR α")
    axes[0].axhline(2.0, color="tab:red", ls="--", lw=1.2)
    _steps_panel(axes[1], d, ph, [(f"native/traps_{m}", m, MATRIX_COLORS[m]) for m in modadd.MATRICES],
                 "correlation traps")
    axes[0].set_title(title)
    axes[1].set_xlabel("optimization steps")
    fig.tight_layout()
    return figures._finish(fig, path)


def fig_measures(d: pd.DataFrame, ph: dict, p: int, path: Path, title: str) -> Path:
    """The peak Fourier energy of W_E (2/p dotted: a spread-out embedding), the train, test,
    restricted and excluded losses (log), and the parameter norm vs steps."""
    d = figures._positive(d)
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    _steps_panel(axes[0], d, ph, [("progress/fourier_peak", "peak Fourier energy of W_E", "tab:blue")],
                 "peak Fourier fraction")
    axes[0].axhline(2.0 / p, color="0.4", ls=":", lw=1.2)
    _steps_panel(axes[1], d, ph, [("train/loss", "train", "tab:red"), ("test/loss", "test", "tab:purple"),
                                  ("progress/restricted_loss", "restricted", "tab:green"),
                                  ("progress/excluded_loss", "excluded", "tab:orange")], "cross-entropy", log_y=True)
    _steps_panel(axes[2], d, ph, [("params/l2", "all parameters", "tab:blue")], "$\\ell_2$ norm")
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimization steps")
    fig.tight_layout()
    return figures._finish(fig, path)


def fig_fourier(run_dir: Path, at: dict[str, float], p: int, path: Path, title: str) -> Path | None:
    """The embedding's Fourier spectrum (energy fraction per frequency k) at each phase, read from
    the params checkpoint nearest to the phase's checkpoint; None, with a warning, without params
    checkpoints (an exported record carries none: the tables' Fourier peaks come from the monitor)."""
    saved = ckpt.list_param_steps(run_dir)
    if not saved:
        warnings.warn(f"{run_dir}: no params checkpoints, so {path.name} (the embedding's Fourier spectrum at "
                      "the phases) is left out; the tables' Fourier peaks come from the monitor record", stacklevel=2)
        return None
    fig, axes = plt.subplots(1, len(PHASES), figsize=(12, 3.4), sharey=True)
    for ax, phase in zip(axes, PHASES):
        s = nearest_step(saved, at[phase])
        if not np.isfinite(s):
            ax.set_title(f"{phase}: no checkpoint")
            continue
        f = modadd.embedding_fourier(ckpt.load_params(run_dir, int(s))["embed"], p)
        ax.bar(f["freqs"][1:], f["fraction"][1:], color="tab:blue", width=0.8)
        ax.axhline(2.0 / p, color="0.4", ls=":", lw=1.0)
        ax.set_title(f"{phase} (step {int(s):,}): peak {f['peak_fraction']:.3f} at k={f['peak_freq']}", fontsize=9)
        ax.set_xlabel("frequency k")
    axes[0].set_ylabel("fraction of ‖W_E‖² (numbers)")
    fig.suptitle(title)
    fig.tight_layout()
    return figures._finish(fig, path)


def make_figures(steps: pd.DataFrame, phases_df: pd.DataFrame, run_dirs: dict[str, Path], out_dir: Path,
                 configs: dict[str, dict]) -> list[Path]:
    """The figures of the first run (lowest weight decay, then seed): accuracy, the 8 matrices'
    alpha and traps, the Fourier and loss measures, the embedding's spectrum at the phases; an
    overlay of all runs when there are several."""
    out_dir = Path(out_dir)
    main = phases_df.sort_values(["wd", "seed", "run"]).iloc[0].to_dict()
    d, p = steps[steps["run"] == main["run"]], int(configs[main["run"]]["p"])
    tag = f"modadd p={p}, run {main['run']}, WD = {main['wd']:g}, seed {main['seed']}"
    written = [figures.fig_accuracy(d, main, out_dir / "fig1_accuracy.png", f"Train/test accuracy ({tag})"
                                    + ("" if main["grokking"] else f": {NO_GROKKING}")),
               fig_matrices(d, main, out_dir / "fig_modadd_matrices.png", f"HTSR α and traps of the 8 matrices ({tag})"),
               fig_measures(d, main, p, out_dir / "fig_modadd_measures.png", f"Fourier and loss measures ({tag})")]
    spectrum = fig_fourier(run_dirs[main["run"]], {ph: main[f"{ph}_ckpt"] for ph in PHASES}, p,
                           out_dir / "fig_modadd_fourier.png", f"Fourier spectrum of the embedding ({tag})")
    if spectrum is not None:
        written.append(spectrum)
    if steps["run"].nunique() > 1:
        written.append(figures.fig_overlay(steps, out_dir / "fig_overlay_runs.png"))
    return written
