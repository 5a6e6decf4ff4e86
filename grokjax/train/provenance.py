"""Provenance: what a run records about the software and the machine it runs on.

config.json holds `versions()` and `device_info()` from the run's start; every segment's
start or resume event holds `segment_fields()` (the CPU model, the host and XLA's CPU thread
count), because a chaotic float64 trajectory drifts in the low bits on another CPU model or
with another thread count (docs/machines.md).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grokjax")


def versions() -> dict[str, str]:
    """Python's and the `PACKAGES`' versions, for config.json."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def xla_cpu_threads() -> int | None:
    """Threads of XLA's CPU intra-op pool in this process, counted; None off CPU or where unknown.

    XLA sizes the pool from `PJRT_NPROC` (or `NPROC`) when set, else from the cores the process
    may use, and never below its number of CPU devices. Eigen's GEMM blocking depends on that
    size, so the float64 sums, and with them a chaotic trajectory's low bits, depend on it: a
    process with more forced devices than cores sums differently from one with fewer. Setting
    the same `PJRT_NPROC` everywhere makes layouts and hosts with different core counts agree.
    """
    devs = jax.local_devices()
    if devs[0].platform != "cpu":
        return None
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm", encoding="utf-8") as f:
                n += f.read().startswith("tf_XLAEigen")
        except OSError:
            continue  # the thread ended meanwhile
    return n or None


def cpu_model() -> str:
    """The host CPU as /proc/cpuinfo names it: vendor, family, model, stepping and model name.

    Runs are chaotic: the same command on another CPU model drifts in the low bits after a few
    thousand steps, so every segment records this (its start or resume event).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info: dict[str, str] = {}
            for ln in f:
                if not ln.strip():
                    break  # the first processor's block is enough
                k, _, v = ln.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or platform.machine()
    if "cpu family" not in info:
        return info.get("model name") or platform.processor() or platform.machine()
    return (f"{info.get('vendor_id', '?')} family {info['cpu family']} model {info.get('model', '?')} "
            f"stepping {info.get('stepping', '?')} ({info.get('model name', '?')})")


def segment_fields() -> dict[str, object]:
    """What a start or resume event records of the machine the segment runs on."""
    return {"cpu": cpu_model(), "host": platform.node(), "xla_cpu_threads": xla_cpu_threads()}


def device_info() -> dict[str, object]:
    """The devices, the CPU and the XLA CPU thread count a run starts on, for config.json."""
    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs),
            "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "host": platform.node(),
            "xla_cpu_threads": xla_cpu_threads()}
