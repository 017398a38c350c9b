#!/usr/bin/env python3
"""Download PneumoniaMNIST: python scripts/download_data.py [--size 224] [--out data/medmnist]"""

import sys

from pneumo.cli import download_main

if __name__ == "__main__":
    sys.exit(download_main())
