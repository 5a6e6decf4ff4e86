"""The segments of long runs, from their records: `python experiments/segments.py RUN...`

One markdown table per run: each segment's first and last step, its wall time and speed, the
CPU and XLA thread count it ran on (recorded in the start or resume event that opened it) and
how it ended (a pause with its reason, the final step, or no record of an end: a segment still
running, or one killed, whose steps after the last full state were recomputed by the next).
A pause or end event carries its segment's wall time; a run that reached its final step before
the trainer wrote end events shows no wall time or speed for its last segment.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path


def _time(rec: dict) -> datetime:
    return datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S%z")


def _last_step(run: Path) -> int | None:
    last = None
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        for ln in f:
            if ln.strip():
                last = json.loads(ln).get("step", last)
    return last


def segments(run: Path) -> list[dict]:
    """One dict per segment: start, end, wall_s, steps_per_s, cpu, xla_cpu_threads, ended."""
    events = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines() if ln.strip()]
    total = json.loads((run / "config.json").read_text())["config"]["steps"]
    out, cur = [], None
    for e in events:
        kind = e.get("event")
        if kind in ("start", "resume"):
            if cur is not None:
                out.append({**cur, "end": e["step"], "wall_s": None, "ended": "no end recorded"})
            cur = {"start": e["step"], "cpu": e.get("cpu", "not recorded"),
                   "xla_cpu_threads": e.get("xla_cpu_threads"), "t0": _time(e)}
        elif kind == "pause" and cur is not None:
            out.append({**cur, "end": e["step"], "wall_s": e.get("elapsed"), "ended": f"paused ({e.get('reason')})"})
            cur = None
        elif kind == "end" and cur is not None:
            out.append({**cur, "end": e["step"], "wall_s": e.get("elapsed"), "ended": "reached the final step"})
            cur = None
    if cur is not None:
        last = _last_step(run)
        ended = "reached the final step" if last == total else "running, or ended without a pause"
        out.append({**cur, "end": last, "wall_s": None, "ended": ended})
    for s in out:
        s.pop("t0")
        s["steps_per_s"] = round((s["end"] - s["start"]) / s["wall_s"], 1) if s["wall_s"] else None
    return out


def markdown(run: Path) -> str:
    lines = [f"### {run.name}", "", "| segment | steps | wall | steps/s | CPU | XLA threads | how it ended |",
             "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(segments(run), 1):
        wall = f"{s['wall_s'] / 60:.0f} min" if s["wall_s"] else "–"
        speed = f"{s['steps_per_s']:.0f}" if s["steps_per_s"] else "–"
        lines.append(f"| {i} | {s['start']:,} → {s['end']:,} | {wall} | {speed} | {s['cpu']} | "
                     f"{s['xla_cpu_threads'] or '–'} | {s['ended']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args(argv)
    for run in a.runs:
        if not (run / "events.jsonl").is_file() or not (run / "config.json").is_file():
            print(f"segments.py: error: {run} is not a run directory (no events.jsonl or config.json)", file=sys.stderr)
            return 2
        print(markdown(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
