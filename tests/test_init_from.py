"""`train --init-from SRC`: starting a run from a minigpt run or from a Hugging Face GPT-2 directory.

Hermetic: the GPT-2 directories are tiny random `GPT2LMHeadModel`s that transformers builds from a
config and saves with `save_pretrained`, with a byte-level BPE trained here by `tokenizers`; no
download. What a user would notice is asserted: the run computes the same logits as transformers,
starts at its source's validation loss, learns a second text faster than from scratch, resumes
exactly, records where it came from, and refuses what it cannot do exactly.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minigpt
from conftest import CORPUS, TINY, run_cli
from minigpt import checkpoint as ckpt
from minigpt import fsio, rundir
from minigpt.errors import CheckpointError, ConfigError, TokenizerError
from minigpt.tokenization import load_tokenizer, save_tokenizer
from minigpt.tools.info import format_run_info, run_info

ENDOFTEXT = "<|endoftext|>"
TEXTS = [CORPUS[:400], "Héllo wörld — 日本語 🎉  multiple   spaces\n\ttabs and\r\nCRLF", "it's we'll 42x",
         " leading space", ""]
EVAL = dict(batch_size=8, eval_iters=2, sample_tokens=0, progress=False)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def gpt2_tokenizer(out: Path):
    """A GPT-2-style byte-level BPE (what GPT-2's own files hold), saved both ways GPT-2 ships it:
    tokenizer.json, and vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    return tok


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{activation: (directory, the transformers model)}: tiny random GPT-2s saved by transformers."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, act in enumerate(("gelu_new", "gelu")):
        d = root / act
        tok = gpt2_tokenizer(d)
        eot = tok.token_to_id(ENDOFTEXT)
        torch.manual_seed(i)
        cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32,
                                      n_layer=2, n_head=2, activation_function=act,
                                      bos_token_id=eot, eos_token_id=eot)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        model.save_pretrained(d, safe_serialization=True)
        out[act] = (d, model)
    return out


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny char-level run trained on CORPUS, and its corpus file."""
    root = tmp_path_factory.mktemp("src")
    (root / "a.txt").write_text(CORPUS, encoding="utf-8")
    minigpt.train(data=str(root / "a.txt"), out=str(root / "run"), max_iters=150,
                  eval_interval=150, **{**TINY, "progress": False})
    return root / "run", root / "a.txt"


def second_text() -> str:
    """CORPUS's words in a new order: the same characters (a char tokenizer encodes it), other text."""
    rng = random.Random(0)
    lines = []
    for line in CORPUS.splitlines():
        words = line.split(" ")
        rng.shuffle(words)
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


