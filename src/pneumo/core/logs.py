"""The package logger: lines on stderr, and in the log files a run or a job asks for."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("pneumo")
# INFO by default, so a run's train.log is complete whether the CLI or a library user started it.
log.setLevel(logging.INFO)
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging() -> None:
    """Log lines to stderr, once per process."""
    log.propagate = False
    if not any(getattr(h, "_pneumo_stderr", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._pneumo_stderr = True
        handler.setFormatter(_FORMAT)
        log.addHandler(handler)


@contextmanager
def logging_to(path: str | Path | None, mode: str = "a"):
    """Also write the log lines to `path` (nothing when None) while the block runs."""
    if path is None:
        yield
        return
    handler = _FileHandler(path, mode=mode, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_FORMAT)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


class _FileHandler(logging.FileHandler):
    """A log file that cannot be written (a full disk) says so once on stderr, in one line, and the
    command goes on: its results do not depend on its log."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"pneumo: cannot write the log file {self.baseFilename} ({error}); going on", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()  # flushes: on a full disk, that fails as every write did
        except OSError:
            pass
