"""`train(...)` -> summary: the one entry point of training (`minigpt.train`, the CLI, the tests).

It resolves the config (or the run's own, on resume), picks the backend (torch, or the NumPy
reference), claims and sets up the run directory (setup.py) on rank 0 first, then runs the loop
(trainer.py) in this process or in each torchrun rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import rundir
from ..config import load_toml, resolve
from ..data.dataset import load_prepared
from ..errors import ConfigError
from ..interop.init_from import init_config, model_for_run, source_again
from ..reference.trainer import ReferenceTrainer, check_reference_config
from . import distributed
from .setup import resume_config, set_up_run
from .tracking import check_backends
from .trainer import Trainer


def train(
    preset: str | None = None,
    config_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a GPT. Keyword overrides use the config names: `train(data="x.txt", max_iters=500)`.

    `init_from=SRC` starts from existing weights (a run, a Hugging Face GPT-2 directory, a Hub
    name) with the fine-tuning defaults of config.FINETUNE_DEFAULTS; docs/finetune.md."""
    source = None
    if resume:
        mcfg, tcfg = resume_config(preset, config_file, overrides)
    elif _wants_init_from(config_file, overrides):
        mcfg, tcfg, source = init_config(config_file, {**overrides, "preset": preset})
    else:
        mcfg, tcfg = resolve(preset, config_file, overrides)
        if mcfg.lora_rank:  # (bench train times adapters on a fresh model: no weights needed there)
            raise ConfigError("--lora-rank trains adapters on an existing model: give "
                              "--init-from RUN")
    check_backends(tcfg.log)  # a missing tracker package: one line, before --out is touched
    reference = tcfg.backend == "reference"
    if reference:  # NumPy backend: refuse what it cannot do before touching --out
        check_reference_config(mcfg, tcfg)
    run_dir = Path(tcfg.out)
    # a run killed before its first checkpoint starts again from step 0: there is nothing to lose
    from_checkpoint = resume and bool(ckpt.list_checkpoints(run_dir))
    if resume and not from_checkpoint and tcfg.init_from:  # killed before it saved step 0
        source = source_again(tcfg)
        model_for_run(source, {"block_size": mcfg.block_size, "dropout": mcfg.dropout})
    tokenizer = source.tokenizer if source else None
    if resume and tcfg.init_from and tokenizer is None:  # its data, if re-made, speaks SRC's vocabulary
        tokenizer = rundir.read_tokenizer(run_dir)
    with distributed.session(tcfg.device) as dist:  # one process, or one rank under torchrun
        if dist.distributed and reference:
            raise ConfigError("the reference backend trains in one process; start it without torchrun")
        data_dir, tcfg = dist.main_first(lambda: set_up_run(mcfg, tcfg, run_dir, resume,
                                                            from_checkpoint, overwrite, progress,
                                                            tokenizer))
        data = load_prepared(data_dir)
        mcfg = dataclasses.replace(mcfg, vocab_size=data.tokenizer.vocab_size)
        if reference:
            return ReferenceTrainer(mcfg, tcfg, data, run_dir, progress).run(from_checkpoint)
        return Trainer(mcfg, tcfg, data, run_dir, progress, dist,
                       initial_state=source.state if source else None).run(from_checkpoint)


def _wants_init_from(config_file: str | Path | None, overrides: dict[str, Any]) -> bool:
    if overrides.get("init_from") is not None:
        return True
    return bool(config_file) and load_toml(config_file).get("init_from") is not None
