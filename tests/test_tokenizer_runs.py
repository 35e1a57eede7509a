"""Byte and BPE tokenizers end to end: train, resume, sample (CLI and API), non-Latin text, and
streaming that never prints half a character."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt import train
from minigpt.cli import main as cli_main
from minigpt.config import ModelConfig
from minigpt.data.prepare import prepare
from minigpt.engine import Engine
from minigpt.errors import ConfigError
from minigpt.model import GPT
from minigpt.tokenization import ByteTokenizer, train_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2, sample_tokens=0,
            warmup_iters=0, device="cpu")
ENGLISH = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n\n" * 12
GREEK_CJK = ("Καλημέρα κόσμε, η θάλασσα είναι γαλάζια.\n春眠不觉晓，处处闻啼鸟。\n"
             "Ο ήλιος λάμπει πάνω από τη θάλασσα.\n夜来风雨声，花落知多少。\n") * 12


def test_bpe_run_trains_resumes_exactly_and_samples(tmp_path):
    (tmp_path / "in.txt").write_text(ENGLISH)
    common = dict(data=str(tmp_path / "in.txt"), tokenizer="bpe", tokenizer_vocab_size=300,
                  eval_interval=3, lr_decay_iters=6, progress=False, **TINY)
    train(out=str(tmp_path / "straight"), max_iters=6, **common)
    train(out=str(tmp_path / "resumed"), max_iters=3, **common)
    summary = train(out=str(tmp_path / "resumed"), resume=True, max_iters=6, progress=False)
    assert summary["step"] == 6 and summary["best_val_bpb"] > 0

    def weights(run):
        return minigpt.load(tmp_path / run, checkpoint="last").model.state_dict()

    for k, v in weights("straight").items():
        assert torch.equal(v, weights("resumed")[k]), k
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert config["train"]["tokenizer"] == "bpe" and config["train"]["tokenizer_vocab_size"] == 300
    assert config["model"]["vocab_size"] == json.loads(
        (tmp_path / "resumed" / "data" / "meta.json").read_text())["vocab_size"]
    assert all("val_bpb" in json.loads(line) for line in
               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["val_loss"] is not None)

    engine = minigpt.load(tmp_path / "resumed")
    assert engine.tokenizer.kind == "bpe"
    assert isinstance(engine.generate("First", max_new_tokens=5, seed=0), str)
    out = subprocess.run(
        [sys.executable, "-m", "minigpt", "sample", str(tmp_path / "resumed"), "--prompt", "Before we",
         "--max-new-tokens", "8", "--seed", "1"],
        env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Before we") and len(out.stdout) > len("Before we\n")


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_greek_and_chinese_text_trains_and_samples(tmp_path, kind):
    (tmp_path / "gr.txt").write_text(GREEK_CJK, encoding="utf-8")
    options = {"tokenizer_vocab_size": 320} if kind == "bpe" else {}
    summary = train(data=str(tmp_path / "gr.txt"), out=str(tmp_path / "run"), tokenizer=kind,
                    max_iters=300, eval_interval=300, lr=3e-3, progress=False, **options, **TINY)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert summary["train_loss"] < first / 2  # it learnt the text

    engine = minigpt.load(tmp_path / "run")
    text = engine.generate("Καλημέρα", max_new_tokens=60, temperature=0, seed=0)
    corpus_chars = set(GREEK_CJK) - set(" \n,.，。")
    assert sum(c in corpus_chars for c in text) >= 10, text  # it writes Greek and Chinese back
    assert "\ufffd" not in text, text


def test_streaming_never_prints_half_a_character(monkeypatch):
    tok = ByteTokenizer()
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8,
                                    block_size=8)), tok)
    text = "aé中𝄞"
    ids = tok.encode(text)  # 1 + 2 + 3 + 4 byte tokens
    script = iter(ids)  # the model's choices replaced by the bytes of `text`, one per step
    monkeypatch.setattr("minigpt.batching.choose_tokens", lambda *a: torch.tensor([next(script)]))
    events = list(engine.stream("", max_new_tokens=len(ids)))
    assert [e.text for e in events] == ["a", "", "é", "", "", "中", "", "", "", "𝄞"]
    assert events[-1].finish_reason == "length"
    # cut off by max_new_tokens in the middle of 𝄞: the partial character is dropped, not "\ufffd"
    script = iter(ids)
    events = list(engine.stream("", max_new_tokens=len(ids) - 1))
    assert "".join(e.text for e in events) == "aé中" and events[-1].finish_reason == "length"


def test_bpe_streaming_holds_back_a_character_split_across_tokens(monkeypatch):
    tok = train_tokenizer("bpe", [ENGLISH], vocab_size=300)
    ids = tok.encode("speak 𝄞!")  # 𝄞 never occurs in training: its 4 bytes are separate tokens
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8,
                                    block_size=8)), tok)
    script = iter(ids)
    monkeypatch.setattr("minigpt.batching.choose_tokens", lambda *a: torch.tensor([next(script)]))
    texts = [e.text for e in engine.stream("", max_new_tokens=len(ids))]
    assert "".join(texts) == "speak 𝄞!"
    assert all("\ufffd" not in t for t in texts)
    assert texts.count("") >= 2  # pieces of 𝄞 wait for the rest of the character


def test_prepared_data_decides_the_runs_tokenizer(tmp_path):
    (tmp_path / "in.txt").write_text(ENGLISH)
    prepare([tmp_path / "in.txt"], tmp_path / "data", tokenizer="bpe", vocab_size=290, progress=False)
    train(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_iters=1, progress=False, **TINY)
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (config["tokenizer"], config["tokenizer_vocab_size"]) == ("bpe", 290)
    with pytest.raises(ConfigError, match="prepared with --tokenizer bpe --vocab-size 290"):
        train(data=str(tmp_path / "data"), out=str(tmp_path / "run2"), tokenizer="bytes", max_iters=1,
              progress=False, **TINY)


def test_cli_prepare_with_tokenizer_flags(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(ENGLISH)
    assert cli_main(["prepare", str(tmp_path / "in.txt"), "--out", str(tmp_path / "d"),
                     "--tokenizer", "bpe", "--vocab-size", "280"]) == 0
    assert "vocab 280" in capsys.readouterr().out
    assert cli_main(["prepare", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e"),
                     "--tokenizer", "char", "--vocab-size", "280"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minigpt: error:") and "bpe tokenizer only" in err and err.count("\n") == 1
    assert cli_main(["train", "--tokenizer", "bytes", "--vocab-size", "300", "--out",
                     str(tmp_path / "r")]) == 1
    assert "bpe tokenizer only" in capsys.readouterr().err
