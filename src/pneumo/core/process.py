"""Process-wide settings for the processes pneumo owns (its command lines), never a library user's."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from contextlib import contextmanager

from pneumo.core.load import busy_now


class Terminated(BaseException):
    """SIGTERM, as a batch system sends it to stop a job: handled like Ctrl-C, with its own exit code."""


@contextmanager
def sigterm_raises():
    """Turn SIGTERM into `Terminated` while the block runs, so that cleanup (locks, temp files) runs."""

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the system (glibc only).

    A training step allocates and frees activations of tens of MB. glibc serves blocks that large
    with mmap and unmaps them when freed, so the next step faults every page in again and the kernel
    zeroes it. With mmap off and trimming held back, the same memory is reused from step to step.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, for one): nothing to tune
        return False


def idle_threads_sleep() -> bool:
    """Make torch's idle OpenMP threads sleep instead of spinning where other processes keep the
    machine busy as the command starts (unless OMP_WAIT_POLICY is set).

    On an idle machine spinning is faster: each parallel region starts without a wake-up, and no work
    of pneumo's own runs beside torch's threads (pneumo-predict decodes a block, then scores it).
    Beside other work a spinning thread burns the turns its partners need, and sleepers are woken
    ahead of the other work. OpenMP reads the setting once, when torch loads it, so this does something
    only before torch is imported (it reports whether it did).
    """
    if "torch" in sys.modules:
        return False
    return threads_sleep_in(os.environ, busy_now)


def threads_sleep_in(environ, busy) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ`, a process's environment before torch loads in it, unless
    it names a policy or `busy` (a check of the machine's load) says the machine is idle."""
    if "OMP_WAIT_POLICY" in environ or not busy():
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
