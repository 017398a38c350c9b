"""Fine-tuning a trained model on a site's labelled sample.

Every network of the model trains a few epochs on the sample with the model's own augmentation, its
BatchNorm statistics moving to the site's images, while each step pulls the weights back towards
where they started (L2-SP: Li, Grandvalet and Davoine, ICML 2018). A sample of a few hundred images
then adjusts the model instead of replacing it with a network fitted to those images alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pneumo.core.device import prepare, resolve_device, training_dtype
from pneumo.model.checkpoint import TrainedModel
from pneumo.model.network import build_model
from pneumo.train.engine import Optimization, TrainingData, train_one_epoch
from pneumo.train.run import warmup_cosine


@dataclass(frozen=True)
class Recipe:
    # Optimizer steps rather than epochs, so that samples of any size train alike. At 200 images a site's
    # AUC still climbed from 1,200 steps to 2,400 (docs/new-site.md).
    steps: int = 2400
    lr: float = 3e-3
    # The pull towards the starting weights: each step moves every weight by lr * anchor of its distance
    # from where it started (decoupled, as AdamW decays towards zero).
    anchor: float = 0.1
    batch_size: int = 32
    # How many of an ensemble's networks to fine-tune, from the first, for each cross-validation fold.
    networks: int = 1

    def epochs(self, n: int) -> int:
        return math.ceil(self.steps / math.ceil(n / self.batch_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fine_tune(model: TrainedModel, images: np.ndarray, labels: np.ndarray, recipe: Recipe, seed: int = 0) -> list:
    """The state dicts of `model`'s networks after fine-tuning each on uint8 `images` (N, H, W) with
    `labels`; the model itself is left as it was."""
    device = resolve_device(model.device)
    torch.manual_seed(seed)
    data = TrainingData(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        recipe.batch_size,
        model.config.augment,
        torch.Generator().manual_seed(seed),
        device,
    )
    # Both classes weigh the same, whatever the sample's balance: the threshold is set afterwards.
    pos_weight = torch.tensor(float(np.sum(labels == 0) / max(np.sum(labels == 1), 1)), device=device)
    members = []
    chosen = model.members[: recipe.networks]
    for k, state in enumerate(chosen, 1):
        network = build_model(model.config.model)
        network.load_state_dict(state)
        network = prepare(network, device)
        opt = _optimization(network, recipe, len(labels), nn.BCEWithLogitsLoss(pos_weight=pos_weight), device)
        epochs = recipe.epochs(len(labels))
        for epoch in range(epochs):
            train_one_epoch(opt, data, desc=f"fine-tuning network {k}/{len(chosen)}, epoch {epoch + 1}/{epochs}")
        members.append({name: v.detach().cpu().contiguous() for name, v in network.state_dict().items()})
    return members


def _optimization(network: nn.Module, recipe: Recipe, n: int, loss_fn: nn.Module, device) -> Optimization:
    steps = recipe.epochs(n) * math.ceil(n / recipe.batch_size)
    optimizer = network.configure_optimizer(recipe.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps // 10, steps))
    start = {p: p.detach().clone() for p in network.parameters()}

    def pull_to_start(opt, args, kwargs) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                factor = group["lr"] * recipe.anchor
                for p in group["params"]:
                    p.sub_(p - start[p], alpha=factor)

    optimizer.register_step_post_hook(pull_to_start)
    return Optimization(network, optimizer, scheduler, loss_fn, training_dtype("auto", device))
