"""`minigpt train --backend reference`: the training loop driven by the NumPy reference.

This module owns the glue between `minigpt.reference` (forward, hand-written backward, clipping,
AdamW, all NumPy) and the torch backend's run machinery. `ReferenceTrainer` subclasses
`train.Trainer` and replaces only what does maths: the step, the loss estimate and the optimizer.
Everything a user sees is inherited unchanged: the data sampler and its batches, the LR schedule,
metrics.jsonl, the progress bar, evaluation cadence, checkpoints (safetensors + meta.json), best.json,
Ctrl-C handling and --resume. So `minigpt sample RUN` and `minigpt info RUN` work on its runs.

How the two worlds meet:

* Weights. The trainer keeps a torch `GPT` built exactly as the torch backend builds it (same seed,
  so the same initial weights), and the NumPy parameters are *views of its parameter storage*
  (`Parameter.detach().numpy()` shares memory). Each in-place NumPy update is therefore already in
  the module that the checkpoint writer saves and the evaluation sampler generates from; no copying
  or syncing. The torch module never runs a backward pass.
* Optimizer state. The NumPy AdamW moments are saved and restored in `torch.optim.AdamW`'s
  state_dict layout, so a run can be resumed by either backend (`--resume --backend torch` continues
  a reference run, and the other way round).

Supported: any bias setting, grad_accum, grad clipping, weight decay, the LR schedule. Refused with a
one-line ConfigError: dropout > 0 (the reference is deterministic), any device but the CPU, any
layout but GPT-2's (`--arch gpt2`) and any optimizer but AdamW.
Training is float32 like the torch backend; `minigpt.reference` itself also runs float64 (the tests
use it to check gradients).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import rundir
from ..config import ModelConfig, TrainConfig
from ..data.dataset import BatchSampler, PreparedData
from ..errors import CheckpointError, ConfigError
from ..training.optim import lr_at
from ..training.trainer import Trainer
from . import model as R


def check_reference_config(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse, before anything is written, what the reference backend cannot do."""
    R.check_supported(mcfg)
    if tcfg.device.lower() not in ("auto", "cpu"):
        raise ConfigError(
            f"the reference backend runs on the CPU only (got --device {tcfg.device}); "
            "use --device cpu or --backend torch"
        )
    if tcfg.dtype not in ("auto", "float32") or tcfg.compile:
        raise ConfigError("the reference backend trains in float32 without torch.compile; "
                          "drop --dtype/--compile or use --backend torch")
    if tcfg.chat:
        raise ConfigError("the reference backend has no loss mask for conversations (--chat); "
                          "use --backend torch")
    if tcfg.optimizer != "adamw":
        raise ConfigError(
            f"the reference backend implements AdamW only (got --optimizer {tcfg.optimizer}); "
            "use --optimizer adamw or --backend torch"
        )


class ReferenceTrainer(Trainer):
    """Trainer whose step, loss estimate and optimizer are the NumPy reference."""

    def __init__(
        self,
        mcfg: ModelConfig,
        tcfg: TrainConfig,
        data: PreparedData,
        run_dir: Path,
        progress: bool = True,
    ):
        check_reference_config(mcfg, tcfg)
        # The base class builds the model (seeded: same init as the torch backend), the sampler and
        # the bookkeeping. "auto" must not pick a GPU here: NumPy views need CPU storage.
        super().__init__(mcfg, dataclasses.replace(tcfg, device="cpu"), data, run_dir, progress)
        self.tcfg = tcfg
        # named_parameters() yields the tied wte/lm_head tensor once, as `wte.weight`.
        self.params: R.Params = {
            name: p.detach().numpy() for name, p in self.model.named_parameters()
        }
        self.optimizer = TorchLayoutAdamW(self.optimizer, self.model, self.params)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: the same batches, LR, clipping and AdamW as Trainer.train_step."""
        tcfg = self.tcfg
        lr = lr_at(self.step, tcfg)
        total = 0.0
        grads: R.Params = {}
        for _ in range(tcfg.grad_accum):
            x, y = self.sampler.next()
            loss, g = R.loss_and_grads(self.params, self.mcfg, x.numpy(), y.numpy())
            total += loss
            for k, v in g.items():
                if k in grads:
                    grads[k] += v
                else:
                    grads[k] = v
        if tcfg.grad_accum > 1:  # mean over micro-batches, as backward() of loss / grad_accum does
            for g in grads.values():
                g /= g.dtype.type(tcfg.grad_accum)
        norm = R.clip_grad_norm(grads, tcfg.grad_clip)  # max_norm <= 0 only measures
        loss = total / tcfg.grad_accum
        # as Trainer.train_step: a NaN/inf loss or gradient leaves weights and moments untouched
        bad = not math.isfinite(loss + norm)
        if not bad:
            self.optimizer.step(grads, lr)
        self.guard.update(torch.tensor(bad))
        return torch.tensor(0.0 if bad else loss)

    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches per split, by the NumPy forward. The seeds are
        Trainer.estimate_loss's, so both backends are evaluated on identical batches."""
        out = {}
        for i, split in enumerate(("train", "val")):
            sampler = BatchSampler(
                getattr(self.data, split),
                self.mcfg.block_size,
                self.tcfg.batch_size,
                seed=self.tcfg.seed + 1 + i,
            )
            losses = []
            for _ in range(self.tcfg.eval_iters):
                x, y = sampler.next()
                losses.append(R.forward(self.params, self.mcfg, x.numpy(), y.numpy())[1])
            out[split] = float(np.mean(losses))
        return out


