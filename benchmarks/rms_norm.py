"""RMSNorm forms on the CPU: forward + backward on the small preset's shapes, one thread.

Each form computes x / sqrt(mean(x^2) + eps) (* weight) over the last dimension; the rounds are
interleaved (every form once per round, then the next round) so the load of a shared machine falls
on all of them alike, and each figure is the median over rounds of CPU-microseconds per call
(process time: other processes' work is not counted). LayerNorm is there as the yardstick.

Shapes: the blocks' norms, (batch 24 * 64 tokens, 128) with a weight at eps 1e-6; the QK-norm,
queries and keys stacked as the model holds them, (2, 24, 4 heads, 64, 32) a permuted view, without
a weight at torch's default eps and with per-head gains at 1e-6.

    PYTHONPATH=src python benchmarks/rms_norm.py [--rounds 15] [--calls 50] [--compile]

Last line: JSON {shape: {form: us_per_call}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from minigpt.cpu import configure_cpu
from minigpt.model import RMS_NORM_EPS, rms_norm


def written_out(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def x_times_x(x, w, eps):
    y = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)
    return y if w is None else y * w


def via_normalize(x, w, eps):
    # x / max(||x||, e) * sqrt(D): the same function only where mean(x^2) >> eps (eps enters as
    # a clamp, not a sum), so it is timed, not a candidate
    y = F.normalize(x, dim=-1, eps=eps) * x.size(-1) ** 0.5
    return y if w is None else y * w


def torch_rms(x, w, eps):
    return F.rms_norm(x, (x.size(-1),), w, eps)


def layer_norm(x, w, eps):
    return F.layer_norm(x, (x.size(-1),), w, None, 1e-5)


def fused(x, w, eps):
    return rms_norm(x, w, eps)


def cases() -> dict[str, tuple[torch.Size, bool, float | None]]:
    return {
        "blocks (1536, 128), weight": ((1536, 128), True, RMS_NORM_EPS),
        "qk (2, 24, 4, 64, 32), no weight": ((2, 24, 4, 64, 32), False, None),
        "qk (2, 24, 4, 64, 32), gain": ((2, 24, 4, 64, 32), True, RMS_NORM_EPS),
    }


def make_inputs(shape, weighted: bool):
    if len(shape) == 5:  # the model's q, k: a permuted view of c_attn's output
        two, B, H, T, D = shape
        # a leaf with the strides qk_norm receives (the permuted view of c_attn's output)
        x = torch.randn(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[:2].clone(
            memory_format=torch.preserve_format).requires_grad_()
        w = (torch.ones(2, 1, 1, 1, D) + 0.1 * torch.randn(2, 1, 1, 1, D)) if weighted else None
    else:
        x = torch.randn(*shape).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1])) if weighted else None
    if w is not None:
        w.requires_grad_()
    return x, w


def step(form, x, w, eps, g):
    if w is not None and w.dim() > 1:  # per-head gains: the norm, then times the gain
        y = form(x, None, eps) * w
    else:
        y = form(x, w, eps)
    y.backward(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the written-out form")
    args = ap.parse_args()
    configure_cpu(1)  # one thread, freed memory kept: what training runs with
    torch.manual_seed(0)
    forms = {"F.rms_norm": torch_rms, "written out": written_out, "x*x": x_times_x,
             "F.normalize": via_normalize, "minigpt rms_norm": fused, "F.layer_norm": layer_norm}
    if args.compile:
        forms["compiled written out"] = torch.compile(written_out, dynamic=False)
    results = {}
    for name, (shape, weighted, eps) in cases().items():
        x, w = make_inputs(shape, weighted)
        g = torch.randn(x.shape)
        # the written-out forms need torch's default spelt out: float32's machine epsilon
        eps_of = {f: torch.finfo(x.dtype).eps for f in forms} if eps is None else {}
        eps_of.update({"F.rms_norm": eps, "minigpt rms_norm": eps})
        times: dict[str, list[float]] = {f: [] for f in forms}
        warmup = {}
        for f, form in forms.items():  # warm up (and compile: its cost is the first calls')
            t0 = time.perf_counter()
            for _ in range(3):
                step(form, x, w, eps_of.get(f, eps), g)
            warmup[f] = time.perf_counter() - t0
        for _ in range(args.rounds):
            for f, form in forms.items():
                t0 = time.process_time()
                for _ in range(args.calls):
                    step(form, x, w, eps_of.get(f, eps), g)
                times[f].append((time.process_time() - t0) / args.calls * 1e6)
        results[name] = {f: round(statistics.median(t), 1) for f, t in times.items()}
        if "compiled written out" in warmup:
            results[name]["compile_s"] = round(warmup["compiled written out"], 1)
        print(name)
        for f, us in results[name].items():
            print(f"  {f:22s} {us:8.1f} " + ("s to compile" if f == "compile_s" else "us fwd+bwd"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
