"""MedMNIST npz files (PneumoniaMNIST): `{train,val,test}_images` and `_labels` arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pneumo.core.errors import PneumoError


def read_npz_split(path: str | Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size) uint8, resized as needed, and labels (N,) in {0, 1}."""
    path = Path(path)
    if not path.is_file():
        raise PneumoError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if f"{split}_images" not in keys or f"{split}_labels" not in keys:
                present = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith(("_images", "_labels"))})
                raise PneumoError(
                    f"split '{split}' not found in {path} (it holds: {', '.join(present) or 'no splits'})"
                )
            images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise PneumoError(f"{path} is not a readable npz file ({e})") from None
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.mean(axis=-1) if images.shape[-1] == 3 else images[..., 0]
    if images.ndim != 3 or len(images) != len(labels):
        raise PneumoError(
            f"{path}: {split}_images must be (N, H, W) with one label each, got {images.shape} and {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise PneumoError(
            f"{path}: {split}_labels must be 0 (normal) or 1 (pneumonia), found {sorted(set(labels.tolist()))[:5]}"
        )
    images = np.clip(images, 0, 255).astype(np.uint8)
    if images.shape[1:] != (size, size):
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images]
        )
    return images, labels.astype(np.int64)
