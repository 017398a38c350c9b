"""Multi-process training under torchrun: NCCL on GPUs, gloo on CPUs, chosen automatically.

`torchrun --nproc_per_node=N scripts/train.py --config ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them everything here is a single process and costs nothing. Every rank decision of the
pipeline goes through a `Context`: `main` says whether this process speaks and writes for the run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pneumo.core.device import resolve_device
from pneumo.core.errors import PneumoError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # Every collective's tensors live here: NCCL takes CUDA tensors only, gloo CPU ones.
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that validates, logs and writes files."""
        return self.rank == 0

    @property
    def rows(self) -> slice:
        """This process's share of a global batch."""
        return slice(self.rank, None, self.world)

    def agree(self, flag: bool) -> bool:
        """Rank 0's value of `flag`, on every rank (for decisions only rank 0 can make)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the processes (on this process's device)."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            # NCCL's barrier needs to know the GPU, or it guesses one and may hang.
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()


@contextmanager
def session(device_setting: str):
    """(Context, device) for this process; the process group, if any, is left together at the end."""
    ctx, device = _setup(device_setting)
    try:
        yield ctx, device
    except BaseException:
        _teardown(ctx, finished=False)  # torchrun stops the other processes
        raise
    _teardown(ctx, finished=True)


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _setup(device_setting: str) -> tuple[Context, torch.device]:
    world = _world_size()
    if world == 1:
        return Context(), resolve_device(device_setting)
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if device_setting == "cuda" and not use_cuda:
        resolve_device("cuda")  # raises the usual clear error
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise PneumoError(f"process {local_rank} has no GPU: this node has {n}; use --nproc_per_node={n}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device), device


def _world_size() -> int:
    """WORLD_SIZE as torchrun sets it, with the variables that come with it: a WORLD_SIZE left in the
    environment of a plain run (a shell, a cron job's wrapper) is one sentence, not a rendezvous error."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise PneumoError(f"WORLD_SIZE={text[:20]} is not a number of processes: unset it, or start under torchrun")
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if int(text) > 1 and missing:
        raise PneumoError(
            f"WORLD_SIZE={text} is set but {', '.join(missing)} not: start under torchrun, or unset WORLD_SIZE"
        )
    return int(text)


def _teardown(ctx: Context, finished: bool) -> None:
    if ctx.world > 1 and dist.is_initialized():
        if finished:
            # Everyone leaves together: a process that closes its gloo connections while a peer is
            # still reading from them makes that peer abort.
            ctx.barrier()
        dist.destroy_process_group()
