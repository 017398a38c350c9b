"""Decoding image files into one uint8 array (N, size, size)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from pneumo.errors import PneumoError
from pneumo.progress import progress


def load_image(path: str, size: int) -> np.ndarray:
    """One image as grayscale uint8, squashed (not cropped) to size x size like the Kermany 224 copies."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PneumoError(f"cannot read image {path}: {e}") from None


def load_images(paths: list[str], size: int, workers: int = 0, desc: str = "decoding") -> np.ndarray:
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    # Pillow releases the GIL while decoding and resizing, so threads use every core without the
    # start-up cost and memory of processes.
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(lambda p: load_image(p, size), paths)
        for i, image in enumerate(progress(decoded, total=len(paths), desc=desc, unit="img")):
            out[i] = image
    return out
