"""Generation: prompt -> stream of tokens/text, with a preallocated KV cache.

The CLI, the Python API and the server all generate through `Engine.stream`. The prompt is prefilled
once; then each step feeds one token through `decode.DecodeStep`. When the context window is full the
cache is rebuilt from the last 3/4 of the window (cached keys carry their absolute positions, learned
or rotary, so they cannot be shifted in place), so generation can go on for any length at the cost of
one re-prefill every block_size/4 tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .decode import DecodeStep
from .device import resolve_device, resolve_dtype
from .errors import CheckpointError, ConfigError
from .kv_cache import KVCache
from .model import GPT
from .sampling import check_sampling, sample_next_token
from .tokenizers import Tokenizer, load_tokenizer


@dataclass
class StreamEvent:
    index: int  # which of the num_samples streams
    text: str  # newly decodable text ("" while a multi-byte character is incomplete)
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS) or "length" on the stream's last event


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, docs: bool = False, step: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.docs = docs  # trained on BOS ... EOS documents: prompts start a document
        self.step = step
        self.device = next(model.parameters()).device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt -> ids. Empty prompts start from BOS; document models always start with BOS."""
        ids = self.tokenizer.encode(prompt)
        if not ids or self.docs:
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every stream, (num_samples,) per step, max_new_tokens times."""
        check_generation(max_new_tokens, temperature, top_k, top_p, num_samples)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        T = self.block_size
        keep = max(1, T - T // 4)
        prompt = torch.tensor(prompt_ids[-T:], dtype=torch.long, device=self.device)
        tokens = torch.empty(num_samples, len(prompt) + max_new_tokens, dtype=torch.long,
                             device=self.device)
        tokens[:, : len(prompt)] = prompt
        n = len(prompt)
        cache = KVCache.for_model(self.model, num_samples)
        decode = DecodeStep(self.model)
        logits, _ = self.model(tokens[:, :n], kv_cache=cache)  # the prompt, in one forward
        last = logits[:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next_token(last, gen, temperature, top_k, top_p)
            tokens[:, n] = nxt
            n += 1
            yield nxt
            if i == max_new_tokens - 1:
                return  # no forward for a token nobody will sample
            if cache.pos == T:  # window full: rebuild the cache from the most recent tokens
                cache.reset()
                logits, _ = self.model(tokens[:, n - keep : n], kv_cache=cache)
                last = logits[:, -1]
            else:
                last = decode(tokens[:, n - 1], cache)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_samples: int = 1,
        stop_at_eos: bool = True,
    ) -> Iterator[StreamEvent]:
        """Text as it is generated; every stream ends with an event carrying its finish_reason."""
        prompt_ids = self.encode_prompt(prompt)
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
        done = [False] * num_samples
        steps = self.generate_ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                  num_samples)
        for step, nxt in enumerate(steps):
            last = step == max_new_tokens - 1
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if stop_at_eos and tok == self.tokenizer.eos_id:
                    done[i] = True
                    yield StreamEvent(i, decoders[i].decode(b"", final=True), tok, "stop")
                    continue
                # Not final even on the last step: a character cut off by max_new_tokens is dropped,
                # never printed as a replacement character.
                text = decoders[i].decode(self.tokenizer.token_bytes(tok))
                done[i] = last
                yield StreamEvent(i, text, tok, "length" if last else None)
            if all(done):
                return

    def generate(self, prompt: str = "", **kwargs) -> str:
        """One completion of `prompt` (the prompt itself is not included)."""
        return self.generate_many(prompt, num_samples=1, **kwargs)[0]

    def generate_many(self, prompt: str = "", num_samples: int = 1, **kwargs) -> list[str]:
        parts: list[list[str]] = [[] for _ in range(num_samples)]
        for ev in self.stream(prompt, num_samples=num_samples, **kwargs):
            parts[ev.index].append(ev.text)
        return ["".join(p) for p in parts]


def check_generation(max_new_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, num_samples: int) -> None:
    if max_new_tokens is None or max_new_tokens < 1:
        raise ConfigError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ConfigError(f"num-samples must be >= 1, got {num_samples}")
    check_sampling(temperature, top_k, top_p)


def load(run_dir: str | Path, checkpoint: str = "best", device: str = "auto",
         dtype: str = "auto") -> Engine:
    """Load a trained run for generation: `minigpt.load("runs/x").generate("ROMEO:")`.

    `dtype` is the weights' precision here (auto: bf16 on GPUs that have it, float32 on CPU); the KV
    cache follows it. Sampling itself always runs in float32.
    """
    run_dir = Path(run_dir)
    mcfg, tcfg = ckpt.read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / ckpt.TOKENIZER)
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(
            f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {mcfg.vocab_size}"
        )
    if checkpoint == "best" and ckpt.best_step(run_dir) is None:
        checkpoint = "last"  # a run stopped before its first evaluation has only `last`
    path, meta, _ = ckpt.find_checkpoint(run_dir, checkpoint)
    model = GPT(mcfg)
    ckpt.load_weights(model, path / ckpt.WEIGHTS)
    dev = resolve_device(device)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    return Engine(model, tokenizer, docs=tcfg.docs is not None, step=meta.get("step"))
