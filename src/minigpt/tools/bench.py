"""Speed measurements behind `minigpt bench train` and `minigpt bench generate`.

train: the real training step (`Trainer.train_step`: batch sampling, forward, backward, clipping,
optimizer) in steady state: ms per iteration, tokens/s, model FLOPs utilisation against a matmul
peak measured here with the same threads, peak RSS of the process.
generate: time to first token for a prompt, per-token decode latency, tokens/s of one stream and of a
sweep of batch sizes (num_samples), all through `Engine.stream`, the path the CLI and server use.

Each function returns a dict; the CLI prints a summary and that dict as JSON on the last line.
Timings are medians of repeats: other processes on the machine move single figures, not medians.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import resolve
from ..cpu import configure_cpu
from ..data.corpus import bundled_corpus
from ..data.dataset import is_prepared, load_prepared
from ..data.prepare import prepare
from ..device import resolve_device
from ..engine import Engine, load
from ..model import GPT
from ..sampling import SamplingParams
from .evaluate import split_loss  # noqa: F401  (the benchmarks import it from here too)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, device: torch.device | None = None) -> float:
    """Best fp32 n x n matmul rate on this device with the current threads: the MFU denominator."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm up: first call pays for allocations and library dispatch
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _timed_steps(trainer: Any, warmup: int, iters: int) -> tuple[list[float], ...]:
    """(losses, wall seconds, CPU seconds) of `iters` training steps after `warmup` untimed ones."""
    trainer.model.train()
    losses, times, cpu_times = [], [], []
    for i in range(warmup + iters):
        _sync(trainer.device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = trainer.train_step()
        _sync(trainer.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        trainer.step += 1
        losses.append(loss.item())  # outside the timed region
    return losses, times, cpu_times


def bench_train(
    preset: str | None = None,
    config_file: str | Path | None = None,
    iters: int = 30,
    warmup: int = 5,
    peak_gflops: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Time `iters` training steps after `warmup` steps; `data` as for train (default: bundled).

    Reports wall and CPU time per step: with one thread, CPU time is what the step would take on an
    idle machine, so it stays comparable while other processes share the cores.
    """
    from ..training.trainer import Trainer  # keep `minigpt bench generate` light

    mcfg, tcfg = resolve(preset, config_file, overrides)
    data = tcfg.data
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as tmp:
        if data and is_prepared(data):
            prepared = load_prepared(data)
        else:
            prepare([data or bundled_corpus()], Path(tmp) / "data", seed=tcfg.seed,
                    val_fraction=tcfg.val_fraction, tokenizer=tcfg.tokenizer, docs=tcfg.docs)
            prepared = load_prepared(Path(tmp) / "data")
        mcfg = dataclasses.replace(mcfg, vocab_size=prepared.tokenizer.vocab_size)
        trainer = Trainer(mcfg, tcfg, prepared, Path(tmp), progress=False)
        device = trainer.device
        peak = peak_gflops or matmul_peak_gflops(device=device)
        losses, times, cpu_times = _timed_steps(trainer, warmup, iters)
    ms = _median_ms(times)
    tokens_per_sec = trainer.tokens_per_step / (ms / 1e3)
    model_gflops = trainer.model.flops_per_token() * tokens_per_sec / 1e9
    return {
        "bench": "train",
        "arch": mcfg.arch,
        "optimizer": tcfg.optimizer,
        "params": trainer.model.num_params(),
        "trainable_params": trainer.model.num_params(trainable=True),  # fewer: LoRA adapters
        "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "block_size": mcfg.block_size,
        "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
        "device": str(device),
        "threads": trainer.threads,
        "iters": iters,
        "tokens_per_iter": trainer.tokens_per_step,
        "ms_per_iter": round(ms, 3),
        "cpu_ms_per_iter": round(_median_ms(cpu_times), 2),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "model_gflops_per_sec": round(model_gflops, 2),
        "matmul_peak_gflops": round(peak, 1),
        "mfu": round(model_gflops / peak, 4),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _engine(run_dir: str | Path | None, preset: str | None, checkpoint: str, device: str,
            overrides: dict[str, Any]) -> Engine:
    """A trained run, or a freshly initialised model of `preset` (speed does not need training)."""
    if run_dir is not None:
        return load(run_dir, checkpoint=checkpoint, device=device)
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as tmp:
        prepare([bundled_corpus()], tmp)
        tokenizer = load_prepared(tmp).tokenizer
    mcfg, _ = resolve(preset, None, {**overrides, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = GPT(mcfg).to(resolve_device(device))
    return Engine(model, tokenizer)


def _timed_stream(engine: Engine, prompt: str, new_tokens: int, num_samples: int,
                  seed: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(time to first token, gaps between later steps, total) of one generation, in seconds, each
    as [wall, CPU of this process]: both clocks read at the same instants."""
    def now() -> np.ndarray:
        return np.array([time.perf_counter(), time.process_time()])

    stamps = []
    t0 = now()
    params = SamplingParams(max_new_tokens=new_tokens, seed=seed, num_samples=num_samples,
                            stop_at_eos=False)
    events = engine.stream(prompt, params)
    for i, _ in enumerate(events):  # without EOS stops, each step yields one event per stream
        if i % num_samples == 0:
            stamps.append(now())
    total = now() - t0
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], total


def bench_generate(
    run_dir: str | Path | None = None,
    preset: str | None = None,
    checkpoint: str = "best",
    prompt_tokens: int = 64,
    new_tokens: int = 50,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    repeats: int = 5,
    threads: int = 0,
    device: str = "auto",
    **overrides: Any,
) -> dict[str, Any]:
    """Generation speed of a run (or of a fresh `preset` model): TTFT, decode latency, tokens/s.

    Each figure is given in wall time and in this process's CPU time over the same runs; with one
    thread the CPU figure is what an idle core would give while other processes share the machine.
    """
    threads = configure_cpu(threads)
    engine = _engine(run_dir, preset, checkpoint, device, overrides)
    text = bundled_corpus().read_text(encoding="utf-8")
    prompt = engine.tokenizer.decode(engine.tokenizer.encode(text[: prompt_tokens * 8])[:prompt_tokens])
    _timed_stream(engine, prompt, new_tokens, 1, seed=0)  # warm-up: lazy allocations, dispatch caches

    ttft, gaps, single = [], [], []
    for r in range(repeats):
        first, g, _ = _timed_stream(engine, prompt, new_tokens, 1, r)
        ttft.append(first)
        gaps.extend(g)
        single.append(_timed_stream(engine, "", new_tokens, 1, r)[2])  # 1-token prompt, as nanoGPT
    sweep = {b: [_timed_stream(engine, "", new_tokens, b, r)[2] for r in range(repeats)]
             for b in batch_sizes}
    out: dict[str, Any] = {}
    for label, i in (("", 0), ("cpu_", 1)):  # wall, then CPU
        out.update({
            f"{label}ttft_ms": round(_median_ms([t[i] for t in ttft]), 3),
            f"{label}decode_ms_per_token": round(_median_ms([t[i] for t in gaps]), 3),
            f"{label}tokens_per_sec": round(new_tokens / statistics.median(t[i] for t in single), 1),
            f"{label}batch_tokens_per_sec": {
                str(b): round(b * new_tokens / statistics.median(t[i] for t in ts), 1)
                for b, ts in sweep.items()},
        })
    return {
        "bench": "generate",
        "arch": engine.model.config.arch,
        "params": engine.model.num_params(),
        "block_size": engine.block_size,
        "device": str(engine.device),
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        **out,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def format_train(r: dict[str, Any]) -> str:
    return (f"train {r['arch']}/{r['optimizer']}: {r['params']:,} params, batch {r['batch_size']}x"
            f"{r['block_size']}, {r['threads']} thread(s) on {r['device']}\n"
            f"  {r['ms_per_iter']:.1f} ms/iter (CPU {r['cpu_ms_per_iter']:.1f}), "
            f"{r['tokens_per_sec']:,.0f} tokens/s, {r['model_gflops_per_sec']:.1f} model GFLOP/s = "
            f"{100 * r['mfu']:.1f}% of the {r['matmul_peak_gflops']:.0f} GFLOP/s matmul peak\n"
            f"  peak RSS {r['peak_rss_mb']:.0f} MB")


def format_generate(r: dict[str, Any]) -> str:
    sweep = ", ".join(f"{b}: {v:,.0f}" for b, v in r["batch_tokens_per_sec"].items())
    cpu_sweep = ", ".join(f"{b}: {v:,.0f}" for b, v in r["cpu_batch_tokens_per_sec"].items())
    return (f"generate {r['arch']}: {r['params']:,} params, context {r['block_size']}, "
            f"{r['threads']} thread(s) on {r['device']}\n"
            f"  time to first token ({r['prompt_tokens']}-token prompt) {r['ttft_ms']:.2f} ms "
            f"(CPU {r['cpu_ttft_ms']:.2f}); decode {r['decode_ms_per_token']:.3f} ms/token "
            f"(CPU {r['cpu_decode_ms_per_token']:.3f})\n"
            f"  one stream, {r['new_tokens']} new tokens: {r['tokens_per_sec']:,.0f} tokens/s "
            f"(per CPU second {r['cpu_tokens_per_sec']:,.0f})\n"
            f"  batched tokens/s by streams: {sweep}\n"
            f"  per CPU second: {cpu_sweep}\n"
            f"  peak RSS {r['peak_rss_mb']:.0f} MB")
