"""A minigpt tokenizer as the files `AutoTokenizer.from_pretrained(DIR)` loads: tokenizer.json (a
Hugging Face `tokenizers` model), tokenizer_config.json and special_tokens_map.json.

Each kind keeps its ids, so the model's rows mean the same tokens:
    bpe    the tokenizers model minigpt trained and stores already (byte-level BPE)
    bytes  byte-level BPE with no merges: the 256 bytes (in GPT-2's printable stand-ins) are ids 0-255
    char   BPE with no merges and no pre-tokenizer over the run's characters: one id per character
           (a Unicode code point, as Python's str counts them), joined back with no separator
BOS and EOS follow as special tokens. As in minigpt, text that spells "<|bos|>" is plain text
(`split_special_tokens`), decoding drops special tokens when asked to (`skip_special_tokens=True`;
minigpt always does), and nothing tidies spaces (`clean_up_tokenization_spaces: false`). A run
trained on documents (`--docs`) starts every prompt with BOS, as its engine does: the tokenizer adds
it (add_special_tokens, on by default). The run's chat template goes in as `chat_template`, the
Jinja that `apply_chat_template` renders (ChatTemplate.to_jinja); it holds no BOS, since text that
spells "<|bos|>" is text: tokenize the rendered prompt with the tokenizer (which adds BOS where the
engine does), not with `apply_chat_template(tokenize=True)`, which adds no special tokens.

One difference cannot be expressed: a character a char tokenizer has never seen is an error in
minigpt; a `tokenizers` model has no way to raise, and skips it.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..tokenization import BPETokenizer, ByteTokenizer, CharTokenizer
from ..tokenization import Tokenizer as MinigptTokenizer
from ..tokenization.base import BOS, EOS
from ..tokenization.bpe import byte_stand_ins


def hf_tokenizer(tok: MinigptTokenizer, bos_prompts: bool = False) -> Tokenizer:
    """The `tokenizers` model that encodes and decodes as `tok` does (ids included)."""
    if isinstance(tok, BPETokenizer):
        hf = Tokenizer.from_str(json.dumps(tok.hf_dict))
    elif isinstance(tok, ByteTokenizer):
        stand_ins = byte_stand_ins()
        hf = Tokenizer(models.BPE(vocab={stand_ins[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    elif isinstance(tok, CharTokenizer):
        hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        hf.decoder = decoders.Fuse()  # the default decoder would join tokens with spaces
    else:
        raise TypeError(f"no Hugging Face form for a {tok.kind} tokenizer")
    if not isinstance(tok, BPETokenizer):  # the trained BPE model has its specials already
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    vocab = hf.get_vocab(with_added_tokens=True)
    assert (vocab[BOS], vocab[EOS], len(vocab)) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    if bos_prompts:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.bos_id)])
    else:
        hf.post_processor = None
    return hf


def tokenizer_files(tok: MinigptTokenizer, block_size: int, bos_prompts: bool = False,
                    chat_template: str | None = None) -> dict[str, str]:
    """File name -> contents of the tokenizer files for a model directory; `chat_template`: the
    Jinja chat template to carry (tokenizer_config.json's key, which transformers reads)."""
    hf = hf_tokenizer(tok, bos_prompts)
    specials = {"bos_token": BOS, "eos_token": EOS}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": block_size,
        "split_special_tokens": True,  # "<|bos|>" typed in a text is text, as in minigpt
        "clean_up_tokenization_spaces": False,  # the default would turn " ." into "."
        "add_bos_token": bos_prompts,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                     "rstrip": False, "single_word": False}
            for i, t in ((tok.bos_id, BOS), (tok.eos_id, EOS))},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {
        "tokenizer.json": hf.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }
