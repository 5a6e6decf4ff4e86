"""The paper's figures from analysed runs (matplotlib, Agg backend, PNG).

Fig 1: train/test accuracy vs steps with the phases shaded. Fig 2: one layer's ESD with its
power-law fit (log-log) and the ESD of W^rand with its fitted Marchenko-Pastur density.
Fig 3: W^rand ESDs of FC1 and FC2 at the three phases with the traps marked. Fig 4: alpha of
FC1, FC2 and their mean vs steps, alpha = 2 dashed. Fig 5: progress measures and l2 norm vs
steps. Figs 6 and 7: Fig 1 + Fig 4 and Fig 5 for a weight-decay run; plus an overlay of all
runs (test accuracy and mean alpha, coloured by weight decay). A run whose test accuracy
never rose gets no phase bands: one grey band, and the title, say "no grokking".

Figs 2 and 3 recompute eigenvalues from the checkpoints with `grokjax.analysis.htsr`, walking the
same shuffle stream as the analysis (`htsr.shuffle_spectra` seeded with
`pipeline.checkpoint_seed`), so the traps drawn are the ones counted in the tables.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from grokjax import ckpt, rundir  # noqa: E402
from grokjax.analysis import htsr  # noqa: E402
from grokjax.analysis.phases import NO_GROKKING  # noqa: E402
from grokjax.analysis.pipeline import checkpoint_seed, weights_of  # noqa: E402

PHASE_COLORS = {"pre": "0.85", "grok": "#f6e27f", "anti": "#a8d8a0", "plateau": "#cfe3f3", "none": "0.93"}
ENGINE_STYLE = {"native": dict(lw=1.6), "ww": dict(lw=0, marker="o", ms=3.5, mfc="none", alpha=0.8)}
LAYER_COLORS = {"fc1": "tab:blue", "fc2": "tab:orange", "fc3": "tab:gray", "mean": "black"}
DPI = 130


def _positive(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with step > 0 (log x axes cannot show step 0), sorted."""
    return df[df["step"] > 0].sort_values("step")


def shade_phases(ax, ph: dict, xmax: float, label: bool = True) -> None:
    """Shades pre-grokking [saturated_step, pre_step] (train saturated, test still low),
    grokking [pre_step, grok_step] and the rest: anti-grokking when a collapse was detected,
    else a 'no collapse' plateau colour. A run whose training never saturated is
    pre-grokking up to its peak. A run without grokking (`ph['grokking']` False: test
    accuracy never rose) gets one grey band labelled NO_GROKKING and no phase bands."""
    sat = ph.get("saturated_step", np.nan)
    start = float(sat) if np.isfinite(sat) and sat > 0 else 1.0
    if not ph["grokking"]:
        if xmax > start:
            ax.axvspan(start, xmax, color=PHASE_COLORS["none"], alpha=0.6, lw=0, zorder=0,
                       label=NO_GROKKING if label else None)
        return
    if np.isfinite(ph["pre_step"]):
        pre, pre_name = ph["pre_step"], "pre-grokking (train saturated, test low)"
    else:
        pre, pre_name = ph["grok_step"], "pre-grokking (train acc never saturates)"
    spans = [("pre", start, pre, pre_name), ("grok", pre, ph["grok_step"], "grokking"),
             ("anti" if ph["collapsed"] else "plateau", ph["grok_step"], xmax,
              "anti-grokking" if ph["collapsed"] else "after peak (no collapse)")]
    for key, lo, hi, name in spans:
        if hi > lo:
            ax.axvspan(max(lo, start), hi, color=PHASE_COLORS[key], alpha=0.6, lw=0, zorder=0,
                       label=name if label else None)


