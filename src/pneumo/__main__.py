"""`python -m pneumo COMMAND ...`: train, evaluate, predict, export, calibrate, download."""

import sys

from pneumo.cli import main

sys.exit(main())
