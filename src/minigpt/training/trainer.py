"""The training loop: `Trainer` runs steps, logs, evaluates, samples and checkpoints one run.

One step: forward, cross-entropy, backward over `grad_accum` micro-batches, global-norm clipping, then
the optimizer (Muon on hidden matrices and AdamW elsewhere, or AdamW throughout: optim.py) at the LR
of `optim.lr_at`. Every `eval_interval` steps (and at the end): estimate train/val loss on fixed
batches, print a short sample, write a checkpoint (and mark it best when val improves).
Exact resume restores weights, optimizer moments, step, best val loss, the count of evaluations
without a better one (`patience`: early stopping) and the sampler; dropout's RNG is seeded per step
from (seed, step, rank), so it needs no saved state.
With `patience` N, the run stops after N evaluations in a row without a better validation loss,
each of them saved; best.json points at the best step.
Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and returns (signals.py).
A run started from existing weights (`initial_state`, train --init-from) loads them, evaluates and
saves them as step 0 before its first step: the log starts at the source's validation loss, and the
run never needs its source again to resume.

The forward pass runs under autocast in the run's dtype (float32 master weights; a GradScaler for
float16), see device.py. Under torchrun every rank runs this same loop on its slice of each batch and
DDP averages the gradients; rank 0 alone evaluates, samples and writes files (distributed.py).

Nothing lost: a step whose loss or gradient is NaN/inf is skipped (the optimizer does not move) and
counted; `max_bad_steps` of them in a row stop the run, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import checkpoint as ckpt
from .. import rundir
from ..config import ModelConfig, TrainConfig
from ..cpu import configure_cpu
from ..data.bpb import split_bits_per_byte
from ..data.dataset import BatchSampler, PreparedData
from ..device import autocast, dtype_name, enable_tf32, grad_scaler, resolve_device, resolve_dtype
from ..engine import Engine
from ..errors import CheckpointError
from ..model import GPT
from ..sampling import SamplingParams
from .distributed import DistContext, dropout_seed
from .nonfinite import NonFiniteGuard, bad_step, grad_norm, step_unless_bad
from .optim import lr_at, make_optimizer, set_lr
from .signals import stop_on_signal
from .tracking import MetricsLog

# The sample printed at each evaluation: the project's default sampling, from the start of a text.
EVAL_SAMPLE = SamplingParams()


class Trainer:
    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, data: PreparedData, run_dir: Path,
                 progress: bool = True, dist: DistContext | None = None,
                 initial_state: dict[str, torch.Tensor] | None = None):
        self.mcfg, self.tcfg, self.data, self.run_dir = mcfg, tcfg, data, run_dir
        self.initial_state = initial_state  # weights to start from instead of a random init
        self.dist = dist or DistContext(resolve_device(tcfg.device))
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        self.dtype = resolve_dtype(tcfg.dtype, self.device)
        enable_tf32(self.device)
        self.threads = configure_cpu(tcfg.threads)
        torch.manual_seed(tcfg.seed)
        self.model = GPT(mcfg).to(self.device)  # float32 master weights; evaluation and samples use it
        self.wrapped = self.dist.wrap(self.model)  # DDP when data-parallel
        self.train_model = torch.compile(self.wrapped) if tcfg.compile else self.wrapped
        self.optimizer = make_optimizer(self.model, tcfg)
        self.scaler = grad_scaler(self.device, self.dtype)
        self.sampler = BatchSampler(data.train, mcfg.block_size, tcfg.batch_size, tcfg.seed,
                                    self.dist.rank, self.dist.world_size, data.train_mask)
        self.step = 0
        self.best_val_loss = math.inf
        self.evals_without_improvement = 0  # early stopping's count; kept across resumes
        self.stopped_early = False
        self.elapsed = 0.0  # training seconds across resumes
        self.stop_requested = False
        self.guard = NonFiniteGuard(tcfg.max_bad_steps)
        self.last_grad_norm: torch.Tensor | None = None  # of the latest step; read at log steps
        self.tokens_per_step = (tcfg.batch_size * mcfg.block_size * tcfg.grad_accum
                                * self.dist.world_size)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def describe(self) -> str:
        t, n, m = self.tcfg, self.dist.world_size, self.mcfg
        what = f"{self.model.num_params():,} parameters"
        if m.lora_rank:
            what = (f"LoRA adapters of rank {m.lora_rank} ({self.model.num_params(trainable=True):,}"
                    f" parameters) on a frozen base of {what}")
        return (f"training {what} on {self.device}"
                f"{f' x {n} processes' if n > 1 else ''}, {dtype_name(self.dtype)}"
                f"{', compiled' if t.compile else ''}; effective batch {t.batch_size * t.grad_accum * n} "
                f"sequences ({t.batch_size} x {t.grad_accum} accumulation x {n} processes)")

    # --- state ----------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "elapsed": self.elapsed,
            "sampler": self.sampler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # {} unless float16
            **self.guard.state_dict(),
        }

    def data_tokens(self) -> dict[str, int]:
        return {"train": len(self.data.train), "val": len(self.data.val)}

    def restore(self) -> list[str]:
        path, meta, warnings = ckpt.find_checkpoint(self.run_dir, "last")
        recorded = meta.get("data_tokens")
        if recorded is not None and recorded != self.data_tokens():
            now = self.data_tokens()
            raise CheckpointError(
                f"cannot resume {self.run_dir}: its data changed since step {meta['step']} was saved "
                f"(train tokens {recorded.get('train')} -> {now['train']}, "
                f"val tokens {recorded.get('val')} -> {now['val']}); train a new run for this data"
            )
        ckpt.load_checkpoint(self.model, path, self.run_dir, self.tcfg)
        state = ckpt.load_trainer_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            if state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            self.step = int(state["step"])
            self.best_val_loss = float(state["best_val_loss"])
            # states saved before early stopping existed count from 0
            self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
            self.elapsed = float(state["elapsed"])
            self.guard.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"trainer state in {path} is unusable: {e}") from None
        return warnings

    def save(self, val_loss: float | None = None, train_loss: float | None = None) -> None:
        if not self.dist.is_main:  # every rank holds the same weights; rank 0 writes them
            return
        is_best = val_loss is not None and val_loss < self.best_val_loss
        if is_best:
            self.best_val_loss = val_loss
        if val_loss is not None:  # an evaluation: counted before the state is written
            self.evals_without_improvement = 0 if is_best else self.evals_without_improvement + 1
        meta = {"val_loss": val_loss, "train_loss": train_loss, "best_val_loss": self.best_val_loss,
                "data_tokens": self.data_tokens()}
        ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.trainer_state(), meta,
                             keep=self.tcfg.keep_checkpoints, is_best=is_best)

    # --- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches per split (same batches at every evaluation)."""
        self.model.eval()
        out = {}
        for i, split in enumerate(("train", "val")):
            sampler = BatchSampler(getattr(self.data, split), self.mcfg.block_size,
                                   self.tcfg.batch_size, seed=self.tcfg.seed + 1 + i,
                                   mask=getattr(self.data, f"{split}_mask"))
            total = torch.zeros((), device=self.device)
            for _ in range(self.tcfg.eval_iters):
                x, y = sampler.next()
                with self.autocast():
                    total += self.model(x.to(self.device), y.to(self.device))[1]
            out[split] = (total / self.tcfg.eval_iters).item()
        self.model.train()
        return out

    def sample_text(self) -> str:
        engine = Engine(self.model, self.data.tokenizer, bos_prompts=self.tcfg.documents)
        params = EVAL_SAMPLE.replace(max_new_tokens=self.tcfg.sample_tokens, seed=self.tcfg.seed)
        try:
            text = engine.generate("", params)
        finally:
            self.model.train()
        return text

    # --- the loop -------------------------------------------------------------------------------

    def run(self, from_checkpoint: bool) -> dict[str, Any]:
        """Train from step 0, or from the run's newest intact checkpoint; -> the run's summary."""
        tcfg = self.tcfg
        if from_checkpoint:
            self._resume()
        if self.dist.is_main:
            rundir.truncate_metrics(self.run_dir, self.step)
        if self.progress:
            print(self.describe(), file=sys.stderr)
        self.bar = tqdm(total=tcfg.max_iters, initial=self.step, disable=not self.progress,
                        dynamic_ncols=True, unit="it", file=sys.stderr)
        self.model.train()
        self._last_log_time, self._last_log_step = time.perf_counter(), self.step
        self._loss_sum = torch.zeros((), device=self.device)
        self.summary: dict[str, Any] = {"val_loss": None, "train_loss": None, "val_bpb": None}
        last_saved = -1
        config = {"model": dataclasses.asdict(self.mcfg), "train": dataclasses.asdict(tcfg)}
        metrics = (MetricsLog(self.run_dir, tcfg.log, self.step, config) if self.dist.is_main
                   else nullcontext())  # metrics.jsonl and the --log trackers, rank 0 only
        with metrics as self.metrics, stop_on_signal(self._request_stop, self.dist.is_main):
            if self.initial_state is not None and not from_checkpoint:
                # a LoRA model's adapters keep their fresh init: B = 0, the base's output exactly
                ckpt.load_state(self.model, self.initial_state, self.tcfg.init_from or "", "base")
                self.initial_state = None  # the model holds them now; free the copy
                self._evaluate_and_save({})
                last_saved = 0
            if self._out_of_patience():
                self.bar.write(f"already stopped early at step {self.step}: no better validation "
                               f"loss in {self.evals_without_improvement} evaluations (patience "
                               f"{tcfg.patience}); raise --patience to train on")
            while (self.step < tcfg.max_iters and not self.stopped_early
                   and not self._stop_agreed()):
                self._loss_sum += self.train_step()
                self.step += 1
                self.bar.update(1)
                at_end = self.step == tcfg.max_iters
                record = self._log_record() if self.step % tcfg.log_interval == 0 or at_end else {}
                if self.step % tcfg.eval_interval == 0 or at_end:
                    self._evaluate_and_save(record)
                    record, last_saved = {}, self.step
                if record:
                    self._write_metrics(record)
            if self.stop_requested and last_saved != self.step:
                self.elapsed += time.perf_counter() - self._last_log_time
                self._check_divergence()
                self.save()
                self.dist.barrier()
        self.bar.close()
        return self._final_summary()

    def _resume(self) -> None:
        warnings = self.restore()
        if self.dist.is_main:
            for damaged in ckpt.set_aside_damaged(self.run_dir, self.step):
                warnings.append(f"moved the damaged checkpoint aside to {damaged}")
            ckpt.remove_stale_temp(self.run_dir)
            rundir.write_config(self.run_dir, self.mcfg, self.tcfg)  # records e.g. a raised max_iters
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)

    def _log_record(self) -> dict[str, Any]:
        """The metrics line of a log step: mean train loss and speed since the previous one."""
        now = time.perf_counter()
        steps = self.step - self._last_log_step
        dt = now - self._last_log_time
        self.elapsed += dt
        self._check_divergence()
        steps -= self.guard.skipped_since_last_call()  # their losses were not summed
        train_loss = self.dist.mean(self._loss_sum).item() / steps if steps else math.nan
        self._loss_sum.zero_()
        tok_s = steps * self.tokens_per_step / dt
        self.bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        self.summary.update(train_loss=train_loss, tokens_per_sec=tok_s)
        self._last_log_time, self._last_log_step = now, self.step
        norm = self.last_grad_norm.item() if self.last_grad_norm is not None else math.nan
        return {"iter": self.step, "train_loss": round(train_loss, 5) if steps else None,
                "val_loss": None, "lr": lr_at(self.step - 1, self.tcfg),
                "tokens_per_sec": round(tok_s, 1), "elapsed": round(self.elapsed, 3),
                "skipped_steps": self.guard.skipped,
                "grad_norm": round(norm, 5) if math.isfinite(norm) else None}

    def _evaluate_and_save(self, record: dict[str, Any]) -> None:
        """Rank 0 evaluates, logs (with this step's log record), saves and samples; the others wait."""
        self._check_divergence()  # never save after a divergence
        if self.dist.is_main:
            losses = self.estimate_loss()
            bpb = {s: split_bits_per_byte(losses[s], self.data.meta, s) for s in losses}
            record = {"iter": self.step, **record,
                      "val_loss": round(losses["val"], 5), "val_ppl": round(math.exp(losses["val"]), 3),
                      "eval_train_loss": round(losses["train"], 5),
                      "val_bpb": _round(bpb["val"]), "train_bpb": _round(bpb["train"])}
            sample = self.sample_text() if self.tcfg.sample_tokens else None
            if sample is not None:  # kept in the log: `minigpt plot --html` shows it per step
                record["sample"] = sample
            # log before saving: a kill in between must not leave a checkpoint without its line
            self._write_metrics(record)
            self.save(losses["val"], losses["train"])
            self.summary.update(val_loss=losses["val"], val_bpb=bpb["val"])
            bpb_text = f", val bpb {bpb['val']:.4f}" if bpb["val"] is not None else ""
            self.bar.write(f"step {self.step}: train loss {losses['train']:.4f}, "
                           f"val loss {losses['val']:.4f} (ppl {math.exp(losses['val']):.2f}){bpb_text}")
            if sample is not None:
                self.bar.write("---\n" + sample + "\n---")
                self.metrics.text(self.step, "sample", sample)  # TensorBoard and W&B show it
        self.dist.barrier()
        self._last_log_time = time.perf_counter()  # evaluation is not training time
        if self._out_of_patience() and self.dist.is_main:
            best = rundir.read_best(self.run_dir) or {}
            self.bar.write(f"stopping early at step {self.step}: no better validation loss in "
                           f"{self.evals_without_improvement} evaluations (patience "
                           f"{self.tcfg.patience}); the best, {self.best_val_loss:.4f}, is step "
                           f"{best.get('step')}")

    def _out_of_patience(self) -> bool:
        """Whether early stopping ends the run now, agreed by every rank (rank 0 evaluates)."""
        out = self.tcfg.patience > 0 and self.evals_without_improvement >= self.tcfg.patience
        self.stopped_early = self.dist.any(out)
        return self.stopped_early

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics:  # rank 0 only
            self.metrics.write(record)

    def _final_summary(self) -> dict[str, Any]:
        return {
            **self.summary,
            "run_dir": str(self.run_dir), "step": self.step, "best_val_loss": self.best_val_loss,
            "best_val_bpb": (split_bits_per_byte(self.best_val_loss, self.data.meta, "val")
                             if math.isfinite(self.best_val_loss) else None),
            "interrupted": self.stop_requested, "stopped_early": self.stopped_early,
            "elapsed": self.elapsed, "params": self.model.num_params(),
            "trainable_params": self.model.num_params(trainable=True), "rank": self.dist.rank,
            "world_size": self.dist.world_size, "skipped_steps": self.guard.skipped,
        }

    def _request_stop(self) -> None:
        self.stop_requested = True

    def _check_divergence(self) -> None:
        """Stop, on every rank together, once max_bad_steps steps in a row were skipped."""
        if self.dist.any(self.guard.diverged()):
            raise self.guard.error(self.step, self.run_dir)

    def _stop_agreed(self) -> bool:
        """Ctrl-C may reach one rank only (or ranks at different steps): stop when any rank asks."""
        self.stop_requested = self.dist.any(self.stop_requested)
        return self.stop_requested

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean micro-batch loss as a tensor (no host sync).

        A step with a non-finite loss or gradient does not move the weights or the optimizer state;
        it returns 0 and is counted by `self.guard`.
        """
        tcfg = self.tcfg
        set_lr(self.optimizer, self.step, tcfg)
        torch.manual_seed(dropout_seed(tcfg.seed, self.step, self.dist.rank))
        total = torch.zeros((), device=self.device)
        for micro in range(tcfg.grad_accum):
            x, y = self.sampler.next()
            # DDP averages gradients over ranks once, after the last micro-batch
            with self.dist.no_sync(self.wrapped, sync=micro == tcfg.grad_accum - 1):
                with self.autocast():
                    _, loss = self.train_model(x.to(self.device, non_blocking=True),
                                               y.to(self.device, non_blocking=True))
                self.scaler.scale(loss / tcfg.grad_accum).backward()
            total += loss.detach()
        loss, norm = total / tcfg.grad_accum, None
        if tcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not float16-scaled ones
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        if self.scaler.is_enabled():
            # float16: overflowing gradients are routine, GradScaler skips those steps and lowers
            # its scale; only a non-finite loss counts as bad
            bad = ~torch.isfinite(loss)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            norm = grad_norm(self.model.parameters()) if norm is None else norm
            bad = bad_step(loss, norm)
            step_unless_bad(self.optimizer, bad)
        self.last_grad_norm = norm  # before clipping; a tensor: no host sync here
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.update(bad)
        return loss.masked_fill(bad, 0.0)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)
