"""Checks numbers stated in results/README.md, and in the project README's results summary,
against the committed files they come from.

    python results/check_numbers.py        # exit 0: every checked sentence agrees; 1: lists each that does not

Each check computes a value from the record (metrics.jsonl, analysis/steps.csv, the seeds
outputs) and asserts that the README states it in the expected words. Add a check whenever a
number is added to the text.
"""
from __future__ import annotations

import json
import sys
from itertools import groupby
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
SIGNAL_WORDS = {"fc1_alpha<2": "FC1's alpha < 2", "fc1_alpha_centred<2": "FC1's centred alpha < 2",
                "mean_alpha<2": "the average alpha < 2", "mean_alpha_centred<2": "the centred average alpha < 2",
                "traps>=1": "the raw trap count", "traps_centred>=1": "the centred trap count"}
CAMPAIGN_RUNS = ("wd0.01_seed0", "wd0_seed1", "wd0_seed2", "wd0.01_seed1", "wd0.01_seed2")  # the order


def _metrics(run: Path) -> pd.DataFrame:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return pd.DataFrame([r for r in rows if "test/acc" in r]).sort_values("step").reset_index(drop=True)


def _events(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines() if ln.strip()]


def _steps(run: Path) -> pd.DataFrame:
    s = pd.read_csv(run / "analysis" / "steps.csv")
    return s[s["test/acc"].notna()].sort_values("step").reset_index(drop=True)


def _seeds_outputs() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """(grid, correlations, predictions, the grid's WD-0 rows, its WD-0 runs by seed) of results/seeds_1e7."""
    grid = pd.read_csv(HERE / "seeds_1e7" / "early_warning_grid.csv")
    corr = pd.read_csv(HERE / "seeds_1e7" / "alpha_correlation.csv")
    pred = pd.read_csv(HERE / "seeds_1e7" / "alpha_prediction.csv")
    g0 = grid[grid["wd"] == 0]
    runs = sorted(g0["run"].unique(), key=lambda r: int(g0.loc[g0["run"] == r, "seed"].iloc[0]))
    return grid, corr, pred, g0, runs


def _collapse_words(key: str, adjective: bool = False) -> str:
    """A collapse definition of the grid in words: drop25 -> '25 points' ('25-point'), below0.5 ->
    'below 0.5' ('below-0.5')."""
    if key.startswith("drop"):
        return f"{key[4:]}-point" if adjective else f"{key[4:]} points"
    if key.startswith("below"):
        return f"below-{key[5:]}" if adjective else f"below {key[5:]}"
    raise ValueError(f"unknown collapse definition {key!r}")


def _search_runs() -> list[Path]:
    """The transformer search's exported runs (results/modadd_search/wd*_seed*), in name order."""
    search = HERE / "modadd_search"
    return sorted(search.glob("wd*_seed*")) if search.is_dir() else []


def _run_dir(run: str) -> Path:
    """The exported folder of a run of the seeds outputs: seed 0's 10^7 run, or a campaign run."""
    return HERE / "wd0_1e7" if run == "wd0_1e7" else HERE / "campaign_1e7" / run


def _run_metrics(run: str) -> pd.DataFrame:
    return _metrics(_run_dir(run))


def _peak_and_min(te: np.ndarray) -> tuple[int, int]:
    """Indices of the test-accuracy peak and of the lowest evaluation after it."""
    ip = int(te.argmax())
    return ip, ip + 1 + int(te[ip + 1:].argmin())


def _range(v, places: int = 2) -> str:
    """'0.81-0.95' (places 2) or '3.7-6.0' (places 1); one number when both ends round alike."""
    lo, hi = f"{min(v):.{places}f}", f"{max(v):.{places}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _and(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(x) for x in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _at(df: pd.DataFrame, step: int, col: str) -> float:
    return float(df.loc[df["step"] == step, col].iloc[0])


