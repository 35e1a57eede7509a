"""Data-parallel training under torchrun: which rank this process is, the process group, DDP, rank 0's chores.

    torchrun --standalone --nproc_per_node=4 -m minigpt train --preset large --out runs/big

torchrun starts one trainer per process with RANK, LOCAL_RANK and WORLD_SIZE in the environment.
`session()` reads them, gives the rank its device (cuda:LOCAL_RANK on GPUs), opens the process group
(nccl on CUDA, gloo on CPU) and closes it at the end. Without torchrun (or with WORLD_SIZE=1) it yields
a single-process context whose collectives are no-ops, so the trainer has one code path.

Who does what: every rank computes gradients on its own slice of the global batch (data.BatchSampler)
and DDP averages them; rank 0 alone prepares data, evaluates, samples and writes files while the others
wait at a barrier; an error on rank 0 is raised on every rank, so no rank is left waiting.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..device import resolve_device
from ..errors import ConfigError

T = TypeVar("T")

# Followers wait on rank 0 through a CPU (gloo) group. Its timeout is long because rank 0 may be
# tokenizing a large corpus meanwhile; a crashed rank is still noticed at once by torchrun itself.
WAIT_TIMEOUT = timedelta(hours=2)


@dataclass
class DistContext:
    """This process's place in the job; a single process is rank 0 of 1."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    waits: dist.ProcessGroup | None = None  # gloo group for barriers, flags and error messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.waits)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. one rank got Ctrl-C): all stop together."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.waits)
        return bool(t.item())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over ranks (e.g. the logged loss: the mean over the global batch)."""
        if not self.distributed:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 while the others wait; every rank gets its result, or its error."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # forwarded to the other ranks, then raised here too
                error = e
        if self.distributed:
            box = [(result, error)]
            try:
                dist.broadcast_object_list(box, src=0, group=self.waits)
            except Exception:  # something that does not pickle: send the error's text instead
                box = [(None, RuntimeError(f"rank 0 failed: {error or 'unpicklable result'}"))]
                dist.broadcast_object_list(box, src=0, group=self.waits)
            if not self.is_main:
                result, error = box[0]
                if error is not None:
                    error.mirrored = True  # rank 0 reports it; the CLI does not print it N times
        if error is not None:
            raise error
        return result

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP for more than one rank; the model itself otherwise."""
        if not self.distributed:
            return model
        # bucket views: gradients live in DDP's all-reduce buckets instead of a second full copy
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )

    def no_sync(self, model: torch.nn.Module, sync: bool) -> AbstractContextManager:
        """Skip DDP's gradient all-reduce unless `sync`: accumulate locally, average once per step."""
        if sync or not isinstance(model, DistributedDataParallel):
            return nullcontext()
        return model.no_sync()


def torchrun_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the variables torchrun sets; (0, 0, 1) without it."""
    try:
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (set by torchrun)") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def rank_device(name: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device for this rank: the requested one alone; cuda:LOCAL_RANK when data-parallel."""
    device = resolve_device(name)
    if world_size == 1:
        return device
    if device.type == "mps":
        raise ConfigError("multi-process training supports CUDA GPUs and CPUs, not mps")
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, "
                              f"not {name} (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                              "visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def session(device_name: str | None = "auto") -> Iterator[DistContext]:
    """The process group for this run (when launched by torchrun with WORLD_SIZE > 1)."""
    rank, local_rank, world_size = torchrun_env()
    device = rank_device(device_name, local_rank, world_size)
    if world_size == 1:
        yield DistContext(device)
        return
    owned = not dist.is_initialized()
    try:
        with _stop_signals_to_this_thread_only():
            if owned:
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            waits = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
        yield DistContext(device, rank, local_rank, world_size, waits)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _stop_signals_to_this_thread_only() -> Iterator[None]:
    """Block SIGINT and SIGTERM while the process group starts its threads, which inherit the mask.

    torchrun forwards Ctrl-C to every rank. The kernel hands a process's signal to any thread that
    does not block it, and Python's handlers do not restart interrupted system calls: a signal that
    lands on a communication thread interrupts its socket call there. Blocked in those threads, the
    signal reaches the main thread, where the trainer's handler asks the ranks to stop together.
    A signal sent while the mask is on waits and is delivered when it comes off."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed for one optimizer step on one rank.

    Deriving it from (seed, step, rank) gives each rank its own dropout masks and makes resuming exact
    on any device and any world size without storing RNG state.
    """
    return int(np.random.SeedSequence([seed % 2**63, step, rank]).generate_state(1, np.uint64)[0])
