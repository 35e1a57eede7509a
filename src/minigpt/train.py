"""The training loop as a function: `train(...)` -> summary. The CLI and the tests call it in-process.

One step: forward, cross-entropy, backward over `grad_accum` micro-batches, global-norm clipping,
AdamW with the LR from `optim.lr_at`. Every `eval_interval` steps (and at the end): estimate train/val
loss on fixed batches, print a short sample, write a checkpoint (and mark it best when val improves).
Exact resume restores weights, optimizer moments, step, best val loss, torch RNG and the sampler.
Ctrl-C finishes the current step, saves a checkpoint and returns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import (
    ModelConfig,
    TrainConfig,
    load_toml,
    model_config_from_dict,
    resolve,
    split_overrides,
)
from .data import BatchSampler, PreparedData, bundled_corpus, is_prepared, load_prepared, prepare
from .device import configure_cpu, resolve_device
from .engine import Engine
from .errors import CheckpointError, ConfigError, DataError
from .model import GPT
from .optim import lr_at, make_optimizer, set_lr

# Settings that shape the prepared data; changing them on resume would change what is being learnt.
DATA_SHAPING = ("docs", "val_fraction", "tokenizer")


def train(
    preset: str | None = None,
    config_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a GPT. Keyword overrides use the config names: `train(data="x.txt", max_iters=500)`."""
    if resume:
        mcfg, tcfg = _resume_config(preset, config_file, overrides)
    else:
        mcfg, tcfg = resolve(preset, config_file, overrides)
    trainer_cls = Trainer
    if tcfg.engine == "reference":  # NumPy engine: refuse what it cannot do before touching --out
        from .reference_train import ReferenceTrainer, check_reference_config

        check_reference_config(mcfg, tcfg)
        trainer_cls = ReferenceTrainer
    run_dir = Path(tcfg.out)
    if not resume:
        _claim_run_dir(run_dir, overwrite)
    data = _data_for_run(tcfg, run_dir, resume)
    mcfg = dataclasses.replace(mcfg, vocab_size=data.tokenizer.vocab_size)
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n <= mcfg.block_size:
            raise DataError(
                f"the {split} split has {n} tokens, fewer than block-size + 1 ({mcfg.block_size + 1}); "
                "use a smaller --block-size or more text"
            )
    if not resume:
        ckpt.write_run_config(run_dir, mcfg, tcfg)
        ckpt.atomic_write_text(run_dir / ckpt.TOKENIZER, json.dumps(data.tokenizer.to_dict(),
                                                                    ensure_ascii=False) + "\n")
    else:
        ckpt.write_run_config(run_dir, mcfg, tcfg)  # records e.g. a raised max_iters
    return trainer_cls(mcfg, tcfg, data, run_dir, progress).run(resume)


def _claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Never write over someone's files: an existing run needs --resume or --overwrite."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / ckpt.CONFIG).exists():
            raise ConfigError(f"{run_dir} exists and is not a minigpt run directory; choose another --out")
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _resume_config(preset, config_file, overrides) -> tuple[ModelConfig, TrainConfig]:
    """The run's own config, plus explicit train overrides; model changes are refused."""
    out = overrides.get("out") or (load_toml(config_file).get("out") if config_file else None)
    if not out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    mcfg, tcfg = ckpt.read_run_config(Path(out))
    given = load_toml(config_file) if config_file else {}
    given.update({k: v for k, v in overrides.items() if v is not None})
    model_over, train_over = split_overrides(given)
    if preset or given.get("preset"):
        from .config import PRESETS

        name = preset or given["preset"]
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        model_over = {**PRESETS[name].model, **model_over}
    stored = dataclasses.asdict(mcfg)
    wanted = model_config_from_dict({**stored, **model_over})
    diffs = [f"{k} {stored[k]} -> {v}" for k, v in dataclasses.asdict(wanted).items() if stored[k] != v]
    if diffs:
        raise ConfigError(f"cannot resume {out} with a different model: {', '.join(diffs)}")
    for k in DATA_SHAPING:
        if k in train_over and train_over[k] != getattr(tcfg, k):
            raise ConfigError(f"cannot resume {out} with a different {k.replace('_', '-')}")
    tcfg = dataclasses.replace(tcfg, **train_over)
    tcfg.validate()
    return mcfg, tcfg


