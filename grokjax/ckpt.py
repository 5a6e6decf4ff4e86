"""Orbax checkpoints of a run: params at every evaluation step (kept forever) and rotating
full training states for resume. The only module that imports Orbax.

Orbax is imported on first use, not with this module: it brings JAX, about 2.4 of the 4.4
CPU-seconds that importing the analysis pipeline takes otherwise (measured with `python -X
importtime`), and the analysis of a monitor record, the monitor's record process and the step
listings below never read a checkpoint.

Layout under a run directory:
  checkpoints/params/<step>/   {fc1,fc2,fc3} x {kernel (in,out), bias}, float64 numpy
  checkpoints/state/<step>/    params, opt_state, step, key, batch_perm (the latest 2 kept)
The analysis reads `checkpoints/params` with `list_param_steps` and `load_params`, which need
neither JAX models nor the training code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

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
                   read_only: bool = False, process_local: bool = False) -> ocp.CheckpointManager:
    """The params manager: saves exactly at `steps` (evaluation steps, 0 and N), keeps all.

    `process_local`: in a sweep over several processes, only this process writes the directory.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415  (on first use: see the module docstring)
    from orbax.checkpoint import checkpoint_managers as cm  # noqa: PLC0415

    directory = Path(run_dir).absolute() / PARAMS_DIR
    extra, handlers = _process_local(directory) if process_local else ({"create": not read_only}, {})
    policy = cm.SpecificStepsPolicy(steps=frozenset(int(s) for s in steps)) if steps is not None else None
    opts = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, preservation_policy=cm.LatestN(n=None),  # n=None: keep all
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # drop half-written saves left by a killed run
        **{"enable_async_checkpointing": not read_only, **extra},
    )
    return ocp.CheckpointManager(directory, options=opts, **handlers)


def _process_local(directory: Path) -> tuple[dict, dict]:
    """Manager options and handlers for a run directory that only this process of a
    multi-process sweep writes.

    Orbax otherwise synchronises every save with all the processes, which here write other
    directories, and lets process 0 alone finish each save.
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)  # Orbax cannot create it for one process
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ({"create": False, "multiprocessing_options": mp, "enable_async_checkpointing": False},
            {"item_handlers": _process_local_handler(mp)})


@functools.cache
def _process_local_numpy_handler_class() -> type:
    """`_ProcessLocalNumpyHandler`, defined on first use (it subclasses an Orbax class)."""
    from orbax.checkpoint import multihost, type_handlers  # noqa: PLC0415

    class _ProcessLocalNumpyHandler(type_handlers.NumpyHandler):
        """Orbax's numpy handler, writing in whichever process saves (Orbax's writes only in process 0).

        `_background_serialize` is Orbax 0.12.8's, without its `process_index() == 0` condition.
        It overrides a private method and calls the private `_open_and_write`, which Orbax may
        change in any release: hence the exact orbax-checkpoint pin in pyproject.toml. The write
        spec comes from the public `get_json_tspec_write` (the same spec the private builder
        gives); the OCDBT subfolder is this process's, as Orbax names it.
        """

        async def _background_serialize(self, values, infos, args=None):
            writes = []
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                ocdbt = info.is_ocdbt_checkpoint
                tspec = type_handlers.get_json_tspec_write(
                    info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                    process_index=(self._override_ocdbt_process_id or multihost.process_index()) if ocdbt else None,
                    metadata_key=self._metadata_key, arg=arg)
                writes.append(self._open_and_write(value, tspec, info.ts_context))
            await asyncio.gather(*writes)

    return _ProcessLocalNumpyHandler


def _process_local_handler(mp) -> ocp.StandardCheckpointHandler:
    """A StandardCheckpointHandler whose numpy arrays this process writes itself (into its
    OCDBT subfolder, which the handler, primary in this process, merges as usual)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from orbax.checkpoint import type_handlers  # noqa: PLC0415

    numpy_handler = _process_local_numpy_handler_class()
    handler = ocp.StandardCheckpointHandler(multiprocessing_options=mp)
    registry = type_handlers.create_type_handler_registry(*[  # Orbax's defaults, numpy's replaced
        (ty, numpy_handler() if ty is np.ndarray else type_handlers.get_type_handler(ty))
        for ty in type_handlers.supported_types()])
    # No public way to give a StandardCheckpointHandler a registry: its private `_impl` is set
    # (see the pin in pyproject.toml).
    handler._impl = ocp.PyTreeCheckpointHandler(multiprocessing_options=mp,  # noqa: SLF001
                                                type_handler_registry=registry)
    return handler


def state_manager(run_dir: str | os.PathLike, final_step: int, min_interval_secs: float, *,
                  process_local: bool = False) -> ocp.CheckpointManager:
    """The resume manager: at most one full state per `min_interval_secs`, always the final
    step, and only the latest FULL_STATES_KEPT kept. `process_local`: see `params_manager`."""
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from orbax.checkpoint import checkpoint_managers as cm  # noqa: PLC0415

    policy = cm.AnySavePolicy(policies=[
        cm.ContinuousCheckpointingPolicy(minimum_interval_secs=int(min_interval_secs)),
        cm.SpecificStepsPolicy(steps=frozenset([int(final_step)])),
    ])
    directory = Path(run_dir).absolute() / STATE_DIR
    extra, handlers = _process_local(directory) if process_local else ({}, {})
    opts = ocp.CheckpointManagerOptions(save_decision_policy=policy,
                                        preservation_policy=cm.LatestN(n=FULL_STATES_KEPT),
                                        cleanup_tmp_directories=True, **extra)
    return ocp.CheckpointManager(directory, options=opts, **handlers)


def save_params(mngr: ocp.CheckpointManager, step: int, params: Any) -> bool:
    """Saves params (as float numpy) at `step` unless that step is already on disk.

    Returns:
        True if a save was started.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    if step in mngr.all_steps():
        return False
    return bool(mngr.save(int(step), args=ocp.args.StandardSave(_to_numpy(params))))


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict, *, force: bool = False) -> bool:
    """Saves a full training state if the manager's policy (or `force`) says so."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

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
    import orbax.checkpoint as ocp  # noqa: PLC0415

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
    """Reads one params checkpoint as {layer: {kernel, bias}} float numpy arrays (the
    transformer's tree, --task modadd, as it was saved: some of its leaves are top-level arrays).

    Raises:
        CheckpointError: the checkpoint is missing or unreadable.
    """
    path = Path(run_dir).absolute() / PARAMS_DIR / str(int(step))
    if not path.is_dir():
        raise CheckpointError(f"no params checkpoint at {path}")
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path / "default")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"unreadable params checkpoint {path}: {type(e).__name__}: {e}") from e
    return _numpy_tree(tree)


def _numpy_tree(tree):
    """A restored tree with numpy arrays as leaves (nested dicts kept)."""
    if isinstance(tree, dict):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)
