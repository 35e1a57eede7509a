"""Structured output (issue 20): every sample matches its regex, validates against its JSON schema or
is in its grammar, for every tokenizer, in a batch shared with unconstrained rows, through the
engine, the CLI and the server.

Models are tiny: a names model and a JSON-records model trained for a few steps, and random models
for the tokenizer rows (the constraint forces the shape; the model only picks among what it allows).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch

import cli_harness
import minigpt
from conftest import TINY
from minigpt import Constraint
from minigpt.batching import Batcher
from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.errors import ConfigError
from minigpt.model import GPT
from minigpt.tokenization import BPETokenizer, CharTokenizer
from minigpt.tokenization.bytes import ByteTokenizer

# the task the benchmark measures (benchmarks/structured.py): one definition of the regex and schema
_spec = importlib.util.spec_from_file_location(
    "structured_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "structured.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
NAME, RECORD = _bench.NAME, _bench.RECORD
NAMES = ["Kate", "Karl", "Kim", "Anna", "Bob", "Kevin", "Karen", "Lena", "Mia", "Kurt", "Oskar",
         "Paula"]
TRAIN = dict(TINY, max_iters=40, eval_interval=40, progress=False)


def records_text() -> str:
    rng = random.Random(0)
    lines = [json.dumps({"name": rng.choice(NAMES), "age": rng.randrange(100),
                         "city": rng.choice(["Paris", "Rome", "Oslo"])}) for _ in range(300)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def names_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("names")
    (root / "names.txt").write_text("\n".join(NAMES * 30) + "\n")
    minigpt.train(data=str(root / "names.txt"), out=str(root / "run"), docs="lines", **TRAIN)
    return root / "run"


@pytest.fixture(scope="module")
def records_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    (root / "records.txt").write_text(records_text())
    minigpt.train(data=str(root / "records.txt"), out=str(root / "run"), docs="lines",
                  tokenizer="bytes", **TRAIN)
    return root / "run"


def samples(engine: Engine, constraint: Constraint, n: int, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) of n samples."""
    texts, finish = [""] * n, [None] * n
    for ev in engine.stream("", constraint=constraint, num_samples=n, **kw):
        texts[ev.index] += ev.text
        if ev.finish_reason:
            finish[ev.index] = ev.finish_reason
    return list(zip(texts, finish))


# --- the two models of the issue: names and JSON records -------------------------------------------


def test_every_name_matches_the_regex(names_run):
    engine = minigpt.load(names_run)
    out = samples(engine, Constraint.regex(NAME), 32, seed=1, temperature=1.0, max_new_tokens=20)
    assert all(re.fullmatch(NAME, text) and finish == "stop" for text, finish in out), out
    assert len({text for text, _ in out}) > 5  # sampled, not one forced string


def test_every_record_validates_against_the_schema(records_run):
    engine = minigpt.load(records_run)
    out = samples(engine, Constraint.json_schema(RECORD), 16, seed=2, temperature=1.0,
                  max_new_tokens=80)
    for text, finish in out:
        assert finish == "stop", out
        jsonschema.validate(json.loads(text), RECORD)
        assert text == json.dumps(json.loads(text))  # one line, as JSON-lines data is written


# --- exact at token boundaries for every tokenizer --------------------------------------------------

TEXT = "日本 éü abc naïve 日本語 " * 30
MULTIBYTE = r"(日本|éü|ï){1,4} [a-c]{2}"