def _data_for_run(tcfg: TrainConfig, run_dir: Path, resume: bool) -> PreparedData:
    """Use prepared data as is; prepare raw text (or the bundled corpus) into RUN/data."""
    if tcfg.data and is_prepared(tcfg.data):
        data = load_prepared(tcfg.data)
    else:
        target = run_dir / "data"
        if not (resume and is_prepared(target) and _same_sources(target, tcfg.data)):
            staging = run_dir / "data.new"
            shutil.rmtree(staging, ignore_errors=True)
            prepare([tcfg.data or bundled_corpus()], staging, docs=tcfg.docs,
                    val_fraction=tcfg.val_fraction, seed=tcfg.seed, tokenizer=tcfg.tokenizer)
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        data = load_prepared(target)
    if resume:
        run_tok = json.loads((run_dir / ckpt.TOKENIZER).read_text(encoding="utf-8"))
        if run_tok != data.tokenizer.to_dict():
            raise CheckpointError(
                f"cannot resume {run_dir}: the data's vocabulary ({data.tokenizer.vocab_size} tokens) "
                f"differs from the run's tokenizer; train a new run for this data"
            )
    return data


def _same_sources(data_dir: Path, data: str | None) -> bool:
    meta = json.loads((data_dir / "meta.json").read_text())
    wanted = [str(data)] if data else [str(bundled_corpus())]
    return meta.get("sources") == wanted or (data is not None and Path(data).is_dir())


