"""What the in-loop HTSR monitor costs the training: `python experiments/monitor_overhead.py`.

Trains the same run with `--monitor false` and `--monitor true`, alternating, `--rounds` times
each, each in a fresh temporary run directory, and times every command from start to exit.
Reports the wall times, the overhead (the median with the monitor over the median without,
minus one), the wall cost per record the monitor wrote by the end (a step it deferred past the
end is left to the analysis, and its cost is not in the wall time), and what that cost per
record implies for other run lengths: evaluations(N) x cost / training time at N steps without
the monitor (at the steps/s of the runs without it, startup excluded). The projection is an
upper bound when measured on a shorter run: there the evaluations are denser, so the monitor has
less idle CPU to hide in.

Nothing is asserted; this is a measurement. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grokjax.cliutil import OneLineParser
from grokjax.train.schedule import eval_steps

PROG = "monitor_overhead.py"


def _steps(text: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count like 1e5, got {text!r}") from None
    if not v.is_integer() or not 1 <= v <= 1e8:
        raise argparse.ArgumentTypeError(f"steps must be a whole number in 1..1e8, got {text!r}")
    return int(v)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Wall-time overhead of the in-loop HTSR monitor (A/B, alternating).",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=_steps, default=100_000, help="steps of each timed run")
    p.add_argument("--rounds", type=_positive, default=1, help="runs with and without the monitor, each")
    p.add_argument("--project", default="1e6,1e7", help="run lengths to project the cost per evaluation to")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more grokjax-train flags for both contenders (e.g. --seed 1)")
    return p


def _one(steps: int, monitor: bool, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="grokjax-overhead-") as d:
        cmd = [sys.executable, "-c", "import sys; from grokjax.train.cli import main; sys.exit(main())",
               "--steps", str(steps), "--out", str(Path(d) / "run"), "--progress", "false",
               "--monitor", str(monitor).lower(), *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{PROG}: error: the run failed (exit {r.returncode}): "
                             + (r.stderr.strip().splitlines() or ["no output"])[-1])
        lines = (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()
        evals = len(lines)
        train_wall = json.loads(lines[-1])["time/wall"]
        records = 0
        rec = Path(d) / "run" / "monitor" / "records.jsonl"
        if rec.exists():
            records = len(rec.read_text().splitlines())
    note = next((x for x in r.stderr.splitlines() if x.startswith("monitor:")), "")
    return dict(monitor=monitor, wall=wall, train_wall=train_wall, evals=evals, records=records, note=note)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]
    try:
        project = [_steps(x) for x in args.project.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        print(f"{PROG}: error: --project: {e}", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.rounds):
        for monitor in (False, True):
            res = _one(args.steps, monitor, extra)
            runs.append(res)
            print(f"round {i + 1}: monitor {'on ' if monitor else 'off'}: {res['wall']:.1f} s "
                  f"({args.steps / res['wall']:.1f} steps/s over the whole command; {res['evals']} evaluations, "
                  f"{res['records']} monitor records){'  ' + res['note'] if res['note'] else ''}", flush=True)
    off = statistics.median(r["wall"] for r in runs if not r["monitor"])
    on = statistics.median(r["wall"] for r in runs if r["monitor"])
    evals = runs[0]["evals"]
    # per record the monitor wrote by the end of the command (steps it deferred past the end are
    # left to the analysis, and their cost is not in the wall time)
    records = statistics.median(r["records"] for r in runs if r["monitor"])
    per_eval = (on - off) / max(records, 1)
    out = dict(steps=args.steps, rounds=args.rounds, extra=extra, runs=runs, wall_off=off, wall_on=on,
               overhead=on / off - 1, per_eval_s=per_eval, projections={})
    print(f"{args.steps:,} steps, median of {args.rounds}: {off:.1f} s without the monitor, {on:.1f} s with it: "
          f"overhead {100 * (on / off - 1):+.1f}% ({per_eval:+.3f} s per record; {records:g} records of "
          f"{evals} evaluations written by the end)")
    # steps/s of training without the monitor (the last record's wall clock: startup and compile excluded)
    rate = args.steps / statistics.median(r["train_wall"] for r in runs if not r["monitor"])
    for n in project:
        k = len(eval_steps(n))
        pct = 100 * k * per_eval / (n / rate)
        out["projections"][str(n)] = dict(evaluations=k, overhead_pct=pct)
        print(f"projected to {n:,} steps: {k} evaluations x {per_eval:.3f} s / {n / rate:.0f} s = {pct:+.2f}%"
              + (" (an upper bound: evaluations are sparser there)" if n > args.steps else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def run() -> None:
    sys.exit(main())
