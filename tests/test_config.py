"""Settings precedence (defaults < preset < backend defaults < TOML file < flags) for new, resumed
and fine-tuning runs, and the one check of every declared choice."""

from __future__ import annotations

import dataclasses

import pytest

from minigpt import rundir
from minigpt.config import (
    ModelConfig,
    ServeConfig,
    TrainConfig,
    resolve,
    resolve_finetune,
)
from minigpt.errors import ConfigError
from minigpt.training.setup import resume_config


def toml(tmp_path, text: str):
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_each_layer_overrides_the_one_below(tmp_path):
    file = toml(tmp_path, 'n_layer = 3\nlr = 0.5\nbackend = "reference"\noptimizer = "muon"\n')
    mcfg, tcfg = resolve("tiny", file, {"n_layer": 2, "lr": None})
    assert mcfg.n_embd == 32 and tcfg.batch_size == 32  # the preset's
    assert mcfg.arch == "gpt2"  # the reference backend's default, over the preset's modern
    assert tcfg.optimizer == "muon" and tcfg.lr == 0.5  # the file's, over backend and preset
    assert mcfg.n_layer == 2  # the flag's, over the file's; None means "not given"


def test_the_preset_flag_wins_over_the_files_preset_for_new_and_resumed_runs(tmp_path):
    file = toml(tmp_path, f'preset = "large"\nout = "{tmp_path / "run"}"\n')
    mcfg, tcfg = resolve("tiny", file)
    assert mcfg.n_layer == 1
    (tmp_path / "run").mkdir()
    rundir.write_config(tmp_path / "run", mcfg, tcfg)
    assert resume_config("tiny", file, {})[0] == mcfg  # tiny's model: no difference to refuse
    with pytest.raises(ConfigError, match="different model: .*n_layer 1 -> 12"):
        resume_config(None, file, {})  # the file's preset, large, when no flag names one


def test_resume_layers_the_file_and_flags_over_the_runs_own_config(tmp_path):
    mcfg, tcfg = resolve("tiny", overrides={"out": str(tmp_path / "run"), "max_iters": 7})
    (tmp_path / "run").mkdir()
    rundir.write_config(tmp_path / "run", mcfg, tcfg)
    file = toml(tmp_path, f'out = "{tmp_path / "run"}"\nlr = 0.01\nmax_iters = 9\n')
    _, resumed = resume_config(None, file, {"max_iters": 12})
    assert (resumed.lr, resumed.max_iters, resumed.batch_size) == (0.01, 12, tcfg.batch_size)


def test_finetuning_layers_the_file_and_flags_over_its_own_defaults(tmp_path):
    file = toml(tmp_path, "lr = 0.002\nmax_iters = 30\n")
    model, tcfg = resolve_finetune(file, {"max_iters": 40, "block_size": 8})
    assert (tcfg.lr, tcfg.max_iters, tcfg.optimizer, model) == (0.002, 40, "adamw", {"block_size": 8})


@pytest.mark.parametrize("settings, message", [
    (ModelConfig(arch="llama"), "--arch must be one of gpt2, modern, portable, stablelm; got 'llama'"),
    (ModelConfig(norm="batchnorm"), "--norm must be one of layernorm, rmsnorm; got 'batchnorm'"),
    (TrainConfig(optimizer="sgd"), "--optimizer must be one of adamw, muon; got 'sgd'"),
    (TrainConfig(backend="jax"), "--backend must be one of torch, reference; got 'jax'"),
    (TrainConfig(dtype="fp8"), "--dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"),
    (TrainConfig(docs="pages"), "--docs must be one of lines, blank, files; got 'pages'"),
    (TrainConfig(log="csv,tb"), "--log must be one of jsonl, tensorboard, wandb, csv; got 'tb'"),
])
def test_a_value_outside_the_declared_choices_is_one_line_naming_flag_and_choices(settings, message):
    with pytest.raises(ConfigError) as e:
        settings.validate()
    assert str(e.value) == message


def test_none_is_a_choice_only_where_it_is_the_default():
    TrainConfig(docs=None).validate()  # "one continuous stream"
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        dataclasses.replace(TrainConfig(), dtype=None).validate()



def test_serve_settings_are_checked_once_with_the_flag_names():
    assert ServeConfig().validate() == ServeConfig()
    for bad, message in ((dict(max_concurrency=0), "--max-concurrency must be >= 1, got 0"),
                         (dict(max_queue=-1), "--max-queue must be >= 0, got -1"),
                         (dict(port=70000), "--port must be between 0 and 65535, got 70000"),
                         (dict(stream_interval=-1.0), "--stream-interval must be >= 0, got -1.0"),
                         (dict(api_key=""), "the API key must not be empty")):
        with pytest.raises(ConfigError) as e:
            ServeConfig(**bad).validate()
        assert str(e.value) == message


def test_the_serve_flags_are_the_serve_configs_fields():
    from minigpt.cli import _config_overrides, build_parser

    args = build_parser().parse_args(["serve", "run"])
    assert ServeConfig(**_config_overrides(args, (ServeConfig,))) == ServeConfig()
    args = build_parser().parse_args(
        ["serve", "run", "--host", "0.0.0.0", "--port", "0", "--max-queue", "5",
         "--stream-interval", "0.01", "--max-body-bytes", "99", "--no-utf8-mask",
         "--chat-template", "t.json", "--max-tokens-limit", "8", "--max-concurrency", "2",
         "--api-key", "k"])
    assert ServeConfig(**_config_overrides(args, (ServeConfig,))) == ServeConfig(
        host="0.0.0.0", port=0, max_queue=5, stream_interval=0.01, max_body_bytes=99,
        utf8_mask=False, chat_template="t.json", max_tokens_limit=8, max_concurrency=2,
        api_key="k")
