"""Command line of `experiments/run.py`: one flag per `TrainConfig` field, then `runner.run`.

`--task` picks the MNIST MLP (the default) or the modular-addition transformer; a flag of the
other task is refused in one line (exit code 2) by `TrainConfig` itself."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from grokjax.cliutil import OneLineParser
from grokjax.train import supervise
from grokjax.train.config import ConfigError, TrainConfig, parse_duration, parse_steps
from grokjax.train.stops import StopRequest, block_signals, signal_for_test

DEFAULT_INIT_TIMEOUT = 300  # seconds (grokjax.train.distributed.DEFAULT_INIT_TIMEOUT, jax.distributed's default)

# Exit codes of run.py (documented in the README); over several processes also
# supervise.EXIT_PEER_LOST (76): another process of the sweep was lost.
EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PAUSED = 0, 1, 2, 3, 75


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _int(text: str) -> int:
    try:
        return parse_steps(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("steps", "value")) from None


def _finite_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _text(text: str) -> str:
    """A text flag's value as given. argparse passes a text default through the flag's type:
    this keeps a task-dependent default marked as one (`grokjax.train.config.is_default`)."""
    return text


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected non-negative seeds, got {text!r}")
    return seeds


def _wds(text: str) -> list[float]:
    parts = [s.strip() for s in text.split(",")]
    try:
        wds = [float(s) for s in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated weight decays like 0,0.01, got {text!r}") from None
    return wds  # their values are checked once, with the sweep (`grokjax.train.sweep.make_sweep`)


def build_parser() -> argparse.ArgumentParser:
    """One flag per config field (same name, dashes allowed for underscores; help from its metadata)."""
    p = OneLineParser(prog="run.py", description="Train the paper's MNIST MLP or, with --task modadd, its one-layer "
                                                   "transformer on modular addition (grokking / anti-grokking).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        hint = hints[f.name]
        kw = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if f.name == "time_limit":
            p.add_argument(*flags, type=_duration, metavar="DURATION", **kw)
        elif hint is bool:
            p.add_argument(*flags, type=_bool, nargs="?", const=True, metavar="BOOL", **kw)
        elif f.name == "steps" or hint is int:
            p.add_argument(*flags, type=_int, **kw)
        elif hint is float:
            p.add_argument(*flags, type=_finite_float, **kw)
        else:
            p.add_argument(*flags, type=_text, **kw)
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="seeds trained at once (vmapped), e.g. 0,1,2, into <out>/seed<k>; overrides --seed")
    p.add_argument("--wds", type=_wds, default=None,
                   help="weight decays, e.g. 0,0.01, swept with --seeds (or --seed) into <out>/wd<wd>_seed<k>")
    g = p.add_argument_group("a sweep over several processes and hosts (jax.distributed; see the README)")
    g.add_argument("--coordinator_address", "--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's coordinator (with --num_processes and --process_id)")
    g.add_argument("--num_processes", "--num-processes", type=_int, default=None, metavar="N",
                   help="number of processes in the sweep")
    g.add_argument("--process_id", "--process-id", type=_int, default=None, metavar="I",
                   help="this process's index, 0..N-1")
    g.add_argument("--distributed", choices=("auto",), default=None,
                   help="auto: JAX detects the processes (SLURM, Open MPI)")
    g.add_argument("--initialization_timeout", "--initialization-timeout", type=_duration,
                   default=DEFAULT_INIT_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for all processes to join (or 5m, ...); then exit 1")
    p.add_argument("--export", nargs=2, metavar=("RUN", "FOLDER"), default=None,
                   help="copy RUN's compact record into the new FOLDER and exit (--out FOLDER continues)")
    p.add_argument("--export_params", "--export-params", type=_int, default=0, metavar="PER_DECADE",
                   help="with --export: params checkpoints a decade to copy too (0: none)")
    p.add_argument("--export_params_at", "--export-params-at", type=_export_steps, default=(),
                   metavar="ITEMS", help="with --export: also the params checkpoints nearest these steps, "
                   "comma-separated (e.g. 1e6); 'phases': the phase steps and the final step")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parses flags, trains, and maps failures to exit codes (2: bad input, 3: diverged)."""
    args = vars(build_parser().parse_args(argv))
    seeds, wds = args.pop("seeds"), args.pop("wds")
    export, per_decade, params_at = args.pop("export"), args.pop("export_params"), args.pop("export_params_at")
    join = {k: args.pop(k) for k in ("coordinator_address", "num_processes", "process_id", "distributed",
                                      "initialization_timeout")}
    if export is not None:
        return _export(*export, per_decade, params_at)
    if per_decade or params_at:
        print("run.py: error: --export_params and --export_params_at go with --export RUN FOLDER", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        cfg = TrainConfig(**args)
        distributed = _check_join(join)
    except ConfigError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    group = None
    if distributed and not supervise.is_child():
        # the training runs in a child process, so that losing another process of the sweep
        # ends this one with a line and exit 76 rather than JAX's abort (grokjax.train.supervise)
        return supervise.supervise(sys.argv[1:] if argv is None else list(argv), join["process_id"])
    # held until this process exits: a signal at any moment has one outcome (grokjax.train.stops)
    stop = StopRequest(cfg.time_limit)
    if distributed:
        from grokjax.train.distributed import initialize  # noqa: PLC0415  (before any other JAX use)

        # jax.distributed installs its own SIGTERM handler (its preemption notice) as it joins: the
        # signals stay held (blocked since the child started) until `stop` replaces it below
        block_signals()
        group = initialize(coordinator_address=join["coordinator_address"], num_processes=join["num_processes"],
                           process_id=join["process_id"], timeout=join["initialization_timeout"])
    with stop:
        signal_for_test("start")
        code = _train(cfg, seeds, wds, group, stop)
        if group is not None and code is not None:
            code = group.finish(code)  # every process closes before any leaves (see Group.finish)
    if code == EXIT_OK and stop.reason is not None:
        print(f"run.py: {stop.reason} came after the last step was dispatched: the run is complete", file=sys.stderr)
    return EXIT_ERROR if code is None else code


def _train(cfg, seeds, wds, group, stop) -> int | None:
    """Runs `runner.run` and says how it ended; returns the exit code, or None when another
    process of the sweep failed (the group's last exchange cannot happen then)."""
    from grokjax.ckpt import CheckpointError  # noqa: PLC0415  (heavy imports after validation)
    from grokjax.data import DataError  # noqa: PLC0415
    from grokjax.train.distributed import PeerError  # noqa: PLC0415
    from grokjax.train.runner import NonFiniteError, Paused, run  # noqa: PLC0415

    try:
        dirs = run(cfg, seeds=seeds, wds=wds, group=group, stop=stop)
    except (ConfigError, DataError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"run.py: diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Paused as e:
        print(str(e), file=sys.stderr)
        return EXIT_PAUSED
    except CheckpointError as e:
        print(f"run.py: checkpoint error: {e}", file=sys.stderr)
        return 1
    except PeerError as e:
        print(f"run.py: error: {e}; rerun the same command in every process to resume", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        print("run.py: interrupted; rerun the same command to resume from the last full state", file=sys.stderr)
        return 130
    for d in dirs:
        print(f"run written to {d}", file=sys.stderr)
    return EXIT_OK


def _check_join(join: dict) -> bool:
    """Whether to join a sweep over several processes; refuses incomplete flags (ConfigError)."""
    explicit = [k for k in ("coordinator_address", "num_processes", "process_id") if join[k] is not None]
    if join["distributed"] is None and not explicit:
        return False
    if join["distributed"] is None and len(explicit) < 3:
        raise ConfigError("--coordinator_address, --num_processes and --process_id go together "
                          "(or pass --distributed auto on a cluster JAX detects)")
    n, i = join["num_processes"], join["process_id"]
    if n is not None and n < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {n}")
    if n is not None and i is not None and not 0 <= i < n:
        raise ConfigError(f"--process_id must be in 0..{n - 1}, got {i}")
    address = join["coordinator_address"]
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"--coordinator_address must look like HOST:PORT, got {address!r}")
    return True


def _export_steps(text: str) -> tuple:
    """--export_params_at: comma-separated steps (1e6 notation) and/or 'phases'."""
    from grokjax.train.export import PHASES_ITEM  # noqa: PLC0415

    items = []
    for item in (t.strip() for t in text.split(",")):
        try:
            items.append(item if item == PHASES_ITEM else parse_steps(item))
        except ConfigError:
            raise argparse.ArgumentTypeError(f"expected steps (like 1e6) or '{PHASES_ITEM}', got {item!r}") from None
    return tuple(items)


def _export(run_dir: str, folder: str, per_decade: int, params_at: tuple = ()) -> int:
    from grokjax.analysis.phases import PHASE_STEP_TOLERANCE_DECADES  # noqa: PLC0415
    from grokjax.train.export import export_run, params_at_steps  # noqa: PLC0415

    try:
        chosen, missing = params_at_steps(run_dir, params_at) if params_at else ({}, {})
        out = export_run(run_dir, folder, params_per_decade=per_decade, params_at=chosen)
    except ConfigError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if chosen:
        print("params checkpoints exported at " + ", ".join(f"{s:,} ({label})" for s, label in chosen.items()),
              file=sys.stderr)
    for label, step in missing.items():
        print(f"WARNING: no params checkpoint within {PHASE_STEP_TOLERANCE_DECADES} decade of {label} "
              f"({step:,}): none exported for it", file=sys.stderr)
    print(f"exported {run_dir} to {out}", file=sys.stderr)
    return EXIT_OK
