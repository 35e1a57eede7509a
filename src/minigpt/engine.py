"""A trained run ready to generate: `load` reads a run directory, and `Engine` holds the model and
its tokenizer and generates through the one generation loop, `batching.Batcher`: `stream` drives a
batcher of its own synchronously (the CLI, the Python API, the trainer's samples, the benchmarks),
and the server drives a shared one from its thread. Seeding, the context-window rule, finish
reasons, the UTF-8 mask, structured-output constraints, logprobs and stop strings live there, once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoint as ckpt
from . import rundir
from .batching import Batcher, BatchRequest, Prompt, StreamEvent
from .device import resolve_device, resolve_dtype
from .errors import CheckpointError
from .model import GPT
from .sampling import SamplingParams
from .scoring import token_scores
from .structured import Grammars
from .tokenization import Tokenizer
from .utf8 import Utf8Table

BYTE_LEVEL = ("bytes", "bpe")  # tokenizers whose tokens can split a character: masked by default

if TYPE_CHECKING:
    from .inspection import Inspection

__all__ = ["Engine", "Prompt", "StreamEvent", "load"]


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

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Constraints compiled against this tokenizer (structured.py), built on first use."""
        return Grammars.for_tokenizer(self.tokenizer, self.model.config.vocab_size)

    def utf8_masking(self, params: SamplingParams) -> bool:
        """Whether `params` mask invalid UTF-8: as asked, else on for byte-level tokenizers."""
        if params.utf8_mask is not None:
            return params.utf8_mask
        return self.tokenizer.kind in BYTE_LEVEL

    def token_ids(self, prompt: Prompt, params: SamplingParams | None = None,
                  **settings: Any) -> list[list[int]]:
        """The token ids of each of the `num_samples` samples (EOS included when it ends one)."""
        params = (params or SamplingParams()).replace(**settings)
        ids: list[list[int]] = [[] for _ in range(params.num_samples)]
        for ev in self.stream(prompt, params):
            if ev.token is not None:
                ids[ev.index].append(ev.token)
        return ids

    def score(self, prompt_ids: Sequence[int], k: int) -> list[tuple[float | None, list]]:
        """(logprob, top k [(id, logprob)]) of each prompt token under the model's own distribution
        (temperature 1, unfiltered), each with the longest context the model allows, as
        `minigpt eval --stride 1` scores it: what `echo` + `logprobs` report. The first token has
        no context: (None, [])."""
        return token_scores(self.model, prompt_ids, k)

    def stream(self, prompt: Prompt = "", params: SamplingParams | None = None,
               stop: Sequence[str] = (), **settings: Any) -> Iterator[StreamEvent]:
        """Text as it is generated; every sample ends with an event carrying its finish_reason.

        `params` (default: SamplingParams()) with any field overridden by keyword, e.g.
        `stream("ROMEO:", max_new_tokens=50, seed=1)`; `stop`: strings that end a sample (not
        included). Bad settings and a prompt the tokenizer cannot encode raise here, before
        anything is generated.
        """
        params = (params or SamplingParams()).replace(**settings)
        # a batcher of its own, one prompt: its rows, and the whole prompt prefilled in one forward
        batcher = Batcher(self, max_rows=params.num_samples, max_queue=0,
                          prefill_chunk=self.block_size, start=False)
        return _drive(batcher, batcher.submit(prompt, params, stop=stop))

    def generate(self, prompt: Prompt = "", params: SamplingParams | None = None,
                 **settings: Any) -> str:
        """One completion of `prompt` (the prompt itself is not included)."""
        return self.generate_many(prompt, 1, params, **settings)[0]

    def generate_many(self, prompt: Prompt = "", num_samples: int | None = None,
                      params: SamplingParams | None = None, **settings: Any) -> list[str]:
        """`num_samples` completions of `prompt` (default: params.num_samples), in one batch."""
        params = (params or SamplingParams()).replace(num_samples=num_samples, **settings)
        parts: list[list[str]] = [[] for _ in range(params.num_samples)]
        for ev in self.stream(prompt, params):
            parts[ev.index].append(ev.text)
        return ["".join(p) for p in parts]

    def inspect(self, text: str, top_k: int = 5) -> Inspection:
        """What the model sees in `text`: per-token probability, surprise (bits) and top-k
        alternatives, and every head's attention weights, as NumPy arrays (see inspection.py)."""
        from .inspection import inspect

        return inspect(self, text, top_k)


def _drive(batcher: Batcher, req: BatchRequest) -> Iterator[StreamEvent]:
    """Step a thread-less batcher until its one request ends, yielding its events."""
    try:
        while True:
            batcher.step()
            events, done = req.drain()
            yield from events
            if done:
                return
    finally:
        batcher.close()


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
    model, meta = ckpt.load_model(run_dir, checkpoint)  # a LoRA run: its base and adapters
    dev = resolve_device(device)
    model.to(device=dev, dtype=resolve_dtype(dtype, dev))
    return Engine(model, tokenizer, bos_prompts=tcfg.documents, step=meta.get("step"))
