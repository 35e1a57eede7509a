"""`minigpt export RUN --to hf --out DIR`: a run as a directory stock transformers loads, with no
`trust_remote_code`:

    DIR/config.json              a stock architecture's config (hf_model.py says which, and why)
    DIR/model.safetensors        the checkpoint's weights under that architecture's names
    DIR/generation_config.json   BOS/EOS and minigpt's sampling defaults
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (hf_tokenizer.py), the
                                 config with the run's chat template as Jinja (`chat_template`)
    DIR/README.md                a model card: architecture, data, validation loss, the commands

A layout no stock architecture computes exactly is refused before anything is written. DIR is
written as a temporary directory beside it and renamed into place, so a failed export leaves nothing
behind; an existing non-empty DIR is replaced only with `overwrite`, and only if it is a model
directory (holds a config.json), never a folder of someone's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .. import __version__, chat_template, lora, rundir
from ..config import ModelConfig, TrainConfig, resolve
from ..data.dataset import is_prepared, load_prepared
from ..engine import load
from ..errors import ConfigError, MiniGPTError
from ..fsio import replaced_dir
from ..sampling import SamplingParams
from . import hf_model
from .hf_tokenizer import tokenizer_files


def export_hf(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
              overwrite: bool = False) -> dict[str, Any]:
    """Write the run's `checkpoint` (best | last | a step) as a transformers model directory."""
    run_dir, out = Path(run_dir), Path(out)
    mcfg, tcfg = rundir.read_config(run_dir)
    refused = hf_model.refusal(mcfg)
    if refused:
        raise ConfigError(f"cannot export {run_dir} to hf: {refused[0]}; {refused[1]}")
    template = chat_template.load_template(run_dir)  # what `serve` renders chat prompts with
    check_out_dir(out, overwrite)
    engine = load(run_dir, checkpoint, device="cpu", dtype="float32")  # weights as trained
    # a LoRA run: its adapters folded into its base (`--to peft` writes them apart: peft.py)
    model, tokenizer = lora.merged(engine.model), engine.tokenizer
    arch = hf_model.architecture(mcfg)
    weights = {k: v.detach().contiguous()
               for k, v in arch.weights(model.config, model.state_dict()).items()}
    specials = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    summary = {
        "run_dir": str(run_dir), "out": str(out), "step": engine.step, "architecture": arch.name,
        "model_type": arch.model_type, "params": model.num_params(),
        "exported_params": sum(t.numel() for t in weights.values()),
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        **_evaluation(run_dir, engine.step), "checkpoint": checkpoint,
        "chat_template": "stored" if rundir.read_chat_template(run_dir) is not None else "default",
    }
    files = {
        "config.json": _json({**arch.config(mcfg), **specials}),
        "generation_config.json": _json(_generation_config(specials)),
        **tokenizer_files(tokenizer, mcfg.block_size, bos_prompts=tcfg.documents,
                          chat_template=template.to_jinja()),
        "README.md": model_card(summary, arch, mcfg, tcfg, _data_meta(run_dir, tcfg), template),
    }
    write_directory(out, files, weights)
    return summary


def _json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def _generation_config(specials: dict[str, int]) -> dict[str, Any]:
    """minigpt's sampling defaults (top_k 0: transformers' default would be 50). No max_length:
    transformers warns on every `generate(max_new_tokens=...)` when one is set."""
    params = SamplingParams()
    return {**specials, "pad_token_id": specials["eos_token_id"], "do_sample": True,
            "temperature": params.temperature, "top_k": params.top_k or 0,
            "top_p": params.top_p or 1.0}


# --- the output directory ------------------------------------------------------------------------


