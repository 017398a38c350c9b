"""Training augmentation on whole batches, on whatever device the batch is on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo.core.config import AugmentConfig
from pneumo.core.device import to_device


def augment(
    x: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    global_batch: int | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Random geometry (rotation, zoom, aspect, shift, mirror), detail (blur, sharpening), exposure
    (gamma, brightness, contrast), sensor noise and erasing of one rectangle, drawn per image.

    `x` is (B, 1, H, W) in [0, 1]. Random numbers come from `gen` on the CPU, so a run draws the same
    augmentations on any device and a resumed run continues the same stream. In distributed training
    `x` holds the `rows` of a batch of `global_batch` images: every process draws for the whole batch
    and keeps its rows, so each image is augmented as in a single process and the generators agree.
    Settings at 0 draw nothing, so adding a new kind of augmentation leaves older recipes unchanged.
    """
    draw = Draws(gen, global_batch or x.shape[0], rows)
    x = _geometry(x, cfg, draw)
    x = _detail(x, cfg, draw)
    x = _exposure(x, cfg, draw)
    if cfg.noise:
        x = _noise(x, draw.uniform(0, cfg.noise), draw)
    if cfg.erase:
        apply = draw.chance(cfg.erase)
        area, ratio = draw.uniform(0.02, 0.2), torch.exp(draw.symmetric(math.log(3)))
        x = _erase(x, apply, area, ratio, draw.uniform(0, 1), draw.uniform(0, 1))
    return x


class Draws:
    """Per-image random numbers for a global batch of `b` images, of which `rows` are kept."""

    def __init__(self, gen: torch.Generator, b: int, rows: slice):
        self.gen, self.b, self.rows = gen, b, rows

    def uniform(self, lo: float, hi: float) -> torch.Tensor:
        return (lo + torch.rand(self.b, generator=self.gen, dtype=torch.float64) * (hi - lo))[self.rows]

    def symmetric(self, scale: float) -> torch.Tensor:
        return ((torch.rand(self.b, generator=self.gen, dtype=torch.float64) * 2 - 1) * scale)[self.rows]

    def chance(self, p: float) -> torch.Tensor:
        return self.uniform(0, 1) < p if p else torch.zeros(len(range(self.b)[self.rows]), dtype=torch.bool)

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.gen))


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _beside(v, x, x.dtype).view(-1, 1, 1, 1)


