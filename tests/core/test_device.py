"""Where and in what precision the arithmetic runs (pneumo.core.device), GPU branches included: the
CUDA queries are stood in for, so the decisions are checked on any machine."""

import pytest
import torch

from pneumo.core import device as device_module
from pneumo.core.device import autocast, resolve_device, training_dtype
from pneumo.core.errors import PneumoError

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU of a given compute capability."""

    def make(capability: tuple[int, int], name: str = "a GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return make


def test_bf16_training_only_on_gpus_that_compute_in_it(gpu):
    gpu((9, 0), "NVIDIA H100 80GB HBM3")
    assert training_dtype("auto", CUDA) == torch.bfloat16
    gpu((7, 5), "Tesla T4")  # emulated bf16: float32 instead, and bf16 asked for is the user's error
    assert training_dtype("auto", CUDA) == torch.float32
    assert training_dtype("fp32", CUDA) == torch.float32
    with pytest.raises(PneumoError, match="Tesla T4 has no bf16"):
        training_dtype("bf16", CUDA)


def test_a_cpu_trains_in_bf16_only_with_amx(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_amx", lambda: False)
    assert training_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(device_module, "cpu_has_amx", lambda: True)
    assert training_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_float32_never_autocasts():
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_one_sentence():
    with pytest.raises(PneumoError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
