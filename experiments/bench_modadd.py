"""Steps/s of the modular-addition training step: JAX (the last-position fast path, the same with
per-token tables, and the full forward; float64 and float32) against the PyTorch reference
(`grokjax.bench.torch_modadd`), one full-batch update per step at Nanda et al.'s defaults.

Windows are interleaved (A B C ... A B C ...) so that a change in the machine's load hits every
contender alike; each contender reports the median and the min-max of its windows' steps/s and
what 10^5 and 10^6 steps cost at the median. The load average is printed before and after:
numbers taken on a busy machine say so.

    python experiments/bench_modadd.py [--windows 5] [--window-steps 10] [--torch-threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import grokjax  # noqa: F401  (64-bit JAX before any array exists)
import jax
import numpy as np

from grokjax.modadd import data, step
from grokjax.modadd.config import ModAddConfig


def _jax_window(dtype: str, fwd: str, n: int):
    """A window function running n steps of the JAX chunk (compiled and warmed once here)."""
    cfg = ModAddConfig(dtype=dtype)
    dev = data.to_device(data.make_split(cfg))
    chunk = step.make_train_chunk(cfg, fwd)
    box = {"state": step.init_state(cfg)}
    box["state"], _ = chunk(box["state"], dev, n)  # compile + one warm-up window
    jax.block_until_ready(box["state"])

    def window() -> float:
        t0 = time.perf_counter()
        box["state"], loss = chunk(box["state"], dev, n)
        jax.block_until_ready((box["state"], loss))
        return time.perf_counter() - t0

    return window


def _torch_window(threads: int, n: int):
    """A window function running n steps of the torch reference with `threads` intra-op threads."""
    import torch  # noqa: PLC0415  (only the reference contender needs torch)

    from grokjax.bench.torch_modadd import make_torch_step  # noqa: PLC0415

    cfg = ModAddConfig()
    split = data.make_split(cfg)
    params = jax.tree.map(np.asarray, step.init_state(cfg).params)
    one = make_torch_step(params, split.train_tokens, split.train_labels, lr=cfg.lr, wd=cfg.wd,
                          betas=(cfg.b1, cfg.b2), eps=cfg.eps, warmup=cfg.warmup)

    def window() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                one()
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    window()  # warm-up
    return window


def _fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=5, help="timed windows per contender")
    parser.add_argument("--window-steps", type=int, default=10, help="training steps per window")
    parser.add_argument("--torch-threads", default="1", help="comma-separated torch thread counts ('' for none)")
    parser.add_argument("--only-jax", action="store_true", help="leave the torch reference out")
    args = parser.parse_args(argv)
    if args.windows < 1 or args.window_steps < 1:
        parser.error("--windows and --window-steps must be >= 1")
    try:
        threads = [int(t) for t in args.torch_threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--torch-threads must be comma-separated integers, got {args.torch_threads!r}")
    n = args.window_steps
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} "
          f"on {jax.devices()[0].platform}; load average before: {os.getloadavg()}")
    contenders = {}
    for dtype in ("float64", "float32"):
        for fwd in step.FORWARDS:
            contenders[f"jax {dtype} {fwd}"] = _jax_window(dtype, fwd, n)
    if not args.only_jax:
        for t in threads:
            contenders[f"torch float64 full ({t} thread{'s' if t > 1 else ''})"] = _torch_window(t, n)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.windows):
        for name, window in contenders.items():
            times[name].append(window())
    print(f"load average after: {os.getloadavg()}")
    print(f"{args.windows} windows of {n} steps each (full batch of {ModAddConfig().n_train} pairs)\n")
    print(f"{'contender':34s} {'steps/s median':>14s} {'min-max':>14s} {'10^5 steps':>11s} {'10^6 steps':>11s}")
    for name, secs in times.items():
        rates = sorted(n / s for s in secs)
        med = statistics.median(rates)
        print(f"{name:34s} {med:14.2f} {rates[0]:6.2f}-{rates[-1]:<7.2f} {_fmt_duration(1e5 / med):>11s} "
              f"{_fmt_duration(1e6 / med):>11s}")


if __name__ == "__main__":
    main()