def mark_phase_steps(ax, ph: dict) -> None:
    """Dotted vertical lines at the table steps, labelled vertically; steps closer than
    0.1 decade share one label so that the texts never overlap."""
    marks = []
    for key, txt in (("pre_step", "end of pre-grokking"), ("grok_step", "max test acc"),
                     ("anti_step", "collapse (min test acc)" if ph["collapsed"] else "final step")):
        if np.isfinite(ph[key]) and ph[key] > 0:
            marks.append((int(ph[key]), txt))
    groups: list[tuple[int, list[str]]] = []
    for step, txt in sorted(marks):
        ax.axvline(step, color="0.3", ls=":", lw=1)
        if groups and np.log10(step / groups[-1][0]) < 0.1:
            if txt not in groups[-1][1]:
                groups[-1][1].append(txt)
        else:
            groups.append((step, [txt]))
    for step, txts in groups:
        ax.annotate(" / ".join(txts), (step, 0.5), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                    va="center", fontsize=7, color="0.25", xytext=(-2, 0), textcoords="offset points")


def _finish(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _accuracy_panel(ax, df: pd.DataFrame, ph: dict, title: str) -> None:
    d = _positive(df)
    shade_phases(ax, ph, float(d["step"].max()))
    ax.plot(d["step"], d["train/acc"], color="tab:red", lw=1.6, label="train accuracy")
    ax.plot(d["step"], d["test/acc"], color="tab:purple", lw=1.6, label="test accuracy")
    mark_phase_steps(ax, ph)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimization steps")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(loc="center left", fontsize=8, framealpha=0.9)


def fig_accuracy(df: pd.DataFrame, ph: dict, path: Path, title: str) -> Path:
    """Fig 1: train and test accuracy vs steps (log x), phases shaded and marked."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    _accuracy_panel(ax, df, ph, title)
    return _finish(fig, path)


def _alpha_panels(axes, df: pd.DataFrame, ph: dict) -> None:
    d = _positive(df)
    xmax = float(d["step"].max())
    for ax, layer, name in zip(axes, ("mean", "fc1", "fc2"), ("average α (FC1, FC2)", "FC1 α", "FC2 α")):
        shade_phases(ax, ph, xmax, label=ax is axes[0])
        for engine in ("native", "ww"):
            col = f"{engine}/alpha_{layer}"
            if col in d and d[col].notna().any():
                sub = d[d[col].notna()]
                ax.plot(sub["step"], sub[col], color=LAYER_COLORS[layer], label=f"{engine} engine",
                        **ENGINE_STYLE[engine])
        col = f"native/alpha_centred_{layer}"
        if col in d and d[col].notna().any():
            sub = d[d[col].notna()]
            ax.plot(sub["step"], sub[col], color=LAYER_COLORS[layer], ls=":", lw=1.4,
                    label="native, W − mean(W) (centred)")
        ax.axhline(2.0, color="tab:red", ls="--", lw=1.2, label="α = 2")
        ax.set_xscale("log")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    # Above the panels, so that it never hides a curve.
    axes[0].legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.01), framealpha=0.9)
    axes[-1].set_xlabel("optimization steps")


def fig_alpha(df: pd.DataFrame, ph: dict, path: Path, title: str) -> Path:
    """Fig 4: HTSR alpha vs steps: mean (top), FC1, FC2, raw and (dotted) centred; alpha = 2 dashed;
    phases shaded."""
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    _alpha_panels(axes, df, ph)
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def fig_progress(df: pd.DataFrame, ph: dict, path: Path, title: str) -> Path:
    """Fig 5: activation sparsity, FC1 weight entropy, circuit complexity and l2 norm vs steps."""
    d = _positive(df)
    xmax = float(d["step"].max())
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    panels = (
        ("activation sparsity $A_s$ (FC1, τ=1)", [("progress/sparsity", "hard"), ("progress/sparsity_smooth", "smooth")]),
        ("abs. weight entropy $H_{abs}$(FC1)", [("progress/entropy_fc1", "FC1")]),
        ("circuit complexity $Λ_{LC}$ (nats)", [("progress/circuit", "KL(orig ‖ masked)")]),
        ("$\\ell_2$ norm", [("params/l2", "all params"), ("params/l2_weights", "weights only (eq. 7)")]),
    )
    for ax, (ylabel, cols) in zip(axes, panels):
        shade_phases(ax, ph, xmax, label=ax is axes[0])
        for (col, lab), color in zip(cols, ("tab:blue", "tab:green")):
            if col in d and d[col].notna().any():
                sub = d[d[col].notna()]
                ax.plot(sub["step"], sub[col], color=color, lw=1.5, label=lab)
        ax.set_xscale("log")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7, loc="best", framealpha=0.9)
    axes[0].set_title(title)
    axes[-1].set_xlabel("optimization steps")
    fig.tight_layout()
    return _finish(fig, path)


def fig_wd_run(df: pd.DataFrame, ph: dict, path: Path, title: str) -> Path:
    """Fig 6: accuracy (top) and alpha (mean, FC1, FC2) for one weight-decay run."""
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True, gridspec_kw=dict(height_ratios=[1.2, 1, 1, 1]))
    _accuracy_panel(axes[0], df, ph, title)
    axes[0].set_xlabel("")
    _alpha_panels(axes[1:], df, ph)
    fig.tight_layout()
    return _finish(fig, path)


def fig_overlay(steps: pd.DataFrame, path: Path) -> Path:
    """Test accuracy and mean alpha of every run, coloured by weight decay."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    wds = sorted(steps["wd"].unique())
    colors = plt.get_cmap("tab10").colors
    for i, wd in enumerate(wds):
        for j, (run, d) in enumerate(steps[steps["wd"] == wd].groupby("run")):
            d = _positive(d)
            lab = f"WD = {wd:g}" if j == 0 else None
            axes[0].plot(d["step"], d["test/acc"], color=colors[i % len(colors)], lw=1.3, label=lab)
            if "native/alpha_mean" in d:
                axes[1].plot(d["step"], d["native/alpha_mean"], color=colors[i % len(colors)], lw=1.3, label=lab)
    axes[1].axhline(2.0, color="tab:red", ls="--", lw=1.2, label="α = 2")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("average α (FC1, FC2)")
    axes[0].set_title("All runs: test accuracy and α by weight decay")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("optimization steps")
    fig.tight_layout()
    return _finish(fig, path)


def _rand_panel(ax, spec: dict, title: str, legend: bool = True) -> None:
    """Histogram of W^rand's rescaled ESD (log x), MP density, bulk edge, TW threshold, traps;
    `spec` is one layer's `htsr.rand_spectrum` dict (eigenvalues and MP fit)."""
    ev = spec["evals"] * spec["evals"].size / np.sum(spec["evals"])  # scaled to mean 1
    lo = max(np.min(ev[ev > 0]) if np.any(ev > 0) else 1e-3, 1e-4)
    bins = np.geomspace(lo, np.max(ev) * 1.05, 45)
    ax.hist(ev, bins=bins, density=True, color="#b9a3d6", label="ESD of $W^{rand}$")
    if spec["status"] == "success":
        x = np.geomspace(lo, np.max(ev) * 1.05, 2000)
        ax.axvline(spec["tw_threshold"], color="black", ls="--", lw=0.8, label="trap threshold $λ^+ + \\sqrt{TW}$")
        ax.plot(x, htsr.mp_density(x, spec["sigma_mp"], spec["Q"]), color="tab:red", lw=1.5,
                label=f"MP fit (σ={spec['sigma_mp']:.3f})")
        ax.axvline(spec["bulk_max_rescaled"], color="tab:red", ls=":", lw=1, label="bulk edge $λ^+$")
        traps = ev[ev > spec["tw_threshold"]]
        if traps.size:
            ax.plot(traps, np.full(traps.size, 0.03), "v", color="black", ms=7,
                    transform=ax.get_xaxis_transform(), label=f"correlation traps ({traps.size})")
        title += f"\nσ_mp = {spec['sigma_mp']:.3f}, traps = {spec['num_spikes']}"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("eigenvalue λ of $W^{rand}$ (scaled to mean 1)", fontsize=8)
    ax.grid(alpha=0.3, which="major", lw=0.5)
    if legend:
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)


