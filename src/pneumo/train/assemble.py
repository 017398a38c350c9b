"""The model a training run hands over: its members' best weights, calibrated and thresholded on validation.

Training keeps, for each member, the epoch with the best validation AUC. Here those members become one
model (their logits averaged), the calibration is fitted on validation, and the decision threshold and
the operating points are chosen on the calibrated validation probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumo.core.config import Config, to_dict
from pneumo.core.errors import PneumoError
from pneumo.data import Split
from pneumo.evaluate.metrics import binary_metrics, calibration_metrics, choose_threshold, operating_points
from pneumo.model import calibration
from pneumo.model.checkpoint import TrainedModel, provenance
from pneumo.train.rundir import config_changes


def assemble(cfg: Config, member_checkpoints: list[Path], splits: tuple[Split, Split], device) -> TrainedModel:
    """One model from the members' best checkpoints, calibrated and thresholded on validation, its
    applicability check fitted on the training images (`splits`: train, val)."""
    train, val = splits
    members = [TrainedModel.load(path) for path in member_checkpoints]
    model = TrainedModel(
        config=cfg,
        members=[m.members[0] for m in members],
        threshold=0.5,
        threshold_method=cfg.train.threshold,
        epoch=members[0].epoch if len(members) == 1 else [m.epoch for m in members],
        provenance=provenance(cfg),
    )
    raw = model.logits(val.images, device)
    model.calibration = calibration.fit(raw, val.labels, cfg.train.calibration)
    probs = calibration.probabilities(raw, model.calibration)
    model.threshold = choose_threshold(val.labels, probs, cfg.train.threshold, cfg.train.fixed_threshold)
    model.operating_points = operating_points(val.labels, probs)
    model.val_metrics = {**binary_metrics(val.labels, probs, model.threshold), **calibration_metrics(val.labels, probs)}
    model.val_metrics["ece_cross_validated"] = cross_validated_ece(raw, val.labels, cfg.train.calibration)
    model.fit_applicability(train.images, val.images, device)
    return model


def cross_validated_ece(raw: np.ndarray, labels: np.ndarray, method: str, folds: int = 5) -> float:
    """ECE of probabilities each calibrated on the other folds only: what the calibration is worth on
    images it was not fitted on (the in-sample ECE flatters it)."""
    order = np.random.default_rng(0).permutation(len(labels))
    probs = np.empty(len(labels))
    for k in range(folds):
        held = order[k::folds]
        rest = np.setdiff1d(order, held)
        fitted = calibration.fit(raw[rest], labels[rest], method)
        probs[held] = calibration.probabilities(raw[held], fitted)
    return calibration_metrics(labels, probs)["ece"]


# What may differ between an ensemble's config and a member trained apart from it.
MEMBER_KEYS = {
    "seed",
    "train.members",
    "output.dir",
    "output.tensorboard",
    "data.root",
    "data.cache_dir",
    "data.workers",
    "device",
    "train.eval_batch_size",
    "train.compile",
    "train.calibration",
    "train.threshold",
    "train.fixed_threshold",
    "model.tta",
}


def check_members(cfg: Config, checkpoints: list[Path]) -> None:
    """Each checkpoint must be a member `cfg` would have trained: the same recipe, another seed."""
    if len(checkpoints) != cfg.train.members:
        raise PneumoError(f"the config asks for train.members: {cfg.train.members}, and {len(checkpoints)} were given")
    seeds = []
    for path in checkpoints:
        member = TrainedModel.load(path)
        changed = config_changes(cfg, to_dict(member.config), MEMBER_KEYS)
        if changed:
            raise PneumoError(f"{path} was trained with another recipe than the ensemble's (at {', '.join(changed)})")
        seeds.append(member.config.seed)
    if sorted(seeds) != list(range(cfg.seed, cfg.seed + cfg.train.members)):
        raise PneumoError(
            f"the members' seeds are {sorted(seeds)}; the config's ensemble is seeds {cfg.seed} to "
            f"{cfg.seed + cfg.train.members - 1}"
        )
