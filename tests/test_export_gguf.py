"""`minigpt export RUN --to gguf`: what the file holds (read back with gguf.GGUFReader), which layouts
are refused, and, when llama-cpp-python is installed (`make test-llama`), that llama.cpp itself loads
the file, tokenizes like minigpt, computes the same logits and decodes the same greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS, run_cli
from minigpt import checkpoint as ckpt
from minigpt import rundir
from minigpt.chat_template import DEFAULT, ChatTemplate
from minigpt.engine import load
from minigpt.errors import ConfigError
from minigpt.interop.gguf import EXPORTABLE, OUTTYPES, byte_level, export_gguf
from minigpt.training.run import train

gguf = pytest.importorskip("gguf", reason="GGUF export needs the 'gguf' extra")

# Tiny, but with a context that holds a prompt plus 40 generated tokens.
MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=8, eval_iters=2,
             sample_tokens=0, warmup_iters=2, max_iters=40, eval_interval=40)
RUNS = {  # name -> layout and tokenizer; together they cover every exported tensor and vocabulary
    "gpt2-bpe": dict(arch="gpt2", tokenizer="bpe", tokenizer_vocab_size=300),
    "modern-char": dict(arch="modern", qk_norm=False),
    "gpt2-bytes-untied-docs": dict(arch="gpt2", tokenizer="bytes", tie_embeddings=False, docs="lines"),
    "portable-bpe": dict(arch="portable", tokenizer="bpe", tokenizer_vocab_size=300),
    "stablelm-char": dict(arch="stablelm"),
}
TEXTS = [  # what tokenizers disagree on: spaces, digits, contractions, newlines, a special's text
    CORPUS[:300], "  Speak,  speak.\n\n\nAll:\t resolved  ", "you're I'll we've 1234 12 x1y2",
    "<|bos|>First<|eos|> Citizen", "",
]
UNICODE = ["café naïve — “quoted” 東京 🙂\r\n", "\u00a0non-breaking\u2009thin \U0001f600x"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-runs")
    (root / "corpus.txt").write_text(CORPUS + "café naïve — “quoted” 東京 🙂\n", encoding="utf-8")
    out = {}
    for name, settings in RUNS.items():
        train(data=str(root / "corpus.txt"), out=str(root / name), progress=False, seed=1,
              **{**MODEL, **settings})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-files")
    return {name: Path(export_gguf(run, root / f"{name}.gguf")["path"]) for name, run in runs.items()}


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def minigpt_weights(run: Path) -> dict[str, np.ndarray]:
    path, _ = ckpt.find_for_inference(run, "best")
    return {k: v.numpy() for k, v in ckpt.read_weights(path / ckpt.WEIGHTS).items()}


# --- the file, read back --------------------------------------------------------------------------


def test_gpt2_file_holds_gpt2_hyperparameters_and_exact_weights(runs, exported):
    reader = gguf.GGUFReader(exported["gpt2-bpe"])
    meta = fields(reader)
    cfg, _ = rundir.read_config(runs["gpt2-bpe"])
    assert meta["general.architecture"] == "gpt2"
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"],
            meta["gpt2.attention.head_count"], meta["gpt2.feed_forward_length"]) == (64, 32, 2, 2, 128)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["general.file_type"] == 0  # all float32
    tensors = {t.name: t for t in reader.tensors}
    w = minigpt_weights(runs["gpt2-bpe"])
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    pairs = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
             "output_norm.bias": "ln_f.bias", "blk.1.attn_qkv.weight": "h.1.attn.c_attn.weight",
             "blk.0.ffn_down.weight": "h.0.mlp.c_proj.weight", "blk.0.attn_norm.bias": "h.0.ln_1.bias"}
    for name, ours in pairs.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensors[name].shape) == list(reversed(w[ours].shape))  # GGUF: innermost first
        assert np.array_equal(np.asarray(tensors[name].data).reshape(w[ours].shape), w[ours]), name
    assert len(tensors) == 4 + 12 * cfg.n_layer  # embeddings, final norm, 12 per block


def test_bpe_vocabulary_is_written_as_gpt2_byte_level_bpe(runs, exported):
    meta = fields(gguf.GGUFReader(exported["gpt2-bpe"]))
    tok = rundir.read_tokenizer(runs["gpt2-bpe"])
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == tok.vocab_size == 300
    assert all(tokens[i] == byte_level(tok.token_bytes(i)) for i in range(300) if i not in (0, 1))
    assert (tokens[tok.bos_id], tokens[tok.eos_id]) == ("<|bos|>", "<|eos|>")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 1]  # specials are control tokens
    merges = tok.hf_dict["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert meta["tokenizer.ggml.add_bos_token"] is False  # a stream model: prompts start as given


def test_modern_layout_without_qk_norm_is_jais2_with_rotary_over_the_whole_head(exported):
    reader = gguf.GGUFReader(exported["modern-char"])
    meta = fields(reader)
    assert meta["general.architecture"] == "jais2"
    assert meta["jais2.rope.dimension_count"] == 16  # head_dim: every dimension is rotated
    assert meta["jais2.rope.freq_base"] == 10000.0
    names = {t.name for t in reader.tensors}
    assert "position_embd.weight" not in names and "output.weight" not in names


def test_portable_layout_is_qwen3_with_separate_qkv_qk_norms_and_swiglu(runs, exported):
    reader = gguf.GGUFReader(exported["portable-bpe"])
    meta = fields(reader)
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (meta["qwen3.rope.dimension_count"], meta["qwen3.attention.key_length"],
            meta["qwen3.feed_forward_length"]) == (16, 16, 96)  # SwiGLU: 8/3 x 32, up to 32s
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    w = minigpt_weights(runs["portable-bpe"])
    qkv, fc = w["h.1.attn.c_attn.weight"], w["h.1.mlp.c_fc.weight"]
    for name, ours in (("attn_q", qkv[:32]), ("attn_k", qkv[32:64]), ("attn_v", qkv[64:]),
                       ("ffn_gate", fc[:96]), ("ffn_up", fc[96:]),
                       ("attn_q_norm", w["h.1.attn.ln_q.weight"]),
                       ("attn_k_norm", w["h.1.attn.ln_k.weight"])):
        assert np.array_equal(tensors[f"blk.1.{name}.weight"].reshape(ours.shape), ours), name
    assert not any(n.endswith(".bias") for n in tensors)  # no biases in the layout, none written
    assert len(tensors) == 2 + 11 * 2  # embeddings, final norm, 11 per block


def test_stablelm_layout_has_per_head_qk_norms_zero_norm_biases_and_an_output_matrix(runs, exported):
    reader = gguf.GGUFReader(exported["stablelm-char"])
    meta = fields(reader)
    assert meta["general.architecture"] == "stablelm"
    assert meta["stablelm.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["stablelm.rope.dimension_count"] == 16  # the whole head is rotated
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    w = minigpt_weights(runs["stablelm-char"])
    for name, ours in (("attn_q_norm", "ln_q"), ("attn_k_norm", "ln_k")):
        per_head = tensors[f"blk.1.{name}.weight"].reshape(2, 16)  # {head_dim, n_head}
        assert np.array_equal(per_head, np.tile(w[f"h.1.attn.{ours}.weight"], (2, 1))), name
    assert not tensors["blk.0.attn_norm.bias"].any() and not tensors["output_norm.bias"].any()
    # llama.cpp's stablelm requires output.weight: the tied head is written out
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])


def test_char_vocabulary_assembles_multibyte_characters_from_their_own_bytes(runs, exported):
    meta = fields(gguf.GGUFReader(exported["modern-char"]))
    tok = rundir.read_tokenizer(runs["modern-char"])
    assert meta["tokenizer.ggml.tokens"][tok.stoi["é"]] == byte_level("é".encode())  # "Ã©"
    merges = meta["tokenizer.ggml.merges"]
    assert "Ã ©" in merges  # é = C3 A9
    # 東 (3 bytes) is built left to right; 🙂 (4 bytes) in three merges
    b = "東".encode()
    assert f"{byte_level(b[:1])} {byte_level(b[1:2])}" in merges
    assert f"{byte_level(b[:2])} {byte_level(b[2:])}" in merges
    e = "🙂".encode()  # the corpus's only 4-byte character: the merges starting with its lead byte
    assert [m for m in merges if m.startswith(byte_level(e[:1]))] == [
        f"{byte_level(e[:i])} {byte_level(e[i:i + 1])}" for i in (1, 2, 3)]


def test_untied_head_and_document_models_carry_output_and_add_bos(runs, exported):
    reader = gguf.GGUFReader(exported["gpt2-bytes-untied-docs"])
    meta = fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    head = minigpt_weights(runs["gpt2-bytes-untied-docs"])["lm_head.weight"]
    assert np.array_equal(np.asarray(tensors["output.weight"].data).reshape(head.shape), head)
    assert meta["tokenizer.ggml.add_bos_token"] is True  # --docs: minigpt prompts start with BOS
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:256] == [byte_level(bytes([b])) for b in range(256)] and len(tokens) == 258


def test_checkpoint_step_and_last_choose_what_is_exported(runs, tmp_path):
    info = export_gguf(runs["gpt2-bpe"], tmp_path / "s.gguf", checkpoint="40")
    assert info["step"] == 40 and info["architecture"] == "gpt2"
    with pytest.raises(Exception, match="no checkpoint at step 7"):
        export_gguf(runs["gpt2-bpe"], tmp_path / "x.gguf", checkpoint="7")
    assert not (tmp_path / "x.gguf").exists()


QA = ChatTemplate(system="{content}\n\n", user="Q: {content}\r\n", assistant="A: {content}\n",
                  generation="A:", stop=("\nQ:",))
CHAT = [("system", "Be terse."), ("user", "First?"), ("assistant", "Speak."), ("user", "{{ x }}")]


def rendered(jinja_text: str, add_generation_prompt: bool = True) -> str:
    """The Jinja chat template rendered as transformers and llama-cpp-python render it."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(jinja_text).render(
        messages=[{"role": r, "content": c} for r, c in CHAT], add_generation_prompt=add_generation_prompt)


