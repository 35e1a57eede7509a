"""Continuous batching (minigpt.batching): requests that join and leave the batch at different steps get what they would get alone.

The batcher is stepped by hand (start=False), so which step each request joins at is decided by the
test, never by thread timing."""

from __future__ import annotations

import codecs
import threading

import pytest
import torch

from minigpt.batching import Batcher, BatcherBusy
from minigpt.config import ModelConfig
from minigpt.engine import Engine
from minigpt.errors import ConfigError
from minigpt.model import GPT
from minigpt.tokenization import CharTokenizer
from minigpt.tokenization.bytes import ByteTokenizer

ALPHABET = "abcdefgh ij\n"


def tiny_engine(arch: str, block_size: int = 16) -> Engine:
    """arch "gpt2", "modern" (today's default, QK-norm before rotary) or "modern-after-rope"
    (the order of runs trained before the switch existed)."""
    tok = CharTokenizer.train([ALPHABET])
    torch.manual_seed(0)
    arch, _, order = arch.partition("-")
    extra = {"qk_norm_order": "after_rope"} if order == "after-rope" else {}
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2,
                            n_embd=16, arch=arch, **extra))
    for p in model.parameters():  # not the init's ones and zeros: every weight must matter
        p.data.add_(torch.randn_like(p) * 0.3)
    return Engine(model, tok)


@pytest.fixture(scope="module", params=["gpt2", "modern"])
def engine(request):
    return tiny_engine(request.param)


def collect(req) -> tuple[list[int], str, str | None]:
    events, done = req.drain()
    assert done
    return [e.token for e in events], "".join(e.text for e in events), events[-1].finish_reason


def run_schedule(batcher: Batcher, schedule: dict[int, list[dict]], steps: int = 400):
    """Submit schedule[step] before that step; step until every request has ended."""
    reqs = []
    for step in range(steps):
        for kw in schedule.get(step, []):
            reqs.append(batcher.submit(**kw))
        if step > max(schedule) and all(r.done for r in reqs):
            return reqs
        batcher.step()
    raise AssertionError("requests did not finish")


GREEDY = [  # prompt, max_new_tokens: different lengths, some past the 16-token window
    ("a", 30), ("abcabc", 7), ("hhh ij", 19), ("", 3), ("ggfedcba\n", 40), ("i", 1),
]


def test_greedy_requests_joining_and_leaving_at_different_steps_equal_single_stream(engine):
    batcher = Batcher(engine, max_rows=4, max_queue=8, start=False)
    # joins at steps 0, 0, 3, 5, 5 and 11; four rows, so the later ones also wait for a free row
    at = [0, 0, 3, 5, 5, 11]
    schedule: dict[int, list[dict]] = {}
    for (prompt, n), step in zip(GREEDY, at):
        schedule.setdefault(step, []).append(
            dict(prompt=prompt, max_new_tokens=n, temperature=0, stop_at_eos=False))
    occupancy = []
    orig_step = batcher.step

    def step():
        occupancy.append(len(batcher.rows))
        orig_step()

    batcher.step = step
    reqs = run_schedule(batcher, schedule)
    for (prompt, n), req in zip(GREEDY, reqs):
        tokens, text, finish = collect(req)
        alone = list(engine.stream(prompt, max_new_tokens=n, temperature=0, stop_at_eos=False))
        assert tokens == [e.token for e in alone], prompt
        assert text == "".join(e.text for e in alone) and finish == "length"
    assert max(occupancy) == 4 and len(set(occupancy)) > 2  # really batched, at varying sizes
    assert batcher.rows_in_use == 0 and not batcher.rows


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch(engine):
    batcher = Batcher(engine, max_rows=8, start=False)
    reqs = run_schedule(batcher, {
        0: [dict(prompt="ab", max_new_tokens=25, seed=1)],
        2: [dict(prompt="ggg", max_new_tokens=12, seed=2, num_samples=3),
            dict(prompt="ab", max_new_tokens=25, seed=1, temperature=1.3, top_k=4)],
        4: [dict(prompt="ij", max_new_tokens=20, seed=3, top_p=0.7)],
    })
    events = [r.drain()[0] for r in reqs]
    texts = ["".join(e.text for e in ev) for ev in events]
    assert texts[0] == engine.generate("ab", max_new_tokens=25, seed=1)
    # n samples share one generator, as in Engine, even when one of them ends early at EOS
    many = ["".join(e.text for e in events[1] if e.index == i) for i in range(3)]
    assert many == engine.generate_many("ggg", 3, max_new_tokens=12, seed=2)
    assert texts[2] == engine.generate("ab", max_new_tokens=25, seed=1, temperature=1.3, top_k=4)
    assert texts[3] == engine.generate("ij", max_new_tokens=20, seed=3, top_p=0.7)


