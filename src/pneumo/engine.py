"""One training epoch and batched prediction, on CUDA (bf16, channels_last) or the CPU."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from pneumo.config import AugmentConfig
from pneumo.data.augment import augment
from pneumo.errors import PneumoError
from pneumo.progress import progress


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoError(f"device 'cuda' was asked for, but torch {torch.__version__} sees no CUDA GPU here (use device: auto or cpu)")
    return torch.device(name)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last lets cuDNN use tensor cores and, measured on a 2-core CPU, speeds training by ~40%.
    return model.to(device, memory_format=torch.channels_last)


def to_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1] on `device`, channels_last."""
    x = batch.to(device, non_blocking=True).unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    batch_size: int,
    aug: AugmentConfig,
    gen: torch.Generator,
    device: torch.device,
    desc: str,
) -> float:
    """Train on every image once, in an order drawn from `gen`; return the mean loss."""
    model.train()
    order = torch.randperm(len(labels), generator=gen)
    steps = math.ceil(len(labels) / batch_size)
    total, seen = torch.zeros((), device=device), 0
    for step in progress(range(steps), total=steps, desc=desc, unit="batch"):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = to_input(images[idx], device)
        y = labels[idx].to(device, non_blocking=True).float()
        if aug.enabled:
            x = augment(x, aug, gen)
        with autocast(device):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: a .item() per step would make the GPU wait for the host.
        total += loss.detach() * len(idx)
        seen += len(idx)
    return float(total) / seen


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, desc: str = "predicting") -> np.ndarray:
    """Probabilities of pneumonia for uint8 images (N, H, W)."""
    model.eval()
    steps = math.ceil(len(images) / batch_size)
    out = []
    for step in progress(range(steps), total=steps, desc=desc, unit="batch"):
        x = to_input(images[step * batch_size : (step + 1) * batch_size], device)
        with autocast(device):
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)
