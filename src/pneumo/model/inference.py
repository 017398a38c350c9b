"""Batched inference: the model's logits and probabilities for a split of uint8 images, and the
descriptors the applicability check scores, in the same pass."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pneumo.core.device import to_input
from pneumo.core.progress import batches
from pneumo.cpu.loader import inference_threads
from pneumo.model.applicability import Applicability, describe


def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, desc: str = "predicting"
) -> np.ndarray:
    """Probabilities of pneumonia for uint8 images (N, H, W)."""
    return torch.sigmoid(torch.from_numpy(logits(model, images, batch_size, device, desc))).numpy()


@torch.inference_mode()
def logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, desc: str = "predicting"
) -> np.ndarray:
    """The model's logits (float64) for uint8 images (N, H, W)."""
    model.eval()
    out = []
    for part in _batches(len(images), batch_size, device, desc):
        x = to_input(images[part], device)
        out.append(model(x).float().cpu())  # float32 on every device (see core.device.autocast)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


@torch.inference_mode()
def described(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, desc: str = "describing"
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """The logits (float64) of a `Classifier` for uint8 images (N, H, W), and their descriptors
    (`applicability.describe`), from one pass."""
    model.eval()
    out, parts = [], []
    for part in _batches(len(images), batch_size, device, desc):
        x, features = to_input(images[part], device), []
        out.append(model(x, features).float().cpu())
        parts.append(describe(x, features))
    descriptors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return (torch.cat(out).double().numpy() if out else np.zeros(0)), descriptors


def _batches(n: int, batch_size: int, device: torch.device, desc: str) -> Iterator[slice]:
    """`batches`, with torch's CPU threads following the machine's load (`cpu.loader.inference_threads`)."""
    with inference_threads() as follow:
        for part in batches(n, batch_size, desc):
            if device.type == "cpu":
                follow()
            yield part


def scored(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, check: Applicability, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """The logits and the applicability scores (higher: less like the training images) of `images`."""
    logits_, descriptors = described(model, images, batch_size, device, desc)
    return logits_, (check.score(descriptors).numpy() if len(logits_) else np.zeros(0))