def test_n_samples_prefill_once_and_match_the_engines_batch(engine):
    batcher = Batcher(engine, max_rows=8, start=False)
    [req] = run_schedule(batcher, {0: [dict(prompt="abcd", max_new_tokens=30, seed=5,
                                            num_samples=4)]})
    events, done = req.drain()
    got = ["".join(e.text for e in events if e.index == i) for i in range(4)]
    assert got == engine.generate_many("abcd", 4, max_new_tokens=30, seed=5)
    assert batcher.prompt_tokens_prefilled == len(engine.encode_prompt("abcd"))


def test_eos_stop_strings_and_length_free_rows_at_once(engine, monkeypatch):
    eos = engine.tokenizer.eos_id
    full = engine.generate("abc", max_new_tokens=20, temperature=0, stop_at_eos=False)
    stop = full[6:8]
    batcher = Batcher(engine, max_rows=2, start=False)
    req = batcher.submit("abc", max_new_tokens=20, temperature=0, stop=[stop])
    while not req.done:
        batcher.step()
    tokens, text, finish = collect(req)
    assert (text, finish) == (full[: full.find(stop)], "stop") and len(tokens) < 20
    assert batcher.rows_in_use == 0
    # a model that always says EOS ends every row at its first token
    monkeypatch.setattr("minigpt.batching.choose_tokens",
                        lambda logits, *a: torch.full((logits.size(0),), eos))
    req = batcher.submit("abc", max_new_tokens=20, seed=1, num_samples=2)
    batcher.step()
    assert collect(req) == ([eos, eos], "", "stop") and batcher.rows_in_use == 0


def test_long_prompt_is_prefilled_in_chunks_while_running_rows_go_on(engine):
    batcher = Batcher(engine, max_rows=2, prefill_chunk=4, start=False)
    a = batcher.submit("a", max_new_tokens=12, temperature=0)
    batcher.step()
    assert len(a.drain()[0]) == 1
    b = batcher.submit("abcdefghij\nab", max_new_tokens=5, temperature=0)  # 13 tokens: 4 chunks
    firsts = []
    for _ in range(4):
        batcher.step()
        firsts.append((len(a.drain()[0]), len(b.drain()[0])))
    assert firsts == [(1, 0), (1, 0), (1, 0), (1, 1)]  # a token for `a` at every step
    while not (a.done and b.done):
        batcher.step()
    alone = engine.generate("abcdefghij\nab", max_new_tokens=5, temperature=0)
    events, _ = b.drain()
    assert b.done and len(events) == 4  # its first event was drained above
    assert alone.endswith("".join(e.text for e in events))


def test_cancel_frees_rows_and_the_waiting_line(engine):
    batcher = Batcher(engine, max_rows=2, max_queue=1, start=False)
    running = batcher.submit("a", max_new_tokens=1000, temperature=0, stop_at_eos=False,
                             num_samples=2)
    batcher.step()
    waiting = batcher.submit("b", max_new_tokens=5)
    assert (batcher.running, batcher.waiting, batcher.rows_in_use) == (1, 1, 2)
    with pytest.raises(BatcherBusy):
        batcher.submit("c")
    waiting.cancel()  # leaves the line at once, without a step
    assert waiting.done and batcher.waiting == 0
    running.cancel()
    batcher.step()
    assert running.done and batcher.rows_in_use == 0 and not batcher.rows
    assert batcher.running == 0
    after = batcher.submit("abc", max_new_tokens=6, temperature=0)
    while not after.done:
        batcher.step()
    assert collect(after)[1] == engine.generate("abc", max_new_tokens=6, temperature=0)


def test_bad_settings_raise_before_anything_runs(engine):
    batcher = Batcher(engine, max_rows=2, start=False)
    with pytest.raises(ConfigError):
        batcher.submit("a", num_samples=3)
    with pytest.raises(ConfigError):
        batcher.submit("a", max_new_tokens=0)
    with pytest.raises(ConfigError):
        Batcher(engine, max_rows=0, start=False)