def test_the_file_carries_the_runs_chat_template(runs, exported, tmp_path):
    """tokenizer.chat_template (llama.cpp's key) is the run's template as Jinja: the default for a
    run that stores none, the stored one otherwise; it renders what minigpt's server renders."""
    meta = fields(gguf.GGUFReader(exported["modern-char"]))
    assert meta["tokenizer.chat_template"] == DEFAULT.to_jinja()
    assert rendered(meta["tokenizer.chat_template"]) == DEFAULT.render(CHAT)
    run = tmp_path / "qa"
    shutil.copytree(runs["modern-char"], run)
    rundir.write_chat_template(run, QA.to_dict())
    export_gguf(run, tmp_path / "qa.gguf")
    template = fields(gguf.GGUFReader(tmp_path / "qa.gguf"))["tokenizer.chat_template"]
    assert template == QA.to_jinja() and rendered(template) == QA.render(CHAT)
    assert rendered(template, False) == QA.render(CHAT).removesuffix("A:")


# --- --outtype: how matrices are stored ----------------------------------------------------------


def stored(reader) -> dict:
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.fixture(scope="module")
def outtype_files(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-outtypes")
    return {t: Path(export_gguf(runs["modern-char"], root / f"{t}.gguf", outtype=t)["path"])
            for t in OUTTYPES}


def test_each_outtype_stores_matrices_as_it_says_and_norms_as_float32(runs, outtype_files):
    T = gguf.GGMLQuantizationType
    expected = {"f32": (T.F32, 0), "f16": (T.F16, 1), "bf16": (T.BF16, 32), "q8_0": (T.Q8_0, 7)}
    w = minigpt_weights(runs["modern-char"])
    for outtype, path in outtype_files.items():
        reader = gguf.GGUFReader(path)
        matrix_type, file_type = expected[outtype]
        assert fields(reader)["general.file_type"] == file_type
        tensors = stored(reader)
        for name, (kind, _) in tensors.items():
            one_d = name.endswith((".bias", "_norm.weight"))
            assert kind == (T.F32 if one_d else matrix_type), (outtype, name)
        qkv = w["h.1.attn.c_attn.weight"]
        values = tensors["blk.1.attn_qkv.weight"][1].reshape(qkv.shape)
        if outtype == "q8_0":  # 8 bits per value and one f16 scale per 32: within half a step,
            # plus what rounding the scale to f16 (11 bits) moves 127 steps by
            step = np.abs(qkv.reshape(-1, 32)).max(-1, keepdims=True) / 127
            error = np.abs(values.reshape(-1, 32) - qkv.reshape(-1, 32))
            assert (error <= step * (0.5 + 127 * 2.0 ** -11)).all() and error.max() > 0
        else:  # exactly the weights rounded to the type
            rounded = {"f32": qkv, "f16": qkv.astype(np.float16).astype(np.float32),
                       "bf16": torch.from_numpy(qkv).bfloat16().float().numpy()}[outtype]
            assert np.array_equal(values, rounded), outtype
        norm = tensors["blk.0.attn_norm.weight"][1]
        assert np.array_equal(norm, w["h.0.ln_1.weight"])  # norms exact in every type
    sizes = {t: p.stat().st_size for t, p in outtype_files.items()}
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]


