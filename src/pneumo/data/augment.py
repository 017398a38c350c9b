"""Training augmentation on whole batches, on whatever device the batch is on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo.config import AugmentConfig


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, global_batch: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Random small affine (rotation, scale, shift) and brightness/contrast, per image.

    `x` is (B, 1, H, W) in [0, 1]. Random numbers come from `gen` on the CPU, so a run draws the same
    augmentations on any device and a resumed run continues the same stream. In distributed training
    `x` holds the `rows` of a batch of `global_batch` images: every process draws for the whole batch
    and keeps its rows, so each image is augmented as in a single process and the generators agree.
    """
    b = global_batch or x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return ((torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1) * scale)[rows]

    angle = uniform(math.radians(cfg.rotate_deg))
    zoom = 1 + uniform(cfg.scale)
    # affine_grid works in [-1, 1] coordinates, so a shift of `translate` of the width is 2 * translate.
    shift_x, shift_y = uniform(2 * cfg.translate), uniform(2 * cfg.translate)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    contrast = (1 + uniform(cfg.contrast)).to(x.device, x.dtype).view(-1, 1, 1, 1)
    brightness = uniform(cfg.brightness).to(x.device, x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp_(0, 1)
