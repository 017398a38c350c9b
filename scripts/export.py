#!/usr/bin/env python3
"""Export a checkpoint: python scripts/export.py --checkpoint runs/kermany/best.pt --format onnx --out model.onnx"""

import sys

from pneumo.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