def spectra_at(run_dir: Path, step: int, run_seed: int) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(ESD of W per layer, W^rand spectrum and MP fit per layer) at one step: from the params
    checkpoint (`htsr.shuffle_spectra` on the analysis' shuffle stream, so the traps drawn are
    the ones counted), or, when it was not kept, from the in-loop monitor's stored eigenvalues
    (the same numbers: the monitor walks the same stream), refitted by `htsr.pooled_spectrum`."""
    if (Path(run_dir) / ckpt.PARAMS_DIR / str(int(step))).is_dir():
        weights = weights_of(ckpt.load_params(run_dir, int(step)))
        return ({k: htsr.esd(W) for k, W in weights.items()},
                htsr.shuffle_spectra(weights, checkpoint_seed(run_seed, int(step))))
    stored = rundir.read_spectra(run_dir, int(step))
    rows = {r["layer"]: r for r in next(r for r in rundir.read_records(run_dir) if r["step"] == int(step))["layers"]}
    esd = {layer: sp["esd"] for layer, sp in stored.items()}
    rand = {layer: htsr.pooled_spectrum(sp["rand"], int(rows[layer]["N"]), int(rows[layer]["M"]))
            for layer, sp in stored.items()}
    return esd, rand


def fig_esd(run_dir: Path, step: int, run_seed: int, layer: str, path: Path, title: str,
            options: htsr.HTSROptions | None = None) -> Path:
    """Fig 2: left, the ESD of W with its PL fit (log-log); right, W^rand's ESD and MP fit."""
    options = options or htsr.HTSROptions()
    esds, rands = spectra_at(run_dir, step, run_seed)
    evals = esds[layer]
    fit = htsr.fit_power_law(evals, fix_fingers=options.fix_fingers, max_fingers=options.max_fingers,
                             finger_thresh=options.finger_thresh, evals_thresh=options.evals_thresh)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    pos = evals[evals > 0]
    bins = np.geomspace(pos.min(), pos.max() * 1.01, 35)
    ax.hist(pos, bins=bins, density=True, color="tab:blue", alpha=0.6, label="ESD of W")
    if fit["status"] == "success":
        n_tail = np.count_nonzero(pos >= fit["xmin"])
        x = np.geomspace(fit["xmin"], fit["xmax"], 200)
        a = fit["alpha"]
        # The tail density scaled to the fraction of eigenvalues in the tail.
        ax.plot(x, (n_tail / pos.size) * (a - 1) / fit["xmin"] * (x / fit["xmin"]) ** (-a), "--",
                color="tab:red", lw=1.8, label=f"PL fit, α = {a:.2f}")
        ax.axvline(fit["xmin"], color="tab:red", lw=1.2, label=f"$λ_{{min}}$ (xmin) = {fit['xmin']:.3g}")
        ax.axvline(fit["xmax"], color="tab:orange", lw=1.2, label=f"$λ_{{max}}$ = {fit['xmax']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of $W^TW$")
    ax.set_ylabel("density")
    if fit["status"] == "success":
        detail = f"α = {fit['alpha']:.2f} ({options.fix_fingers or 'no finger fix'}; unclipped {fit['raw_alpha']:.2f}, " \
                 f"{fit['num_fingers']} fingers)"
    else:
        detail = f"PL fit {fit['status']}"
    ax.set_title(f"{layer.upper()} ESD of W, step {step:,}: {detail}", fontsize=9)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=7)
    spec = rands[layer]
    _rand_panel(ax2, spec, f"{layer.upper()} $W^{{rand}}$ ESD, step {step:,}")
    ax2.set_ylabel("density")
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def fig_traps(run_dir: Path, steps_by_phase: dict[str, float], run_seed: int, path: Path, title: str,
              layers=("fc1", "fc2")) -> Path:
    """Fig 3: W^rand ESDs at the phases (columns) for each layer (rows), traps marked."""
    phases = [(p, s) for p, s in steps_by_phase.items() if np.isfinite(s)]
    fig, axes = plt.subplots(len(layers), len(phases), figsize=(4.2 * len(phases), 3.6 * len(layers)), squeeze=False)
    names = {"pre": "end of pre-grokking", "grok": "max test acc", "anti": "collapse / final"}
    for j, (phase, step) in enumerate(phases):
        spectra = spectra_at(run_dir, int(step), run_seed)[1]
        for i, layer in enumerate(layers):
            _rand_panel(axes[i, j], spectra[layer], f"{layer.upper()}, {names.get(phase, phase)}, step {int(step):,}",
                        legend=False)
    # One legend for all panels (the trap marker only exists where there are traps).
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab.split(" (")[0], h)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    return _finish(fig, path)


