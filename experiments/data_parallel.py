"""One run's batch split over two CPU devices in one process, against today's single run.

Each of `--devices` CPU devices (forced with XLA_FLAGS) takes its share of the batch's rows;
the per-device gradients of the summed squared error are added (`lax.psum`), divided by
batch x 10 (torch's MSELoss mean) and AdamW runs on every device alike. The same mathematics
as the default step (skip_zero_pixels=subset, fc1_weight_grad=pretransposed, the fixed batch
cycle); the sums are split differently, so the bits differ (the relative difference after 300
steps is printed).

    python experiments/data_parallel.py                  # 5 interleaved windows of 4096 steps
    python experiments/data_parallel.py --windows 9 --json out.json

The two contenders run in turn, one window each per round, so that load drift hits both alike.
This is a measurement only: it is not a training setting (it did not beat the single run; see
BENCHMARKS.md, "Several runs at once").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4096, help="steps a window")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.devices < 2 or 200 % a.devices:
        ap.error("--devices must be >= 2 and divide the batch (200)")
    if a.json is not None and a.json.exists():
        ap.error(f"{a.json} exists; not overwriting it")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415  (after XLA_FLAGS)
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jax.sharding import Mesh, PartitionSpec as P  # noqa: PLC0415

    jax.config.update("jax_enable_x64", True)
    from grokjax.bench.core import machine_info  # noqa: PLC0415
    from grokjax.data import load_mnist  # noqa: PLC0415
    from grokjax.train import engine  # noqa: PLC0415
    from grokjax.train.config import TrainConfig  # noqa: PLC0415
    from grokjax.train.model import N_IN, forward_narrow  # noqa: PLC0415

    cfg = TrainConfig(wd=0.0, steps=10**4)
    data = engine.make_data(cfg, load_mnist())
    perm = jnp.asarray(engine.batch_perm(cfg))
    cols = engine.pixel_columns(cfg, perm, data.x_train)
    mesh = Mesh(np.array(jax.devices()[:a.devices]), ("d",))
    opt, nb = engine.make_optimizer(cfg), cfg.batches_per_epoch

    def body_of(xb, yb, xbt):
        def body(s, _):
            b = s.step % nb
            x, y, xt = (jax.lax.dynamic_index_in_dim(v, b, keepdims=False) for v in (xb, yb, xbt))
            loss, g = jax.value_and_grad(lambda p: jnp.sum((forward_narrow(p, x, xt) - y) ** 2)
                                         / (cfg.batch * 10))(s.params)
            g, loss = jax.lax.psum(g, "d"), jax.lax.psum(loss, "d")
            upd, opt_state = opt.update(g, s.opt_state, s.params)
            return engine.TrainState(optax.apply_updates(s.params, upd), opt_state, s.step + 1, s.key), loss
        return body

    @functools.partial(jax.jit, static_argnames="length", donate_argnums=0)
    def dp_chunk(state, perm, data, length, cols):
        xb, yb = engine.fixed_batches(cfg, perm, data)
        xb = jnp.take(xb, cols, axis=2)
        xbt = jnp.swapaxes(xb, -1, -2)
        keep = jnp.ones(N_IN, bool).at[cols].set(False)
        rest = jnp.nonzero(keep, size=N_IN - cols.shape[0])[0].astype(cols.dtype)

        def scan(ns, xb, yb, xbt):
            s, losses = jax.lax.scan(body_of(xb, yb, xbt), ns, None, length=length)
            return s, losses[-1]

        f = jax.shard_map(scan, mesh=mesh, in_specs=(P(), P(None, "d", None), P(None, "d", None), P(None, None, "d")),
                          out_specs=(P(), P()), check_vma=False)
        inner, loss = f(engine._narrow_state(state, cols, rest), xb, yb, xbt)
        return engine._widen_state(inner, state, cols, rest), loss

    fns = {"single": engine.make_train_chunk(cfg), f"dp{a.devices}": dp_chunk}
    states = {}
    for k, f in fns.items():  # warm-up window (compilation)
        states[k], _ = f(engine.init_state(cfg), perm, data, a.steps, cols)
        jax.block_until_ready(states[k])
    rates = {k: [] for k in fns}
    load0 = os.getloadavg()[0]
    for _ in range(a.windows):
        for k, f in fns.items():
            t = time.perf_counter()
            states[k], _ = f(states[k], perm, data, a.steps, cols)
            jax.block_until_ready(states[k])
            rates[k].append(a.steps / (time.perf_counter() - t))
    ref = engine.run_steps(cfg, engine.init_state(cfg), perm, data, 300)
    dp, _ = dp_chunk(engine.init_state(cfg), perm, data, 300, cols)
    rel = max(float(jnp.max(jnp.abs(x - y) / jnp.maximum(jnp.abs(x), 1e-300)))
              for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(dp.params)))
    out = {"machine": machine_info(), "loadavg_before": round(load0, 2), "windows": a.windows, "steps": a.steps,
           "steps_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
           "median": {k: round(float(np.median(v)), 1) for k, v in rates.items()},
           "max_rel_param_difference_after_300_steps": rel}
    for k, v in rates.items():
        print(f"{k:7s} median {np.median(v):6.1f} steps/s  (min {min(v):.1f}, max {max(v):.1f})")
    print(f"load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after; params after 300 steps differ "
          f"by at most {rel:.2e} relative")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
