import pytest
import torch

from minigpt.errors import ConfigError
from minigpt.sampling import (
    RowSettings,
    SamplingParams,
    choose_tokens,
    distribution,
    sample_next_token,
)


def filter_logits(logits, **settings):
    """Every row's logits with `settings` at temperature 1: what the filters keep."""
    params = SamplingParams(temperature=1.0, **settings)
    return distribution(logits, RowSettings.of([params] * len(logits), logits.size(-1)))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    assert sample_next_token(logits, None, temperature=0).tolist() == [1, 0]


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]
    # the most likely token always survives, however small p is
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.01)).tolist() == [[True, False, False, False]]


def test_same_seed_same_tokens_and_masked_tokens_never_drawn():
    logits = torch.randn(4, 30)
    draw = [sample_next_token(logits, torch.Generator().manual_seed(5), 1.0, top_k=3) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    top3 = torch.topk(logits, 3).indices
    assert all(draw[0][i] in top3[i] for i in range(4))


@pytest.mark.parametrize("settings", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0),
                                      dict(top_p=1.5), dict(max_new_tokens=0), dict(num_samples=0)])
def test_impossible_sampling_settings_are_refused(settings):
    with pytest.raises(ConfigError):
        SamplingParams(**settings).validate()
    with pytest.raises(ConfigError):  # and a copy with a bad setting, as the entry points make
        SamplingParams().replace(**settings)


def test_one_sampling_default_for_every_entry_point():
    """The CLI, the Python API, the trainer's sample and the server all start from SamplingParams."""
    from minigpt.cli import build_parser
    from minigpt.serve.openai_api import CompletionRequest

    args = build_parser().parse_args(["sample", "run"])
    assert args.temperature is None  # not given: SamplingParams' default applies
    assert CompletionRequest(prompts=[""]).sampling().temperature == SamplingParams().temperature == 0.8


def test_rows_with_different_settings_choose_in_one_call_as_each_would_alone():
    """The batch's per-row settings: each row's token and distribution equal that row sampled on
    its own with its own settings and uniform."""
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=4),
              SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(temperature=0.9),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.8)]
    u = torch.rand(5, 1)
    together = RowSettings.of(params, 40)
    x = distribution(logits, together)
    tokens = choose_tokens(x, together, u)
    for i, p in enumerate(params):
        alone = RowSettings.of([p], 40)
        xi = distribution(logits[i : i + 1], alone)
        assert torch.equal(x[i : i + 1], xi)
        assert tokens[i] == choose_tokens(xi, alone, None if alone.all_greedy else u[i : i + 1])[0]
    assert tokens[0] == logits[0].argmax()
    assert torch.isfinite(x[1]).sum() == 4 and torch.isfinite(x[0]).all()
