"""Training augmentation on whole batches, on whatever device the batch is on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo.config import AugmentConfig


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, global_batch: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
    """Random geometry (rotation, zoom, aspect, shift, mirror), blur, exposure (gamma, brightness,
    contrast) and erasing of one rectangle, drawn per image.

    `x` is (B, 1, H, W) in [0, 1]. Random numbers come from `gen` on the CPU, so a run draws the same
    augmentations on any device and a resumed run continues the same stream. In distributed training
    `x` holds the `rows` of a batch of `global_batch` images: every process draws for the whole batch
    and keeps its rows, so each image is augmented as in a single process and the generators agree.
    Settings at 0 draw nothing, so adding a new kind of augmentation leaves older recipes unchanged.
    """
    b = global_batch or x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + torch.rand(b, generator=gen, dtype=torch.float64) * (hi - lo))[rows]

    def symmetric(scale: float) -> torch.Tensor:
        return ((torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1) * scale)[rows]

    def chance(p: float) -> torch.Tensor:
        return uniform(0, 1) < p if p else torch.zeros(len(range(b)[rows]), dtype=torch.bool)

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.device, x.dtype).view(-1, 1, 1, 1)

    # The grid samples the input at R(angle) @ diag(mirror / sx, 1 / sy) @ (output position) + shift:
    # the image is magnified sx times across and sy times down (the stretch widens and flattens it).
    angle = symmetric(math.radians(cfg.rotate_deg))
    zoom = 1 + symmetric(cfg.scale)
    stretch = torch.exp(symmetric(math.log1p(cfg.aspect))) if cfg.aspect else torch.ones_like(zoom)
    mirror = 1 - 2 * chance(cfg.hflip).double()
    # affine_grid works in [-1, 1] coordinates, so a shift of `translate` of the width is 2 * translate.
    shift_x, shift_y = symmetric(2 * cfg.translate), symmetric(2 * cfg.translate)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = zoom * stretch, zoom / stretch
    theta = torch.stack([torch.stack([cos * mirror / sx, -sin / sy, shift_x], 1), torch.stack([sin * mirror / sx, cos / sy, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if cfg.blur:
        x = gaussian_blur(x, uniform(0, cfg.blur))
    if cfg.gamma:
        x = x.clamp(0, 1) ** per_image(torch.exp(symmetric(cfg.gamma)))
    contrast = per_image(1 + symmetric(cfg.contrast))
    brightness = per_image(symmetric(cfg.brightness))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp_(0, 1)

    if cfg.erase:
        x = _erase(x, chance(cfg.erase), uniform(0.02, 0.2), torch.exp(symmetric(math.log(3))), uniform(0, 1), uniform(0, 1))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma (pixels) per image: a separable, grouped convolution."""
    b, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.device, x.dtype)
    y = F.pad(x.reshape(1, b, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, kernel.view(b, 1, -1, 1), groups=b)
    return y.reshape(b, 1, h, w).contiguous(memory_format=torch.channels_last)


def _erase(x: torch.Tensor, apply: torch.Tensor, area: torch.Tensor, ratio: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Fill one rectangle per chosen image (`area` of the image, width/height `ratio`, centred at
    (`cx`, `cy`) in [0, 1], clipped at the border) with that image's mean."""
    h, w = x.shape[-2:]
    # Only the per-image numbers travel to the device; the (B, H, W) mask is built there.
    area, ratio, cx, cy, apply = (v.to(x.device) for v in (area, ratio, cx, cy, apply))
    half_w = (area * ratio).sqrt() / 2
    half_h = (area / ratio).sqrt() / 2

    def inside(centre, half, n):
        pos = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
        return (pos[None, :] - centre[:, None]).abs() < half[:, None]

    mask = inside(cy, half_h, h)[:, :, None] & inside(cx, half_w, w)[:, None, :] & apply[:, None, None]
    return torch.where(mask[:, None], x.mean(dim=(1, 2, 3), keepdim=True), x)