# --- GPT-2's tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab+merges"])
def test_gpt2_tokenizer_encodes_and_decodes_as_transformers_does(files, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minigpt.interop.hf_import import read_tokenizer

    gpt2_tokenizer(tmp_path)
    if files == "vocab+merges":
        (tmp_path / "tokenizer.json").unlink()
    ours = read_tokenizer(tmp_path)
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ours.bos_id == ours.eos_id == slow.convert_tokens_to_ids(ENDOFTEXT)
    assert ours.vocab_size == len(slow)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == slow.encode(text), text
        assert ours.decode(ids) == slow.decode(ids) == text
    # it survives the run directory's tokenizer.json like any minigpt tokenizer
    save_tokenizer(ours, tmp_path / "saved.json")
    again = load_tokenizer(tmp_path / "saved.json")
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (again.bos_id, again.eos_id) == (ours.bos_id, ours.eos_id)


# --- a Hugging Face GPT-2 directory ---------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
@pytest.mark.parametrize("block_size", [32, 16])
def test_a_transformers_gpt2_initialises_a_run_with_its_logits(hf, act, block_size, tmp_path):
    src, model = hf[act]
    (tmp_path / "a.txt").write_text(CORPUS, encoding="utf-8")
    run = tmp_path / "run"
    minigpt.train(data=str(tmp_path / "a.txt"), out=str(run), init_from=str(src), max_iters=1,
                  block_size=block_size, **EVAL)
    engine = minigpt.load(run, checkpoint="0")  # step 0: the source's weights, as evaluated
    assert engine.model.config.block_size == block_size
    assert engine.model.config.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[act]
    x = torch.randint(0, model.config.vocab_size, (3, block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(x).logits
        ours = engine.model(x)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    _, tcfg = rundir.read_config(run)
    assert tcfg.init_from == str(src.resolve()) and tcfg.init_step is None
    assert tcfg.init_sha256 == fsio.sha256_file(src / "model.safetensors")
    assert tcfg.tokenizer == "bpe" and tcfg.lr == 3e-4  # the fine-tuning defaults applied
    assert engine.tokenizer.eos_id == model.config.eos_token_id


def test_a_pickle_beside_the_safetensors_is_never_opened(hf, tmp_path):
    src, _ = hf["gelu_new"]
    d = tmp_path / "both"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")  # opening it would fail loudly
    (tmp_path / "a.txt").write_text(CORPUS, encoding="utf-8")
    minigpt.train(data=str(tmp_path / "a.txt"), out=str(tmp_path / "run"), init_from=str(d),
                  max_iters=1, block_size=16, **EVAL)
    assert metrics(tmp_path / "run")[0]["iter"] == 0


# --- a minigpt run --------------------------------------------------------------------------------


def test_init_from_a_run_starts_at_its_validation_loss(source_run, tmp_path):
    src, text = source_run
    minigpt.train(data=str(text), out=str(tmp_path / "ft"), init_from=str(src), max_iters=10,
                  eval_interval=10, **EVAL)
    first = metrics(tmp_path / "ft")[0]
    source_last = [r for r in metrics(src) if r["val_loss"] is not None][-1]
    assert first["iter"] == 0
    assert first["val_loss"] == pytest.approx(source_last["val_loss"], abs=1e-4)
    assert first["eval_train_loss"] == pytest.approx(source_last["eval_train_loss"], abs=1e-4)
    assert torch.equal(weights(tmp_path / "ft", 0)["wte.weight"], weights(src, 150)["wte.weight"])
    info = run_info(tmp_path / "ft")
    assert info["init_from"] == {"source": str(src.resolve()), "step": 150,
                                 "sha256": json.loads((src / "checkpoints" / "step-0000150" / "meta.json")
                                                      .read_text())["sha256"]["model.safetensors"]}
    assert f"initialised from: {src.resolve()} (step 150, sha256 " in format_run_info(info)


def test_fine_tuning_learns_a_second_text_faster_than_training_from_scratch(source_run, tmp_path):
    src, _ = source_run
    (tmp_path / "b.txt").write_text(second_text(), encoding="utf-8")
    common = dict(data=str(tmp_path / "b.txt"), max_iters=30, eval_interval=30, **EVAL)
    ft = minigpt.train(out=str(tmp_path / "ft"), init_from=str(src), **common)
    scratch = minigpt.train(out=str(tmp_path / "scratch"), **{**TINY, **common})
    before = metrics(tmp_path / "ft")[0]["val_loss"]
    assert ft["best_val_loss"] < before  # fine-tuning helped on the new text
    assert ft["best_val_loss"] < scratch["best_val_loss"] - 0.2  # and beats the same budget from scratch


def test_resume_of_a_fine_tuning_run_is_exact(source_run, tmp_path):
    src, text = source_run
    common = dict(data=str(text), init_from=str(src), eval_interval=10, lr_decay_iters=30,
                  log_interval=5, dropout=0.1, **EVAL)
    minigpt.train(out=str(tmp_path / "straight"), max_iters=30, **common)
    minigpt.train(out=str(tmp_path / "split"), max_iters=10, **common)
    minigpt.train(out=str(tmp_path / "split"), max_iters=30, resume=True, progress=False)
    assert rundir.read_config(tmp_path / "split")[0].dropout == 0.1  # a fine-tune's own setting
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [(r["iter"], r.get("train_loss"), r["val_loss"]) for r in a] == \
        [(r["iter"], r.get("train_loss"), r["val_loss"]) for r in b]
    wa, wb = weights(tmp_path / "straight", 30), weights(tmp_path / "split", 30)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_killed_before_step_0_resumes_from_the_same_source_weights(source_run, tmp_path):
    src, text = source_run
    run = tmp_path / "ft"
    minigpt.train(data=str(text), out=str(run), init_from=str(src), max_iters=5, eval_interval=5,
                  **EVAL)
    first = metrics(run)[0]
    for p in (run / "checkpoints", run / "metrics.jsonl"):  # as if killed before its first save
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    minigpt.train(out=str(run), resume=True, progress=False)
    assert metrics(run)[0] == first


def test_resume_refuses_a_source_whose_weights_changed(source_run, tmp_path):
    src, text = source_run
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    run = tmp_path / "ft"
    minigpt.train(data=str(text), out=str(run), init_from=str(copy), max_iters=5, eval_interval=5,
                  **EVAL)
    shutil.rmtree(run / "checkpoints")  # killed before its first save...
    step = copy / "checkpoints" / "step-0000150"  # ...and the source re-trained in place since
    w = load_file(str(step / ckpt.WEIGHTS))
    save_file({k: v + 1 for k, v in w.items()}, str(step / ckpt.WEIGHTS))
    meta = json.loads((step / ckpt.META).read_text())
    meta["sha256"][ckpt.WEIGHTS] = fsio.sha256_file(step / ckpt.WEIGHTS)
    (step / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed since the run started"):
        minigpt.train(out=str(run), resume=True, progress=False)


# --- refusals (the CLI rows are in test_errors.py) ------------------------------------------------


def test_refusals_through_the_api(source_run, tmp_path):
    src, text = source_run
    out = tmp_path / "new"
    (tmp_path / "u.txt").write_text(CORPUS + "Ünïcode €\n", encoding="utf-8")
    cases = [
        (dict(data=str(tmp_path / "u.txt")), TokenizerError, "cannot encode: 'Ü', 'ï', '€'"),
        (dict(data=str(text), n_layer=3), ConfigError, "--n-layer 3 contradicts"),
        (dict(data=str(text), block_size=64), ConfigError, "larger than the --init-from model's 16"),
        (dict(data=str(text), tokenizer="bytes"), ConfigError, "drop --tokenizer"),
        (dict(data=str(text), init_checkpoint="7"), CheckpointError, "no checkpoint at step 7"),
        (dict(data=str(text), backend="reference"), ConfigError, "torch backend"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(")):
            minigpt.train(out=str(out), init_from=str(src), **kwargs, **EVAL)
        assert not out.exists()
    with pytest.raises(ConfigError, match="drop --preset"):
        minigpt.train(preset="tiny", out=str(out), init_from=str(src), data=str(text), **EVAL)
    with pytest.raises(ConfigError, match="give --init-from"):
        minigpt.train(out=str(out), init_checkpoint="last", data=str(text), **EVAL)


def test_a_hub_name_offline_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing to fall back on
    (tmp_path / "a.txt").write_text(CORPUS, encoding="utf-8")
    result = run_cli("train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run"),
                     "--init-from", "openai-community/gpt2", "--quiet", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("minigpt: error: --init-from openai-community/gpt2: not a local "
                                    "directory, and downloading it from the Hugging Face Hub failed (")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "hf-home"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_bos_and_eos_follow_config_json_when_it_names_them(tmp_path):
    """A minigpt bpe run exported in GPT-2 format has <|bos|> and <|eos|>: config.json names them."""
    from minigpt.interop.hf_import import read_tokenizer
    from minigpt.tokenization import BPETokenizer

    tok = BPETokenizer.train([CORPUS], vocab_size=300)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok.hf_dict), encoding="utf-8")
    ours = read_tokenizer(tmp_path, (tok.bos_id, tok.eos_id))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert [ours.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert ours.encode("<|bos|>") == tok.encode("<|bos|>")  # typed in a text, it stays text


@pytest.mark.parametrize("tokenizer", ["char", "bytes"])
def test_an_hf_export_comes_back_in_with_the_same_validation_loss(tokenizer, tmp_path):
    """Round trip: a GPT-2-layout run -> `minigpt export --to hf` -> `train --init-from` the export
    on the same text: the first evaluation equals the source run's last one."""
    from minigpt.interop.hf import export_hf

    text = tmp_path / "a.txt"
    text.write_text(CORPUS, encoding="utf-8")
    src = tmp_path / "src"
    minigpt.train(data=str(text), out=str(src), arch="gpt2", optimizer="adamw", max_iters=20,
                  eval_interval=20, tokenizer=tokenizer, **{**TINY, "progress": False})
    export_hf(src, tmp_path / "export")
    minigpt.train(data=str(text), out=str(tmp_path / "ft"), init_from=str(tmp_path / "export"),
                  max_iters=1, eval_interval=1, seed=1337, **EVAL)
    first = metrics(tmp_path / "ft")[0]
    source_last = [r for r in metrics(src) if r["val_loss"] is not None][-1]
    assert first["iter"] == 0
    assert first["val_loss"] == pytest.approx(source_last["val_loss"], abs=1e-4)