def checks() -> list[tuple[str, str]]:
    """(what, expected text) pairs."""
    out = []
    run = HERE / "wd0_1e7"
    m, s = _metrics(run), _steps(run)
    te, tr, st = m["test/acc"].to_numpy(), m["train/acc"].to_numpy(), m["step"].to_numpy()
    ip = int(np.argmax(te))
    peak, peak_step = te[ip], int(st[ip])
    out.append(("peak", f"test accuracy {peak:.4f} at {peak_step:,}"))
    after = np.arange(ip + 1, len(te))
    imin = after[np.argmin(te[after])]
    out.append(("collapse minimum", f"{100 * (peak - te[imin]):.1f} points, to {te[imin]:.4f} at {st[imin]:,}"))
    drop5 = st[after[te[after] <= peak - 0.05 + 1e-12][0]]
    out.append(("collapse onset (5 points)", f"{drop5:,} (first evaluation ≥ 5 points below the peak)"))
    # train accuracy 1.0 from its first 1.0 to 5e6, with the exceptions named
    first1 = int(st[np.argmax(tr >= 1.0)])
    below = [(int(a), b) for a, b in zip(st, tr) if first1 < a <= 5_000_000 and b < 1.0]
    exc = ", ".join(f"{b:.3f}".rstrip("0") + f" at {a:,}" for a, b in below)
    out.append(("train accuracy", f"train accuracy 1.0 at every evaluation from {first1:,} to 5.0e6, except {exc}"))
    # Table 1's FC1 row at this run's phase edges: pre 14,125, peak, minimum
    pre = 14125
    cols = {"raw": "native/alpha_fc1", "centred": "native/alpha_centred_fc1"}
    for kind, c in cols.items():
        v = [_at(s, k, c) for k in (pre, peak_step, int(st[imin]))]
        out.append((f"Table 1 FC1 {kind}", " / ".join(f"{x:.2f}" for x in v) + f" {kind}"))
    raw_up = _at(s, peak_step, cols["raw"]) > _at(s, pre, cols["raw"])
    out.append(("FC1 raw alpha rises to the peak", "raw: no (it rises from pre-grokking to the peak" if raw_up
                else "raw alpha falls to the peak"))
    # the lead gap of the late signals: persistent onsets (3 evaluations) after the peak
    def onset(flags):
        run_, start = 0, None
        for k, f in zip(s["step"], flags):
            if k < peak_step:
                continue
            run_, start = (run_ + 1, start if run_ else k) if f else (0, None)
            if run_ >= 3:
                return int(start)
        return None
    late = [onset(s["native/alpha_fc1"] < 2), onset(s["native/alpha_centred_fc1"] < 2),
            onset(s["native/traps_centred_fc1"] >= 1)]
    gaps = [(x - drop5) / 1e6 for x in late]
    out.append(("late-signal gap", f"{min(gaps):.1f}-{max(gaps):.1f} million steps after the drop began"))
    # centred vs raw alpha decline from 1.07e6 to 10^7, FC1 and FC2
    k0 = int(s.loc[(s["step"] - 1.07e6).abs().idxmin(), "step"])
    for layer in ("fc2", "fc1"):
        r0, r1 = _at(s, k0, f"native/alpha_{layer}"), _at(s, 10**7, f"native/alpha_{layer}")
        c0, c1 = _at(s, k0, f"native/alpha_centred_{layer}"), _at(s, 10**7, f"native/alpha_centred_{layer}")
        faster = (c0 - c1) > (r0 - r1)
        want = "falls faster than its raw one" if layer == "fc2" else "does not"
        if faster != (layer == "fc2"):
            want = f"{layer}: centred decline {c0 - c1:.2f} vs raw {r0 - r1:.2f}"
        out.append((f"{layer} centred vs raw decline", f"{c0:.2f} → {c1:.2f} against {r0:.2f} → {r1:.2f}"))
        out.append((f"{layer} centred faster?", want))
    return out


