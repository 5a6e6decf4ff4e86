"""The run loop: run directory, evaluation schedule, checkpoints, resume, progress bar.

`run(cfg)` trains one seed; `run(cfg, seeds=[0, 1, 2, 3])` trains several seeds at once,
vmapped inside the same scan (sharded over devices when there are several), each seed
writing its own run directory `<out>/seed<k>` in the usual format.

A run directory holds config.json (every resolved knob, package versions, device),
metrics.jsonl (one JSON object per evaluated step) and checkpoints/ (see `grokjax.ckpt`).
Rerunning the same command resumes from the latest full state and ends bitwise identical
to an uninterrupted run; a different config on the same directory is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from grokjax import ckpt
from grokjax.config import ConfigError, TrainConfig
from grokjax.data import load_mnist
from grokjax.schedule import authors_log_steps, chunk_lengths, eval_steps
from grokjax.train import TrainState, batch_perm, init_state, make_data, make_evaluate, make_train_chunk

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grokjax")


class NonFiniteError(RuntimeError):
    """The loss or the parameter norm stopped being finite."""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _device_info() -> dict[str, object]:
    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs),
            "cpu": platform.processor() or platform.machine(), "host": platform.node()}


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Creates or checks the run directory and writes config.json for a new run.

    Raises:
        ConfigError: the directory is unwritable, holds something else, or holds a run with a
            different config (unless `cfg.overwrite`).
    """
    d = Path(cfg.out)
    cfg_file = d / CONFIG_FILE
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d} exists and is not a directory")
    if cfg_file.exists() and not cfg.overwrite:
        try:
            old = json.loads(cfg_file.read_text())["config"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{cfg_file} is unreadable ({e}); pass --overwrite to start over") from None
        new = cfg.science()
        diff = sorted(k for k in set(old) | set(new) if k in new and old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ConfigError(f"{d} holds a run with a different config ({shown}); "
                              "use another --out or pass --overwrite")
        return d
    if d.exists() and any(d.iterdir()):
        # --overwrite only ever deletes a grokjax run directory, never an arbitrary folder.
        if not (cfg.overwrite and cfg_file.exists()):
            raise ConfigError(f"{d} is not empty and holds no {CONFIG_FILE}; use another --out")
        shutil.rmtree(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        payload = {"config": cfg.to_dict(), "versions": _versions(), "device": _device_info(),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "notes": _science_notes(cfg)}
        tmp = d / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, cfg_file)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {d}: {e.strerror or e}") from None
    return d


def _science_notes(cfg: TrainConfig) -> list[str]:
    """Deviations from the paper's protocol, recorded in config.json and printed loudly."""
    notes = []
    if cfg.dtype != "float64":
        notes.append(f"dtype={cfg.dtype}: NOT the paper's float64 (speed study only)")
    if cfg.reshuffle:
        notes.append("reshuffle=True: Omnigrok's per-epoch reshuffle, NOT the authors' fixed 5-batch cycle")
    return notes


def _read_records(path: Path, before_step: int) -> list[dict]:
    """Complete JSON lines of metrics.jsonl with step < before_step (a torn last line is dropped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", math.inf) < before_step:
            out.append(rec)
    return out


def _rewrite_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


class _Replica:
    """One seed's run directory, checkpoint managers and metrics file."""

    def __init__(self, cfg: TrainConfig, steps: np.ndarray):
        self.cfg = cfg
        self.dir = prepare_run_dir(cfg)
        self.params = ckpt.params_manager(self.dir, set(int(s) for s in steps) | {0})
        self.state = ckpt.state_manager(self.dir, cfg.steps, cfg.full_save_secs)
        self.metrics_path = self.dir / METRICS_FILE
        self.metrics = None

    def open_metrics(self, start: int, offset: float) -> float:
        """Drops records at or after `start` (they are recomputed) and opens for append.

        Returns:
            The wall-clock seconds already spent before `start` (from the kept records).
        """
        kept = _read_records(self.metrics_path, start)
        _rewrite_records(self.metrics_path, kept)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        return kept[-1].get("time/wall", offset) if kept else offset

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        for m in (self.params, self.state):
            m.wait_until_finished()
            m.close()


def _state_tree(state: TrainState, perm: np.ndarray, wall: float) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": state.key,
            "batch_perm": perm, "wall": np.float64(wall)}


def _restore(replicas: list[_Replica], templates: list[dict]) -> tuple[int, list[dict]] | None:
    """Newest step at which every replica has a readable full state (None: start fresh)."""
    common = set.intersection(*(set(r.state.all_steps()) for r in replicas))
    for step in sorted(common, reverse=True):
        states = []
        for r, tmpl in zip(replicas, templates):
            got = ckpt.restore_latest_state(r.state, tmpl, steps=[step])
            if got is None:
                break
            states.append(got[1])
        else:
            return step, states
    return None


def _mesh_sharding(n_seeds: int):
    """Shards the seed axis over as many devices as divide n_seeds; None for one device."""
    devs = jax.devices()
    k = max(d for d in range(1, len(devs) + 1) if n_seeds % d == 0)
    if k == 1:
        return None, None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    mesh = Mesh(np.array(devs[:k]), ("seed",))
    return NamedSharding(mesh, P("seed")), NamedSharding(mesh, P())


def run(cfg: TrainConfig, *, seeds: list[int] | None = None, mnist: dict | None = None,
        crash_after_chunks: int | None = None) -> list[Path]:
    """Trains (or resumes) a run and returns its run directories.

    Args:
        cfg: the configuration. With `seeds`, `cfg.out` is the parent directory.
        seeds: several seeds trained together (vmapped); each gets `<out>/seed<k>`.
        mnist: preloaded MNIST arrays (default: `load_mnist`).
        crash_after_chunks: testing aid: raise after dispatching this many chunks, without
            flushing anything, to simulate a crash in the middle of a segment.

    Raises:
        ConfigError: bad run directory. NonFiniteError: the run diverged (checkpoints kept).
    """
    multi = seeds is not None
    if multi:
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct, got {seeds}")
        cfgs = [dataclasses.replace(cfg, seed=s, out=str(Path(cfg.out) / f"seed{s}")) for s in seeds]
    else:
        cfgs = [cfg]
    for note in _science_notes(cfg):
        print(f"WARNING: {note}; recorded in config.json", file=sys.stderr)
    steps = eval_steps(cfg.steps, cfg.log_points_per_decade, cfg.authors_grid)
    authors = set(int(s) for s in authors_log_steps(cfg.steps))
    replicas = [_Replica(c, steps) for c in cfgs]
    try:
        return _train(cfg, cfgs, replicas, steps, authors, multi, mnist, crash_after_chunks)
    finally:
        for r in replicas:
            r.close()


def _train(cfg, cfgs, replicas, steps, authors, multi, mnist, crash_after_chunks):
    mnist = mnist if mnist is not None else load_mnist(cfg.cache_dir, cfg.idx_dir)
    data = make_data(cfg, mnist)
    perms = [batch_perm(c) for c in cfgs]
    fresh = [init_state(c) for c in cfgs]
    templates = [_state_tree(s, p, 0.0) for s, p in zip(fresh, perms)]
    restored = _restore(replicas, templates)
    start, walls = 0, [0.0] * len(cfgs)
    if restored is not None:
        start, trees = restored
        for tree, p in zip(trees, perms):
            if not np.array_equal(np.asarray(tree["batch_perm"]), p):
                raise ConfigError("the saved batch order differs from this config's; use --overwrite")
        fresh = [TrainState(t["params"], t["opt_state"], jnp.asarray(t["step"]), jnp.asarray(t["key"]))
                 for t in trees]
        walls = [float(t["wall"]) for t in trees]
    walls = [r.open_metrics(start, w) for r, w in zip(replicas, walls)]

    n = len(cfgs) if multi else None
    chunk = make_train_chunk(cfg, n)
    evaluate = make_evaluate(n)
    if multi:
        state = jax.tree.map(lambda *xs: jnp.stack(xs), *fresh)
        perm = jnp.asarray(np.stack(perms))
        sharded, replicated = _mesh_sharding(len(cfgs))
        if sharded is not None:
            state, perm = jax.device_put((state, perm), sharded)
            data = jax.device_put(data, replicated)
            n_dev = sharded.mesh.devices.size
            print(f"sharding {len(cfgs)} seeds over {n_dev} devices ({len(cfgs) // n_dev} per device)",
                  file=sys.stderr)
    else:
        state, perm = jax.tree.map(jnp.asarray, fresh[0]), jnp.asarray(perms[0])

    t0 = time.perf_counter() - walls[0]
    t, dispatched = start, 0
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, disable=not cfg.progress,
               desc=Path(cfg.out).name, smoothing=0.05)
    try:
        for e in (int(s) for s in steps if s >= start):
            pending = None
            for length in chunk_lengths(e - t, cfg.chunk):
                state, last_loss = chunk(state, perm, data, length)
                dispatched += 1
                if crash_after_chunks is not None and dispatched >= crash_after_chunks:
                    raise RuntimeError("simulated crash")
                if pending is not None:
                    _check_probe(*pending, replicas[0])  # blocks on the previous chunk only
                    bar.update(pending[2])
                pending = (last_loss, t + length, length)
                t += length
            if pending is not None:
                _check_probe(*pending, replicas[0])
                bar.update(pending[2])
            metrics = jax.device_get(evaluate(state.params, data))
            params_host = jax.device_get(state.params)
            wall = time.perf_counter() - t0
            full = jax.device_get(state) if _wants_full_state(replicas[0], e) else None
            for i, r in enumerate(replicas):
                pick = (lambda a, i=i: a[i]) if multi else (lambda a: a)
                rec = {"step": e, **{k: float(pick(v)) for k, v in metrics.items()},
                       "time/wall": round(wall, 3), "schedule/authors": e in authors}
                if not all(math.isfinite(rec[k]) for k in ("train/loss", "test/loss", "params/l2")):
                    r.metrics.write(json.dumps(rec) + "\n")
                    r.metrics.flush()
                    raise NonFiniteError(_nonfinite_message(f"at step {e}", r))
                r.metrics.write(json.dumps(rec) + "\n")
                r.metrics.flush()
                ckpt.save_params(r.params, e, jax.tree.map(pick, params_host))
                if full is not None:
                    tree = _state_tree(jax.tree.map(pick, full), perms[i], wall)
                    if not ckpt.save_state(r.state, e, tree, force=True):
                        raise ckpt.CheckpointError(f"full-state save at step {e} was refused")
            bar.set_postfix_str(f"test acc {np.mean(np.atleast_1d(metrics['test/acc'])):.4f}", refresh=False)
    finally:
        bar.close()
    return [r.dir for r in replicas]


def _wants_full_state(replica: _Replica, step: int) -> bool:
    """One save decision for all replicas, from the first replica's state-manager policy."""
    return bool(replica.state.should_save(step))


def _check_probe(last_loss, step: int, length: int, replica: _Replica) -> None:
    if not np.all(np.isfinite(np.asarray(last_loss))):
        raise NonFiniteError(_nonfinite_message(f"within steps {step - length}..{step}", replica))


def _nonfinite_message(where: str, r: _Replica) -> str:
    r.params.wait_until_finished()
    good = ckpt.list_param_steps(r.dir)
    last = good[-1] if good else None
    return f"non-finite loss or norm {where} in {r.dir}; last good checkpoint: step {last}"
