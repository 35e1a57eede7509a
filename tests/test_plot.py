"""The training dashboard: eval samples kept in metrics.jsonl, `minigpt plot --html` showing them
by step, runs from before that key still plotting, and the --watch redraw logic (one iteration at a
time, so nothing depends on how fast the machine is)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest

from conftest import CORPUS, TINY, run_cli
from minigpt import train
from minigpt.errors import CheckpointError
from minigpt.tools import plot

OLD_RUN = Path(__file__).parent / "fixtures" / "run-0.1.0"  # written by minigpt 0.1.0: no samples


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plot")
    (tmp / "corpus.txt").write_text(CORPUS)
    train(data=str(tmp / "corpus.txt"), out=str(tmp / "run"), progress=False, device="cpu",
          max_iters=10, eval_interval=5, log_interval=2, **{**TINY, "sample_tokens": 24})
    return tmp / "run"


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_evaluation_logs_the_sample_it_printed(run):
    evals = [r for r in rows(run) if r.get("val_loss") is not None]
    assert [r["iter"] for r in evals] == [5, 10]
    # 24 tokens; one that decodes to nothing (a special token) makes it shorter
    assert all(isinstance(r["sample"], str) and 0 < len(r["sample"]) <= 24 for r in evals)
    assert all("sample" not in r for r in rows(run) if r.get("val_loss") is None)


def test_html_report_shows_the_curves_and_every_sample_by_step(run, tmp_path):
    proc = run_cli("plot", str(run), "--out", str(tmp_path / "c.png"), "--html",
                   str(tmp_path / "r.html"), check=True)
    assert "r.html" in proc.stdout
    page = (tmp_path / "r.html").read_text()
    assert 'src="data:image/png;base64,' in page and "http" not in page.split("<body>")[1]
    for r in rows(run):
        if "sample" in r:
            assert f"<pre>{html.escape(r['sample'])}</pre>" in page
    assert page.count('class=sample data-iter=') == 2
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_logged_before_samples_still_plots_and_says_it_has_none(tmp_path):
    proc = run_cli("plot", str(OLD_RUN), "--out", str(tmp_path / "old.png"), "--html",
                   str(tmp_path / "old.html"), check=True)
    assert proc.returncode == 0
    assert "no samples in this run's log" in (tmp_path / "old.html").read_text()


def test_a_log_without_learning_rate_or_speed_still_plots(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iter": 1, "train_loss": 2.0}\n{"iter": 2, "val_loss": 1.9}\n')
    assert plot.plot_runs([run], tmp_path / "bare.png").read_bytes()[:4] == b"\x89PNG"


def test_refresh_redraws_only_when_the_log_changed(run, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(run, live)
    w = plot.Watch([live], tmp_path / "w.png", html=tmp_path / "w.html")
    assert w.refresh() is True  # first look: draw
    assert w.refresh() is False  # nothing new: the files are left alone
    (tmp_path / "w.html").unlink()
    with (live / "metrics.jsonl").open("a") as f:  # the run logs an evaluation
        f.write(json.dumps({"iter": 15, "val_loss": 1.5, "sample": "Speak, speak <now>"}) + "\n")
    assert w.refresh() is True
    assert "Speak, speak &lt;now&gt;" in (tmp_path / "w.html").read_text()


def test_watch_waits_for_a_run_that_has_not_logged_and_stops_on_ctrl_c(tmp_path, monkeypatch):
    empty = tmp_path / "starting"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    ticks = iter([None, KeyboardInterrupt])

    def sleep(_):  # the loop's wait: the second one is the user's Ctrl-C
        if next(ticks) is KeyboardInterrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(plot.time, "sleep", sleep)
    log: list[str] = []
    plot.watch(plot.Watch([empty], tmp_path / "x.png"), interval=1, log=log.append)
    assert log[0].startswith("waiting: no loss values") and log[-1] == "stopped watching"
    assert len(log) == 2  # the same wait is reported once
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(CheckpointError):
        plot.Watch([empty], tmp_path / "x.png").refresh()
