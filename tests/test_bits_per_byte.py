"""Bits per byte = loss x tokens / (ln 2 x bytes): checked by hand, and in what a training run logs."""

from __future__ import annotations

import json
import math

import pytest

from minigpt import train
from minigpt.data.bpb import bits_per_byte, split_bits_per_byte

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, max_iters=2, eval_interval=2,
            eval_iters=1, sample_tokens=0, warmup_iters=0, device="cpu")


def test_hand_checked_example():
    # 1.5 bits per token (1.5 ln 2 nats), 100 tokens covering 50 bytes: 150 bits / 50 bytes = 3.0
    assert bits_per_byte(1.5 * math.log(2), tokens=100, nbytes=50) == pytest.approx(3.0)
    # one token per byte: bits per byte is the loss in bits
    assert bits_per_byte(2.0, 10, 10) == pytest.approx(2.0 / math.log(2))
    assert split_bits_per_byte(1.0, {"val_tokens": 5}, "val") is None  # old data without byte counts


@pytest.mark.parametrize("kind, val_tokens", [("char", 100), ("bytes", 175)])
def test_runs_log_bits_per_byte_from_their_losses(tmp_path, kind, val_tokens):
    # 100 lines of "αβγ\n": 400 characters, 700 bytes. The last quarter (100 characters: 25 lines
    # of 3 two-byte letters and a newline) is validation: 175 bytes; 100 char tokens, 175 byte tokens.
    (tmp_path / "greek.txt").write_text("αβγ\n" * 100, encoding="utf-8")
    summary = train(data=str(tmp_path / "greek.txt"), out=str(tmp_path / "run"), tokenizer=kind,
                    val_fraction=0.25, progress=False, **TINY)
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert (meta["val_tokens"], meta["val_bytes"]) == (val_tokens, 175)
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    expected = last["val_loss"] * val_tokens / (math.log(2) * 175)
    assert last["val_bpb"] == pytest.approx(expected, abs=1e-4)
    assert last["train_bpb"] == pytest.approx(
        last["eval_train_loss"] * meta["train_tokens"] / (math.log(2) * meta["train_bytes"]), abs=1e-4)
    assert summary["best_val_bpb"] == pytest.approx(expected, abs=1e-4)