def seeds_checks() -> list[tuple[str, str]]:
    """The early-warning grid's verdict and the campaign's status, from results/seeds_1e7 and
    results/campaign_1e7."""
    out = []
    grid, corr, pred, g0, runs = _seeds_outputs()
    seeds = [int(g0.loc[g0["run"] == r, "seed"].iloc[0]) for r in runs]
    both = "in both runs" if len(runs) == 2 else f"in all {len(runs)} runs"
    out.append(("finished WD-0 runs in the grid", f"(WD 0, seeds {_and(seeds)}: n = {len(runs)})"))
    late_text, lost_text, cs_text, below_text, peaks, drops = [], [], [], [], [], []
    for run, seed in zip(runs, seeds):
        g = g0[g0["run"] == run]
        m = _run_metrics(run)
        te = m["test/acc"].to_numpy()
        ip, imin = _peak_and_min(te)
        total = 100 * (te[ip] - te[imin])
        drops.append(total)
        d = g[(g["collapse"] == "drop2") & (g["signal"] != "traps>=1")]
        lost_text.append(f"after {d['lost_pp'].min():.1f}-{d['lost_pp'].max():.1f} of seed {seed}'s {total:.1f} points "
                         f"were lost (between {d['signal_step'].min():,.0f} and {d['signal_step'].max():,.0f} steps)")
        cs = g.drop_duplicates("collapse").set_index("collapse")["collapse_step"]
        cs_text.append(f"seed {seed}: {cs['drop2']:,.0f}, {cs['drop5']:,.0f}, {cs['drop10']:,.0f} and {cs['drop25']:,.0f}")
        b = g[(g["collapse"] == "below0.5") & (g["signal"] != "traps>=1")]
        warned = b[b["outcome"] == "warned"]
        if warned.empty:
            lag = -b["lead_steps"]
            below_text.append(f"in seed {seed} (first at {cs['below0.5']:,.0f}) every alpha and centred trap signal comes "
                              f"{lag.min() / 1e6:.2f}-{lag.max() / 1e6:.2f} million steps later")
        else:
            names = sorted(warned["signal"].unique())
            fc1 = warned[warned["signal"].str.startswith("fc1_alpha")]
            ctrap = warned[(warned["signal"] == "traps_centred>=1") & (warned["rule"] == "first")]
            shown = pd.concat([fc1, ctrap])
            if set(names) == {"fc1_alpha<2", "fc1_alpha_centred<2", "traps_centred>=1"} and len(fc1) == 4 and \
                    len(ctrap) == 1 and len(warned) == 5:
                below_text.append(f"in seed {seed} (first at {cs['below0.5']:,.0f}) FC1's alpha < 2 (raw and centred, "
                                  "either rule) and the centred trap count's first evaluation fire "
                                  f"{shown['lead_steps'].min() / 1e6:.2f}-{shown['lead_steps'].max() / 1e6:.2f} "
                                  "million steps earlier, the average alpha does not")
            else:
                below_text.append(f"seed {seed}: CHECK the below-0.5 signals {names}")
        d = g[g["collapse"].str.startswith("drop") & (g["signal"] != "traps>=1")]
        late_text.append((d["outcome"] == "late").all())
        raw = g[g["signal"] == "traps>=1"]
        peaks.append(f"{int(g['peak_step'].iloc[0]):,}" if raw["held_at_peak"].all() and (raw["outcome"] == "warned").all()
                     else "CHECK raw traps")
    out.append(("points lost when alpha and centred traps fire", "; ".join(lost_text)))
    out.append(("collapse steps", "; ".join(cs_text)))
    dr = g0[g0["collapse"].str.startswith("drop")]["collapse_step"]
    out.append(("collapse steps' range", f"whose collapse is first met at {dr.min() / 1e6:.1f}-{dr.max() / 1e6:.1f} million steps"))
    out.append(("WD-0 drops, rounded", "the " + "-".join(dict.fromkeys(f"{x:.0f}" for x in (min(drops), max(drops)))) + "-point collapse at WD 0"))
    out.append(("late under every drop definition", f"late under all four drop definitions {both}" if all(late_text)
                else "NOT late under every drop definition"))
    out.append(("below 0.5", "; ".join(below_text)))
    out.append(("raw traps", f"it held already at the peak ({_and(peaks)})"))
    c = corr[(corr["alpha"] == "fc1_alpha") & (corr["wd"] == 0)].set_index("run").loc[runs]
    out.append(("FC1 alpha vs test accuracy", f"Spearman {_and([f'{x:.2f}' for x in c['spearman']])}, Pearson "
                                              f"{_and([f'{x:.2f}' for x in c['pearson']])} over "
                                              f"{_and([int(x) for x in c['n']])} evaluations"))
    for alpha, label in (("fc1_alpha", "FC1's alpha"), ("mean_alpha", "the average alpha")):
        p = pred[(pred["alpha"] == alpha) & (pred["wd"] == 0)].set_index("fit_run").loc[runs] if len(runs) > 1 else None
        if len(runs) == 2:  # one pair each way: both numbers, fitted on the first seed, then on the second
            out.append((f"cross-seed prediction from {label}",
                        f"{label} with a mean error of {_and([f'{x:.1f}' for x in p['mae_pp']])} points "
                        f"(largest {_and([f'{x:.1f}' for x in p['max_pp']])})"))
        elif len(runs) > 2:  # every ordered pair of seeds: the ranges
            out.append((f"cross-seed prediction from {label}",
                        f"{label} with a mean error of {_range(p['mae_pp'], 1)} points (largest {_range(p['max_pp'], 1)}) "
                        f"over the {len(p)} ordered pairs of seeds"))
    ctl = grid[grid["wd"] > 0]  # the WD 0.01 control(s) that reached 10^7
    ph = pd.read_csv(HERE / "seeds_1e7" / "phases.csv").set_index("run")
    anti0 = []  # each WD-0 run's analysis at its anti-grokking edge
    for r in runs:
        st = _steps(_run_dir(r))
        anti0.append(st[st["step"] == int(ph.loc[r, "anti_ckpt"])].iloc[0])
    for run in sorted(ctl["run"].unique()):
        g = ctl[ctl["run"] == run]
        m = _metrics(HERE / "campaign_1e7" / run)
        te, st = m["test/acc"].to_numpy(), m["step"].to_numpy()
        ip, imin = _peak_and_min(te)
        out.append((f"{run} course", f"peaked at {te[ip]:.4f} at {st[ip]:,}, lost {100 * (te[ip] - te[imin]):.1f} points at "
                                     f"most ({te[imin]:.4f} at {st[imin]:,})"))
        tr = m["train/acc"].to_numpy()
        after = st > st[tr < 1.0].max()  # the evaluations after the last one below 1.0
        out.append((f"{run} train accuracy", f"train accuracy 1.0 at every evaluation from {int(st[after].min()):,} on"))
        cs = g.drop_duplicates("collapse").set_index("collapse")["collapse_step"]
        met = [f"{k[4:]} points at {v:,.0f}" for k, v in cs.items() if k.startswith("drop") and np.isfinite(v)]
        never = [k for k, v in cs.items() if not np.isfinite(v)]
        out.append((f"{run} collapses", f"it fell {_and(met)} below its peak, never "
                    + " nor ".join(_collapse_words(k) for k in never)))
        d = g[g["collapse"] == "drop25"]
        first = d[d["rule"] == "first"].set_index("signal")

        def at(sig):
            return f"{int(first.loc[sig, 'signal_step']):,} ({first.loc[sig, 'lost_pp']:.1f} points lost)"

        def when(sig, label):  # a signal's first firing after the peak, in words
            if first.loc[sig, "held_at_peak"]:
                return f"{label} at its peak itself"
            return f"{label} from {at(sig)}" if np.isfinite(first.loc[sig, "signal_step"]) else f"{label} never"

        traps = ("the raw and centred trap counts at its peak itself" if first.loc["traps>=1", "held_at_peak"]
                 and first.loc["traps_centred>=1", "held_at_peak"] else
                 f"{when('traps>=1', 'the raw trap count')}, {when('traps_centred>=1', 'the centred trap count')}")
        alphas = f"{when('mean_alpha<2', 'the average alpha < 2')} and " + when("fc1_alpha<2", "FC1's alpha < 2")
        out.append((f"{run} signals", f"{traps}, {alphas}"))
        alarms = g[g["collapse"].isin(never)]
        n_alarm, n_all = int(alarms["outcome"].eq("false_alarm").sum()), len(alarms)
        defs = _and([_collapse_words(k, adjective=True) for k in never])
        if n_alarm == n_all:
            text = (f"under the {defs} definitions, which it never meets, all {n_all // len(never)} (six signals, each on "
                    "its first and on 3 consecutive evaluations) are false alarms")
        else:  # the others never fire: name them
            quiet = alarms[(alarms["collapse"] == never[0]) & alarms["outcome"].eq("quiet")]
            names = [f"{SIGNAL_WORDS[r['signal']]} {'on its first evaluation' if r['rule'] == 'first' else 'on 3 consecutive evaluations'}"
                     for _, r in quiet.iterrows()]
            text = (f"under the {defs} definitions, which it never meets, {n_alarm // len(never)} of the {n_all // len(never)} "
                    f"(six signals, each on its first and on 3 consecutive evaluations) are false alarms; "
                    f"{_and(names)} never fire" + ("" if n_alarm + len(quiet) * len(never) == n_all else " CHECK outcomes"))
        out.append((f"{run} false alarms", text))
        s = _steps(_run_dir(run))
        last = s.iloc[-1]
        more = all(last[f"native/traps_{k}"] > a[f"native/traps_{k}"] for a in anti0 for k in ("fc1", "fc2"))
        out.append((f"{run} at its end", f"FC1's alpha is {last['native/alpha_fc1']:.2f} and FC2's {last['native/alpha_fc2']:.2f}, "
                    f"with {int(last['native/traps_fc1'])} and {int(last['native/traps_fc2'])} traps "
                    f"({int(last['native/traps_centred_fc1'])} and {int(last['native/traps_centred_fc2'])} beyond the mean)"
                    + (", more than any WD-0 run holds at its anti-grokking edge" if more else "")))
        late = s[(s["step"] >= 2 * 10**6) & s["native/alpha_fc1"].notna()]
        a1, a2 = late["native/alpha_fc1"], late["native/alpha_fc2"]
        out.append((f"{run} alpha from 2e6", f"from 2×10^6 steps on its FC1 alpha stays between {a1.min():.2f} and "
                    f"{a1.max():.2f} (median {a1.median():.2f}) and FC2's between {a2.min():.2f} and {a2.max():.2f} "
                    f"(median {a2.median():.2f}), over {len(late)} evaluations, while test accuracy stays between "
                    f"{late['test/acc'].min():.4f} and {late['test/acc'].max():.4f}"))
        c = corr[(corr["run"] == run) & (corr["alpha"] == "fc1_alpha")].iloc[0]
        out.append((f"{run} alpha vs accuracy", f"Spearman {c['spearman']:.2f}, Pearson {c['pearson']:.2f} over {int(c['n'])} "
                                                "evaluations"))
    fc2 = pd.concat([_steps(_run_dir(r)) for r in runs])
    fc2 = fc2.loc[(fc2["step"] >= 2 * 10**6), "native/alpha_fc2"].dropna()
    out.append(("WD-0 FC2 alpha from 2e6", f"the WD-0 runs' FC2 alpha stays between {fc2.min():.2f} and {fc2.max():.2f} "
                                           "from 2×10^6 steps on"))
    if len(ctl):
        cseeds = [int(ctl.loc[ctl["run"] == r, "seed"].iloc[0]) for r in sorted(ctl["run"].unique())]
        out.append(("controls' seeds", f"(WD 0.01, seed{'s' if len(cseeds) > 1 else ''} {_and(cseeds)}; n = {len(cseeds)})"))
    cmp = pd.read_csv(HERE / "seeds_1e7" / "paper_comparison_v1_v2.csv")

    def cell(wd, table, layer, metric, phase, places=2):  # (ours 'mean ± std', n, paper v1, paper v2)
        r = cmp[(cmp["wd"] == wd) & (cmp["table"] == table) & (cmp["layer"] == layer) & (cmp["metric"] == metric)
                & (cmp["phase"] == phase)].iloc[0]
        return f"{r['value_mean']:.{places}f} ± {r['value_std']:.{places}f}", int(r["n"]), r["paper_text"], r["paper_v2_text"]

    fc1, fc2 = cell(0, "Table 1", "fc1", "alpha", "anti"), cell(0, "Table 1", "fc2", "alpha", "anti")
    out.append(("Table 1 over seeds, anti", f"FC1's alpha is {fc1[0]} (paper v1 {fc1[2]}, v2 {fc1[3]}) and FC2's "
                                            f"{fc2[0]} (v1 {fc2[2]}, v2 {fc2[3]})"))
    out.append(("Table 1 n", f"n = {fc1[1]} at WD 0"))
    g1 = cell(0, "Table 1", "fc1", "alpha", "grok")
    out.append(("Table 1 over seeds, peak", f"At the peak FC1's alpha is {g1[0]} (v1 {g1[2]}, v2 {g1[3]})"))
    t1, t1c = cell(0, "Table 2", "fc1", "traps", "anti"), cell(0, "Table 2", "fc1", "traps_centred", "anti")
    t2, t2c = cell(0, "Table 2", "fc2", "traps", "anti"), cell(0, "Table 2", "fc2", "traps_centred", "anti")
    out.append(("Table 2 over seeds", f"FC1 holds {t1[0]} traps at the anti-grokking edge ({t1c[0]} beyond the mean; "
                                      f"v1 {t1[2]}, v2 {t1[3]}), FC2 {t2[0]} ({t2c[0]} beyond the mean; v1 {t2[2]}, "
                                      f"v2 {t2[3]})"))
    n_ctl = len(ctl["run"].unique())
    if n_ctl > 1:  # the tables over the controls that reached 10^7, at their lowest evaluation after the peak
        t1 = pd.read_csv(HERE / "seeds_1e7" / "table1_alpha.csv")
        t2 = pd.read_csv(HERE / "seeds_1e7" / "table2_traps.csv")

        def ms(t, layer, metric, phase):
            r = t[(t["wd"] > 0) & (t["layer"] == layer) & (t["metric"] == metric) & (t["phase"] == phase)].iloc[0]
            return f"{r['mean']:.2f} ± {r['std']:.2f}" + ("" if int(r["n"]) == n_ctl else f" CHECK n = {int(r['n'])}")

        v1 = {layer: cell(0.01, "Table 2", layer, "traps", "anti")[2] for layer in ("fc1", "fc2")}
        out.append(("Tables over the controls", f"At WD 0.01 (n = {n_ctl}), at each control's lowest evaluation after "
                    f"its peak, FC1's alpha is {ms(t1, 'fc1', 'alpha', 'anti')} and FC2's {ms(t1, 'fc2', 'alpha', 'anti')}; "
                    f"FC1 holds {ms(t2, 'fc1', 'traps', 'anti')} traps ({ms(t2, 'fc1', 'traps_centred', 'anti')} beyond the "
                    f"mean; v1 {v1['fc1']}), FC2 {ms(t2, 'fc2', 'traps', 'anti')} "
                    f"({ms(t2, 'fc2', 'traps_centred', 'anti')} beyond the mean; v1 {v1['fc2']})"))
    camp = HERE / "campaign_1e7"
    hosts = []  # per started run: its segments' CPUs, in order
    for name in CAMPAIGN_RUNS:  # the table of where the runs stand, a row a started run
        if not (camp / name / "metrics.jsonl").is_file():
            continue
        m = _metrics(camp / name)
        ev = _events(camp / name)
        i = int(m["test/acc"].to_numpy().argmax())
        last = m.iloc[int(m["step"].to_numpy().argmax())]
        ends = [e for e in ev if e.get("event") in ("start", "resume", "pause")]
        if int(last["step"]) >= 10**7:
            state = "complete"
        elif ends and ends[-1]["event"] == "pause":
            state = f"paused at {ends[-1]['step']:,}"
        else:
            state = "CHECK: neither complete nor paused"
        wd, seed = name[2:].split("_seed")
        out.append((f"{name} row", f"| {name} | {wd} | {seed} | {int(last['step']):,} | {m['test/acc'].iloc[i]:.4f} at "
                                   f"{int(m['step'].iloc[i]):,} | {last['test/acc']:.4f} | "
                                   f"{100 * (m['test/acc'].iloc[i] - last['test/acc']):.1f} | {state} |"))
        segs = enumerate((e["cpu"] for e in ev if e.get("event") in ("start", "resume")), 1)
        stretches = [[i for i, _ in g] + [cpu] for cpu, g in groupby(segs, key=lambda x: x[1])]
        hosts.append((name, "; ".join(f"segment {r[0]} on {r[-1]}" if len(r) == 2 else
                                      f"segments {r[0]}-{r[-2]} on {r[-1]}" for r in stretches)))
    for name, text in hosts:
        out.append((f"{name} segments' CPUs", f"{name}: {text}"))
    for run in sorted(ctl["run"].unique()):  # each finished control's live monitor: its first alpha < 2 warnings
        ev = _events(camp / run)
        for layer in ("fc2", "fc1"):
            w = [e for e in ev if e.get("event") == "warning" and e.get("layer") == layer and e.get("signal") == "alpha<2"]
            if w:
                out.append((f"{run} {layer.upper()} alpha warning",
                            f"{layer.upper()} alpha < 2 from {w[0]['onset']:,} ({w[0]['value']:.2f} at {w[0]['step']:,})"))
    steps = camp / "analysis" / "all_steps.csv"
    # the analysis of the exported records: each finished WD-0 run's FC1 alpha and centred traps since
    # its peak (seed 1 from the start; a later seed once it has reached 10^7)
    finished = [n for n in CAMPAIGN_RUNS if n.startswith("wd0_") and (camp / n / "metrics.jsonl").is_file()
                and (n == "wd0_seed1" or int(_metrics(camp / n)["step"].max()) >= 10**7)]
    all_steps = pd.read_csv(steps) if steps.is_file() else None
    for name in finished if all_steps is not None else []:
        m = _metrics(camp / name)
        peak, peak_step = m["test/acc"].max(), int(m["step"].iloc[int(m["test/acc"].to_numpy().argmax())])
        s = all_steps[(all_steps["run"] == name) & (all_steps["step"] >= peak_step)].dropna(subset=["native/alpha_fc1"])
        s = s.sort_values("step").reset_index(drop=True)
        last = s.iloc[-1]

        def lost_at(step):  # test points lost from the peak at an evaluation
            return 100 * (peak - float(m[m["step"] == step]["test/acc"].iloc[0]))

        def first_of_three(flags):  # the first step that starts 3 consecutive flagged evaluations, or None
            f, st = flags.to_numpy(), s["step"].to_numpy()
            return next((int(st[i]) for i in range(len(f) - 2) if f[i] and f[i + 1] and f[i + 2]), None)

        if name != "wd0_seed1":  # a later seed: its lowest evaluation after the peak, and its end against it
            te, st = m["test/acc"].to_numpy(), m["step"].to_numpy()
            ip, imin = _peak_and_min(te)
            out.append((f"{name} lowest", f"its lowest evaluation after the peak was {te[imin]:.4f} at {st[imin]:,} "
                                          f"({100 * (te[ip] - te[imin]):.1f} points lost), and it ended "
                                          f"{100 * (te[-1] - te[imin]):.2f} points above it"))
        below = s["native/alpha_fc1"] < 2
        if not below.any():
            alpha = ", never below 2 since its peak"
        else:
            first = int(s["step"][below].iloc[0])
            since = "since" if below[below.idxmax():].all() else "first at"
            alpha = f", below 2 {since} {first:,} (after {lost_at(first):.1f} points were lost)"
        out.append((f"{name} FC1 alpha at its last step", f"with FC1 alpha {last['native/alpha_fc1']:.2f}{alpha}"))
        trap = s["native/traps_centred_fc1"] + s["native/traps_centred_fc2"] > 0
        if trap.any():
            first = int(s["step"][trap].iloc[0])
            three = first_of_three(trap)
            text = f"a centred trap at {int(trap.sum())} evaluations from {first:,}, after {lost_at(first):.1f} points were lost"
            if three is not None:
                text += f", on 3 consecutive evaluations from {three:,} ({lost_at(three):.1f} points lost)"
            out.append((f"{name} centred traps", text + (", none at its last" if not trap.iloc[-1] else "")))
        else:
            out.append((f"{name} centred traps", "no centred trap since its peak"))
    return out


