"""Chat fine-tuning (`train --chat`): conversations in OpenAI's `messages` format, rendered with the
run's chat template, loss on the assistant's replies only, the template stored in the run and used
by `serve`.

The task the model learns is one with a checkable answer (benchmarks/chat_reverse.py, which
prints the same figure): "reverse abc" -> "cba", over 3-letter words; 20 words are never trained
on, and the served model must reverse them (greedy, through /v1/chat/completions). Fixed steps and
seeds: the verdict does not depend on the machine's speed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from minigpt import load, rundir, train
from minigpt.chat_template import DEFAULT, ChatTemplate, load_template
from minigpt.cli import main
from minigpt.data.dataset import IGNORE, BatchSampler, load_prepared
from minigpt.data.prepare import prepare
from minigpt.errors import ConfigError, DataError
from minigpt.model import GPT
from minigpt.serve.app import create_app
from test_server import serving

_spec = importlib.util.spec_from_file_location(
    "chat_reverse", Path(__file__).resolve().parents[1] / "benchmarks" / "chat_reverse.py")
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)
conversation, words, write_jsonl = task.conversation, task.words, task.write_jsonl
STEPS = 300
QA = {"system": "{content}\n", "user": "Q: {content}\n", "assistant": "A: {content}\n",
      "generation": "A:", "stop": ["\nQ:"]}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """`minigpt train --chat` from scratch on the task's conversations, one thread."""
    tmp = tmp_path_factory.mktemp("chatft")
    data = write_jsonl(tmp / "reverse.jsonl", task.records())
    assert main(["train", "--data", str(data), "--chat", "--out", str(tmp / "run"), "--quiet",
                 "--device", "cpu", "--threads", "1", "--max-iters", str(STEPS),
                 "--eval-interval", str(STEPS), *task.MODEL_FLAGS]) == 0
    return tmp / "run"


# ---- the loss mask -------------------------------------------------------------------------------


def expected_mask(record: dict) -> list[int]:
    """The mask of one conversation written out by hand for the default template, one char per
    token: BOS 0, "Role: content\\n" lines 0 (a developer message is a system one) except
    " content\\n" after "Assistant:", EOS 1 after a final reply."""
    mask = [0]
    for m in record["messages"]:
        if m["role"] == "assistant":
            mask += [0] * len("Assistant:") + [1] * len(" " + m["content"] + "\n")
        else:
            name = {"developer": "System"}.get(m["role"], m["role"].title())
            mask += [0] * len(f"{name}: {m['content']}\n")
    return mask + [int(record["messages"][-1]["role"] == "assistant")]


def test_the_mask_is_exactly_the_assistants_tokens(tmp_path):
    records = [
        conversation("abc", "Be brief."),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "reverse ab"},
                      {"role": "assistant", "content": "ba"}]},
        {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "bye"}]},
        conversation("hgf"),
    ] * 3
    meta = prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "data", chat=DEFAULT,
                   progress=False, val_fraction=0.25)
    data = load_prepared(tmp_path / "data")
    tok = data.tokenizer
    by_text = {DEFAULT.render([(("system" if m["role"] == "developer" else m["role"]),
                                m["content"]) for m in r["messages"]])[: -len("Assistant:")]: r
               for r in records}
    seen = 0
    for split in ("train", "val"):
        ids = np.asarray(getattr(data, split)).tolist()
        mask = np.asarray(getattr(data, f"{split}_mask")).tolist()
        starts = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            record = by_text[tok.decode(ids[a:b])]  # decode drops BOS and EOS
            assert mask[a:b] == expected_mask(record)
            seen += 1
        assert meta[f"{split}_learnt_tokens"] == sum(mask)
    assert seen == len(records)
    assert meta["chat_template"] == DEFAULT.to_dict()

    # the sampler's targets are the tokens where the mask is 1 and IGNORE where it is 0, in
    # every window; and the loss is the mean over the learnt targets alone
    sampler = BatchSampler(data.train, 16, 4, seed=0, mask=data.train_mask)
    tokens, mask = np.asarray(data.train), np.asarray(data.train_mask)
    everywhere = np.arange(len(tokens) - 16)
    x, y = sampler.windows(everywhere)
    targets = tokens[everywhere[:, None] + np.arange(1, 17)].astype(np.int64)
    learnt = mask[everywhere[:, None] + np.arange(1, 17)] == 1
    assert torch.equal(y, torch.from_numpy(np.where(learnt, targets, IGNORE)))
    for _ in range(50):  # no drawn window is without a learnt target
        assert ((sampler.next()[1] != IGNORE).sum(dim=1) > 0).all()


def test_the_loss_ignores_masked_targets():
    from minigpt.config import ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 11, (2, 8))
    y = torch.randint(0, 11, (2, 8))
    keep = torch.rand(2, 8) < 0.5
    logits, loss = model(x, y.masked_fill(~keep, IGNORE))
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, expected)


# ---- what the fine-tune learns, served ----------------------------------------------------------


