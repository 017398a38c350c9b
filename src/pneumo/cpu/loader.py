"""Loading pneumo's numba kernels where they run well, with as many threads as torch uses, and what
the kernels' callers share: the pooling they fuse, and tensors handed over as NumPy arrays."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import torch
from torch import nn

from pneumo.core.load import BUSY_CORES, OTHERS
from pneumo.core.logs import log


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
        numba.get_num_threads()  # starts numba's threads: a threading layer that cannot load fails here
    except ImportError:
        return None
    except (ValueError, RuntimeError, OSError) as e:  # NUMBA_NUM_THREADS=0, a threading layer not installed
        log.warning("numba cannot start here (%s): torch's operators run instead", str(e).splitlines()[0])
        return None
    if numba.config.THREADING_LAYER == "workqueue":
        return None
    log.info("%s (numba %s: compiled at their first use after installing)", purpose, numba.__version__)
    return kernels


# Loop iterations (rows) a kernel's thread takes at a time. With numba's default, each thread gets a
# fixed share of the loop up front, and on a machine shared with other work one thread the system has
# paused holds its whole parallel region up; handed out a few rows at a time, the others take its share.
CHUNK_ROWS = 2


def set_threads() -> None:
    """numba's threads follow torch's setting (set_num_threads, OMP_NUM_THREADS), and share each loop
    out `CHUNK_ROWS` rows at a time (every row writes only its own outputs: the same results). While
    other processes take a share of the cores, the kernels run on one thread: a parallel region then
    waits at its barrier for whichever of its threads the system paused, and one thread ran faster."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads > 1 and OTHERS.cores() >= BUSY_CORES:
        threads = 1
    numba.set_num_threads(threads)
    numba.set_parallel_chunksize(CHUNK_ROWS)


@contextmanager
def inference_threads() -> Iterator[Callable[[], None]]:
    """Within the block, `follow()` (call it before each batch) gives torch one thread while other
    processes keep the machine busy, and its own setting back when they stop; the setting is restored
    at the end. Inference, unlike training, sums each output within one thread, so the bits are the same
    on any number of threads (a test checks); and under load torch's threads, like numba's, wait at
    every barrier for whichever of them the system paused, so that one thread scored faster."""
    configured = torch.get_num_threads()

    def follow() -> None:
        wanted = 1 if configured > 1 and OTHERS.cores() >= BUSY_CORES else configured
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    try:
        yield follow
    finally:
        if torch.get_num_threads() != configured:
            torch.set_num_threads(configured)


def eager_cpu_float32(x: torch.Tensor) -> bool:
    """Whether `x` is what the kernels take: float32 on the CPU, outside autocast, tracing and compiling
    (traced and compiled graphs, exports among them, keep torch's standard operators)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def plain_2x2(pool: nn.MaxPool2d) -> bool:
    """Whether `pool` is the plain 2x2 max-pool (stride 2, no padding or dilation, floor mode) that the
    kernels and the index-free pooling compute."""
    return (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == (2, 2, 0, 1, False)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A channels_last tensor's memory as a NumPy (N, H, W, C) array (a view, any strides)."""
    return t.detach().permute(0, 2, 3, 1).numpy()
