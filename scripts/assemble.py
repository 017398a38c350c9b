#!/usr/bin/env python3
"""Make one model of ensemble members trained apart (in parallel, on other machines): the same as
`pneumo-train` hands over when it trains the members itself.

    python scripts/assemble.py --config configs/kermany.yaml --out best.pt [--set data.root=DIR] MEMBER.pt...

The members' best.pt must come from the config's recipe with seeds seed, seed + 1, ...; the
calibration, threshold and operating points are fitted on the config's validation split.
"""

import argparse
import sys
from pathlib import Path

from pneumo.cli import run_command


def assemble_members(args) -> None:
    from pneumo.core.config import load_config
    from pneumo.core.device import resolve_device
    from pneumo.data import load_split
    from pneumo.model.checkpoint import save_checkpoint
    from pneumo.train.assemble import assemble, check_members

    cfg = load_config(args.config)
    data = load_config(args.config, args.set)  # where the data is on this machine; not stored in the model
    members = sorted(Path(m) for m in args.members)
    check_members(cfg, members)
    splits = (load_split(data, "train"), load_split(data, "val"))
    model = assemble(cfg, sorted(members, key=lambda p: str(p)), splits, resolve_device(data.device))
    save_checkpoint(args.out, model.payload())
    m = model.val_metrics
    print(
        f"wrote {args.out}: validation AUC {m['auc']:.4f}, accuracy {m['accuracy']:.4f}, threshold "
        f"{model.threshold:.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="assemble", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="where the data is")
    parser.add_argument("members", nargs="+")
    return run_command(parser.prog, assemble_members, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