def gpt2_style() -> BPETokenizer:
    """A byte-level BPE with GPT-2's conventions: <|endoftext|> is both BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return BPETokenizer(hf, json.loads(hf.to_str()), bos="<|endoftext|>", eos="<|endoftext|>")


TOKENIZERS = {
    "char": lambda: CharTokenizer.train([TEXT]),
    "bytes": ByteTokenizer,
    "bpe": lambda: BPETokenizer.train([TEXT], vocab_size=300),
    "gpt2": gpt2_style,
}


def random_engine(tok, block_size: int = 16, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2,
                            n_embd=32))
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    return Engine(model, tok)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_multibyte_regex_is_exact_for_every_tokenizer(kind):
    tok = TOKENIZERS[kind]()
    engine = random_engine(tok)
    ids = engine.token_ids("", constraint=Constraint.regex(MULTIBYTE), num_samples=8, seed=3,
                           temperature=1.0, max_new_tokens=40)
    merged = 0
    for row in ids:
        assert row[-1] == tok.eos_id  # it ended by itself
        text = tok.decode(row)
        assert re.fullmatch(MULTIBYTE, text), (kind, text)
        merged += sum(len(tok.token_bytes(t)) > 1 for t in row)
    if kind in ("bpe", "gpt2"):  # multi-byte tokens were used, so the test covers their bounds
        assert merged > 0


# --- in the batch -----------------------------------------------------------------------------------


def run_batch(engine: Engine, requests: list[dict]) -> list[list]:
    batcher = Batcher(engine, max_rows=8, start=False)
    reqs = [batcher.submit(**r) for r in requests]
    events: list[list] = [[] for _ in reqs]
    for _ in range(500):
        batcher.step()
        for i, r in enumerate(reqs):
            evs, _ = r.drain()
            events[i] += evs
        if all(r.done for r in reqs):
            batcher.close()
            return events
    raise AssertionError("the batch did not finish")


def test_constrained_and_unconstrained_rows_share_a_batch():
    engine = random_engine(ByteTokenizer())
    free = dict(prompt="ab", max_new_tokens=30, seed=5, temperature=1.0, stop_at_eos=False)
    schema = dict(prompt="x", max_new_tokens=80, seed=6, temperature=1.0, num_samples=3,
                  constraint=Constraint.json_schema(RECORD))
    alone = [e.token for e in run_batch(engine, [free])[0]]
    together = run_batch(engine, [free, schema, dict(free, seed=7)])
    assert [e.token for e in together[0]] == alone  # its tokens never depend on the batch
    texts = ["", "", ""]
    for e in together[1]:
        texts[e.index] += e.text
    for text in texts:
        jsonschema.validate(json.loads(text), RECORD)


# --- finish reasons, logprobs -----------------------------------------------------------------------


def test_a_complete_constraint_ends_with_eos_and_stop():
    tok = CharTokenizer.train(["abc xyz"])
    events = list(random_engine(tok).stream("", constraint=Constraint.choice(["abc"]),
                                            logprobs=3, seed=0, stop_at_eos=False))
    assert "".join(e.text for e in events) == "abc"
    assert events[-1].token == tok.eos_id and events[-1].finish_reason == "stop"
    # each token was the only one allowed: probability 1 under the masked distribution
    assert all(e.logprob == 0.0 and e.top_logprobs == [(e.token, 0.0)] for e in events)


def test_logprobs_are_of_the_masked_distribution():
    tok = CharTokenizer.train(["abc xyz"])
    allowed = {tok.encode("a")[0], tok.encode("b")[0]}
    events = list(random_engine(tok).stream("", constraint=Constraint.regex("[ab]x"),
                                            logprobs=5, seed=0))
    first = events[0]
    assert {t for t, _ in first.top_logprobs} == allowed
    assert math.isclose(sum(math.exp(v) for _, v in first.top_logprobs), 1.0, rel_tol=1e-5)


def test_cut_off_by_max_new_tokens_is_length():
    tok = CharTokenizer.train(["abc"])
    out = samples(random_engine(tok), Constraint.regex("a{20}"), 2, max_new_tokens=5, seed=0)
    assert out == [("aaaaa", "length")] * 2


def test_a_dead_end_the_vocabulary_cannot_pass_is_length():
    tok = CharTokenizer.train(["abc"])  # no '{'
    assert samples(random_engine(tok), Constraint.regex(r"ab\{"), 1) == [("ab", "length")]


def test_a_constraint_the_vocabulary_cannot_begin_is_refused():
    engine = random_engine(CharTokenizer.train(["abc"]))
    with pytest.raises(ConfigError, match="no token of this model's vocabulary can begin a text "
                                          "the JSON schema allows"):
        engine.generate(constraint=Constraint.json_schema(RECORD))


@pytest.mark.parametrize("grammar,pattern", [
    (Constraint.grammar('root ::= "K" [a-z] [a-z]+'), r"K[a-z]{2,}"),
    (Constraint.lark('start: "K" LETTER LETTER+\nLETTER: /[a-z]/'), r"K[a-z]{2,}"),
    (Constraint.choice(["Kate", "Karl", "Kim"]), r"Kate|Karl|Kim"),
])
def test_grammars_and_choices(names_run, grammar, pattern):
    out = samples(minigpt.load(names_run), grammar, 8, seed=4, max_new_tokens=30)
    assert all(re.fullmatch(pattern, t) and f == "stop" for t, f in out), out


@pytest.mark.parametrize("constraint,message", [
    (Constraint.regex("K[a-"), "invalid regex: Regex parsing error at position 5: Unclosed '['"),
    (Constraint.regex(""), "the regex is empty"),
    (Constraint.json_schema('{"type": "object"'), "the JSON schema is not valid JSON"),
    (Constraint.json_schema("[1]"), "the JSON schema must be a JSON object, got list"),
    (Constraint.json_schema({"type": "strin"}), "invalid JSON schema at type: 'strin' is not valid"),
    (Constraint.grammar("root ::= name"), 'invalid grammar (GBNF): EBNF parser error at line 1, '
                                          'column 10: Rule "name" is not defined'),
    (Constraint.lark("start: x"), "invalid grammar (Lark): Lark error at line 1, column 8: "
                                  "unknown name 'x'"),
    (Constraint.choice([]), "choice must be a non-empty list of non-empty strings"),
    (Constraint("glob", "*"), "unknown constraint kind 'glob'"),
])
def test_bad_constraints_are_one_line_errors(constraint, message):
    with pytest.raises(ConfigError) as e:
        minigpt.SamplingParams(constraint=constraint).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_constraint_must_be_a_constraint():
    with pytest.raises(ConfigError, match="constraint must be a minigpt.Constraint"):
        minigpt.SamplingParams(constraint="K[a-z]+").validate()


# --- the CLI ----------------------------------------------------------------------------------------


def test_cli_sample_regex_and_json_schema(names_run, records_run, tmp_path):
    r = cli_harness.run(["sample", names_run, "--regex", NAME, "--num-samples", "4", "--seed", "1"],
                        tmp_path)
    assert r.rc == 0, r.stderr
    names = [line for line in r.stdout.splitlines() if not line.startswith("---")]
    assert len(names) == 4 and all(re.fullmatch(NAME, n) for n in names), r.stdout
    (tmp_path / "record.json").write_text(json.dumps(RECORD))
    r = cli_harness.run(["sample", records_run, "--json-schema", "record.json", "--seed", "1",
                         "--max-new-tokens", "80"], tmp_path)
    assert r.rc == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), RECORD)


# --- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(records_run):
    from minigpt.serve.app import create_app
    from test_server import serving

    with serving(create_app(minigpt.load(records_run, device="cpu"), model_id="tiny")) as base:
        yield httpx.Client(base_url=base, timeout=60)


def test_server_response_format_json_schema_round_trip(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD,
                                                  "strict": True}}
    r = server.post("/v1/completions", json={"prompt": "", "max_tokens": 80, "n": 4, "seed": 1,
                                             "response_format": fmt})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["text"]), RECORD)
    r = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a record"}], "max_tokens": 80, "seed": 2,
        "response_format": fmt})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), RECORD)


def test_server_json_object_streams_a_json_object(server):
    with server.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "seed": 3,
            "stream": True, "response_format": {"type": "json_object"}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    if finish == "stop":  # an unbounded object may also run out of tokens: then "length"
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length"


@pytest.mark.parametrize("outputs,pattern", [
    ({"regex": "[A-Z][a-z]{2,5}"}, r"[A-Z][a-z]{2,5}"),
    ({"choice": ["Paris", "Rome", "Oslo"]}, r"Paris|Rome|Oslo"),
    ({"grammar": 'root ::= "Ka" [a-z] [a-z]? [a-z]?'}, r"Ka[a-z]{1,3}"),
])
def test_server_vllm_structured_outputs(server, outputs, pattern):
    r = server.post("/v1/completions", json={"prompt": "", "max_tokens": 30, "n": 3, "seed": 4,
                                             "structured_outputs": outputs})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert re.fullmatch(pattern, c["text"]) and c["finish_reason"] == "stop", c


def test_server_schema_cut_off_by_max_tokens_is_length(server):
    r = server.post("/v1/completions", json={
        "prompt": "", "max_tokens": 5, "structured_outputs": {"json": RECORD}})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == '{"nam'


@pytest.mark.parametrize("body,param,message", [
    ({"structured_outputs": {"regex": "K[a-"}}, "structured_outputs", "invalid regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format", "invalid JSON schema at type"),
    ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs",
     "invalid grammar (GBNF)"),
])
def test_server_invalid_constraint_is_400_naming_it(server, body, param, message):
    r = server.post("/v1/completions", json={"prompt": "", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
