"""Which device to run on (`auto` picks CUDA, then Apple MPS, then CPU) and how many CPU threads."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from .errors import ConfigError


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif dev.type == "mps" and not _mps_available():
        raise ConfigError("device mps requested but Apple MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


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
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores or 1, round((cores or 1) - busy)))
    torch.set_num_threads(threads)
    return threads


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not give the heap back after each step
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass
