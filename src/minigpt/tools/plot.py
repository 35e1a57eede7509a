"""Training dashboards from metrics.jsonl: curves as a PNG, an HTML report, and a watch loop.

The PNG has three panels: loss (or, with `metric="bpb"`, bits per byte: the one unit in which runs
with different tokenizers compare on the same text), learning rate, and tokens/s. The HTML report
(`--html`) embeds that PNG and lists the sample printed at each evaluation (the `sample` key of
eval records), so one can watch a model learn to spell. Runs logged before that key existed, or
with sample_tokens 0, still plot; their report says it has no samples. `watch` redraws both
whenever a run's metrics.jsonl changes, until Ctrl-C.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..fsio import atomic_write_text
from ..rundir import metrics_path, read_metrics

METRICS_PLOTTED = {  # metric -> (training key, validation key, axis label)
    "loss": ("train_loss", "val_loss", "loss (nats/token)"),
    "bpb": ("train_bpb", "val_bpb", "bits per byte"),
}


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["iter"], r[key]) for r in rows if r.get(key) is not None and "iter" in r]


def _draw_panel(ax: Any, series: list[tuple[str, list, dict]], ylabel: str) -> None:
    drawn = False
    for name, pts, style in series:
        if pts:
            ax.plot(*zip(*pts), label=name, **style)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)


def plot_runs(run_dirs: list[str | Path], out: str | Path, metric: str = "loss") -> Path:
    """Loss (or bpb), learning rate and tokens/s of every run against the step, one PNG."""
    train_key, val_key, label = METRICS_PLOTTED[metric]
    runs = [(Path(r).name, read_metrics(Path(r))) for r in run_dirs]
    if not any(_points(rows, train_key) or _points(rows, val_key) for _, rows in runs):
        raise CheckpointError(f"no {metric} values in the metrics of {', '.join(map(str, run_dirs))}"
                              " (bits per byte are logged at evaluations)")

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(
        3, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})
    losses, lrs, speeds = [], [], []
    for i, (name, rows) in enumerate(runs):
        color = f"C{i}"
        losses += [(f"{name} train", _points(rows, train_key), dict(color=color, alpha=0.4)),
                   (f"{name} val", _points(rows, val_key), dict(color=color, marker="o"))]
        lrs.append((name, _points(rows, "lr"), dict(color=color)))
        speeds.append((name, _points(rows, "tokens_per_sec"), dict(color=color)))
    _draw_panel(loss_ax, losses, label)
    _draw_panel(lr_ax, lrs, "learning rate")
    _draw_panel(speed_ax, speeds, "tokens/s")
    speed_ax.set_xlabel("iteration")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def samples_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval records that carry a sample: iter, val_loss, sample."""
    return [r for r in rows if isinstance(r.get("sample"), str)]


def _samples_html(name: str, rows: list[dict[str, Any]]) -> str:
    found = samples_of(rows)
    if not found:
        return (f"<h2>{html.escape(name)}</h2><p class=muted>no samples in this run's log "
                "(logged since minigpt 0.2 when sample_tokens &gt; 0)</p>")
    items = []
    for r in found:
        loss = f", val loss {r['val_loss']:.4f}" if isinstance(r.get("val_loss"), float) else ""
        items.append(f"<div class=sample data-iter={int(r['iter'])}><h3>step {int(r['iter'])}"
                     f"{loss}</h3><pre>{html.escape(r['sample'])}</pre></div>")
    return f"<h2>{html.escape(name)}</h2>" + "".join(items)


def write_html_report(run_dirs: list[str | Path], out: str | Path, png: Path) -> Path:
    """One self-contained page: the curves (the PNG, inlined) and each run's samples by step."""
    picture = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    sections = "".join(_samples_html(Path(r).name, read_metrics(Path(r))) for r in run_dirs)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>minigpt training report</title>
<link rel="icon" href="data:,">
<style>body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 900px; margin: 0 auto;
padding: 1em; }} img {{ max-width: 100%; }} pre {{ background: #f6f6f6; padding: .5em;
white-space: pre-wrap; }} .muted {{ color: #666; }} h3 {{ font-size: 1em; margin-bottom: 0; }}
</style></head><body><h1>minigpt training report</h1>
<p class=muted>{html.escape(", ".join(str(r) for r in run_dirs))}, drawn
{time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<img alt="training curves" src="data:image/png;base64,{picture}">
<h1>Samples at each evaluation</h1>{sections}</body></html>
"""
    out = Path(out)
    atomic_write_text(out, page)
    return out


@dataclass
class Watch:
    """What `refresh` draws, and the state of the metrics files it last drew."""

    run_dirs: list[str | Path]
    out: str | Path
    metric: str = "loss"
    html: str | Path | None = None
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _state(self) -> dict[str, tuple[int, int]]:
        state = {}
        for r in self.run_dirs:
            path = metrics_path(Path(r))
            st = path.stat() if path.exists() else None
            state[str(r)] = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
        return state

    def refresh(self) -> bool:
        """Redraw if any metrics.jsonl changed since the last drawing; True if it redrew."""
        state = self._state()
        if state == self.seen:
            return False
        png = plot_runs(self.run_dirs, self.out, self.metric)
        if self.html:
            write_html_report(self.run_dirs, self.html, png)
        self.seen = state
        return True


def watch(w: Watch, interval: float = 5.0, log: Any = print) -> None:
    """Redraw while the runs train, polling every `interval` seconds; returns on Ctrl-C."""
    waiting = None
    try:
        while True:
            try:
                if w.refresh():
                    log(f"updated {w.out}" + (f" and {w.html}" if w.html else "")
                        + f" ({time.strftime('%H:%M:%S')}); Ctrl-C stops")
            except CheckpointError as e:  # a run that has not logged yet: wait for it
                if str(e) != waiting:
                    log(f"waiting: {e}")
                waiting = str(e)
            time.sleep(interval)
    except KeyboardInterrupt:
        log("stopped watching")
