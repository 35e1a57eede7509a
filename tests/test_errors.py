"""The bad-input matrix: every user mistake of issues 2 and 7, through the real CLI.

Each row of CASES runs `minigpt ...` as a separate process (see cli_harness.py) in a workspace of
prepared inputs and asserts what a user sees: exactly one line on stderr, `minigpt: error: <the
message>`, no traceback, the row's non-zero exit code, and not one file in the workspace created,
changed or deleted. The same table is the one in docs/errors.md; `test_docs_table_matches_the_matrix`
keeps the two equal (on failure it prints the table to paste).

In messages, `…` stands for text that depends on the torch version (the refusal reason of a pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import cli_harness
from minigpt import checkpoint as ckpt
from minigpt import fsio, rundir
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
    Case("negative-top-k", "top-k < 0", "sample run --top-k -1",
         "minigpt: error: top-k must be >= 0 (0 = off), got -1"),
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
    # --- export --------------------------------------------------------------------------------------
    Case("export-gguf-qk-norm", "GGUF export of the default layout (QK-norm after rotary)",
         "export run --to gguf --out run.gguf",
         "minigpt: error: cannot export to GGUF: qk_norm (a per-head LayerNorm of queries and keys "
         "after rotary) has no llama.cpp equivalent; runs trained with --arch gpt2, or --arch modern "
         "--no-qk-norm export exactly"),
    Case("export-out-exists", "an export --out that already exists",
         "export run-no-qk --to gguf --out corpus.txt",
         "minigpt: error: --out corpus.txt already exists; pass --overwrite to replace it"),
    Case("export-out-no-dir", "an export --out in a directory that does not exist",
         "export run-no-qk --to gguf --out nowhere/m.gguf",
         "minigpt: error: --out nowhere/m.gguf: directory nowhere does not exist"),
    Case("export-missing-step", "an export of a checkpoint step that does not exist",
         "export run-no-qk --to gguf --out m.gguf --checkpoint 999",
         "minigpt: error: run-no-qk has no checkpoint at step 999"),
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


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("matrix")
    corpus = bundled_corpus().read_text(encoding="utf-8")[:3000]  # 52 distinct characters: a vocabulary of 54
    (ws / "corpus.txt").write_text(corpus, encoding="utf-8")
    (ws / "empty.txt").write_bytes(b"")
    (ws / "blank.txt").write_text("  \n\t\n   \n")
    (ws / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (ws / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (ws / "one.txt").write_text("a")
    (ws / "short.txt").write_text(corpus[:40], encoding="utf-8")
    (ws / "long-line.txt").write_bytes(b"all work and no play " * 2_500_000)  # 52.5 MB, no newline
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("my own notes; minigpt must not touch them\n")

    _cli(f"train --data corpus.txt --out run --max-iters 10 --eval-interval 10 {TINY}", ws)
    step = Path("checkpoints") / "step-0000010"
    for name in ("no-weights", "no-trainer", "bad-weights", "bad-trainer", "evil", "other-vocab"):
        shutil.copytree(ws / "run", ws / name)
    (ws / "no-weights" / step / ckpt.WEIGHTS).unlink()
    (ws / "no-trainer" / step / ckpt.TRAINER).unlink()
    _flip_byte(ws / "bad-weights" / step / ckpt.WEIGHTS)
    _flip_byte(ws / "bad-trainer" / step / ckpt.TRAINER)
    write_malicious_trainer_state(ws / "evil" / step, ws / "pwned")
    mcfg = dataclasses.replace(rundir.read_config(ws / "run")[0], vocab_size=70)  # only the vocabulary differs
    shutil.rmtree(ws / "other-vocab" / "checkpoints")
    ckpt.save_checkpoint(ws / "other-vocab", 10, GPT(mcfg), None, {})
    # the same run without QK-norm (a switch without parameters): a layout GGUF export accepts
    shutil.copytree(ws / "run", ws / "run-no-qk")
    config = json.loads((ws / "run-no-qk" / "config.json").read_text())
    config["model"]["qk_norm"] = False
    (ws / "run-no-qk" / "config.json").write_text(json.dumps(config))

    # a run on prepared data, whose data directory is then re-made from another text
    (ws / "abc.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    _cli("prepare corpus.txt --out prepared", ws)
    _cli(f"train --data prepared --out prep-run --max-iters 10 --eval-interval 10 {TINY}", ws)
    _cli("prepare abc.txt --out prepared", ws)
    return ws


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


def argv_of(case: Case) -> list[str]:
    return [LONG_PROMPT if a == "LONG_PROMPT" else a for a in shlex.split(case.command)]


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
        assert message_matches(case.message, lines[0]), lines[0]
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
