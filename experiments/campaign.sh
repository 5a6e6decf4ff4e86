#!/usr/bin/env bash
# The seeds campaign (issue: the collapse over seeds, beside its weight-decay control): five
# 10^7-step runs, two at a time, each process pinned to one core with one XLA thread
# (PJRT_NPROC=1), the fastest layout measured for several runs on a 2-core host (BENCHMARKS.md,
# "Several runs at once").
#
#   experiments/campaign.sh run UNTIL     # train until UNTIL (a `date -d` time), then pause
#   experiments/campaign.sh export        # copy every run's compact record into results/, and
#                                         # write results/campaign_1e7/SEGMENTS.md (every segment's CPU)
#   experiments/campaign.sh status        # the step each run has reached
#
# Two slots, one a core, take the runs in the issue's order (wd0.01_seed0, wd0_seed1, wd0_seed2,
# wd0.01_seed1, wd0.01_seed2), two at a time: a slot whose run finishes takes the first run that
# is neither complete nor held by the other slot (a claim is a folder under $RUNS/.claims, made
# atomically, cleared at each start), so neither core idles while a run is left. A complete run
# answers "already complete" at once and the slot moves on. Run directories live in
# $GROKJAX_RUNS (default ~/grokjax-runs/campaign_1e7); when one is missing there, it continues
# from its export in results/campaign_1e7/ (the full state the export carries), so a new machine
# resumes where the last commit left off. Every segment records its CPU and XLA thread count in
# the run's events.jsonl (start and resume events).
# Params checkpoints: --keep_params all (about 0.45 GB a run), so the trap ablation can run at
# the peak, 10^6, the first persistent centred trap, the collapse minimum and 10^7.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${GROKJAX_RUNS:-$HOME/grokjax-runs/campaign_1e7}
EXPORTS=results/campaign_1e7
ALL="0.01:0 0:1 0:2 0.01:1 0.01:2"

name() { echo "wd${1%%:*}_seed${1##*:}"; }

slot() {  # slot CORE UNTIL_EPOCH: train the unclaimed runs, in order, until one pauses
  local core=$1 until=$2
  for r in $ALL; do
    local n; n=$(name "$r")
    mkdir "$RUNS/.claims/$n" 2>/dev/null || continue   # the other slot holds it
    if [ ! -d "$RUNS/$n" ] && [ -d "$EXPORTS/$n" ]; then
      echo "slot $core: $n continues from its export $EXPORTS/$n"
      cp -r "$EXPORTS/$n" "$RUNS/$n"
    fi
    local left=$(( until - $(date +%s) ))
    if [ "$left" -lt 120 ]; then echo "slot $core: no time left for $n"; return 0; fi
    set +e
    taskset -c "$core" env PJRT_NPROC=1 "$PY" experiments/run.py --wd "${r%%:*}" --seed "${r##*:}" \
      --steps 1e7 --keep_params all --progress false --time_limit "$left" --out "$RUNS/$n" \
      >> "$RUNS/$n.log" 2>&1
    local rc=$?
    set -e
    echo "slot $core: $n exit $rc"
    [ "$rc" -eq 0 ] || return 0   # paused (75) or failed: the slot stops here
  done
}

case "${1:-}" in
  run)
    [ $# -eq 2 ] || { echo "usage: $0 run UNTIL (e.g. '22:05')" >&2; exit 2; }
    until=$(date -d "$2" +%s) || { echo "bad time: $2" >&2; exit 2; }
    rm -rf "$RUNS/.claims"; mkdir -p "$RUNS/.claims"
    slot 0 "$until" &
    sleep 1   # slot 0 claims first: the issue's first run goes to core 0
    slot 1 "$until" &
    wait ;;
  export)
    mkdir -p "$EXPORTS"
    for r in $ALL; do
      n=$(name "$r"); [ -d "$RUNS/$n" ] || continue
      # the export names its folder in config.json: write it where it stays, keep the old one
      # aside until the new one is complete
      rm -rf "$EXPORTS/.$n.old"; [ -d "$EXPORTS/$n" ] && mv "$EXPORTS/$n" "$EXPORTS/.$n.old"
      if "$PY" experiments/run.py --export "$RUNS/$n" "$EXPORTS/$n"; then
        rm -rf "$EXPORTS/.$n.old"
      else
        echo "export of $n failed; the previous export is kept" >&2
        rm -rf "$EXPORTS/$n"; [ -d "$EXPORTS/.$n.old" ] && mv "$EXPORTS/.$n.old" "$EXPORTS/$n"
      fi
    done
    # every segment of every run: steps, speed, CPU and XLA threads (from the exported events)
    dirs=(); for r in $ALL; do n=$(name "$r"); [ -d "$EXPORTS/$n" ] && dirs+=("$EXPORTS/$n"); done
    "$PY" experiments/segments.py "${dirs[@]}" > "$EXPORTS/SEGMENTS.md" ;;
  status)
    for r in $ALL; do
      n=$(name "$r")
      for d in "$RUNS/$n" "$EXPORTS/$n"; do
        [ -f "$d/metrics.jsonl" ] && { echo "$n: step $(tail -n 1 "$d/metrics.jsonl" | sed 's/.*"step": \([0-9]*\).*/\1/') ($d)"; break; }
      done
    done ;;
  *) echo "usage: $0 run UNTIL | export | status" >&2; exit 2 ;;
esac
