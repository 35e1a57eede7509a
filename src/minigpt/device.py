"""Which device to run on: `auto` picks CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

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
