#!/usr/bin/env python3
"""Adapt a model to a site: python scripts/calibrate.py --out site.pt LABELLED_FOLDER_OR_CSV..."""

import sys

from pneumo.cli import calibrate_main

if __name__ == "__main__":
    sys.exit(calibrate_main())
