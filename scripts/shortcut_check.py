#!/usr/bin/env python3
"""Re-score a labelled split with Kermany's shortcut cues removed (chest shape, fine detail, corner
markers); see src/pneumo/shortcuts.py. A model that reads the lungs keeps its AUC.

    python scripts/shortcut_check.py [--checkpoint runs/kermany/best.pt] [--split val] [--set data.root=DIR ...]
"""

import argparse
import sys

from pneumo.cli import run_command


def report(args) -> None:
    from pneumo.model.checkpoint import TrainedModel, bundled_checkpoint
    from pneumo.site.shortcuts import shortcut_check

    model = TrainedModel.load(args.checkpoint or bundled_checkpoint(), args.set)
    results = shortcut_check(model, args.split)
    print(f"{args.split} split, {model.path}")
    print(f"{'condition':24s} {'AUC':>7s} {'accuracy':>9s} {'sensitivity':>12s} {'specificity':>12s}")
    for name, m in results.items():
        print(f"{name:24s} {m['auc']:7.4f} {m['accuracy']:9.3f} {m['sensitivity']:12.3f} {m['specificity']:12.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="shortcut_check", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    return run_command(parser.prog, report, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
