"""The training run: data, model and optimizer, the epoch loop, validation, checkpoints, early stopping.

`train` reads top to bottom. Under torchrun every process trains on its share of each batch; only
the main process (rank 0) validates, logs and writes, and it alone decides when to stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo import cpu
from pneumo.core import distributed
from pneumo.core.config import Config
from pneumo.core.device import hold, prepare, reproducible, training_dtype
from pneumo.core.distributed import Context
from pneumo.core.errors import PneumoError
from pneumo.core.logs import log
from pneumo.data import Split, load_split
from pneumo.evaluate.metrics import bce, binary_metrics, choose_threshold, operating_points
from pneumo.model.checkpoint import TrainedModel, provenance, save_checkpoint
from pneumo.model.inference import predict
from pneumo.model.network import SmallCNN, build_model
from pneumo.train.assemble import assemble
from pneumo.train.curves import summary_writer
from pneumo.train.engine import Optimization, TrainingData, train_one_epoch
from pneumo.train.rundir import RunDir

# Keys a resumed run may change: how long it goes on, and where it runs.
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.patience",
    "device",
    "data.workers",
    "train.eval_batch_size",
    "train.compile",
}


def train(cfg: Config, resume: bool = False) -> dict:
    """Train as `cfg` says, writing everything into cfg.output.dir, and return the validation record
    of the model it hands over: best.pt, calibrated and thresholded on validation."""
    with cpu.kernels(cfg.cpu_kernels), distributed.session(cfg.device) as (ctx, device):
        if cfg.output.tensorboard:
            summary_writer()  # a missing tensorboard package stops the run before any work
        if cfg.train.compile and ctx.world > 1:
            # torch.compile of a DistributedDataParallel (and SyncBatchNorm) module has open failures in
            # torch, and no machine here has several GPUs to show it works: one process only.
            raise PneumoError("train.compile works in one process only: set train.compile: false under torchrun")
        if cfg.train.batch_size % ctx.world:
            raise PneumoError(
                f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of processes ({ctx.world})"
            )
        initial_weights(cfg)  # a checkpoint of another architecture stops the run before any work
        reproducible(device)
        if cfg.train.members == 1:
            return train_member(cfg, resume, ctx, device, final=True)
        run = RunDir(cfg.output.dir, ctx)
        with run.ensemble_session(cfg, fresh=not resume):
            members = [member_config(cfg, k) for k in range(cfg.train.members)]
            for k, member in enumerate(members, 1):
                log.info("ensemble member %d of %d (seed %d)", k, len(members), member.seed)
                train_member(member, resume and (Path(member.output.dir) / "last.pt").exists(), ctx, device)
            splits = (load_split(cfg, "train"), load_split(cfg, "val"))
            return hand_over(cfg, run, [Path(m.output.dir) / "best.pt" for m in members], splits, device)


def train_member(cfg: Config, resume: bool, ctx: Context, device: torch.device, final: bool = False) -> dict:
    """One network's training run in cfg.output.dir: best.pt holds its best epoch, or, when this run is
    the whole model (`final`), the model handed over."""
    run = RunDir(cfg.output.dir, ctx)
    previous = run.resume_point(cfg, RESUMABLE_CHANGES) if resume else None
    torch.manual_seed(cfg.seed)
    train_split, val_split = load_splits(cfg, ctx)
    for split in (train_split, val_split):
        split.require_both_classes()
        log.info("%s", split.describe())
    with run.session(cfg, (train_split, val_split), previous):
        parts = build(cfg, train_split, val_split, device, ctx)
        state = parts.restore(previous) if previous else TrainState(data=run.data_fingerprint)
        if previous:
            log.info("resuming %s after epoch %d", run.path, state.epoch)
        best = fit(cfg, run, parts, state)
        return hand_over(cfg, run, [run.best], (train_split, val_split), device) if final else best


def load_splits(cfg: Config, ctx: Context) -> tuple[Split, Split]:
    """The train and validation splits. Under torchrun rank 0 decodes them into the cache first and the
    others then read it, rather than every process decoding every file at once."""
    if not ctx.main:
        ctx.barrier()
    splits = load_split(cfg, "train"), load_split(cfg, "val")
    if ctx.main:
        ctx.barrier()
    return splits


def member_config(cfg: Config, k: int) -> Config:
    """The config of ensemble member k: its own seed and run directory, the rest shared (the validation
    split too: it is drawn by data.split_seed)."""
    seed = cfg.seed + k
    directory = str(Path(cfg.output.dir) / "members" / f"seed-{seed}")
    return replace(cfg, seed=seed, train=replace(cfg.train, members=1), output=replace(cfg.output, dir=directory))


def hand_over(cfg: Config, run: RunDir, checkpoints: list[Path], splits: tuple[Split, Split], device) -> dict:
    """Write the run's final best.pt: the members' best epochs as one model, calibrated and thresholded
    on validation (splits: train, val), with its applicability statistics. The per-epoch figures in
    metrics.jsonl are before calibration."""
    if not run.ctx.main:
        return {}
    model = assemble(cfg, checkpoints, splits, device)
    save_checkpoint(run.best, model.payload())
    m = model.val_metrics
    log.info(
        "final model (epoch %s, %s calibration): val AUC %.4f, accuracy %.4f, sensitivity %.4f, specificity %.4f "
        "at threshold %.4f (%s), ECE %.4f (cross-validated %.4f); %s",
        model.epoch,
        cfg.train.calibration,
        m["auc"],
        m["accuracy"],
        m["sensitivity"],
        m["specificity"],
        model.threshold,
        cfg.train.threshold,
        m["ece"],
        m["ece_cross_validated"],
        run.best,
    )
    scalars = {f"val_{k}": v for k, v in m.items() if isinstance(v, (int, float))}
    return {"epoch": model.epoch, **scalars}


@dataclass
class TrainState:
    """Where the run stands between epochs; saved in last.pt with the optimizer and random states."""

    data: str  # fingerprint of the train and validation file lists: a resumed run must see the same
    epoch: int = 0
    best_auc: float = -math.inf
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    def record(self, row: dict) -> bool:
        """Add an epoch's record; True when its validation AUC is a new best."""
        self.history.append(row)
        if row["val_auc"] > self.best_auc:
            self.best_auc, self.bad_epochs = row["val_auc"], 0
            return True
        self.bad_epochs += 1
        return False

    def out_of_patience(self, patience: int, epochs: int) -> bool:
        return patience > 0 and self.bad_epochs >= patience and self.epoch < epochs

    def best(self) -> dict:
        return max(self.history, key=lambda r: r["val_auc"])


