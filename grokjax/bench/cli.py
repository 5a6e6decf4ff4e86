"""Steps/s of the JAX trainer against the authors' PyTorch loop: `python experiments/benchmark.py`.

Both run in this process, in interleaved windows, on the same batches in float64; the
table adds the FLOPs per step, the machine's float64 GEMM rate, the floor it implies,
JAX's aggregate rate for several vmapped seeds, and the cost of evaluations. `--threads 1`
re-executes itself pinned to one core. The timing logic lives in `grokjax.bench.core`; this
file adds the PyTorch contender (the only module besides the torch reference that imports
torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from grokjax.cliutil import THREAD_VARS, OneLineParser
from grokjax.train.config import FC1_WEIGHT_GRAD, SKIP_ZERO_PIXELS, ConfigError, TrainConfig, split_fields

_DEFAULTS = TrainConfig(out="unused")

PINNED_ENV = "GROKJAX_BENCH_PINNED"


def _seeds(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seed counts, got {text!r}") from None
    if any(k < 1 for k in out):
        raise argparse.ArgumentTypeError(f"seed counts must be >= 1, got {text!r}")
    return out


def _modes(text: str) -> tuple[str, ...]:
    out = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in out if m not in SKIP_ZERO_PIXELS]
    if bad:
        raise argparse.ArgumentTypeError(f"modes are batch, subset and off, got {text!r}")
    return out


def _sweep(text: str) -> tuple[int, tuple[float, ...]]:
    """`3x0,0.01`: 3 seeds times the weight decays 0 and 0.01."""
    try:
        k, wds = text.split("x", 1)
        out = int(k), tuple(float(w) for w in wds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SEEDSxWD,WD like 3x0,0.01, got {text!r}") from None
    if out[0] < 1 or not out[1] or any(not (w >= 0) for w in out[1]) or len(set(out[1])) != len(out[1]):
        raise argparse.ArgumentTypeError(f"expected >= 1 seeds and distinct weight decays >= 0, got {text!r}")
    return out


def _variant(text: str) -> tuple[str, int, tuple[tuple[str, str], ...]]:
    """`NAME:unroll=4` or `NAME:xla_gpu_enable_command_buffer=;xla_gpu_graph_min_graph_size=1`."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE;KEY=VALUE, got {text!r}")
    unroll, options = 1, []
    for item in rest.split(";"):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE in {text!r}, got {item!r}")
        if key.strip() == "unroll":
            try:
                unroll = int(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"unroll must be an integer, got {value!r}") from None
        else:
            options.append((key.strip(), value.strip()))
    try:  # training fields are checked here; XLA options only when their executable compiles
        split_fields(options)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, unroll, tuple(options)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--windows", type=int, default=7, help="timed windows per contender")
    p.add_argument("--window-steps", type=int, default=300, help="training steps per window")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="vmapped seed counts for the aggregate rows (default 1,2,4,8; --quick: 1,2)")
    p.add_argument("--threads", type=int, default=0,
                   help="pin this process to the first N cores and use N threads (0: all cores)")
    p.add_argument("--skip-torch", action="store_true", help="time JAX only")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="device of the torch reference")
    p.add_argument("--gemm-n", type=int, default=2048, help="side of the square GEMM that measures the floor")
    p.add_argument("--wd", type=float, default=0.0, help="weight decay of both contenders")
    p.add_argument("--skip-zero-pixels", choices=SKIP_ZERO_PIXELS, default=_DEFAULTS.skip_zero_pixels,
                   help="FC1's pixel skipping for the JAX contenders (the main row, seeds, sweep, variants)")
    p.add_argument("--fc1-weight-grad", choices=FC1_WEIGHT_GRAD, default=_DEFAULTS.fc1_weight_grad,
                   help="how the JAX contenders take FC1's weight gradient (as --skip-zero-pixels)")
    p.add_argument("--modes", type=_modes, default=None,
                   help="other skip-zero-pixels modes timed as 1-seed contenders (default: the other two)")
    p.add_argument("--sweep", type=_sweep, default=None, metavar="SEEDSxWDS",
                   help="a vmapped sweep contender, e.g. 3x0,0.01 (3 seeds x 2 weight decays)")
    p.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME:KEY=VALUE;...",
                   help="a 1-seed contender with scan unroll=K, training fields (TrainConfig names) and/or "
                        "XLA options set for its executable, e.g. nocmdbuf:xla_gpu_enable_command_buffer= or "
                        "xt:fc1_weight_grad=pretransposed (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    return p