def test_a_chat_fine_tune_answers_unseen_questions_through_the_server(chat_run):
    assert rundir.read_best(chat_run)["step"] == STEPS
    # stored in the run: what `serve` renders prompts with (serve.app.serve loads it so)
    assert json.loads((chat_run / rundir.CHAT_TEMPLATE).read_text()) == DEFAULT.to_dict()
    assert load_template(chat_run) == DEFAULT
    held_out, seen = words()
    assert not set(held_out) & {m["content"].split()[-1] for r in task.records()
                                for m in r["messages"] if m["role"] == "user"}
    correct, replies = task.accuracy(chat_run)  # greedy, through /v1/chat/completions
    assert correct >= 0.9 * len(held_out), f"{correct}/{len(held_out)} reversed: {replies}"


def test_the_run_serves_with_the_template_it_was_trained_with(tmp_path):
    """A chat run trained with another template stores it, and the server renders chat prompts
    with it (the prompt's token count is that of the Q:/A: rendering, after BOS); a fine-tune
    from that run with --init-from keeps it."""
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    data = write_jsonl(tmp_path / "c.jsonl", task.records()[:60])
    tiny = dict(progress=False, device="cpu", n_layer=1, n_head=2, n_embd=16, block_size=32,
                batch_size=4, max_iters=4, eval_interval=4, eval_iters=1, sample_tokens=0)
    train(data=str(data), out=str(tmp_path / "qa"), chat=True,
          chat_template=str(tmp_path / "qa.json"), **tiny)
    qa = ChatTemplate.from_dict(QA, "QA")
    assert load_template(tmp_path / "qa") == qa
    messages = [{"role": "user", "content": "reverse abc"}]
    with serving(create_app(load(tmp_path / "qa", device="cpu"),
                            template=load_template(tmp_path / "qa"))) as base:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == 1 + len(qa.render([("user", "reverse abc")]))

    summary = train(data=str(data), out=str(tmp_path / "tuned"), chat=True,
                    init_from=str(tmp_path / "qa"), **{**tiny, "n_layer": None, "n_head": None,
                                                       "n_embd": None, "block_size": None})
    assert summary["step"] == 4
    assert load_template(tmp_path / "tuned") == qa
    meta = json.loads((tmp_path / "tuned" / "data" / "meta.json").read_text())
    assert meta["chat_template"] == QA and meta["loss_mask"]


def test_a_run_without_a_stored_template_serves_with_the_default(tmp_path):
    (tmp_path / "t.txt").write_text("User: hi\nAssistant: hello\n" * 30)
    train(data=str(tmp_path / "t.txt"), out=str(tmp_path / "run"), progress=False, device="cpu",
          n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_iters=2,
          eval_interval=2, eval_iters=1, sample_tokens=0)
    assert not (tmp_path / "run" / rundir.CHAT_TEMPLATE).exists()
    assert load_template(tmp_path / "run") == DEFAULT


def test_the_playground_chat_tab_goes_through_the_servers_template():
    """The page sends the conversation as `messages` to /v1/chat/completions, where the server
    renders it with the run's template; it never renders a prompt itself."""
    from importlib import resources

    page = (resources.files("minigpt.serve") / "static" / "playground.html").read_text()
    send = page.split("function sendChat()")[1].split("\n}\n")[0]
    assert 'streamSSE("/v1/chat/completions", request' in send and "messages" in send
    assert "/v1/completions" not in send


# ---- bad records --------------------------------------------------------------------------------


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message to learn from"),
    ({"messages": [{"role": "bot", "content": "hi"}]},
     "messages[0].role must be one of system, developer, user, assistant; got 'bot'"),
    ({"messages": {"role": "user", "content": "hi"}},
     "messages must be a non-empty array, got an object"),
    ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
     "messages[0].content must be a string or a non-empty list of text parts, got the number 7"),
    ({"text": "plain"}, "no field 'messages' (fields: text)"),
]


