"""Grad-CAM (Selvaraju et al., 2017) over the last convolutional block: where the model looked."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pneumo.core.fileio import atomic_write
from pneumo.model.network import Classifier


def grad_cam(model: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] (N, H, W) for the pneumonia logit, and the probabilities, for uint8 images (N, H, W).

    The last block's activations A (after its batch normalization and ReLU, before its pooling) are
    weighted by the mean gradient of the logit over each channel; the weighted sum, through a ReLU, is
    the map. For an ensemble the channels of every member's last block enter one sum, weighted by the
    gradient of the ensemble's logit.
    """
    model = model.float().eval()
    saved: list[dict] = []

    def keep(_module, _inputs, output):
        # The model pools before its ReLU (the same numbers), so A is taken at the normalization's output.
        entry = {"activation": F.relu(output)}
        saved.append(entry)
        output.register_hook(lambda grad: entry.__setitem__("gradient", grad))

    last_norms = [[m for m in member.features if isinstance(m, torch.nn.BatchNorm2d)][-1] for member in model.members]
    handles = [norm.register_forward_hook(keep) for norm in last_norms]
    try:
        x = torch.from_numpy(images).float().div(255).unsqueeze(1)
        logits = model(x)
        logits.sum().backward()  # each image's logit depends on that image only
    finally:
        for handle in handles:
            handle.remove()
    cam = sum(
        (e["gradient"].mean(dim=(2, 3), keepdim=True) * e["activation"].detach()).sum(dim=1, keepdim=True)
        for e in saved
    )
    cam = F.relu(cam)
    cam = F.interpolate(cam, size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return cam.numpy(), torch.sigmoid(logits.detach()).numpy()


def save_overlay(path: Path, image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> None:
    """The X-ray in gray with the heatmap in the jet colormap over it, stronger where the map is."""
    gray = np.repeat(image[..., None].astype(np.float64) / 255, 3, axis=2)
    colors = matplotlib.colormaps["jet"](heat)[..., :3]
    weight = alpha * heat[..., None]
    rgb = (gray * (1 - weight) + colors * weight) * 255
    atomic_write(path, lambda f: Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(f, format="PNG"))


def most_confident_errors(labels: np.ndarray, probs: np.ndarray, threshold: float, n: int) -> list[int]:
    """Indices of the n misclassified images whose probability lies farthest from their label."""
    wrong = np.flatnonzero((probs >= threshold) != (labels == 1))
    return wrong[np.argsort(-np.abs(probs[wrong] - labels[wrong]), kind="stable")][:n].tolist()
