"""One sweep across processes and hosts: joining `jax.distributed`, where each replica lives,
and the few decisions every process takes together.

The replicas of a sweep never communicate, so the only traffic between processes is a handful
of short strings through the coordinator's key-value store: the configuration hash (checked
before training), the stop decision at each chunk boundary, the full-state decision at each
evaluation step, the resume step, and a failure message when one process stops with an error.
Every process makes these calls in the same order, so the n-th exchange of each process is the
same question.

How a sweep ends: each process closes its own replicas first (metrics, checkpoints, and its
monitors, whose backfill reads params checkpoints in the monitor's own record process, a plain
single-process read), then all of them meet in one last exchange (`Group.finish`) and leave
jax.distributed together, so no process and not the coordinator goes away while another still
works. A process that stopped with an error tells the others (`Group.abort`); they stop at their
next exchange with `PeerError` and exit 1 without that last meeting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading

import jax
import numpy as np

from grokjax.train.config import ConfigError

# Seconds a process waits for all the others to join (jax.distributed's `initialization_timeout`).
DEFAULT_INIT_TIMEOUT = 300
# Fields that may differ between processes: paths of per-host caches and the progress output.
LOCAL_FIELDS = ("cache_dir", "idx_dir", "progress")
_PREFIX = "grokjax"
_ABORT_KEY = f"{_PREFIX}/abort"
_POLL_MS = 1000


class PeerError(RuntimeError):
    """Another process of the sweep stopped with an error; this one stops too."""


class Group:
    """The processes of one sweep, and their collective decisions through the key-value store."""

    def __init__(self, client, index: int, count: int):
        self.client, self.index, self.count = client, index, count
        self._tag = 0

    def gather(self, value: str) -> list[str]:
        """Every process's `value` for this exchange, in process order (blocks until all gave one)."""
        tag, self._tag = self._tag, self._tag + 1
        self.client.key_value_set(f"{_PREFIX}/{tag}/{self.index}", value)
        out = [self._get(f"{_PREFIX}/{tag}/{p}") for p in range(self.count)]
        if tag >= 2:  # every process has read exchange tag-2 once it has written tag-1
            try:
                self.client.key_value_delete(f"{_PREFIX}/{tag - 2}/{self.index}")
            except Exception:  # noqa: BLE001, S110  (a leftover key is harmless)
                pass
        return out

    def _get(self, key: str) -> str:
        while True:
            try:
                return self.client.blocking_key_value_get(key, _POLL_MS)
            except Exception as e:  # noqa: BLE001  (JAX raises its runtime error)
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise PeerError(f"lost the coordinator ({str(e).splitlines()[0]})") from None
            try:  # the wait timed out: look for a failed peer, then wait again
                message = self.client.key_value_try_get(_ABORT_KEY)
            except Exception as e:  # noqa: BLE001
                if "NOT_FOUND" in str(e):
                    continue
                raise PeerError(f"lost the coordinator ({str(e).splitlines()[0]})") from None
            raise PeerError(message)

    def any(self, flag: bool) -> bool:
        """True in every process when it is true in any."""
        return any(v == "1" for v in self.gather("1" if flag else "0"))

    def stop_reason(self, reason: str | None) -> str | None:
        """The first process's stop reason (time limit, SIGTERM, ...), or None when none stops."""
        for p, r in enumerate(self.gather(reason or "")):
            if r:
                return r if p == self.index else f"{r} in process {p}"
        return None

    def common_steps(self, steps: set[int]) -> set[int]:
        """The steps present in every process's set."""
        sets = [set(json.loads(v)) for v in self.gather(json.dumps(sorted(int(s) for s in steps)))]
        return set.intersection(*sets)

    def check_same(self, digest: str) -> None:
        """Raises ConfigError in every process when the processes were given different configurations."""
        digests = self.gather(digest)
        odd = [p for p, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise ConfigError(f"process {odd[0]} was given a different configuration than process 0 "
                              f"(hash {digests[odd[0]][:12]} vs {digests[0][:12]}); start every process "
                              "with the same flags")

    def finish(self, code: int) -> int:
        """The sweep's last exchange: waits until every process has finished its closing work
        (run directories closed, monitors drained), then leaves jax.distributed with all the
        others, so that no process, and not the coordinator, goes away while another still works.

        Every process calls it once, with the exit code it is about to return. Returns the code
        to exit with: `code`, or 1 when another process ended with an error and this one did not
        (each process still prints its own outcome). When a process stopped with an error
        (`abort`), there is no common ending: `code` is returned at once.
        """
        try:
            codes = [int(c) for c in self.gather(str(int(code)))]
        except PeerError:
            return code  # a process stopped with an error (said by it): no common ending to wait for
        jax.distributed.shutdown()
        others = [c for p, c in enumerate(codes) if p != self.index and c not in (0, 75)]
        return 1 if code in (0, 75) and others else code

    def abort(self, message: str) -> None:
        """Tells the other processes that this one stops with an error (they raise PeerError)."""
        try:
            self.client.key_value_set(_ABORT_KEY, f"process {self.index} stopped: {message}")
        except Exception:  # noqa: BLE001, S110  (another process already reported a failure)
            pass


class Alone(Group):
    """The group of one: a process training alone takes the same decisions through the same
    calls as every process of a sweep, with nobody to wait for (the single-process run)."""

    def __init__(self):
        super().__init__(None, 0, 1)

    def gather(self, value: str) -> list[str]:
        return [value]

    def abort(self, message: str) -> None:
        pass

    def finish(self, code: int) -> int:
        return code


def config_digest(config: dict, seeds, wds) -> str:
    """Hash of everything that must be the same in every process."""
    d = {k: v for k, v in config.items() if k not in LOCAL_FIELDS}
    text = json.dumps({"config": d, "seeds": seeds, "wds": wds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def initialize(*, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               timeout: float = DEFAULT_INIT_TIMEOUT) -> Group:
    """Joins the sweep's processes (`jax.distributed.initialize`) before any other JAX use.

    With no address, JAX detects the cluster (SLURM, Open MPI). A process that cannot join all
    the others within `timeout` seconds prints one line and exits with code 1 (JAX itself would
    abort with a stack trace).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator_address or "the coordinator JAX detected"

    def give_up():
        print(f"run.py: error: could not join the other processes at {where} within {timeout:g} s "
              "(--initialization_timeout); check the address and that every process was started",
              file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        # a lost process is noticed within the same order of time as a missing one at the start
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(timeout) + 60,
                                   heartbeat_timeout_seconds=max(10, int(timeout)))
    finally:
        timer.cancel()
    from jax._src.distributed import global_state  # noqa: PLC0415  (the client multihost_utils uses)

    return Group(global_state.client, jax.process_index(), jax.process_count())


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a sweep's replicas live: this process's are lo..hi-1 of the run's; `sharded` is the
    replica axis' sharding over the global mesh, `replicated` that of data every device holds."""

    group: Group
    lo: int
    hi: int
    sharded: object
    replicated: object


def layout(n: int, group: Group) -> Layout:
    """Where the n replicas live: the mesh devices and this process's replicas.

    The mesh takes the same number of devices from every process (as many as divide the
    replicas evenly), ordered by process, so process p holds replicas p*n/P .. (p+1)*n/P - 1.

    Raises:
        ConfigError: the replicas cannot be split evenly over the processes.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    count, local = group.count, len(jax.local_devices())
    if n % count:
        raise ConfigError(f"a sweep over {count} processes needs a number of replicas divisible by {count}, "
                          f"got {n}")
    per_process = max(k for k in range(1, min(local, n // count) + 1) if (n // count) % k == 0)
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    devs = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    mesh = Mesh(np.array(devs), ("seed",))
    lo = group.index * (n // count)
    return Layout(group, lo, lo + n // count, NamedSharding(mesh, P("seed")), NamedSharding(mesh, P()))


def to_global(tree, sharding):
    """A global array from host arrays every process holds in full (only local rows are read)."""
    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def rows_to_global(tree, sharding, lo: int, n: int):
    """A global array of `n` rows, replica-sharded, from this process's rows `lo`.. (host arrays)."""
    def put(a):
        a = np.asarray(a)

        def rows(idx):
            r = idx[0]
            return a[(slice((r.start or 0) - lo, (n if r.stop is None else r.stop) - lo), *idx[1:])]

        return jax.make_array_from_callback((n, *a.shape[1:]), sharding, rows)

    return jax.tree.map(put, tree)


def local_rows(x) -> np.ndarray:
    """The rows of a replica-sharded (or replicated) array that live in this process, as numpy."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        start = s.index[0].start if s.index and s.index[0].start is not None else 0
        shards.setdefault(start, s.data)
    if len(shards) == 1:
        return np.asarray(next(iter(shards.values())))
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def fetch_local(tree):
    """`jax.device_get` for a sweep over processes: this process's rows of every leaf."""
    return jax.tree.map(local_rows, tree)
