"""CPU settings for torch: how many threads (auto: the cores other work leaves idle) and keeping
freed memory in the heap. Training, sampling and the benchmarks call `configure_cpu` once.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

import torch


def configure_cpu(threads: int = 0) -> int:
    """Set torch's CPU threads (returned; 0 = auto) and keep freed memory for reuse.

    glibc hands blocks over 128 KiB back to the kernel on free, so every training step page-faults
    its activations in again (~1,000 faults per step for the small preset). Keeping them in the heap
    makes a step ~4% faster; peak memory is unchanged (docs/speed.md).
    """
    _keep_freed_memory()
    return configure_threads(threads)


def configure_threads(threads: int = 0) -> int:
    """Set torch's CPU threads and return the count; 0 = auto: the cores other work leaves idle.

    Why not simply every core: torch's OpenMP threads meet at a barrier after each operation. When
    another process holds one of the cores, every operation waits for the descheduled thread, and
    training runs several times slower than on one thread (measured in docs/speed.md).
    """
    if threads <= 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user (or a launcher like torchrun) already chose
    if threads <= 0:
        threads = idle_cores()
    torch.set_num_threads(threads)
    return threads


def idle_cores() -> int:
    """The cores this process may use that other processes leave idle now (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, round((cores or 1) - busy_cores())))


def engine_threads(threads: int = 0) -> int:
    """`configure_threads` for a process that decodes beside another that serves it (`minigpt
    serve`'s engine process): auto leaves one idle core to the other, whose work (HTTP, JSON) would
    otherwise take turns on a core with one of the engine's OpenMP threads, stalling every
    operation at its barrier."""
    if threads <= 0 and not os.environ.get("OMP_NUM_THREADS"):
        threads = max(1, idle_cores() - 1)
    return configure_threads(threads)


def busy_cores(interval: float = 0.2) -> float:
    """How many cores other processes keep busy right now.

    On Linux: the machine's non-idle CPU time over `interval` seconds, from /proc/stat (this process
    sleeps meanwhile, so what it sees is the others' work). The 1-minute load average, used where
    /proc/stat is missing, lags: a job that ended seconds ago still counts as a busy core.
    """
    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total, idle, cpus = after[0] - before[0], after[1] - before[1], after[2]
    return cpus * (1 - idle / total) if total > 0 else 0.0


def _cpu_times() -> tuple[int, int, int]:
    """(all CPU time, idle CPU time, number of CPUs) since boot, in clock ticks, from /proc/stat."""
    lines = Path("/proc/stat").read_text().splitlines()
    fields = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    return sum(fields), fields[3] + fields[4], cpus


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap back after each step
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass
