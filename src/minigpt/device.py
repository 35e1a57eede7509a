"""Where and in which precision a model runs: device and dtype choice, autocast, loss scaling, TF32.

Every function here is the same code on every device type: autocast is `torch.autocast` with the
device's own type (CPU, CUDA and MPS alike), the float16 loss scaler is `torch.amp.GradScaler` for that
device type, so the CPU tests exercise exactly what a GPU run executes.

    resolve_device("auto")            -> cuda, else mps, else cpu
    resolve_dtype("auto", device)     -> bfloat16 on CUDA GPUs that have it, float16 on older ones,
                                         float32 on CPU and MPS
    autocast(device, dtype)           -> context for forward passes (a no-op for float32)
    grad_scaler(device, dtype)        -> GradScaler, enabled only for float16
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from .config import DTYPE_CHOICES
from .errors import ConfigError

# the names are config.DTYPE_CHOICES (which the CLI offers); tests/test_device.py keeps the two equal
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
