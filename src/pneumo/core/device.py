"""Where and in what precision the arithmetic runs: CUDA or the CPU, bf16 or float32, memory layout."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from pneumo.core.errors import PneumoError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoError(
            f"device 'cuda' was asked for, but torch {torch.__version__} sees no CUDA GPU here (use "
            "device: auto or cpu)"
        )
    return torch.device(name)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last lets cuDNN use tensor cores, and oneDNN's CPU convolutions run faster in it too.
    return model.to(device, memory_format=torch.channels_last)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. From the host to CUDA the copy goes through page-locked memory, asynchronously:
    a plain copy would make the host wait for the GPU."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1] on `device`, channels_last."""
    x = to_device(batch, device).unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def reproducible(device: torch.device) -> None:
    """Choose reproducible kernels for training on `device`: on CUDA, cuDNN's deterministic algorithms
    and no autotuning (which picks kernels by timing, run to run). Some CUDA kernels still add in the
    order the GPU schedules them (adaptive pooling's backward), so GPU runs agree up to rounding."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def hold(tensors: list[torch.Tensor], device: torch.device, share: float = 0.5) -> list[torch.Tensor]:
    """`tensors` on `device` when together they take at most `share` of its free memory (the rest is for
    the model's activations), else on the host, page-locked on a CUDA machine so that batches copied
    from them travel asynchronously."""
    if device.type != "cuda":
        return tensors
    free, _ = torch.cuda.mem_get_info(device)
    if sum(t.nbytes for t in tensors) <= share * free:
        return [t.to(device) for t in tensors]
    return [t.pin_memory() for t in tensors]


def training_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training steps for train.precision on this device: bf16 where the hardware
    computes in it (a GPU that supports it, a CPU with AMX), float32 elsewhere."""
    bf16_native = gpu_has_bf16(device) if device.type == "cuda" else cpu_has_amx()
    if setting == "auto":
        return torch.bfloat16 if bf16_native else torch.float32
    if setting == "bf16" and device.type == "cuda" and not bf16_native:
        raise PneumoError(f"train.precision: bf16 was asked for, but {torch.cuda.get_device_name(device)} has no bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


def gpu_has_bf16(device: torch.device) -> bool:
    # bf16 arithmetic came with Ampere (compute capability 8.0); before it (V100, T4) it is emulated.
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_amx() -> bool:
    # Without AMX tiles, bf16 on a CPU is emulated and slower than float32.
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` for training steps; none for float32. Inference never autocasts: bf16 moved
    the shipped model's probabilities by up to 0.009, beyond what its tests allow."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
