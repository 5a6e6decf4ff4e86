"""Measure how several training runs share this machine's cores: aggregate steps/s per layout.

Each layout trains real runs (the default step, evaluations included, `--monitor false
--keep_params none`) for `--steps` steps into a fresh folder, then reads every replica's
`metrics.jsonl` and reports its steady-state rate: steps between the first evaluation at or
after `--from_step` and the last, divided by the wall time between them (so compilation and
start-up are left out). The aggregate is the sum over the runs the layout trains at once.

    python experiments/layouts.py                      # every layout, 20,000 steps each
    python experiments/layouts.py --layouts single,pinned2 --json out.json

Layouts (on a machine with at least 2 cores; the pinned ones use cores 0 and 1):
  single    one run, one process on every core (the default)
  vmap2     one process, a vmapped 2-seed sweep (--seeds 0,1)
  devices2  one process with 2 CPU devices, the 2-seed sweep sharded one replica a device
  pinned2   two processes, each pinned to one core (taskset -c i, PJRT_NPROC=1)
  pinned2x2 two pinned processes, each a vmapped 2-seed sweep (4 runs at once)

One run with each batch split over two devices is measured by experiments/data_parallel.py.

The machine must be quiet: anything else running changes the numbers. The load average before
and after each layout is printed and recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = [sys.executable, str(Path(__file__).resolve().parent / "run.py")]
COMMON = ["--monitor", "false", "--keep_params", "none", "--progress", "false", "--wd", "0"]
DEVICES2 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _layouts(steps: int) -> dict[str, list[tuple[list[str], dict[str, str], str]]]:
    """Per layout, the processes to start: (argv after run.py's common flags, env, out name)."""
    n = ["--steps", str(steps)]
    pin = lambda core: ["taskset", "-c", str(core)]  # noqa: E731
    one = {"PJRT_NPROC": "1"}
    return {
        "single": [([*n, "--seed", "0"], {}, "single")],
        "vmap2": [([*n, "--seeds", "0,1"], {}, "vmap2")],
        "devices2": [([*n, "--seeds", "0,1"], DEVICES2, "devices2")],
        "pinned2": [(pin(0) + [*n, "--seed", "0"], one, "pin0"), (pin(1) + [*n, "--seed", "1"], one, "pin1")],
        "pinned2x2": [(pin(0) + [*n, "--seeds", "0,1"], one, "pin0"), (pin(1) + [*n, "--seeds", "2,3"], one, "pin1")],
    }


def _rate(metrics: Path, from_step: int) -> tuple[float, int, float]:
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "time/wall" in r]
    start = next(r for r in rows if r["step"] >= from_step)
    end = rows[-1]
    steps, wall = end["step"] - start["step"], end["time/wall"] - start["time/wall"]
    return steps / wall, steps, wall


def measure(name: str, procs, root: Path, from_step: int) -> dict:
    load0 = os.getloadavg()[0]
    running = []
    for argv, env, out in procs:
        pinned = argv[0] == "taskset"
        cmd = (argv[:3] if pinned else []) + RUN + COMMON + (argv[3:] if pinned else argv) + ["--out", str(root / out)]
        running.append(subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    for p in running:
        log, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"layout {name}: a run failed (exit {p.returncode}):\n{log[-2000:]}")
    runs = {}
    for m in sorted(root.rglob("metrics.jsonl")):
        rate, steps, wall = _rate(m, from_step)
        runs[str(m.parent.relative_to(root))] = {"steps_per_s": round(rate, 1), "steps": steps, "wall_s": round(wall, 1)}
    return {"layout": name, "runs": runs, "aggregate_steps_per_s": round(sum(r["steps_per_s"] for r in runs.values()), 1),
            "loadavg_before": round(load0, 2), "loadavg_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--from_step", type=int, default=5000, help="steady state starts at this step")
    ap.add_argument("--layouts", default="single,vmap2,devices2,pinned2,pinned2x2")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    table = _layouts(a.steps)
    names = a.layouts.split(",")
    unknown = [x for x in names if x not in table]
    if unknown:
        ap.error(f"unknown layout(s) {unknown}; choose from {sorted(table)}")
    if a.json is not None and a.json.exists():
        ap.error(f"{a.json} exists; not overwriting it")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from grokjax.bench.core import machine_info  # noqa: E402  (imports jax: only once the flags are checked)
    results = {"machine": machine_info(), "steps": a.steps, "from_step": a.from_step, "layouts": []}
    base = None
    for name in names:
        root = Path(tempfile.mkdtemp(prefix=f"layout_{name}_"))
        try:
            r = measure(name, table[name], root, a.from_step)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        base = r["aggregate_steps_per_s"] if name == "single" else base
        rel = f"{r['aggregate_steps_per_s'] / base:.2f}x single" if base else ""
        per = " + ".join(f"{v['steps_per_s']:.0f}" for v in r["runs"].values())
        print(f"{name:10s} aggregate {r['aggregate_steps_per_s']:7.1f} steps/s  ({per})  {rel}  "
              f"load {r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f}", flush=True)
        results["layouts"].append(r)
        if a.json is not None:
            a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