def pin_threads(n: int) -> None:
    """Re-executes this script restricted to the first n cores, with n-thread BLAS pools.

    Affinity survives exec, and XLA sizes its thread pool from it, so JAX is pinned too.
    """
    if n <= 0 or os.environ.get(PINNED_ENV):
        return
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)
    env = dict(os.environ, **{PINNED_ENV: "1"}, **{v: str(n) for v in THREAD_VARS})
    os.execve(sys.executable, [sys.executable, "-m", "grokjax.bench.cli", *sys.argv[1:]], env)


def make_torch_window(params, data, perm, *, wd: float, lr: float, batch: int, device: str, threads: int):
    """A window function for the authors' PyTorch step (the torch reference's inner loop).

    The model, optimizer (torch.optim.AdamW, default implementation), loss and fixed batch
    cycle are those of `torch_reference.train_reference`; the state persists across windows.
    """
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415
    from grokjax.bench.torch_reference import build_model  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = build_model(params).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    loss_fn = nn.MSELoss()
    xt = torch.tensor(np.asarray(data.x_train), dtype=torch.float64)
    onehot = torch.eye(10, dtype=torch.float64)[torch.tensor(np.asarray(data.y_train), dtype=torch.int64)]
    blocks = [torch.from_numpy(np.asarray(perm[b:b + batch], np.int64)) for b in range(0, len(perm), batch)]
    batches = [(xt[i].to(dev), onehot[i].to(dev)) for i in blocks]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step = [0]

    def window(steps: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            x, y = batches[step[0] % len(batches)]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            step[0] += 1
        sync()
        return time.perf_counter() - t

    return window


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pin_threads(args.threads)
    import grokjax  # noqa: F401,PLC0415  (x64 on before JAX makes arrays)
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from grokjax.bench import core  # noqa: PLC0415
    from grokjax.data import load_mnist  # noqa: PLC0415
    from grokjax.train.engine import batch_perm, init_state, make_data  # noqa: PLC0415

    cfg = TrainConfig(out="unused", wd=args.wd, progress=False, skip_zero_pixels=args.skip_zero_pixels,
                      fc1_weight_grad=args.fc1_weight_grad)
    modes = args.modes if args.modes is not None else tuple(
        m for m in SKIP_ZERO_PIXELS if m != args.skip_zero_pixels)
    extra = dict(modes=modes, sweep=args.sweep, variants=tuple(args.variant))
    if args.quick:
        opts = core.BenchOptions(windows=2, window_steps=10, seeds=args.seeds or (1, 2), gemm_n=256,
                                  gemm_reps=2, eval_reps=2, **extra)
    else:
        opts = core.BenchOptions(windows=args.windows, window_steps=args.window_steps,
                                  seeds=args.seeds or (1, 2, 4, 8), gemm_n=args.gemm_n, **extra)
    mnist = load_mnist(verbose=False)
    reference = None
    if not args.skip_torch:
        data = make_data(cfg, mnist)
        p0 = jax.tree.map(np.asarray, init_state(cfg).params)

        def reference(_steps):
            return make_torch_window(p0, data, batch_perm(cfg), wd=cfg.wd, lr=cfg.lr, batch=cfg.batch,
                                     device=args.device, threads=args.threads)

    res = core.run_benchmark(cfg, mnist, opts, reference, "torch",
                              log=lambda s: print(s, file=sys.stderr, flush=True))
    res["torch_device"] = None if args.skip_torch else args.device
    res["threads"] = args.threads
    if not args.skip_torch:
        import torch  # noqa: PLC0415

        res["torch_threads"] = torch.get_num_threads()
    print(core.format_table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


def run() -> None:
    """The `grokjax-bench` entry point (and `python experiments/benchmark.py`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
