"""Where and in which precision a model runs: device and dtype choice, autocast, loss scaling, TF32.

Every function here is the same code on every device type: autocast is `torch.autocast` with the
device's own type (CPU, CUDA and MPS alike), the float16 loss scaler is `torch.amp.GradScaler` for that
device type, so the CPU tests exercise exactly what a GPU run executes.

    resolve_device("auto")            -> cuda, else mps, else cpu
    resolve_dtype("auto", device)     -> bfloat16 on CUDA GPUs that have it, float16 on older ones,
                                         float32 on CPU and MPS
    autocast(device, dtype)           -> context for forward passes (a no-op for float32)
    grad_scaler(device, dtype)        -> GradScaler, enabled only for float16
    configure_cpu(threads)            -> CPU threads (auto: the idle cores) and heap settings
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


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


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype for `device`. Weights and optimizer state stay float32 in training."""
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            # bf16 needs no loss scaling; GPUs before Ampere only have fast float16
            return torch.bfloat16 if _cuda_bf16() else torch.float16
        return torch.float32  # CPU autocast is slower than fp32 on most CPUs; MPS: opt in
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPES[name]
    if dtype is not torch.float32:
        if not torch.amp.is_autocast_available(device.type):
            raise ConfigError(f"{name} mixed precision is not available on {device.type}; use float32")
        if dtype is torch.bfloat16 and device.type == "cuda" and not _cuda_bf16():
            raise ConfigError("this GPU has no bfloat16 support; use --dtype float16 (or auto)")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for forward passes on any device type; float32 disables it."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not torch.float32)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """float16 gradients underflow without loss scaling; for bf16/fp32 the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for float32 matmuls on CUDA (Ampere+); CPU numerics are left untouched.

    The legacy flags, not `fp32_precision`: mixing the two APIs makes
    `torch.get_float32_matmul_precision()` raise, and torch.compile calls it.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cuda_bf16() -> bool:
    """Native bf16 on the current GPU (each DDP rank has set its own); emulated bf16 is slow."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.is_bf16_supported()


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
    if threads <= 0 and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user (or a launcher like torchrun) already chose
    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, min(cores or 1, round((cores or 1) - busy_cores())))
    torch.set_num_threads(threads)
    return threads


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
