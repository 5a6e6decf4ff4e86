#!/usr/bin/env bash
# Long campaigns of runs, in segments, each process pinned to one core with one XLA thread
# (PJRT_NPROC=1), the fastest layout measured for several runs on a 2-core host (BENCHMARKS.md,
# "Several runs at once"). Two campaigns (CAMPAIGN=...):
#
#   mnist (the default): the seeds campaign (issue: the collapse over seeds, beside its
#     weight-decay control): five 10^7-step MLP runs, in the issue's order wd0.01_seed0,
#     wd0_seed1, wd0_seed2, wd0.01_seed1, wd0.01_seed2; run directories in
#     ~/grokjax-runs/campaign_1e7, exports in results/campaign_1e7. --keep_params all (about
#     0.45 GB a run), so the trap ablation can run at the peak, 10^6, the first persistent centred
#     trap, the collapse minimum and 10^7. Its exports carry the params checkpoints at the phase
#     steps, 10^6 and the last evaluation (`--export_params_at phases,1e6`, 1.6 MB each), so the
#     ablation runs there from the export too, and a run continued elsewhere keeps them.
#   modadd: the transformer's anti-grokking search: seed 0 of `--task modadd` (Nanda et al.'s
#     settings, float64) at weight decay 1.0 (the defaults, trained on past their 50,000 steps),
#     0.1 and 0, in that order, 10^5 steps each (STEPS=... for another length; a run keeps the
#     length it started with); run directories in ~/grokjax-runs/modadd_search, exports in
#     results/modadd_search. --keep_params log.
#
#   experiments/campaign.sh run UNTIL     # train until UNTIL (a `date -d` time), then pause
#   experiments/campaign.sh export        # copy every run's compact record into the exports, and
#                                         # write <exports>/SEGMENTS.md (every segment's CPU)
#   experiments/campaign.sh status        # the step each run has reached
#   CAMPAIGN=modadd CORES=1 experiments/campaign.sh run UNTIL    # the search, on core 1 only
#
# One slot a core of CORES (default "0 1"): the slots take the runs in order, one each; a slot
# whose run finishes takes the first run that is neither complete nor held by another slot (a
# claim is a folder under $RUNS/.claims, made atomically, cleared at each start), so no core
# idles while a run is left. A complete run answers "already complete" at once and the slot moves
# on. Two campaigns may run at once on different cores. Run directories live in $GROKJAX_RUNS
# (default: the campaign's folder above), exports in $GROKJAX_EXPORTS (default: its results/ folder);
# when a run directory is missing, it continues from its export
# (the full state the export carries), so a new machine resumes where the last commit left off.
# Every segment records its CPU and XLA thread count in the run's events.jsonl (start and resume
# events).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CORES=${CORES:-0 1}
case "${CAMPAIGN:-mnist}" in
  mnist)
    RUNS=${GROKJAX_RUNS:-$HOME/grokjax-runs/campaign_1e7}
    EXPORTS=${GROKJAX_EXPORTS:-results/campaign_1e7}
    ALL="0.01:0 0:1 0:2 0.01:1 0.01:2"
    TRAIN=(--steps "${STEPS:-1e7}" --keep_params all)
    EXPORT=(--export_params_at phases,1e6) ;;
  modadd)
    RUNS=${GROKJAX_RUNS:-$HOME/grokjax-runs/modadd_search}
    EXPORTS=${GROKJAX_EXPORTS:-results/modadd_search}
    ALL="1.0:0 0.1:0 0:0"
    TRAIN=(--task modadd --steps "${STEPS:-1e5}" --keep_params log)
    EXPORT=() ;;
  *) echo "unknown CAMPAIGN=${CAMPAIGN} (mnist or modadd)" >&2; exit 2 ;;
esac

name() { echo "wd${1%%:*}_seed${1##*:}"; }

slot() {  # slot CORE UNTIL_EPOCH: train the unclaimed runs, in order, until one pauses
  local core=$1 until=$2
  for r in $ALL; do
    local n; n=$(name "$r")
    mkdir "$RUNS/.claims/$n" 2>/dev/null || continue   # the other slot holds it
    local left=$(( until - $(date +%s) ))
    if [ "$left" -lt 120 ]; then echo "slot $core: no time left for $n"; return 0; fi
    if [ ! -d "$RUNS/$n" ] && [ -d "$EXPORTS/$n" ]; then
      echo "slot $core: $n continues from its export $EXPORTS/$n"
      cp -r "$EXPORTS/$n" "$RUNS/$n"
    fi
    set +e
    taskset -c "$core" env PJRT_NPROC=1 "$PY" experiments/run.py --wd "${r%%:*}" --seed "${r##*:}" \
      "${TRAIN[@]}" --progress false --time_limit "$left" --out "$RUNS/$n" \
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
    for core in $CORES; do
      slot "$core" "$until" &
      sleep 1   # the slots claim in the order of CORES: the first run goes to the first core
    done
    wait ;;
  export)
    mkdir -p "$EXPORTS"
    for r in $ALL; do
      n=$(name "$r"); [ -d "$RUNS/$n" ] || continue
      # the export names its folder in config.json: write it where it stays, keep the old one
      # aside until the new one is complete
      rm -rf "$EXPORTS/.$n.old"; [ -d "$EXPORTS/$n" ] && mv "$EXPORTS/$n" "$EXPORTS/.$n.old"
      if "$PY" experiments/run.py --export "$RUNS/$n" "$EXPORTS/$n" ${EXPORT[@]+"${EXPORT[@]}"}; then
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
    done
    exit 0 ;;
  *) echo "usage: $0 run UNTIL | export | status" >&2; exit 2 ;;
esac
