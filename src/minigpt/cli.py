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

from .config import (
    BACKENDS,
    DOC_MODES,
    ModelConfig,
    SamplingParams,
    ServeConfig,
    TrainConfig,
    resolve,
)
from .errors import ConfigError, MiniGPTError
from .structured import Constraint
from .tokenization import kinds

LAYOUT_SWITCHES = ("bias", "pos_emb", "norm", "activation", "qk_norm", "qk_norm_order",
                   "tie_embeddings")

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
    shown = f.metadata.get("shown", shown)  # what a None default means, where it means a value
    if isinstance(shown, tuple):
        shown = ",".join(shown)
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
        if f.metadata.get("multiple"):  # repeatable; each value may list several, comma-separated
            p.add_argument(flag, action="append", default=None, metavar="NAME[,NAME]",
                           help=help_text)
            continue
        typ = {"int": int, "float": float}.get(kind, str)
        # choices are shown, not enforced here: validate() gives the one-line error for every
        # entry point alike (flags, TOML files, keyword arguments)
        p.add_argument(flag, type=typ, default=None, metavar=f.metadata.get("metavar", kind.upper()),
                       help=help_text)


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
    return SamplingParams().replace(**{k: getattr(args, k) for k in names if hasattr(args, k)},
                                    constraint=_constraint_from(args))


def _constraint_from(args: argparse.Namespace) -> Constraint | None:
    """sample's --regex / --json-schema FILE / --grammar FILE (argparse keeps them exclusive)."""
    if getattr(args, "regex", None) is not None:
        return Constraint.regex(args.regex)
    for kind, path in (("json_schema", getattr(args, "json_schema", None)),
                       ("grammar", getattr(args, "grammar", None))):
        if path is not None:
            return Constraint.from_file(kind, path)
    return None


def _add_tokenizer_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--tokenizer", choices=kinds(), default=default,
                   help="char: one token per character (default) | bytes: the 256 UTF-8 byte values, "
                        "any language | bpe: byte-level BPE learnt from your corpus")
    p.add_argument("--vocab-size", dest="tokenizer_vocab_size", type=int, default=None, metavar="N",
                   help="bpe vocabulary size, including the 256 bytes, BOS and EOS (default 1024)")


# Which weights of a run to load, on which device, in which precision: declared once, taken by
# every command that loads a run (sample, inspect, serve, bench generate, export, eval).
LOAD_FLAGS: dict[str, dict[str, Any]] = {
    "checkpoint": dict(default="best", help="best | last | a step number"),
    "device": dict(default="auto", help="auto | cpu | cuda | cuda:N | mps"),
    "dtype": dict(default="auto", help="weights' precision: auto | float32 | bfloat16 | float16 "
                                       "(auto: bf16 on GPUs, fp32 on CPU)"),
}


