"""Shift proxies: labelled images re-rendered the ways another hospital's X-rays differ.

A model meets a new site with other detectors, exposure, resolution, processing, collimation and
markers. None of that can be measured here on real data from another site, so each proxy re-renders
the validation images with one such difference (or several at once, as a site would) and the model
is scored on them at its stored threshold. What a proxy shows is how far the decisions move; it says
nothing about disease patterns the training data never held.

The proxies come in two groups: `DESIGN` ones that the recipe's augmentation was chosen against, and
`HELD_OUT` ones that no training choice looked at, kept to check that the choices generalize.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

Rendering = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # one uint8 (H, W) image -> same size


def _lut(f: Callable[[np.ndarray], np.ndarray]) -> Rendering:
    table = np.clip(np.round(f(np.arange(256) / 255.0) * 255), 0, 255).astype(np.uint8)
    return lambda a, rng: table[a]


def _pil(f: Callable[[Image.Image], Image.Image]) -> Rendering:
    return lambda a, rng: np.asarray(f(Image.fromarray(a)), dtype=np.uint8)


def gaussian_noise(sigma: float) -> Rendering:
    return lambda a, rng: np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


def poisson_noise(photons: float) -> Rendering:
    """Quantum noise: brighter pixels (more attenuation) got fewer photons, so they are noisier."""

    def render(a, rng):
        transmitted = (255 - a.astype(np.float64)) / 255 * photons
        return np.clip(255 - rng.poisson(transmitted) / photons * 255, 0, 255).round().astype(np.uint8)

    return render


def resolution(pixels: int) -> Rendering:
    """Acquired at a lower resolution: down to `pixels` across and back up."""
    return _pil(
        lambda im: im.resize((pixels, pixels), Image.Resampling.BILINEAR).resize(im.size, Image.Resampling.BILINEAR)
    )


def jpeg(quality: int) -> Rendering:
    def render(a, rng):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=quality)
        return np.asarray(Image.open(buf).convert("L"), dtype=np.uint8)

    return render


def zoom(factor: float) -> Rendering:
    """Collimation: >1 crops to the centre (tighter field), <1 shrinks into a black border (wider field)."""

    def render(im: Image.Image) -> Image.Image:
        w, h = im.size
        if factor >= 1:
            cw, ch = round(w / factor), round(h / factor)
            left, top = (w - cw) // 2, (h - ch) // 2
            return im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
        out = Image.new("L", (w, h), 0)
        small = im.resize((round(w * factor), round(h * factor)), Image.Resampling.BILINEAR)
        out.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
        return out

    return _pil(render)


def marker(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright side marker in a random corner, as another site's technologists place them."""
    im = Image.fromarray(a.copy())
    w, h = im.size
    size = max(8, w // 7)
    x = int(rng.choice([w // 20, w - w // 20 - size]))
    y = int(rng.choice([h // 20, h - h // 20 - size]))
    draw = ImageDraw.Draw(im)
    draw.rectangle((x, y, x + size, y + size), fill=230)
    draw.text((x + size // 3, y + size // 4), rng.choice(["L", "R"]), fill=20)
    return np.asarray(im, dtype=np.uint8)


def combine(*renderings: Rendering) -> Rendering:
    def render(a, rng):
        for r in renderings:
            a = r(a, rng)
        return a

    return render


# Differences the recipe's augmentation was designed against (see configs/kermany.yaml).
DESIGN: dict[str, Rendering] = {
    "noise (Gaussian, 8 grey levels)": gaussian_noise(8),
    "sharpened (unsharp mask)": _pil(lambda im: im.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=0))),
    "exposure (gamma 0.6)": _lut(lambda v: v**0.6),
    "exposure (gamma 1.6)": _lut(lambda v: v**1.6),
    "contrast (0.7)": _lut(lambda v: 0.5 + (v - 0.5) * 0.7),
    "field (zoom in 1.15)": zoom(1.15),
    "field (zoom out 0.85)": zoom(0.85),
    "resolution (down to 80 px)": resolution(80),
}

# Differences no training choice was made on.
HELD_OUT: dict[str, Rendering] = {
    "quantum noise (Poisson)": poisson_noise(150),
    "JPEG quality 20": jpeg(20),
    "equalized histogram": _pil(ImageOps.equalize),
    "side marker": marker,
    "another site (noise, lower resolution, gamma 0.8, zoom 1.1)": combine(
        resolution(112), gaussian_noise(5), _lut(lambda v: v**0.8), zoom(1.1)
    ),
}


def render(images: np.ndarray, rendering: Rendering, seed: int = 0) -> np.ndarray:
    """Each uint8 (N, H, W) image re-rendered, with random choices drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([rendering(a, rng) for a in images]) if len(images) else images
