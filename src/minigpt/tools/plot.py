"""Loss curves of one or more runs from their metrics.jsonl (matplotlib, headless).

`metric="bpb"` plots bits per byte instead of loss per token: the one unit in which runs with
different tokenizers can be compared on the same text.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..rundir import read_metrics

METRICS_PLOTTED = {  # metric -> (training key, validation key, axis label)
    "loss": ("train_loss", "val_loss", "loss (nats/token)"),
    "bpb": ("train_bpb", "val_bpb", "bits per byte"),
}


def plot_runs(run_dirs: list[str | Path], out: str | Path, metric: str = "loss") -> Path:
    train_key, val_key, label = METRICS_PLOTTED[metric]
    curves = []
    for run in run_dirs:
        rows = read_metrics(Path(run))
        train = [(r["iter"], r[train_key]) for r in rows if r.get(train_key) is not None]
        val = [(r["iter"], r[val_key]) for r in rows if r.get(val_key) is not None]
        curves.append((Path(run).name, train, val))
    if not any(train or val for _, train, val in curves):
        raise CheckpointError(f"no {metric} values in the metrics of {', '.join(map(str, run_dirs))}"
                              " (bits per byte are logged at evaluations)")

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, train, val) in enumerate(curves):
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.4, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", label=f"{name} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
