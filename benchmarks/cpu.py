"""CPU seconds each process spends during a measurement: where a load's cost goes when the load client and the
servers share one machine's cores."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import psutil

T = TypeVar("T")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def with_cpu(pids: dict[str, int], run: Callable[[], T]) -> tuple[T, float, dict[str, float]]:
    """(run()'s result, wall seconds, CPU seconds each named process spent meanwhile)."""
    before, start = {k: cpu_seconds(p) for k, p in pids.items()}, time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    return result, wall, {k: cpu_seconds(p) - before[k] for k, p in pids.items()}


def idle_share(run: Callable[[], T]) -> tuple[T, float]:
    """(run()'s result, the share of the machine's CPU time that went idle meanwhile): a pipeline that leaves
    cores idle is bound by its latency, not by its CPU."""
    before = psutil.cpu_times()
    result = run()
    after = psutil.cpu_times()
    spent = {field: getattr(after, field) - getattr(before, field) for field in after._fields}
    return result, spent["idle"] / max(sum(spent.values()), 1e-9)


def per_call_ms(cpu: dict[str, float], calls: float) -> str:
    """'client 0.17, server 0.23 ms CPU per call' from with_cpu's seconds and the calls made."""
    return ", ".join(f"{name} {1000 * seconds / calls:.3f}" for name, seconds in cpu.items()) + " ms CPU per call"
