"""Loading pneumo's numba kernels where they run well, with as many threads as torch uses."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from pneumo.logs import log


@functools.cache
def load(module: str, purpose: str) -> ModuleType | None:
    """The kernel module `module`, imported (which compiles its kernels, or loads them from numba's cache),
    or None where they cannot run well: without numba, or without an OpenMP or TBB runtime for numba's
    threads. Numba's fallback threads wait by spinning and yielding, which takes turns from torch's
    threads: slower than torch's own operators. Loaded, `purpose` is logged once."""
    try:
        import numba

        try:
            from numba.np.ufunc import omppool  # noqa: F401 (it loads only where libgomp is installed)
        except ImportError:
            from numba.np.ufunc import tbbpool  # noqa: F401
        kernels = importlib.import_module(module)
    except ImportError:
        return None
    if numba.config.THREADING_LAYER == "workqueue":
        return None
    log.info("%s (numba %s: compiled at their first use after installing)", purpose, numba.__version__)
    return kernels


def set_threads() -> None:
    """numba's threads follow torch's setting (set_num_threads, OMP_NUM_THREADS)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
