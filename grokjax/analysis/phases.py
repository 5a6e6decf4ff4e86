"""Phase detection from a run's metrics, and the HTSR early-warning signals.

The paper reads its tables "at the right edge of each grokking phase" (pre-grokking ~1e5
steps, grokking ~1e6 = max test accuracy, anti-grokking ~1e7 = collapse). Here the three
steps are found from the test and train accuracy curves of each run by fixed rules (see
`detect_phases`), so that runs of any length and seed are read the same way; the rule for
the end of pre-grokking reads only a bounded stretch of the run after it, so a longer run
of the same trajectory gives the same edge. Because one checkpoint's alpha is noisy,
`phase_windows` gives, for each phase, a documented window of evaluations whose median and
IQR the tables report beside the single-checkpoint value.

The early-warning rule is `persistent_onset` (and its streaming form `PersistentSignal`,
which a training loop can feed one evaluation at a time): a signal counts from the first
of at least n = 3 consecutive evaluations where it holds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

PHASES = ("pre", "grok", "anti")
PHASE_TITLES = {"pre": "Pre-grokking", "grok": "Grokking (max test acc.)", "anti": "Anti-grokking (collapse)"}
NO_COLLAPSE_TITLE = "final (no collapse)"
# What the outputs say of a run whose `detect_phases` result has grokking = False.
NO_GROKKING = "no grokking (test accuracy never rose)"
# The labels of `detect_phases`' pre_status (the end of pre-grokking), with their meaning.
PRE_STATUSES = {
    "ok": "the end of the pre-grokking plateau was found; a longer run would not move it",
    "short_run": "found, but the run ended before the rule's horizon, so a longer run could move it",
    "no_rise": "test accuracy never left its plateau after training saturated: no grokking, no edge",
    "test_not_low": "test accuracy had already risen when training saturated: no plateau, the edge is that step",
    "not_saturated": "training accuracy never saturated up to the test-accuracy peak: no edge",
}


def phase_title(phase: str, collapsed=None) -> str:
    """The column title of a phase; for 'anti' it says whether the runs behind it collapsed.

    Args:
        phase: 'pre', 'grok' or 'anti'.
        collapsed: the `collapsed` flags of the runs in the column (a bool or an iterable of
            bools); None keeps the generic title.

    Returns:
        PHASE_TITLES[phase], except for 'anti': "final (no collapse)" when no run collapsed,
        and both titles joined by " / " when some did and some did not.
    """
    if phase != "anti" or collapsed is None:
        return PHASE_TITLES[phase]
    flags = {bool(c) for c in (collapsed if np.iterable(collapsed) else [collapsed])}
    if flags == {False}:
        return NO_COLLAPSE_TITLE
    if flags == {True}:
        return PHASE_TITLES["anti"]
    return f"{PHASE_TITLES['anti']} / {NO_COLLAPSE_TITLE}" if flags else PHASE_TITLES["anti"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseOptions:
    """Thresholds of the phase rules, the phase windows and the early warning.

    Attributes:
        train_saturated: train accuracy at or above which training counts as saturated
            (0.999: at most 1 of the 1,000 training images wrong).
        low_fraction: a run whose test accuracy at the first saturated step is already
            max(leave_min, low_fraction * (peak - acc0)) or more above acc0 (the test
            accuracy at the first step) has no pre-grokking plateau ('test_not_low'); also
            defines low_end_step (the last step below acc0 + low_fraction * (peak - acc0)).
        plateau_span: the plateau level is the median test accuracy over the evaluations in
            [s_sat, plateau_span * s_sat], s_sat = the first saturated step.
        rise_horizon: the "later rise" seen from an evaluation at step t is the highest test
            accuracy at steps <= rise_horizon * t minus the plateau level (3: half a decade).
        leave_fraction: test accuracy has left the plateau at t once it is at least
            max(leave_min, leave_fraction * rise(t)) above the plateau level.
        leave_min: the absolute floor of that threshold (0.01 = 1 point of test accuracy,
            100 of the 10,000 test images; the plateau's evaluation-to-evaluation noise is
            ~0.1 point), so that noise on a flat plateau never counts as leaving it.
        collapse_drop: a collapse is a fall of at least this much test accuracy (absolute,
            0.05 = 5 percentage points) below the peak at some step after it.
        grok_window: the grokking window is every evaluation with test accuracy >=
            peak - grok_window (0.005 = 0.5 points; the peak is an argmax over a plateau
            about 0.3 points wide); a collapse's window is every evaluation after the peak
            within grok_window of the minimum.
        edge_window_decades: the pre-grokking window is the evaluations in
            [pre_step * 10^-w, pre_step] (not before s_sat), and the final-step window of a
            run without collapse is [final_step * 10^-w, final_step]; w = 0.25 decade.
        alpha_crit: the HTSR critical exponent; alpha below it is the warning signal.
        persist_n: an early-warning signal must hold at this many consecutive evaluations.
    """

    train_saturated: float = 0.999
    low_fraction: float = 0.5
    plateau_span: float = 2.0
    rise_horizon: float = 3.0
    leave_fraction: float = 0.1
    leave_min: float = 0.01
    collapse_drop: float = 0.05
    grok_window: float = 0.005
    edge_window_decades: float = 0.25
    alpha_crit: float = 2.0
    persist_n: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.train_saturated <= 1:
            raise ValueError(f"train_saturated must lie in (0, 1], got {self.train_saturated}")
        if not 0 < self.low_fraction <= 1:
            raise ValueError(f"low_fraction must lie in (0, 1], got {self.low_fraction}")
        if not self.plateau_span >= 1:
            raise ValueError(f"plateau_span must be >= 1, got {self.plateau_span}")
        if not self.rise_horizon >= 1:
            raise ValueError(f"rise_horizon must be >= 1, got {self.rise_horizon}")
        if not 0 < self.leave_fraction < 1:
            raise ValueError(f"leave_fraction must lie in (0, 1), got {self.leave_fraction}")
        if not 0 < self.leave_min < 1:
            raise ValueError(f"leave_min must lie in (0, 1), got {self.leave_min}")
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"collapse_drop must lie in (0, 1), got {self.collapse_drop}")
        if not 0 <= self.grok_window < 1:
            raise ValueError(f"grok_window must lie in [0, 1), got {self.grok_window}")
        if not self.edge_window_decades >= 0:
            raise ValueError(f"edge_window_decades must be >= 0, got {self.edge_window_decades}")
        if isinstance(self.persist_n, bool) or not isinstance(self.persist_n, int) or self.persist_n < 1:
            raise ValueError(f"persist_n must be an int >= 1, got {self.persist_n!r}")


def _leave_index(steps: np.ndarray, te: np.ndarray, i_sat: int, i_peak: int, options: PhaseOptions
                 ) -> tuple[int | None, float]:
    """The first evaluation i in [i_sat, i_peak] where test accuracy has left the plateau.

    Returns:
        (index or None, plateau level).
    """
    s_sat = steps[i_sat]
    in_plateau = (steps >= s_sat) & (steps <= options.plateau_span * s_sat) & np.isfinite(te)
    plateau = float(np.median(te[in_plateau]))
    for i in range(i_sat, i_peak + 1):
        if not np.isfinite(te[i]):
            continue
        seen = (steps >= s_sat) & (steps <= options.rise_horizon * steps[i]) & np.isfinite(te)
        rise = float(np.max(te[seen])) - plateau
        if te[i] >= plateau + max(options.leave_min, options.leave_fraction * rise):
            return i, plateau
    return None, plateau


def detect_phases(steps, train_acc, test_acc, *, options: PhaseOptions | None = None) -> dict:
    """The three phase steps of one run, by these rules (steps sorted ascending first):

    * grokking: `grok_step` = the first step of maximal test accuracy (the peak).
    * pre-grokking (its end), a rule that does not depend on the run's length: with
      s_sat = `saturated_step` (the first step with train_acc >= train_saturated) and the
      plateau level `plateau_acc` = the median test accuracy over the evaluations in
      [s_sat, plateau_span * s_sat], test accuracy has *left the plateau* at the first
      evaluation t >= s_sat (up to the peak) with
      test_acc(t) >= plateau_acc + max(leave_min, leave_fraction * rise(t)),
      rise(t) = max test accuracy over the evaluations in [s_sat, rise_horizon * t] minus
      plateau_acc ("10 % of the later rise", the rise measured up to a fixed multiple of
      t). `leave_step` = that t, and `pre_step` = the evaluation just before it (s_sat if
      t = s_sat): the right edge of the plateau. The rule reads nothing after
      `pre_horizon_step` = rise_horizon * leave_step, so any run that reaches that step
      gives the same edge. `pre_status`: 'ok'; 'short_run' (the run ended before
      pre_horizon_step, so a longer run could move the edge); 'no_rise' (test accuracy
      never left the plateau up to the peak: pre_step is NaN); 'test_not_low' (training
      saturated only once test accuracy had already risen low_fraction of the way to the
      peak, and by at least leave_min: no plateau, pre_step = s_sat); 'not_saturated' (never saturated up to the
      peak: pre_step is NaN). `low_end_step` is the last step before the peak whose test
      accuracy is still below acc0 + low_fraction * (peak - acc0) (the earlier, length-
      dependent edge, kept for comparison), NaN if none.
    * no grokking: `grokking` is False when test accuracy never rose: pre_status is
      'no_rise', or the peak is less than leave_min above the first evaluation's test
      accuracy. The outputs then say NO_GROKKING instead of naming a grokking phase (the
      peak is still reported: it is the maximum of a flat curve).
    * anti-grokking: `collapsed` is True when some step after the peak has
      test_acc <= peak - collapse_drop; then `anti_step` = the first step of minimal test
      accuracy after the peak, and `drop_step` = the first step after the peak at which
      test accuracy is <= peak - collapse_drop (the onset that warnings are timed
      against). Without a collapse, `anti_step` is the final step (the column is titled
      "final (no collapse)", see `phase_title`) and `drop_step` is NaN.

    Status labels (`pre_status`, also in PRE_STATUSES):
      ok             the edge was found; a longer run would not move it
      short_run      found, but the run ended before pre_horizon_step
      no_rise        test accuracy never left its plateau after saturation (no grokking)
      test_not_low   test accuracy had already risen at saturation (no plateau)
      not_saturated  training never saturated up to the peak (no edge)

    Returns:
        dict with pre_step, pre_status, saturated_step, plateau_acc, leave_step,
        pre_horizon_step, low_end_step, grok_step, grokking, anti_step, drop_step,
        final_step, collapsed, peak_test_acc, anti_test_acc, drop_pp (peak minus the minimum
        after the peak, in percentage points; 0 if the peak is the last step),
        test_acc_pre, train_acc_pre.
    """
    options = options or PhaseOptions()
    steps = np.asarray(steps, dtype=np.int64)
    order = np.argsort(steps, kind="stable")
    steps, tr, te = steps[order], np.asarray(train_acc, float)[order], np.asarray(test_acc, float)[order]
    if steps.size == 0:
        raise ValueError("no metrics to detect phases from")
    ok = np.isfinite(te)
    if not ok.any():
        raise ValueError("test accuracy is never finite")
    i_peak = int(np.nanargmax(np.where(ok, te, -np.inf)))
    peak = float(te[i_peak])
    acc0 = float(te[0]) if np.isfinite(te[0]) else float(np.nanmin(te))
    low = te < acc0 + options.low_fraction * (peak - acc0)
    sat = tr >= options.train_saturated
    upto = np.arange(steps.size) <= i_peak

    i_pre, plateau, i_leave, horizon = None, math.nan, None, math.nan
    sat_upto = np.flatnonzero(sat & upto)
    if not sat_upto.size:
        pre_status = "not_saturated"
    elif te[sat_upto[0]] - acc0 >= max(options.leave_min, options.low_fraction * (peak - acc0)):
        i_pre, pre_status = int(sat_upto[0]), "test_not_low"
    else:
        i_sat = int(sat_upto[0])
        i_leave, plateau = _leave_index(steps, te, i_sat, i_peak, options)
        if i_leave is None:
            pre_status = "no_rise"
        else:
            i_pre = max(i_leave - 1, i_sat)
            horizon = options.rise_horizon * float(steps[i_leave])
            pre_status = "ok" if steps[-1] >= horizon else "short_run"
    low_before = np.flatnonzero(low & (np.arange(steps.size) < i_peak))

    after = np.arange(i_peak + 1, steps.size)
    after = after[np.isfinite(te[after])]
    drop_pp = float(100 * (peak - np.min(te[after]))) if after.size else 0.0
    dropped = after[te[after] <= peak - options.collapse_drop + 1e-12]
    collapsed = bool(dropped.size)
    if collapsed:
        i_anti = int(after[np.argmin(te[after])])
        drop_step = int(steps[dropped[0]])
    else:
        i_anti, drop_step = steps.size - 1, math.nan

    return dict(
        pre_step=int(steps[i_pre]) if i_pre is not None else math.nan, pre_status=pre_status,
        saturated_step=int(steps[np.flatnonzero(sat)[0]]) if sat.any() else math.nan,
        plateau_acc=plateau, leave_step=int(steps[i_leave]) if i_leave is not None else math.nan,
        pre_horizon_step=horizon,
        low_end_step=int(steps[low_before[-1]]) if low_before.size else math.nan,
        grok_step=int(steps[i_peak]), grokking=pre_status != "no_rise" and peak - acc0 >= options.leave_min,
        anti_step=int(steps[i_anti]), drop_step=drop_step,
        final_step=int(steps[-1]), collapsed=collapsed, peak_test_acc=peak, anti_test_acc=float(te[i_anti]),
        drop_pp=drop_pp,
        test_acc_pre=float(te[i_pre]) if i_pre is not None else math.nan,
        train_acc_pre=float(tr[i_pre]) if i_pre is not None else math.nan,
    )


def phase_steps(phases: dict) -> dict[str, float]:
    """{'pre': pre_step, 'grok': grok_step, 'anti': anti_step} of a `detect_phases` result."""
    return {"pre": phases["pre_step"], "grok": phases["grok_step"], "anti": phases["anti_step"]}


# A phase step is taken at the nearest kept params checkpoint only within this many decades of it
# (in log(1 + step)): `--keep_params log` keeps about 5 a decade, so its nearest is within 0.1
# decade; a run whose early checkpoints are gone (a run continued from its export) has no
# checkpoint near its early phase steps, and those are skipped with a warning, not misplaced.
PHASE_STEP_TOLERANCE_DECADES = 0.15


def phase_targets(metrics: pd.DataFrame) -> dict[str, float]:
    """{'pre', 'grok', 'anti', 'drop': step} of `detect_phases` over a run's evaluations
    (metrics.jsonl rows with 'step', 'train/acc' and 'test/acc'); {} when there are none.
    'anti' is the collapse minimum, or the final step without a collapse; 'drop' the collapse
    onset (NaN without one)."""
    if not {"step", "train/acc", "test/acc"} <= set(metrics.columns):
        return {}
    m = metrics[metrics["test/acc"].notna()]
    if not len(m):
        return {}
    ph = detect_phases(m["step"], m["train/acc"], m["test/acc"])
    return dict(phase_steps(ph), drop=ph["drop_step"])


def steps_near(kept, targets, *, tolerance_decades: float = PHASE_STEP_TOLERANCE_DECADES
               ) -> tuple[dict[int, list[str]], dict[str, int]]:
    """({kept step: [the labels of `targets` taken there]}, {label: target} of the targets with no
    kept step within `tolerance_decades` in log(1 + step)). `targets` maps a label to a step;
    NaN targets are left out of both."""
    kept_arr = np.asarray(sorted(int(s) for s in kept), dtype=np.int64)
    chosen: dict[int, list[str]] = {}
    missing: dict[str, int] = {}
    for label, target in targets.items():
        if not np.isfinite(target):
            continue
        s = nearest_step(kept_arr, target)
        if not np.isfinite(s) or abs(np.log10(1 + s) - np.log10(1 + target)) > tolerance_decades:
            missing[label] = int(target)
            continue
        chosen.setdefault(int(s), []).append(label)
    return chosen, missing


def nearest_step(steps, target: float) -> float:
    """The step of `steps` closest to `target` in log(1 + step) (the target itself when present);
    NaN when target is NaN or there are no steps. Every output reads a phase at this
    checkpoint (the nearest analysed or kept one)."""
    steps = np.asarray(sorted(steps), dtype=np.int64)
    if not np.isfinite(target) or steps.size == 0:
        return math.nan
    return int(steps[int(np.argmin(np.abs(np.log1p(steps) - np.log1p(target))))])


def phase_windows(steps, test_acc, phases: dict, *, options: PhaseOptions | None = None) -> dict[str, np.ndarray]:
    """The evaluations over which each phase's median and IQR are reported.

    * 'pre': the steps in [pre_step * 10^-w, pre_step] and >= saturated_step, w =
      edge_window_decades (the last quarter decade of the plateau); empty when pre_step is NaN.
    * 'grok': every step with test accuracy >= peak - grok_window (0.5 points).
    * 'anti': with a collapse, every step after the peak with test accuracy <= the minimum
      after the peak + grok_window; without one, the steps in [final_step * 10^-w, final_step].

    Args:
        steps, test_acc: the evaluations of the run (any order; NaN accuracies are skipped
            by the accuracy-based windows).
        phases: the run's `detect_phases` result (same options).

    Returns:
        {'pre', 'grok', 'anti'} -> ascending int64 array of steps. Callers intersect these
        with the steps that have the metric (e.g. analysed checkpoints).
    """
    options = options or PhaseOptions()
    steps = np.asarray(steps, dtype=np.int64)
    te = np.asarray(test_acc, dtype=float)
    order = np.argsort(steps, kind="stable")
    steps, te = steps[order], te[order]
    shrink = 10.0 ** -options.edge_window_decades
    out = {}
    pre = phases["pre_step"]
    if np.isfinite(pre):
        lo = max(pre * shrink, phases["saturated_step"]) if np.isfinite(phases["saturated_step"]) else pre * shrink
        out["pre"] = steps[(steps >= lo) & (steps <= pre)]
    else:
        out["pre"] = steps[:0]
    tol = options.grok_window + 1e-12
    out["grok"] = steps[np.isfinite(te) & (te >= phases["peak_test_acc"] - tol)]
    if phases["collapsed"]:
        after = steps > phases["grok_step"]
        out["anti"] = steps[after & np.isfinite(te) & (te <= phases["anti_test_acc"] + tol)]
    else:
        final = phases["final_step"]
        out["anti"] = steps[(steps >= final * shrink) & (steps <= final)]
    return out


def first_step(steps, flags, start: float = -math.inf) -> float:
    """The first step >= start whose flag is True (NaN if none)."""
    steps = np.asarray(steps)
    hit = np.flatnonzero(np.asarray(flags, bool) & (steps >= start))
    return int(steps[hit[0]]) if hit.size else math.nan


class PersistentSignal:
    """The early-warning rule on a stream: fires once a signal has held n evaluations in a row.

    Feed the evaluations in increasing step order with `update(step, flag)`; evaluations
    before `start` are ignored. `update` returns True exactly once: at the evaluation where
    the first streak of n consecutive True flags (at steps >= start) is completed. `onset`
    is then the first step of that streak (the warning step the tables report) and
    `fired_step` the step at which it fired; both are NaN before. A False flag resets the
    streak. A missing value must be passed as False (NaN is refused). This is the same rule
    as `persistent_onset`, which runs this class over arrays.
    """

    def __init__(self, n: int = 3, *, start: float = -math.inf):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.n, self.start = int(n), float(start)
        self.onset: float = math.nan
        self.fired_step: float = math.nan
        self._run, self._run_start, self._last = 0, math.nan, -math.inf

    @property
    def fired(self) -> bool:
        """Whether the signal has become persistent."""
        return not math.isnan(self.fired_step)

    def update(self, step, flag) -> bool:
        """Adds one evaluation; True exactly when this evaluation makes the signal persistent."""
        if isinstance(flag, (float, np.floating)) and math.isnan(flag):
            raise ValueError(f"flag at step {step} is NaN; pass False for a missing value")
        if not step > self._last:
            raise ValueError(f"steps must increase: got {step} after {self._last}")
        self._last = step
        if self.fired or step < self.start:
            return False
        if flag:
            if self._run == 0:
                self._run_start = step
            self._run += 1
        else:
            self._run = 0
        if self._run >= self.n:
            self.onset, self.fired_step = self._run_start, step
            return True
        return False


def persistent_onset(steps, flags, *, n: int = 3, start: float = -math.inf) -> float:
    """The documented early-warning rule: the first step of the first streak of >= n
    consecutive evaluations (at steps >= start) where the flag holds; NaN if none.

    Args:
        steps: the evaluation steps (any order; sorted here, they must be distinct).
        flags: one bool per step (a missing value is False; float NaN is refused).
        n: the streak length (3).
        start: evaluations before this step are ignored (a streak that began earlier
            counts from its first evaluation >= start).

    Returns:
        The onset step (an int), or NaN.
    """
    steps = np.asarray(steps)
    flags = np.asarray(flags)
    if steps.shape != flags.shape or steps.ndim != 1:
        raise ValueError(f"steps and flags must be 1-D of the same length, got {steps.shape} and {flags.shape}")
    if flags.dtype.kind == "f" and np.isnan(flags).any():
        raise ValueError("flags contain NaN; pass False for a missing value")
    order = np.argsort(steps, kind="stable")
    signal = PersistentSignal(n, start=start)
    for step, flag in zip(steps[order].tolist(), flags[order].astype(bool).tolist()):
        if signal.update(step, flag):
            return int(signal.onset)
    return math.nan


# (signal name, step-table metric, comparison): the raw signals, then the centred ones,
# which are used only when their columns exist (see grokjax.analysis.meanaware.extended_metrics).
WARNING_SIGNALS = (("alpha<2", "alpha", "lt"), ("traps>0", "traps", "gt0"),
                   ("alpha_centred<2", "alpha_centred", "lt"), ("traps_centred>0", "traps_centred", "gt0"))
_OPTIONAL_SIGNALS = {"alpha_centred<2", "traps_centred>0"}


def early_warnings(step_df: pd.DataFrame, phases: dict, *, layers=("fc1", "fc2", "mean"), engine: str = "native",
                   options: PhaseOptions | None = None) -> list[dict]:
    """The first persistent alpha < alpha_crit / traps > 0 signal after the peak, and its lead.

    The search starts at the test-accuracy peak (`grok_step`): a warning is about the
    collapse that may follow the peak, and signals during the rise (single FC2 traps from
    ~9e4 steps, say) would otherwise give a "lead" spanning the whole run. A signal that
    already holds at the peak counts from the peak. For each layer and signal:

    * `warn_step` = `persistent_onset(steps, flags, n=persist_n, start=grok_step)` over the
      evaluations where the column is finite (so "consecutive" means consecutive analysed
      checkpoints of this engine): 'alpha<2': `<engine>/alpha_<layer>` < alpha_crit;
      'traps>0': `<engine>/traps_<layer>` > 0; and, when the step table has the columns,
      'alpha_centred<2' and 'traps_centred>0' on `<engine>/alpha_centred_<layer>` and
      `<engine>/traps_centred_<layer>` (W - mean(W), see `grokjax.analysis.meanaware.extended_metrics`);
    * `lead_steps` = drop_step - warn_step and `lead_decades` = log10(drop_step / warn_step),
      positive when the signal came first; NaN when there was no collapse or no signal;
    * `status`: 'warned' (signal at or before the drop), 'late' (after the drop),
      'missed' (collapse, no signal), 'false_alarm' (signal, no collapse), 'quiet'
      (neither), or 'no_data' (a raw column is missing or all NaN).

    Args:
        step_df: one run's per-step table (`grokjax.analysis.pipeline` step columns), any order.
        phases: that run's `detect_phases` result.
        layers: fc1, fc2, fc3 and/or 'mean' (alpha only: the FC1+FC2 mean).
        engine: column prefix, 'native' or 'ww'.

    Returns:
        One dict per (layer, signal): engine, layer, signal, search_from, persist_n,
        warn_step, drop_step, lead_steps, lead_decades, status.
    """
    options = options or PhaseOptions()
    df = step_df.sort_values("step")
    start = phases["grok_step"]
    drop = phases["drop_step"]
    rows = []
    for layer in layers:
        for signal, metric, kind in WARNING_SIGNALS:
            col = f"{engine}/{metric}_{layer}"
            if layer == "mean" and kind == "gt0":
                continue
            if signal in _OPTIONAL_SIGNALS and col not in df:
                continue
            base = dict(engine=engine, layer=layer, signal=signal, search_from=start, persist_n=options.persist_n)
            if col not in df or df[col].isna().all():
                rows.append(dict(base, warn_step=math.nan, drop_step=drop, lead_steps=math.nan, lead_decades=math.nan,
                                 status="no_data"))
                continue
            have = df[df[col].notna()]
            v = have[col].to_numpy(float)
            flags = (v < options.alpha_crit) if kind == "lt" else (v > 0)
            warn = persistent_onset(have["step"].to_numpy(), flags, n=options.persist_n, start=start)
            lead = drop - warn if np.isfinite(drop) and np.isfinite(warn) else math.nan
            decades = math.log10(drop / warn) if np.isfinite(lead) and warn > 0 and drop > 0 else math.nan
            if np.isfinite(drop):
                status = "missed" if not np.isfinite(warn) else ("warned" if warn <= drop else "late")
            else:
                status = "false_alarm" if np.isfinite(warn) else "quiet"
            rows.append(dict(base, warn_step=warn, drop_step=drop, lead_steps=lead, lead_decades=decades,
                             status=status))
    return rows


# The labels of `early_warnings`' status, with their meaning.
WARNING_STATUS_MEANINGS = {
    "warned": "a persistent signal at or before the collapse onset",
    "late": "a persistent signal, but after the collapse onset",
    "missed": "a collapse without a signal",
    "false_alarm": "a signal without a collapse",
    "quiet": "neither a signal nor a collapse",
    "no_data": "the metric's column is missing or all NaN",
}
WARNING_STATUSES = tuple(WARNING_STATUS_MEANINGS)


def warning_counts(warn: pd.DataFrame, keys=("wd", "engine", "layer", "signal")) -> pd.DataFrame:
    """How many (run, signal) rows of an early-warning table fall in each status, per group.

    Args:
        warn: rows of `early_warnings` with the run's identifying columns added (run, wd,
            steps, seed, ...).
        keys: the grouping, e.g. ("run", "engine") for false alarms per run, or
            ("wd", "steps", "engine", "layer", "signal") per weight decay and run length.

    Returns:
        One row per group: the keys, `runs` (distinct runs), `rows`, and one count column
        per status in WARNING_STATUSES (false_alarm = a signal without a later drop).
    """
    keys = list(keys)
    cols = [*keys, "runs", "rows", *WARNING_STATUSES]
    if warn.empty:
        return pd.DataFrame(columns=cols)
    missing = [k for k in [*keys, "status"] if k not in warn]
    if missing:
        raise ValueError(f"warning table lacks columns {missing}")
    counts = pd.crosstab([warn[k] for k in keys], warn["status"]).reindex(columns=list(WARNING_STATUSES),
                                                                            fill_value=0)
    counts.columns.name = None
    g = warn.groupby(keys, sort=True)
    counts.insert(0, "rows", g.size())
    counts.insert(0, "runs", g["run"].nunique() if "run" in warn else g.size())
    return counts.reset_index()[cols]