def modadd_checks() -> list[tuple[str, str]]:
    """The transformer's section: its steps, accuracies, App. H table and the fit of its last evaluation."""
    out = []
    run = HERE / "modadd_seed0"
    m = _metrics(run)
    ev = _events(run)
    pause = [e for e in ev if e.get("event") == "pause"][-1]
    last = int(m["step"].max())
    out.append(("modadd steps", f"paused by SIGTERM at {pause['step']:,} of its"))
    out.append(("modadd last evaluation", f"its last evaluation is at {last:,}"))
    out.append(("modadd train 1.0", f"train accuracy reaches 1.0 at {int(m[m['train/acc'] == 1.0]['step'].min()):,}"))
    first = int(m[m["test/acc"] >= 0.95]["step"].min())
    stays = bool((m[m["step"] >= first]["test/acc"] >= 0.95).all())
    out.append(("modadd passes 0.95", f"test accuracy passes 0.95 at {first:,} and stays above it" if stays
                else "CHECK 0.95"))
    one = int(m[m["test/acc"] == 1.0]["step"].min())
    out.append(("modadd 1.0", f"is 1.0 from {one:,} on" if (m[m["step"] >= one]["test/acc"] == 1.0).all() else "CHECK"))
    out.append(("modadd evaluations", f"monitor's record ({len(m)} evaluations)"))
    a = HERE / "modadd_seed0" / "analysis"
    ph = pd.read_csv(a / "phases.csv").iloc[0]
    h = pd.read_csv(a / "appendix_h.csv").set_index(["metric", "phase"])
    cols = [("pre", int(ph["pre_ckpt"])), ("grok", int(ph["grok_ckpt"])), ("anti", int(ph["anti_ckpt"]))]
    out.append(("modadd phase steps", f"| pre-grokking ({cols[0][1]:,}) | grokking ({cols[1][1]:,}) | last "
                                      f"({cols[2][1]:,}) |"))
    acc = " | ".join(f"{h.loc[('test/acc', p), 'mean']:.4f}" for p, _ in cols)
    out.append(("modadd test accuracy row", f"| test accuracy | {acc} |"))
    al = [h.loc[("alpha", p)] for p, _ in cols]
    cells = [f"{r['mean']:.2f}" + ("" if int(r["n"]) == 8 else f" ({int(r['n'])} matrices)") for r in al]
    out.append(("modadd alpha row", "| α, mean of the 8 matrices | " + " | ".join(cells) + " |"))
    tr = " | ".join(f"{h.loc[('traps', p), 'mean']:.0f}" for p, _ in cols)
    out.append(("modadd traps row", f"| traps per matrix | {tr} |"))
    fo = " | ".join(f"{h.loc[('progress/fourier_peak', p), 'mean']:.4f}" for p, _ in cols)
    out.append(("modadd Fourier row", f"| peak Fourier energy of W_E | {fo} |"))
    out.append(("modadd Fourier at grokking", f"({h.loc[('progress/fourier_peak', 'grok'), 'mean']:.4f} against 0.218)"))
    s = pd.read_csv(a / "all_steps.csv").sort_values("step").dropna(subset=["native/alpha_mean"])
    below = (s["native/alpha_mean"] < 2).to_numpy()
    i = next(k for k in range(len(below) - 2) if below[k:k + 3].all())
    out.append(("modadd alpha below 2", f"below 2 on average from {int(s['step'].iloc[i]):,} steps, while test "
                                        f"accuracy is still {s['test/acc'].iloc[i]:.4f}"))
    lay = pd.read_csv(a / "all_layers.csv")
    lay = lay[lay["step"] == cols[2][1]]
    failed = sorted(lay[lay["alpha"].isna()]["layer"])
    ok = lay[lay["alpha"].notna()]
    out.append(("modadd failed fits", f"the power-law fit fails for {' and '.join(failed)}"))
    out.append(("modadd tail sizes", f"holds {ok['num_pl_spikes'].min():.0f}-{ok['num_pl_spikes'].max():.0f} of their "
                                     f"{ok['num_evals'].min():.0f}-{ok['num_evals'].max():.0f} eigenvalues, from an "
                                     f"x_min of {ok['xmin'].min():.5f}-{ok['xmin'].max():.4f} up to a largest eigenvalue "
                                     f"of {ok['lambda_max'].min():.2f}-{ok['lambda_max'].max():.2f}"))
    search = HERE / "modadd_search"  # the anti-grokking search: where each started run stands
    done = []  # each started run's steps
    for run in _search_runs():
        m, ev = _metrics(run), _events(run)
        ends = [e for e in ev if e.get("event") in ("start", "resume", "pause")]
        done.append(ends[-1]["step"] if ends and ends[-1]["event"] == "pause" else int(m["step"].max()))
        last = m.iloc[-1]
        state = f"paused at {ends[-1]['step']:,}" if ends and ends[-1]["event"] == "pause" else "CHECK: not paused"
        peak = int(m["test/acc"].to_numpy().argmax())
        out.append((f"search {run.name}", f"`{run.name}`: {state}, its last evaluation at {int(last['step']):,} "
                    f"(test accuracy {last['test/acc']:.4f}, train {last['train/acc']:.4f}; its highest so far "
                    f"{m['test/acc'].iloc[peak]:.4f} at {int(m['step'].iloc[peak]):,})"))
    if (search / "analysis" / "all_steps.csv").is_file():  # each search run's last evaluation, against App. H
        mats = ("embed", "W_Q", "W_K", "W_V", "W_O", "fc1", "fc2", "unembed")
        a = pd.read_csv(search / "analysis" / "all_steps.csv").sort_values("step")
        for run, g in a.groupby("run"):
            last = g.iloc[-1]
            alphas = {k: last[f"native/alpha_{k}"] for k in mats}
            failed = sorted(k for k, v in alphas.items() if not np.isfinite(v))
            fit = [v for v in alphas.values() if np.isfinite(v)]
            traps = int(sum(last[f"native/traps_{k}"] for k in mats))
            out.append((f"search {run} last analysis",
                        f"at its last evaluation ({int(last['step']):,}) "
                        + (f"the power-law fit fails for {' and '.join(failed)}, the other {len(fit)} matrices' alpha is "
                           if failed else "the 8 matrices' alpha is ")
                        + f"{min(fit):.2f}-{max(fit):.2f}, "
                        + ("no matrix holds a trap" if traps == 0 else f"the matrices hold {traps} traps")
                        + f", and W_E's peak Fourier energy is {last['progress/fourier_peak']:.3f}"))
    if done:
        out.append(("search so far", f"(n = {len(done)} run{'s' if len(done) > 1 else ''}, {sum(done):,} of the "
                                     "search's 3 × 10^5 steps)"))
    return out


