"""`torch.compile` of the one-row decode step: what `minigpt serve --compile` decodes a lone row
with (docs/server.md#compiled-decoding).

One row decoding by itself is where eager PyTorch spends most on calling operations rather than on
arithmetic: ~120 small operations per token. The compiled step is `GPT.forward` itself, traced
once with static shapes: the token of cache row 0, its position given as a tensor (the model then
attends over the whole window, masked past the row's length, so one graph serves every position),
writing into the batcher's own KV cache. Its logits equal the eager forward's within float32
rounding (fused kernels add in another order), so a near-tie between two tokens may go the other
way: it is an option, never the default. Two rows or more decode eagerly: batching already shares
each operation's cost, and at 32 rows the step is bound by reading the cache, not by calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .errors import MiniGPTError
from .kv_cache import KVCache
from .model import GPT

__all__ = ["CompileError", "one_row_step"]


class CompileError(MiniGPTError):
    """torch.compile could not build the step (on a CPU it needs a C++ compiler)."""


def one_row_step(model: GPT, cache: KVCache) -> tuple[Callable[[int, int], torch.Tensor], float]:
    """Compile the decode step of `cache`'s row 0 -> (step(token, position) -> logits (1, 1,
    vocab), seconds it took to compile). The step writes the token's keys and values at
    `position` of row 0, as `model(tokens, cache=cache, pos=position)` does.

    Compiling runs the step: it writes into row 0 at position 0, so it is made before any row
    lives there. An error while compiling is a CompileError.
    """
    import torch._inductor.config  # here: importing inductor costs a server that does not compile

    device = next(model.parameters()).device
    compiled = torch.compile(lambda idx, pos: model(idx, cache=cache, pos=pos)[0],
                             fullgraph=True, dynamic=False)

    def step(token: int, position: int) -> torch.Tensor:
        return compiled(torch.tensor([[token]], device=device),
                        torch.tensor([position], device=device))

    t0 = time.perf_counter()
    try:
        # inductor's C++ wrapper: the graph's kernels called from C++, not from Python
        with torch._inductor.config.patch(cpp_wrapper=device.type == "cpu"), torch.inference_mode():
            # an eager step first: the model gathers its weights and the cache makes its row
            # views, so that the traced step finds them made and is not traced again
            model(torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache, pos=0)
            step(0, 0)
    except Exception as e:
        raise CompileError(f"--compile: torch.compile could not build the decode step "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "on a CPU it needs a C++ compiler (g++ or clang)") from None
    return step, time.perf_counter() - t0
