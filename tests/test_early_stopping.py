"""Early stopping (`--patience N`): a run stops after N evaluations in a row without a better
validation loss, saved, best.json at the best step, and says so; resume keeps the count exactly.

The validation losses are scripted (Trainer.estimate_loss replaced by a table of step -> loss), so
when the run stops is decided by the test, not by how a tiny model happens to train."""

from __future__ import annotations

import json

import pytest

from minigpt import checkpoint as ckpt
from minigpt import rundir, train
from minigpt.errors import ConfigError
from minigpt.training.trainer import Trainer

# step -> validation loss: better at 1 and 2, then worse three times, better at 6
LOSSES = {0: 4.0, 1: 3.0, 2: 2.5, 3: 2.6, 4: 2.7, 5: 2.55, 6: 2.4}
TINY = dict(progress=False, device="cpu", n_layer=1, n_head=2, n_embd=16, block_size=16,
            batch_size=2, eval_interval=1, eval_iters=1, sample_tokens=0, log_interval=1)


@pytest.fixture
def scripted(monkeypatch):
    def estimate_loss(self):
        loss = LOSSES.get(self.step, 9.0)
        return {"train": loss, "val": loss}

    monkeypatch.setattr(Trainer, "estimate_loss", estimate_loss)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat. " * 40)
    return path


def counted(run, step):
    state = ckpt.load_trainer_state(rundir.checkpoints_dir(run) / f"step-{step:07d}")
    return state["evals_without_improvement"]


def test_patience_stops_after_n_evaluations_without_a_better_val_loss(scripted, corpus, tmp_path,
                                                                      capsys):
    run = tmp_path / "run"
    summary = train(data=str(corpus), out=str(run), max_iters=50, patience=2, **TINY)
    # 3 and 4 are no better than 2: the second of them ends the run, saved
    assert summary["step"] == 4 and summary["stopped_early"] and not summary["interrupted"]
    assert rundir.read_best(run) == {"step": 2, "val_loss": 2.5}
    assert ckpt.list_checkpoints(run)[-1][0] == 4 and counted(run, 4) == 2
    assert "stopping early at step 4: no better validation loss in 2 evaluations (patience 2); " \
           "the best, 2.5000, is step 2" in capsys.readouterr().out
    assert [row["iter"] for row in rundir.read_metrics(run)][-1] == 4


def test_without_patience_the_run_trains_to_max_iters(scripted, corpus, tmp_path):
    summary = train(data=str(corpus), out=str(tmp_path / "run"), max_iters=6, **TINY)
    assert summary["step"] == 6 and not summary["stopped_early"]
    assert rundir.read_best(tmp_path / "run")["step"] == 6


def test_resume_keeps_the_count_exactly(scripted, corpus, tmp_path, capsys):
    """Stopped by max_iters at step 3 (one evaluation without improvement), resumed: the next one
    without improvement ends it at step 4, as in the run that never stopped."""
    run = tmp_path / "run"
    train(data=str(corpus), out=str(run), max_iters=3, patience=2, **TINY)
    assert counted(run, 3) == 1
    summary = train(out=str(run), resume=True, max_iters=50, progress=False)
    assert summary["step"] == 4 and summary["stopped_early"]
    assert rundir.read_best(run)["step"] == 2
    # a stopped run resumed with the same patience trains no further; a larger one trains on
    capsys.readouterr()
    summary = train(out=str(run), resume=True, max_iters=50, progress=False)
    assert summary["step"] == 4 and "already stopped early at step 4" in capsys.readouterr().out
    summary = train(out=str(run), resume=True, max_iters=50, patience=3, progress=False)
    # 5 (2.55) is no better than 2.5 either: the third without improvement, then 6 would be better
    assert summary["step"] == 5 and counted(run, 5) == 3
    assert json.loads((run / "config.json").read_text())["train"]["patience"] == 3


def test_negative_patience_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="patience must be >= 0"):
        train(data=str(corpus), out=str(tmp_path / "run"), patience=-1, **TINY)
