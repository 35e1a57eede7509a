"""The training loop as a function: `train(...)` -> summary. The CLI and the tests call it in-process.

One step: forward, cross-entropy, backward over `grad_accum` micro-batches, global-norm clipping,
AdamW with the LR from `optim.lr_at`. Every `eval_interval` steps (and at the end): estimate train/val
loss on fixed batches, print a short sample, write a checkpoint (and mark it best when val improves).
Exact resume restores weights, optimizer moments, step, best val loss and the sampler; dropout's RNG
is seeded per step from (seed, step, rank), so it needs no saved state.
Ctrl-C finishes the current step, saves a checkpoint and returns.

The forward pass runs under autocast in the run's dtype (float32 master weights; a GradScaler for
float16), see device.py. Under torchrun every rank runs this same loop on its slice of each batch and
DDP averages the gradients; rank 0 alone prepares data, evaluates, samples and writes files, see
distributed.py.

Nothing lost: a step whose loss or gradient is NaN/inf is skipped (the optimizer does not move) and
counted; `max_bad_steps` of them in a row stop the run, keeping the last good checkpoint. A new run
that fails while setting up leaves `--out` as it was; a run killed before its first checkpoint
restarts from step 0 on `--resume`. Resume refuses a different model, tokenizer or data.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .bpb import split_bits_per_byte
from .config import (
    ModelConfig,
    TrainConfig,
    load_toml,
    model_config_from_dict,
    resolve,
    split_overrides,
)
from .data import BatchSampler, PreparedData, bundled_corpus, is_prepared, load_prepared, prepare
from .device import (
    autocast,
    configure_cpu,
    dtype_name,
    enable_tf32,
    grad_scaler,
    resolve_device,
    resolve_dtype,
)
from .distributed import DistContext, dropout_seed
from .engine import Engine
from .errors import CheckpointError, ConfigError, DataError
from .model import GPT
from .nonfinite import NonFiniteGuard, bad_step, grad_norm, step_unless_bad
from .optim import lr_at, make_optimizer, set_lr
from .tokenizers import load_tokenizer

# Settings that shape the prepared data; changing them on resume would change what is being learnt.
DATA_SHAPING = ("data", "docs", "val_fraction", "tokenizer", "tokenizer_vocab_size")


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
    # a run killed before its first checkpoint starts again from step 0: there is nothing to lose
    from_checkpoint = resume and bool(ckpt.list_checkpoints(run_dir))
    with distributed.session(tcfg.device) as dist:  # one process, or one rank under torchrun
        if dist.distributed and trainer_cls is not Trainer:
            raise ConfigError("the reference engine trains in one process; start it without torchrun")
        data_dir = dist.main_first(
            lambda: _set_up_run(mcfg, tcfg, run_dir, resume, from_checkpoint, overwrite, progress))
        data = load_prepared(data_dir)
        mcfg = dataclasses.replace(mcfg, vocab_size=data.tokenizer.vocab_size)
        if trainer_cls is Trainer:
            return Trainer(mcfg, tcfg, data, run_dir, progress, dist).run(from_checkpoint)
        return trainer_cls(mcfg, tcfg, data, run_dir, progress).run(from_checkpoint)


def _set_up_run(mcfg: ModelConfig, tcfg: TrainConfig, run_dir: Path, resume: bool,
                from_checkpoint: bool, overwrite: bool, progress: bool = True) -> Path:
    """Claim the run directory, prepare the data, write config and tokenizer; -> the data dir.

    A new run that fails here leaves --out as it was (checkpoint.new_run_dir); a resumed run
    rewrites its config only once its checkpoint has loaded (Trainer.run).
    """
    if resume and not from_checkpoint:
        print(f"warning: {run_dir} has no checkpoint yet; starting it from step 0", file=sys.stderr)
    with nullcontext() if resume else ckpt.new_run_dir(run_dir, overwrite, mcfg, tcfg):
        data = _data_for_run(tcfg, run_dir, from_checkpoint, progress)
        tcfg = _record_data_tokenizer(tcfg, data)
        mcfg = dataclasses.replace(mcfg, vocab_size=data.tokenizer.vocab_size)
        for split in ("train", "val"):
            n = len(getattr(data, split))
            if n <= mcfg.block_size:
                raise DataError(
                    f"the {split} split has {n} tokens, fewer than block-size + 1 ({mcfg.block_size + 1}); "
                    "use a smaller --block-size or more text"
                )
        if not from_checkpoint:
            ckpt.write_run_config(run_dir, mcfg, tcfg)
            ckpt.atomic_write_text(run_dir / ckpt.TOKENIZER, json.dumps(data.tokenizer.to_dict(),
                                                                        ensure_ascii=False) + "\n")
    return data.path


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
        if k in train_over and not _same_setting(k, getattr(tcfg, k), train_over[k]):
            what = "different data" if k == "data" else f"a different {k.replace('_', '-')}"
            old, new = (_shown(k, v) for v in (getattr(tcfg, k), train_over[k]))
            raise ConfigError(f"cannot resume {out} with {what}: {old} -> {new}")
    tcfg = dataclasses.replace(tcfg, **train_over)
    tcfg.validate()
    return mcfg, tcfg


def _shown(key: str, value: Any) -> Any:
    return {"data": "the bundled corpus", "docs": "stream"}.get(key, value) if value is None else value


def _same_setting(key: str, stored: Any, given: Any) -> bool:
    if key == "data" and stored is not None and given is not None:
        return Path(stored).resolve() == Path(given).resolve()  # ./a.txt and /abs/a.txt are the same
    return stored == given


def _data_for_run(tcfg: TrainConfig, run_dir: Path, resume: bool, progress: bool = True) -> PreparedData:
    """Use prepared data as is; prepare raw text (or the bundled corpus) into RUN/data."""
    if tcfg.data and is_prepared(tcfg.data):
        data = load_prepared(tcfg.data)
    else:
        target = run_dir / "data"
        if not (resume and is_prepared(target) and _same_sources(target, tcfg.data)):
            staging = run_dir / "data.new"
            shutil.rmtree(staging, ignore_errors=True)
            prepare([tcfg.data or bundled_corpus()], staging, docs=tcfg.docs,
                    val_fraction=tcfg.val_fraction, seed=tcfg.seed, tokenizer=tcfg.tokenizer,
                    vocab_size=tcfg.tokenizer_vocab_size, progress=progress)
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        data = load_prepared(target)
    if resume:
        ours, theirs = data.tokenizer, load_tokenizer(run_dir / ckpt.TOKENIZER)
        if ours.to_dict() != theirs.to_dict():
            raise CheckpointError(
                f"cannot resume {run_dir}: the data's vocabulary ({ours.kind}, {ours.vocab_size} tokens) "
                f"differs from the run's ({theirs.kind}, {theirs.vocab_size} tokens); "
                "train a new run for this data"
            )
    return data


def _record_data_tokenizer(tcfg: TrainConfig, data: PreparedData) -> TrainConfig:
    """Prepared data brings its own tokenizer: the run's config.json records that one.

    An explicit --tokenizer / --vocab-size that contradicts the data is an error, not silently ignored
    ("char" is the default, so it cannot be told apart from not asking and yields to the data).
    """
    kind, asked = data.meta.get("tokenizer", data.tokenizer.kind), data.meta.get("tokenizer_vocab_size")
    if tcfg.tokenizer not in ("char", kind) or tcfg.tokenizer_vocab_size not in (None, asked):
        size = f" --vocab-size {asked}" if asked else ""
        raise ConfigError(f"{data.path} was prepared with --tokenizer {kind}{size}; drop --tokenizer/"
                          "--vocab-size or prepare the data again")
    return dataclasses.replace(tcfg, tokenizer=kind, tokenizer_vocab_size=asked)


def _same_sources(data_dir: Path, data: str | None) -> bool:
    meta = json.loads((data_dir / "meta.json").read_text())
    wanted = [str(data)] if data else [str(bundled_corpus())]
    return meta.get("sources") == wanted or (data is not None and Path(data).is_dir())


class Trainer:
    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, data: PreparedData, run_dir: Path,
                 progress: bool = True, dist: DistContext | None = None):
        self.mcfg, self.tcfg, self.data, self.run_dir = mcfg, tcfg, data, run_dir
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
                                    self.dist.rank, self.dist.world_size)
        self.step = 0
        self.best_val_loss = math.inf
        self.elapsed = 0.0  # training seconds across resumes
        self.stop_requested = False
        self.guard = NonFiniteGuard(tcfg.max_bad_steps)
        self.tokens_per_step = (tcfg.batch_size * mcfg.block_size * tcfg.grad_accum
                                * self.dist.world_size)

    def autocast(self):
        return autocast(self.device, self.dtype)

    def describe(self) -> str:
        t, n = self.tcfg, self.dist.world_size
        return (f"training {self.model.num_params():,} parameters on {self.device}"
                f"{f' x {n} processes' if n > 1 else ''}, {dtype_name(self.dtype)}"
                f"{', compiled' if t.compile else ''}; effective batch {t.batch_size * t.grad_accum * n} "
                f"sequences ({t.batch_size} x {t.grad_accum} accumulation x {n} processes)")

    # --- state ----------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
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
        ckpt.load_weights(self.model, path / ckpt.WEIGHTS)
        state = ckpt.load_trainer_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            if state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            self.step = int(state["step"])
            self.best_val_loss = float(state["best_val_loss"])
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
                                   self.tcfg.batch_size, seed=self.tcfg.seed + 1 + i)
            total = torch.zeros((), device=self.device)
            for _ in range(self.tcfg.eval_iters):
                x, y = sampler.next()
                with self.autocast():
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
            warnings = self.restore()
            if self.dist.is_main:
                for damaged in ckpt.set_aside_damaged(self.run_dir, self.step):
                    warnings.append(f"moved the damaged checkpoint aside to {damaged}")
                ckpt.remove_stale_temp(self.run_dir)
                ckpt.write_run_config(self.run_dir, self.mcfg, tcfg)  # records e.g. a raised max_iters
                for w in warnings:
                    print(f"warning: {w}", file=sys.stderr)
        if self.dist.is_main:
            _truncate_metrics(metrics_path, self.step)
        if self.progress:
            print(self.describe(), file=sys.stderr)
        bar = tqdm(total=tcfg.max_iters, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, unit="it", file=sys.stderr)
        self.model.train()
        last_log_time, last_log_step = time.perf_counter(), self.step
        loss_sum = torch.zeros((), device=self.device)
        last_saved = -1
        summary: dict[str, Any] = {"val_loss": None, "train_loss": None, "val_bpb": None}
        metrics_file = open(metrics_path, "a") if self.dist.is_main else nullcontext()
        with metrics_file as metrics, _stop_on_signal(self):
            while self.step < tcfg.max_iters and not self._stop_agreed():
                loss_sum += self.train_step()
                self.step += 1
                bar.update(1)
                now = time.perf_counter()
                record: dict[str, Any] = {}
                if self.step % tcfg.log_interval == 0 or self.step == tcfg.max_iters:
                    steps = self.step - last_log_step
                    dt = now - last_log_time
                    self.elapsed += dt
                    self._check_divergence()
                    steps -= self.guard.skipped_since_last_call()  # their losses were not summed
                    train_loss = self.dist.mean(loss_sum).item() / steps if steps else math.nan
                    loss_sum.zero_()
                    tok_s = steps * self.tokens_per_step / dt
                    record = {"iter": self.step, "train_loss": round(train_loss, 5) if steps else None,
                              "val_loss": None, "lr": lr_at(self.step - 1, tcfg),
                              "tokens_per_sec": round(tok_s, 1), "elapsed": round(self.elapsed, 3),
                              "skipped_steps": self.guard.skipped}
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    summary.update(train_loss=train_loss, tokens_per_sec=tok_s)
                    last_log_time, last_log_step = now, self.step
                if self.step % tcfg.eval_interval == 0 or self.step == tcfg.max_iters:
                    self._check_divergence()  # never save after a divergence
                    if self.dist.is_main:  # rank 0 evaluates, saves and samples; the others wait
                        losses = self.estimate_loss()
                        record.setdefault("iter", self.step)
                        bpb = {s: split_bits_per_byte(losses[s], self.data.meta, s) for s in losses}
                        record.update(val_loss=round(losses["val"], 5),
                                      val_ppl=round(math.exp(losses["val"]), 3),
                                      eval_train_loss=round(losses["train"], 5),
                                      val_bpb=_round(bpb["val"]), train_bpb=_round(bpb["train"]))
                        # log before saving: a kill in between must not leave a checkpoint without its line
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        record = {}
                        self.save(losses["val"], losses["train"])
                        summary.update(val_loss=losses["val"], val_bpb=bpb["val"])
                        bpb_text = f", val bpb {bpb['val']:.4f}" if bpb["val"] is not None else ""
                        bar.write(f"step {self.step}: train loss {losses['train']:.4f}, "
                                  f"val loss {losses['val']:.4f} (ppl {math.exp(losses['val']):.2f})"
                                  f"{bpb_text}")
                        if tcfg.sample_tokens:
                            bar.write("---\n" + self.sample_text() + "\n---")
                    self.dist.barrier()
                    last_saved = self.step
                    last_log_time = time.perf_counter()  # evaluation is not training time
                if record and metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
            if self.stop_requested and last_saved != self.step:
                self.elapsed += time.perf_counter() - last_log_time
                self._check_divergence()
                self.save()
                self.dist.barrier()
        bar.close()
        summary.update(
            run_dir=str(self.run_dir), step=self.step, best_val_loss=self.best_val_loss,
            best_val_bpb=(split_bits_per_byte(self.best_val_loss, self.data.meta, "val")
                          if math.isfinite(self.best_val_loss) else None),
            interrupted=self.stop_requested, elapsed=self.elapsed, params=self.model.num_params(),
            rank=self.dist.rank, world_size=self.dist.world_size, skipped_steps=self.guard.skipped,
        )
        return summary

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
            bad = bad_step(loss, grad_norm(self.model.parameters()) if norm is None else norm)
            step_unless_bad(self.optimizer, bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.update(bad)
        return loss.masked_fill(bad, 0.0)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


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
def _stop_on_signal(trainer: Trainer):
    """First Ctrl-C (or SIGTERM, what `kill` and job schedulers send before they SIGKILL): finish
    the step, save, stop. A second one: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    signals = 0  # this process's own; under torchrun other ranks stop by agreement, unsignalled

    def handler(signum, frame):
        nonlocal signals
        signals += 1
        if signals > 1:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        if trainer.dist.is_main:
            name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr)

    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in stopping}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
