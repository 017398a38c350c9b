"""Synthetic chest X-rays, generated deterministically from a seed, so the pipeline runs with no download.

Each image has a body outline, two dark lung fields crossed by curved ribs, a spine and a heart
shadow, a diaphragm, film grain and uneven exposure. Pneumonia adds patchy opacities inside the lungs,
some faint; both classes get small bright spots (vessels seen end-on, nodules) so that "any bright
spot" is not the answer. A small CNN needs a few epochs to separate the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pneumo.core.labels import class_name

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def make_split(split: str, n: int, size: int, prevalence: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (uint8, n x size x size) and labels for one split; splits never share an image."""
    # Labels come from their own stream so that image i is the same whatever n is.
    label_rng = np.random.default_rng([seed, SPLIT_CODES[split], 0])
    labels = (label_rng.random(n) < prevalence).astype(np.int64)
    labels[: min(2, n)] = [0, 1][: min(2, n)]  # every split holds both classes, so AUC is defined
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], 1, i])
        images[i] = chest_xray(rng, size, pneumonia=bool(labels[i]))
    return images, labels


def chest_xray(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    u = lambda lo, hi: rng.uniform(lo, hi)

    body = _ellipse(x, y, u(-0.04, 0.04), u(0.0, 0.15), u(0.8, 0.92), u(0.95, 1.1), 0.08)
    img = 0.08 + 0.42 * body

    lung_y, lung_ry = u(-0.12, 0.0), u(0.48, 0.58)
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        lungs = np.maximum(lungs, _ellipse(x, y, side * u(0.33, 0.42), lung_y, u(0.24, 0.3), lung_ry, 0.1))
    img -= u(0.22, 0.3) * lungs

    # Ribs: bright bands that curve down towards the sides, strongest over the lungs.
    curve = y + u(0.25, 0.4) * x**2
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (curve * u(4.5, 6.0) + u(0, 1)))) ** 6
    img += u(0.05, 0.1) * ribs * body * (0.4 + 0.6 * lungs)

    img += u(0.12, 0.2) * _ellipse(x, y, u(-0.02, 0.02), 0.0, u(0.07, 0.1), 1.2, 0.2)  # spine
    img += u(0.15, 0.25) * _ellipse(x, y, u(0.08, 0.18), u(0.22, 0.32), u(0.2, 0.27), u(0.18, 0.24), 0.15)  # heart
    img += u(0.15, 0.25) * _ellipse(x, y, 0.0, u(0.95, 1.05), 0.9, u(0.3, 0.4), 0.1) * body  # diaphragm

    # Small bright spots in both classes.
    for _ in range(rng.integers(0, 4)):
        cx, cy = _point_in_lungs(rng)
        img += u(0.04, 0.1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * u(0.01, 0.025) ** 2))

    if pneumonia:
        texture = _smooth_noise(rng, size, cells=12)
        for _ in range(rng.integers(1, 5)):
            cx, cy = _point_in_lungs(rng)
            sx, sy = u(0.08, 0.18), u(0.08, 0.22)
            blob = np.exp(-((x - cx) ** 2 / (2 * sx**2) + (y - cy) ** 2 / (2 * sy**2)))
            img += u(0.2, 0.45) * blob * np.clip(0.5 + texture, 0, None) * lungs

    img *= 1 + u(-0.15, 0.15) * _smooth_noise(rng, size, cells=3)  # uneven exposure
    img += rng.normal(0, u(0.015, 0.035), img.shape)  # film grain
    img = (img - img.min()) / max(img.max() - img.min(), 1e-6) * u(0.8, 1.0)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _ellipse(x, y, cx, cy, rx, ry, softness):
    r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return 1 / (1 + np.exp(np.clip((r - 1) / softness, -50, 50)))


def _point_in_lungs(rng):
    return rng.choice([-1, 1]) * rng.uniform(0.22, 0.5), rng.uniform(-0.45, 0.35)


def _smooth_noise(rng, size, cells):
    coarse = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def write_folder(
    root, counts: dict[str, int], size: int = 224, prevalence: float = 0.5, seed: int = 0, suffix: str = ".png"
) -> None:
    """Write synthetic splits as a Kermany-style folder tree, with Kermany-style file names (patient
    ids included), as PNG or JPEG files: for tests of the folder path, and for benchmarks."""
    for split, n in counts.items():
        images, labels = make_split(split, n, size, prevalence, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = Path(root) / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            code = SPLIT_CODES[split]
            name = f"person{code}{i:05d}_bacteria_{i}" if label else f"IM-{code}{i:05d}-0001"
            Image.fromarray(image).save(folder / f"{name}{suffix}", quality=90)
