"""`minigpt eval`: each figure checked against an independent computation straight from the model.

The whole-split loss (non-overlapping windows), the full-context definition (stride 1, brute force,
one forward per token), a text file against the same text as a prepared split, and the CLI's
--compare table and --json output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli_harness
from conftest import CORPUS, TINY
from minigpt import load, train
from minigpt.data.dataset import load_prepared
from minigpt.tools.evaluate import score_tokens, split_loss, windows

T = TINY["block_size"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two tiny trained runs on the same corpus, a char and a bytes tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    for name, kind in (("char", "char"), ("bytes", "bytes")):
        train(data=str(root / "corpus.txt"), out=str(root / name), tokenizer=kind, max_iters=12,
              eval_interval=12, progress=False, device="cpu", **TINY)
    return root


def eval_json(root: Path, *args: str):
    result = cli_harness.run(["eval", *args, "--json"], root)
    assert result.rc == 0, result
    return json.loads(result.stdout)


def nll(model, context: np.ndarray, target: int) -> float:
    """Loss of one token given exactly `context` before it: one forward of that context."""
    with torch.no_grad():
        logits, _ = model(torch.tensor(context, dtype=torch.long)[None])
    return -F.log_softmax(logits[0, -1].double(), dim=-1)[target].item()


def test_windows_score_every_prediction_once_with_the_promised_context():
    for n in (2, 3, 10, 17, 18, 40, 101):
        for context in (1, 4, 16):
            for stride in range(1, context + 1):
                scored = []
                for start, first in windows(n, context, stride):
                    length = min(context, n - 1)
                    assert 0 <= start and start + length <= n - 1
                    for i in range(first, length):
                        target = start + i + 1  # token index predicted
                        scored.append(target)
                        if target > context:  # past the first window: the promised context
                            assert i + 1 >= context - stride + 1
                assert scored == list(range(1, n)), (n, context, stride)


def test_val_split_equals_the_whole_split_loss_from_non_overlapping_windows(runs):
    model = load(runs / "char", device="cpu").model
    val = np.asarray(load_prepared(runs / "char" / "data").val, dtype=np.int64)
    targets = len(val) - 1
    losses = []
    for start in range(0, targets - T + 1, T):  # consecutive windows, nothing shared
        x, y = torch.tensor(val[start : start + T]), torch.tensor(val[start + 1 : start + T + 1])
        with torch.no_grad():
            logits, _ = model(x[None])
        losses += F.cross_entropy(logits[0].double(), y, reduction="none").tolist()
    tail = targets - len(losses)  # the last predictions, scored in a window ending at the end
    assert 0 < tail < T  # this split does not divide evenly: the tail is part of the check
    x, y = torch.tensor(val[-T - 1 : -1]), torch.tensor(val[-T:])
    with torch.no_grad():
        logits, _ = model(x[None])
    losses += F.cross_entropy(logits[0].double(), y, reduction="none").tolist()[-tail:]
    expected = sum(losses) / targets

    got = eval_json(runs, "char", "--split", "val", "--stride", str(T))
    assert got["loss"] == pytest.approx(expected, abs=1e-5)
    assert split_loss(model, load_prepared(runs / "char" / "data").val) == pytest.approx(
        expected, abs=1e-5)
    meta = load_prepared(runs / "char" / "data").meta
    assert (got["tokens"], got["bytes"], got["stride"], got["context"]) == (
        meta["val_tokens"], meta["val_bytes"], T, T)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(
        expected * meta["val_tokens"] / (math.log(2) * meta["val_bytes"]), abs=1e-5)


def test_stride_one_is_the_full_context_definition(runs):
    model = load(runs / "char", device="cpu").model
    tokens = np.asarray(load_prepared(runs / "char" / "data").val[:45], dtype=np.int64)
    # every token j >= 1 scored given the longest context the model allows: min(j, T) tokens
    brute = [nll(model, tokens[max(0, j - T) : j], int(tokens[j])) for j in range(1, len(tokens))]
    loss, scored = score_tokens(model, tokens, stride=1, batch_size=7)
    assert scored == len(tokens) - 1
    assert loss == pytest.approx(sum(brute) / len(brute), abs=1e-5)
    # a larger stride gives some tokens less context: a different (here: not lower) figure
    assert score_tokens(model, tokens, stride=T)[0] != pytest.approx(loss, abs=1e-7)


def test_a_text_file_scores_as_the_same_text_prepared(runs):
    val_text = CORPUS[int(len(CORPUS) * 0.9):]  # the stream split: the last 10% of the characters
    (runs / "held-out.txt").write_text(val_text, encoding="utf-8")
    from_file = eval_json(runs, "char", "--data", "held-out.txt")
    from_split = eval_json(runs, "char", "--split", "val")
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "stride", "step"):
        assert from_file[key] == from_split[key], key
    assert from_file["text"] == "held-out.txt"
    assert from_file["stride"] == T // 2  # the default: half the context


def test_compare_prints_every_run_on_the_same_text(runs):
    (runs / "greek.txt").write_text(CORPUS[:500] + "αβγ", encoding="utf-8")
    rows = eval_json(runs, "char", "--compare", "bytes", "--data", "corpus.txt")
    assert [r["run"] for r in rows] == ["char", "bytes"]
    assert {r["bytes"] for r in rows} == {len(CORPUS.encode())}  # the same text for both
    assert rows[0]["tokens"] == len(CORPUS) and rows[1]["tokens"] == len(CORPUS.encode())
    assert all(r["bits_per_byte"] > 0 for r in rows)

    table = cli_harness.run(["eval", "bytes", "--compare", "char", "--split", "val"], runs)
    assert table.rc == 0, table
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "step", "tokenizer"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["bytes", "char"]
    assert lines[-1].startswith("text: val split of ")

    # the char run cannot encode the Greek letters the bytes run can: one line naming them
    result = cli_harness.run(["eval", "bytes", "--compare", "char", "--data", "greek.txt"], runs)
    assert result.rc == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "minigpt: error: greek.txt contains 3 character(s) the tokenizer of char has never seen: "
        "'α', 'β', 'γ'"]


def test_the_table_names_the_checkpoint_step_and_the_plain_output_reads(runs):
    result = cli_harness.run(["eval", "char", "--checkpoint", "last"], runs)
    assert result.rc == 0, result
    first, second = result.stdout.splitlines()
    assert first.startswith("char (step 12, checkpoint last) on val split of ")
    assert second.startswith("loss ") and "perplexity" in second and "bits per byte" in second


def test_a_document_run_scores_a_file_as_its_documents(runs):
    """A run trained with --docs reads a file as that mode's documents, each BOS ... EOS, as
    prepare does: its own validation documents, written out as a file, score as the val split."""
    train(data=str(runs / "corpus.txt"), out=str(runs / "docs"), docs="blank", max_iters=12,
          eval_interval=12, progress=False, device="cpu", **TINY)
    data = load_prepared(runs / "docs" / "data")
    tok, ids = data.tokenizer, np.asarray(data.val).tolist()
    docs, current = [], []
    for i in ids:  # the val split is BOS doc EOS BOS doc EOS ...
        if i == tok.eos_id:
            docs.append(tok.decode(current))
        current = [] if i in (tok.bos_id, tok.eos_id) else [*current, i]
    assert len(docs) > 1
    (runs / "val-docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    from_file = eval_json(runs, "docs", "--data", "val-docs.txt")
    from_split = eval_json(runs, "docs", "--split", "val")
    assert from_file["tokens"] == len(ids) == sum(len(d) + 2 for d in docs)
    for key in ("loss", "bits_per_byte", "bytes"):
        assert from_file[key] == from_split[key], key
