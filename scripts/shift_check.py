#!/usr/bin/env python3
"""How a model's decisions hold up at a new site: scored on the validation split re-rendered as other
sites' X-rays differ (src/pneumo/shift.py) and on the official val folder, at its stored threshold,
and what pneumo-calibrate on 20 images per class would make of each.

    python scripts/shift_check.py [--checkpoint PATH] [--draws 200] [--set data.root=DIR ...] [--json FILE]
"""

import argparse
import json
import sys
from dataclasses import replace

from pneumo.cli import run_command


def report(args) -> None:
    from pneumo.data import load_split
    from pneumo.evaluate.metrics import binary_metrics
    from pneumo.model import calibration
    from pneumo.model.checkpoint import TrainedModel, bundled_checkpoint
    from pneumo.site import shift
    from pneumo.site.adapt import simulate

    model = TrainedModel.load(args.checkpoint or bundled_checkpoint(), args.set)

    def score(images):
        return model.logits(images, desc="scoring")

    val = load_split(model.config, "val")
    conditions = {"validation as is": score(val.images)}
    for group, renderings in (("design", shift.DESIGN), ("held out", shift.HELD_OUT)):
        for name, rendering in renderings.items():
            conditions[f"{group}: {name}"] = score(shift.render(val.images, rendering))
    official = load_split(replace(model.config, data=replace(model.config.data, val_source="official")), "val")
    rows = {}
    for name, z in conditions.items():
        m = binary_metrics(val.labels, calibration.probabilities(z, calibration.Calibration()), model.threshold)
        rows[name] = {**_brief(m), "calibrated_on_40": simulate(z, val.labels, val.patients, args.draws)}
    z = score(official.images)
    m = binary_metrics(official.labels, calibration.probabilities(z, calibration.Calibration()), model.threshold)
    rows["official val folder (16 images)"] = _brief(m)
    _print(rows, model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": str(model.path), "model": model.model_id, "conditions": rows}, f, indent=2)


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity")}


def _print(rows: dict, model) -> None:
    print(f"{model.path} (model {model.model_id}), stored threshold {model.threshold:.4f}")
    head = f"{'condition':62s} {'AUC':>6s} {'acc':>6s} {'sens':>6s} {'spec':>6s}   calibrated on 40: mean / min acc"
    print(head)
    for name, r in rows.items():
        cal = r.get("calibrated_on_40")
        tail = f"   {cal['accuracy_mean']:.3f} / {cal['accuracy_min']:.3f}" if cal else ""
        figures = f"{r['auc']:6.4f} {r['accuracy']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f}"
        print(f"{name[:62]:62s} {figures}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="shift_check", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--draws", type=int, default=200, help="random 20 + 20 samples per condition")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    parser.add_argument("--json", help="also write the results to this file")
    return run_command(parser.prog, report, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
