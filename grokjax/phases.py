"""Phase detection from a run's metrics, and the HTSR early-warning signals.

The paper reads its tables "at the right edge of each grokking phase" (pre-grokking ~1e5
steps, grokking ~1e6 = max test accuracy, anti-grokking ~1e7 = collapse). Here the three
steps are found from the test and train accuracy curves of each run by fixed rules (see
`detect_phases`), so that runs of any length and seed are read the same way.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

PHASES = ("pre", "grok", "anti")
PHASE_TITLES = {"pre": "Pre-grokking", "grok": "Grokking (max test acc.)", "anti": "Anti-grokking (collapse)"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseOptions:
    """Thresholds of the phase rules.

    Attributes:
        train_saturated: train accuracy at or above which training counts as saturated
            (0.999: at most 1 of the 1,000 training images wrong).
        low_fraction: test accuracy is "still low" while below acc0 + low_fraction *
            (peak - acc0), acc0 = test accuracy at the first step (0.5: below halfway).
        collapse_drop: a collapse is a fall of at least this much test accuracy (absolute,
            0.05 = 5 percentage points) below the peak at some step after it.
        alpha_crit: the HTSR critical exponent; alpha below it is the warning signal.
    """

    train_saturated: float = 0.999
    low_fraction: float = 0.5
    collapse_drop: float = 0.05
    alpha_crit: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.train_saturated <= 1:
            raise ValueError(f"train_saturated must lie in (0, 1], got {self.train_saturated}")
        if not 0 < self.low_fraction <= 1:
            raise ValueError(f"low_fraction must lie in (0, 1], got {self.low_fraction}")
        if not 0 < self.collapse_drop < 1:
            raise ValueError(f"collapse_drop must lie in (0, 1), got {self.collapse_drop}")


def detect_phases(steps, train_acc, test_acc, *, options: PhaseOptions | None = None) -> dict:
    """The three phase steps of one run, by these rules (steps sorted ascending first):

    * grokking: `grok_step` = the first step of maximal test accuracy (the peak).
    * pre-grokking (its end): `pre_step` = the LAST step s <= grok_step with
      train_acc(s) >= train_saturated and test_acc(s) < acc0 + low_fraction*(peak - acc0),
      i.e. the right edge of the stretch where training has saturated while test accuracy
      is still below halfway from its starting value to its peak (the paper reads its
      tables at the right edge of each phase). `saturated_step` is the first step with
      train_acc >= train_saturated. `pre_status` says 'ok', 'test_not_low' (training
      saturated only once test accuracy was already high: pre_step is then the first
      saturated step), or 'not_saturated' (never saturated: pre_step is NaN).
      `low_end_step` is the last step before the peak whose test accuracy is still low
      (the latest possible right edge of pre-grokking), NaN if none.
    * anti-grokking: `collapsed` is True when some step after the peak has
      test_acc <= peak - collapse_drop; then `anti_step` = the first step of minimal test
      accuracy after the peak, and `drop_step` = the first step after the peak at which
      test accuracy is <= peak - collapse_drop (the onset that warnings are timed
      against). Without a collapse, `anti_step` is the final step (the paper's 1e7
      column for the WD > 0 control) and `drop_step` is NaN.

    Returns:
        dict with pre_step, pre_status, saturated_step, low_end_step, grok_step, anti_step, drop_step,
        final_step, collapsed, peak_test_acc, anti_test_acc, drop_pp (peak minus the
        minimum after the peak, in percentage points; 0 if the peak is the last step),
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

    cand = np.flatnonzero(sat & low & upto)
    if cand.size:
        i_pre, pre_status = int(cand[-1]), "ok"
    elif np.any(sat & upto):
        i_pre, pre_status = int(np.flatnonzero(sat & upto)[0]), "test_not_low"
    else:
        i_pre, pre_status = None, "not_saturated"
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
        low_end_step=int(steps[low_before[-1]]) if low_before.size else math.nan,
        grok_step=int(steps[i_peak]), anti_step=int(steps[i_anti]), drop_step=drop_step,
        final_step=int(steps[-1]), collapsed=collapsed, peak_test_acc=peak, anti_test_acc=float(te[i_anti]),
        drop_pp=drop_pp,
        test_acc_pre=float(te[i_pre]) if i_pre is not None else math.nan,
        train_acc_pre=float(tr[i_pre]) if i_pre is not None else math.nan,
    )