def _add_load_flags(p: argparse.ArgumentParser, *names: str, **defaults: str) -> None:
    """--checkpoint / --device / --dtype, those `names`; `defaults` where a command differs."""
    for name in names:
        spec = LOAD_FLAGS[name]
        p.add_argument(f"--{name}", default=defaults.get(name, spec["default"]), help=spec["help"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", formatter_class=_Help, description="Train a small GPT on your text and sample from it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", formatter_class=_Help, help="tokenize text files into a data directory")
    p.add_argument("inputs", nargs="+", help="files (.txt, .jsonl/.json, .parquet, each text or JSON "
                   "lines file optionally .gz/.bz2/.xz/.zst) or directories of them")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--docs", choices=DOC_MODES, default=None,
                   help="one document per line / per blank-line block / per file (default: stream)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    _add_tokenizer_flags(p, default="char")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--text-field", default="text",
                   help="JSON field / Parquet column that holds the text")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip malformed JSON lines and records without text (counted) instead of "
                        "stopping at the first")
    p.add_argument("--chat", action="store_true",
                   help="the files are conversations (JSON lines of OpenAI `messages`): render them "
                        "with the chat template and mask the loss to the assistant's replies")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="JSON chat template for --chat (default: 'System:/User:/Assistant:' lines)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("download", formatter_class=_Help,
                       help="download a corpus: a catalogue name, a URL or hf:OWNER/NAME")
    p.add_argument("source", nargs="?", help="name from --list, http(s) URL, hf:OWNER/NAME[/PATH]")
    p.add_argument("--list", action="store_true", help="show the catalogue")
    p.add_argument("--out", default="data", help="directory to save into")
    p.add_argument("--sha256", default=None, metavar="HEX",
                   help="expected SHA-256 of the download (default: the catalogue's pin, if any)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up when the server sends nothing for this long")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="fetch catalogue files from URL/<upstream file name> (a local mirror); "
                        "pins still apply")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("train", formatter_class=_Help, help="train a model (default: small preset on Tiny Shakespeare)")
    p.add_argument("--data", help="text, JSON lines, Parquet or compressed file, a directory of them, "
                   "or a prepared data dir (default: bundled Tiny Shakespeare)")
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
    shape = p.add_argument_group("structured output (docs/structured.md)").add_mutually_exclusive_group()
    shape.add_argument("--regex", metavar="PATTERN", help="every sample matches this regex")
    shape.add_argument("--json-schema", metavar="FILE",
                       help="every sample is JSON valid under this schema (one line)")
    shape.add_argument("--grammar", metavar="FILE",
                       help="every sample is in this grammar: GBNF, or Lark for a .lark file")
    _add_load_flags(p, "checkpoint", "device", "dtype")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("inspect", formatter_class=_Help,
                       help="show a run's surprise at each token of a text and its attention maps")
    p.add_argument("run_dir")
    p.add_argument("--text", required=True, help="the text to read (at most block-size tokens)")
    p.add_argument("--out", default="inspect",
                   help="directory for inspect.html, inspect.json and attention-layer<L>.png")
    p.add_argument("--top-k", type=int, default=5, help="alternatives shown per token")
    p.add_argument("--layer", type=int, default=None,
                   help="heatmap of this layer only, and the page opens on it (default: all)")
    p.add_argument("--head", type=int, default=None, help="head the page opens on (default: 0)")
    _add_load_flags(p, "checkpoint", "device")  # float32 always: the surprise is exact
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("serve", formatter_class=_Help, help="serve a trained run over an OpenAI-compatible HTTP API")
    p.add_argument("run_dir")
    _add_load_flags(p, "checkpoint", "device", "dtype")
    _add_fields(p, ServeConfig, ServeConfig())
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
    _add_load_flags(b, "checkpoint")
    b.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for time to first token")
    b.add_argument("--new-tokens", type=int, default=50)
    b.add_argument("--batch-sizes", default="1,8,32", help="streams per batch, comma-separated")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=0, help="CPU threads (0 = auto)")
    _add_load_flags(b, "device")
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

    p = sub.add_parser("export", formatter_class=_Help,
                       help="write a run in another tool's format: a Hugging Face transformers model "
                            "directory (--to hf), a GGUF file for llama.cpp (--to gguf), a PEFT "
                            "adapter (--to peft), or a LoRA run as a full run (--merge)")
    p.add_argument("run_dir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=tuple(EXPORTERS),
                      help="hf: a directory AutoModelForCausalLM / AutoTokenizer load, no custom "
                           "code; gguf: FILE.gguf for llama.cpp, Ollama, LM Studio (float32 "
                           "unless --outtype); peft: a LoRA run's adapters for peft.PeftModel.from_pretrained "
                           "on its base's hf export (LoRA runs are merged for hf and gguf)")
    what.add_argument("--merge", action="store_true",
                      help="a LoRA run with its adapters folded in, as a full run directory")
    p.add_argument("--out", required=True, help="the directory (hf, peft, --merge) or file (gguf) "
                                                "to write")
    # checked by export_gguf, not argparse: an unknown name is then one line, as from the API
    p.add_argument("--outtype", default=None, metavar="TYPE",
                   help="gguf only: how matrices are stored, f32 (exact) | f16 | bf16 | q8_0 "
                        "(llama.cpp's converter's names; norms stay f32)")
    _add_load_flags(p, "checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", formatter_class=_Help,
                       help="loss, perplexity and bits per byte of a run on a text, every token once")
    p.add_argument("run_dir", help="the trained run to score")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--data", metavar="FILE", help="a text file, tokenized with the run's tokenizer "
                                     "(default: the run's own --split)")
    what.add_argument("--split", choices=("val", "train"), default="val",
                      help="a split of the run's prepared data")
    _add_load_flags(p, "checkpoint")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="tokens the window moves: each token is scored with at least context - "
                        "stride + 1 tokens before it; context = non-overlapping windows, 1 = the "
                        "longest context everywhere [default: half the context]")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="windows per forward pass")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="more runs scored on the same text, shown as a table")
    p.add_argument("--json", action="store_true", help="one JSON object (a list with --compare)")
    # float32 unless asked: scores of runs compared on different machines stay comparable
    _add_load_flags(p, "device", "dtype", dtype="float32")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", formatter_class=_Help,
                       help="plot loss, learning rate and tokens/s of one or more runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="loss.png")
    p.add_argument("--metric", choices=("loss", "bpb"), default="loss",
                   help="loss per token, or bits per byte (compares runs with different tokenizers)")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write an HTML report: the curves and the sample at each evaluation")
    p.add_argument("--watch", action="store_true",
                   help="redraw whenever the runs log, until Ctrl-C")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between checks with --watch")
    p.set_defaults(func=cmd_plot)
    return parser


