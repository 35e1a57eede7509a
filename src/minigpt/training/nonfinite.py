"""Steps with a NaN/inf loss or gradient: skip them, count them, stop after too many in a row.

No host sync per step on an accelerator: `torch.isfinite` of the loss and the gradient norm gives a
flag on the device, fused AdamW takes it as GradScaler's `found_inf` and skips the whole update
itself, and the guard only keeps the flags until the training loop syncs anyway (logging,
evaluation, saving), where it reads them all at once. On the CPU, where reading a value costs
nothing, the optimizer step is simply not called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..errors import TrainingDiverged


def bad_step(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """True (on the device) when the loss or the gradient norm is NaN or inf.

    Under DDP every rank gets the same answer: the norm is taken after the gradients are averaged,
    and a rank's non-finite loss comes from non-finite logits, whose gradients are non-finite too.
    """
    return ~torch.isfinite(loss + grad_norm)  # a NaN/inf in either makes the sum non-finite


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients (what clip_grad_norm_ returns) without clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one foreach kernel
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def step_unless_bad(optimizer: torch.optim.Optimizer, bad: torch.Tensor, sync: bool | None = None) -> None:
    """optimizer.step(), skipped entirely (moments, step count, weight decay) when `bad`.

    sync: read `bad` on the host first. That is free on the CPU (the default there); on an
    accelerator, fused Adam/AdamW instead take `bad` as GradScaler's `found_inf` flag and skip on
    the device, and only other optimizers pay one sync per step.
    """
    if sync is None:
        sync = bad.device.type == "cpu" or not optimizer.defaults.get("fused")
    if not sync:
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bad.item():
        optimizer.step()


class NonFiniteGuard:
    """Counts skipped steps; `diverged` once `limit` of them came in a row.

    Skipped steps change nothing, so reading the flags late (where the loop syncs anyway) is
    harmless: the run stops at the next log or evaluation step, before anything is saved.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0  # in the whole run, across resumes
        self.in_a_row = 0
        self.longest = 0  # the longest run of bad steps seen (it stays below limit, or we stop)
        self._pending: list[torch.Tensor] = []  # flags of steps the host has not read yet
        self._reported = 0  # `skipped` at the last skipped_since_last_call()

    def update(self, bad: torch.Tensor) -> None:
        self._pending.append(bad)

    def _read(self) -> None:
        if self._pending:
            for bad in torch.stack(self._pending).tolist():  # one sync for all of them
                self.in_a_row = self.in_a_row + 1 if bad else 0
                self.longest = max(self.longest, self.in_a_row)
                self.skipped += bad
            self._pending.clear()

    def skipped_since_last_call(self) -> int:
        self._read()
        before, self._reported = self._reported, self.skipped
        return self.skipped - before

    def diverged(self) -> bool:
        self._read()
        return self.longest >= self.limit

    def error(self, step: int, run_dir: Path) -> TrainingDiverged:
        ckpts = ckpt.list_checkpoints(run_dir)
        kept = (f"the last good checkpoint, step {ckpts[-1][0]}, is kept" if ckpts
                else "no checkpoint had been saved yet")
        return TrainingDiverged(
            f"training stopped at step {step}: {self.limit} steps in a row had a NaN or inf loss or "
            f"gradient and were skipped; {kept}. Lower --lr or raise --warmup-iters, then --resume"
        )

    def state_dict(self) -> dict[str, int]:
        self._read()
        return {"skipped_steps": self.skipped, "bad_steps_in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = self._reported = int(state.get("skipped_steps", 0))  # absent in older ones
        self.in_a_row = self.longest = int(state.get("bad_steps_in_a_row", 0))
        self._pending.clear()
