"""The `minigpt` command: argument parsing only; every subcommand calls the library.

Known errors (MiniGPTError, OS errors) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import BACKENDS, DOC_MODES, ModelConfig, TrainConfig, resolve
from .errors import ConfigError, MiniGPTError
from .sampling import SamplingParams
from .tokenization import kinds

LAYOUT_SWITCHES = ("bias", "pos_emb", "norm", "activation", "qk_norm", "tie_embeddings")

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every flag's default. Config flags write theirs into the help (the value
    that applies when the flag is left out); switches and None defaults have nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "[default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _flag_help(f: dataclasses.Field, default: Any) -> str:
    text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        text += f" ({' | '.join(f.metadata['choices'])})"
    shown = "the arch's" if default is None and f.name in LAYOUT_SWITCHES else default
    return f"{text} [default: {shown}]"


def _add_fields(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                defaults: Any, dest_prefix: str = "") -> None:
    """One kebab-case flag per field of a settings dataclass, help and choices from its metadata.

    Flags default to None ("not given"), so that presets, TOML files and a run's own config can
    tell a flag the user typed from one left alone; the help shows the value that applies then.
    """
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = _flag_help(f, getattr(defaults, f.name))
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        typ = {"int": int, "float": float}.get(kind, str)
        # choices are shown, not enforced here: validate() gives the one-line error for every
        # entry point alike (flags, TOML files, keyword arguments)
        p.add_argument(flag, type=typ, default=None, metavar=kind.upper(), help=help_text)


def _add_config_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                      classes: tuple = (ModelConfig, TrainConfig)) -> None:
    """The ModelConfig/TrainConfig flags; the help shows the default preset's values."""
    model, train = resolve(None)
    for cls in classes:
        _add_fields(p, cls, model if cls is ModelConfig else train)
    if TrainConfig in classes:  # the name before 0.2.0, kept so existing commands keep working
        p.add_argument("--engine", dest="backend", choices=BACKENDS, default=None,
                       help=argparse.SUPPRESS)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    _add_fields(p, SamplingParams, SamplingParams())


def _sampling_from(args: argparse.Namespace) -> SamplingParams:
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    return SamplingParams().replace(**{k: getattr(args, k) for k in names if hasattr(args, k)})