@dataclass
class Parts:
    """The built pieces of a run: the model whose weights are saved and validated, what steps it, the
    training data stream, the validation split and its images on the device."""

    model: SmallCNN
    opt: Optimization
    data: TrainingData
    val: Split
    val_images: torch.Tensor
    pos_weight: float | None

    def restore(self, ckpt: dict) -> TrainState:
        training = ckpt["training"]
        self.model.load_state_dict(ckpt["members"][0])
        self.opt.optimizer.load_state_dict(training["optimizer"])
        self.opt.scheduler.load_state_dict(training["scheduler"])
        self.data.generator.set_state(training["rng"]["generator"])
        torch.set_rng_state(training["rng"]["torch"])
        if self.data.device.type == "cuda" and "cuda" in training["rng"]:
            torch.cuda.set_rng_state(training["rng"]["cuda"])
        return TrainState(**training["state"])

    def training_payload(self, state: TrainState) -> dict:
        rng = {"generator": self.data.generator.get_state(), "torch": torch.get_rng_state()}
        if self.data.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return {
            "state": asdict(state),
            "optimizer": self.opt.optimizer.state_dict(),
            "scheduler": self.opt.scheduler.state_dict(),
            "rng": rng,
        }


def build(cfg: Config, train_split: Split, val_split: Split, device: torch.device, ctx: Context) -> Parts:
    t = cfg.train
    model = build_model(cfg.model)  # first, so the seed alone decides the initial weights
    if cfg.train.init_from:
        model.load_state_dict(initial_weights(cfg))
    model = prepare(model, device)
    optimizer = model.configure_optimizer(t.lr, t.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / t.batch_size)
    schedule = warmup_cosine(round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    pos_weight = _pos_weight(t.pos_weight, train_split.labels)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=device))
    # The whole split stays in memory as uint8; on a GPU it lives on the device where it fits, so no step
    # waits for the host.
    images, labels = torch.from_numpy(train_split.images), torch.from_numpy(train_split.labels)
    images, labels, val_images = hold([images, labels, torch.from_numpy(val_split.images)], device)
    data = TrainingData(images, labels, t.batch_size, cfg.augment, torch.Generator().manual_seed(cfg.seed), device, ctx)
    opt = Optimization(
        _step_model(model, cfg, device, ctx), optimizer, scheduler, loss_fn, training_dtype(t.precision, device)
    )
    return Parts(model, opt, data, val_split, val_images, pos_weight)


def initial_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """The weights train.init_from gives this run's network: those of the checkpoint's network trained
    with the same seed, else of its first. None without train.init_from."""
    if not cfg.train.init_from:
        return None
    source = TrainedModel.load(cfg.train.init_from)
    if (source.config.model.channels, source.config.model.stem_stride) != (cfg.model.channels, cfg.model.stem_stride):
        raise PneumoError(
            f"train.init_from {cfg.train.init_from}: its networks have channels {source.config.model.channels} and "
            f"stem_stride {source.config.model.stem_stride}, this config's {cfg.model.channels} and "
            f"{cfg.model.stem_stride}"
        )
    k = cfg.seed - source.config.seed
    return source.members[k if 0 <= k < len(source.members) else 0]


