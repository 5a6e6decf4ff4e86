"""Times the native HTSR engine against WeightWatcher 0.7.5.5 on the paper's MLP shapes.

Both engines analyse a 3-layer model (FC1 200x784, FC2 200x200, FC3 10x200, PyTorch
(out, in) orientation) with the paper's options: fix_fingers='clip_xmax' and
randomize=True (correlation traps). Two weight sets: PyTorch's default init times 8 (the
paper's starting point, an MP-like spectrum) and a heavy-tailed Student-t(2) variant.
Both run on one BLAS thread (the native engine's default; WW is limited the same way so
that the two are compared like for like, as in docs/htsr.md §Cost). WW's one-off import
is timed separately and excluded from the per-model times.

Usage:
    .venv/bin/python analysis/bench_htsr.py [--reps 7] [--ww-reps 3] [--checkpoints 200]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from grokjax.analysis import htsr, wwadapter
from grokjax.bench.init import torch_init
from grokjax.cliutil import OneLineParser

SHAPES = {"fc1": (200, 784), "fc2": (200, 200), "fc3": (10, 200)}


def torch_init_x8(seed: int) -> dict[str, np.ndarray]:
    """PyTorch nn.Linear default init U(+-1/sqrt(fan_in)), times 8 (one generator, fc1, fc2, fc3)."""
    rng = np.random.RandomState(seed)
    return {k: torch_init(rng, shape=s) for k, s in SHAPES.items()}


def student_t2(seed: int) -> dict[str, np.ndarray]:
    """Heavy-tailed entries: 8 t(2) / sqrt(fan_in)."""
    rng = np.random.RandomState(seed)
    return {k: 8 * rng.standard_t(2.0, size=s) / np.sqrt(s[1]) for k, s in SHAPES.items()}


def median_seconds(fn: Callable[[int], object], reps: int) -> float:
    """Median wall time of fn(rep) for rep = 1..reps, after one untimed warm-up call fn(0)."""
    fn(0)
    times = []
    for rep in range(1, reps + 1):
        start = time.perf_counter()
        fn(rep)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_alpha_gap(a: list[dict], b: list[dict]) -> float:
    """Largest relative alpha difference between two engines' rows (NaN pairs count as equal)."""
    gaps = [abs(x["alpha"] - y["alpha"]) / abs(y["alpha"]) for x, y in zip(a, b) if np.isfinite(y["alpha"])]
    return max(gaps, default=0.0)


def main() -> None:
    """Runs the benchmark and prints the table."""
    parser = OneLineParser(prog="bench_htsr.py", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed native runs per model")
    parser.add_argument("--ww-reps", type=int, default=3, help="timed WeightWatcher runs per model")
    parser.add_argument("--checkpoints", type=int, default=200, help="checkpoints to extrapolate to")
    args = parser.parse_args()

    options = htsr.HTSROptions()  # clip_xmax, randomize, 1 BLAS thread
    with htsr.blas_thread_limit(1):
        start = time.perf_counter()
        wwadapter.analyze_weights_ww({"warmup": np.eye(12)}, seed=0, randomize=False)
        import_s = time.perf_counter() - start
        print(f"weightwatcher {wwadapter.ww_version()} first call (import + tiny analyze): {import_s:.2f} s")
        print(f"native: median of {args.reps}, WeightWatcher: median of {args.ww_reps}; "
              f"seconds per 3-layer model, 1 BLAS thread\n")
        header = (f"{'weights':<14}{'native s':>10}{'WW s':>9}{'WW/native':>11}"
                  f"{f'native {args.checkpoints} ckpt':>20}{'(2 cores)':>11}{f'WW {args.checkpoints} ckpt':>16}"
                  f"{'traps equal':>13}{'max rel dα':>12}")
        print(header)
        print("-" * len(header))
        for label, make in (("torch_init_x8", torch_init_x8), ("student_t2", student_t2)):
            weights = make(0)
            native_s = median_seconds(lambda rep: htsr.analyze_weights(weights, options=options, seed=rep), args.reps)
            ww_s = median_seconds(lambda rep: wwadapter.analyze_weights_ww(weights, seed=rep), args.ww_reps)
            native_rows = htsr.analyze_weights(weights, options=options, rng=np.random.RandomState(0))
            ww_rows = wwadapter.analyze_weights_ww(weights, seed=0)
            traps_equal = all(a["traps"] == b["traps"] for a, b in zip(native_rows, ww_rows))
            n = args.checkpoints
            print(f"{label:<14}{native_s:>10.4f}{ww_s:>9.3f}{ww_s / native_s:>11.1f}"
                  f"{native_s * n:>19.1f}s{native_s * n / 2:>10.1f}s{ww_s * n:>15.0f}s"
                  f"{str(traps_equal):>13}{max_alpha_gap(native_rows, ww_rows):>12.1e}")


if __name__ == "__main__":
    main()
