"""minigpt: train a small GPT on your own text and sample from it.

    import minigpt
    summary = minigpt.train(data="names.txt", docs="lines", out="runs/names", max_iters=500)
    print(minigpt.load("runs/names").generate(temperature=0.8))

The names below are imported on first use (module `__getattr__`), so `import minigpt` and commands
such as `minigpt info` load only what they need: no torch for the NumPy reference engine, no
training loop for sampling.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.5.1"

# public name -> module that defines it
_PUBLIC = {
    "train": "minigpt.training.run",
    "load": "minigpt.engine",
    "Engine": "minigpt.engine",
    "GPT": "minigpt.model",
    "ModelConfig": "minigpt.config",
    "TrainConfig": "minigpt.config",
    "SamplingParams": "minigpt.sampling",
    "MiniGPTError": "minigpt.errors",
    "Constraint": "minigpt.structured",
}
__all__ = ["GPT", "Constraint", "Engine", "MiniGPTError", "ModelConfig", "SamplingParams", "TrainConfig", "load",
           "train"]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ does the importing
    from .config import ModelConfig, TrainConfig
    from .engine import Engine, load
    from .errors import MiniGPTError
    from .model import GPT
    from .sampling import SamplingParams
    from .structured import Constraint
    from .training.run import train


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
