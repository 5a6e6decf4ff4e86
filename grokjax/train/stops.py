"""When a training process stops early: its time limit, or a SIGTERM/SIGINT at any moment.

`StopRequest` is held for the whole life of a `run.py` process: the CLI installs it as soon as
its flags are valid and keeps it until it exits. A sweep's training child starts with SIGTERM
and SIGINT blocked and installs it once it has joined the other processes (jax.distributed
installs a SIGTERM handler of its own as it joins, which this one replaces): a signal arriving
before is held until then. So every signal has one outcome, decided by the moment it arrives:

- **before the run's last chunk is dispatched** (starting, joining, restoring, compiling, any
  chunk but the last, any evaluation but the last): the run pauses at its next chunk boundary,
  the step it started from when no chunk has run yet, with a full state on disk, and exits 75
  ("paused"). Over several processes the stop is agreed at each chunk boundary, so every
  process pauses at the same step.
- **after it** (the last chunk, the final evaluation, the monitors' drain, closing the run
  directories, the processes' last exchange): nothing is left to pause, so the run finishes its
  closing work and exits 0 ("done"), its record complete.
- **a second signal**, at any moment, stops the process at once (the default action); the next
  start resumes from the last full state on disk.

The time limit is read at each chunk boundary only, so it has the same two outcomes.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Test-only: send this process a SIGTERM at the named moment (see `signal_for_test`).
TEST_SIGNAL_ENV = "GROKJAX_TEST_SIGNAL_AT"
MOMENTS = ("launch", "start", "final_evaluation", "closing")


class StopRequest:
    """The stop decision of one process: the time limit (seconds from its creation; 0: none),
    or the first SIGTERM/SIGINT. Use it as a context manager (the handlers are installed on
    entry, in the main thread only, and restored on exit)."""

    def __init__(self, time_limit: float = 0.0):
        self.reason: str | None = None
        self.finishing = False  # the run's last chunk is dispatched: a stop no longer pauses it
        self.started = time.monotonic()
        self.deadline = self.started + time_limit if time_limit > 0 else math.inf
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a signal held since the start arrives now
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.reason is None:
            self.reason = name
            what = ("the run has dispatched its last step: finishing it and its closing work" if self.finishing
                    else "pausing at the next chunk boundary")
            print(f"\n{name} received: {what} (send it again to stop at once)", file=sys.stderr, flush=True)
            return
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))
        os.kill(os.getpid(), signum)

    def finish(self) -> None:
        """The run's last chunk is dispatched: from now on a signal or the time limit ends it as done."""
        self.finishing = True

    def should_stop(self) -> str | None:
        """The reason to pause at this chunk boundary (the first signal, or the time limit), or None."""
        if self.reason is None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        return self.reason

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def block_signals() -> None:
    """Holds SIGTERM and SIGINT until a `StopRequest` is entered (called in a sweep's child
    between fork and exec: the blocked mask survives exec)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def signal_for_test(moment: str) -> None:
    """Test-only hook: sends this process a SIGTERM when $GROKJAX_TEST_SIGNAL_AT names `moment`,
    so that a test can place a signal exactly. The moments: `launch` (a sweep's supervising
    parent, just after starting its child: the child holds the signal it passes on), `start`
    (the CLI, its StopRequest just installed), `final_evaluation` (the run's last evaluation),
    `closing` (before the monitors' drain and the run directories' closing)."""
    if os.environ.get(TEST_SIGNAL_ENV) == moment:
        os.kill(os.getpid(), signal.SIGTERM)
