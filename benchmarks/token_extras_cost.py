"""CPU time per decoded token of what logprobs and the UTF-8 mask add, next to the decode step.

    PYTHONPATH=src python benchmarks/token_extras_cost.py

A `small` preset model with the bytes vocabulary (258 tokens), random weights, one stream, one
thread. Times are process CPU time (not wall time), so other jobs on a shared machine disturb them
less; each figure is the mean of 300 calls after one warm-up call.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from minigpt.config import resolve
from minigpt.kv_cache import KVCache
from minigpt.model import GPT
from minigpt.sampling import (
    RowSettings,
    SamplingParams,
    choose_tokens,
    distribution,
    token_logprobs,
    uniforms,
)
from minigpt.tokenization.bytes import ByteTokenizer
from minigpt.utf8 import Utf8Mask

CALLS = 300


def cpu_us(fn) -> float:
    fn()
    start = time.process_time()
    for _ in range(CALLS):
        fn()
    return (time.process_time() - start) / CALLS * 1e6


def main() -> None:
    torch.set_num_threads(1)
    mcfg = dataclasses.replace(resolve("small")[0], vocab_size=258)
    torch.manual_seed(0)
    model = GPT(mcfg).eval()
    cache = KVCache.for_model(model, 1)
    token, logits = torch.tensor([[65]]), torch.randn(1, 258)
    settings = RowSettings.of([SamplingParams(temperature=0.8)], 258)
    gen = torch.Generator().manual_seed(0)
    mask = Utf8Mask.for_tokenizer(ByteTokenizer(), 1)
    pos = [0]

    def decode() -> None:
        model(token, cache=cache, pos=pos[0])
        pos[0] = (pos[0] + 1) % mcfg.block_size

    def sample(x: torch.Tensor) -> torch.Tensor:
        return choose_tokens(distribution(x, settings), settings, uniforms(gen, 1))

    def masked_sample() -> None:
        mask.states = [(2, 0x80, 0xBF)]  # inside a 3-byte character: the mask really applies
        mask.advance(sample(mask.apply(logits)).tolist())

    with torch.inference_mode():
        rows = [
            ("decode step (small, B=1)", cpu_us(decode)),
            ("sample (temperature 0.8)", cpu_us(lambda: sample(logits))),
            ("UTF-8 mask + sample", cpu_us(masked_sample)),
            ("token_logprobs, k=5", cpu_us(
                lambda: token_logprobs(distribution(logits, settings), token[0], 5))),
        ]
    for name, us in rows:
        print(f"{name:32s} {us:8.1f} us/token")


if __name__ == "__main__":
    main()
