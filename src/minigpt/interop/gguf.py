"""GGUF export: a run's weights, hyperparameters and tokenizer as one file llama.cpp loads.

Owns the mapping from minigpt's layouts to llama.cpp architectures (read from llama.cpp's
src/models/*.cpp, not copied): `gpt2` for the GPT-2 layout, `jais2` for the modern layout without
QK-norm (LayerNorm with biases, fused QKV, rotary in the rotate-half "neox" convention over the whole
head, ReLU^2 MLP with biases, optional output matrix), `qwen3` for the portable layout (RMSNorm,
separate q/k/v without biases, per-head RMS q/k norms with weights before neox rotary, SwiGLU as
ffn_gate/ffn_up/ffn_down), `stablelm` for the stablelm layout (LayerNorm, separate q/k/v without
biases, optional per-head LayerNorm q/k norms before neox rotary, SwiGLU; the LayerNorms' biases are
written as zeros and the q/k norm gains, shared by minigpt's heads, once per head). Anything else is refused with one line that names the blocking switch. Weights are written as float32 by default, as trained: the file is exact.
`outtype` (the names of llama.cpp's convert_hf_to_gguf.py --outtype) stores the matrices as f16, bf16
or q8_0 instead, by the converter's rules: 1-D tensors and norms stay float32, and a matrix whose rows
do not divide q8_0's block of 32 values falls back to f16 (the export lists which). A LoRA run is written with its adapters folded into its
base's weights.

The tokenizer is written in GGUF's own form (tokenizer.ggml.*) as a GPT-2 style byte-level BPE, which
llama.cpp tokenizes the way minigpt does for every kind: `bpe` is that already; `bytes` is the 256
byte tokens with no merges; `char` is one token per character, multi-byte characters assembled from
their bytes by merges that only ever join the bytes of one character.

The run's chat template (the stored one, else minigpt's default: what `serve` renders) is written
as `tokenizer.chat_template`, the Jinja of ChatTemplate.to_jinja: llama.cpp's key, read by its
`--jinja` mode (its built-in formatter knows only the templates it recognises and refuses this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint as ckpt
from .. import lora, rundir
from ..chat_template import load_template
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model import GPT, RMS_NORM_EPS, ROPE_BASE
from ..tokenization import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer
from ..tokenization.base import BOS, EOS
from ..tokenization.bpe import _byte_decoder

LAYERNORM_EPS = 1e-5  # torch's LayerNorm default, which model.make_norm and F.layer_norm use
# llama.cpp architecture -> the (pos_emb, activation) it computes; both use LayerNorm with biases,
# a fused q|k|v projection with bias, no QK-norm and 1/sqrt(head_dim) attention scaling.
ARCHITECTURES = {"gpt2": ("learned", "gelu_tanh"), "jais2": ("rope", "relu2")}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types (gguf.TokenType)
# GPT-2's printable stand-in of each byte: what byte-level BPE token strings are made of.
_STAND_IN = {b: c for c, b in _byte_decoder().items()}
EXPORTABLE = "--arch stablelm, --arch portable, --arch gpt2, or --arch modern --no-qk-norm"
# what --arch portable is, switch by switch: llama.cpp's qwen3 computes exactly this
QWEN3 = dict(pos_emb="rope", activation="swiglu", qk_norm=True, qk_norm_weight=True,
             qk_norm_order="before_rope", bias=False)
# what llama.cpp's stablelm needs besides LayerNorm and SwiGLU; its per-head q/k LayerNorms
# (before rotary) are optional, so QK-norm may be on or off
STABLELM = dict(pos_emb="rope", bias=False)
# --outtype -> (how matrices are stored, general.file_type); names and file types as llama.cpp's
# converter writes them. Held as names so that choosing one needs no `gguf` import.
OUTTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
            "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def _refuse(reason: str) -> ConfigError:
    return ConfigError(f"cannot export to GGUF: {reason}; runs trained with {EXPORTABLE} export "
                       "exactly")


def architecture_for(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what this layout computes, or a refusal
    naming the first switch that no llama.cpp architecture matches."""
    if cfg.norm == "rmsnorm":
        off = [f"{k} {getattr(cfg, k)}" for k, v in QWEN3.items() if getattr(cfg, k) != v]
        if off:  # qwen3 is llama.cpp's RMSNorm architecture that computes this family exactly
            raise _refuse(f"norm rmsnorm is exported as llama.cpp's qwen3, which needs the portable "
                          f"layout's switches (this run: {', '.join(off)})")
        return "qwen3"
    if cfg.norm != "layernorm":
        raise _refuse(f"norm {cfg.norm} has no llama.cpp architecture with this layout's other "
                      "choices")
    if cfg.activation == "swiglu":
        return _stablelm(cfg)
    if cfg.qk_norm:
        raise _refuse(_qk_norm_reason(cfg))
    if cfg.activation == "gelu":
        raise _refuse("activation gelu (the exact, erf GELU) is not llama.cpp gpt2's tanh "
                      "approximation, gelu_tanh")
    for arch, (pos_emb, activation) in ARCHITECTURES.items():
        if (cfg.pos_emb, cfg.activation) == (pos_emb, activation):
            return arch
    raise _refuse(f"no llama.cpp architecture combines pos_emb {cfg.pos_emb} with activation "
                  f"{cfg.activation} (gpt2: learned + gelu_tanh; jais2: rope + relu2)")


