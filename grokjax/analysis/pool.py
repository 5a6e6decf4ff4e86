"""The analysis' worker pool: checkpoint tasks in spawned processes, with a progress bar.

Contract of `run_tasks`: `fn(*task)` runs once per task in one of `workers` spawned processes,
each started with `initializer(*initargs)` and with one BLAS thread; the results come back in
completion order (callers sort them); on any failure the tasks not yet started are cancelled
and the error is raised in the caller.

Checkpoints are never restored in the calling process: Orbax's threads stay out of it (after a
failed restore they print asyncio tracebacks at random moments), and workers are spawned, not
forked (the caller may hold JAX threads), so a script calling this needs the usual
`if __name__ == "__main__":` guard. A worker's initializer calls `quiet_worker_stderr` first.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import io
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from grokjax.cliutil import THREAD_VARS


class _QuietLoopErrors(io.TextIOBase):
    """A worker's stderr without the "RuntimeError: Event loop is closed" tracebacks that
    Orbax's threads print, at any later moment, after a failed restore (the failure itself
    is returned as a result). Everything else is passed through, line by line."""

    _END = "RuntimeError: Event loop is closed"

    def __init__(self, stream) -> None:
        super().__init__()
        self._stream = stream
        self._partial: dict[int, str] = {}  # per writing thread: tracebacks of two threads interleave
        self._held: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        me = threading.get_ident()
        with self._lock:
            *lines, self._partial[me] = (self._partial.get(me, "") + text).split("\n")
            held = self._held.setdefault(me, [])
            for line in lines:
                if held or line.startswith("Traceback (most recent call last):"):
                    held.append(line)
                    if not line.startswith((" ", "Traceback")):  # the exception line ends the block
                        if line.strip() != self._END:
                            self._stream.write("\n".join(held) + "\n")
                        held.clear()
                else:
                    self._stream.write(line + "\n")
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _exit_without_finalizing() -> None:
    """Ends a worker at exit before the interpreter is finalized: finalization puts the
    original stderr back, and Orbax's threads may still print tracebacks then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def quiet_worker_stderr() -> None:
    """In a worker process that restores checkpoints: Orbax's late "Event loop is closed"
    tracebacks never reach the user (failures are returned as results), whether they are
    printed or logged, and the process ends without interpreter finalization."""
    original = sys.stderr
    sys.stderr = _QuietLoopErrors(original)
    # Handlers made at import (absl's, through Orbax) hold the original stream: asyncio's
    # "Exception in callback ... Event loop is closed" reaches them through logging.
    for logger in (logging.getLogger(), logging.getLogger("absl")):
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (original, sys.__stderr__):
                h.setStream(sys.stderr)
    atexit.register(_exit_without_finalizing)


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Sets the BLAS thread variables to 1 for spawned workers (restored afterwards)."""
    old = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gather(pool: cf.Executor, fn, tasks, bar) -> list:
    """`fn(*task)` for each task in the pool, results in completion order, the bar advanced per
    result; on any failure the tasks not yet started are cancelled and the error is raised."""
    futures = [pool.submit(fn, *t) for t in tasks]
    results = []
    try:
        for fut in cf.as_completed(futures):
            results.append(fut.result())
            bar.update()
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return results


def run_tasks(fn: Callable, tasks: Sequence[tuple], *, initializer: Callable, initargs: tuple, workers: int,
              desc: str, progress_bar: bool) -> list:
    """Runs `fn(*task)` for every task in at most `workers` spawned processes (see the module
    docstring); returns the results in completion order ([] without tasks)."""
    if not tasks:
        return []
    bar = tqdm(total=len(tasks), unit="ckpt", desc=desc, disable=not progress_bar, dynamic_ncols=True,
               mininterval=1.0)
    ctx = multiprocessing.get_context("spawn")
    try:
        # BLAS reads its thread count from the environment at import, so the variables are
        # set before the workers start.
        with _single_threaded_blas(), cf.ProcessPoolExecutor(
                max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=initializer,
                initargs=initargs) as pool:
            return gather(pool, fn, tasks, bar)
    finally:
        bar.close()
