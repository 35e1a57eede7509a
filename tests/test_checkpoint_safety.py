"""Checkpoint lifecycle: damaged checkpoints, keep-last-K, crash leftovers, resume checks, set-up failures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from minigpt import checkpoint as ckpt
from minigpt import train
from minigpt.config import ModelConfig
from minigpt.data.corpus import bundled_corpus
from minigpt.data.prepare import prepare
from minigpt.errors import CheckpointError, DataError
from minigpt.model import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
            sample_tokens=0, progress=False)



@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(bundled_corpus().read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return path


def tiny_model() -> GPT:
    return GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))


def steps(run: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run)]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_resume_falls_back_past_a_truncated_checkpoint_and_sets_it_aside(corpus, capsys):
    run = corpus.parent / "run"
    train(data=str(corpus), out=str(run), max_iters=10, eval_interval=5, **TINY)
    newest = run / "checkpoints" / "step-0000010"
    weights = newest / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    capsys.readouterr()
    summary = train(out=str(run), resume=True, max_iters=15)
    err = capsys.readouterr().err
    assert f"warning: skipping damaged checkpoint: checkpoint {newest} is corrupted: " \
           "model.safetensors fails its checksum" in err
    assert f"warning: moved the damaged checkpoint aside to {run / 'checkpoints' / 'damaged-step-0000010'}" in err
    assert summary["step"] == 15
    assert steps(run) == [10, 15]  # step 10 re-trained from step 5, so the same step again
    for _, path in ckpt.list_checkpoints(run):
        ckpt.verify_checkpoint(path)
    assert (run / "checkpoints" / "damaged-step-0000010" / ckpt.WEIGHTS).exists()


def test_a_best_checkpoint_that_was_set_aside_is_no_best(tmp_path):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, None, {"val_loss": 2.0}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, model, None, {"val_loss": 1.0}, keep=2, is_best=True)
    assert ckpt.best_step(tmp_path) == 2
    ckpt.set_aside_damaged(tmp_path, after_step=1)
    assert ckpt.best_step(tmp_path) is None  # so `sample` falls back to the last checkpoint


def test_keep_last_k_keeps_the_best_and_never_the_stale_future(tmp_path):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, None, {"val_loss": 1.0}, keep=2, is_best=True)
    for step in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, None, {"val_loss": 2.0}, keep=2)
    assert steps(tmp_path) == [1, 3, 4]  # newest two, plus the best
    # a checkpoint saved "in the past" (after falling back) survives pruning by step number
    ckpt.save_checkpoint(tmp_path, 2, model, None, {"val_loss": 2.0}, keep=1)
    assert 2 in steps(tmp_path)


def test_crash_leftovers_are_cleared_but_not_our_own_or_other_files(tmp_path):
    model = tiny_model()
    ckpt.save_checkpoint(tmp_path, 1, model, None, {}, keep=2)
    root = tmp_path / "checkpoints"
    dead = [root / ".tmp-step-0000002-999999", root / ".old-step-0000001-999999",
            tmp_path / ".config.json.tmp-999999"]
    dead[0].mkdir()
    dead[1].mkdir()
    dead[2].write_text("{")
    ours = root / f".tmp-step-0000009-{os.getpid()}"
    ours.mkdir()
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    ckpt.save_checkpoint(tmp_path, 2, model, None, {}, keep=2)
    assert not any(p.exists() for p in dead)
    assert ours.exists() and keep.exists()


def test_resume_with_no_checkpoint_yet_starts_from_step_0(corpus, capsys):
    run = corpus.parent / "run"
    train(data=str(corpus), out=str(run), max_iters=5, eval_interval=5, **TINY)
    for _, path in ckpt.list_checkpoints(run):  # as if killed before the first save
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    summary = train(out=str(run), resume=True)
    assert f"warning: {run} has no checkpoint yet; starting it from step 0" in capsys.readouterr().err
    assert summary["step"] == 5 and steps(run) == [5]


def test_a_new_run_that_fails_to_set_up_leaves_out_as_it_was(corpus):
    ws = corpus.parent
    nested = ws / "a" / "b" / "run"
    with pytest.raises(DataError):
        train(data=str(corpus), out=str(nested), max_iters=5, **{**TINY, "block_size": 100_000})
    assert not (ws / "a").exists()  # every directory it created is gone again
    empty = ws / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        train(data=str(corpus), out=str(empty), max_iters=5, **{**TINY, "block_size": 100_000})
    assert empty.is_dir() and not any(empty.iterdir())


def test_overwrite_deletes_the_old_run_only_once_the_new_one_is_set_up(corpus):
    run = corpus.parent / "run"
    train(data=str(corpus), out=str(run), max_iters=5, eval_interval=5, **TINY)
    before = snapshot(run)
    with pytest.raises(DataError):
        train(data=str(corpus), out=str(run), overwrite=True, max_iters=5, **{**TINY, "block_size": 100_000})
    assert snapshot(run) == before
    assert not list(corpus.parent.glob(".run.replaced-*"))
    train(data=str(corpus), out=str(run), overwrite=True, max_iters=3, eval_interval=3, **TINY)
    assert steps(run) == [3] and not list(corpus.parent.glob(".run.replaced-*"))


def test_resume_refuses_prepared_data_that_changed_since_the_checkpoint(corpus):
    ws = corpus.parent
    text = corpus.read_text(encoding="utf-8")
    prepare([corpus], ws / "data")
    train(data=str(ws / "data"), out=str(ws / "run"), max_iters=5, eval_interval=5, **TINY)
    more = ws / "more.txt"
    more.write_text(text + text[:1000], encoding="utf-8")  # same characters, more of them
    prepare([more], ws / "data")
    with pytest.raises(CheckpointError) as info:
        train(out=str(ws / "run"), resume=True)
    assert str(info.value) == (
        f"cannot resume {ws / 'run'}: its data changed since step 5 was saved "
        "(train tokens 4500 -> 5400, val tokens 500 -> 600); train a new run for this data"
    )


def test_resume_accepts_the_same_data_given_by_another_path(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    train(data="corpus.txt", out="run", max_iters=5, eval_interval=5, **TINY)
    summary = train(out="run", resume=True, data=str(corpus.resolve()), max_iters=8)
    assert summary["step"] == 8


def test_load_weights_names_the_shape_that_differs(tmp_path):
    small = GPT(ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    ckpt.save_checkpoint(tmp_path, 1, small, None, {})
    other = GPT(ModelConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(CheckpointError, match=r"\(a different vocabulary\?\): wte.weight is \[10, 8\] "
                                              r"in the checkpoint, \[12, 8\] in the model"):
        ckpt.load_weights(other, tmp_path / "checkpoints" / "step-0000001" / ckpt.WEIGHTS)
