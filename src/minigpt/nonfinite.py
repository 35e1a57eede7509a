"""Steps with a NaN/inf loss or gradient: skip them, count them, stop after too many in a row.

All of it stays on the device: `torch.isfinite` of the loss and of the gradient norm gives a flag,
fused AdamW takes the flag as GradScaler's `found_inf` and skips the whole update itself, and the
counters are tensors. The host only reads them where the training loop syncs anyway (logging,
evaluation, saving), so a healthy run pays a few scalar ops per step and no extra sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .errors import TrainingDiverged


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss or gradient, on the device: no host sync per step.

    `check` (called where the loop syncs anyway: logging, evaluation) stops the run once
    `limit` steps in a row were bad. Skipped steps changed nothing, so checking late is harmless.
    """

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self._counted = 0  # `total` at the last skipped_since_last_call()

    def update(self, finite: torch.Tensor) -> None:
        bad = (~finite).long()
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.total += bad

    @property
    def skipped(self) -> int:
        return int(self.total.item())

    def skipped_since_last_call(self) -> int:
        before, self._counted = self._counted, self.skipped
        return self._counted - before

    def check(self, step: int, run_dir: Path) -> None:
        if int(self.longest.item()) < self.limit:
            return
        ckpts = ckpt.list_checkpoints(run_dir)
        kept = (f"the last good checkpoint, step {ckpts[-1][0]}, is kept" if ckpts
                else "no checkpoint had been saved yet")
        raise TrainingDiverged(
            f"training stopped at step {step}: {self.limit} steps in a row had a NaN or inf loss or "
            f"gradient and were skipped; {kept}. Lower --lr or raise --warmup-iters, then --resume"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "bad_steps_in_a_row": int(self.in_a_row.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._counted = int(state.get("skipped_steps", 0))  # absent in older checkpoints
        self.total.fill_(self._counted)
        self.in_a_row.fill_(int(state.get("bad_steps_in_a_row", 0)))
        self.longest.copy_(self.in_a_row)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients (what clip_grad_norm_ returns) without clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one foreach kernel
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step(), skipped entirely (moments, step count, weight decay) when not `finite`."""
    if optimizer.defaults.get("fused"):
        # fused Adam/AdamW take GradScaler's `found_inf` flag and skip on the device: no sync
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif finite.item():  # other optimizers: one host sync per step
        optimizer.step()