def test_q8_0_keeps_matrices_whose_rows_do_not_divide_32_at_f16_and_says_so(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS, encoding="utf-8")
    train(data=str(tmp_path / "c.txt"), out=str(tmp_path / "run"), progress=False, seed=1,
          **{**MODEL, "n_embd": 48, "max_iters": 2, "eval_interval": 2}, arch="gpt2")
    proc = run_cli("export", str(tmp_path / "run"), "--to", "gguf", "--outtype", "q8_0",
                   "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 0, proc.stderr
    tensors = stored(gguf.GGUFReader(tmp_path / "m.gguf"))
    T = gguf.GGMLQuantizationType
    # rows of 48 values: every matrix that reads the embedding; ffn_down reads 192 = 6 x 32
    assert tensors["blk.0.attn_qkv.weight"][0] == T.F16 and tensors["token_embd.weight"][0] == T.F16
    assert tensors["blk.0.ffn_down.weight"][0] == T.Q8_0
    assert "kept at f16 (rows not a multiple of 32): token_embd.weight, position_embd.weight, " \
        "blk.0.attn_qkv.weight" in proc.stdout
    assert "ffn_down" not in proc.stdout


# --- refusals: one line, nothing written ----------------------------------------------------------

REFUSED = {  # config.json change -> the words the one line must contain
    "qk-norm": ({"qk_norm": True}, "qk_norm before rotary (--qk-norm-order before_rope) is "
                "Persimmon's order"),
    "qk-norm-after-rope": ({"qk_norm": True, "qk_norm_order": "after_rope"},
                           "qk_norm after rotary (--qk-norm-order after_rope)"),
    "qk-norm-learned": ({"qk_norm": True, "pos_emb": "learned", "activation": "gelu_tanh"},
                        "qk_norm (a per-head LayerNorm of queries and keys) is in no llama.cpp "
                        "architecture with learned positions"),
    "rmsnorm": ({"norm": "rmsnorm"}, "norm rmsnorm is exported as llama.cpp's qwen3, which needs "
                "the portable layout's switches (this run: activation relu2, qk_norm False, "
                "qk_norm_weight False, bias True)"),
    "erf-gelu": ({"activation": "gelu", "pos_emb": "learned"}, "activation gelu (the exact, erf"),
    "rope-gelu": ({"activation": "gelu_tanh"}, "pos_emb rope with activation gelu_tanh"),
    "swiglu-bias": ({"activation": "swiglu"}, "exported as llama.cpp's stablelm, which needs rotary "
                    "positions and no biases (this run: bias True)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_layouts_without_an_exact_llama_cpp_architecture_are_refused(runs, tmp_path, case):
    change, words = REFUSED[case]
    run = tmp_path / "run"
    shutil.copytree(runs["modern-char"], run)
    config = json.loads((run / "config.json").read_text())
    config["model"].update(change)
    (run / "config.json").write_text(json.dumps(config))
    proc = run_cli("export", str(run), "--to", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt: error: cannot export to GGUF: ")
    assert words in lines[0] and EXPORTABLE in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_out_is_kept_unless_overwrite(runs, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export_gguf(runs["gpt2-bpe"], out)
    assert out.read_bytes() == b"mine"
    export_gguf(runs["gpt2-bpe"], out, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp file left behind


def test_out_in_a_missing_directory_or_a_directory_is_one_line(runs, tmp_path):
    for out, words in ((tmp_path / "nowhere" / "m.gguf", "does not exist"),
                       (tmp_path, "is a directory")):
        with pytest.raises(ConfigError, match=words):
            export_gguf(runs["gpt2-bpe"], out)
    assert list(tmp_path.iterdir()) == []


# --- llama.cpp itself -----------------------------------------------------------------------------

LOGIT_ATOL = {  # llama.cpp computes in float32 too, in its own order of operations (measured here:
    # 8e-7 for jais2, float32 rounding), but its CPU GELU reads a float16 table (ggml's
    # GGML_GELU_FP16), which costs the gpt2 layout about 4 digits (measured: 1e-4 on logits of ~2.5)
    "gpt2-bpe": 1e-3, "gpt2-bytes-untied-docs": 1e-3, "modern-char": 1e-5, "portable-bpe": 1e-5,
    "stablelm-char": 1e-5,
}


@pytest.fixture(scope="module")
def llama(exported):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; `make test-llama` installs it "
                            "(it compiles llama.cpp, a few minutes) and runs these tests")
    models = {}
    for name, path in exported.items():
        models[name] = llama_cpp.Llama(
            model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
            type_k=0, type_v=0,  # a float32 KV cache (llama.cpp's default is float16)
            verbose=False)
    yield models
    for m in models.values():
        m.close()


def llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


@pytest.mark.parametrize("name", RUNS)
def test_llama_cpp_tokenizes_exactly_like_minigpt(runs, llama, name):
    tok = rundir.read_tokenizer(runs[name])
    texts = TEXTS + UNICODE
    if tok.kind == "char":  # only text minigpt's char tokenizer accepts: the corpus's characters
        texts = [CORPUS[:300], "", "  Speak,  speak.\n\n\nAll:  resolved  ", "café naïve — 東京 🙂",
                 "“quoted”\n\n"]
    assert len(texts) >= 5
    for text in texts:
        assert llama_ids(llama[name], text) == tok.encode(text), repr(text)


def test_llama_cpp_reads_the_chat_template_and_renders_the_servers_prompt(llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama["modern-char"].metadata["tokenizer.chat_template"]
    prompt = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")(
        messages=[{"role": r, "content": c} for r, c in CHAT]).prompt
    assert prompt == DEFAULT.render(CHAT)


@pytest.mark.parametrize("name", RUNS)
def test_llama_cpp_logits_match_minigpt(runs, llama, name):
    engine = load(runs[name], device="cpu", dtype="float32")
    ids = engine.encode_prompt(CORPUS[:40])[:48]
    with torch.no_grad():
        ours = engine.model(torch.tensor([ids]))[0][0].numpy()
    llm = llama[name]
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < LOGIT_ATOL[name]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize("name", RUNS)
def test_llama_cpp_greedy_tokens_equal_minigpt_engine(runs, llama, name):
    engine = load(runs[name], device="cpu", dtype="float32")
    prompt, n = "First Citizen:\n", 40
    events = list(engine.stream(prompt, temperature=0, max_new_tokens=n, stop_at_eos=False))
    ours = [e.token for e in events]
    assert len(ours) == n and engine.generate(prompt, temperature=0, max_new_tokens=n,
                                              stop_at_eos=False) == "".join(e.text for e in events)
    llm = llama[name]
    prompt_ids = engine.encode_prompt(prompt)
    assert len(prompt_ids) + n <= 64  # within the context: no window shift on either side
    # llama.cpp's "add special tokens" follows the file's add_bos_token: BOS for document models
    assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == prompt_ids
    llm.reset()
    theirs = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, reset=True):
        theirs.append(int(tok))
        if len(theirs) == n:
            break
    assert theirs == ours


# --- llama.cpp on the smaller types --------------------------------------------------------------

# Text the runs never saw, in the characters they know: perplexity on it compares the types.
HELD_OUT = "All:\nYou are resolved to speak rather than die?\n\nFirst Citizen:\n"


@pytest.fixture(scope="module")
def llama_outtypes(outtype_files):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; `make test-llama` installs it")
    # ggml's "extra buffer types" (the AMX and repacked layouts it moves q8_0 matrices into on CPUs
    # that have them) died of a general protection fault on this project's build machine (AMX
    # reported, apparently not granted) on any batch of 8+ tokens; the plain CPU buffers compute the
    # same q8_0 dot products. llama-cpp-python has no flag for it: its default model params do.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
        models = {t: llama_cpp.Llama(model_path=str(p), n_ctx=64, n_batch=64, n_threads=1,
                                     logits_all=True, type_k=0, type_v=0, verbose=False)
                  for t, p in outtype_files.items()}
    yield models
    for m in models.values():
        m.close()


def llama_perplexity(llm, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] given what precedes each, from llama.cpp's own logits."""
    llm.reset()
    llm.eval(ids)
    logits = torch.tensor(np.asarray(llm.scores[: len(ids) - 1]))
    return float(torch.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


def llama_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_of_f32_and_f16_files_equal_minigpt(runs, llama_outtypes, outtype):
    engine = load(runs["modern-char"], device="cpu", dtype="float32")
    prompt, n = "First Citizen:\n", 40
    ours = [e.token for e in engine.stream(prompt, temperature=0, max_new_tokens=n, stop_at_eos=False)]
    assert llama_greedy(llama_outtypes[outtype], engine.encode_prompt(prompt), n) == ours


def test_llama_cpp_q8_0_perplexity_is_within_2_percent_of_f32(runs, llama_outtypes):
    tok = rundir.read_tokenizer(runs["modern-char"])
    ids = tok.encode(HELD_OUT)
    assert len(ids) <= 64
    ppl = {t: llama_perplexity(llama_outtypes[t], ids) for t in ("f32", "q8_0")}
    engine = load(runs["modern-char"], device="cpu", dtype="float32")
    with torch.no_grad():  # the f32 file is minigpt's own perplexity
        ours = float(engine.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[1].exp())
    assert ppl["f32"] == pytest.approx(ours, rel=1e-5)
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02, ppl
