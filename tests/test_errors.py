"""The bad-input matrix: every user mistake of issues 2 and 7, through the real CLI.

Each row of CASES runs `minigpt ...` as a separate process (see cli_harness.py) in a workspace of
prepared inputs and asserts what a user sees: exactly one line on stderr, `minigpt: error: <the
message>`, no traceback, the row's non-zero exit code, and not one file in the workspace created,
changed or deleted. The same table is the one in docs/errors.md; `test_docs_table_matches_the_matrix`
keeps the two equal (on failure it prints the table to paste).

In messages, `…` stands for text that depends on the torch version (the refusal reason of a pickle)
or on the machine (the absolute path a LoRA run records of its base).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cli_harness
from minigpt import checkpoint as ckpt
from minigpt import config, fsio, rundir
from minigpt.data.corpus import bundled_corpus
from minigpt.model import GPT
from test_crash_safety import Payload  # a real payload: unpickling it runs `touch`

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
TINY = "--n-layer 2 --n-head 2 --n-embd 32 --block-size 16 --batch-size 4 --eval-iters 2 --sample-tokens 0 --quiet"
LONG_PROMPT = bundled_corpus().read_text(encoding="utf-8")[:200]  # 200 characters, context is 16


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the user gave, in words
    command: str  # arguments after `minigpt`, run in the workspace
    message: str  # the whole stderr line; "" = not an error: exit 0 and an empty stderr
    exit_code: int = 1
    note: str = ""  # for rows that are not errors: what happens instead


CASES = [
    # --- input text ---------------------------------------------------------------------------------
    Case("empty-file", "an empty file", "prepare empty.txt --out data",
         "minigpt: error: empty.txt is empty"),
    Case("whitespace-only", "a file of spaces, tabs and newlines only", "prepare blank.txt --out data",
         "minigpt: error: blank.txt contains only whitespace"),
    Case("binary-file", "a binary file", "prepare image.png --out data",
         "minigpt: error: image.png looks like a binary file (it contains NUL bytes), not text"),
    Case("invalid-utf8", "a Latin-1 file (invalid UTF-8)", "prepare latin1.txt --out data",
         "minigpt: error: latin1.txt is not valid UTF-8 (bad byte at offset 3)"),
    Case("one-character", "a one-character corpus", "prepare one.txt --out data",
         "minigpt: error: corpus of 1 characters is too short to split"),
    Case("shorter-than-context", "a corpus shorter than the context (40 characters, context 64)",
         "train --data short.txt --out new-run --quiet",
         "minigpt: error: the train split has 36 tokens, fewer than block-size + 1 (65); "
         "use a smaller --block-size or more text"),
    Case("long-line-as-documents", "a single 50 MB line, one document per line",
         "prepare long-line.txt --docs lines --out data",
         "minigpt: error: found 1 document(s) with --docs lines; need at least 2"),
    Case("missing-input", "a nonexistent input file", "prepare missing.txt --out data",
         "minigpt: error: input not found: missing.txt"),
    Case("missing-train-data", "a nonexistent --data file", "train --data missing.txt --out new-run",
         "minigpt: error: input not found: missing.txt"),
    # --- model and training settings -----------------------------------------------------------------
    Case("embd-not-divisible", "n_embd not divisible by n_head",
         "train --data corpus.txt --out new-run --n-embd 30 --n-head 4",
         "minigpt: error: n_embd (30) must be divisible by n_head (4)"),
    Case("block-larger-than-data", "a block size larger than the data",
         "train --data corpus.txt --out new-run --block-size 4096 --quiet",
         "minigpt: error: the train split has 2700 tokens, fewer than block-size + 1 (4097); "
         "use a smaller --block-size or more text"),
    Case("unknown-preset", "an unknown preset", "train --preset huge --out new-run",
         "minigpt: error: unknown preset 'huge'; choose from tiny, small, medium, large"),
    Case("out-not-a-run", "--out: a directory of other files", "train --data corpus.txt --out notes",
         "minigpt: error: notes exists and is not a minigpt run directory; choose another --out"),
    Case("out-is-a-run", "--out: an existing run, without --resume", "train --data corpus.txt --out run",
         "minigpt: error: run already holds a run; pass --resume to continue it or --overwrite to "
         "start over"),
    Case("out-unwritable", "--out: a path that cannot be created", "train --data corpus.txt --out corpus.txt/run",
         "minigpt: error: Not a directory: corpus.txt/run"),
    # --- sampling -----------------------------------------------------------------------------------
    Case("prompt-unknown-chars", "a prompt with characters the tokenizer has never seen",
         "sample run --prompt 'Ünïcode €'",
         "minigpt: error: text contains 3 character(s) the tokenizer has never seen: 'Ü', 'ï', '€'"),
    Case("prompt-longer-than-context", "a prompt longer than the context (200 characters, context 16)",
         "sample run --prompt LONG_PROMPT --max-new-tokens 20 --seed 1", "", 0,
         note="not an error: generation conditions on the prompt's last 16 tokens"),
    Case("max-new-tokens-zero", "max_new_tokens <= 0", "sample run --max-new-tokens 0",
         "minigpt: error: max-new-tokens must be >= 1, got 0"),
    Case("negative-temperature", "temperature < 0", "sample run --temperature -0.5",
         "minigpt: error: temperature must be >= 0, got -0.5"),
    Case("top-p-zero", "top-p = 0 (outside (0, 1])", "sample run --top-p 0",
         "minigpt: error: top-p must be in (0, 1], got 0.0"),
    Case("top-p-above-one", "top-p > 1", "sample run --top-p 1.5",
         "minigpt: error: top-p must be in (0, 1], got 1.5"),
    Case("min-p-above-one", "min-p > 1", "sample run --min-p 1.5",
         "minigpt: error: min-p must be in [0, 1] (0 = off), got 1.5"),
    Case("negative-top-k", "top-k < 0", "sample run --top-k -1",
         "minigpt: error: top-k must be >= 0 (0 = off), got -1"),
    # --- inspect ------------------------------------------------------------------------------------
    Case("inspect-empty-text", "inspect: an empty --text", "inspect run --text ''",
         "minigpt: error: nothing to inspect: the text is empty"),
    Case("inspect-unknown-chars", "inspect: text with characters outside the vocabulary",
         "inspect run --text 'Ünïcode €'",
         "minigpt: error: text contains 3 character(s) the tokenizer has never seen: 'Ü', 'ï', '€'"),
    Case("inspect-longer-than-context", "inspect: a text longer than the context (200 characters, "
         "context 16)", "inspect run --text LONG_PROMPT",
         "minigpt: error: the text is 200 tokens; this model reads at most 16 (its block size): "
         "inspect a shorter text"),
    Case("inspect-bad-layer", "inspect: a --layer the model does not have",
         "inspect run --text First --layer 2",
         "minigpt: error: --layer must be between 0 and 1 (the model has 2 layers), got 2"),
    Case("inspect-bad-head", "inspect: a negative --head", "inspect run --text First --head -1",
         "minigpt: error: --head must be between 0 and 1 (the model has 2 heads), got -1"),
    Case("inspect-top-k-zero", "inspect: --top-k 0", "inspect run --text First --top-k 0",
         "minigpt: error: top-k must be >= 1, got 0"),
    Case("plot-watch-interval-zero", "plot --watch with a poll interval of 0",
         "plot run --watch --interval 0",
         "minigpt: error: --interval must be > 0 seconds, got 0.0"),
    # --- serving ------------------------------------------------------------------------------------
    Case("prompt-cache-negative", "serve --prompt-cache below 0", "serve run --prompt-cache -1",
         "minigpt: error: --prompt-cache must be >= 0, got -1"),
    Case("serve-threads-negative", "serve --threads below 0", "serve run --threads -1",
         "minigpt: error: --threads must be >= 0, got -1"),
    Case("chat-template-missing", "serve --chat-template: a file that does not exist",
         "serve run --chat-template missing.json",
         "minigpt: error: cannot read chat template missing.json: No such file or directory"),
    Case("chat-template-not-json", "serve --chat-template: a file that is not JSON",
         "serve run --chat-template notes/todo.txt",
         "minigpt: error: chat template notes/todo.txt is not valid JSON: Expecting value: line 1 "
         "column 1 (char 0)"),
    Case("chat-template-no-content", "serve --chat-template: a role line without {content}",
         "serve run --chat-template bad-template.json",
         "minigpt: error: bad-template.json: chat template 'user' must contain {content}"),
    Case("chat-template-unknown-key", "serve --chat-template: a key templates do not have",
         "serve run --chat-template typo-template.json",
         "minigpt: error: typo-template.json: unknown chat template key(s): usr"),
    Case("run-chat-template-broken", "a run whose chat_template.json is not valid JSON",
         "serve bad-chat",
         "minigpt: error: bad-chat/chat_template.json is not valid JSON: Expecting property name "
         "enclosed in double quotes: line 1 column 2 (char 1)"),
    # --- run directories and checkpoints ------------------------------------------------------------
    Case("missing-run", "a nonexistent run directory", "sample nowhere",
         "minigpt: error: run directory not found: nowhere"),
    Case("not-a-run", "a directory that is not a run", "sample notes",
         "minigpt: error: notes is not a minigpt run directory (no config.json)"),
    Case("resume-nothing", "--resume of a run that does not exist", "train --out nowhere --resume",
         "minigpt: error: run directory not found: nowhere"),
    Case("missing-step", "a checkpoint step that does not exist", "sample run --checkpoint 999",
         "minigpt: error: run has no checkpoint at step 999"),
    Case("checkpoint-missing-file", "a checkpoint directory missing its weights file",
         "sample no-weights",
         "minigpt: error: checkpoint no-weights/checkpoints/step-0000010 is incomplete: "
         "model.safetensors is missing"),
    Case("resume-missing-file", "--resume when the only checkpoint lacks its trainer state",
         "train --out no-trainer --resume",
         "minigpt: error: every checkpoint in no-trainer is damaged: checkpoint "
         "no-trainer/checkpoints/step-0000010 is incomplete: trainer.pt is missing"),
    Case("corrupted-weights", "a corrupted model.safetensors", "sample bad-weights",
         "minigpt: error: checkpoint bad-weights/checkpoints/step-0000010 is corrupted: "
         "model.safetensors fails its checksum"),
    Case("corrupted-trainer", "a corrupted trainer.pt, --resume", "train --out bad-trainer --resume",
         "minigpt: error: every checkpoint in bad-trainer is damaged: checkpoint "
         "bad-trainer/checkpoints/step-0000010 is corrupted: trainer.pt fails its checksum"),
    Case("malicious-pickle", "a trainer.pt pickle that would run a command (checksum updated to match)",
         "train --out evil --resume",
         "minigpt: error: refusing to load evil/checkpoints/step-0000010/trainer.pt: it is not plain "
         "tensor data and loading it could run code (…); use checkpoints only from sources you trust"),
    Case("newer-format", "a checkpoint written by a newer minigpt (format 2 in its meta.json)",
         "sample newer",
         "minigpt: error: newer/checkpoints/step-0000010 was written in format 2, newer than this "
         "minigpt reads (1); upgrade minigpt to use it"),
    Case("other-vocabulary", "a checkpoint from a model with a different vocabulary",
         "sample other-vocab",
         "minigpt: error: weights in other-vocab/checkpoints/step-0000010/model.safetensors do not "
         "match this run's model (a different vocabulary?): wte.weight is [70, 32] in the checkpoint, "
         "[54, 32] in the model"),
    Case("resume-other-vocabulary", "--resume after its prepared data was re-made with another vocabulary",
         "train --out prep-run --resume",
         "minigpt: error: cannot resume prep-run: the data's vocabulary (char, 30 tokens) differs "
         "from the run's (char, 54 tokens); train a new run for this data"),
    Case("resume-other-data", "--resume with a different --data", "train --out run --resume --data short.txt",
         "minigpt: error: cannot resume run with different data: corpus.txt -> short.txt"),
    Case("resume-other-model", "--resume with a different model size", "train --out run --resume --n-embd 64",
         "minigpt: error: cannot resume run with a different model: n_embd 32 -> 64"),
    # --- eval and tracking --------------------------------------------------------------------------
    Case("eval-missing-data", "eval: a nonexistent --data file", "eval run --data missing.txt",
         "minigpt: error: input not found: missing.txt"),
    Case("eval-data-directory", "eval: --data is a directory", "eval run --data notes",
         "minigpt: error: --data must be a text file, got a directory: notes"),
    Case("eval-unknown-chars", "eval: a text with characters the run's tokenizer has never seen",
         "eval run --data greek.txt",
         "minigpt: error: greek.txt contains 3 character(s) the tokenizer of run has never seen: "
         "'α', 'β', 'γ'"),
    Case("eval-binary-data", "eval: a binary --data file", "eval run --data image.png",
         "minigpt: error: image.png looks like a binary file (it contains NUL bytes), not text"),
    Case("eval-stride-zero", "eval: --stride 0", "eval run --stride 0",
         "minigpt: error: --stride must be between 1 and the context of run (16), got 0"),
    Case("eval-stride-too-long", "eval: a stride longer than the context", "eval run --stride 17",
         "minigpt: error: --stride must be between 1 and the context of run (16), got 17"),
    Case("eval-compare-missing", "eval: a --compare run that does not exist",
         "eval run --compare nowhere", "minigpt: error: run directory not found: nowhere"),
    Case("eval-compare-not-a-run", "eval: a --compare directory that is not a run",
         "eval run --compare notes",
         "minigpt: error: notes is not a minigpt run directory (no config.json)"),
    Case("log-unknown-backend", "an unknown --log backend", "train --data corpus.txt --out new-run "
         "--log csv,tensorbored", "minigpt: error: --log must be one of jsonl, tensorboard, wandb, "
         "csv; got 'tensorbored'"),
    # --- train --init-from (docs/finetune.md) -------------------------------------------------------
    Case("init-from-missing", "--init-from: a path that does not exist",
         "train --data corpus.txt --out new-run --init-from ./nowhere",
         "minigpt: error: --init-from ./nowhere: no such directory"),
    Case("init-from-other-architecture", "--init-from: a Hugging Face directory of another architecture",
         "train --data corpus.txt --out new-run --init-from mamba-model",
         "minigpt: error: mamba-model holds a 'mamba' model; --init-from reads GPT-2, GPT-NeoX, "
         "Llama, Persimmon, Qwen3 and StableLM directories (config.json model_type gpt2, gpt_neox, "
         "llama, persimmon, qwen3, stablelm) or minigpt runs"),
    Case("init-from-grouped-kv", "--init-from: a Qwen3 directory with grouped KV heads, which "
         "minigpt does not build", "train --data corpus.txt --out new-run --init-from qwen3-gqa",
         "minigpt: error: qwen3-gqa: num_key_value_heads 1 (minigpt builds 2 for this layout); "
         "--init-from reads only what minigpt computes exactly"),
    Case("init-from-untied", "--init-from: a GPT-2 with an untied LM head",
         "train --data corpus.txt --out new-run --init-from gpt2-untied",
         "minigpt: error: gpt2-untied: GPT-2 with tie_word_embeddings=False is not supported "
         "(minigpt computes tie_word_embeddings=True only)"),
    Case("init-from-pickle", "--init-from: a GPT-2 directory with only a pickled pytorch_model.bin "
         "(one that would run a command)",
         "train --data corpus.txt --out new-run --init-from gpt2-pickle",
         "minigpt: error: gpt2-pickle has only a pickled pytorch_model.bin, which minigpt never loads "
         "(unpickling can run code); convert it to safetensors where you trust it: python -c \"from "
         "transformers import AutoModelForCausalLM as M; M.from_pretrained('gpt2-pickle')"
         ".save_pretrained('gpt2-pickle', safe_serialization=True)\""),
    Case("init-from-no-tokenizer", "--init-from: a GPT-2 directory without tokenizer files",
         "train --data corpus.txt --out new-run --init-from gpt2-no-tokenizer",
         "minigpt: error: gpt2-no-tokenizer has no tokenizer: need tokenizer.json, or vocab.json and "
         "merges.txt"),
    Case("init-from-unencodable", "--init-from a char-level run, --data with characters it never saw",
         "train --data unicode.txt --out new-run --init-from run --quiet",
         "minigpt: error: the text contains 3 character(s) the source model's char tokenizer cannot "
         "encode: 'Ü', 'ï', '€'"),
    Case("init-from-other-vocabulary", "--init-from a run, --data prepared with another vocabulary",
         "train --data prepared --out new-run --init-from run --quiet",
         "minigpt: error: prepared was prepared with another vocabulary (char, 30 tokens) than the "
         "--init-from model's (char, 54 tokens); give the raw text as --data"),
    Case("init-from-other-model", "--init-from a run, with a model flag that contradicts it",
         "train --data corpus.txt --out new-run --init-from run --n-embd 64",
         "minigpt: error: --n-embd 64 contradicts the --init-from model (n_embd 32); the model comes "
         "from its source: drop --n-embd"),
    Case("init-from-preset", "--init-from with --preset",
         "train --data corpus.txt --out new-run --init-from run --preset tiny",
         "minigpt: error: --init-from takes the model from its source; a preset picks a model size: "
         "drop --preset"),
    # --- LoRA (docs/finetune.md) --------------------------------------------------------------------
    Case("lora-without-init-from", "--lora-rank without --init-from",
         "train --data corpus.txt --out new-run --lora-rank 4",
         "minigpt: error: --lora-rank trains adapters on an existing model: give --init-from RUN"),
    Case("lora-bad-target", "--lora-targets naming a projection that is not one",
         "train --data corpus.txt --out new-run --init-from run --lora-rank 4 --lora-targets "
         "attn.c_attn,lm_head",
         "minigpt: error: --lora-targets must be one of attn.c_attn, attn.c_proj, mlp.c_fc, "
         "mlp.c_proj; got 'lm_head'"),
    Case("lora-negative-rank", "a negative --lora-rank",
         "train --data corpus.txt --out new-run --init-from run --lora-rank -1",
         "minigpt: error: lora-rank must be >= 0 (0 = off), got -1"),
    Case("lora-alpha-without-rank", "--lora-alpha without --lora-rank",
         "train --data corpus.txt --out new-run --init-from run --lora-alpha 8",
         "minigpt: error: --lora-alpha and --lora-targets shape LoRA adapters: give --lora-rank R"),
    Case("lora-on-a-lora-run", "--lora-rank on a LoRA run as the base",
         "train --data corpus.txt --out new-run --init-from lora-run --lora-rank 4",
         "minigpt: error: --lora-rank trains adapters on a base that every load of the run reads "
         "again, and --init-from … is a LoRA run: export it as a full run first (minigpt export SRC "
         "--merge --out DIR), or train it without --lora-rank"),
    Case("lora-base-missing", "a LoRA run whose base run's checkpoint was deleted",
         "sample lora-lost-base",
         "minigpt: error: lora-lost-base holds LoRA adapters for the base run …/base-gone at step "
         "10, which is not there any more; put that checkpoint back, or train the adapters again"),
    Case("lora-base-changed", "a LoRA run whose base run's weights changed since",
         "sample lora-changed-base",
         "minigpt: error: lora-changed-base holds LoRA adapters for the weights of …/base-changed at "
         "step 10, and those weights changed since (SHA-256 differs); train the adapters again on "
         "the new base"),
    Case("export-peft-not-lora", "--to peft of a run without LoRA adapters",
         "export run-gpt2 --to peft --out adapter",
         "minigpt: error: cannot export run-gpt2 to peft: it has no LoRA adapters (train one with "
         "--lora-rank R); export the whole model with --to hf"),
    Case("export-merge-not-lora", "--merge of a run without LoRA adapters",
         "export run --merge --out merged",
         "minigpt: error: --merge folds LoRA adapters into their base, and run has none: it is a "
         "full run already"),
    # --- input formats (issue 14) -------------------------------------------------------------------
    Case("jsonl-malformed-line", "a JSON-lines file with a malformed line 3", "prepare bad.jsonl --out data",
         "minigpt: error: bad.jsonl line 3: not valid JSON (Expecting ',' delimiter at column 14) "
         "(pass --skip-bad-records to skip such records)"),
    Case("jsonl-missing-field", "a JSON-lines record without the text field",
         "prepare body.jsonl --out data",
         "minigpt: error: body.jsonl line 1: no field 'text' (fields: body); choose one with "
         "--text-field (pass --skip-bad-records to skip such records)"),
    Case("train-jsonl-missing-field", "train --data on JSON lines, another --text-field than the file has",
         "train --data body.jsonl --text-field content --out new-run",
         "minigpt: error: body.jsonl line 1: no field 'content' (fields: body); choose one with "
         "--text-field (pass --skip-bad-records to skip such records)"),
    Case("json-array", "a .json file holding one JSON array", "prepare array.json --out data",
         "minigpt: error: array.json is a JSON array, not JSON lines (one object per line); convert "
         "it with: jq -c '.[]'"),
    Case("parquet-missing-column", "a Parquet file without the text column",
         "prepare body.parquet --out data",
         "minigpt: error: body.parquet has no column 'text' (columns: body); choose one with --text-field"),
    Case("parquet-not-parquet", "a .parquet file that is not Parquet", "prepare fake.parquet --out data",
         "minigpt: error: fake.parquet is not a valid Parquet file (…)"),
    Case("truncated-gzip", "a truncated .gz file", "prepare cut.txt.gz --out data",
         "minigpt: error: cut.txt.gz is not a valid gzip file or is truncated (Compressed file ended "
         "before the end-of-stream marker was reached)"),
    # --- conversations and early stopping (issue 22) -------------------------------------------------
    Case("chat-no-assistant", "--chat: a conversation without an assistant message",
         "prepare noreply.jsonl --chat --out data",
         "minigpt: error: noreply.jsonl line 2: no assistant message to learn from (pass "
         "--skip-bad-records to skip such records)"),
    Case("chat-unknown-role", "--chat: a message with an unknown role",
         "train --data roles.jsonl --chat --out new-run",
         "minigpt: error: roles.jsonl line 1: messages[1].role must be one of system, developer, "
         "user, assistant; got 'bot' (pass --skip-bad-records to skip such records)"),
    Case("chat-messages-not-a-list", "--chat: `messages` that is not a list",
         "prepare notlist.jsonl --chat --out data",
         "minigpt: error: notlist.jsonl line 1: messages must be a non-empty array, got an object "
         "(pass --skip-bad-records to skip such records)"),
    Case("chat-content-not-text", "--chat: a message whose content is not a string",
         "prepare number.jsonl --chat --out data",
         "minigpt: error: number.jsonl line 1: messages[0].content must be a string or a non-empty "
         "list of text parts, got the number 7 (pass --skip-bad-records to skip such records)"),
    Case("chat-without-flag", "conversations prepared without --chat",
         "prepare chats.jsonl --out data",
         "minigpt: error: chats.jsonl line 1: no field 'text' (fields: messages); choose one with "
         "--text-field or pass --chat to train on its conversations (pass --skip-bad-records to "
         "skip such records)"),
    Case("chat-text-file", "--chat on a text file", "prepare corpus.txt --chat --out data",
         'minigpt: error: corpus.txt: --chat reads JSON lines of conversations (.jsonl, one '
         '{"messages": [...]} object per line)'),
    Case("chat-with-docs", "--chat with a --docs mode",
         "train --data chats.jsonl --chat --docs lines --out new-run",
         "minigpt: error: --chat makes each conversation a document; drop --docs"),
    Case("chat-template-without-chat", "--chat-template without --chat",
         "train --data chats.jsonl --chat-template qa-template.json --out new-run",
         "minigpt: error: --chat-template renders conversations for --chat; give --chat"),
    Case("chat-untrainable-template", "--chat with a template whose assistant line does not begin "
         "with its generation prompt", "train --data chats.jsonl --chat --chat-template "
         "bot-template.json --out new-run",
         "minigpt: error: chat template: the assistant line 'Assistant: {content}\\n' must begin "
         "with the generation prompt 'Bot:' to train on conversations (what is learnt must be "
         "what is served)"),
    Case("chat-prepared-without-chat", "train --chat on data prepared without it",
         "train --data prepared --chat --out new-run",
         "minigpt: error: prepared was prepared without --chat; give the conversations' .jsonl "
         "as --data, or prepare it again with --chat"),
    Case("chat-reference-backend", "--chat with the NumPy reference backend",
         "train --data chats.jsonl --chat --backend reference --out new-run",
         "minigpt: error: the reference backend has no loss mask for conversations (--chat); use "
         "--backend torch"),
    Case("negative-patience", "a negative --patience",
         "train --data corpus.txt --out new-run --patience -1",
         "minigpt: error: patience must be >= 0 (0 = never stop early), got -1"),
    # --- downloads (issue 14); SERVER is a loopback HTTP server the test starts ----------------------
    Case("download-unknown-name", "a dataset name not in the catalogue", "download shakespear",
         "minigpt: error: unknown dataset 'shakespear': give a name from `minigpt download --list`, "
         "an http(s) URL or hf:OWNER/NAME"),
    Case("download-bad-sha256", "--sha256 that is not 64 hex digits",
         "download tinyshakespeare --sha256 86c4e6aa",
         "minigpt: error: --sha256 must be 64 hexadecimal digits, got '86c4e6aa'"),
    Case("download-404", "a URL the server does not have (HTTP 404)",
         "download http://SERVER/missing.txt --out downloads --quiet",
         "minigpt: error: cannot download http://SERVER/missing.txt: HTTP 404 Not Found"),
    Case("download-wrong-sha256", "a download whose bytes do not match --sha256",
         f"download http://SERVER/corpus.txt --out downloads --quiet --sha256 {'0' * 64}",
         f"minigpt: error: http://SERVER/corpus.txt does not match its SHA-256 (expected {'0' * 64}, "
         "got …); the download was deleted: run the command again to download it afresh"),
    # --- export -------------------------------------------------------------------------------------
    Case("export-missing-run", "export of a nonexistent run directory",
         "export nowhere --to hf --out hf-model",
         "minigpt: error: run directory not found: nowhere"),
    Case("export-unexportable-layout", "export of a layout no transformers architecture computes "
         "(QK-norm after rotary: every run made before --qk-norm-order existed)",
         "export run-after-rope --to hf --out hf-model",
         "minigpt: error: cannot export run-after-rope to hf: minigpt's --qk-norm-order after_rope is "
         "a LayerNorm of each head's queries and keys after the rotary rotation, and no transformers "
         "architecture computes that (Persimmon, StableLM and Cohere normalise before the rotation, "
         "which a LayerNorm does not commute with); train with --qk-norm-order before_rope (exported "
         "as Persimmon), or with --no-qk-norm"),
    Case("export-run-chat-template-broken", "export of a run whose chat_template.json is not valid "
         "JSON", "export bad-chat --to hf --out hf-model",
         "minigpt: error: bad-chat/chat_template.json is not valid JSON: Expecting property name "
         "enclosed in double quotes: line 1 column 2 (char 1)"),
    Case("export-out-not-empty", "export into an existing non-empty --out",
         "export run-gpt2 --to hf --out notes",
         "minigpt: error: notes exists and is not empty; pass --overwrite to replace it, or choose "
         "another --out"),
    Case("export-overwrite-not-a-model", "export --overwrite into a directory that is not an export",
         "export run-gpt2 --to hf --out notes --overwrite",
         "minigpt: error: notes is not a model directory (no config.json); --overwrite replaces only "
         "an earlier export, choose another --out"),
    # --- export --------------------------------------------------------------------------------------
    Case("export-gguf-qk-norm", "GGUF export of the modern layout (QK-norm before rotary)",
         "export run-modern --to gguf --out run.gguf",
         "minigpt: error: cannot export to GGUF: qk_norm before rotary (--qk-norm-order before_rope) "
         "is Persimmon's order, and llama.cpp removed its Persimmon architecture (--to hf exports "
         "this run as Persimmon); runs trained with --arch stablelm, --arch portable, --arch gpt2, "
         "or --arch modern --no-qk-norm export exactly"),
    Case("export-gguf-qk-norm-after-rope", "GGUF export of QK-norm after rotary (every run made "
         "before --qk-norm-order existed)", "export run-after-rope --to gguf --out run.gguf",
         "minigpt: error: cannot export to GGUF: qk_norm after rotary (--qk-norm-order after_rope) "
         "is a LayerNorm of the rotated queries and keys, which no llama.cpp architecture computes; "
         "runs trained with --arch stablelm, --arch portable, --arch gpt2, or --arch modern "
         "--no-qk-norm export exactly"),
    Case("export-out-exists", "an export --out that already exists",
         "export run --to gguf --out corpus.txt",
         "minigpt: error: --out corpus.txt already exists; pass --overwrite to replace it"),
    Case("export-out-no-dir", "an export --out in a directory that does not exist",
         "export run --to gguf --out nowhere/m.gguf",
         "minigpt: error: --out nowhere/m.gguf: directory nowhere does not exist"),
    Case("export-missing-step", "an export of a checkpoint step that does not exist",
         "export run --to gguf --out m.gguf --checkpoint 999",
         "minigpt: error: run has no checkpoint at step 999"),
    Case("export-gguf-outtype", "a GGUF --outtype llama.cpp's converter has but minigpt does not write",
         "export run --to gguf --out m.gguf --outtype q4_k",
         "minigpt: error: unknown GGUF --outtype 'q4_k'; choose from f32, f16, bf16, q8_0"),
    Case("export-hf-outtype", "--outtype with --to hf", "export run-gpt2 --to hf --out hf-model "
         "--outtype f16", "minigpt: error: --outtype applies to --to gguf only; --to hf writes float32"),
    # --- structured output (issue 20) ---------------------------------------------------------------
    Case("sample-bad-regex", "sample --regex with a pattern that does not parse",
         "sample run --regex K[a-",
         "minigpt: error: invalid regex: Regex parsing error at position 5: Unclosed '['"),
    Case("sample-schema-missing", "sample --json-schema naming a file that does not exist",
         "sample run --json-schema nowhere.json",
         "minigpt: error: JSON schema file not found: nowhere.json"),
    Case("sample-schema-not-json", "sample --json-schema of a file that is not JSON",
         "sample run --json-schema corpus.txt",
         "minigpt: error: the JSON schema is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    Case("sample-schema-invalid", "sample --json-schema of a schema JSON Schema rejects",
         "sample run --json-schema bad-schema.json",
         "minigpt: error: invalid JSON schema at properties/age/type: 'int' is not valid under any "
         "of the given schemas"),
    Case("sample-grammar-invalid", "sample --grammar of a GBNF grammar with an undefined rule",
         "sample run --grammar bad.gbnf",
         "minigpt: error: invalid grammar (GBNF): EBNF parser error at line 1, column 14: Rule "
         "\"name\" is not defined"),
    Case("sample-grammar-directory", "sample --grammar naming a directory", "sample run --grammar notes",
         "minigpt: error: cannot read the grammar file notes: Is a directory"),
    Case("sample-schema-vocabulary", "sample --json-schema for a model whose vocabulary has no '{'",
         "sample run --json-schema schema.json",
         "minigpt: error: no token of this model's vocabulary can begin a text the JSON schema "
         "allows (the tokenizer lacks the characters it starts with)"),
]


# --- the workspace ---------------------------------------------------------------------------------


def _cli(argv: str, cwd: Path) -> None:
    result = cli_harness.run(shlex.split(argv), cwd)
    assert result.rc == 0, result


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_malicious_trainer_state(step_dir: Path, target: Path) -> None:
    """Replace trainer.pt with a payload and update meta.json's checksum, as an attacker would."""
    torch.save({"optimizer": Payload(target), "step": 10}, step_dir / ckpt.TRAINER)
    meta = json.loads((step_dir / ckpt.META).read_text())
    meta["sha256"][ckpt.TRAINER] = fsio.sha256_file(step_dir / ckpt.TRAINER)
    (step_dir / ckpt.META).write_text(json.dumps(meta))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(workspace_dir: Path):
    """A loopback HTTP server of the workspace's files: SERVER in the download rows."""
    global SERVER
    handler = functools.partial(_Files, directory=str(workspace_dir))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    SERVER = f"127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def workspace_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def write_format_inputs(ws: Path) -> None:
    """The JSON-lines, Parquet and compressed inputs of the format rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c" "d"}\n')
    (ws / "body.jsonl").write_text('{"body": "no text field here"}\n')
    (ws / "array.json").write_text('[\n  {"text": "a"}\n]\n')
    pq.write_table(pa.table({"body": ["a", "b"]}), ws / "body.parquet")
    (ws / "fake.parquet").write_text("not parquet at all\n")
    (ws / "cut.txt.gz").write_bytes(gzip.compress(b"some text\n" * 1000)[:40])
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    for name, bad in (("noreply", {"messages": [user]}),
                      ("roles", {"messages": [user, {"role": "bot", "content": "yo"}]}),
                      ("notlist", {"messages": user}),
                      ("number", {"messages": [{"role": "user", "content": 7}, reply]})):
        lines = [bad, {"messages": [user, reply]}]
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                  (lines[::-1] if name == "noreply" else lines)))
    (ws / "chats.jsonl").write_text(json.dumps({"messages": [user, reply]}) + "\n")
    (ws / "qa-template.json").write_text('{"user": "Q: {content}\\n"}')
    (ws / "bot-template.json").write_text('{"generation": "Bot:"}')


@pytest.fixture(scope="module")
def workspace(workspace_dir: Path, server) -> Path:
    ws = workspace_dir
    write_format_inputs(ws)
    corpus = bundled_corpus().read_text(encoding="utf-8")[:3000]  # 52 distinct characters: a vocabulary of 54
    (ws / "corpus.txt").write_text(corpus, encoding="utf-8")
    (ws / "empty.txt").write_bytes(b"")
    (ws / "blank.txt").write_text("  \n\t\n   \n")
    (ws / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (ws / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (ws / "one.txt").write_text("a")
    (ws / "greek.txt").write_text("abc αβγ\n", encoding="utf-8")  # 'a', 'b', 'c' are in the run's vocabulary
    (ws / "short.txt").write_text(corpus[:40], encoding="utf-8")
    (ws / "long-line.txt").write_bytes(b"all work and no play " * 2_500_000)  # 52.5 MB, no newline
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("my own notes; minigpt must not touch them\n")
    (ws / "bad-template.json").write_text('{"user": "User: no placeholder\\n"}')
    (ws / "typo-template.json").write_text('{"usr": "User: {content}\\n"}')
    (ws / "schema.json").write_text('{"type": "object", "properties": {"name": {"type": "string"}}}')
    (ws / "bad-schema.json").write_text('{"type": "object", "properties": {"age": {"type": "int"}}}')
    (ws / "bad.gbnf").write_text('root ::= "K" name\n')

    _cli(f"train --data corpus.txt --out run --max-iters 10 --eval-interval 10 {TINY}", ws)
    step = Path("checkpoints") / "step-0000010"
    for name in ("no-weights", "no-trainer", "bad-weights", "bad-trainer", "evil", "other-vocab",
                 "newer", "bad-chat"):
        shutil.copytree(ws / "run", ws / name)
    (ws / "bad-chat" / rundir.CHAT_TEMPLATE).write_text("{oops")
    (ws / "no-weights" / step / ckpt.WEIGHTS).unlink()
    (ws / "no-trainer" / step / ckpt.TRAINER).unlink()
    _flip_byte(ws / "bad-weights" / step / ckpt.WEIGHTS)
    _flip_byte(ws / "bad-trainer" / step / ckpt.TRAINER)
    write_malicious_trainer_state(ws / "evil" / step, ws / "pwned")
    meta = json.loads((ws / "newer" / step / ckpt.META).read_text())
    (ws / "newer" / step / ckpt.META).write_text(json.dumps({**meta, "format": 2}))
    mcfg = dataclasses.replace(rundir.read_config(ws / "run")[0], vocab_size=70)  # only the vocabulary differs
    shutil.rmtree(ws / "other-vocab" / "checkpoints")
    ckpt.save_checkpoint(ws / "other-vocab", 10, GPT(mcfg), None, {})
    # the same run in GPT-2's layout, which exports
    shutil.copytree(ws / "run", ws / "run-gpt2")
    mcfg, tcfg = rundir.read_config(ws / "run")
    mcfg = dataclasses.replace(mcfg, arch="gpt2", **config.ARCHS["gpt2"])
    rundir.write_config(ws / "run-gpt2", mcfg, tcfg)
    shutil.rmtree(ws / "run-gpt2" / "checkpoints")
    ckpt.save_checkpoint(ws / "run-gpt2", 10, GPT(mcfg), None, {})

    # the same run in the modern layout (the default before 0.5), which llama.cpp cannot compute,
    # and that with QK-norm after rotary (as every run made before --qk-norm-order), which
    # transformers cannot either
    for name, changes in (("run-modern", {}), ("run-after-rope", dict(qk_norm_order="after_rope"))):
        shutil.copytree(ws / "run", ws / name)
        mcfg, tcfg = rundir.read_config(ws / "run")
        mcfg = dataclasses.replace(mcfg, arch="modern", **{**config.ARCHS["modern"], **changes})
        rundir.write_config(ws / name, mcfg, tcfg)
        shutil.rmtree(ws / name / "checkpoints")
        ckpt.save_checkpoint(ws / name, 10, GPT(mcfg), None, {})

    # a run on prepared data, whose data directory is then re-made from another text
    (ws / "abc.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    _cli("prepare corpus.txt --out prepared", ws)
    _cli(f"train --data prepared --out prep-run --max-iters 10 --eval-interval 10 {TINY}", ws)
    _cli("prepare abc.txt --out prepared", ws)
    make_foreign_models(ws, corpus)
    make_lora_runs(ws)
    return ws


def make_lora_runs(ws: Path) -> None:
    """LoRA runs on `run`: one intact, one whose base is deleted, one whose base changed."""
    lora = "--lora-rank 2 --max-iters 2 --eval-interval 2 --batch-size 4 --eval-iters 2 " \
           "--sample-tokens 0 --quiet"
    _cli(f"train --data corpus.txt --out lora-run --init-from run {lora}", ws)
    for base, run in (("base-gone", "lora-lost-base"), ("base-changed", "lora-changed-base")):
        shutil.copytree(ws / "run", ws / base)
        _cli(f"train --data corpus.txt --out {run} --init-from {base} {lora}", ws)
    shutil.rmtree(ws / "base-gone" / "checkpoints" / "step-0000010")
    step = ws / "base-changed" / "checkpoints" / "step-0000010"
    _flip_byte(step / ckpt.WEIGHTS)  # re-trained in place: a new file with its own checksum
    meta = json.loads((step / ckpt.META).read_text())
    meta["sha256"][ckpt.WEIGHTS] = fsio.sha256_file(step / ckpt.WEIGHTS)
    (step / ckpt.META).write_text(json.dumps(meta))


def make_foreign_models(ws: Path, corpus: str) -> None:
    """Hugging Face-style directories --init-from must refuse, written without transformers: only
    what each refusal needs (a config.json, a GPT-2 tokenizer, a weights file or a pickle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt2 = {"model_type": "gpt2", "vocab_size": tok.get_vocab_size(), "n_positions": 16,
            "n_embd": 32, "n_layer": 2, "n_head": 2}
    qwen3_gqa = {"model_type": "qwen3", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                 "intermediate_size": 96, "max_position_embeddings": 32}
    dirs = {"mamba-model": {"model_type": "mamba"}, "qwen3-gqa": qwen3_gqa, "gpt2-pickle": gpt2,
            "gpt2-untied": {**gpt2, "tie_word_embeddings": False}, "gpt2-no-tokenizer": gpt2}
    for name, hf_config in dirs.items():
        (ws / name).mkdir()
        (ws / name / "config.json").write_text(json.dumps(hf_config))
    tok.save(str(ws / "gpt2-pickle" / "tokenizer.json"))
    # a pickle that would run `touch pwned` if anything unpickled it
    torch.save({"transformer.wte.weight": Payload(ws / "pwned")}, ws / "gpt2-pickle" / "pytorch_model.bin")
    save_file({"wte.weight": torch.zeros(2, 2)}, str(ws / "gpt2-no-tokenizer" / ckpt.WEIGHTS))
    (ws / "unicode.txt").write_text(corpus + "Ünïcode €\n", encoding="utf-8")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (size and mtime for big files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.stat().st_size > 1 << 20:
            st = p.stat()
            out[rel] = f"{st.st_size}:{st.st_mtime_ns}"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


SERVER = ""  # host:port of the loopback server, once the `server` fixture has started it


def argv_of(case: Case) -> list[str]:
    return [LONG_PROMPT if a == "LONG_PROMPT" else a.replace("SERVER", SERVER)
            for a in shlex.split(case.command)]


def message_matches(template: str, line: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in template.split("…"))
    return re.fullmatch(pattern, line) is not None


# --- the matrix ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workspace: Path):
    before = snapshot(workspace)
    result = cli_harness.run(argv_of(case), workspace)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.rc == case.exit_code, result
    if case.message:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("minigpt: error: ")
        assert message_matches(case.message.replace("SERVER", SERVER), lines[0]), lines[0]
        assert result.stdout == ""  # nothing half-done was printed first
    else:
        assert result.stderr == ""
        assert result.stdout.startswith(LONG_PROMPT) and len(result.stdout) > len(LONG_PROMPT) + 1
    assert snapshot(workspace) == before, "files were created, changed or deleted"


def test_fork_server_matches_a_plain_subprocess(workspace: Path):
    """The matrix's children behave exactly like `python -m minigpt` started the ordinary way."""
    case = next(c for c in CASES if c.id == "prompt-unknown-chars")
    plain = subprocess.run([sys.executable, "-m", "minigpt", *argv_of(case)], cwd=workspace,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    forked = cli_harness.run(argv_of(case), workspace)
    assert (forked.rc, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)


# --- the table in docs/errors.md -------------------------------------------------------------------


def render_table(cases: list[Case]) -> str:
    def code(text: str) -> str:
        return "`" + text.replace("|", "\\|") + "`"

    rows = ["| Input | Command | What the user sees (stderr) | Exit code |", "|---|---|---|---|"]
    for c in cases:
        seen = code(c.message) if c.message else c.note
        rows.append(f"| {c.input} | {code('minigpt ' + c.command)} | {seen} | {c.exit_code} |")
    return "\n".join(rows)


def test_docs_table_matches_the_matrix():
    text = DOC.read_text(encoding="utf-8")
    start, end = "<!-- matrix:start -->", "<!-- matrix:end -->"
    assert start in text and end in text, f"{DOC} lost its table markers"
    table = text.split(start)[1].split(end)[0].strip()
    expected = render_table(CASES)
    assert table == expected, f"docs/errors.md is out of date; the table should be:\n\n{expected}\n"
