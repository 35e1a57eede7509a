"""Generation: prompt -> stream of tokens/text, with a preallocated KV cache.

The CLI, the Python API and the server all generate through `Engine.stream`. The prompt is prefilled
once; then each step feeds one token through `decode.DecodeStep`. When the context window is full the
cache is rebuilt from the last 3/4 of the window (cached keys carry their absolute positions, learned
or rotary, so they cannot be shifted in place), so generation can go on for any length at the cost of
one re-prefill every block_size/4 tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import rundir
from .decode import DecodeStep, prefill
from .device import resolve_device, resolve_dtype
from .errors import CheckpointError
from .kv_cache import KVCache
from .model import GPT
from .sampling import SamplingParams, sample_next_token
from .tokenization import Tokenizer


@dataclass
class StreamEvent:
    index: int  # which of the num_samples streams
    text: str  # newly decodable text ("" while a multi-byte character is incomplete)
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS) or "length" on the stream's last event


Prompt = str | Sequence[int]  # text, or token ids that are used as they are


class Engine:
    """A model and its tokenizer, ready to generate. Stateless between calls: each call owns its KV
    cache and its random generator, so several threads may generate at once (the server does)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, bos_prompts: bool = False,
                 step: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bos_prompts = bos_prompts  # trained on BOS ... EOS documents: prompts start a document
        self.step = step
        self.device = next(model.parameters()).device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt -> ids. Text: empty prompts start from BOS; document models always start with
        BOS. Ids are taken as given (the caller encoded them)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        ids = self.tokenizer.encode(prompt)
        if not ids or self.bos_prompts:
            ids = [self.tokenizer.bos_id, *ids]
        return ids

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[torch.Tensor]:
        """Yield the next token of every stream, (num_samples,) per step, max_new_tokens times."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        T, steps, rows = self.block_size, params.max_new_tokens, params.num_samples
        keep = max(1, T - T // 4)
        prompt = torch.tensor(list(prompt_ids)[-T:], dtype=torch.long, device=self.device)
        tokens = torch.empty(rows, len(prompt) + steps, dtype=torch.long, device=self.device)
        tokens[:, : len(prompt)] = prompt
        n = len(prompt)
        cache = KVCache.for_model(self.model, rows)
        decode = DecodeStep(self.model)
        last = prefill(self.model, tokens[:, :n], cache)  # the prompt, in one forward
        for i in range(steps):
            nxt = sample_next_token(last, gen, params.temperature, params.top_k, params.top_p)
            tokens[:, n] = nxt
            n += 1
            yield nxt
            if i == steps - 1:
                return  # no forward for a token nobody will sample
            if cache.pos == T:  # window full: rebuild the cache from the most recent tokens
                # (all but the newest, which the decode step then adds: batching.py does the same)
                cache.reset()
                if keep > 1:
                    prefill(self.model, tokens[:, n - keep : n - 1], cache, logits=False)
            last = decode(tokens[:, n - 1], cache)

    def stream(self, prompt: Prompt = "", params: SamplingParams | None = None,
               **settings: Any) -> Iterator[StreamEvent]:
        """Text as it is generated; every stream ends with an event carrying its finish_reason.

        `params` (default: SamplingParams()) with any field overridden by keyword, e.g.
        `stream("ROMEO:", max_new_tokens=50, seed=1)`. Bad settings and a prompt the tokenizer
        cannot encode raise here, before anything is generated.
        """
        params = (params or SamplingParams()).replace(**settings)
        return self._events(self.encode_prompt(prompt), params)

    def _events(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        rows, last_step = params.num_samples, params.max_new_tokens - 1
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(rows)]
        done = [False] * rows
        for step, nxt in enumerate(self.generate_ids(prompt_ids, params)):
            last = step == last_step
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if params.stop_at_eos and tok == self.tokenizer.eos_id:
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

    def generate(self, prompt: Prompt = "", params: SamplingParams | None = None,
                 **settings: Any) -> str:
        """One completion of `prompt` (the prompt itself is not included)."""
        return self.generate_many(prompt, 1, params, **settings)[0]

    def generate_many(self, prompt: Prompt = "", num_samples: int | None = None,
                      params: SamplingParams | None = None, **settings: Any) -> list[str]:
        """`num_samples` completions of `prompt` (default: params.num_samples), in one batch."""
        params = (params or SamplingParams()).replace(num_samples=num_samples, **settings)
        parts: list[list[str]] = [[] for _ in range(params.num_samples)]
        for ev in self._events(self.encode_prompt(prompt), params):
            parts[ev.index].append(ev.text)
        return ["".join(p) for p in parts]


def load(run_dir: str | Path, checkpoint: str = "best", device: str = "auto",
         dtype: str = "auto") -> Engine:
    """Load a trained run for generation: `minigpt.load("runs/x").generate("ROMEO:")`.

    `dtype` is the weights' precision here (auto: bf16 on GPUs that have it, float32 on CPU); the KV
    cache follows it. Sampling itself always runs in float32.
    """
    run_dir = Path(run_dir)
    mcfg, tcfg = rundir.read_config(run_dir)
    tokenizer = rundir.read_tokenizer(run_dir)
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(
            f"{run_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {mcfg.vocab_size}"
        )
    path, meta = ckpt.find_for_inference(run_dir, checkpoint)
    model = GPT(mcfg)
    ckpt.load_weights(model, path / ckpt.WEIGHTS)
    dev = resolve_device(device)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    return Engine(model, tokenizer, bos_prompts=tcfg.docs is not None, step=meta.get("step"))
