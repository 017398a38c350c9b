"""Faster CPU kernels for SmallCNN's blocks, behind one seam: `dispatch.block` runs relu(pool(bn(conv(x))))
by a kernel where one covers it, else returns None and the model runs its modules.

Two families, each equal to torch's modules up to rounding: `fused` (BatchNorm, pooling and ReLU in one
pass; the first block's convolution too) and `winograd` (3x3 convolutions by Winograd's F(4x4, 3x3)).
docs/performance.md says what each does and the invariant it keeps.

One switch, read here and nowhere else: the environment variable PNEUMO_CPU_KERNELS (1, the default:
all; 0: none; or a comma list of families) sets what may run; the config key `cpu_kernels: false` and
`kernels(False)` turn them off for a run or a block of code, never on where the environment says off.
This module imports no torch, so a command checks the variable before any work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pneumo.core.errors import PneumoError

FAMILIES = ("fused", "winograd")
ENVIRONMENT = "PNEUMO_CPU_KERNELS"
_enabled: frozenset[str] | None = None  # None: not read from the environment yet


def use_kernels(family: str) -> bool:
    """Whether the kernels of `family` may run."""
    global _enabled
    if _enabled is None:
        _enabled = environment_setting()
    return family in _enabled


def environment_setting() -> frozenset[str]:
    """The families PNEUMO_CPU_KERNELS allows; a value it cannot mean is the user's error (exit 2)."""
    text = os.environ.get(ENVIRONMENT, "1").strip().lower()
    if text in ("", "1", "on", "true", "yes", "all"):
        return frozenset(FAMILIES)
    if text in ("0", "off", "false", "no", "none"):
        return frozenset()
    names = {name.strip() for name in text.split(",")}
    if not names <= set(FAMILIES):
        raise PneumoError(f"{ENVIRONMENT}={text!r}: expected 1, 0 or a comma list of {', '.join(FAMILIES)}")
    return frozenset(names)


@contextmanager
def kernels(enabled: bool | Iterable[str]) -> Iterator[None]:
    """Within the block, only the families `enabled` names (True: all) and the environment allows."""
    global _enabled
    allowed = environment_setting()
    wanted = set(FAMILIES) if enabled is True else set() if enabled is False else set(enabled)
    before, _enabled = _enabled, frozenset(allowed & wanted)
    try:
        yield
    finally:
        _enabled = before
