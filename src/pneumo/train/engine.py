"""One training epoch, on CUDA (bf16, channels_last) or the CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pneumo.core.config import AugmentConfig
from pneumo.core.device import autocast, to_device, to_input
from pneumo.core.distributed import Context
from pneumo.core.progress import batches
from pneumo.data.augment import augment


@dataclass
class Optimization:
    """What a training step needs: the module to step (possibly wrapped for DDP or compiled), the
    optimizer and its schedule, the loss and the autocast dtype."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    dtype: torch.dtype


@dataclass
class TrainingData:
    """The training split (uint8, on the device where possible) and how an epoch draws from it: in an
    order and with augmentations drawn from `generator`, in global batches of which this process
    (`ctx`) takes its rows."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    augment: AugmentConfig
    generator: torch.Generator
    device: torch.device
    ctx: Context = Context()

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of one epoch, float in [0, 1] and augmented, this process's rows only."""
        order = torch.randperm(len(self.labels), generator=self.generator)
        rows = self.ctx.rows
        for part in batches(len(order), self.batch_size, desc):
            batch = order[part]
            if len(batch) < self.ctx.world:
                continue  # a last batch too small for every process to get a row: skipped by all alike
            at = to_device(batch[rows], self.images.device)
            # index_select copies whole images; indexing with a tensor (images[idx]) goes element by element.
            x = to_input(self.images.index_select(0, at), self.device)
            y = self.labels.index_select(0, at).to(self.device, non_blocking=True).float()
            if self.augment.enabled:
                x = augment(x, self.augment, self.generator, global_batch=len(batch), rows=rows)
            yield x, y


def train_one_epoch(opt: Optimization, data: TrainingData, desc: str) -> tuple[float, float]:
    """Train on every image once; return the mean loss over all processes and the seconds spent
    preparing batches (indexing, copying, augmenting)."""
    opt.model.train()
    total, seen = torch.zeros((), device=data.device), 0
    timer = PhaseTimer(data.device)
    for x, y in timer.timed(data.batches(desc)):
        with autocast(data.device, opt.dtype):
            logits = opt.model(x)
        loss = opt.loss_fn(logits.float(), y)
        opt.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        opt.optimizer.step()
        opt.scheduler.step()
        # Accumulate on the device: a .item() per step would make the GPU wait for the host.
        total += loss.detach() * len(y)
        seen += len(y)
    totals = data.ctx.sum(torch.stack([total, torch.tensor(float(seen), device=data.device)]))
    return float(totals[0]) / float(totals[1]), timer.total()


class PhaseTimer:
    """Seconds spent producing the items of an iterator. On CUDA it records events and reads them once
    at the end, so measuring never makes the GPU wait."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0

    def timed(self, items: Iterator) -> Iterator:
        while True:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t = time.perf_counter()
            item = next(items, None)
            if self.cuda:
                end.record()
                self.events.append((start, end))
            else:
                self.seconds += time.perf_counter() - t
            if item is None:
                return
            yield item

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000
        return self.seconds
