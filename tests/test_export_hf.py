"""`minigpt export RUN --to hf`: stock transformers loads the directory with no custom code and
computes what minigpt computes.

Logits equal minigpt's for every exportable layout (random weights, so that biases and norm weights
matter), greedy `generate` equals minigpt's engine token for token on trained runs, `pipeline` runs,
and `AutoTokenizer` encodes and decodes the corpus and arbitrary Unicode exactly as minigpt's char,
bytes and bpe tokenizers do. Layouts with no stock equivalent are refused with one line and nothing
written. Tests that load the export need the `hf` extra (transformers) and skip without it; the
refusals, the output directory's handling and the model card do not.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli_harness
from conftest import CORPUS
from minigpt import checkpoint as ckpt
from minigpt import rundir
from minigpt.chat_template import DEFAULT, load_template
from minigpt.config import ModelConfig, TrainConfig, resolve
from minigpt.engine import load
from minigpt.interop import hf as hf_export
from minigpt.interop import hf_model
from minigpt.interop.hf import export_hf, train_command
from minigpt.interop.hf_tokenizer import tokenizer_files
from minigpt.model import GPT
from minigpt.sampling import SamplingParams
from minigpt.tokenization import ByteTokenizer, CharTokenizer, train_tokenizer

NO_HF = "transformers is not installed: the hf extra (pip install 'minigpt[hf]', or make setup)"
UNICODE = "Καλημέρα κόσμε! 春眠不觉晓，处处闻啼鸟。 café naïve e\u0301 😀 🇫🇷 \t\r\n <|bos|> <|eos|>"

# every exportable layout: (id, ModelConfig switches, the transformers class it becomes)
EXPORTABLE = [
    ("gpt2", dict(arch="gpt2"), "GPT2LMHeadModel"),
    ("gpt2-exact-gelu", dict(arch="gpt2", activation="gelu"), "GPT2LMHeadModel"),
    ("gpt2-no-bias-untied-relu2", dict(arch="gpt2", bias=False, tie_embeddings=False,
                                       activation="relu2"), "GPT2LMHeadModel"),
    ("modern-no-qk-norm", dict(arch="modern", qk_norm=False), "GPTNeoXForCausalLM"),
    ("modern-no-qk-norm-no-bias-untied-gelu", dict(arch="modern", qk_norm=False, bias=False,
                                                   tie_embeddings=False, activation="gelu_tanh"),
     "GPTNeoXForCausalLM"),
    ("modern-rmsnorm-no-qk-norm", dict(arch="modern", qk_norm=False, norm="rmsnorm"),
     "LlamaForCausalLM"),
    ("modern-rmsnorm-no-qk-norm-no-bias-untied-gelu",
     dict(arch="modern", qk_norm=False, norm="rmsnorm", bias=False, tie_embeddings=False,
          activation="gelu"), "LlamaForCausalLM"),
    ("modern-qk-norm-before-rope", dict(arch="modern", qk_norm_order="before_rope"),
     "PersimmonForCausalLM"),
    ("modern-qk-norm-before-rope-no-bias-untied-gelu",
     dict(arch="modern", qk_norm_order="before_rope", bias=False, tie_embeddings=False,
          activation="gelu_tanh"), "PersimmonForCausalLM"),
    ("modern-qk-norm-weight", dict(arch="modern", qk_norm_weight=True), "PersimmonForCausalLM"),
    ("portable", dict(arch="portable"), "Qwen3ForCausalLM"),
    ("portable-untied", dict(arch="portable", tie_embeddings=False), "Qwen3ForCausalLM"),
    ("portable-no-qk-norm", dict(arch="portable", qk_norm=False), "LlamaForCausalLM"),
    ("portable-no-qk-norm-bias", dict(arch="portable", qk_norm=False, bias=True),
     "LlamaForCausalLM"),
    ("stablelm", dict(arch="stablelm"), "StableLmForCausalLM"),
    ("stablelm-no-qk-gains-untied", dict(arch="stablelm", qk_norm_weight=False,
                                         tie_embeddings=False), "StableLmForCausalLM"),
    ("stablelm-no-qk-norm", dict(arch="stablelm", qk_norm=False), "StableLmForCausalLM"),
]
# layouts refused: (id, switches, the text the one line names)
REFUSED = [
    ("modern-qk-norm-after-rope", dict(arch="modern", qk_norm_order="after_rope"),
     "--qk-norm-order after_rope is a LayerNorm of each head's queries"),
    ("modern-rmsnorm", dict(arch="modern", norm="rmsnorm"), "--qk-norm is an RMS norm"),
    ("modern-rmsnorm-before-rope", dict(arch="modern", norm="rmsnorm", qk_norm_order="before_rope"),
     "--qk-norm is an RMS norm"),
    ("gpt2-qk-norm", dict(arch="gpt2", qk_norm=True), "learned position embeddings normalises"),
    ("gpt2-rmsnorm", dict(arch="gpt2", norm="rmsnorm"), "has no RMSNorm (--norm rmsnorm)"),
    ("portable-after-rope", dict(arch="portable", qk_norm_order="after_rope"),
     "Qwen3 applies its QK-norm gains before the rotary rotation"),
    ("portable-relu2", dict(arch="portable", activation="relu2"),
     "has a SwiGLU MLP without biases (this run: --activation relu2, bias False)"),
    ("portable-bias", dict(arch="portable", bias=True), "bias True"),
    ("modern-swiglu", dict(arch="modern", activation="swiglu"), "StableLM, the transformers "
     "architecture with LayerNorm and a gated MLP (--activation swiglu), has no biases"),
    ("stablelm-after-rope", dict(arch="stablelm", qk_norm_order="after_rope"),
     "--qk-norm-order after_rope is a LayerNorm of each head's queries"),
    ("gpt2-swiglu", dict(arch="gpt2", activation="swiglu"), "has no gated MLP"),
]


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason=NO_HF)


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train([CORPUS + UNICODE])


def make_run(path: Path, tokenizer=None, steps=(1,), **layout) -> tuple[Path, GPT]:
    """A run directory holding GPT(cfg) with random weights, biases and norm weights included."""
    tokenizer = tokenizer or char_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                      block_size=64, **layout)
    torch.manual_seed(0)
    model = GPT(cfg)
    path.mkdir(parents=True)
    rundir.write_config(path, cfg, TrainConfig(out=str(path)))
    rundir.write_tokenizer(path, tokenizer)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ckpt.save_checkpoint(path, step, model, None, {"val_loss": 2.0}, keep=len(steps),
                             is_best=step == steps[0])
    return path, model.eval()


def test_the_default_layout_exports_as_stablelm():
    mcfg, _ = resolve(None)
    assert (mcfg.arch, mcfg.qk_norm, mcfg.qk_norm_order) == ("stablelm", True, "before_rope")
    assert hf_model.refusal(mcfg) is None and hf_model.architecture(mcfg).name == "StableLmForCausalLM"


@pytest.mark.parametrize("layout,arch", [(c[1], c[2]) for c in EXPORTABLE], ids=[c[0] for c in EXPORTABLE])
def test_logits_equal_minigpts(tmp_path, transformers, layout, arch):
    run, model = make_run(tmp_path / "run", **layout)
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [arch] and "auto_map" not in config
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == model.config.tie_embeddings
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_gpt2_export_is_a_stock_gpt2_directory(tmp_path, transformers):
    run, _ = make_run(tmp_path / "run", arch="gpt2")
    export_hf(run, tmp_path / "hf")
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D (in, out)
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    tok = char_tokenizer()
    assert (gen.bos_token_id, gen.eos_token_id, gen.top_k) == (tok.bos_id, tok.eos_id, 0)


@pytest.mark.parametrize("layout,message", [(c[1], c[2]) for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_layouts_with_no_stock_equivalent_are_refused_in_one_line(tmp_path, layout, message):
    run, _ = make_run(tmp_path / "run", **layout)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli_harness.run(["export", run, "--to", "hf", "--out", tmp_path / "hf"], tmp_path)
    assert result.rc == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minigpt: error: cannot export {run} to hf: ")
    assert message in lines[0] and "; train with " in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- trained runs: generation and the model card ---------------------------------------------------

TRAIN = ("--n-layer 2 --n-head 2 --n-embd 32 --block-size 64 --batch-size 8 --eval-iters 2 "
         "--sample-tokens 0 --warmup-iters 2 --max-iters 30 --eval-interval 15 --quiet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs trained through the CLI: GPT-2's layout, the modern one without QK-norm on
    documents (so prompts start with BOS), the modern one (as Persimmon), Qwen3's and the default
    (StableLM's)."""
    ws = tmp_path_factory.mktemp("trained")
    (ws / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    runs = {"gpt2": "--arch gpt2 --optimizer adamw", "modern": "--arch modern --no-qk-norm --docs blank",
            "persimmon": "--arch modern", "qwen3": "--arch portable", "stablelm": ""}
    for name, flags in runs.items():
        cmd = f"train --data corpus.txt --out {name} {TRAIN} {flags}"
        assert cli_harness.run(shlex.split(cmd), ws).rc == 0
        result = cli_harness.run(["export", name, "--to", "hf", "--out", f"{name}-hf"], ws)
        assert result.rc == 0 and result.stderr == "", result
        assert result.stdout.startswith(f"exported {name} step 30 as a ")
    return {name: ws / name for name in runs}


@pytest.mark.parametrize("name", ["gpt2", "modern", "persimmon", "qwen3", "stablelm"])
def test_greedy_generate_equals_the_engine(trained, transformers, name):
    run = trained[name]
    engine = load(run, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(f"{run}-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{run}-hf").eval()
    prompt = "First Citizen:\n"  # 15 characters + 50 new tokens (+ BOS) fit the context of 64
    ids = engine.encode_prompt(prompt)
    assert tok(prompt)["input_ids"] == ids  # the documents run's BOS included
    params = SamplingParams(temperature=0, max_new_tokens=50, stop_at_eos=False)
    ours = engine.token_ids(ids, params)[0]
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=50,
                      eos_token_id=None)[0, len(ids):].tolist()  # minigpt's ids go past EOS too
    assert out == ours
    text = engine.generate(prompt, temperature=0, max_new_tokens=50, stop_at_eos=False)
    assert tok.decode(out, skip_special_tokens=True) == text


def test_pipeline_text_generation_runs(trained, transformers):
    pipe = transformers.pipeline("text-generation", model=f"{trained['gpt2']}-hf", device="cpu")
    text = pipe("First", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert text.startswith("First") and len(text) > len("First")


def test_model_card_reports_the_run(trained):
    run = trained["gpt2"]
    card = (run.parent / "gpt2-hf" / "README.md").read_text()
    best = rundir.read_best(run)
    row = next(r for r in rundir.read_metrics(run) if r.get("iter") == best["step"] and "val_loss" in r)
    assert f"validation loss {row['val_loss']:.4f}" in card and f"{row['val_bpb']:.4f} bits per byte" in card
    assert "`GPT2LMHeadModel`" in card and "pipeline_tag: text-generation" in card
    assert "minigpt train --data corpus.txt --out gpt2 " in card
    assert "minigpt export gpt2 --to hf --out gpt2-hf --checkpoint best" in card


@pytest.mark.parametrize("name", ["gpt2", "modern", "persimmon", "qwen3", "stablelm"])
def test_the_cards_train_command_rebuilds_the_runs_config(trained, name):
    mcfg, tcfg = rundir.read_config(trained[name])
    argv = shlex.split(train_command(mcfg, tcfg))
    from minigpt.cli import _config_overrides, build_parser

    args = build_parser().parse_args(argv[1:])
    model, train = resolve(args.preset, args.config, _config_overrides(args))
    assert dataclasses_equal(model, mcfg, ignore={"vocab_size"}) and dataclasses_equal(train, tcfg)


def dataclasses_equal(a, b, ignore=frozenset()) -> bool:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(a).items() if k not in ignore} == \
        {k: v for k, v in dataclasses.asdict(b).items() if k not in ignore}


# --- the tokenizer ----------------------------------------------------------------------------------


def bpe_tokenizer():
    return train_tokenizer("bpe", [CORPUS, UNICODE * 5], vocab_size=300)


TOKENIZERS = {"char": char_tokenizer, "bytes": ByteTokenizer, "bpe": bpe_tokenizer}


def auto_tokenizer(transformers, tok, path: Path, bos_prompts=False):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(tok, 64, bos_prompts).items():
        (path / name).write_text(text, encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(path)


def assert_same(ours, theirs, text: str) -> None:
    ids = ours.encode(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert theirs.decode(ids) == ours.decode(ids) == text


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_auto_tokenizer_round_trips_the_corpus_as_minigpt(tmp_path, transformers, kind):
    ours = TOKENIZERS[kind]()
    theirs = auto_tokenizer(transformers, ours, tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, len(theirs)) == (ours.bos_id, ours.eos_id,
                                                                       ours.vocab_size)
    for text in (CORPUS, UNICODE, "", " ", "\n\n", "<|bos|>hello<|eos|>", "  hear me speak  "):
        assert_same(ours, theirs, text)
    ids = [ours.bos_id, *ours.encode("Speak, speak."), ours.eos_id]
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert theirs.convert_ids_to_tokens(ours.bos_id) == "<|bos|>"


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_an_exported_run_carries_its_tokenizer(tmp_path, transformers, kind):
    ours = TOKENIZERS[kind]()
    run, model = make_run(tmp_path / "run", tokenizer=ours, arch="gpt2")
    export_hf(run, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (hf.config.vocab_size, hf.config.bos_token_id, hf.config.eos_token_id) == \
        (ours.vocab_size, ours.bos_id, ours.eos_id)
    assert_same(ours, theirs, UNICODE)
    ids = torch.tensor([theirs("Speak, speak.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def auto_tokenizers(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason=NO_HF)
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for kind, make in TOKENIZERS.items():
        ours = make()
        out[kind] = (ours, auto_tokenizer(transformers, ours, root / kind))
    return out


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(char_tokenizer().chars)))
def test_char_round_trips_any_text_of_its_vocabulary(auto_tokenizers, text):
    assert_same(*auto_tokenizers["char"], text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bytes_and_bpe_round_trip_any_unicode(auto_tokenizers, text):
    for kind in ("bytes", "bpe"):
        assert_same(*auto_tokenizers[kind], text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 257)))
def test_any_ids_decode_as_minigpt_decodes_them(auto_tokenizers, ids):
    """Byte sequences that are not UTF-8 included: both replace them the same way."""
    for kind in ("bytes", "bpe"):
        ours, theirs = auto_tokenizers[kind]
        ids = [i for i in ids if i < ours.vocab_size]
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_documents_runs_add_bos_to_prompts_as_the_engine_does(tmp_path, transformers):
    ours = char_tokenizer()
    theirs = auto_tokenizer(transformers, ours, tmp_path, bos_prompts=True)
    assert theirs("Speak")["input_ids"] == [ours.bos_id, *ours.encode("Speak")]
    assert theirs("Speak", add_special_tokens=False)["input_ids"] == ours.encode("Speak")


# --- the chat template ------------------------------------------------------------------------------

# a template from a JSON file, with what Jinja's template text would not keep ("\r\n", braces)
CUSTOM = {"system": "{content}\n\n", "user": "Q: {content}\r\n", "assistant": "A: {content} {{x}}\n",
          "generation": "A:", "stop": ["\nQ:"]}
CONVERSATIONS = [
    [("user", "Hi")],
    [("system", "Be terse."), ("user", "First Citizen?"), ("assistant", "Speak."), ("user", "café 😀")],
    [("user", "a"), ("assistant", "b\n"), ("user", "{{ c }}")],
]


@pytest.mark.parametrize("stored", [False, True], ids=["default", "from-file"])
def test_the_export_carries_the_chat_template_the_server_renders(tmp_path, transformers, stored):
    """tokenizer_config.json's `chat_template` is the run's template (stored, else the default) as
    Jinja: transformers' apply_chat_template renders what minigpt's server renders, and the
    tokenizer encodes that prompt to the server's ids (BOS included on a documents run)."""
    run, _ = make_run(tmp_path / "run", tokenizer=ByteTokenizer(), arch="gpt2")
    template = DEFAULT
    if stored:
        (tmp_path / "qa.json").write_text(json.dumps(CUSTOM))
        template = load_template(path=tmp_path / "qa.json")
        rundir.write_chat_template(run, template.to_dict())
        rundir.write_config(run, rundir.read_config(run)[0], TrainConfig(out=str(run), docs="lines"))
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template.to_jinja()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert ("Chat template: the one this run was trained with" if stored
            else "Chat template: minigpt's default") in card
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    engine = load(run, device="cpu")
    assert engine.bos_prompts == stored  # the stored case is also a documents run
    for conversation in CONVERSATIONS:
        wire = [{"role": r, "content": c} for r, c in conversation]
        prompt = template.render(conversation)  # what /v1/chat/completions renders
        assert theirs.apply_chat_template(wire, tokenize=False, add_generation_prompt=True) == prompt
        assert (theirs.apply_chat_template(wire, tokenize=False, add_generation_prompt=False)
                == prompt.removesuffix(template.generation))
        assert theirs(prompt)["input_ids"] == engine.encode_prompt(prompt)


# --- checkpoints and the output directory -------------------------------------------------------------


def test_checkpoint_best_last_and_step(tmp_path):
    run, _ = make_run(tmp_path / "run", arch="gpt2", steps=(2, 4))
    assert export_hf(run, tmp_path / "best")["step"] == 2  # best.json points at the first
    assert export_hf(run, tmp_path / "last", checkpoint="last")["step"] == 4
    assert export_hf(run, tmp_path / "four", checkpoint="4")["step"] == 4
    a, b = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("best", "four"))
    assert a != b and b == (tmp_path / "last" / "model.safetensors").read_bytes()


def test_existing_directories_are_replaced_only_when_asked_and_only_if_a_model(tmp_path):
    run, _ = make_run(tmp_path / "run", arch="gpt2", steps=(2, 4))
    out = tmp_path / "hf"
    export_hf(run, out, checkpoint="2")
    with pytest.raises(Exception, match="exists and is not empty; pass --overwrite"):
        export_hf(run, out, checkpoint="4")
    export_hf(run, out, checkpoint="4", overwrite=True)
    assert "At step 4 " in (out / "README.md").read_text()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(Exception, match="is not a model directory"):
        export_hf(run, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    export_hf(run, tmp_path / "empty")  # an empty directory is as good as none
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path / "run", arch="gpt2")
    export_hf(run, tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "save_file", disk_full)
    for out, overwrite in ((tmp_path / "new" / "deeper" / "hf", False), (tmp_path / "old", True)):
        with pytest.raises(OSError):
            export_hf(run, out, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    shutil.rmtree(tmp_path / "old")
