"""GPT-2's tensor names as Hugging Face transformers stores them, against minigpt's.

minigpt's `arch gpt2` layout uses GPT-2's own names (wte, wpe, h.N.ln_1, h.N.attn.c_attn, ...), so
the names map one to one once transformers' `transformer.` prefix is dropped. What differs is the
layout of the four projection matrices: GPT-2's `Conv1D` stores its weight as (in, out), an
`nn.Linear` as (out, in), so those four are transposed on the way in (and on the way out). This is
the only place that knows; the export direction is meant to share it.
"""

from __future__ import annotations

import re

# Prefix GPT2LMHeadModel puts before the body's names (a bare GPT2Model saves without it).
HF_PREFIX = "transformer."

# Per-block tensors (after `h.N.`) that are Conv1D weights: (in, out) in transformers.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Every tensor of a GPT-2 block, by its name after `h.N.`.
BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
TOP_TENSORS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")

# Buffers older transformers versions saved with the weights (the causal mask and its fill value):
# derived, not learnt, so they are skipped. `lm_head.weight` is skipped too: GPT-2 ties it to wte
# (transformers itself overwrites it with wte on load).
_SKIPPED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")


def minigpt_name(hf_name: str) -> str | None:
    """The minigpt name of a tensor in a transformers GPT-2 file; None for one that is skipped."""
    name = hf_name.removeprefix(HF_PREFIX)
    return None if _SKIPPED.match(name) else name


def is_conv1d(name: str) -> bool:
    """Whether the tensor `name` (minigpt's = GPT-2's name) is stored (in, out) by transformers."""
    return name.startswith("h.") and name.split(".", 2)[2] in CONV1D_WEIGHTS


def expected_names(n_layer: int) -> list[str]:
    """Every tensor a GPT-2 of `n_layer` blocks has, in minigpt's names."""
    return [*TOP_TENSORS, *(f"h.{i}.{t}" for i in range(n_layer) for t in BLOCK_TENSORS)]