def ablation_checks() -> list[tuple[str, str]]:
    """The trap ablations of the campaign's runs (results/campaign_1e7/ablation/<run>/ablation.csv)."""
    out = []
    for path in sorted((HERE / "campaign_1e7" / "ablation").glob("*/ablation.csv")):
        run, t = path.parent.name, pd.read_csv(path)
        steps = sorted(t["step"].unique())
        fc1 = t[t["layer"] == "fc1"]
        sub = fc1[fc1["variant"] == "subtract"]["test_acc_ablated"]
        mean = fc1[fc1["variant"] == "mean"]["test_acc_ablated"]

        def span(v):
            return f"{v.min():.3f} at every one" if v.min() == v.max() else f"{v.min():.3f}-{v.max():.3f}"
        m = _metrics(HERE / "campaign_1e7" / run)
        te, st = m["test/acc"].to_numpy(), m["step"].to_numpy()
        lowest = int(st[_peak_and_min(te)[1]])
        out.append((f"{run} ablation steps", f"{run}: {len(steps)} checkpoints from {steps[0]:,} to {steps[-1]:,}"
                    + (", its lowest evaluation after the peak among them" if lowest in steps else f" (not its minimum {lowest:,})")))
        out.append((f"{run} FC1 subtraction", f"subtracting FC1's traps (the raw count) leaves test accuracy at "
                                              f"{span(sub)}, removing its mean at {span(mean)}"))
        c = fc1[(fc1["variant"] == "subtract_centred") & (fc1["traps_centred"] > 0)]
        d, dc = 100 * (c["test_acc_ablated"] - c["test_acc"]), 100 * (c["test_acc_control_mean"] - c["test_acc"])
        lo = int((c["test_acc_ablated"] < c["test_acc_control_mean"] - 2 * c["test_acc_control_std"]).sum())
        hi = int((c["test_acc_ablated"] > c["test_acc_control_mean"] + 2 * c["test_acc_control_std"]).sum())
        out.append((f"{run} FC1 centred traps",
                    f"its {int(c['traps_centred'].min())}-{int(c['traps_centred'].max())} centred traps at {len(c)} of them "
                    f"(from {int(c['step'].min()):,}) "
                    f"moves test accuracy by {d.min():+.1f} to {d.max():+.1f} points, against {dc.min():+.1f} to "
                    f"{dc.max():+.1f} for the control (below it by more than 2 control spreads at {lo}, above at {hi}); "
                    f"train accuracy {_range(c['train_acc_ablated'])} against {_range(c['train_acc_control_mean'])}"))
        raw = fc1[fc1["variant"] == "subtract"]
        before = raw[raw["step"] < c["step"].min()]  # FC1's traps before its first centred one
        if len(before):
            only_mean = bool((before["traps"] == 1).all() and (before["traps_centred"] == 0).all())
            out.append((f"{run} FC1's mean as its one trap", f"FC1's one trap from its first ({int(before['step'].min()):,}) "
                        "until" if only_mean else "CHECK: FC1 holds more than its mean before its first centred trap"))
        f2 = t[(t["layer"] == "fc2") & (t["variant"] == "subtract") & (t["step"] == steps[-1])].iloc[0]
        out.append((f"{run} FC2 at the end", f"{f2['test_acc']:.3f} → {f2['test_acc_ablated']:.3f} against "
                                             f"{f2['test_acc_control_mean']:.3f} ± {f2['test_acc_control_std']:.3f}"))
        out += _ablation_phase_rows(run, t)
    # the controls' FC1 mean over the window all their ablations share (the continued run's from its continuation)
    ctl = {path.parent.name: pd.read_csv(path) for path in sorted((HERE / "campaign_1e7" / "ablation").glob("wd0.01_*/ablation.csv"))}
    if len(ctl) > 1:
        start = max(int(t["step"].min()) for t in ctl.values())
        moves = []
        for run, t in ctl.items():
            m = t[(t["layer"] == "fc1") & (t["variant"] == "mean") & (t["step"] >= start)]
            d = 100 * (m["test_acc_ablated"] - m["test_acc"])
            moves.append(f"{d.min():+.1f} to {d.max():+.1f} points in seed {run.split('seed')[1]}")
        out.append(("controls' FC1 mean, late", f"from {start:,} on (the window the controls' ablations share) it moves "
                                                f"test accuracy by {_and(moves)}"))
    return out


