"""LoRA: `train --init-from RUN --lora-rank R` trains adapters on a frozen base, stores them alone,
and loads, merges and exports them exactly.

Tiny runs (2 layers, 32 dims) on an in-test corpus. Asserted as a user would notice it: only the
adapters move and only they have optimizer state; the adapter file is a small fraction of the
model; every command loads base + adapter, and refuses in one line when the base is gone or
changed; `export --merge` computes the logits of the unmerged run; `--to peft` loads through
peft's own PeftModel onto the base's `--to hf` export with the same logits, for every layout that
exports; a resumed LoRA run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minigpt
from conftest import CORPUS, TINY, run_cli
from minigpt import checkpoint as ckpt
from minigpt import fsio, lora, rundir
from minigpt.config import LORA_TARGETS, ModelConfig, model_config_from_dict
from minigpt.errors import CheckpointError, ConfigError
from minigpt.model import GPT

TRAIN = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd", "block_size")}
QUIET = dict(progress=False)
# layout -> the HF class `--to hf` exports it as (interop/hf_model.py)
LAYOUTS = {
    "persimmon": dict(arch="modern"),
    "gpt2": dict(arch="gpt2"),
    "gpt_neox": dict(arch="modern", qk_norm=False),
    "llama": dict(arch="modern", qk_norm=False, norm="rmsnorm", bias=False),
    "llama_swiglu": dict(arch="modern", qk_norm=False, norm="rmsnorm", bias=False,
                         activation="swiglu"),
    "qwen3": dict(arch="portable"),
    "stablelm": dict(arch="stablelm"),
}


def second_text() -> str:
    """CORPUS's paragraphs in reverse order: the same characters, another text."""
    return "".join(reversed(CORPUS.split("\n\n")))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    (root / "a.txt").write_text(CORPUS, encoding="utf-8")
    (root / "b.txt").write_text(second_text(), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def bases(texts, tmp_path_factory) -> dict[str, Path]:
    """A short base run per layout, trained on a.txt."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, layout in LAYOUTS.items():
        out[name] = root / name
        minigpt.train(data=str(texts / "a.txt"), out=str(out[name]), max_iters=20,
                      eval_interval=20, **TINY, **layout, **QUIET)
    return out


def lora_run(base: Path, texts: Path, out: Path, **kw) -> dict:
    settings = dict(data=str(texts / "b.txt"), out=str(out), init_from=str(base), lora_rank=4,
                    max_iters=10, eval_interval=10, lr=1e-2, **TRAIN, **QUIET)
    return minigpt.train(**{**settings, **kw})


@pytest.fixture(scope="module")
def adapted(bases, texts, tmp_path_factory) -> Path:
    """A LoRA run on the default layout's base."""
    return _adapted(bases["persimmon"], texts, tmp_path_factory.mktemp("lora") / "run")


def _adapted(base: Path, texts: Path, out: Path) -> Path:
    lora_run(base, texts, out)
    return out


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / ckpt.step_dir_name(step)


def ids(rows: int) -> torch.Tensor:
    """Token ids any run here reads: CORPUS has 34 characters (+ BOS, EOS), a context of 16."""
    return torch.randint(0, 30, (rows, 16), generator=torch.Generator().manual_seed(rows))


def logits(model: GPT, x: torch.Tensor, unmerged: bool = False) -> torch.Tensor:
    """The forward's logits; `unmerged`: through the adapters' low-rank path (training mode, no
    dropout in these runs) instead of the weights folded for evaluation."""
    model.train(unmerged)
    with torch.no_grad():
        out = model(x)[0]
    model.eval()
    return out


# --- training --------------------------------------------------------------------------------------


def test_only_the_adapters_train_and_only_they_have_optimizer_state(adapted, bases):
    base = load_file(str(step_dir(bases["persimmon"], 20) / ckpt.WEIGHTS))
    engine = minigpt.load(adapted, checkpoint="10")
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base never moved
    adapters = load_file(str(step_dir(adapted, 10) / ckpt.ADAPTER))
    assert set(adapters) == {f"h.{i}.{t}.{m}" for i in range(2) for t in LORA_TARGETS
                             for m in ("lora_A", "lora_B")}
    assert all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))  # B left 0
    zero = load_file(str(step_dir(adapted, 0) / ckpt.ADAPTER))  # step 0: B = 0, the base exactly
    assert all(not v.any() for k, v in zero.items() if k.endswith("lora_B"))
    trainer = ckpt.load_trainer_state(step_dir(adapted, 10))
    moments = trainer["optimizer"]["state"]
    assert len(moments) == len(adapters)
    assert sum(s["exp_avg"].numel() for s in moments.values()) == engine.model.num_params(
        trainable=True) == sum(v.numel() for v in adapters.values())
    assert not (step_dir(adapted, 10) / ckpt.WEIGHTS).exists()


