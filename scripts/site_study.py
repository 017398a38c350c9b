#!/usr/bin/env python3
"""Simulate adapting a model to a new site: draw a labelled sample of whole patients from a site's
labelled images, run pneumo-calibrate's adaptation on it, and score the site's other images.

    python scripts/site_study.py --sample SITE/manifest.csv [--checkpoint PATH] [--draws 5] [--per-class 100]

Each draw reports, on the images left out of its sample: AUC, accuracy, sensitivity and specificity
at the adapted model's threshold; AUC per view (when the manifest has a `view` column); AUC within
bands of equal mean grey level (a model that reads exposure instead of the lungs loses it there); the
share the adapted model's applicability check flags; and the input model's AUC on the same images.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pneumo.cli import run_command

GREY_BANDS = 5


def study(args) -> None:
    from dataclasses import replace

    from pneumo.data.manifest import column
    from pneumo.model.checkpoint import TrainedModel, bundled_checkpoint
    from pneumo.site.adapt import Options, adapt, draw_patients, load_sample
    from pneumo.site.finetune import Recipe

    model = TrainedModel.load(args.checkpoint or bundled_checkpoint(), args.set)
    site = load_sample([args.sample], model.config.data.image_size, model.config.data.max_pixels)
    views = column(args.sample, "view", site.paths)
    options = Options(choice=args.adapt, recipe=Recipe(steps=args.steps) if args.steps else Recipe(), bootstrap=0)
    rng, patients, rows = np.random.default_rng(args.seed), np.asarray(site.patients), []
    before = model.logits(site.images, desc="scoring the site with the input model")
    for d in range(args.draws):
        chosen = draw_patients(rng, site.labels, patients, args.per_class)
        rest = ~np.isin(patients, patients[chosen])
        sample = replace(
            site,
            paths=[site.paths[i] for i in chosen],
            labels=site.labels[chosen],
            patients=[site.patients[i] for i in chosen],
            images=site.images[chosen],
        )
        result = adapt(model, sample, replace(options, seed=d))
        row = _scores(result.model, site.images[rest], site.labels[rest], [views[i] for i in np.flatnonzero(rest)])
        row.update(draw=d, kept=result.kept, input_model_auc=_auc(site.labels[rest], before[rest]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], float)}
    print(json.dumps({"draws": len(rows), "per_class": args.per_class, "mean": summary}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mean": summary}, indent=1))


def _scores(model, images: np.ndarray, labels: np.ndarray, views: list[str]) -> dict:
    from pneumo.evaluate.metrics import banded_auc, binary_metrics

    z, scope = model.scored(images, desc="scoring the other images")
    m = binary_metrics(labels, 1 / (1 + np.exp(-z)), model.threshold)
    row = {k: float(m[k]) for k in ("auc", "accuracy", "sensitivity", "specificity")}
    for view in sorted(set(views) - {""}):
        mask = np.array([v == view for v in views])
        row[f"auc_{view}"] = _auc(labels[mask], z[mask])
    row["auc_equal_grey"] = banded_auc(labels, z, images.mean(axis=(1, 2)), GREY_BANDS)
    row["flagged"] = float(np.mean(model.applicability.flags(scope))) if scope is not None else float("nan")
    return row


def _auc(labels: np.ndarray, z: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, z)) if len(set(labels.tolist())) == 2 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(prog="site_study", description=__doc__.splitlines()[0])
    parser.add_argument("--sample", required=True, help="the site's labelled images: a CSV manifest or a folder")
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=100, help="images of each class in a draw's sample")
    parser.add_argument("--adapt", default="auto", choices=["auto", "recalibrate", "fine-tune"])
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--out", help="also write the rows and their mean to this JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    return run_command(parser.prog, study, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
