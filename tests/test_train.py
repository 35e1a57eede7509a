import json
import random

import pytest
import torch
from safetensors.torch import load_file

import minigpt
from conftest import TINY
from minigpt import checkpoint as ckpt
from minigpt.errors import ConfigError


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def test_training_lowers_loss_and_writes_a_self_contained_run(corpus_file, tmp_path):
    run = tmp_path / "run"
    s = minigpt.train(data=str(corpus_file), out=str(run), max_iters=60, eval_interval=30,
                      progress=False, **{**TINY, "sample_tokens": 20})
    rows = metrics(run)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed"} <= set(rows[-1])
    assert s["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows if r["val_loss"] is not None), abs=1e-5)
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "data/train.bin", "data/meta.json"):
        assert (run / name).exists(), name
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [30, 60]


def test_resume_is_exact(corpus_file, tmp_path):
    common = dict(data=str(corpus_file), eval_interval=10, lr_decay_iters=40, dropout=0.1,
                  progress=False, log_interval=5, **TINY)
    minigpt.train(out=str(tmp_path / "straight"), max_iters=40, **common)
    minigpt.train(out=str(tmp_path / "split"), max_iters=20, **common)
    minigpt.train(out=str(tmp_path / "split"), max_iters=40, resume=True, progress=False)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    wa, wb = weights(tmp_path / "straight", 40), weights(tmp_path / "split", 40)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_never_overwritten_silently(corpus_file, tmp_path):
    run = tmp_path / "run"
    minigpt.train(data=str(corpus_file), out=str(run), max_iters=5, progress=False, **TINY)
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        minigpt.train(data=str(corpus_file), out=str(run), max_iters=5, progress=False, **TINY)
    assert (run / "metrics.jsonl").read_bytes() == before
    minigpt.train(data=str(corpus_file), out=str(run), max_iters=6, overwrite=True, progress=False, **TINY)
    assert ckpt.list_checkpoints(run)[-1][0] == 6


def test_resume_refuses_a_different_model(corpus_file, tmp_path):
    run = tmp_path / "run"
    minigpt.train(data=str(corpus_file), out=str(run), max_iters=5, progress=False, **TINY)
    with pytest.raises(ConfigError, match="n_layer 2 -> 3"):
        minigpt.train(out=str(run), resume=True, n_layer=3, max_iters=10, progress=False)


def test_checkpoint_round_trip_and_keep_last_k(corpus_file, tmp_path):
    run = tmp_path / "run"
    minigpt.train(data=str(corpus_file), out=str(run), max_iters=40, eval_interval=10,
                  keep_checkpoints=2, progress=False, **TINY)
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    best = ckpt.best_step(run)
    assert steps[-2:] == [30, 40] and set(steps) == {30, 40, best}
    engine = minigpt.load(run, checkpoint="last")
    saved = weights(run, 40)
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert engine.step == 40 and minigpt.load(run).step == best


def make_names(n=300, seed=0):
    rng = random.Random(seed)
    syllables = ["an", "bel", "cor", "da", "el", "fi", "ga", "ho", "is", "ja", "ka", "lo", "mi"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize()
            for _ in range(n)]


def test_document_mode_samples_are_short_and_end_at_eos(tmp_path):
    names = make_names()
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    run = tmp_path / "names"
    minigpt.train(data=str(tmp_path / "names.txt"), docs="lines", out=str(run), max_iters=300,
                  eval_interval=300, lr=1e-2, min_lr=1e-3, progress=False,
                  **{**TINY, "block_size": 16, "batch_size": 16})
    engine = minigpt.load(run)
    events = list(engine.stream("", max_new_tokens=30, temperature=0.8, seed=0, num_samples=20))
    finished = [e for e in events if e.finish_reason]
    assert len(finished) == 20
    assert sum(e.finish_reason == "stop" for e in finished) >= 18
    samples = engine.generate_many("", num_samples=20, max_new_tokens=30, temperature=0.8, seed=0)
    assert all("\n" not in s and len(s) <= 30 for s in samples)
    syllable_like = [s for s in samples if s[:1].isupper() and s[1:].islower()]
    assert len(syllable_like) >= 16, samples
