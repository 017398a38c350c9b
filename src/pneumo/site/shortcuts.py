"""Does a model lean on a shortcut? Re-score a labelled split after removing, image by image, a cue
that tells the classes apart in Kermany's files for reasons other than pneumonia.

- shape: PNEUMONIA originals are wider than NORMAL ones (mean aspect 1.50 against 1.21 in the
  100-file kermany_fullres_sample), so after squashing to a square their chests look narrower.
  Each NORMAL image is narrowed and each PNEUMONIA image widened by that ratio: the shapes swap.
- detail: NORMAL originals are larger, so at 224x224 they keep more fine detail (mean absolute
  Laplacian 7.6 against 5.7 grey levels). A Gaussian blur of 0.5 pixels gives NORMAL images the
  PNEUMONIA level.
- markers: side markers ("R", "L") and text sit near the corners of the film. The four corner
  squares (a fifth of the width and height each) are set to the image's mean grey.

A model that reads the lungs scores the same; one that reads the cue loses AUC.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pneumo.data import load_split
from pneumo.data.augment import gaussian_blur
from pneumo.evaluate.evaluation import score
from pneumo.evaluate.metrics import binary_metrics
from pneumo.model.checkpoint import TrainedModel

ASPECT_GAP = 1.50 / 1.21
DETAIL_SIGMA = 0.5
CORNER = 0.2


def stretch_width(images: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (N, H, W) with the content widened `factor` times about the centre (narrowed below 1;
    the border is extended)."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1, 0]], dtype=torch.float32).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return _to_uint8(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False))


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(images).float().unsqueeze(1)
    return _to_uint8(gaussian_blur(x, torch.full((len(x),), sigma, dtype=torch.float64)))


def blank_corners(images: np.ndarray, fraction: float = CORNER) -> np.ndarray:
    out = images.copy()
    h, w = images.shape[1:]
    kh, kw = round(h * fraction), round(w * fraction)
    mean = images.mean(axis=(1, 2)).round().astype(np.uint8)[:, None, None]
    for rows in (slice(0, kh), slice(h - kh, h)):
        for cols in (slice(0, kw), slice(w - kw, w)):
            out[:, rows, cols] = mean
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def without_cues(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The images as they are, with the shapes swapped, with NORMAL detail lowered, and with the
    corners blanked."""
    normal, pneumonia = labels == 0, labels == 1
    shape, detail = images.copy(), images.copy()
    shape[normal] = stretch_width(images[normal], 1 / ASPECT_GAP)
    shape[pneumonia] = stretch_width(images[pneumonia], ASPECT_GAP)
    detail[normal] = blur(images[normal], DETAIL_SIGMA)
    return {
        "as is": images,
        "shapes swapped": shape,
        "NORMAL detail lowered": detail,
        "corners blanked": blank_corners(images),
    }


def shortcut_check(model: TrainedModel, split: str = "val") -> dict[str, dict]:
    """{condition: metrics at the model's threshold} for each condition of `without_cues`."""
    data = load_split(model.config, split)
    data.require_both_classes()
    return {
        name: binary_metrics(data.labels, score(model, images), model.threshold)
        for name, images in without_cues(data.images, data.labels).items()
    }
