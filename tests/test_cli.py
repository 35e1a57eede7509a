import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SRC, TINY, cli_flags, run_cli

TRAIN_FLAGS = cli_flags(**{k: v for k, v in TINY.items()})


def test_prepare_train_sample_info_plot_end_to_end(corpus_file, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    out = run_cli("prepare", str(corpus_file), "--out", str(data), check=True).stdout
    assert "train" in out and (data / "train.bin").exists()
    run_cli("train", "--data", str(data), "--out", str(run), "--max-iters", "20",
            "--eval-interval", "10", "--quiet", *TRAIN_FLAGS, check=True)
    sample = run_cli("sample", str(run), "--prompt", "All:", "--max-new-tokens", "40", "--seed", "1",
                     check=True).stdout
    assert sample.startswith("All:") and len(sample) > len("All:") + 10
    again = run_cli("sample", str(run), "--prompt", "All:", "--max-new-tokens", "40", "--seed", "1").stdout
    assert again == sample
    info = json.loads(run_cli("info", str(run), "--json", check=True).stdout)
    assert info["step"] == 20 and info["best_val_loss"] is not None and info["params"] > 0
    assert 0 < info["best_val_bpb"] < 8  # bits per byte of the best step, from the metrics log
    assert f"({info['best_val_bpb']:.4f} bits per byte)" in run_cli("info", str(run), check=True).stdout
    presets = run_cli("info", check=True).stdout
    assert "small" in presets and "812,800" in presets
    run_cli("plot", str(run), "--out", str(tmp_path / "loss.png"), check=True)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    run_cli("plot", str(run), "--metric", "bpb", "--out", str(tmp_path / "bpb.png"), check=True)
    assert (tmp_path / "bpb.png").read_bytes()[:4] == b"\x89PNG"
    (run / "metrics.jsonl").write_text('{"iter": 1, "train_loss": 2.0}\n')  # a log without bpb
    failed = run_cli("plot", str(run), "--metric", "bpb", "--out", str(tmp_path / "none.png"))
    assert failed.returncode == 1 and failed.stderr.startswith("minigpt: error: no bpb values")
    assert not (tmp_path / "none.png").exists()


def test_train_from_raw_text_file_and_a_toml_config(corpus_file, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('max_iters = 8\neval_interval = 4\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
                   'block_size = 16\nbatch_size = 4\nsample_tokens = 0\n')
    run = tmp_path / "run"
    run_cli("train", "--data", str(corpus_file), "--out", str(run), "--config", str(cfg), "--quiet",
            "--n-embd", "32", check=True)
    conf = json.loads((run / "config.json").read_text())
    assert conf["model"]["n_layer"] == 1 and conf["model"]["n_embd"] == 32  # flag beats file
    assert conf["train"]["max_iters"] == 8 and (run / "data" / "train.bin").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(corpus_file, tmp_path, stop):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt", "train", "--data", str(corpus_file), "--out", str(run),
         "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1", "--quiet",
         *cli_flags(**{k: v for k, v in TINY.items() if k != "eval_iters"})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    steps = [int(line.split('"iter": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and int(saved[0].name[5:]) >= steps[-1]
    run_cli("train", "--out", str(run), "--resume", "--max-iters", str(int(saved[0].name[5:]) + 3),
            "--quiet", check=True)
    assert sorted((run / "checkpoints").glob("step-*"))[-1].name == f"step-{int(saved[0].name[5:]) + 3:07d}"
