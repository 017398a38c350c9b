#!/usr/bin/env python3
"""Compare trained models on what decides a recipe for new sites: the ranking on validation, on the
shift proxies (validation re-rendered as other sites' X-rays differ), and on a second site's labelled
images (per view and within bands of equal mean grey level), and the share of the site the
applicability check flags.

    python scripts/compare_models.py --site SITE/manifest.csv [--first-network] [--set data.root=DIR] CKPT...

AUC only: these models are not adapted to the site, and their thresholds are not what is compared.
`--first-network` scores each checkpoint's first network alone (what pneumo-calibrate fine-tunes), so
that an ensemble compares with one network; the check is then not reported.
"""

import argparse
import functools
import json
import sys
from dataclasses import replace

import numpy as np

from pneumo.cli import run_command


def compare(args) -> None:
    rows = {path: _figures(path, args) for path in args.checkpoints}
    print(json.dumps(rows, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _figures(path: str, args) -> dict:
    from pneumo.data import load_split
    from pneumo.data.manifest import column
    from pneumo.evaluate.metrics import banded_auc
    from pneumo.model.checkpoint import TrainedModel
    from pneumo.site import shift

    model = TrainedModel.load(path, args.set)
    if args.first_network:
        model = replace(model, members=model.members[:1], applicability=None)
    val = load_split(model.config, "val")
    row = {"per_image": model.config.model.per_image, "val": _auc(val.labels, model.logits(val.images))}
    for group, renderings in (("design", shift.DESIGN), ("held_out", shift.HELD_OUT)):
        aucs = [_auc(val.labels, model.logits(shift.render(val.images, r))) for r in renderings.values()]
        row.update({f"{group}_mean": float(np.mean(aucs)), f"{group}_worst": float(np.min(aucs))})
    site = _site(args.site, model.config.data.image_size, model.config.data.max_pixels)
    z, scope = model.scored(site.images, desc="scoring the site")
    row["site"] = _auc(site.labels, z)
    views = np.asarray(column(args.site, "view", site.paths))
    for view in sorted(set(views) - {""}):
        row[f"site_{view}"] = _auc(site.labels[views == view], z[views == view])
    row["site_equal_grey"] = banded_auc(site.labels, z, site.images.mean(axis=(1, 2)))
    row["site_flagged"] = float(np.mean(model.applicability.flags(scope))) if scope is not None else None
    print(json.dumps({path: row}), flush=True)
    return row


@functools.cache
def _site(source: str, size: int, max_pixels: int):
    """The site's images, decoded once for all the checkpoints of one size."""
    from pneumo.site.adapt import load_sample

    return load_sample([source], size, max_pixels)


def _auc(labels: np.ndarray, z: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, z))


def main() -> int:
    parser = argparse.ArgumentParser(prog="compare_models", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--site", required=True, help="a second site's labelled images: a CSV manifest or a folder")
    parser.add_argument("--first-network", action="store_true", help="score each checkpoint's first network alone")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return run_command(parser.prog, compare, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
