"""Old runs keep working: a run directory written by minigpt 0.1.0 (tests/fixtures/run-0.1.0, made
before the package was reorganised, with `engine` in its config.json where today's key is
`backend`) shows `info`, samples exactly what 0.1.0 sampled, and resumes to the loss 0.1.0 reached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import minigpt
from minigpt import checkpoint as ckpt
from minigpt import rundir
from minigpt.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_RUN = FIXTURES / "run-0.1.0"
EXPECTED = json.loads((FIXTURES / "run-0.1.0.expected.json").read_text())


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run-0.1.0"
    shutil.copytree(OLD_RUN, run)
    return run


def test_the_old_config_key_is_read_under_its_new_name():
    assert json.loads((OLD_RUN / "config.json").read_text())["train"]["engine"] == "torch"
    _, tcfg = rundir.read_config(OLD_RUN)
    assert tcfg.backend == "torch"


def test_an_old_run_samples_what_it_sampled_before():
    engine = minigpt.load(OLD_RUN)
    assert engine.generate("All:", max_new_tokens=40, temperature=0.8, seed=3) == \
        EXPECTED["sample_all_t08_seed3_40"]
    assert engine.generate("All:", max_new_tokens=40, temperature=0) == EXPECTED["greedy_all_40"]


def test_an_old_run_shows_info(old_run):
    from minigpt.tools.info import format_run_info, run_info

    info = run_info(old_run)
    assert (info["step"], info["best_step"], info["checkpoints"]) == (4, 4, [2, 4])
    assert "best val loss:  3.5375 at step 4" in format_run_info(info)


def test_an_old_run_resumes_to_the_loss_it_reached_before(old_run):
    summary = minigpt.train(out=str(old_run), resume=True, max_iters=6, progress=False)
    assert summary["step"] == 6
    assert summary["best_val_loss"] == pytest.approx(EXPECTED["resume_to_6_best_val_loss"], abs=1e-6)
    # the resumed run records today's key names
    assert json.loads((old_run / "config.json").read_text())["train"]["backend"] == "torch"


def test_a_checkpoint_from_a_newer_minigpt_is_refused_in_one_line(old_run):
    meta_path = old_run / "checkpoints" / "step-0000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = rundir.FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer than this minigpt reads") as e:
        ckpt.verify_checkpoint(meta_path.parent)
    assert "\n" not in str(e.value)


def test_prepared_data_from_a_newer_minigpt_is_refused(old_run):
    from minigpt.data.dataset import load_prepared

    meta_path = old_run / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = rundir.FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade minigpt"):
        load_prepared(old_run / "data")