def _read_at_note(ph: dict, phases) -> str:
    """'' or '; grok read at step 19,966 (no analysed checkpoint at 20,000)' for each such phase."""
    notes = [f"{p} read at step {ph[f'{p}_ckpt']:,.0f} (no analysed checkpoint at {ph[f'{p}_step']:,.0f})"
             for p in phases if np.isfinite(ph[f"{p}_ckpt"]) and ph[f"{p}_ckpt"] != ph[f"{p}_step"]]
    return "".join(f"\n{n}" for n in notes)


def _representative(phases_df: pd.DataFrame, zero_wd: bool) -> pd.Series | None:
    """The lowest-seed run with wd == 0 (or the lowest wd > 0)."""
    sub = phases_df[(phases_df["wd"] == 0) if zero_wd else (phases_df["wd"] > 0)]
    if sub.empty:
        return None
    return sub.sort_values(["wd", "seed", "run"]).iloc[0]


def make_figures(steps: pd.DataFrame, phases_df: pd.DataFrame, run_dirs: dict[str, Path], out_dir: Path) -> list[Path]:
    """Writes the paper's figures for representative runs (see module docstring).

    Figs 1-5 use the lowest-seed WD = 0 run (or, without one, the first run); Figs 6-7 the
    lowest-seed WD > 0 run. Figs 2 and 3 read each phase at the checkpoint the tables use
    (`<phase>_ckpt` of `report.run_phases`) and say so when it is not the phase step itself.
    Returns the written paths.
    """
    out_dir = Path(out_dir)
    written = []
    main = _representative(phases_df, True)
    if main is None and len(phases_df):
        main = phases_df.iloc[0]
    if main is not None:
        ph, d = main.to_dict(), steps[steps["run"] == main["run"]]
        tag = f"run {main['run']}, WD = {main['wd']:g}, seed {main['seed']}"
        written.append(fig_accuracy(d, ph, out_dir / "fig1_accuracy.png", f"Train/test accuracy ({tag})"
                                    + ("" if ph["grokking"] else f": {NO_GROKKING}")))
        rd = run_dirs[main["run"]]
        # The same checkpoints as the tables and summary.txt (report.run_phases).
        at = {p: ph[f"{p}_ckpt"] for p in ("pre", "grok", "anti")}
        if np.isfinite(at["grok"]):
            written.append(fig_esd(rd, int(at["grok"]), int(main["seed"]), "fc2", out_dir / "fig2_esd_fc2.png",
                                   f"FC2 spectra at max test accuracy ({tag}){_read_at_note(ph, ['grok'])}"))
        if any(np.isfinite(s) for s in at.values()):
            written.append(fig_traps(rd, at, int(main["seed"]), out_dir / "fig3_traps.png",
                                     f"Correlation traps in $W^{{rand}}$ ({tag}){_read_at_note(ph, at)}"))
        written.append(fig_alpha(d, ph, out_dir / "fig4_alpha.png", f"HTSR α vs steps ({tag})"))
        written.append(fig_progress(d, ph, out_dir / "fig5_progress.png", f"Progress measures ({tag})"))
    wd_run = _representative(phases_df, False)
    if wd_run is not None:
        ph, d = wd_run.to_dict(), steps[steps["run"] == wd_run["run"]]
        tag = f"run {wd_run['run']}, WD = {wd_run['wd']:g}, seed {wd_run['seed']}"
        written.append(fig_wd_run(d, ph, out_dir / "fig6_wd_alpha.png", f"Accuracy and α ({tag})"
                                  + ("" if ph["grokking"] else f": {NO_GROKKING}")))
        written.append(fig_progress(d, ph, out_dir / "fig7_wd_progress.png", f"Progress measures ({tag})"))
    if steps["run"].nunique() > 1:
        written.append(fig_overlay(steps, out_dir / "fig_overlay_runs.png"))
    return written

