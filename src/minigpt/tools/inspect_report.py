"""`minigpt inspect`'s files: a self-contained HTML page and one PNG attention heatmap per layer.

The page is serve/static/inspect.html, the same file the server shows at /inspect, with the
Inspection's JSON written into its data block: no network, no build step, opens from disk.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fsio import atomic_write_text
from ..inspection import Inspection

DATA_BLOCK = '<script id="inspect-data" type="application/json">null</script>'
MAX_LABELS = 48  # more token labels than this on a heatmap axis are unreadable: leave them off


def page_template() -> str:
    return resources.files("minigpt.serve").joinpath("static/inspect.html").read_text("utf-8")


def render_html(result: Inspection, layer: int = 0, head: int = 0) -> str:
    """The page with `result` embedded, opening on `layer`/`head`."""
    # 3 digits of attention is finer than any shade on screen, and halves the page
    data = {**result.to_dict(attention_digits=3), "layer": layer, "head": head}
    # "</script>" or "<!--" in the text would end or upset the <script> block: JSON spells every
    # "<" as \u003c, which parses back to the same string
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    template = page_template()
    assert DATA_BLOCK in template, "inspect.html lost its data block"
    return template.replace(DATA_BLOCK, DATA_BLOCK.replace("null", payload))


def check_choice(result: Inspection, layer: int | None, head: int | None) -> None:
    n_layer, n_head = result.attention.shape[:2]
    for name, value, n, what in (("layer", layer, n_layer, "layers"), ("head", head, n_head, "heads")):
        if value is not None and not 0 <= value < n:
            raise ConfigError(f"--{name} must be between 0 and {n - 1} (the model has {n} {what}), "
                              f"got {value}")


def heatmap_png(result: Inspection, layer: int, out: Path) -> Path:
    """Every head of one layer side by side: row i = token i's weights over tokens 0..i."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    maps = result.attention[layer]
    n_head, T = maps.shape[0], maps.shape[-1]
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    labels = [p.replace("\n", "↵") for p in result.pieces] if T <= MAX_LABELS else None
    for h, ax in enumerate(axes.flat):
        if h >= n_head:
            ax.axis("off")
            continue
        shown = np.where(np.tri(T, dtype=bool), maps[h], np.nan)  # the future is blank, not 0
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        if labels:
            ax.set_xticks(range(T), labels, fontsize=5, rotation=90, family="monospace")
            ax.set_yticks(range(T), labels, fontsize=5, family="monospace")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"layer {layer} attention (row: token reading, column: token read)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def write_report(result: Inspection, out_dir: str | Path, layer: int | None = None,
                 head: int | None = None) -> list[Path]:
    """inspect.html, inspect.json and attention-layer<L>.png (every layer, or just `layer`)."""
    check_choice(result, layer, head)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / "inspect.html"
    atomic_write_text(html, render_html(result, layer or 0, head or 0))
    data = out_dir / "inspect.json"
    atomic_write_text(data, json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    layers = range(result.attention.shape[0]) if layer is None else [layer]
    pngs = [heatmap_png(result, i, out_dir / f"attention-layer{i}.png") for i in layers]
    return [html, data, *pngs]
