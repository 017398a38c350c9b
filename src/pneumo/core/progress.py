"""Progress for people and for batch jobs: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from pneumo.core.logs import log


def batches(n: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Consecutive slices of `batch_size` covering range(n), the last one possibly shorter, with progress."""
    steps = -(-n // batch_size)
    for step in progress(range(steps), total=steps, desc=desc, unit="batch"):
        yield slice(step * batch_size, (step + 1) * batch_size)


def progress(items: Iterable, total: int, desc: str, unit: str = "it", every_s: float = 30.0) -> Iterator:
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        return
    # Batch jobs get a line every `every_s` seconds: enough to see that long work moves and how fast,
    # without flooding a cron log with short loops.
    start = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s and i < total:
            last = now
            log.info("%s: %d/%d %s (%.1f %s/s)", desc, i, total, unit, i / (now - start), unit)
