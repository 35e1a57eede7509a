"""What skipping non-finite steps costs per training step.

    python benchmarks/nonfinite_guard.py [--steps 200] [--repeats 5] [--threads 1]

Times `Trainer.train_step` (finite check on loss and gradient norm, the skip, the flag kept for
the guard) against the same step without any of it (the step as it was before), on the `tiny`
and `small` presets,
with gradient clipping on (the default) and off (then the guard computes the norm itself).
Blocks of steps alternate between the two so that machine load hits both alike; the figure is the
median over repeats. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.config import resolve  # noqa: E402
from minigpt.data.corpus import bundled_corpus  # noqa: E402
from minigpt.data.dataset import load_prepared  # noqa: E402
from minigpt.data.prepare import prepare  # noqa: E402
from minigpt.training.distributed import dropout_seed  # noqa: E402
from minigpt.training.optim import lr_at  # noqa: E402
from minigpt.training.trainer import Trainer  # noqa: E402


class Unguarded(Trainer):
    def train_step(self) -> torch.Tensor:
        """The step with no non-finite handling: Trainer.train_step as it was before it."""
        tcfg = self.tcfg
        lr = lr_at(self.step, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(dropout_seed(tcfg.seed, self.step, self.dist.rank))
        total = torch.zeros((), device=self.device)
        for micro in range(tcfg.grad_accum):
            x, y = self.sampler.next()
            with self.dist.no_sync(self.wrapped, sync=micro == tcfg.grad_accum - 1):
                with self.autocast():
                    _, loss = self.train_model(x.to(self.device, non_blocking=True),
                                               y.to(self.device, non_blocking=True))
                self.scaler.scale(loss / tcfg.grad_accum).backward()
            total += loss.detach()
        if tcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / tcfg.grad_accum


def time_block(trainer: Trainer, steps: int) -> float:
    t = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(steps):
        loss += trainer.train_step()
    loss.item()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="minigpt-guard-"))
    prepare([bundled_corpus()], work / "data")
    data = load_prepared(work / "data")
    results = {}
    for preset in ("tiny", "small"):
        for clip in (1.0, 0.0):
            mcfg, tcfg = resolve(preset, overrides={"vocab_size": data.tokenizer.vocab_size,
                                                    "grad_clip": clip, "device": "cpu",
                                                    "threads": args.threads})
            guarded = Trainer(mcfg, tcfg, data, work / "run", progress=False)
            plain = Unguarded(mcfg, tcfg, data, work / "run", progress=False)
            for t in (guarded, plain):
                time_block(t, 10)  # warm-up
            g, p = [], []
            for _ in range(args.repeats):
                g.append(time_block(guarded, args.steps))
                p.append(time_block(plain, args.steps))
            name = f"{preset}, grad_clip={clip:g}"
            gm, pm = statistics.median(g), statistics.median(p)
            results[name] = {"guarded_ms": round(gm * 1e3, 3), "unguarded_ms": round(pm * 1e3, 3),
                             "overhead_pct": round(100 * (gm / pm - 1), 1)}
            print(f"{name:24s} step {pm * 1e3:7.3f} ms unguarded, {gm * 1e3:7.3f} ms guarded "
                  f"({results[name]['overhead_pct']:+.1f}%)")
    print(json.dumps({"device": "cpu", "threads": args.threads, "steps": args.steps,
                      "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