def _stablelm(cfg: ModelConfig) -> str:
    """stablelm, llama.cpp's LayerNorm + SwiGLU architecture, for the layouts it computes."""
    off = [f"{k} {getattr(cfg, k)}" for k, v in STABLELM.items() if getattr(cfg, k) != v]
    if cfg.qk_norm and cfg.qk_norm_order != "before_rope":
        off.append(f"qk_norm_order {cfg.qk_norm_order}")
    if off:
        raise _refuse("norm layernorm with activation swiglu is exported as llama.cpp's stablelm, "
                      f"which needs rotary positions and no biases (this run: {', '.join(off)})")
    return "stablelm"


def _qk_norm_reason(cfg: ModelConfig) -> str:
    """Why this run's QK-norm (a parameter-free per-head LayerNorm here: norm is layernorm) has no
    llama.cpp architecture, for the order it sits in."""
    if cfg.pos_emb != "rope":
        return ("qk_norm (a per-head LayerNorm of queries and keys) is in no llama.cpp architecture "
                "with learned positions")
    if cfg.qk_norm_order == "before_rope":
        # Persimmon's order, which export_hf writes as PersimmonForCausalLM; llama.cpp removed its
        # persimmon architecture (ggml-org/llama.cpp#7408; the gguf package has no PERSIMMON), and
        # its other per-head QK LayerNorms before rotary come with SwiGLU MLPs (command-r, stablelm)
        return ("qk_norm before rotary (--qk-norm-order before_rope) is Persimmon's order, and "
                "llama.cpp removed its Persimmon architecture (--to hf exports this run as Persimmon)")
    # a LayerNorm does not commute with a rotation, and llama.cpp's per-head norms after rotary are
    # RMS norms in RMSNorm + SwiGLU models (hunyuan, maincoder, talkie)
    return ("qk_norm after rotary (--qk-norm-order after_rope) is a LayerNorm of the rotated "
            "queries and keys, which no llama.cpp architecture computes")


# --- tokenizer ------------------------------------------------------------------------------------


def byte_level(data: bytes) -> str:
    """Bytes -> the GPT-2 byte-level string llama.cpp's BPE vocabularies are written in."""
    return "".join(_STAND_IN[b] for b in data)


def _bpe_merges(tok: BPETokenizer) -> list[str]:
    model, pre = tok.hf_dict.get("model", {}), tok.hf_dict.get("pre_tokenizer") or {}
    # Only the configuration minigpt trains maps onto llama.cpp's "gpt-2" pre-tokenizer.
    plain = (model.get("type") == "BPE" and not model.get("byte_fallback")
             and model.get("dropout") is None and not model.get("continuing_subword_prefix")
             and tok.hf_dict.get("normalizer") is None and pre.get("type") == "ByteLevel"
             and pre.get("use_regex", True) and not pre.get("add_prefix_space"))
    if not plain:
        raise _refuse("this bpe tokenizer is not plain GPT-2 style byte-level BPE")
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _char_merges(chars: list[str]) -> list[str]:
    """Merges that build each multi-byte character from its bytes, left to right. UTF-8 is
    prefix-free and a merge's right part is always a continuation byte, so no merge can join bytes
    of two different characters: every known character ends as exactly its own token."""
    merges: dict[str, None] = {}  # ordered set
    for c in chars:
        data = c.encode("utf-8")
        for i in range(1, len(data)):
            merges[f"{byte_level(data[:i])} {byte_level(data[i:i + 1])}"] = None
    return list(merges)


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tokenizer in llama.cpp's gpt2 BPE form, ids unchanged."""
    specials = {tok.bos_id: BOS, tok.eos_id: EOS}
    tokens = [specials.get(i) or byte_level(tok.token_bytes(i)) for i in range(tok.vocab_size)]
    types = [TOKEN_CONTROL if i in specials else TOKEN_NORMAL for i in range(tok.vocab_size)]
    if isinstance(tok, BPETokenizer):
        merges = _bpe_merges(tok)
    elif isinstance(tok, CharTokenizer):
        merges = _char_merges(tok.chars)
    elif isinstance(tok, ByteTokenizer):
        merges = []
    else:
        raise _refuse(f"no GGUF form for the {tok.kind} tokenizer")
    if len(set(tokens)) != len(tokens):
        raise _refuse(f"the {tok.kind} tokenizer has two ids for the same text")
    if not merges:
        # llama.cpp requires the merges key and the gguf package cannot write an empty array: one
        # merge of the two specials, which never applies (llama.cpp starts every word from single
        # characters, and no merge ever makes the 7-character "<|bos|>").
        merges = [f"{BOS} {EOS}"]
    return tokens, types, merges


