"""Generation: prompt -> stream of tokens/text, with a preallocated KV cache.

The CLI, the Python API and the server all generate through `Engine.stream`. The prompt is prefilled
once; then each step feeds one token through `decode.DecodeStep`. When the context window is full the
cache is rebuilt from the last 3/4 of the window (cached keys carry their absolute positions, learned
or rotary, so they cannot be shifted in place), so generation can go on for any length at the cost of
one re-prefill every block_size/4 tokens.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from . import rundir
from .decode import DecodeStep, prefill
from .device import resolve_device, resolve_dtype
from .errors import CheckpointError
from .kv_cache import KVCache
from .model import GPT
from .sampling import SamplingParams, TokenLogprobs, sample_next_token, token_logprobs
from .tokenization import Tokenizer
from .utf8 import Utf8Mask, Utf8Table

BYTE_LEVEL = ("bytes", "bpe")  # tokenizers whose tokens can split a character: masked by default

if TYPE_CHECKING:
    from .inspection import Inspection


@dataclass
class StreamEvent:
    index: int  # which of the num_samples streams
    text: str  # newly decodable text ("" while a multi-byte character is incomplete)
    token: int | None
    finish_reason: str | None = None  # "stop" (EOS) or "length" on the stream's last event
    # with SamplingParams.logprobs: the token's log-probability in the distribution it was sampled
    # from (sampling.sampling_logprobs), and the most likely tokens as (id, logprob), descending
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


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

    @functools.cached_property
    def utf8_table(self) -> Utf8Table:
        """The tokenizer's UTF-8 mask table, built on first use (a loop over the vocabulary)."""
        return Utf8Table.for_tokenizer(self.tokenizer)

    def utf8_masking(self, params: SamplingParams) -> bool:
        """Whether `params` mask invalid UTF-8: as asked, else on for byte-level tokenizers."""
        if params.utf8_mask is not None:
            return params.utf8_mask
        return self.tokenizer.kind in BYTE_LEVEL

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[torch.Tensor]:
        """Yield the next token of every stream, (num_samples,) per step, max_new_tokens times."""
        for tokens, _ in self.generate_steps(prompt_ids, params):
            yield tokens

    @torch.inference_mode()
    def generate_steps(self, prompt_ids: Sequence[int], params: SamplingParams
                       ) -> Iterator[tuple[torch.Tensor, TokenLogprobs | None]]:
        """Like generate_ids, with each step's log-probabilities when `params.logprobs` is set."""
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
        mask = Utf8Mask(self.utf8_table, rows, self.device) if self.utf8_masking(params) else None
        last = prefill(self.model, tokens[:, :n], cache)  # the prompt, in one forward
        for i in range(steps):
            if mask is not None:
                last = mask.apply(last)
            nxt = sample_next_token(last, gen, params.temperature, params.top_k, params.top_p)
            if mask is not None:
                mask.advance(nxt.tolist())
            scores = None if params.logprobs is None else token_logprobs(
                last, nxt, params.logprobs, params.temperature, params.top_k, params.top_p)
            tokens[:, n] = nxt
            n += 1
            yield nxt, scores
            if i == steps - 1:
                return  # no forward for a token nobody will sample
            if cache.pos == T:  # window full: rebuild the cache from the most recent tokens
                # (all but the newest, which the decode step then adds: batching.py does the same)
                cache.reset()
                if keep > 1:
                    prefill(self.model, tokens[:, n - keep : n - 1], cache, logits=False)
            last = decode(tokens[:, n - 1], cache)

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[int], k: int) -> list[tuple[float | None, list]]:
        """(logprob, top k [(id, logprob)]) of each prompt token under the model's own distribution
        (temperature 1, unfiltered), given the tokens before it: what `echo` + `logprobs` report.
        The first token, and any before the last block_size, have no context here: (None, [])."""
        ids = list(prompt_ids)
        window = ids[-self.block_size:]
        out: list[tuple[float | None, list]] = [(None, [])] * (len(ids) - len(window) + 1)
        if len(window) < 2:
            return out[: len(ids)]
        x = torch.tensor([window], dtype=torch.long, device=self.device)
        logits, _ = self.model(x[:, :-1])
        s = token_logprobs(logits[0], x[0, 1:], k, temperature=0)  # temperature 0: the raw softmax
        for lp, vals, top in zip(s.logprob.tolist(), s.top_logprobs.tolist(), s.top_ids.tolist()):
            out.append((lp, list(zip(top, vals))))
        return out

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
        # without logprobs through generate_ids, the seam tests and other decoding loops replace
        steps = self.generate_steps(prompt_ids, params) if params.logprobs is not None else (
            (nxt, None) for nxt in self.generate_ids(prompt_ids, params))
        for step, (nxt, scores) in enumerate(steps):
            last = step == last_step
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                lp, top = _row_logprobs(scores, i)
                if params.stop_at_eos and tok == self.tokenizer.eos_id:
                    done[i] = True
                    yield StreamEvent(i, decoders[i].decode(b"", final=True), tok, "stop", lp, top)
                    continue
                # Not final even on the last step: a character cut off by max_new_tokens is dropped,
                # never printed as a replacement character.
                text = decoders[i].decode(self.tokenizer.token_bytes(tok))
                done[i] = last
                yield StreamEvent(i, text, tok, "length" if last else None, lp, top)
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

    def inspect(self, text: str, top_k: int = 5) -> Inspection:
        """What the model sees in `text`: per-token probability, surprise (bits) and top-k
        alternatives, and every head's attention weights, as NumPy arrays (see inspection.py)."""
        from .inspection import inspect

        return inspect(self, text, top_k)


def _row_logprobs(scores: TokenLogprobs | None, row: int
                  ) -> tuple[float | None, list[tuple[int, float]] | None]:
    if scores is None:
        return None, None
    top = zip(scores.top_ids[row].tolist(), scores.top_logprobs[row].tolist())
    # a token top-k/top-p filtered out has probability 0 (-inf): not an alternative, and not JSON
    return float(scores.logprob[row]), [(t, v) for t, v in top if v != float("-inf")]


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