class TorchLayoutAdamW:
    """The reference AdamW with the state_dict()/load_state_dict() of `torch.optim.AdamW`.

    Trainer saves `optimizer.state_dict()` in trainer.pt and restores it on --resume; speaking the
    same layout (param groups of indices, per-index step/exp_avg/exp_avg_sq) lets the inherited code
    save and restore the NumPy moments, and lets either backend resume the other's run.
    """

    def __init__(
        self,
        template: torch.optim.Optimizer,
        model: torch.nn.Module,
        params: R.Params,
    ):
        # `template` is the torch backend's optimizer for this model (never stepped): its param
        # groups fix which index means which parameter, and its hyperparameters the saved header.
        self.template = template
        names = {id(p): n for n, p in model.named_parameters()}
        self.order = [names[id(p)] for g in template.param_groups for p in g["params"]]
        if sorted(self.order) != sorted(params):
            raise RuntimeError("optimizer param groups do not cover the model's parameters")
        self.params = params
        self.state = R.AdamState.zeros_like(params)
        self.hyper = self._hyper(template.param_groups[0])

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, float]:
        # Decay is per group in torch; the reference applies group 0's rate to matrices only, which
        # is the same split (optim.param_groups: matrices decay, the rest has weight_decay 0).
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"])

    def step(self, grads: R.Params, lr: float) -> None:
        R.adam_step(self.params, grads, self.state, lr, **self.hyper)

    def state_dict(self) -> dict[str, Any]:
        sd = self.template.state_dict()  # {"state": {}, "param_groups": [...]}: the header
        if self.state.step:
            step = torch.tensor(float(self.state.step))  # torch keeps step as a float32 tensor
            sd["state"] = {
                i: {
                    "step": step.clone(),
                    "exp_avg": torch.from_numpy(self.state.m[name].copy()),
                    "exp_avg_sq": torch.from_numpy(self.state.v[name].copy()),
                }
                for i, name in enumerate(self.order)
            }
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Take moments saved by either backend. Bad or mismatched state raises KeyError/ValueError,
        which Trainer.restore turns into a one-line CheckpointError."""
        groups = sd["param_groups"]
        if [len(g["params"]) for g in groups] != [
            len(g["params"]) for g in self.template.param_groups
        ]:
            raise ValueError("optimizer parameter groups do not match the model")
        state = sd["state"]  # empty when saved before the first step: moments stay zero
        steps = set()
        for i, name in enumerate(self.order if state else []):
            entry = state[i]
            for key, dest in (("exp_avg", self.state.m), ("exp_avg_sq", self.state.v)):
                value = entry[key].detach().cpu().numpy()
                if value.shape != dest[name].shape:
                    raise ValueError(f"{key} of {name} has shape {value.shape}")
                dest[name][...] = value
            steps.add(int(float(entry["step"])))
        if len(steps) > 1:
            raise ValueError(f"parameters are at different optimizer steps {sorted(steps)}")
        self.state.step = steps.pop() if steps else 0
        # As torch's load_state_dict does: the saved hyperparameters win over the current config.
        self.hyper = self._hyper(groups[0])


def load_params(
    run_dir: str | Path, checkpoint: str = "best", dtype: np.dtype | type = np.float32
) -> tuple[ModelConfig, R.Params]:
    """Weights of a run (trained by either backend) as reference params: safetensors read with
    NumPy, checksums verified, `best` falling back to `last` as `minigpt sample` does."""
    run_dir = Path(run_dir)
    mcfg, _ = rundir.read_config(run_dir)
    R.check_supported(mcfg)  # a layout other than GPT-2's: one clear line, not a name mismatch
    path, _ = ckpt.find_for_inference(run_dir, checkpoint)
    state = ckpt.read_weights(path / ckpt.WEIGHTS, framework="numpy")
    try:
        return mcfg, R.params_from_state_dict(state, mcfg, dtype)
    except ConfigError as e:
        raise CheckpointError(f"weights in {path} do not match the model config: {e}") from None