def _beside(v: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Numbers drawn on the host, on x's device (asynchronously on CUDA: a step draws many)."""
    return to_device(v.to(dtype) if dtype is not None else v, x.device)


def _geometry(x: torch.Tensor, cfg: AugmentConfig, draw: Draws) -> torch.Tensor:
    # The grid samples the input at R(angle) @ diag(mirror / sx, 1 / sy) @ (output position) + shift:
    # the image is magnified sx times across and sy times down (the stretch widens and flattens it).
    angle = draw.symmetric(math.radians(cfg.rotate_deg))
    zoom = 1 + draw.symmetric(cfg.scale)
    stretch = torch.exp(draw.symmetric(math.log1p(cfg.aspect))) if cfg.aspect else torch.ones_like(zoom)
    mirror = 1 - 2 * draw.chance(cfg.hflip).double()
    # affine_grid works in [-1, 1] coordinates, so a shift of `translate` of the width is 2 * translate.
    shift_x, shift_y = draw.symmetric(2 * cfg.translate), draw.symmetric(2 * cfg.translate)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = zoom * stretch, zoom / stretch
    row_x = torch.stack([cos * mirror / sx, -sin / sy, shift_x], 1)
    row_y = torch.stack([sin * mirror / sx, cos / sy, shift_y], 1)
    grid = affine_grid(torch.stack([row_x, row_y], 1), x)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def affine_grid(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F.affine_grid(theta, x.shape, align_corners=False), built as the sum of a per-row and a per-column
    term. F.affine_grid multiplies every output position by theta in a batched matrix product with an
    inner dimension of 3, which dominated the augmentation's time on CPUs; the per-row and per-column
    terms are computed in float64 from the float64 `theta`, so the grid is as accurate or better."""
    b, _, h, w = x.shape
    across = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    down = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    grid = torch.empty(b, h, w, 2, device=x.device, dtype=x.dtype)
    for k in range(2):  # k = 0: the x coordinate sampled, k = 1: the y coordinate
        col = _beside(theta[:, k, 0, None] * across, x, x.dtype)
        row = _beside(theta[:, k, 1, None] * down + theta[:, k, 2, None], x, x.dtype)
        torch.add(row[:, :, None], col[:, None, :], out=grid[..., k])
    return grid


def _detail(x: torch.Tensor, cfg: AugmentConfig, draw: Draws) -> torch.Tensor:
    """Less or more fine detail than the image holds, as another resolution or another site's edge
    enhancement would give: a Gaussian blur, then an unsharp mask of random strength."""
    if cfg.blur:
        x = gaussian_blur(x, draw.uniform(0, cfg.blur))
    if cfg.sharpen:
        amount = _per_image(draw.uniform(0, cfg.sharpen), x)
        # x + amount * (x - blurred), as (1 + amount) * x - amount * blurred in two passes
        blurred = gaussian_blur(x, torch.ones(x.shape[0], dtype=torch.float64))
        x = blurred.mul_(-amount).addcmul_(x, 1 + amount)
    return x


def _exposure(x: torch.Tensor, cfg: AugmentConfig, draw: Draws) -> torch.Tensor:
    if cfg.gamma:
        # x ** gamma as exp(gamma * log x), which vectorizes where pow with a tensor exponent does not;
        # log 0 = -inf keeps 0 ** gamma = 0.
        x = x.clamp(0, 1).log_().mul_(_per_image(torch.exp(draw.symmetric(cfg.gamma)), x)).exp_()
    contrast = _per_image(1 + draw.symmetric(cfg.contrast), x)
    brightness = _per_image(draw.symmetric(cfg.brightness), x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    # (x - mean) * contrast + mean + brightness, in one pass over the pixels
    return torch.addcmul(mean * (1 - contrast) + brightness, x, contrast).clamp_(0, 1)


def _noise(x: torch.Tensor, sigma: torch.Tensor, draw: Draws) -> torch.Tensor:
    """Gaussian sensor noise of standard deviation `sigma` per image. The noise field is drawn on the
    batch's device, from a seed drawn from the run's generator: only one number crosses from the host."""
    seed = draw.seed()
    device_gen = torch.Generator(x.device).manual_seed(seed)
    field = torch.randn((draw.b, *x.shape[1:]), generator=device_gen, device=x.device, dtype=x.dtype)[draw.rows]
    return torch.addcmul(x, field, _per_image(sigma, x)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma (pixels) per image: a separable, grouped convolution."""
    b, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = _beside(kernel / kernel.sum(1, keepdim=True), x, x.dtype)
    y = F.pad(x.reshape(1, b, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(y, kernel.view(b, 1, -1, 1), groups=b)
    return y.reshape(b, 1, h, w).contiguous(memory_format=torch.channels_last)


def _erase(
    x: torch.Tensor, apply: torch.Tensor, area: torch.Tensor, ratio: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor
) -> torch.Tensor:
    """Fill one rectangle per chosen image (`area` of the image, width/height `ratio`, centred at
    (`cx`, `cy`) in [0, 1], clipped at the border) with that image's mean."""
    h, w = x.shape[-2:]
    # Only the per-image numbers travel to the device; the (B, H, W) mask is built there.
    area, ratio, cx, cy, apply = (_beside(v, x) for v in (area, ratio, cx, cy, apply))
    half_w = (area * ratio).sqrt() / 2
    half_h = (area / ratio).sqrt() / 2

    def inside(centre, half, n):
        pos = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
        return (pos[None, :] - centre[:, None]).abs() < half[:, None]

    rows = inside(cy, half_h, h) & apply[:, None]
    mask = rows[:, None, :, None] & inside(cx, half_w, w)[:, None, None, :]
    return torch.where(mask, x.mean(dim=(1, 2, 3), keepdim=True), x)