def _add_tokenizer_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--tokenizer", choices=kinds(), default=default,
                   help="char: one token per character (default) | bytes: the 256 UTF-8 byte values, "
                        "any language | bpe: byte-level BPE learnt from your corpus")
    p.add_argument("--vocab-size", dest="tokenizer_vocab_size", type=int, default=None, metavar="N",
                   help="bpe vocabulary size, including the 256 bytes, BOS and EOS (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", formatter_class=_Help, description="Train a small GPT on your text and sample from it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", formatter_class=_Help, help="tokenize text files into a data directory")
    p.add_argument("inputs", nargs="+", help="text files or directories of .txt files")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--docs", choices=DOC_MODES, default=None,
                   help="one document per line / per blank-line block / per file (default: stream)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    _add_tokenizer_flags(p, default="char")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", formatter_class=_Help, help="train a model (default: small preset on Tiny Shakespeare)")
    p.add_argument("--data", help="text file, directory of .txt, or prepared data dir (default: bundled Tiny Shakespeare)")
    p.add_argument("--out", help="run directory (default: runs/default)")
    p.add_argument("--preset", help="tiny | small | medium | large (default: small)")
    p.add_argument("--config", help="TOML file of settings (flag names with underscores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tokenizer_flags(p, default=None)
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", formatter_class=_Help, help="generate text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    _add_sampling_flags(p)
    p.add_argument("--checkpoint", default="best", help="best | last | a step number")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto",
                   help="auto | float32 | bfloat16 | float16 weights (auto: bf16 on GPUs, fp32 on CPU)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("serve", formatter_class=_Help, help="serve a trained run over an OpenAI-compatible HTTP API")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: env MINIGPT_API_KEY)")
    p.add_argument("--checkpoint", default="best", help="best | last | a step number")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto",
                   help="auto | float32 | bfloat16 | float16 weights (auto: bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="rows in the one decoding batch (a request with n samples takes n)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for rows; beyond that the server answers 429")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", formatter_class=_Help, help="measure training or generation speed (last line: JSON)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", formatter_class=_Help, help="ms/iteration, tokens/s, MFU and peak RSS of training steps")
    b.add_argument("--preset", help="tiny | small | medium | large (default: small)")
    b.add_argument("--config", help="TOML file of settings")
    b.add_argument("--data", help="text or prepared data (default: bundled Tiny Shakespeare)")
    b.add_argument("--iters", type=int, default=30, help="timed steps (default 30)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    _add_config_flags(b)
    b.set_defaults(func=cmd_bench_train)
    b = bench.add_parser("generate", formatter_class=_Help, help="time to first token, decode latency, tokens/s by batch")
    b.add_argument("run_dir", nargs="?", help="trained run (default: a fresh model of --preset)")
    b.add_argument("--preset", help="model when no run is given (default: small)")
    b.add_argument("--checkpoint", default="best")
    b.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for time to first token")
    b.add_argument("--new-tokens", type=int, default=50)
    b.add_argument("--batch-sizes", default="1,8,32", help="streams per batch, comma-separated")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=0, help="CPU threads (0 = auto)")
    b.add_argument("--device", default="auto")
    _add_config_flags(b.add_argument_group("model settings when no run is given"), (ModelConfig,))
    b.set_defaults(func=cmd_bench_generate)

    p = sub.add_parser("info", formatter_class=_Help, help="show a run (config, parameters, step, best val loss) or the presets "
                                    "with their training memory")
    p.add_argument("run_dir", nargs="?", help="run directory (omit to list presets)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--preset", help="show one preset's memory estimate in detail")
    p.add_argument("--batch-size", type=int, help="per-device batch size for the memory estimate "
                                                  "(default: each preset's)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: 67, chars)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", formatter_class=_Help, help="plot train/val loss curves of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="loss.png")
    p.add_argument("--metric", choices=("loss", "bpb"), default="loss",
                   help="loss per token, or bits per byte (compares runs with different tokenizers)")
    p.set_defaults(func=cmd_plot)
    return parser


def _config_overrides(args: argparse.Namespace, classes: tuple = (ModelConfig, TrainConfig)) -> dict:
    """The config flags the user gave (None = not given)."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    meta = prepare(args.inputs, args.out, docs=args.docs, val_fraction=args.val_fraction,
                   seed=args.seed, tokenizer=args.tokenizer, vocab_size=args.tokenizer_vocab_size)
    print(f"prepared {args.out}: {meta['tokenizer']} vocab {meta['vocab_size']}, train "
          f"{meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']}), "
          f"{meta['train_bytes'] / meta['train_tokens']:.2f} bytes per token")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.run import train

    summary = train(preset=args.preset, config_file=args.config, resume=args.resume,
                    overwrite=args.overwrite, progress=not args.quiet, **_config_overrides(args))
    if summary["rank"] != 0:  # under torchrun, rank 0 reports
        return 130 if summary["interrupted"] else 0
    best, bpb = summary["best_val_loss"], summary["best_val_bpb"]
    bpb_text = f" ({bpb:.4f} bits per byte)" if bpb is not None else ""
    print(f"run {summary['run_dir']}: step {summary['step']}, {summary['params']:,} parameters, "
          f"best val loss {best:.4f}{bpb_text}, {summary['elapsed']:.1f}s training" if best != float("inf")
          else f"run {summary['run_dir']}: step {summary['step']}")
    if summary["interrupted"]:
        how = (f"`minigpt train --out {summary['run_dir']} --resume`" if summary["world_size"] == 1
               else f"the same torchrun command with `--out {summary['run_dir']} --resume`")
        print(f"interrupted: checkpoint saved at step {summary['step']}; continue with {how}",
              file=sys.stderr)
        return 130
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .cpu import configure_cpu
    from .engine import load

    configure_cpu()  # threads for the cores that are idle now
    params = _sampling_from(args)  # bad settings: fail before loading anything
    engine = load(args.run_dir, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
    if params.num_samples == 1:
        events = engine.stream(args.prompt, params)  # unknown characters fail here, before output
        sys.stdout.write(args.prompt)
        for event in events:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, text in enumerate(engine.generate_many(args.prompt, params=params)):
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.app import serve
    except ImportError as e:
        raise ConfigError(f"serving needs the 'serve' extra ({e.name} is missing): "
                          "pip install 'minigpt[serve]'") from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("MINIGPT_API_KEY") or None
    serve(args.run_dir, host=args.host, port=args.port, api_key=api_key,
          checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
          max_tokens_limit=args.max_tokens_limit,
          max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .tools.bench import bench_train, format_train

    if args.iters < 1 or args.warmup < 0:
        raise ConfigError("--iters must be >= 1 and --warmup >= 0")
    result = bench_train(args.preset, args.config, args.iters, args.warmup, **_config_overrides(args))
    print(format_train(result))
    print(json.dumps(result))
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from .tools.bench import bench_generate, format_generate

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if min(sizes) < 1 or args.repeats < 1 or args.prompt_tokens < 1 or args.new_tokens < 1:
        raise ConfigError("--batch-sizes, --repeats, --prompt-tokens and --new-tokens must be >= 1")
    overrides = _config_overrides(args, (ModelConfig,))
    if args.run_dir and overrides:
        raise ConfigError("model settings apply to a fresh model; a run brings its own")
    result = bench_generate(args.run_dir, args.preset, args.checkpoint, args.prompt_tokens,
                            args.new_tokens, sizes, args.repeats, args.threads, args.device,
                            **overrides)
    print(format_generate(result))
    print(json.dumps(result))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .tools.info import (
        SHAKESPEARE_VOCAB,
        format_memory,
        format_presets,
        format_run_info,
        preset_rows,
        run_info,
    )

    if args.run_dir is None:
        vocab = args.vocab_size or SHAKESPEARE_VOCAB
        rows = preset_rows(vocab, args.batch_size, [args.preset] if args.preset else None)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(format_memory(rows[0]) if args.preset else format_presets(rows, vocab))
        return 0
    info = run_info(Path(args.run_dir))
    print(json.dumps(info, indent=2) if args.json else format_run_info(info))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .tools.plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out, args.metric)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MiniGPTError as e:
        if not getattr(e, "mirrored", False):  # an error rank 0 of a torchrun job also reports
            message = " ".join(line.strip() for line in str(e).splitlines())  # always one line
            print(f"minigpt: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("minigpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # e.g. `minigpt sample ... | head`
    except OSError as e:
        if getattr(e, "mirrored", False):
            return 1
        where = f": {e.filename}" if e.filename else ""
        print(f"minigpt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
