"""How busy other processes keep the machine: what pneumo's threads adapt to on a shared machine.
No torch here, so that a command can ask before torch loads."""

from __future__ import annotations

import os
import time

BUSY_CORES = 0.5  # other processes' use of the machine, in cores, from which pneumo counts it as busy


class OtherWork:
    """How many cores other processes keep busy: the machine's busy time (/proc/stat, steal included:
    a virtual machine's host running others) less this process's own (/proc/self/stat), over the last
    `every` seconds or more. Where /proc is missing (not Linux), none."""

    def __init__(self, every: float = 0.25, read=None):
        self.every, self.read = every, read or _busy_ticks
        self.last, self.value = self.read(), 0.0

    def cores(self) -> float:
        # Cheap enough for every kernel call: the clock alone until `every` seconds have passed.
        if self.last is None or time.monotonic() - self.last[0] < self.every:
            return self.value
        now = self.read()
        if now is not None:
            machine, own = now[1] - self.last[1], now[2] - self.last[2]
            self.value = max(0.0, (machine - own) / TICKS / (now[0] - self.last[0]))
            self.last = now
        return self.value


def busy_now(seconds: float = 0.2, read=None) -> bool:
    """Whether other processes keep BUSY_CORES or more busy over the next `seconds`."""
    gauge = OtherWork(every=0.0, read=read)
    time.sleep(seconds)
    return gauge.cores() >= BUSY_CORES


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> tuple[float, int, int] | None:
    """(now, the machine's busy clock ticks, this process's), or None without /proc."""
    try:
        with open("/proc/stat", "rb") as f:
            cpu = f.readline().split()[1:]
        with open("/proc/self/stat", "rb") as f:
            own = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    busy = sum(int(v) for i, v in enumerate(cpu[:8]) if i not in (3, 4))
    return time.monotonic(), busy, int(own[11]) + int(own[12])  # utime, stime


# The process's gauge, read by the kernels and by inference before each batch. Made at import, so that
# its first answer already covers the time since (loading torch takes longer than `every`).
OTHERS = OtherWork()