class Trainer:
    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, data: PreparedData, run_dir: Path,
                 progress: bool = True):
        self.mcfg, self.tcfg, self.data, self.run_dir = mcfg, tcfg, data, run_dir
        self.progress = progress
        self.device = resolve_device(tcfg.device)
        self.threads = configure_cpu(tcfg.threads)
        torch.manual_seed(tcfg.seed)
        self.model = GPT(mcfg).to(self.device)
        self.optimizer = make_optimizer(self.model, tcfg)
        self.sampler = BatchSampler(data.train, mcfg.block_size, tcfg.batch_size, tcfg.seed)
        self.step = 0
        self.best_val_loss = math.inf
        self.elapsed = 0.0  # training seconds across resumes
        self.stop_requested = False
        self.tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum

    # --- state ----------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "elapsed": self.elapsed,
            "torch_rng": torch.get_rng_state(),
            "sampler": self.sampler.state_dict(),
        }

    def restore(self) -> list[str]:
        path, meta, warnings = ckpt.find_checkpoint(self.run_dir, "last")
        ckpt.load_weights(self.model, path / ckpt.WEIGHTS)
        state = ckpt.load_trainer_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
            self.best_val_loss = float(state["best_val_loss"])
            self.elapsed = float(state["elapsed"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"trainer state in {path} is unusable: {e}") from None
        return warnings

    def save(self, val_loss: float | None = None, train_loss: float | None = None) -> None:
        is_best = val_loss is not None and val_loss < self.best_val_loss
        if is_best:
            self.best_val_loss = val_loss
        meta = {"val_loss": val_loss, "train_loss": train_loss, "best_val_loss": self.best_val_loss}
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
                                   self.tcfg.batch_size, seed=self.tcfg.seed + 1 + i)
            total = torch.zeros((), device=self.device)
            for _ in range(self.tcfg.eval_iters):
                x, y = sampler.next()
                total += self.model(x.to(self.device), y.to(self.device))[1]
            out[split] = (total / self.tcfg.eval_iters).item()
        self.model.train()
        return out

    def sample_text(self) -> str:
        engine = Engine(self.model, self.data.tokenizer, docs=self.tcfg.docs is not None)
        try:
            text = engine.generate("", max_new_tokens=self.tcfg.sample_tokens, temperature=0.8,
                                   seed=self.tcfg.seed)
        finally:
            self.model.train()
        return text

    # --- the loop -------------------------------------------------------------------------------

    def run(self, resume: bool) -> dict[str, Any]:
        tcfg = self.tcfg
        metrics_path = self.run_dir / ckpt.METRICS
        if resume:
            for w in self.restore():
                print(f"warning: {w}", file=sys.stderr)
        _truncate_metrics(metrics_path, self.step)
        bar = tqdm(total=tcfg.max_iters, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, unit="it", file=sys.stderr)
        self.model.train()
        last_log_time, last_log_step = time.perf_counter(), self.step
        loss_sum = torch.zeros((), device=self.device)
        last_saved = -1
        summary: dict[str, Any] = {"val_loss": None, "train_loss": None}
        with open(metrics_path, "a") as metrics, _stop_on_sigint(self):
            while self.step < tcfg.max_iters and not self.stop_requested:
                loss_sum += self.train_step()
                self.step += 1
                bar.update(1)
                now = time.perf_counter()
                record: dict[str, Any] = {}
                if self.step % tcfg.log_interval == 0 or self.step == tcfg.max_iters:
                    steps = self.step - last_log_step
                    dt = now - last_log_time
                    self.elapsed += dt
                    train_loss = loss_sum.item() / steps
                    loss_sum.zero_()
                    tok_s = steps * self.tokens_per_step / dt
                    record = {"iter": self.step, "train_loss": round(train_loss, 5), "val_loss": None,
                              "lr": lr_at(self.step - 1, tcfg), "tokens_per_sec": round(tok_s, 1),
                              "elapsed": round(self.elapsed, 3)}
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    summary.update(train_loss=train_loss, tokens_per_sec=tok_s)
                    last_log_time, last_log_step = now, self.step
                if self.step % tcfg.eval_interval == 0 or self.step == tcfg.max_iters:
                    losses = self.estimate_loss()
                    record.setdefault("iter", self.step)
                    record.update(val_loss=round(losses["val"], 5), val_ppl=round(math.exp(losses["val"]), 3),
                                  eval_train_loss=round(losses["train"], 5))
                    self.save(losses["val"], losses["train"])
                    last_saved = self.step
                    summary["val_loss"] = losses["val"]
                    bar.write(f"step {self.step}: train loss {losses['train']:.4f}, "
                              f"val loss {losses['val']:.4f} (ppl {math.exp(losses['val']):.2f})")
                    if tcfg.sample_tokens:
                        bar.write("---\n" + self.sample_text() + "\n---")
                    last_log_time = time.perf_counter()  # evaluation is not training time
                if record:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
            if self.stop_requested and last_saved != self.step:
                self.elapsed += time.perf_counter() - last_log_time
                self.save()
        bar.close()
        summary.update(
            run_dir=str(self.run_dir), step=self.step, best_val_loss=self.best_val_loss,
            interrupted=self.stop_requested, elapsed=self.elapsed, params=self.model.num_params(),
        )
        return summary

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean micro-batch loss as a tensor (no host sync)."""
        tcfg = self.tcfg
        set_lr(self.optimizer, self.step, tcfg)
        total = torch.zeros((), device=self.device)
        for _ in range(tcfg.grad_accum):
            x, y = self.sampler.next()
            _, loss = self.model(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            (loss / tcfg.grad_accum).backward()
            total += loss.detach()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / tcfg.grad_accum


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log matches the resumed state."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))


@contextmanager
def _stop_on_sigint(trainer: Trainer):
    """First Ctrl-C: finish the step, save, stop. Second Ctrl-C: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
