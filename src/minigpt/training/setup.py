"""Setting a run up: claim the run directory, prepare or reuse the data, write config, tokenizer
and chat template (conversations are rendered with it, and `serve` renders prompts with it); and
the resume policy: the run's own config plus explicit training overrides, refusing a
different model, tokenizer or data.

A new run that fails while setting up leaves `--out` as it was; a run killed before its first
checkpoint restarts from step 0 on `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .. import rundir
from ..chat_template import DEFAULT, ChatTemplate, load_template
from ..config import (
    ModelConfig,
    TrainConfig,
    given_settings,
    model_config_from_dict,
    preset_named,
)
from ..data.corpus import bundled_corpus
from ..data.dataset import PreparedData, check_split_length, is_prepared, load_prepared
from ..data.prepare import prepare
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..tokenization import Tokenizer

# Settings that shape the prepared data; changing them on resume would change what is being learnt.
DATA_SHAPING = ("data", "docs", "val_fraction", "tokenizer", "tokenizer_vocab_size", "init_from",
                "init_checkpoint", "text_field", "skip_bad_records", "chat", "chat_template")


def set_up_run(mcfg: ModelConfig, tcfg: TrainConfig, run_dir: Path, resume: bool,
                from_checkpoint: bool, overwrite: bool, progress: bool = True,
                tokenizer: Tokenizer | None = None) -> tuple[Path, TrainConfig]:
    """Claim the run directory, prepare the data, write config, tokenizer and chat template;
    -> (the data dir, the config as recorded: with what prepared data brings).

    `tokenizer`: the one the data must be encoded with (an --init-from model's) instead of one
    learnt from the text. A new run that fails here leaves --out as it was (rundir.new_run_dir); a
    resumed run rewrites its config only once its checkpoint has loaded (Trainer.run).
    """
    if resume and not from_checkpoint:
        print(f"warning: {run_dir} has no checkpoint yet; starting it from step 0", file=sys.stderr)
    with nullcontext() if resume else rundir.new_run_dir(run_dir, overwrite, mcfg, tcfg):
        data = _data_for_run(tcfg, run_dir, from_checkpoint, progress, tokenizer)
        tcfg = _record_data_tokenizer(tcfg, data)
        tcfg = _record_data_chat(tcfg, data)
        mcfg = dataclasses.replace(mcfg, vocab_size=data.tokenizer.vocab_size)
        for split in ("train", "val"):
            check_split_length(split, len(getattr(data, split)), mcfg.block_size)
        if not from_checkpoint:
            rundir.write_config(run_dir, mcfg, tcfg)
            rundir.write_tokenizer(run_dir, data.tokenizer)
            template = data.meta.get("chat_template") or _source_template(tcfg)
            if template is not None:  # what the model learnt to chat in is what `serve` renders
                rundir.write_chat_template(run_dir, template)
    return data.path, tcfg


def chat_template_for(tcfg: TrainConfig) -> ChatTemplate:
    """The template conversations are rendered with: --chat-template FILE, else the --init-from
    run's (the model already speaks it), else the default."""
    if tcfg.chat_template is not None:
        return load_template(path=tcfg.chat_template)
    source = _source_template(tcfg)
    return DEFAULT if source is None else ChatTemplate.from_dict(source, str(tcfg.init_from))


def _source_template(tcfg: TrainConfig) -> dict[str, Any] | None:
    """The chat template an --init-from minigpt run stores, if any (a Hugging Face directory's
    chat_template.json is another format, and not read)."""
    if tcfg.init_from is None or not rundir.checkpoints_dir(Path(tcfg.init_from)).is_dir():
        return None
    return rundir.read_chat_template(Path(tcfg.init_from))


def _record_data_chat(tcfg: TrainConfig, data: PreparedData) -> TrainConfig:
    """Prepared conversations make a chat run (its config says so); --chat on data prepared
    without it, or another template than the data's, is an error."""
    stored = data.meta.get("chat_template")
    if tcfg.chat and stored is None:
        raise ConfigError(f"{data.path} was prepared without --chat; give the conversations' "
                          ".jsonl as --data, or prepare it again with --chat")
    if stored is not None and tcfg.chat_template is not None:
        if chat_template_for(tcfg).to_dict() != stored:
            raise ConfigError(f"{data.path} was prepared with another chat template than "
                              f"{tcfg.chat_template}; drop --chat-template or prepare it again")
    return dataclasses.replace(tcfg, chat=stored is not None)


def resume_config(preset, config_file, overrides) -> tuple[ModelConfig, TrainConfig]:
    """The run's own config, plus explicit train overrides; model changes are refused."""
    given = given_settings(preset, config_file, overrides)
    out = given.train.get("out")
    if not out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    mcfg, tcfg = rundir.read_config(Path(out))
    model_over = ({**preset_named(given.preset).model, **given.model} if given.preset
                  else given.model)
    train_over = given.train
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
    if key in ("data", "init_from") and stored is not None and given is not None:
        return Path(stored).resolve() == Path(given).resolve()  # ./a.txt and /abs/a.txt are the same
    return stored == given


def _data_for_run(tcfg: TrainConfig, run_dir: Path, resume: bool, progress: bool = True,
                  tokenizer: Tokenizer | None = None) -> PreparedData:
    """Use prepared data as is; prepare raw text (or the bundled corpus) into RUN/data, with
    `tokenizer` when one is given."""
    if tcfg.data and is_prepared(tcfg.data):
        data = load_prepared(tcfg.data)
        if tokenizer is not None and data.tokenizer.to_dict() != tokenizer.to_dict():
            raise TokenizerError(
                f"{tcfg.data} was prepared with another vocabulary ({data.tokenizer.kind}, "
                f"{data.tokenizer.vocab_size} tokens) than the --init-from model's "
                f"({tokenizer.kind}, {tokenizer.vocab_size} tokens); give the raw text as --data")
    else:
        target = run_dir / "data"
        if not (resume and is_prepared(target) and _same_sources(target, tcfg.data)):
            staging = run_dir / "data.new"
            shutil.rmtree(staging, ignore_errors=True)
            meta = prepare([tcfg.data or bundled_corpus()], staging, docs=tcfg.docs,
                           val_fraction=tcfg.val_fraction, seed=tcfg.seed,
                           tokenizer=tokenizer or tcfg.tokenizer,
                           vocab_size=None if tokenizer else tcfg.tokenizer_vocab_size,
                           progress=progress,
                           text_field=tcfg.text_field, skip_bad_records=tcfg.skip_bad_records,
                           chat=chat_template_for(tcfg) if tcfg.chat else None)
            if meta["skipped_records"]:
                print(f"warning: skipped {meta['skipped_records']:,} bad record(s); the first: "
                      f"{meta['first_bad_record']}", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        data = load_prepared(target)
    if resume:
        ours, theirs = data.tokenizer, rundir.read_tokenizer(run_dir)
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
