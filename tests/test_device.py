"""Device and dtype choice, autocast, loss scaling and TF32: the same functions on every device type.

What the machine has (CUDA, bf16 support, MPS) is mocked only to steer the choice; everything that
computes runs for real on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from minigpt import device as dev
from minigpt.errors import ConfigError
from minigpt.training.distributed import rank_device, torchrun_env


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with (or without) CUDA / bf16 / MPS."""

    def set_up(cuda=False, gpus=1, bf16=True, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(dev, "_mps_available", lambda: mps)

    return set_up


def test_auto_device_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=True, mps=True)
    assert dev.resolve_device("auto") == torch.device("cuda")
    machine(cuda=False, mps=True)
    assert dev.resolve_device("auto") == torch.device("mps")
    machine(cuda=False, mps=False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")


def test_explicit_devices_are_checked_against_the_machine(machine):
    machine(cuda=True, gpus=2)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 GPU"):
        dev.resolve_device("cuda:2")
    machine(cuda=False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match="mps"):
        dev.resolve_device("mps")
    with pytest.raises(ConfigError, match="unknown device"):
        dev.resolve_device("gpu0")


def test_auto_dtype_is_bf16_on_capable_gpus_fp16_on_older_ones_fp32_elsewhere(machine):
    machine(cuda=True, bf16=True)
    assert dev.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    machine(cuda=True, bf16=False)
    assert dev.resolve_dtype("auto", torch.device("cuda")) is torch.float16
    assert dev.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert dev.resolve_dtype("auto", torch.device("mps")) is torch.float32


def test_explicit_dtypes(machine):
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("bfloat16", cpu) is torch.bfloat16  # CPU autocast exists: honoured
    assert dev.resolve_dtype("float16", cpu) is torch.float16
    assert dev.resolve_dtype("FLOAT32", cpu) is torch.float32
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        dev.resolve_dtype("fp8", cpu)
    machine(cuda=True, bf16=False)
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        dev.resolve_dtype("bfloat16", torch.device("cuda"))


def test_autocast_runs_matmuls_in_the_chosen_dtype_and_float32_disables_it():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for dtype in (torch.bfloat16, torch.float16):
        with dev.autocast(cpu, dtype):
            assert (a @ b).dtype is dtype
    with dev.autocast(cpu, torch.float32):
        assert (a @ b).dtype is torch.float32


def test_grad_scaler_only_for_float16():
    cpu = torch.device("cpu")
    assert dev.grad_scaler(cpu, torch.float16).is_enabled()
    assert not dev.grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not dev.grad_scaler(cpu, torch.float32).is_enabled()


def test_float16_scaler_skips_a_step_whose_gradients_overflowed():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scaler = dev.grad_scaler(torch.device("cpu"), torch.float16)
    scale = scaler.get_scale()
    scaler.scale((p * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3))  # weights untouched
    assert scaler.get_scale() < scale  # and the scale backed off


def test_tf32_is_enabled_for_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        dev.enable_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        dev.enable_tf32(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # torch.compile reads this
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_torchrun_environment(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_env() == (0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert torchrun_env() == (3, 1, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="inconsistent torchrun"):
        torchrun_env()


def test_each_rank_gets_its_own_gpu(machine):
    machine(cuda=True, gpus=4)
    assert rank_device("auto", local_rank=2, world_size=4) == torch.device("cuda", 2)
    assert rank_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 3)
    assert rank_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:1", local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="only 4 GPU"):
        rank_device("cuda", local_rank=4, world_size=8)
    machine(cuda=False)
    assert rank_device("auto", local_rank=1, world_size=2) == torch.device("cpu")
