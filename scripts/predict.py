#!/usr/bin/env python3
"""Score X-rays into a CSV: python scripts/predict.py --checkpoint runs/kermany/best.pt --out scores.csv FOLDER..."""

import sys

from pneumo.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
