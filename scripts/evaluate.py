#!/usr/bin/env python3
"""Evaluate a checkpoint: python scripts/evaluate.py --checkpoint runs/quickstart/best.pt --out runs/quickstart/eval"""

import sys

from pneumo.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
