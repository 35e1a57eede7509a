"""Loss curves of one or more runs from their metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import METRICS
from .errors import CheckpointError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {METRICS}; is it a minigpt run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash
    return rows


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(run_dirs):
        rows = read_metrics(Path(run))
        color = f"C{i}"
        name = Path(run).name
        train = [(r["iter"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        val = [(r["iter"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.4, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", label=f"{name} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
