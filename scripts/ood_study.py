#!/usr/bin/env python3
"""Which descriptors the applicability check should combine: the share of each set of images that
each descriptor alone, and the check's combinations, flag, refitted on the model's training split.

    python scripts/ood_study.py [--checkpoint PATH] [--set data.root=DIR] [--quantile 0.99 ...]
        [--texture-scales 2,4,8] SITE [SITE ...]

Each SITE is what `pneumo-predict` takes (a folder, an image, a CSV list). For every descriptor set
and quantile the check is fitted as `pneumo-train` fits it (Gaussians on the training images, the
threshold at the quantile of validation's combined scores). "train, other half" is the share flagged
among training images left out of a refit on a random half: images of the model's own site that the
check has not seen, which it should flag about as often as validation.
"""

import argparse
import json
import sys

import numpy as np

from pneumo.cli import run_command

COMBINATIONS = {
    "features": ["features"],
    "thumbnail": ["thumbnail"],
    "histogram": ["histogram"],
    "texture": ["texture"],
    "the three": ["features", "thumbnail", "histogram"],
    "the four": ["features", "thumbnail", "histogram", "texture"],
}


def study(args) -> None:
    import torch

    from pneumo.core.device import to_input
    from pneumo.data import load_split
    from pneumo.data.images import decode_all
    from pneumo.model import applicability
    from pneumo.model.checkpoint import TrainedModel, bundled_checkpoint
    from pneumo.model.inference import described
    from pneumo.score.predict import find_images

    model = TrainedModel.load(args.checkpoint or bundled_checkpoint(), args.set)
    network, device = model._ready(None)

    def descriptors(images: np.ndarray) -> dict:
        images = torch.from_numpy(np.ascontiguousarray(images))
        out = described(network, images, 64, device)[1]
        if args.texture_scales != applicability.TEXTURE_SCALES:  # a study of other scales than the shipped
            batches = (to_input(images[s : s + 64], device) for s in range(0, len(images), 64))
            out["texture"] = torch.cat([applicability.texture(x, args.texture_scales).cpu() for x in batches])
        return out

    train, val = (descriptors(load_split(model.config, split).images) for split in ("train", "val"))
    data, sites = model.config.data, {}
    for site in args.sites:
        sites[site] = descriptors(decode_all(list(find_images([site])), data.image_size, data.max_pixels, True)[0])
    half = np.random.default_rng(0).permutation(len(train["features"]))
    fitted, left_out = half[: len(half) // 2], half[len(half) // 2 :]
    rows = {}
    for label, names in COMBINATIONS.items():
        for q in args.quantile or [0.99, 0.98]:
            check = _fit(train, val, names, q)  # once for every site
            row = {site: _flagged(check, d) for site, d in sites.items()}
            row["train, other half"] = _flagged(_fit(_rows(train, fitted), val, names, q), _rows(train, left_out))
            rows[f"{label} at {q}"] = row
            print(f"{label:>10} at {q}: " + ", ".join(f"{k} {v:.1%}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"texture_scales": args.texture_scales, "flagged": rows}, f, indent=1)


def _rows(d: dict, index: np.ndarray) -> dict:
    return {name: t[index] for name, t in d.items()}


def _fit(train: dict, val: dict, names: list[str], quantile: float):
    from pneumo.model.applicability import Applicability

    return Applicability.fit({n: train[n] for n in names}, {n: val[n] for n in names}, quantile)


def _flagged(check, images: dict) -> float:
    """The share of `images` (their descriptors) that `check` flags; it scores the descriptors it has."""
    return float(check.flags(check.score(images)).float().mean())


def scales(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if not all(v >= 1 and v & (v - 1) == 0 for v in values):  # powers of two (applicability.TEXTURE_SCALES)
        raise ValueError(text)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(prog="ood_study", description=__doc__.splitlines()[0])
    parser.add_argument("sites", nargs="+", metavar="SITE")
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="where the data is")
    parser.add_argument("--quantile", type=float, action="append", help="repeatable; default 0.99 and 0.98")
    parser.add_argument("--texture-scales", type=scales, default=(2, 4, 8), help="comma list, default 2,4,8")
    parser.add_argument("--json", help="also write the figures to this file")
    return run_command(parser.prog, study, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
