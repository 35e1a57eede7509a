"""--log: TensorBoard event files and metrics.csv hold what metrics.jsonl holds, at the same steps,
through a resume; a failing tracker never stops training; a missing package is one line up front."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import CORPUS, TINY, run_cli
from minigpt import train
from minigpt.tools.plot import plot_runs

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

SETTINGS = dict(TINY, max_iters=12, eval_interval=6, log_interval=3, device="cpu")


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_csv_matches_jsonl(run: Path) -> None:
    rows = jsonl(run)
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    # first appearance; text (the evaluation sample) stays in metrics.jsonl, the CSV is numbers
    order = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, str)))
    assert reader.fieldnames == order
    assert len(table) == len(rows)
    for line, row in zip(rows, table):
        for key in order:
            value = line.get(key)
            assert (float(row[key]) if row[key] else None) == value, (line["iter"], key)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    train(data=str(root / "corpus.txt"), out=str(root / "run"), progress=False,
          log="tensorboard,csv", **{**SETTINGS, "sample_tokens": 12})
    return root


def test_tensorboard_holds_the_scalars_and_samples_at_their_steps(tracked):
    rows = jsonl(tracked / "run")
    acc = events(tracked / "run")
    train_loss = scalars(acc, "loss/train")
    assert [s for s, _ in train_loss] == [3, 6, 9, 12]
    assert [v for _, v in train_loss] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    evals = [r for r in rows if r["val_loss"] is not None]
    for tag, key in (("loss/val", "val_loss"), ("bpb/val", "val_bpb"),
                     ("perplexity/val", "val_ppl"), ("loss/eval_train", "eval_train_loss")):
        assert scalars(acc, tag) == [(r["iter"], pytest.approx(r[key], rel=1e-6)) for r in evals]
    for tag, key in (("lr", "lr"), ("speed/tokens_per_sec", "tokens_per_sec"),
                     ("grad_norm", "grad_norm"), ("skipped_steps", "skipped_steps")):
        assert scalars(acc, tag) == [(r["iter"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert all(r["grad_norm"] > 0 for r in rows)
    samples = acc.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [6, 12]
    text = tensor_util.make_ndarray(samples[0].tensor_proto).item().decode()
    assert text.startswith("```\n") and len(text) > 8


def test_csv_rows_match_metrics_jsonl(tracked):
    assert_csv_matches_jsonl(tracked / "run")


def test_a_resume_appends_without_repeating_steps(tracked):
    run = tracked / "resumed"
    shutil.copytree(tracked / "run", run)
    shutil.rmtree(run / "checkpoints" / "step-0000012")  # the newest checkpoint is lost: resume at 6
    before = jsonl(run)
    train(out=str(run), resume=True, progress=False)
    rows = jsonl(run)
    assert [r["iter"] for r in rows] == [3, 6, 9, 12]
    for key in ("train_loss", "val_loss", "grad_norm"):  # an exact resume: the same figures
        got, then = ([r[key] or 0.0 for r in rs] for rs in (rows, before))  # val_loss: None between
        assert got == pytest.approx(then, rel=1e-4), key
    acc = events(run)  # steps 9 and 12 were logged twice: TensorBoard shows the second time only
    assert [s for s, _ in scalars(acc, "loss/train")] == [3, 6, 9, 12]
    assert [s for s, _ in scalars(acc, "loss/val")] == [6, 12]
    assert_csv_matches_jsonl(run)


def test_a_tracker_turned_on_at_a_resume_starts_with_the_earlier_rows(tracked):
    run = tracked / "late"
    train(data=str(tracked / "corpus.txt"), out=str(run), progress=False,
          **{**SETTINGS, "max_iters": 6})
    train(out=str(run), resume=True, progress=False, max_iters=12, log=["csv", "tensorboard"])
    assert_csv_matches_jsonl(run)
    assert [s for s, _ in scalars(events(run), "loss/train")] == [3, 6, 9, 12]
    assert plot_runs([run], tracked / "late.png").stat().st_size > 0  # plot reads metrics.jsonl


def test_a_failing_tracker_warns_once_and_training_goes_on(tracked, capsys):
    run = tracked / "failing"
    train(data=str(tracked / "corpus.txt"), out=str(run), progress=False,
          **{**SETTINGS, "max_iters": 6})
    (run / "metrics.csv").mkdir()  # metrics.csv cannot be written
    summary = train(out=str(run), resume=True, progress=False, max_iters=12, log="csv")
    assert summary["step"] == 12
    assert [r["iter"] for r in jsonl(run)] == [3, 6, 9, 12]
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --log csv stopped (")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_one_line_before_training(tmp_path, corpus_file):
    result = run_cli("train", "--data", str(corpus_file), "--out", str(tmp_path / "run"),
                     "--log", "csv", "--log", "wandb", "--quiet")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "minigpt: error: --log wandb needs the 'wandb' package: pip install 'minigpt[wandb]'"]
    assert not (tmp_path / "run").exists()  # nothing was set up, nothing trained