def test_the_adapter_file_is_a_small_fraction_of_the_model(bases, texts, tmp_path):
    run = tmp_path / "r1"
    lora_run(bases["persimmon"], texts, run, lora_rank=1, max_iters=2, eval_interval=2)
    adapter = (step_dir(run, 2) / ckpt.ADAPTER).stat().st_size
    model = (step_dir(bases["persimmon"], 20) / ckpt.WEIGHTS).stat().st_size
    assert adapter < 0.1 * model, (adapter, model)


def test_adapters_learn_the_new_text(adapted):
    rows = [json.loads(line) for line in (adapted / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert evals[-1] < evals[0]


def test_targets_choose_the_projections(bases, texts, tmp_path):
    run = tmp_path / "attn"
    lora_run(bases["persimmon"], texts, run, lora_targets="attn.c_attn", max_iters=2,
             eval_interval=2)
    assert rundir.read_config(run)[0].lora_targets == ("attn.c_attn",)
    names = load_file(str(step_dir(run, 2) / ckpt.ADAPTER))
    assert sorted(names) == sorted(f"h.{i}.attn.c_attn.{m}" for i in range(2)
                                   for m in ("lora_A", "lora_B"))


def test_resume_of_a_lora_run_is_exact(bases, texts, tmp_path):
    common = dict(eval_interval=4, lr_decay_iters=12, log_interval=2)
    lora_run(bases["persimmon"], texts, tmp_path / "straight", max_iters=12, **common)
    lora_run(bases["persimmon"], texts, tmp_path / "split", max_iters=8, **common)
    minigpt.train(out=str(tmp_path / "split"), max_iters=12, resume=True, **QUIET)
    a, b = (rundir.read_metrics(tmp_path / n) for n in ("straight", "split"))
    assert [(r["iter"], r.get("train_loss"), r["val_loss"]) for r in a] == \
        [(r["iter"], r.get("train_loss"), r["val_loss"]) for r in b]
    wa, wb = (load_file(str(step_dir(tmp_path / n, 12) / ckpt.ADAPTER)) for n in ("straight", "split"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_full_fine_tune_of_a_lora_run_starts_from_its_merged_weights(adapted, texts, tmp_path):
    run = tmp_path / "full"
    minigpt.train(data=str(texts / "b.txt"), out=str(run), init_from=str(adapted), max_iters=1,
                  eval_interval=1, **TRAIN, **QUIET)
    x = ids(2)
    merged = lora.merged(minigpt.load(adapted).model)
    start = minigpt.load(run, checkpoint="0").model
    assert start.config.lora_rank == 0
    torch.testing.assert_close(logits(start, x), logits(merged, x), rtol=0, atol=1e-6)


def test_lora_runs_take_their_own_learning_rate_defaults():
    from minigpt.config import FINETUNE_DEFAULTS, LORA_DEFAULTS, resolve_finetune

    _, full = resolve_finetune(None, {"init_from": "x"})
    _, adapters = resolve_finetune(None, {"init_from": "x", "lora_rank": 8})
    _, given = resolve_finetune(None, {"init_from": "x", "lora_rank": 8, "lr": 1e-3})
    assert (full.lr, adapters.lr, adapters.min_lr, given.lr) == (
        FINETUNE_DEFAULTS["lr"], LORA_DEFAULTS["lr"], LORA_DEFAULTS["min_lr"], 1e-3)


def test_rank_zero_is_the_plain_model_and_old_configs_read_as_before():
    plain = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=8))
    assert not any(lora.is_adapter(k) for k in plain.state_dict())
    assert all(p.requires_grad for p in plain.parameters())
    old = {"vocab_size": 67, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 32,
           "dropout": 0.0, "arch": "gpt2"}  # a config.json written before LoRA existed
    cfg = model_config_from_dict(old)
    assert (cfg.lora_rank, cfg.lora_targets) == (0, LORA_TARGETS)


# --- loading --------------------------------------------------------------------------------------


def test_the_commands_load_base_and_adapter(adapted, bases):
    x = ids(2)
    engine, base = minigpt.load(adapted), minigpt.load(bases["persimmon"])
    assert not torch.allclose(logits(engine.model, x), logits(base.model, x))
    for args in (["sample", str(adapted), "--max-new-tokens", "8", "--seed", "1"],
                 ["eval", str(adapted), "--json"], ["info", str(adapted)],
                 ["inspect", str(adapted), "--text", "First Citizen", "--out",
                  str(adapted.parent / "inspect")]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    info = run_cli("info", str(adapted)).stdout
    assert "LoRA adapters:  rank 4, alpha 16" in info and str(bases["persimmon"]) in info
    engine_text = engine.generate("First", max_new_tokens=8, seed=1)
    assert run_cli("sample", str(adapted), "--prompt", "First", "--max-new-tokens", "8",
                   "--seed", "1").stdout == "First" + engine_text + "\n"


def test_the_server_serves_base_and_adapter(adapted):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from minigpt.serve.app import create_app
    from test_server import serving

    engine = minigpt.load(adapted)
    with serving(create_app(engine, model_id="lora")) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "First", "max_tokens": 12,
                                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.generate("First", max_new_tokens=12,
                                                             temperature=0)


def test_a_missing_or_changed_base_is_one_line(bases, texts, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases["gpt2"], base)
    run = tmp_path / "run"
    lora_run(base, texts, run, max_iters=2, eval_interval=2)
    step = step_dir(base, 20)
    w = load_file(str(step / ckpt.WEIGHTS))  # the base re-trained in place since
    save_file({k: v + 1 for k, v in w.items()}, str(step / ckpt.WEIGHTS))
    meta = json.loads((step / ckpt.META).read_text())
    meta["sha256"][ckpt.WEIGHTS] = fsio.sha256_file(step / ckpt.WEIGHTS)
    (step / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed since"):
        minigpt.load(run)
    with pytest.raises(CheckpointError, match="changed since"):
        minigpt.train(out=str(run), max_iters=4, resume=True, **QUIET)
    shutil.rmtree(base)
    proc = run_cli("sample", str(run))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "which is not there any more" in proc.stderr


# --- merge and exports ----------------------------------------------------------------------------


def test_merge_computes_the_unmerged_logits(adapted, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli("export", str(adapted), "--merge", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    x = ids(3)
    unmerged = logits(minigpt.load(adapted).model, x, unmerged=True)
    merged = minigpt.load(out)
    assert merged.model.config.lora_rank == 0 and merged.step == 10
    assert (step_dir(out, 10) / ckpt.WEIGHTS).is_file()
    torch.testing.assert_close(logits(merged.model, x), unmerged, rtol=0, atol=1e-5)
    assert rundir.read_best(out)["val_loss"] == rundir.read_best(adapted)["val_loss"]
    # greedy text is the same, and the merged run no longer needs the base
    assert merged.generate("First", max_new_tokens=12, temperature=0) == \
        minigpt.load(adapted).generate("First", max_new_tokens=12, temperature=0)
    from minigpt.interop.merge import export_merged

    with pytest.raises(ConfigError, match="has none: it is a full run already"):
        export_merged(out, tmp_path / "again")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peft_loads_the_adapters_onto_the_base_hf_export_with_the_same_logits(
        layout, bases, texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minigpt.interop.hf import export_hf
    from minigpt.interop.peft import export_peft

    run = _adapted(bases[layout], texts, tmp_path / "run")
    export_hf(bases[layout], tmp_path / "hf-base")
    export_peft(run, tmp_path / "adapter")
    export_hf(run, tmp_path / "hf-merged")  # a LoRA run's hf export is merged
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-base").eval()
    with torch.no_grad():
        x = ids(2)
        before = hf_base(x).logits
        model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        theirs = model(x).logits
        hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged")
        merged = hf_merged.eval()(x).logits
    ours = logits(minigpt.load(run).model, x, unmerged=True)
    assert (theirs - before).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 16.0, "LORA")


def test_gguf_export_of_a_lora_run_is_merged(bases, texts, tmp_path):
    pytest.importorskip("gguf")
    from minigpt.interop import gguf as gguf_export

    run = _adapted(bases["gpt_neox"], texts, tmp_path / "run")  # a layout GGUF exports
    model, _ = gguf_export._load_model(run, "best")
    expected = lora.merged(minigpt.load(run).model)
    ours = gguf_export.gguf_tensors(model)
    theirs = gguf_export.gguf_tensors(expected)
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)
    plain = gguf_export.gguf_tensors(minigpt.load(bases["gpt_neox"]).model)
    assert any((ours[k] != plain[k]).any() for k in ours)


def test_peft_export_needs_adapters(bases, tmp_path):
    from minigpt.interop.peft import export_peft

    with pytest.raises(ConfigError, match="has no LoRA adapters"):
        export_peft(bases["gpt2"], tmp_path / "adapter")


def test_a_hugging_face_base_is_refused_in_one_line(texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_init_from import ENDOFTEXT, gpt2_tokenizer

    tok = gpt2_tokenizer(tmp_path / "gpt2")
    eot = tok.token_to_id(ENDOFTEXT)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=16, n_embd=32,
                                  n_layer=2, n_head=2, bos_token_id=eot, eos_token_id=eot)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="is a Hugging Face model: make it a minigpt run first"):
        lora_run(tmp_path / "gpt2", texts, tmp_path / "run")
    assert not (tmp_path / "run").exists()
