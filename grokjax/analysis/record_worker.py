"""The in-loop monitor's record process: `python -m grokjax.analysis.record_worker NICE`.

Started by `grokjax.analysis.monitor._RecordWorker`, never by hand. It raises its own nice value
to NICE, then answers requests read from stdin, one pickled `(kind, args)` tuple at a time, with
one pickled `("ok", value)` or `("error", "Type: message")` on stdout:

  ("pid", ())           its process id
  ("priority", ())      its nice value
  ("params", (run_dir, step)) the params checkpoint at `step`, read by `grokjax.ckpt.load_params`
                        here: a plain single-process read, whatever the trainer is part of
                        (in a sweep over several processes, Orbax in the trainer would make it a
                        collective, which fails once another process has finished)
  ("record", (params, step, run_seed, key, inputs))
                        `monitor.compute_record(params, ...)` with the inputs named `key`;
                        `inputs` is sent with the first request of a key (None afterwards),
                        and the reply is None when the key is unknown (so it is sent again).

It keeps the inputs of the last INPUTS_KEPT keys and ends when stdin closes.
"""

from __future__ import annotations

import os
import pickle
import sys

INPUTS_KEPT = 16


def _set_nice(nice: int) -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (AttributeError, OSError) as e:
        print(f"monitor: the record process runs at the training's CPU priority ({e})", file=sys.stderr, flush=True)


def serve(nice: int, stdin=None, stdout=None) -> int:
    """Answers requests until stdin closes (see the module docstring)."""
    inp = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries the replies; anything printed goes to stderr
    _set_nice(nice)
    from grokjax.analysis.monitor import compute_record  # noqa: PLC0415  (after the nice value is set)

    inputs: dict[str, dict] = {}
    while True:
        try:
            kind, args = pickle.load(inp)
        except EOFError:
            return 0
        try:
            if kind == "pid":
                value = os.getpid()
            elif kind == "priority":
                value = os.getpriority(os.PRIO_PROCESS, 0)
            elif kind == "params":
                from grokjax.ckpt import load_params  # noqa: PLC0415  (Orbax only when a backfill asks)

                value = load_params(*args)
            elif kind == "record":
                params, step, run_seed, key, given = args
                if given is not None:
                    inputs.pop(key, None)
                    inputs[key] = given
                    while len(inputs) > INPUTS_KEPT:
                        inputs.pop(next(iter(inputs)))
                value = (compute_record(params, step=step, run_seed=run_seed, inputs=inputs[key])
                         if key in inputs else None)
            else:
                raise ValueError(f"unknown request {kind!r}")
            reply = ("ok", value)
        except Exception as e:  # noqa: BLE001  (the monitor reports it; the process goes on)
            reply = ("error", f"{type(e).__name__}: {e}")
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 19))