def phase_steps(phases: dict) -> dict[str, float]:
    """{'pre': pre_step, 'grok': grok_step, 'anti': anti_step} of a `detect_phases` result."""
    return {"pre": phases["pre_step"], "grok": phases["grok_step"], "anti": phases["anti_step"]}


def first_step(steps, flags, start: float = -math.inf) -> float:
    """The first step >= start whose flag is True (NaN if none)."""
    steps = np.asarray(steps)
    hit = np.flatnonzero(np.asarray(flags, bool) & (steps >= start))
    return int(steps[hit[0]]) if hit.size else math.nan


def early_warnings(step_df: pd.DataFrame, phases: dict, *, layers=("fc1", "fc2", "mean"), engine: str = "native",
                   options: PhaseOptions | None = None) -> list[dict]:
    """When alpha < alpha_crit and traps > 0 first appear, and their lead over the collapse.

    The search starts at the end of pre-grokking (`pre_step`; the first step when that is
    NaN), because the untrained, MP-like layers give noisy alpha fits early on. For each
    layer and signal:

    * `warn_step`: the first step >= the start where the signal holds
      ('alpha<2': `<engine>/alpha_<layer>` < alpha_crit; 'traps>0': `<engine>/traps_<layer>` > 0);
    * `lead_steps` = drop_step - warn_step and `lead_decades` = log10(drop_step / warn_step),
      positive when the signal came first; NaN when there was no collapse or no signal;
    * `status`: 'warned' (signal at or before the drop), 'late' (after the drop),
      'missed' (collapse, no signal), 'false_alarm' (signal, no collapse), 'quiet'
      (neither), or 'no_data' (the column is missing or all NaN).

    Args:
        step_df: one run's per-step table (`grokjax.analyze` step columns), any order.
        phases: that run's `detect_phases` result.
        layers: fc1, fc2, fc3 and/or 'mean' (alpha only: the FC1+FC2 mean).
        engine: column prefix, 'native' or 'ww'.

    Returns:
        One dict per (layer, signal).
    """
    options = options or PhaseOptions()
    df = step_df.sort_values("step")
    start = phases["pre_step"] if np.isfinite(phases["pre_step"]) else -math.inf
    drop = phases["drop_step"]
    rows = []
    for layer in layers:
        for signal, col in (("alpha<2", f"{engine}/alpha_{layer}"), ("traps>0", f"{engine}/traps_{layer}")):
            if col not in df or df[col].isna().all():
                if layer == "mean" and signal == "traps>0":
                    continue
                rows.append(dict(engine=engine, layer=layer, signal=signal, warn_step=math.nan, drop_step=drop,
                                 lead_steps=math.nan, lead_decades=math.nan, status="no_data"))
                continue
            v = df[col].to_numpy(float)
            flags = (v < options.alpha_crit) if signal == "alpha<2" else (v > 0)
            warn = first_step(df["step"].to_numpy(), flags & np.isfinite(v), start)
            lead = drop - warn if np.isfinite(drop) and np.isfinite(warn) else math.nan
            decades = math.log10(drop / warn) if np.isfinite(lead) and warn > 0 and drop > 0 else math.nan
            if np.isfinite(drop):
                status = "missed" if not np.isfinite(warn) else ("warned" if warn <= drop else "late")
            else:
                status = "false_alarm" if np.isfinite(warn) else "quiet"
            rows.append(dict(engine=engine, layer=layer, signal=signal, warn_step=warn, drop_step=drop,
                             lead_steps=lead, lead_decades=decades, status=status))
    return rows
