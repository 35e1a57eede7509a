"""minigpt: train a small GPT on your own text and sample from it.

    import minigpt
    summary = minigpt.train(data="names.txt", docs="lines", out="runs/names", max_iters=500)
    print(minigpt.load("runs/names").generate(temperature=0.8))
"""

from .config import ModelConfig, TrainConfig
from .engine import Engine, load
from .errors import MiniGPTError
from .model import GPT
from .train import train

__all__ = ["GPT", "Engine", "MiniGPTError", "ModelConfig", "TrainConfig", "load", "train"]
__version__ = "0.1.0"
