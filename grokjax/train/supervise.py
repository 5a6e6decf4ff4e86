"""A process of a multi-process sweep, run under a small supervising parent.

When a process of a sweep dies (kill -9, a node gone), jax.distributed's client in every other
process ends that process itself, from a C++ thread: one `Terminating process because the JAX
distributed service detected fatal errors` log line, sometimes a stack trace, and an abort. No
Python code runs there (jaxlib's client does take a `missed_heartbeat_callback`, but a Python
callable given there terminates the process with `std::bad_cast` when it is called).

So `run.py` with the sweep flags runs the training in a child process (this same command, with
`GROKJAX_SWEEP_CHILD=1`) and stays beside it as its parent:

- it passes SIGTERM and SIGINT on to the child, from its own start to its end (the child holds
  them until its handler is in place; the outcome is the child's, see grokjax.train.stops);
- it forwards the child's stderr, leaving out the C++ log lines of the coordination service and
  their continuation lines;
- when the child ends with that fatal line, it prints one line naming the lost process and
  exits with EXIT_PEER_LOST (76); otherwise it exits with the child's code (128 + N for a
  child killed by signal N);
- the child is killed when the parent dies (PR_SET_PDEATHSIG), so killing the parent, as a
  scheduler does, leaves nothing behind.

The child's run directories are as its last common full state left them; rerunning the same
command in every process resumes every replica from there.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading

from grokjax.train.stops import SIGNALS, block_signals, signal_for_test

CHILD_ENV = "GROKJAX_SWEEP_CHILD"
EXIT_PEER_LOST = 76
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
# glog lines (E1203 20:47:05.792632   19929 file.cc:289] ...) and what follows them
_GLOG = re.compile(r"^[EFWI]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
# the trainer's own stderr lines (anything else after a glog line continues JAX's message)
_OURS = re.compile(r"^(run\.py:|sharding |resuming |already complete|paused |WARNING|NOTE|monitor:|SIG[A-Z]+ received|"
                   r"run written|early warning|\S+: step [\d,]+/)")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def _child_setup() -> None:  # runs in the child between fork and exec
    block_signals()  # held until the child's StopRequest is in place (grokjax.train.stops)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child outlives a killed parent, as an unsupervised process would


def lost_process(text: str, me: int | None) -> str:
    """Which process the coordination service's error text names: 'process N', or the
    coordinator when this process lost the service itself."""
    listed = re.search(r"tasks are unhealthy[^:]*:\s*((?:\d+[\s,]*)+)", text)  # "...heartbeats):\n1\n"
    ids = re.findall(r"\d+", listed.group(1)) if listed else []
    ids += [m.group(1) for m in re.finditer(r"task[:/ ]?\s*(\d+)", text)]
    for i in ids:
        if me is None or int(i) != me:
            return f"process {i}"
    return "process 0 (the coordinator)" if me != 0 else "another process"


def supervise(argv: list[str], process_id: int | None) -> int:
    """Runs `run.py argv` as a child process and returns the exit code (see the module docstring)."""
    cmd = [sys.executable, "-c", "import sys; from grokjax.train.cli import main; sys.exit(main())", *argv]
    # a signal is passed on to the child, also one arriving before the child exists (the child
    # holds it until its handler is in place) or after it ended (then the child's code stands)
    received: list[int] = []
    children: list[subprocess.Popen] = []

    def pass_on(sig, _frame) -> None:
        received.append(sig)
        for c in children:
            c.send_signal(sig)

    old = {sig: signal.signal(sig, pass_on) for sig in SIGNALS}
    try:
        return _supervise(cmd, process_id, received, children)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _supervise(cmd: list[str], process_id: int | None, received: list[int], children: list) -> int:
    child = subprocess.Popen(cmd, env={**os.environ, CHILD_ENV: "1"}, stderr=subprocess.PIPE, text=True,
                             errors="replace", preexec_fn=_child_setup)  # noqa: PLW1509
    children.append(child)
    for sig in received:  # arrived while the child was being started
        child.send_signal(sig)
    signal_for_test("launch")
    fatal: list[str] = []

    jax_text: list[str] = []  # the coordination service's report (left out of the output)

    def forward() -> None:
        skipping = False
        for line in child.stderr:
            if fatal or _FATAL in line:
                fatal.append(line)  # the child is ending: the rest is JAX's report
                continue
            if _GLOG.match(line):
                skipping = True
            elif skipping and not _OURS.match(line):
                pass  # a continuation line of JAX's log message (it may span several lines)
            else:
                skipping = False
                sys.stderr.write(line)
                sys.stderr.flush()
                continue
            jax_text.append(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    rc = child.wait()
    reader.join(timeout=10)
    if fatal:
        who = lost_process("".join(jax_text[-200:] + fatal), process_id)
        print(f"run.py: error: lost {who} of the sweep; stopping. Rerun the same command in every process to "
              f"resume from the last common full state (exit {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    return rc if rc >= 0 else 128 - rc
