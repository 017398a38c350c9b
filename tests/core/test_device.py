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


def test_a_split_goes_to_the_gpu_only_when_it_fits(monkeypatch):
    """The training images live on the GPU when they take at most half its free memory; else they stay
    on the host, page-locked, and batches travel asynchronously. (The CUDA calls are stood in for.)"""
    from pneumo.core.device import hold

    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a[0]) or self)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: moved.append("pinned") or self)
    images = [torch.zeros(1000, dtype=torch.uint8), torch.zeros(10, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    hold(images, CUDA)
    assert moved == [CUDA, CUDA]
    moved.clear()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_500, 80_000))
    hold(images, CUDA)
    assert moved == ["pinned", "pinned"]
    moved.clear()
    assert hold(images, torch.device("cpu")) == images and moved == []


def test_training_on_cuda_asks_for_reproducible_kernels(monkeypatch):
    from pneumo.core.device import reproducible

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    reproducible(torch.device("cpu"))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    reproducible(CUDA)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
