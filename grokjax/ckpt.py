"""Orbax checkpoints of a run: params at every evaluation step (kept forever) and rotating
full training states for resume. The only module that imports Orbax.

Layout under a run directory:
  checkpoints/params/<step>/   {fc1,fc2,fc3} x {kernel (in,out), bias}, float64 numpy
  checkpoints/state/<step>/    params, opt_state, step, key, batch_perm (the latest 2 kept)
The analysis reads `checkpoints/params` with `list_param_steps` and `load_params`, which need
neither JAX models nor the training code.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm
from orbax.checkpoint._src.checkpoint_managers.preservation_policy import PreserveAll

PARAMS_DIR = "checkpoints/params"
STATE_DIR = "checkpoints/state"
FULL_STATES_KEPT = 2

# Orbax logs every save at INFO and warns about its own internals; keep the terminal quiet.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def _to_numpy(tree: Any) -> Any:
    import jax  # noqa: PLC0415  (only the savers need JAX)

    return jax.tree.map(lambda a: np.array(a), jax.device_get(tree))


def params_manager(run_dir: str | os.PathLike, steps: Iterable[int] | None = None, *,
                   read_only: bool = False) -> ocp.CheckpointManager:
    """The params manager: saves exactly at `steps` (evaluation steps, 0 and N), keeps all."""
    policy = cm.SpecificStepsPolicy(steps=frozenset(int(s) for s in steps)) if steps is not None else None
    opts = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, preservation_policy=PreserveAll(), read_only=read_only,
        create=not read_only, enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,  # drop half-written saves left by a killed run
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / PARAMS_DIR, options=opts)


def state_manager(run_dir: str | os.PathLike, final_step: int, min_interval_secs: float) -> ocp.CheckpointManager:
    """The resume manager: at most one full state per `min_interval_secs`, always the final
    step, and only the latest FULL_STATES_KEPT kept."""
    policy = cm.AnySavePolicy(policies=[
        cm.ContinuousCheckpointingPolicy(minimum_interval_secs=int(min_interval_secs)),
        cm.SpecificStepsPolicy(steps=frozenset([int(final_step)])),
    ])
    opts = ocp.CheckpointManagerOptions(save_decision_policy=policy,
                                        preservation_policy=cm.LatestN(n=FULL_STATES_KEPT),
                                        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / STATE_DIR, options=opts)


def save_params(mngr: ocp.CheckpointManager, step: int, params: Any) -> bool:
    """Saves params (as float numpy) at `step` unless that step is already on disk.

    Returns:
        True if a save was started.
    """
    if step in mngr.all_steps():
        return False
    return bool(mngr.save(int(step), args=ocp.args.StandardSave(_to_numpy(params))))


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict, *, force: bool = False) -> bool:
    """Saves a full training state if the manager's policy (or `force`) says so."""
    if step in mngr.all_steps():
        return False
    return bool(mngr.save(int(step), args=ocp.args.StandardSave(_to_numpy(state)), force=force))


def restore_latest_state(mngr: ocp.CheckpointManager, template: dict,
                         steps: Iterable[int] | None = None) -> tuple[int, dict] | None:
    """Restores the newest readable full state (among `steps`, default all), falling back to older ones.

    A truncated or unreadable latest checkpoint (say, a torn write) is reported and deleted,
    so that the step can be saved again.

    Returns:
        (step, state) or None when there is no readable state.
    """
    import jax  # noqa: PLC0415

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(mngr.all_steps() if steps is None else steps, reverse=True):
        try:
            state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: try the previous one)
            warnings.warn(f"full state at step {step} is unreadable ({type(e).__name__}: {e}); "
                          "deleting it and falling back to the previous one", stacklevel=2)
            mngr.delete(step)
            continue
        return step, state
    return None


def list_state_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps that have a finished full-state checkpoint, ascending (Orbax's temporary folders excluded)."""
    d = Path(run_dir) / STATE_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def list_param_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps that have a saved params checkpoint, ascending."""
    d = Path(run_dir) / PARAMS_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def load_params(run_dir: str | os.PathLike, step: int) -> dict[str, dict[str, np.ndarray]]:
    """Reads one params checkpoint as {layer: {kernel, bias}} float numpy arrays.

    Raises:
        CheckpointError: the checkpoint is missing or unreadable.
    """
    path = Path(run_dir).absolute() / PARAMS_DIR / str(int(step))
    if not path.is_dir():
        raise CheckpointError(f"no params checkpoint at {path}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path / "default")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"unreadable params checkpoint {path}: {type(e).__name__}: {e}") from e
    return {layer: {k: np.asarray(v) for k, v in leaves.items()} for layer, leaves in tree.items()}