def check_out_dir(out: Path, overwrite: bool, marker: str = "config.json", what: str = "model"
                  ) -> None:
    """--out is new, empty, or (with `overwrite`) an earlier export: a directory holding `marker`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it, or "
                              "choose another --out")
        if not (out / marker).is_file():
            raise ConfigError(f"{out} is not a {what} directory (no {marker}); --overwrite replaces "
                              "only an earlier export, choose another --out")


def write_directory(out: Path, files: dict[str, str], weights: dict[str, Any],
                    weights_name: str = "model.safetensors") -> None:
    """Write everything into a temp directory beside `out`, fsync it, then rename it to `out`."""
    with replaced_dir(out) as tmp:
        save_file(weights, str(tmp / weights_name), metadata={"format": "pt"})
        os.chmod(tmp / weights_name, 0o644)  # safetensors creates it owner-only
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())


# --- what the model card says --------------------------------------------------------------------


def _evaluation(run_dir: Path, step: int) -> dict[str, Any]:
    """Validation loss and bits per byte that metrics.jsonl logged at the exported step."""
    rows = []
    if rundir.metrics_path(run_dir).exists():
        rows = [r for r in rundir.read_metrics(run_dir) if r.get("iter") == step and "val_loss" in r]
    row = rows[-1] if rows else {}
    return {k: row.get(key) for k, key in (("val_loss", "val_loss"), ("val_bpb", "val_bpb"),
                                           ("train_loss", "eval_train_loss"))}


def _data_meta(run_dir: Path, tcfg: TrainConfig) -> dict[str, Any] | None:
    for path in (run_dir / "data", tcfg.data):
        if path and is_prepared(path):
            try:
                return load_prepared(path).meta
            except MiniGPTError:
                return None
    return None


def train_command(mcfg: ModelConfig, tcfg: TrainConfig) -> str:
    """A `minigpt train` command that rebuilds this run's config: the flags that differ from the
    defaults they would otherwise take (the backend's and arch's first, as those move the rest)."""
    flags: dict[str, Any] = {}
    for key, value, which in (("backend", tcfg.backend, 1), ("arch", mcfg.arch, 0)):
        if getattr(resolve(None, overrides=flags)[which], key) != value:
            flags[key] = value
    base = resolve(None, overrides=flags)
    for cfg, default in zip((mcfg, tcfg), base):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.metadata.get("cli", True) and value != getattr(default, f.name):
                flags[f.name] = value
    args = ["minigpt", "train", *(["--data", tcfg.data] if tcfg.data else []), "--out", tcfg.out]
    if tcfg.tokenizer != TrainConfig.tokenizer:
        args += ["--tokenizer", tcfg.tokenizer]
    if tcfg.tokenizer_vocab_size is not None:
        args += ["--vocab-size", str(tcfg.tokenizer_vocab_size)]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):  # a `multiple` field: one comma-separated value
            args += [flag, ",".join(value)]
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "not logged" if x is None else f"{x:.{digits}f}"


CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- minigpt
- {model_type}
---

# {name}

A language model of {params:,} parameters trained with minigpt {version}, exported as a stock
transformers `{arch}`: it loads with no custom code.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out}")
model = AutoModelForCausalLM.from_pretrained("{out}")
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0], skip_special_tokens=True))
```

The context is {block_size} tokens: keep prompt and new tokens within it. minigpt's own engine
slides its window to go on past it; transformers does not (GPT-2's position table ends there).

## Architecture

| | |
|---|---|
| transformers class | `{arch}` (`model_type: {model_type}`) |
| layers, heads, width | {n_layer}, {n_head}, {n_embd} |
| context | {block_size} tokens |
| vocabulary | {vocab_size:,} tokens ({tokenizer} tokenizer); BOS id {bos_id}, EOS id {eos_id} |
| parameters | {params_text} |
| minigpt layout | {layout} |

{summary}. The logits equal minigpt's to float32 rounding.

## Data

{data}

## Evaluation

At step {step} (checkpoint `{checkpoint}`): validation loss {val_loss} nats per token,
{val_bpb} bits per byte; training loss {train_loss}.

## How it was made

```bash
{train_command}
minigpt export {run_arg} --to hf --out {out_arg} --checkpoint {checkpoint}
```

## Tokenizer

`tokenizer.json` encodes and decodes every text as minigpt's {tokenizer} tokenizer does, with the
same ids. Text that spells `<|bos|>` is text; decode with `skip_special_tokens=True`, as minigpt does.
{tokenizer_notes}

{chat_line}
"""


def model_card(s: dict[str, Any], arch: hf_model.Architecture, mcfg: ModelConfig,
               tcfg: TrainConfig, data: dict[str, Any] | None,
               template: chat_template.ChatTemplate = chat_template.DEFAULT) -> str:
    extra = s["exported_params"] - s["params"]
    params = f"{s['params']:,}" + (f" ({s['exported_params']:,} stored, of which {extra:,} are fixed "
                                   "zeros and ones: see below)" if extra else "")
    if data:
        sources = ", ".join(f"`{Path(p).name}`" for p in data.get("sources") or []) or "not recorded"
        data_text = (f"{sources}: {data['train_tokens']:,} training and {data['val_tokens']:,} "
                     f"validation tokens ({data.get('train_bytes', 0):,} bytes of training text); "
                     f"documents: {data.get('docs') or 'none, one continuous stream'}.")
    else:
        data_text = f"`{tcfg.data or 'the bundled Tiny Shakespeare'}` (its prepared data is not in the run)."
    fields = {
        **s, **{k: getattr(mcfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
        "name": Path(s["run_dir"]).resolve().name, "version": __version__, "arch": arch.name,
        "summary": arch.summary, "params_text": params, "data": data_text,
        "layout": ", ".join(f"{k}={getattr(mcfg, k)}" for k in (
            "arch", "pos_emb", "norm", "activation", "qk_norm", "qk_norm_order", "qk_norm_weight",
            "bias", "tie_embeddings")),
        **{k: _fmt(s[k]) for k in ("val_loss", "val_bpb", "train_loss")},
        "train_command": train_command(mcfg, tcfg), "run_arg": shlex.quote(s["run_dir"]),
        "out_arg": shlex.quote(s["out"]), "tokenizer_notes": _tokenizer_notes(s["tokenizer"], tcfg),
        "chat_line": _chat_line(s.get("chat_template"), template),
    }
    return CARD.format(**fields)


def _chat_line(source: str | None, template: chat_template.ChatTemplate) -> str:
    """One line: which chat template tokenizer_config.json carries (`apply_chat_template`)."""
    which = ("the one this run was trained with (its chat_template.json)" if source == "stored"
             else "minigpt's default")
    example = template.render([("user", "Hi")])
    return (f"Chat template: {which}, `{example!r}` for one user message, as Jinja in "
            "tokenizer_config.json (`tokenizer.apply_chat_template`).")


def _tokenizer_notes(kind: str, tcfg: TrainConfig) -> str:
    notes = []
    if tcfg.documents:
        notes.append("The model was trained on documents that start with BOS, so the tokenizer adds "
                     "BOS to every prompt (as minigpt's engine does).")
    if kind == "char":
        notes.append("A character outside the vocabulary is an error in minigpt; this tokenizer "
                     "skips it.")
    return " ".join(notes)
