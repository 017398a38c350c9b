#!/usr/bin/env python3
"""Train the pneumonia classifier: python scripts/train.py --config configs/quickstart.yaml"""

import sys

from pneumo.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
