"""The applicability check: how unlike a model's training images an image is (out-of-distribution
detection), so that a model can say when it is out of its depth.

Four descriptors of an image, each with a Gaussian fitted to the training images (Ledoit-Wolf
shrinkage) and scored by its squared Mahalanobis distance: the network's own features (each block's
output averaged over space, L2-normalized per block: Mahalanobis++, Mueller and Hein 2025), an 8x8
thumbnail (layout), a grey-level histogram (exposure) and histograms of band-pass magnitudes at
three scales (texture: the scanner's sharpness and the anatomy's fine structure). Each distance
becomes a p-value against validation, and Fisher's method combines them: a site can differ in any.
The threshold is the configured quantile of validation's combined scores. docs/new-site.md says
what it flags, and why these descriptors (measured).

A model adapted to another site also keeps where it came from (`origin`): fitted on a few hundred of
the site's images, its check alone would pass many images of the population it was adapted away from,
where it may rank no better than chance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo.core.errors import CheckpointError

THUMBNAIL, BINS = 8, 32
# Texture: |Laplacian| of the image averaged over 2x2, 4x4 and 8x8 blocks (a band-pass pyramid, as in
# Heeger and Bergen's texture statistics), in log-spaced bins from 1e-3 to 1. The finest band is left
# out: it holds the JPEG blocks of the 224x224 copies more than anything of the X-ray.
TEXTURE_SCALES, TEXTURE_BINS = (2, 4, 8), 16  # scales: powers of two, from the finest
# Descriptors every check has; a checkpoint from before the texture descriptor has only these.
REQUIRED = ("features", "thumbnail", "histogram")
# Descriptors of the image alone, not of a network's features: comparable across two networks' checks.
IMAGE_ONLY = ("thumbnail", "histogram", "texture")
FIELDS = ("mean", "precision", "reference")
MIN_P = 1e-6  # a p-value below any validation image's: keeps log(p) finite
TAIL = 5  # the fewest farthest validation distances the tail beyond them is fitted to


@dataclass
class Gaussian:
    """One descriptor's training distribution, and validation's distances from it (sorted)."""

    mean: torch.Tensor
    precision: torch.Tensor
    reference: torch.Tensor

    @classmethod
    def fit(cls, train: torch.Tensor, val: torch.Tensor) -> Gaussian:
        from sklearn.covariance import LedoitWolf

        x = train.double().numpy()
        mean, precision = torch.from_numpy(x.mean(0)), torch.from_numpy(LedoitWolf().fit(x).precision_)
        fitted = cls(mean, precision, torch.zeros(0, dtype=torch.float64))
        return cls(mean, precision, fitted.distance(val).sort().values)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        d = x.double() - self.mean
        return ((d @ self.precision) * d).sum(1)

    def p_value(self, x: torch.Tensor) -> torch.Tensor:
        """The share of validation images at least as far from the training images as each of `x`; beyond
        the farthest, that share (1 / (n + 1)) falls on along an exponential tail fitted to the farthest
        tenth (peaks over a threshold, the extreme-value model of gamma-like tails). Without the tail, a
        check whose validation is a few dozen images (a site's sample) could not tell an image just past
        them from one far beyond; past its farthest lie about 1 / (n + 1) of images like validation's."""
        d = self.distance(x)
        n = len(self.reference)
        p = (n + 1 - torch.searchsorted(self.reference, d)).double() / (n + 1)  # float64, as the distances
        if n > TAIL:
            top = self.reference[-max(TAIL, n // 10) - 1 :]
            scale = (top[1:] - top[0]).mean().clamp_min(1e-12)
            p = torch.where(d > top[-1], p * torch.exp(-(d - top[-1]) / scale), p)
        return p.clamp_min(MIN_P)


@dataclass
class Applicability:
    """The descriptors' Gaussians and the threshold on the combined score (higher: less like training);
    for an adapted model, the image-only Gaussians of the population it was adapted away from."""

    gaussians: dict[str, Gaussian]
    threshold: float
    quantile: float
    origin: dict[str, Gaussian] | None = None

    @classmethod
    def fit(cls, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], quantile: float) -> Applicability:
        """From the descriptors (`describe`) of the training and validation images."""
        gaussians = {name: Gaussian.fit(train[name], val[name]) for name in train}
        fitted = cls(gaussians, 0.0, quantile)
        threshold = float(torch.quantile(fitted.score(val), quantile))
        return cls(gaussians, threshold, quantile)

    def flags(self, scores):
        """Which scores are out of the model's scope: further than the threshold (NumPy or torch)."""
        return scores > self.threshold

    def leaving(self, origin: Applicability) -> Applicability:
        """This check, for a model adapted away from the training images of `origin`'s model."""
        return replace(self, origin={name: origin.gaussians[name] for name in self._shared(origin.gaussians)})

    def score(self, descriptors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fisher's combination of the descriptors' p-values: -2 sum(log p). With an origin, an image more
        typical of the origin than of this model's images (a smaller combination of the image-only
        descriptors' p-values) scores past the threshold by the difference of the two combinations."""
        terms = {name: -2 * g.p_value(descriptors[name]).log() for name, g in self.gaussians.items()}
        score = sum(terms.values())
        if self.origin is None:
            return score
        shared = self._shared(self.origin)
        at_origin = sum(-2 * self.origin[name].p_value(descriptors[name]).log() for name in shared)
        return torch.maximum(score, self.threshold + sum(terms[name] for name in shared) - at_origin)

    def _shared(self, other: dict[str, Gaussian]) -> list[str]:
        return [name for name in IMAGE_ONLY if name in self.gaussians and name in other]

    def to_dict(self) -> dict:
        out = {"quantile": self.quantile, "threshold": self.threshold, "gaussians": _tables(self.gaussians)}
        return out if self.origin is None else {**out, "origin": _tables(self.origin)}

    @classmethod
    def from_dict(cls, raw: dict, feature_size: int, where: str) -> Applicability:
        """A checkpoint's statistics, checked against the network they describe (`feature_size`)."""
        sizes = {"features": feature_size, "thumbnail": THUMBNAIL**2, "histogram": BINS, "texture": TEXTURE_SIZE}
        try:
            stored = _entry(raw, "gaussians")
            gaussians = _gaussians(stored, [*REQUIRED, *(["texture"] if "texture" in stored else [])])
            origin = None
            if "origin" in raw:
                stored = _entry(raw, "origin")
                origin = _gaussians(stored, [name for name in IMAGE_ONLY if name in REQUIRED or name in stored])
            out = cls(gaussians, float(_entry(raw, "threshold")), float(_entry(raw, "quantile")), origin)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: float() of a long tensor
            raise CheckpointError(f"{where} has malformed applicability statistics ({e})") from None
        for name, g in [*gaussians.items(), *(origin or {}).items()]:
            _check_gaussian(g, sizes[name], f"{where}: applicability statistics '{name}'")
        if not (np.isfinite(out.threshold) and 0 < out.quantile < 1):
            raise CheckpointError(f"{where}: applicability threshold or quantile out of range")
        return out


def _tables(gaussians: dict[str, Gaussian]) -> dict:
    # float32 on disk: ample for a distance, half the size (the features' precision is most of a file)
    return {name: {k: getattr(g, k).float() for k in FIELDS} for name, g in gaussians.items()}


def _gaussians(stored, names: list[str]) -> dict[str, Gaussian]:
    tables = {name: _entry(stored, name) for name in names}
    return {name: Gaussian(*(_float64(_entry(tables[name], k)) for k in FIELDS)) for name in names}


def _entry(table, key: str):
    """table[key] of a dict; anything else is refused (a tensor or list indexed by a name raises
    IndexError, which would pass for a bug)."""
    if not isinstance(table, dict):
        raise TypeError(f"expected a dict, found {type(table).__name__}")
    return table[key]


def _float64(t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"expected a float tensor, found {type(t).__name__}")
    return t.double()


def _check_gaussian(g: Gaussian, size: int, what: str) -> None:
    tensors = (g.mean, g.precision, g.reference)
    if g.mean.shape != (size,) or g.precision.shape != (size, size) or g.reference.ndim != 1 or not len(g.reference):
        raise CheckpointError(f"{what} do not fit this network")
    if not all(bool(t.isfinite().all()) for t in tensors) or not bool((g.reference.diff() >= 0).all()):
        raise CheckpointError(f"{what} are not finite, or their reference is not sorted")


def describe(x: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The descriptors of a batch of inputs x (N, 1, H, W) in [0, 1], given the network's pooled block
    outputs (`Classifier` collects them)."""
    pooled = torch.cat([F.normalize(f.float(), dim=1) for f in features], 1)
    thumbnail = F.adaptive_avg_pool2d(x.float(), THUMBNAIL).flatten(1)
    bins = (x.flatten(1).float() * BINS).to(torch.int32).clamp_(0, BINS - 1)
    histogram = _row_histograms(bins, BINS).float() / bins.shape[1]
    return {
        "features": pooled.cpu(),
        "thumbnail": thumbnail.cpu(),
        "histogram": histogram.cpu(),
        "texture": texture(x.float()).cpu(),
    }


TEXTURE_SIZE = len(TEXTURE_SCALES) * TEXTURE_BINS
DECADES = 3  # the bins are log-spaced over |Laplacian| from 10^-3 to 1; the end bins take the rest


def texture(x: torch.Tensor, scales: tuple[int, ...] = TEXTURE_SCALES) -> torch.Tensor:
    """For each scale (powers of two, from the finest), the share of the image's |Laplacian| (of the
    image averaged over scale x scale blocks) in each of TEXTURE_BINS bins: (N, len(scales) *
    TEXTURE_BINS). Bin k holds 10^(-3 + 3(k-1)/14) < m <= 10^(-3 + 3k/14), the first everything up to
    10^-3 (flat regions), the last everything above 1."""
    shares, pooled, scale = [], x, 1
    for wanted in scales:
        while scale < wanted:
            pooled, scale = _halve(pooled), 2 * scale
        blocks = pooled
        if min(blocks.shape[-2:]) < 3:  # a toy-sized image: its edge repeated, for the 3x3 stencil to fit
            blocks = F.pad(blocks, (1, 1, 1, 1), mode="replicate")
        magnitude = _laplacian(blocks).abs().flatten(1)
        position = (magnitude.log10() + DECADES) * ((TEXTURE_BINS - 2) / DECADES)  # log10(0) = -inf: bin 0
        bins = position.ceil().clamp(0, TEXTURE_BINS - 1).to(torch.int32)
        shares.append(_row_histograms(bins, TEXTURE_BINS).float() / magnitude.shape[1])
    return torch.cat(shares, 1)


def _row_histograms(bins: torch.Tensor, n: int) -> torch.Tensor:
    """The count of each bin 0..n-1 in each row of `bins` (N, M): one bincount over all rows, each
    row's bins offset by n times its index (int32: bincount reads it faster than int64)."""
    offsets = torch.arange(len(bins), dtype=torch.int32, device=bins.device)[:, None] * n
    return torch.bincount((bins + offsets).flatten(), minlength=len(bins) * n).view(len(bins), n)


def _halve(b: torch.Tensor) -> torch.Tensor:
    """The mean of each 2x2 block (an odd last row or column dropped, as avg_pool2d drops it): slices,
    several times faster than avg_pool2d on one channel."""
    b = b[..., : b.shape[-2] // 2 * 2, : b.shape[-1] // 2 * 2]
    return (b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2]) * 0.25


def _laplacian(b: torch.Tensor) -> torch.Tensor:
    """The 5-point Laplacian of (N, 1, H, W) at every pixel with four neighbours."""
    centre = b[..., 1:-1, 1:-1]
    return b[..., :-2, 1:-1] + b[..., 2:, 1:-1] + b[..., 1:-1, :-2] + b[..., 1:-1, 2:] - 4 * centre


def feature_size(members: nn.ModuleList) -> int:
    """The length of the network's part of the descriptors: every block's channels, every member."""
    return sum(m.features[i].out_channels for m in members for i in range(0, len(m.features), 4))
