"""Batched inference: the model's logits and probabilities for a split of uint8 images."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo.core.device import to_input
from pneumo.core.progress import batches


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
    for part in batches(len(images), batch_size, desc):
        x = to_input(images[part], device)
        out.append(model(x).float().cpu())  # float32 on every device (see core.device.autocast)
    return torch.cat(out).double().numpy() if out else np.zeros(0)