@pytest.mark.parametrize("record, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_a_bad_conversation_names_its_line(tmp_path, record, message):
    good = [conversation(w) for w in ("abc", "def", "ghh")]
    path = write_jsonl(tmp_path / "c.jsonl", [good[0], record, *good[1:]])
    with pytest.raises(DataError) as e:
        prepare([path], tmp_path / "data", chat=DEFAULT, progress=False)
    assert str(e.value).startswith(f"{path} line 2: {message}")
    meta = prepare([path], tmp_path / "data", chat=DEFAULT, progress=False, skip_bad_records=True)
    assert meta["skipped_records"] == 1 and meta["first_bad_record"].startswith(f"{path} line 2")
    assert sum(meta["num_docs"].values()) == 3


def test_chat_settings_that_cannot_work_are_refused(tmp_path):
    (tmp_path / "t.txt").write_text("plain text\n" * 50)
    data = write_jsonl(tmp_path / "c.jsonl", [conversation(w) for w in ("abc", "def")])
    with pytest.raises(DataError, match="--chat reads JSON lines of conversations"):
        prepare([tmp_path / "t.txt"], tmp_path / "d", chat=DEFAULT, progress=False)
    with pytest.raises(ConfigError, match="must begin with the generation prompt"):
        prepare([data], tmp_path / "d", chat=ChatTemplate(generation="Bot:"), progress=False)
    with pytest.raises(ConfigError, match="--chat makes each conversation a document"):
        train(data=str(data), out=str(tmp_path / "r"), chat=True, docs="lines", progress=False)
    with pytest.raises(ConfigError, match="--chat-template renders conversations for --chat"):
        train(data=str(data), out=str(tmp_path / "r"), chat_template="x.json", progress=False)
    with pytest.raises(DataError, match="or pass --chat to train on its conversations"):
        prepare([data], tmp_path / "d", progress=False)
    assert not (tmp_path / "r").exists()


# ---- resume, other tokenizers -------------------------------------------------------------------


def test_a_chat_run_resumes_exactly(tmp_path):
    """The redrawn windows come from the sampler's own generator, so a chat run stopped and
    resumed computes what one that never stopped does."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "c.jsonl", task.records()[:80])
    common = dict(data=str(data), chat=True, progress=False, device="cpu", n_layer=1, n_head=2,
                  n_embd=16, block_size=32, batch_size=4, eval_interval=4, eval_iters=1,
                  sample_tokens=0, lr_decay_iters=8)
    train(out=str(tmp_path / "straight"), max_iters=8, **common)
    train(out=str(tmp_path / "split"), max_iters=4, **common)
    train(out=str(tmp_path / "split"), max_iters=8, resume=True, progress=False)
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-0000008" / "model.safetensors")
            for run in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r.get("val_loss") for r in rundir.read_metrics(tmp_path / run)]
              for run in ("straight", "split")]
    assert losses[0] == losses[1]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_mask_covers_the_replies_bytes_with_byte_level_tokenizers(tmp_path, tokenizer):
    """Replies are tokenized apart from the prompt around them, so the learnt tokens decode to
    exactly the replies (" cba\\n" each), whatever the tokenizer merges elsewhere."""
    records = task.records()[:40]
    prepare([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "data", chat=DEFAULT,
            tokenizer=tokenizer, progress=False, **({"vocab_size": 300} if tokenizer == "bpe"
                                                   else {}))
    data = load_prepared(tmp_path / "data")
    replies = []
    for split in ("train", "val"):
        ids, mask = np.asarray(getattr(data, split)), np.asarray(getattr(data, f"{split}_mask"))
        learnt = ids[mask == 1].tolist()
        assert learnt.count(data.tokenizer.eos_id) == data.meta["num_docs"][split]
        replies += data.tokenizer.decode(learnt).split("\n")[:-1]
    assert sorted(replies) == sorted(" " + r["messages"][-1]["content"] for r in records)


# ---- chat with LoRA -----------------------------------------------------------------------------


def test_a_chat_fine_tune_with_lora_stores_serves_and_merges_its_template(tmp_path):
    """`train --chat --init-from BASE --lora-rank 4`: the adapter-only run keeps the template and
    the loss mask, the server renders chat prompts with that template, and `export --merge` and
    `--to hf` keep it."""
    qa = ChatTemplate.from_dict(QA, "QA")
    records = task.records()[:60]
    text = "".join(qa.render([(m["role"], m["content"]) for m in r["messages"]])
                   .removesuffix(qa.generation) for r in records)
    (tmp_path / "base.txt").write_text(text * 2)  # every character the conversations use
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    data = write_jsonl(tmp_path / "c.jsonl", records)
    tiny = ["--quiet", "--device", "cpu", "--threads", "1", "--batch-size", "4", "--max-iters",
            "4", "--eval-interval", "4", "--eval-iters", "1", "--sample-tokens", "0"]
    assert main(["train", "--data", str(tmp_path / "base.txt"), "--out", str(tmp_path / "base"),
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "32",
                 *tiny]) == 0
    run = tmp_path / "lora"
    assert main(["train", "--data", str(data), "--chat", "--chat-template", str(tmp_path / "qa.json"),
                 "--init-from", str(tmp_path / "base"), "--lora-rank", "4", "--out", str(run),
                 *tiny]) == 0
    mcfg, tcfg = rundir.read_config(run)
    assert mcfg.lora_rank == 4 and tcfg.chat
    assert load_template(run) == qa
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["chat_template"] == QA and meta["loss_mask"]
    assert meta["train_learnt_tokens"] < meta["train_tokens"]

    messages = [{"role": "user", "content": "reverse abc"}]
    with serving(create_app(load(run, device="cpu"), template=load_template(run))) as base:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1 + len(qa.render([("user", "reverse abc")]))

    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert rundir.read_config(tmp_path / "merged")[0].lora_rank == 0
    assert load_template(tmp_path / "merged") == qa
    # and the HF export (merged) carries it as tokenizer_config.json's Jinja chat_template
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == qa.to_jinja()