# --- tensors --------------------------------------------------------------------------------------


def _layer_tensors(state: dict[str, np.ndarray], i: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    def get(name: str, size: int | None = None) -> np.ndarray:
        key = f"h.{i}.{name}"
        # a layout without biases: zeros, which add exactly nothing
        return state[key] if key in state else np.zeros(size, np.float32)

    e = cfg.n_embd
    return {
        f"blk.{i}.attn_norm.weight": get("ln_1.weight"),
        f"blk.{i}.attn_norm.bias": get("ln_1.bias", e),
        f"blk.{i}.attn_qkv.weight": get("attn.c_attn.weight"),  # (3e, e): q, k, v rows, head-major
        f"blk.{i}.attn_qkv.bias": get("attn.c_attn.bias", 3 * e),
        f"blk.{i}.attn_output.weight": get("attn.c_proj.weight"),
        f"blk.{i}.attn_output.bias": get("attn.c_proj.bias", e),
        f"blk.{i}.ffn_norm.weight": get("ln_2.weight"),
        f"blk.{i}.ffn_norm.bias": get("ln_2.bias", e),
        f"blk.{i}.ffn_up.weight": get("mlp.c_fc.weight"),
        f"blk.{i}.ffn_up.bias": get("mlp.c_fc.bias", cfg.mlp_hidden),
        f"blk.{i}.ffn_down.weight": get("mlp.c_proj.weight"),
        f"blk.{i}.ffn_down.bias": get("mlp.c_proj.bias", e),
    }


def _qwen3_layer(state: dict[str, np.ndarray], i: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    h, b, H = f"h.{i}", f"blk.{i}", cfg.mlp_hidden
    q, k, v = np.split(state[f"{h}.attn.c_attn.weight"], 3)  # rows: all queries, keys, values
    gate, up = np.split(state[f"{h}.mlp.c_fc.weight"], [H])  # SwiGLU: the gate's rows, then up's
    return {
        f"{b}.attn_norm.weight": state[f"{h}.ln_1.weight"],
        f"{b}.attn_q.weight": q, f"{b}.attn_k.weight": k, f"{b}.attn_v.weight": v,
        f"{b}.attn_q_norm.weight": state[f"{h}.attn.ln_q.weight"],
        f"{b}.attn_k_norm.weight": state[f"{h}.attn.ln_k.weight"],
        f"{b}.attn_output.weight": state[f"{h}.attn.c_proj.weight"],
        f"{b}.ffn_norm.weight": state[f"{h}.ln_2.weight"],
        f"{b}.ffn_gate.weight": gate, f"{b}.ffn_up.weight": up,
        f"{b}.ffn_down.weight": state[f"{h}.mlp.c_proj.weight"],
    }


def _stablelm_layer(state: dict[str, np.ndarray], i: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    h, b, e, H = f"h.{i}", f"blk.{i}", cfg.n_embd, cfg.mlp_hidden
    q, k, v = np.split(state[f"{h}.attn.c_attn.weight"], 3)
    gate, up = np.split(state[f"{h}.mlp.c_fc.weight"], [H])
    zeros = np.zeros(e, np.float32)  # the layout's LayerNorms have no bias: zero adds nothing
    out = {
        f"{b}.attn_norm.weight": state[f"{h}.ln_1.weight"], f"{b}.attn_norm.bias": zeros,
        f"{b}.attn_q.weight": q, f"{b}.attn_k.weight": k, f"{b}.attn_v.weight": v,
        f"{b}.attn_output.weight": state[f"{h}.attn.c_proj.weight"],
        f"{b}.ffn_norm.weight": state[f"{h}.ln_2.weight"], f"{b}.ffn_norm.bias": zeros,
        f"{b}.ffn_gate.weight": gate, f"{b}.ffn_up.weight": up,
        f"{b}.ffn_down.weight": state[f"{h}.mlp.c_proj.weight"],
    }
    if cfg.qk_norm:  # stablelm's are per head, {head_dim, n_head}: each head gets the shared gains
        for name, ours in (("attn_q_norm", "ln_q"), ("attn_k_norm", "ln_k")):
            gain = state.get(f"{h}.attn.{ours}.weight", np.ones(cfg.head_dim, np.float32))
            out[f"{b}.{name}.weight"] = np.tile(gain, (cfg.n_head, 1))
    return out


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array. A torch (out, in) matrix is written as it is: GGUF lists
    dimensions innermost first, so llama.cpp reads it as the {in, out} it expects."""
    cfg = model.config
    state = {k: v.float().numpy() for k, v in ckpt.weights_state(model).items()}
    out = {"token_embd.weight": state["wte.weight"]}
    if cfg.pos_emb == "learned":
        out["position_embd.weight"] = state["wpe.weight"]
    arch = architecture_for(cfg)
    layer = {"qwen3": _qwen3_layer, "stablelm": _stablelm_layer}.get(arch, _layer_tensors)
    for i in range(cfg.n_layer):
        out.update(layer(state, i, cfg))
    out["output_norm.weight"] = state["ln_f.weight"]
    if arch != "qwen3":  # qwen3: no biases anywhere
        out["output_norm.bias"] = state.get("ln_f.bias", np.zeros(cfg.n_embd, np.float32))
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    elif arch == "stablelm":  # the others reuse token_embd when output is absent; stablelm needs it
        out["output.weight"] = state["wte.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")


def stored_types(tensors: dict[str, np.ndarray], outtype: str) -> tuple[dict[str, Any], list[str]]:
    """(tensor name -> GGMLQuantizationType it is stored as, the matrices kept at f16 because their
    rows do not divide the quantisation block). As llama.cpp's converter: 1-D tensors and norms stay
    float32 (they are tiny, and llama.cpp computes norms in float32 anyway)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    types, kept = {}, []
    for name, array in tensors.items():
        if array.ndim <= 1 or name.endswith("_norm.weight"):
            types[name] = gguf.GGMLQuantizationType.F32
        elif array.shape[-1] % block:
            types[name] = gguf.GGMLQuantizationType.F16
            kept.append(name)
        else:
            types[name] = qtype
    return types, kept


# --- the file -------------------------------------------------------------------------------------


def _write_metadata(writer: Any, arch: str, cfg: ModelConfig, tok: Tokenizer, bos_prompts: bool,
                    name: str, step: int | None, outtype: str, chat_template: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    if arch == "qwen3":  # one eps for the layers' norms and the per-head q/k norms, as minigpt's
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    else:
        writer.add_layer_norm_eps(LAYERNORM_EPS)
    if arch in ("jais2", "qwen3", "stablelm"):
        writer.add_rope_dimension_count(cfg.head_dim)  # the whole head is rotated
        writer.add_rope_freq_base(ROPE_BASE)
    tokens, types, merges = gguf_vocab(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's word-splitting regex, as minigpt's bpe uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(bos_prompts)  # document models: minigpt starts every prompt with BOS
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
    writer.add_string("minigpt.tokenizer", tok.kind)
    if step is not None:
        writer.add_uint32("minigpt.step", step)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"--out {out}: directory {out.parent} is not writable")


def _load_model(run_dir: Path, checkpoint: str) -> tuple[GPT, dict[str, Any]]:
    """The checkpoint's model; a LoRA run's with its adapters folded in (llama.cpp's --lora
    adapters are not written: a merged file computes the same)."""
    model, meta = ckpt.load_model(run_dir, checkpoint)
    return lora.merged(model), meta


def export_gguf(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
                overwrite: bool = False, outtype: str = "f32") -> dict[str, Any]:
    """Write the run's checkpoint (best | last | a step) as a GGUF file at `out`, its matrices
    stored as `outtype` (f32 | f16 | bf16 | q8_0).

    Everything is checked before a byte is written; the file appears whole or not at all (written
    beside `out`, then renamed). Returns what was written: path, architecture, step, size, and
    `kept_f16`, the matrices a q8_0 export stored as f16 instead (rows not a multiple of 32).
    """
    check_outtype(outtype)
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the 'gguf' package: pip install 'minigpt[gguf]'") from None
    run_dir, out = Path(run_dir), Path(out)
    cfg, tcfg = rundir.read_config(run_dir)
    tok = rundir.read_tokenizer(run_dir)
    arch = architecture_for(cfg)
    template = load_template(run_dir).to_jinja()  # a malformed chat_template.json is refused here
    gguf_vocab(tok)  # refusals first: nothing is loaded or written for a run that cannot export
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{run_dir}: tokenizer has {tok.vocab_size} tokens but the model "
                              f"expects {cfg.vocab_size}")
    _check_out(out, overwrite)
    model, meta = _load_model(run_dir, checkpoint)
    tensors = gguf_tensors(model)
    types, kept = stored_types(tensors, outtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, arch, cfg, tok, tcfg.documents, run_dir.name, meta.get("step"),
                        outtype, template)
        for name, array in tensors.items():
            writer.add_tensor(name, gguf.quants.quantize(array, types[name]), raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "architecture": arch, "step": meta.get("step"),
            "tensors": len(tensors), "bytes": out.stat().st_size, "tokenizer": tok.kind,
            "outtype": outtype, "kept_f16": kept}
