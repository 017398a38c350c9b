#!/usr/bin/env python3
"""Give a checkpoint made before the applicability check its statistics: fitted on the training images
of its own config's split and thresholded on its validation images, as pneumo-train does today.

    python scripts/fit_applicability.py --checkpoint best.pt --out new.pt [--set data.root=DIR ...]

Everything else in the checkpoint (weights, calibration, threshold) is kept; --out must be a new file.
"""

import argparse
import sys
from pathlib import Path

from pneumo.cli import run_command


def fit(args) -> None:
    from pneumo.core.errors import PneumoError
    from pneumo.data import load_split
    from pneumo.model.checkpoint import TrainedModel, save_checkpoint

    model = TrainedModel.load(args.checkpoint)  # saved with its own config: --set says where the data is here
    if Path(args.out).resolve() == model.path.resolve():
        raise PneumoError(f"--out {args.out} is the input checkpoint: write to a new file")
    here = TrainedModel.load(args.checkpoint, args.set).config
    train, val = load_split(here, "train"), load_split(here, "val")
    model.fit_applicability(train.images, val.images)
    save_checkpoint(args.out, model.payload())
    check = model.applicability
    print(
        f"wrote {args.out}: applicability fitted on {len(train)} training images, threshold {check.threshold:.2f} "
        f"keeps {100 * check.quantile:g}% of the {len(val)} validation images in scope"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="fit_applicability", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="where the data is")
    return run_command(parser.prog, fit, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
