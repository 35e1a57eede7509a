"""Where training metrics go: metrics.jsonl always, and the trackers `--log` names, one fan-out.

    RUN/metrics.jsonl   every record (rundir.py's file; `minigpt plot` and `info` read it)
    RUN/metrics.csv     --log csv: one row per record, its numeric keys; columns in order of first
                        appearance (a new key rewrites the file once with the wider header)
    RUN/tensorboard/    --log tensorboard: torch.utils.tensorboard event files, scalars under
                        loss/, bpb/, perplexity/, speed/ ..., and each evaluation's sample as text
    RUN/wandb/          --log wandb: a W&B run, offline unless WANDB_API_KEY (or WANDB_MODE) is set

The trainer creates a MetricsLog on rank 0 only, so under torchrun one process logs. metrics.jsonl
is the record of the run: when a run resumes at step S it has already been cut back to S, the CSV is
rebuilt from it, TensorBoard purges its events after S (and a TensorBoard or CSV log turned on at a
resume starts with the earlier rows from metrics.jsonl). A tracker that fails while training prints
one warning and stops; training and metrics.jsonl go on. A missing package is refused at the start,
before anything is written (`check_backends`).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import ConfigError
from ..fsio import atomic_write_text

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID = "run-id"  # in RUN/wandb: a resumed run logs into the same W&B run
# metrics.jsonl keys -> TensorBoard tags; other numeric keys keep their own name
TB_TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "eval_train_loss": "loss/eval_train",
    "train_bpb": "bpb/train", "val_bpb": "bpb/val", "val_ppl": "perplexity/val",
    "lr": "lr", "tokens_per_sec": "speed/tokens_per_sec", "elapsed": "speed/elapsed_s",
    "grad_norm": "grad_norm", "skipped_steps": "skipped_steps",
}
EXTRAS = {"tensorboard": ("tensorboard", "track"), "wandb": ("wandb", "wandb")}  # module, extra


def check_backends(backends: tuple[str, ...]) -> None:
    """Refuse, in one line and before training, a tracker whose package is not installed."""
    for name in backends:
        if name in EXTRAS:
            module, extra = EXTRAS[name]
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"--log {name} needs the {module!r} package: pip install "
                                  f"'minigpt[{extra}]'") from None


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values (no iter, no None, no text, no NaN)."""
    return {k: v for k, v in record.items() if k != "iter" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class _Csv:
    def __init__(self, run_dir: Path, rows: list[dict[str, Any]]):
        self.path = run_dir / CSV_FILE
        self.columns: list[str] = []
        self._rewrite(rows)

    @staticmethod
    def _row(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items()
                if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """The whole file from `rows`, atomically, then reopened for appending."""
        rows = [self._row(r) for r in rows]
        for r in rows:
            self.columns += [k for k in r if k not in self.columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        self.file = open(self.path, "a", newline="")  # noqa: SIM115  (closed in close())
        self.writer = csv.DictWriter(self.file, self.columns, lineterminator="\n")

    def write(self, record: dict[str, Any]) -> None:
        row = self._row(record)
        if any(k not in self.columns for k in row):  # a new column: the header must grow
            self.file.close()
            with open(self.path, newline="") as f:
                old = [{k: (_number(v) if v else None) for k, v in r.items()}
                       for r in csv.DictReader(f)]
            self._rewrite([*old, row])
            return
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


class _TensorBoard:
    def __init__(self, run_dir: Path, step: int, rows: list[dict[str, Any]]):
        from torch.utils.tensorboard import SummaryWriter

        logdir = run_dir / TENSORBOARD_DIR
        replay = not logdir.exists()
        # events after the checkpoint were logged by the steps this resume repeats: hide them
        self.writer = SummaryWriter(str(logdir), purge_step=step + 1 if step else None)
        for row in rows if replay else []:
            self.write(row)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(TB_TAGS.get(key, key), value, record["iter"])
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders text as Markdown: a fenced block keeps a sample's line breaks
        self.writer.add_text(tag, "```\n" + text + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, step: int, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        where = run_dir / WANDB_DIR
        where.mkdir(exist_ok=True)
        id_file = where / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        atomic_write_text(id_file, run_id + "\n")
        keyless = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minigpt"), id=run_id,
                              name=run_dir.name, dir=str(where), config=config, resume="allow",
                              mode="offline" if keyless else None)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record), step=record["iter"])

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """metrics.jsonl plus the trackers in `backends`; `write` takes one record, `text` a sample."""

    def __init__(self, run_dir: Path, backends: tuple[str, ...], step: int,
                 config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.jsonl = open(rundir.metrics_path(self.run_dir), "a")  # noqa: SIM115  (see close)
        self.jsonl.flush()
        self.trackers: dict[str, Any] = {}
        resumed = step and rundir.metrics_path(self.run_dir).stat().st_size
        rows = rundir.read_metrics(self.run_dir) if resumed else []
        makers = {"csv": lambda: _Csv(self.run_dir, rows),
                  "tensorboard": lambda: _TensorBoard(self.run_dir, step, rows),
                  "wandb": lambda: _Wandb(self.run_dir, step, config or {})}
        for name in backends:
            if name in makers:
                self._guarded(name, makers[name])

    def _guarded(self, name: str, call: Any) -> None:
        """Run a tracker's call; the first failure turns that tracker off with one warning."""
        try:
            result = call()
        except Exception as e:  # a tracker must never stop training
            self.trackers.pop(name, None)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: --log {name} stopped ({type(e).__name__}: {first}); "
                  "metrics.jsonl keeps every line", file=sys.stderr)
        else:
            if name not in self.trackers and result is not None:
                self.trackers[name] = result

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, tracker in list(self.trackers.items()):
            self._guarded(name, lambda t=tracker: t.write(record))

    def text(self, step: int, tag: str, text: str) -> None:
        """A text (the evaluation sample) for the trackers that show text; not in jsonl or csv."""
        for name, tracker in list(self.trackers.items()):
            if hasattr(tracker, "text"):
                self._guarded(name, lambda t=tracker: t.text(step, tag, text))

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._guarded(name, tracker.close)
        self.jsonl.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