PHASE_WORDS = {"pre": "end of pre-grokking", "grok": "peak", "drop": "drop onset", "anti": "lowest after the peak"}


def _ablation_phase_rows(run: str, t: pd.DataFrame) -> list[tuple[str, str]]:
    """A run's ablation at its phase steps, one table row each (for the runs that kept those
    params checkpoints): test accuracy, then for FC1 and FC2 the traps (raw / centred), the
    subtraction of the raw traps with its random-mode control, and the mean removed instead."""
    out = []
    for phase, words in PHASE_WORDS.items():
        at = t[t["phase"] == phase]
        if at.empty:
            continue
        cells = []
        for layer in ("fc1", "fc2"):
            sub = at[(at["layer"] == layer) & (at["variant"] == "subtract")]
            if sub.empty:  # no trap in this layer at this step: nothing was removed
                cells.append("0 / 0 | – | –")
                continue
            sub, mean = sub.iloc[0], at[(at["layer"] == layer) & (at["variant"] == "mean")].iloc[0]
            cells.append(f"{int(sub['traps'])} / {int(sub['traps_centred'])} | {sub['test_acc_ablated']:.3f} "
                         f"({sub['test_acc_control_mean']:.3f} ± {sub['test_acc_control_std']:.3f}) | "
                         f"{mean['test_acc_ablated']:.3f}")
        out.append((f"{run} ablation at the {words}", f"| {words} ({int(at['step'].iloc[0]):,}) | "
                    f"{at['test_acc'].iloc[0]:.3f} | {cells[0]} | {cells[1]} |"))
    return out