def fit(cfg: Config, run: RunDir, parts: Parts, state: TrainState) -> dict:
    """The epoch loop: train, validate (main process), keep the best, save, decide whether to stop."""
    t, ctx = cfg.train, run.ctx
    log.info(
        "training on %s (%s): %d epochs of %d steps, batch %d, pos_weight %s, %d parameters",
        parts.data.device,
        str(parts.opt.dtype).removeprefix("torch."),
        t.epochs,
        math.ceil(len(parts.data) / t.batch_size),
        t.batch_size,
        parts.pos_weight,
        sum(p.numel() for p in parts.model.parameters()),
    )
    while not state.stopped_early and state.epoch < t.epochs:
        start = time.perf_counter()
        loss, data_s = train_one_epoch(parts.opt, parts.data, desc=f"epoch {state.epoch + 1}/{t.epochs}")
        train_s = time.perf_counter() - start
        state.epoch += 1
        if not ctx.main:
            state.stopped_early = ctx.agree(False)
            continue
        val = validate(parts, cfg)
        row = {
            "epoch": state.epoch,
            "train_loss": loss,
            **val.record(),
            "lr": parts.opt.optimizer.param_groups[0]["lr"],
            "train_images_per_s": len(parts.data) / train_s,
            "data_wait_fraction": data_s / train_s,
        }
        row["epoch_s"] = time.perf_counter() - start
        if state.record(row):
            save_checkpoint(run.best, trained_model(cfg, parts.model, state.epoch, val).payload())
        state.stopped_early = ctx.agree(state.out_of_patience(t.patience, t.epochs))
        save_checkpoint(
            run.last,
            {**trained_model(cfg, parts.model, state.epoch, val).payload(), "training": parts.training_payload(state)},
        )
        run.record(row, state.history)
        _log_epoch(row, t.epochs, state, t.patience)
    return _finish(run, state)


@dataclass
class Validation:
    labels: np.ndarray
    probs: np.ndarray
    threshold: float
    metrics: dict

    def record(self) -> dict:
        return {
            "val_loss": bce(self.labels, self.probs),
            **{f"val_{k}": v for k, v in self.metrics.items() if k != "confusion_matrix"},
        }


def validate(parts: Parts, cfg: Config) -> Validation:
    """Score the validation split, choose the decision threshold on it, and measure at that threshold."""
    probs = predict(parts.model, parts.val_images, cfg.train.eval_batch_size, parts.data.device, desc="validating")
    labels = parts.val.labels
    threshold = choose_threshold(labels, probs, cfg.train.threshold, cfg.train.fixed_threshold)
    return Validation(labels, probs, threshold, binary_metrics(labels, probs, threshold))


def trained_model(cfg: Config, model: SmallCNN, epoch: int, val: Validation) -> TrainedModel:
    return TrainedModel(
        config=cfg,
        members=[{k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}],
        threshold=val.threshold,
        threshold_method=cfg.train.threshold,
        operating_points=operating_points(val.labels, val.probs),
        val_metrics=val.metrics,
        epoch=epoch,
        provenance=provenance(cfg),
    )


def _finish(run: RunDir, state: TrainState) -> dict:
    if not run.ctx.main:
        return {}
    best = state.best()
    log.info(
        "best epoch %d: val AUC %.4f, F1 %.4f, accuracy %.4f at threshold %.4f; checkpoint %s",
        best["epoch"],
        best["val_auc"],
        best["val_f1"],
        best["val_accuracy"],
        best["val_threshold"],
        run.best,
    )
    return best


def _log_epoch(row: dict, epochs: int, state: TrainState, patience: int) -> None:
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f, F1 %.4f, accuracy %.4f (%.0f s, "
        "%.0f img/s, %.0f%% of it preparing data)",
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_auc"],
        row["val_f1"],
        row["val_accuracy"],
        row["epoch_s"],
        row["train_images_per_s"],
        100 * row["data_wait_fraction"],
    )
    if state.stopped_early:
        log.info("stopping early: validation AUC has not improved for %d epochs", patience)


def _step_model(model: nn.Module, cfg: Config, device: torch.device, ctx: Context) -> nn.Module:
    """The module the optimizer steps: wrapped for several processes, compiled if asked."""
    step_model = model
    if ctx.world > 1:
        if cfg.train.sync_bn and device.type == "cuda":
            step_model = nn.SyncBatchNorm.convert_sync_batchnorm(step_model)
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        step_model = torch.compile(step_model)
    return step_model


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    return factor


def _pos_weight(setting, labels: np.ndarray) -> float | None:
    if setting == "auto":
        return float(np.sum(labels == 0) / max(np.sum(labels == 1), 1))
    return setting
