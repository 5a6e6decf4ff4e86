"""Throughput benchmark of the training step: JAX scan chunks against a caller-supplied
reference loop (the PyTorch one, see `experiments/benchmark.py`), on the same machine.

Timing is done in interleaved windows (A B A B ...) so that drift in the machine's load
affects every contender alike; each contender reports the median and spread of its
windows. The "floor" is the step time the training step's GEMM FLOPs would take at the
machine's large-GEMM float64 rate, both for the dense step and for the FLOPs left when FC1
skips the zero pixels (`skip_zero_pixels`). Optional contenders: the other pixel-skipping modes,
a seeds x weight-decays sweep, and variants of the compiled chunk (scan unroll, XLA options
set per executable). This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from importlib import metadata
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from grokjax.train.config import TrainConfig, split_fields
from grokjax.train.model import N_IN, N_OUT
from grokjax.train.schedule import chunk_lengths, eval_steps
from grokjax.train.engine import batch_perm, init_state, make_data, make_evaluate, make_train_chunk, pixel_columns

# A window runs `steps` updates and returns the seconds it took (synchronised).
WindowFn = Callable[[int], float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """Knobs of one benchmark run."""

    windows: int = 7  # timed windows per contender (after one warm-up window each)
    window_steps: int = 300  # training steps per window (per seed for the vmapped rows)
    seeds: tuple[int, ...] = (1, 2, 4, 8)  # seed counts for the vmapped aggregate rows
    gemm_n: int = 2048  # side of the square float64 GEMM that measures the machine's rate
    gemm_reps: int = 5
    eval_reps: int = 10  # repeats of the full evaluation (1k train + 10k test forward)
    target_steps: int = 10_000_000  # run length for the evaluation-schedule cost (Table 3)
    modes: tuple[str, ...] = ()  # other skip_zero_pixels modes timed as 1-seed contenders
    sweep: tuple[int, tuple[float, ...]] | None = None  # (seeds, weight decays): one vmapped sweep contender
    # (name, scan unroll, XLA options for this executable only) per variant of the 1-seed chunk
    variants: tuple[tuple[str, int, tuple[tuple[str, str], ...]], ...] = ()


def flops_per_step(cfg: TrainConfig, n_in: int = N_IN) -> dict[str, int]:
    """Matrix-multiply FLOPs of one training step (2 per multiply-add).

    Forward: the three layers. Weight gradients: the same count again. Input gradients: only
    layers 2 and 3 (the input's gradient is never needed). `n_in`: the input columns FC1
    multiplies (fewer when it skips zero pixels).
    """
    b, w = cfg.batch, cfg.width
    fwd = 2 * b * (n_in * w + w * w + w * N_OUT)
    dx = 2 * b * (w * w + w * N_OUT)
    return {"forward": fwd, "weight_grads": fwd, "input_grads": dx, "total": 2 * fwd + dx}


def window_stats(seconds: list[float], steps: int) -> dict[str, float]:
    """steps/s of each window -> median, min, max, quartiles and the raw samples."""
    rates = sorted(steps / s for s in seconds)
    q = statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else [rates[0]] * 3
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "q1": q[0], "q3": q[2],
            "samples": [round(r, 2) for r in rates]}


def gemm_rates(n: int, reps: int) -> dict[str, float]:
    """Median GFLOP/s of an n x n float64 matmul in numpy and in jnp (on JAX's device)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n)), rng.random((n, n))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)

    def rate(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 2 * n**3 / statistics.median(ts) / 1e9

    return {"numpy_gflops": rate(lambda: a @ b), "jax_gflops": rate(lambda: mm(ja, jb).block_until_ready())}


def machine_info() -> dict[str, object]:
    """CPU model, usable cores, load average, JAX device and package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for p in ("jax", "jaxlib", "optax", "flax", "numpy", "torch"):
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "jax_device": f"{dev.platform}:{dev.device_kind}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions}


def _label(key: str) -> str:
    """A contender's table name from its key in the results (`jax_seeds8`, `variant_nocmdbuf`, ...)."""
    if key.startswith("variant_"):
        return f"variant {key[len('variant_'):]}"
    if key.startswith("jax_seeds"):
        return f"JAX vmap {key[len('jax_seeds'):]} seeds (aggregate)"
    if key == "jax_sweep":
        return "JAX sweep"
    if key.startswith("jax_"):
        return f"JAX 1 seed, skip_zero_pixels={key[len('jax_'):]}"
    return key


def make_jax_window(cfg: TrainConfig, data, n_seeds: int | None, *, wds: tuple[float, ...] | None = None,
                    unroll: int = 1, compiler_options: dict | None = None) -> WindowFn:
    """A window function running the project's scan chunk (vmapped over `n_seeds` if set).

    With `wds`, a sweep: every (weight decay, seed) pair of `wds` and range(n_seeds), vmapped.
    """
    seeds = None if n_seeds is None else list(range(n_seeds)) * (len(wds) if wds else 1)
    per_wd = None if not wds else [w for w in wds for _ in range(n_seeds)]
    chunk = make_train_chunk(cfg, None if seeds is None else len(seeds), wds=per_wd, unroll=unroll,
                             compiler_options=compiler_options)
    if seeds is None:
        state, perm_np = init_state(cfg), batch_perm(cfg)
    else:
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_state(cfg, s) for s in seeds])
        perm_np = np.stack([batch_perm(cfg, s) for s in seeds])
    perm = jnp.asarray(perm_np)
    cols = pixel_columns(cfg, perm_np, data.x_train)
    cols = None if cols is None else jnp.asarray(cols)
    box = [state]

    def window(steps: int) -> float:
        t = time.perf_counter()
        box[0], loss = chunk(box[0], perm, data, steps, cols)
        loss.block_until_ready()
        return time.perf_counter() - t

    return window


def time_interleaved(contenders: dict[str, tuple[WindowFn, int]], windows: int, steps: int,
                     log: Callable[[str], None] = lambda s: None) -> dict[str, list[float]]:
    """One warm-up window each, then `windows` rounds of one window per contender in turn.

    Args:
        contenders: name -> (window function, steps multiplier for the log line).
    Returns:
        name -> list of window seconds. A contender whose warm-up fails (an XLA option this
        backend rejects, say) is dropped and its error is returned under the key `failed`.
    """
    failed: dict[str, str] = {}
    for name, (fn, _) in list(contenders.items()):
        try:
            fn(steps)  # compile and warm up
        except Exception as e:  # noqa: BLE001  (reported in the table, never silently)
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            log(f"{name} failed: {failed[name]}")
            contenders = {k: v for k, v in contenders.items() if k != name}
            continue
        log(f"warmed up {name}")
    out: dict = {k: [] for k in contenders}
    for r in range(windows):
        for name, (fn, mult) in contenders.items():
            out[name].append(fn(steps))
        log(f"round {r + 1}/{windows}: " + ", ".join(
            f"{k} {steps * m / out[k][-1]:.0f}" for k, (_, m) in contenders.items()) + " steps/s")
    out["failed"] = failed
    return out


def time_evaluation(cfg: TrainConfig, data, reps: int) -> float:
    """Median seconds of one full evaluation, including the copy of metrics and params to the host."""
    evaluate = make_evaluate()
    params = init_state(cfg).params
    jax.device_get(evaluate(params, data))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.device_get((evaluate(params, data), params))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def schedule_cost(cfg: TrainConfig, n_steps: int, eval_s: float, call_overhead_s: float,
                  steps_per_s: float) -> dict[str, float]:
    """What the evaluation schedule adds to an `n_steps` run: evaluations and the extra chunk calls.

    Checkpoint writes (params at every evaluation) are not included.
    """
    steps = eval_steps(n_steps, cfg.log_points_per_decade, cfg.authors_grid)
    calls, lengths, t = 0, set(), 0
    for e in steps:
        parts = chunk_lengths(int(e) - t, cfg.chunk)
        calls += len(parts)
        lengths |= set(parts)
        t = int(e)
    extra_calls = calls - -(-n_steps // cfg.chunk)
    added = len(steps) * eval_s + max(extra_calls, 0) * call_overhead_s
    train_s = n_steps / steps_per_s
    return {"n_steps": n_steps, "n_evals": len(steps), "n_chunk_calls": calls,
            "n_compiled_lengths": len(lengths), "eval_s": eval_s, "call_overhead_s": call_overhead_s,
            "added_s": added, "train_s": train_s, "added_fraction": added / train_s}


def time_call_overhead(cfg: TrainConfig, data, reps: int = 20) -> float:
    """Seconds one chunk call costs beyond its steps: t(length 2) - t(length 1), medians."""
    chunk = make_train_chunk(cfg)
    state, perm = init_state(cfg), jnp.asarray(batch_perm(cfg))
    cols = pixel_columns(cfg, batch_perm(cfg), data.x_train)
    cols = None if cols is None else jnp.asarray(cols)
    med = {}
    for n in (1, 2):
        ts = []
        for i in range(reps + 1):
            t = time.perf_counter()
            state, loss = chunk(state, perm, data, n, cols)
            loss.block_until_ready()
            if i:
                ts.append(time.perf_counter() - t)
        med[n] = statistics.median(ts)
    return max(2 * med[1] - med[2], 0.0)


def run_benchmark(cfg: TrainConfig, mnist: dict, opts: BenchOptions,
                  reference: Callable[[int], WindowFn] | None = None, reference_name: str = "torch",
                  log: Callable[[str], None] = print) -> dict:
    """Runs the whole benchmark and returns a JSON-ready dict (see `format_table`).

    Args:
        reference: builds the reference loop's window function (None: JAX only).
    """
    info = machine_info()
    data = make_data(cfg, mnist)
    flops = flops_per_step(cfg)
    # What FC1 multiplies in each mode: the padded per-batch width, the subset's nonzero pixels, all.
    widths = {m: (N_IN if m == "off" else
                  int(pixel_columns(dataclasses.replace(cfg, skip_zero_pixels=m), batch_perm(cfg), data.x_train)
                      .shape[-1])) for m in ("off", "subset", "batch")}
    reduced = flops_per_step(cfg, widths[cfg.skip_zero_pixels])
    log(f"load {info['loadavg']}; GEMM rate (n={opts.gemm_n}) ...")
    gemm = gemm_rates(opts.gemm_n, opts.gemm_reps)
    # On CPU the faster of numpy (OpenBLAS) and XLA sets the floor; on an accelerator, XLA's rate there.
    on_cpu = jax.default_backend() == "cpu"
    gemm["rate_gflops"] = max(gemm["numpy_gflops"], gemm["jax_gflops"]) if on_cpu else gemm["jax_gflops"]
    gemm["floor_steps_per_s"] = gemm["rate_gflops"] * 1e9 / flops["total"]
    gemm["floor_reduced_steps_per_s"] = gemm["rate_gflops"] * 1e9 / reduced["total"]

    contenders: dict[str, tuple[WindowFn, int]] = {"jax": (make_jax_window(cfg, data, None), 1)}
    if reference is not None:
        contenders[reference_name] = (reference(opts.window_steps), 1)
    for m in opts.modes:
        contenders[f"jax_{m}"] = (make_jax_window(dataclasses.replace(cfg, skip_zero_pixels=m), data, None), 1)
    for k in opts.seeds:
        contenders[f"jax_seeds{k}"] = (make_jax_window(cfg, data, k), k)
    if opts.sweep is not None:
        k, wds = opts.sweep
        contenders["jax_sweep"] = (make_jax_window(cfg, data, k, wds=tuple(wds)), k * len(wds))
    for name, unroll, options in opts.variants:
        fields, xla = split_fields(options)
        contenders[f"variant_{name}"] = (make_jax_window(dataclasses.replace(cfg, **fields), data, None,
                                                         unroll=unroll, compiler_options=xla or None), 1)
    times = time_interleaved(contenders, opts.windows, opts.window_steps, log)
    failed = times.pop("failed")

    def rate(name, mult=1):
        return window_stats(times[name], opts.window_steps * mult) if name in times else None

    jax_s = window_stats(times["jax"], opts.window_steps)
    ref_s = rate(reference_name) if reference is not None else None
    seeds = {str(k): rate(f"jax_seeds{k}", k) for k in opts.seeds}
    log("timing evaluation and chunk-call overhead ...")
    eval_s = time_evaluation(cfg, data, opts.eval_reps)
    overhead = time_call_overhead(cfg, data)
    return {
        "machine": info, "load_after": [round(x, 2) for x in os.getloadavg()],
        "options": dataclasses.asdict(opts), "flops_per_step": flops, "gemm": gemm,
        "skip_zero_pixels": cfg.skip_zero_pixels, "fc1_weight_grad": cfg.fc1_weight_grad,
        "fc1_columns": widths, "flops_per_step_reduced": reduced,
        "jax": jax_s, "reference": ref_s, "reference_name": reference_name,
        "ratio": jax_s["median"] / ref_s["median"] if ref_s else None,
        "floor_fraction": jax_s["median"] / gemm["floor_steps_per_s"],
        "floor_fraction_reduced": jax_s["median"] / gemm["floor_reduced_steps_per_s"],
        "modes": {m: rate(f"jax_{m}") for m in opts.modes},
        "seeds": seeds,
        "sweep": None if opts.sweep is None else {"seeds": opts.sweep[0], "wds": list(opts.sweep[1]),
                                                  "rate": rate("jax_sweep", opts.sweep[0] * len(opts.sweep[1]))},
        "variants": {name: rate(f"variant_{name}") for name, _, _ in opts.variants},
        "failed": failed,
        "eval": {"seconds": eval_s, "n_test": int(data.x_test.shape[0]), "n_train": int(data.x_train.shape[0])},
        "schedule": schedule_cost(cfg, opts.target_steps, eval_s, overhead, jax_s["median"]),
    }


def format_table(res: dict) -> str:
    """The human-readable report of `run_benchmark`'s result."""
    m, g, f = res["machine"], res["gemm"], res["flops_per_step"]

    def row(name, s, extra=""):
        return (f"| {name:<30} | {s['median']:9.1f} | {s['min']:8.1f}-{s['max']:<8.1f} | "
                f"{s['q1']:7.1f}-{s['q3']:<7.1f} | {extra}")

    lines = [
        f"machine: {m['cpu']}, {len(m['affinity'])} usable of {m['cpu_count']} cores, JAX on {m['jax_device']}",
        f"load average (1/5/15 min): before {m['loadavg']}, after {res['load_after']}",
        f"versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"XLA_FLAGS: {m['xla_flags'] or '(none)'}",
        f"windows: {res['options']['windows']} x {res['options']['window_steps']} steps, interleaved, "
        "after one warm-up window each",
        "",
        f"| {'contender':<30} | {'steps/s':>9} | {'min-max':^17} | {'IQR':^15} | note",
        f"|{'-' * 32}|{'-' * 11}|{'-' * 19}|{'-' * 17}|------",
        row("JAX scan chunk (1 seed)", res["jax"], f"{res['skip_zero_pixels']}, {res['fc1_weight_grad']}: "
            f"{res['floor_fraction']:.0%} of "
            f"dense floor, {res['floor_fraction_reduced']:.0%} of reduced"),
    ]
    if res["reference"]:
        lines.append(row(f"{res['reference_name']} eager (reference)", res["reference"],
                         f"JAX/{res['reference_name']} = {res['ratio']:.2f}x"))
    one = res["jax"]["median"]
    extra = [(f"JAX 1 seed, skip_zero_pixels={m}", s, "") for m, s in res["modes"].items()]
    extra += [(f"JAX vmap {k} seeds (aggregate)", s, "") for k, s in res["seeds"].items()]
    if res["sweep"]:
        sw = res["sweep"]
        extra.append((f"JAX sweep {sw['seeds']} seeds x {len(sw['wds'])} WD (aggr.)", sw["rate"], ""))
    extra += [(f"variant {k}", s, "") for k, s in res["variants"].items()]
    for name, s, _ in extra:
        if s is not None:
            lines.append(row(name, s, f"{s['median'] / one:.2f}x one seed"))
    for name, why in res["failed"].items():
        lines.append(f"| {_label(name):<30} | failed: {why}")
    sch = res["schedule"]
    fr = res["flops_per_step_reduced"]
    lines += [
        "",
        f"FLOPs per step: {f['total'] / 1e6:.1f} M (forward {f['forward'] / 1e6:.1f} M, weight grads "
        f"{f['weight_grads'] / 1e6:.1f} M, input grads {f['input_grads'] / 1e6:.1f} M)",
        f"FC1 input columns: off {res['fc1_columns']['off']}, subset {res['fc1_columns']['subset']}, batch (padded) "
        f"{res['fc1_columns']['batch']}; this run ({res['skip_zero_pixels']}): {fr['total'] / 1e6:.1f} M FLOPs per step",
        f"float64 GEMM rate (n={res['options']['gemm_n']}): numpy {g['numpy_gflops']:.1f}, jnp {g['jax_gflops']:.1f} "
        f"GFLOP/s -> floor {g['floor_steps_per_s']:.0f} steps/s dense ({1e3 / g['floor_steps_per_s']:.2f} ms/step), "
        f"{g['floor_reduced_steps_per_s']:.0f} steps/s for the reduced FLOPs",
        f"evaluation (1k train + {res['eval']['n_test'] // 1000}k test forward, metrics and params to host): "
        f"{res['eval']['seconds'] * 1e3:.1f} ms",
        f"evaluation schedule for {sch['n_steps']:.0e} steps: {sch['n_evals']} evaluations, "
        f"{sch['n_chunk_calls']} chunk calls ({sch['n_compiled_lengths']} lengths), call overhead "
        f"{sch['call_overhead_s'] * 1e6:.0f} us -> adds {sch['added_s']:.1f} s to {sch['train_s'] / 3600:.2f} h "
        f"of training ({sch['added_fraction']:.2%})",
    ]
    return "\n".join(lines)