def summary_checks() -> list[tuple[str, str]]:
    """The numbers of the project README's results summary, from the same files."""
    out = []
    grid, corr, pred, g0, runs = _seeds_outputs()
    lost, totals = [], []
    for i, run in enumerate(runs):
        m = _run_metrics(run)
        te, st = m["test/acc"].to_numpy(), m["step"].to_numpy()
        ip, imin = _peak_and_min(te)
        totals.append(f"{100 * (te[ip] - te[imin]):.1f}")
        if i == 0:
            out.append(("seed 0 summary", f"grokked to test accuracy {te[ip]:.3f} at {st[ip] / 1e5:.1f}×10^5 steps and lost "
                                          f"{totals[-1]} points, to {te[imin]:.3f} at {st[imin] / 1e6:.1f}×10^6"))
        else:
            out.append((f"seed {i} summary", f"seed {i} grokked to {te[ip]:.3f} and lost {totals[-1]} points"))
        d = g0[(g0["run"] == run) & (g0["collapse"] == "drop2") & (g0["signal"] != "traps>=1")]
        lost.append(f"{d['lost_pp'].min():.1f}-{d['lost_pp'].max():.1f}")
    out.append(("n", f"In both runs (n = {len(runs)})" if len(runs) == 2 else f"In all {len(runs)} runs (n = {len(runs)})"))
    out.append(("points lost", f"({_and(lost)} points lost)"))
    c = corr[(corr["wd"] == 0) & (corr["alpha"] == "fc1_alpha")]["spearman"]
    out.append(("rank correlation", f"(rank correlation {c.min():.2f}-{c.max():.2f})"))
    e = pred[(pred["wd"] == 0) & (pred["alpha"] == "fc1_alpha")]["mae_pp"]
    out.append(("prediction error", f"mean error of {e.min():.1f}-{e.max():.1f} points"))
    drops = []  # each finished control's end, below its peak
    for run in sorted(grid.loc[grid["wd"] > 0, "run"].unique()):
        m = _metrics(HERE / "campaign_1e7" / run)
        drops.append(f"{100 * (m['test/acc'].max() - m.iloc[int(m['step'].to_numpy().argmax())]['test/acc']):.1f}")
    out.append(("control", f"{_and(drops)} points below its peak after 10^7 steps"))
    m = _metrics(HERE / "modadd_seed0")  # the transformer's grokking run and the search, in one sentence
    one = int(m[m["test/acc"] == 1.0]["step"].min())
    pause = [e for e in _events(HERE / "modadd_seed0") if e.get("event") == "pause"][-1]
    out.append(("modadd summary", f"test accuracy 1.0 from {one:,} steps; no collapse within the {pause['step']:,} "
                                  "steps run so far"))
    for run in _search_runs():
        m = _metrics(run)
        wd, seed = run.name[2:].split("_seed")
        te, st = m["test/acc"].to_numpy(), m["step"].to_numpy()
        ip = int(te.argmax())
        below = 100 * (te[ip] - te[-1])
        out.append((f"search {run.name} summary",
                    f"WD {wd} seed {seed}: test accuracy {te[-1]:.4f} at step {st[-1]:,}, "
                    + ("its highest so far" if below == 0 else f"{below:.1f} points below its highest ({te[ip]:.4f})")))
    return out


def main() -> int:
    text = README.read_text()
    flat = " ".join(text.split())
    every = checks() + seeds_checks() + ablation_checks() + modadd_checks()
    bad = [(what, want) for what, want in every if " ".join(want.split()) not in flat]
    for what, want in bad:
        print(f"results/README.md does not state {what}: expected '{want}'")
    top = " ".join((HERE.parent / "README.md").read_text().split())
    summary = summary_checks()
    for what, want in summary:
        if " ".join(want.split()) not in top:
            bad.append((what, want))
            print(f"README.md's summary does not state {what}: expected '{want}'")
    every += summary
    n = len(every)
    print(f"{n - len(bad)} of {n} checked statements agree with the files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
