#!/usr/bin/env python3
"""Re-score a labelled split with two Kermany shortcuts removed (chest shape, fine detail); see
src/pneumo/shortcuts.py. A robust model keeps its AUC.

    python scripts/shortcut_check.py [--checkpoint runs/kermany/best.pt] [--split val] [--set data.root=DIR ...]
"""

import argparse
import sys

from pneumo.cli import add_set_option, run_command


def main() -> int:
    parser = argparse.ArgumentParser(prog="shortcut_check", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the bundled model")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    add_set_option(parser)
    args = parser.parse_args()

    def run():
        from pneumo.checkpoint import bundled_checkpoint
        from pneumo.shortcuts import shortcut_check

        checkpoint = args.checkpoint or bundled_checkpoint()
        results = shortcut_check(checkpoint, args.split, args.set)
        print(f"{args.split} split, {checkpoint}")
        print(f"{'condition':24s} {'AUC':>7s} {'accuracy':>9s} {'sensitivity':>12s} {'specificity':>12s}")
        for name, m in results.items():
            print(f"{name:24s} {m['auc']:7.4f} {m['accuracy']:9.3f} {m['sensitivity']:12.3f} {m['specificity']:12.3f}")

    return run_command(parser.prog, run)


if __name__ == "__main__":
    sys.exit(main())
