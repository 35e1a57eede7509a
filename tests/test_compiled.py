"""`minigpt serve --compile`: a row alone in the batch decodes through a torch.compile'd step
(compiled.py). It must give what eager decoding gives: the same greedy tokens, and log-probabilities
within float32 rounding, also when the batch grows past one row and shrinks back, and past the
context window (where the row is rebuilt eagerly)."""

from __future__ import annotations

import pytest
import torch

from minigpt.batching import Batcher
from minigpt.compiled import CompileError
from test_batching import GREEDY, run_schedule, tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("modern")


@pytest.fixture(scope="module")
def compiled(engine):
    return Batcher(engine, max_rows=4, max_queue=8, start=False, compile=True)


def tokens_and_logprobs(req):
    events, done = req.drain()
    assert done
    return [e.token for e in events], [e.logprob for e in events]


def test_a_lone_row_decodes_through_the_compiled_step_as_eager_decoding_does(engine, compiled):
    assert compiled.compile_seconds > 0
    calls = []
    step = compiled._one_row
    compiled._one_row = lambda *a: calls.append(a) or step(*a)
    try:
        for prompt, n in GREEDY:  # some run past the 16-token window
            eager = Batcher(engine, max_rows=4, start=False)
            want = run_schedule(eager, {0: [dict(prompt=prompt, max_new_tokens=n, temperature=0,
                                                 stop_at_eos=False, logprobs=1)]})[0]
            got = run_schedule(compiled, {0: [dict(prompt=prompt, max_new_tokens=n, temperature=0,
                                                   stop_at_eos=False, logprobs=1)]})[0]
            (want_ids, want_lp), (got_ids, got_lp) = tokens_and_logprobs(want), tokens_and_logprobs(got)
            assert got_ids == want_ids, prompt
            torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0,
                                       atol=1e-4)
    finally:
        compiled._one_row = step
    assert len(calls) >= sum(n - 1 for _, n in GREEDY)  # the compiled step really decoded them


def test_rows_joining_and_leaving_switch_between_compiled_and_eager_steps(engine, compiled):
    # one row alone (compiled), then three (eager), then the longest alone again (compiled)
    schedule = {0: [dict(prompt="ggfedcba\n", max_new_tokens=40, temperature=0, stop_at_eos=False)],
                4: [dict(prompt="a", max_new_tokens=6, temperature=0, stop_at_eos=False),
                    dict(prompt="hhh", max_new_tokens=9, temperature=0.9, seed=2)]}
    eager = Batcher(engine, max_rows=4, start=False)
    want = [tokens_and_logprobs(r)[0] for r in run_schedule(eager, schedule)]
    got = [tokens_and_logprobs(r)[0] for r in run_schedule(compiled, schedule)]
    assert got == want
    assert compiled.rows_in_use == 0 and not compiled.rows


def test_a_step_that_cannot_be_compiled_is_one_clear_error(engine, monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(CompileError) as e:
        Batcher(engine, max_rows=2, start=False, compile=True)
    message = str(e.value)
    assert "\n" not in message and "No working C++ compiler" in message and "--compile" in message