def test_the_thread_streams_to_a_blocking_reader_and_close_ends_requests(engine):
    batcher = Batcher(engine, max_rows=4)
    try:
        texts = {}

        def read(seed):
            texts[seed] = "".join(e.text for e in batcher.submit("ab", max_new_tokens=15,
                                                                 seed=seed))

        threads = [threading.Thread(target=read, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert texts == {s: engine.generate("ab", max_new_tokens=15, seed=s) for s in range(6)}
        endless = batcher.submit("a", max_new_tokens=10**6, stop_at_eos=False)
    finally:
        batcher.close()
    events = list(endless)  # ends (no error) once the batcher is closed
    assert endless.done and all(e.finish_reason is None for e in events)


def test_a_failing_step_fails_its_requests_and_the_batcher_goes_on(engine, monkeypatch):
    batcher = Batcher(engine, max_rows=2, start=False)
    req = batcher.submit("ab", max_new_tokens=5, temperature=0)
    batcher.step()  # prefilled, first token out

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batcher, "model", broken)
    batcher.step()
    events, done = req.drain()  # the token made before the failure still arrives
    assert len(events) == 1 and not done
    with pytest.raises(RuntimeError, match="out of memory"):
        req.drain()
    assert batcher.rows_in_use == 0 and not batcher.rows
    monkeypatch.undo()
    after = batcher.submit("ab", max_new_tokens=5, temperature=0)
    while not after.done:
        batcher.step()
    assert collect(after)[1] == engine.generate("ab", max_new_tokens=5, temperature=0)


def scored_events(req) -> list[tuple[int, float, list[tuple[int, float]]]]:
    events, done = req.drain()
    assert done
    return [(e.token, e.logprob, e.top_logprobs) for e in events]


def assert_same_scores(got, want):
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    for (_, lp, top), (_, lp2, top2) in zip(got, want):
        assert lp == pytest.approx(lp2, abs=1e-5)
        assert [i for i, _ in top] == [i for i, _ in top2]
        assert [v for _, v in top] == pytest.approx([v for _, v in top2], abs=1e-5)


def test_a_batched_request_reports_the_logprobs_it_reports_alone(engine):
    """Greedy with logprobs: in a batch with other requests (sampled, other settings, joining and
    leaving at other steps, past the context window) the same tokens and log-probabilities as
    alone in the batcher and as Engine.stream."""
    mine = dict(prompt="abc", max_new_tokens=30, temperature=0, logprobs=3, stop_at_eos=False)
    alone = scored_events(run_schedule(Batcher(engine, max_rows=4, start=False), {0: [mine]})[0])
    stream = [(e.token, e.logprob, e.top_logprobs)
              for e in engine.stream("abc", max_new_tokens=30, temperature=0, logprobs=3,
                                     stop_at_eos=False)]
    assert_same_scores(alone, stream)
    assert all(len(top) == 3 and top[0][0] == t for t, _, top in alone)  # greedy: its own top
    others = [dict(prompt="hhh gg", max_new_tokens=12, temperature=0.9, top_k=5, seed=1,
                   logprobs=1),
              dict(prompt="a", max_new_tokens=40, temperature=1.0, seed=2, stop_at_eos=False)]
    reqs = run_schedule(Batcher(engine, max_rows=4, start=False),
                        {0: others, 3: [mine], 7: [dict(others[0], seed=5, num_samples=1)]})
    assert_same_scores(scored_events(reqs[2]), alone)
    assert all(e.logprob is None for e in reqs[1].drain()[0])  # not asked: not computed


def test_the_utf8_mask_holds_in_the_batch():
    """A bytes-tokenizer model's rows, each with its own mask, always decode as strict UTF-8 (and
    without the mask the same requests do not: the test shows something)."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    engine = Engine(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                                    n_embd=16)), tok)

    def run(**extra):
        kw = [dict(prompt=[tok.bos_id], max_new_tokens=40, temperature=1.5, seed=s,
                   stop_at_eos=False, num_samples=1 + s % 2, **extra) for s in range(8)]
        schedule = {step: kw[2 * step : 2 * step + 2] for step in range(4)}
        reqs = run_schedule(Batcher(engine, max_rows=6, max_queue=16, start=False), schedule)
        out = []
        for r in reqs:
            events, done = r.drain()
            assert done
            for i in range(r.n):
                mine = [e for e in events if e.index == i]
                out.append((b"".join(tok.token_bytes(e.token) for e in mine),
                            "".join(e.text for e in mine)))
        return out

    for data, text in run():
        strict = codecs.getincrementaldecoder("utf-8")(errors="strict").decode(data)
        assert strict == text and "\ufffd" not in text
    bad = 0
    for data, _ in run(utf8_mask=False):
        try:
            codecs.getincrementaldecoder("utf-8")(errors="strict").decode(data)
        except UnicodeDecodeError:
            bad += 1
    assert bad > 0


def test_a_stop_string_cuts_text_and_logprobs_at_the_same_place(engine):
    """Events held back by the stop matcher leave with exactly the text it lets through; the tokens
    inside the stop string have no text and no logprob, and are still counted."""
    kw = dict(prompt="abc", max_new_tokens=30, temperature=0, logprobs=2, stop_at_eos=False)
    full = "".join(e.text for e in run_schedule(Batcher(engine, start=False), {0: [kw]})[0])
    stop = full[9:12]
    cut = full[: full.index(stop)]
    events, done = run_schedule(Batcher(engine, start=False), {0: [dict(kw, stop=[stop])]})[0] \
        .drain()
    assert done and "".join(e.text for e in events) == cut
    assert events[-1].finish_reason == "stop"
    scored = [e for e in events if e.logprob is not None]
    assert "".join(e.text for e in scored) == cut  # char tokens: one character each
    assert all(len(e.text) == 1 for e in scored)
    assert len(events) == len(cut) + len(stop)  # every generated token is an event