def _config_overrides(args: argparse.Namespace, classes: tuple = (ModelConfig, TrainConfig)) -> dict:
    """The config flags the user gave (None = not given)."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_prepare(args: argparse.Namespace) -> int:
    from .chat_template import load_template
    from .data.prepare import prepare

    if args.chat_template and not args.chat:
        raise ConfigError("--chat-template renders conversations for --chat; give --chat")
    chat = load_template(path=args.chat_template) if args.chat else None  # no file: the default
    meta = prepare(args.inputs, args.out, docs=args.docs, val_fraction=args.val_fraction,
                   seed=args.seed, tokenizer=args.tokenizer, vocab_size=args.tokenizer_vocab_size,
                   text_field=args.text_field, skip_bad_records=args.skip_bad_records,
                   chat=chat)
    if meta["skipped_records"]:
        print(f"skipped {meta['skipped_records']:,} bad record(s); the first: "
              f"{meta['first_bad_record']}", file=sys.stderr)
    print(f"prepared {args.out}: {meta['tokenizer']} vocab {meta['vocab_size']}, train "
          f"{meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['dtype']}), "
          f"{meta['train_bytes'] / meta['train_tokens']:.2f} bytes per token")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data.catalogue import format_catalogue
    from .data.download import download

    if args.list:
        print(format_catalogue())
        return 0
    if not args.source:
        raise ConfigError("give a dataset name, URL or hf:OWNER/NAME (see minigpt download --list)")
    got = download(args.source, args.out, sha256=args.sha256, timeout=args.timeout,
                   progress=not args.quiet, mirror=args.mirror)
    if got.existed:
        print(f"{got.path} is already there; nothing downloaded (delete it to download again)")
    elif got.sha256 is None:
        print(f"downloaded {got.path}")
    else:
        check = "verified" if got.verified else f"not pinned: pass --sha256 {got.sha256} to check it"
        resumed = f", resumed at byte {got.resumed_from:,}" if got.resumed_from else ""
        print(f"downloaded {got.path}{resumed}; sha256 {got.sha256} ({check})")
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from .cpu import configure_cpu
    from .engine import load
    from .inspection import LN2
    from .tools.inspect_report import check_choice, write_report

    configure_cpu()
    engine = load(args.run_dir, checkpoint=args.checkpoint, device=args.device, dtype="float32")
    result = engine.inspect(args.text, top_k=args.top_k)  # bad text: one line, nothing written
    check_choice(result, args.layer, args.head)
    paths = write_report(result, args.out, args.layer, args.head)
    worst = sorted(((s.surprise, s.text) for s in result.segments if s.surprise == s.surprise),
                   reverse=True)[:5]
    print(f"{len(result.tokens)} tokens, mean surprise {result.mean_surprise:.2f} bits/token "
          f"({result.mean_surprise * LN2:.4f} nats, the loss on this text)")
    print("most surprising: " + ", ".join(f"{t!r} {b:.1f} bits" for b, t in worst))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import rundir
    from .serve.engine_process import EngineProcess

    given = _config_overrides(args, (ServeConfig,))
    if "api_key" not in given and os.environ.get("MINIGPT_API_KEY"):
        given["api_key"] = os.environ["MINIGPT_API_KEY"]
    config = ServeConfig(**given).validate()
    rundir.read_config(Path(args.run_dir))  # not a run: one line, and no engine started for it
    # started before this process imports torch and the server: both load at once
    engine = EngineProcess.for_serving(args.run_dir, config, checkpoint=args.checkpoint,
                                       device=args.device, dtype=args.dtype)
    try:
        from .serve.app import serve
    except ImportError as e:
        if engine is not None:
            engine.close()
        raise ConfigError(f"serving needs the 'serve' extra ({e.name} is missing): "
                          "pip install 'minigpt[serve]'") from None
    serve(args.run_dir, config, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
          engine_process=engine)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .tools.bench import bench_train, format_train

    if args.iters < 1 or args.warmup < 0:
        raise ConfigError("--iters must be >= 1 and --warmup >= 0")
    if args.init_from or args.init_checkpoint:  # the flags come with TrainConfig's; bench ignores weights
        raise ConfigError("bench train times a freshly initialised model; --init-from is for "
                          "minigpt train")
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


def _export_hf(args: argparse.Namespace) -> str:
    from .interop.hf import export_hf

    if args.outtype is not None:
        raise ConfigError("--outtype applies to --to gguf only; --to hf writes float32")
    s = export_hf(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    return (f"exported {s['run_dir']} step {s['step']} as a {s['architecture']} "
            f"({s['params']:,} parameters, {s['tokenizer']} tokenizer) to {s['out']}; load it with "
            f"AutoModelForCausalLM.from_pretrained({s['out']!r})")


def _export_gguf(args: argparse.Namespace) -> str:
    from .interop.gguf import export_gguf

    s = export_gguf(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite,
                    outtype=args.outtype or "f32")
    kept = (f"; kept at f16 (rows not a multiple of 32): {', '.join(s['kept_f16'])}"
            if s["kept_f16"] else "")
    return (f"wrote {s['path']}: gguf ({s['architecture']}, {s['outtype']}), step {s['step']}, "
            f"{s['tokenizer']} tokenizer, {s['bytes']:,} bytes; llama.cpp, Ollama and LM Studio "
            f"load it{kept}")


def _export_peft(args: argparse.Namespace) -> str:
    from .interop.peft import export_peft

    s = export_peft(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    return (f"wrote {s['out']}: {s['tensors']} PEFT LoRA tensors ({s['params']:,} parameters) of "
            f"{s['run_dir']} step {s['step']} for a {s['architecture']}; load them onto the hf "
            f"export of {s['base']} with peft.PeftModel.from_pretrained(model, {s['out']!r})")


def _export_merged(args: argparse.Namespace) -> str:
    from .interop.merge import export_merged

    s = export_merged(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    return (f"wrote {s['out']}: {s['run_dir']} step {s['step']} with its adapters folded into its "
            f"base, a full run of {s['params']:,} parameters")


# --to FORMAT -> the function that writes it and returns the line to print
EXPORTERS = {"hf": _export_hf, "gguf": _export_gguf, "peft": _export_peft}


def cmd_export(args: argparse.Namespace) -> int:
    print(_export_merged(args) if args.merge else EXPORTERS[args.to](args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cpu import configure_cpu
    from .tools.evaluate import evaluate, format_result, format_table

    configure_cpu()
    results = evaluate([args.run_dir, *(args.compare or [])], data=args.data, split=args.split,
                       checkpoint=args.checkpoint, stride=args.stride, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype)
    if args.json:
        rows = [r.to_dict() for r in results]
        print(json.dumps(rows if args.compare else rows[0]))
    else:
        print(format_table(results) if args.compare else format_result(results[0]))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .tools.plot import Watch, watch

    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0 seconds, got {args.interval}")
    w = Watch(args.run_dirs, args.out, args.metric, args.html)
    if args.watch:
        watch(w, args.interval)
        return 0
    w.refresh()  # errors (no run, nothing logged) are one line, before any file is written
    print(f"wrote {args.out}" + (f" and {args.html}" if args.html else ""))
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
