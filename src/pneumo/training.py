"""The training run: data, model, optimizer, the epoch loop, checkpoints and early stopping."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from pneumo import __version__, distributed
from pneumo.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from pneumo.config import Config, to_dict
from pneumo.data import bad_image_report, load_split, split_manifest
from pneumo.engine import predict, prepare, train_one_epoch, training_dtype
from pneumo.errors import PneumoError
from pneumo.metrics import bce, binary_metrics, choose_threshold, operating_points
from pneumo.models import build_model
from pneumo.progress import add_log_file, log

# Keys a resumed run may change: how long it goes on, and where it runs.
RESUMABLE_CHANGES = {"train.epochs", "train.patience", "device", "data.workers", "train.eval_batch_size", "train.compile"}


def train(cfg: Config, resume: bool = False) -> dict:
    """Train as `cfg` says, writing everything into cfg.output.dir; return the best epoch's record.

    Under torchrun every process trains on its share of each batch; only rank 0 validates and writes.
    """
    ctx, device = distributed.setup(cfg.device)
    try:
        best = _train(cfg, resume, ctx, device)
    except BaseException:
        distributed.teardown(ctx, finished=False)  # torchrun stops the other processes
        raise
    distributed.teardown(ctx)
    return best


def _train(cfg: Config, resume: bool, ctx: distributed.Context, device: torch.device) -> dict:
    run_dir = Path(cfg.output.dir)
    if not ctx.main:
        log.setLevel(logging.WARNING)  # one process speaks for the run
    if cfg.train.batch_size % ctx.world:
        raise PneumoError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of processes ({ctx.world})")
    ckpt = _resume_state(cfg, run_dir) if resume else None
    torch.manual_seed(cfg.seed)

    train_split, val_split = load_split(cfg, "train"), load_split(cfg, "val")
    for split in (train_split, val_split):
        split.require_both_classes()
        log.info("%s", split.describe())
    if not ctx.main:
        return _fit(cfg, run_dir, device, train_split, val_split, ckpt, ctx)

    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        for stale in ("best.pt", "last.pt", "metrics.jsonl"):
            if (run_dir / stale).exists():
                log.warning("starting a new run in %s: replacing the earlier run's %s", run_dir, stale)
                (run_dir / stale).unlink()
    log_handler = add_log_file(run_dir / "train.log")
    try:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(run_dir / "split.json", split_manifest(train_split, val_split))
        skipped = len(train_split.skipped) + len(val_split.skipped)
        if skipped:
            atomic_write_text(run_dir / "bad_images.csv", bad_image_report(train_split, val_split))
            log.warning("skipped %d unusable image files: see %s", skipped, run_dir / "bad_images.csv")
        return _fit(cfg, run_dir, device, train_split, val_split, ckpt, ctx)
    finally:
        log.removeHandler(log_handler)
        log_handler.close()


def _fit(cfg, run_dir, device, train_split, val_split, ckpt, ctx) -> dict:
    t = cfg.train
    model = prepare(build_model(cfg.model), device)  # the module whose weights are saved and validated
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)
    steps_per_epoch = math.ceil(len(train_split) / t.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch)
    )
    pos_weight = _pos_weight(t.pos_weight, train_split.labels)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=device))
    gen = torch.Generator().manual_seed(cfg.seed)

    # The whole split stays in memory as uint8 (5216 Kermany images at 224x224 are 262 MB); on a GPU
    # it lives on the device, so no step waits for the host.
    images = torch.from_numpy(train_split.images)
    labels = torch.from_numpy(train_split.labels)
    val_images = torch.from_numpy(val_split.images)
    if device.type == "cuda":
        images, labels, val_images = images.to(device), labels.to(device), val_images.to(device)

    state = {"epoch": 0, "best_auc": -math.inf, "bad_epochs": 0, "history": [], "stopped_early": False}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        state = {k: ckpt[k] for k in state}
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    if ctx.main:
        # Rewritten from the checkpoint, so epochs trained after the last checkpoint of a killed run vanish.
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
    step_model = model
    if ctx.world > 1:
        if t.sync_bn and device.type == "cuda":
            step_model = nn.SyncBatchNorm.convert_sync_batchnorm(step_model)
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        step_model = torch.compile(step_model)

    dtype = training_dtype(t.precision, device)
    log.info(
        "training on %s (%s): %d epochs of %d steps, batch %d, pos_weight %s, %d parameters",
        device, str(dtype).removeprefix("torch."), t.epochs, steps_per_epoch, t.batch_size, pos_weight,
        sum(p.numel() for p in model.parameters()),
    )
    while not state["stopped_early"] and state["epoch"] < t.epochs:
        epoch = state["epoch"] + 1
        start = time.perf_counter()
        loss, data_s = train_one_epoch(
            step_model, images, labels, optimizer, scheduler, loss_fn, t.batch_size, cfg.augment, gen, device,
            desc=f"epoch {epoch}/{t.epochs}", rank=ctx.rank, world=ctx.world, dtype=dtype,
        )
        train_s = time.perf_counter() - start
        state["epoch"] = epoch
        if not ctx.main:
            state["stopped_early"] = ctx.agree(False)
            continue
        probs = predict(model, val_images, t.eval_batch_size, device, desc="validating")
        threshold = choose_threshold(val_split.labels, probs, t.threshold, t.fixed_threshold)
        metrics = binary_metrics(val_split.labels, probs, threshold)
        record = {
            "epoch": epoch,
            "train_loss": loss,
            "val_loss": bce(val_split.labels, probs),
            **{f"val_{k}": v for k, v in metrics.items() if k != "confusion_matrix"},
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": len(train_split) / train_s,
            "data_wait_fraction": data_s / train_s,
            "epoch_s": time.perf_counter() - start,
        }
        state["history"].append(record)
        if metrics["auc"] > state["best_auc"]:
            state["best_auc"], state["bad_epochs"] = metrics["auc"], 0
            best_payload = _model_payload(cfg, model, epoch, threshold, metrics)
            best_payload["operating_points"] = operating_points(val_split.labels, probs)
            save_checkpoint(run_dir / "best.pt", best_payload)
        else:
            state["bad_epochs"] += 1
        state["stopped_early"] = ctx.agree(t.patience > 0 and state["bad_epochs"] >= t.patience and epoch < t.epochs)
        save_checkpoint(run_dir / "last.pt", {
            **_model_payload(cfg, model, epoch, threshold, metrics),
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(gen, device),
        })
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f, F1 %.4f, accuracy %.4f (%.0f s, %.0f img/s, %.0f%% of it preparing data)",
            epoch, t.epochs, loss, record["val_loss"], metrics["auc"], metrics["f1"], metrics["accuracy"],
            record["epoch_s"], record["train_images_per_s"], 100 * record["data_wait_fraction"],
        )
        if state["stopped_early"]:
            log.info("stopping early: validation AUC has not improved for %d epochs", t.patience)

    if not ctx.main:
        return {}
    best = max(state["history"], key=lambda r: r["val_auc"])
    log.info(
        "best epoch %d: val AUC %.4f, F1 %.4f, accuracy %.4f at threshold %.4f; checkpoint %s",
        best["epoch"], best["val_auc"], best["val_f1"], best["val_accuracy"], best["val_threshold"], run_dir / "best.pt",
    )
    return best


def _resume_state(cfg: Config, run_dir: Path) -> dict:
    path = run_dir / "last.pt"
    if not path.exists():
        raise PneumoError(f"nothing to resume: {path} does not exist (run without --resume to start)")
    ckpt = load_checkpoint(path)
    new, old = _flat(to_dict(cfg)), _flat(ckpt["config"])
    changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise PneumoError(f"the config differs from the run being resumed in {run_dir} at: {', '.join(changed)}")
    return ckpt


def _model_payload(cfg, model, epoch, threshold, metrics) -> dict:
    return {
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": to_dict(cfg),
        "epoch": epoch,
        "threshold": threshold,
        "threshold_method": cfg.train.threshold,
        "val_metrics": metrics,
        "versions": {"pneumo": __version__, "torch": str(torch.__version__)},
    }


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay only conv and linear weights: decaying BatchNorm scales and biases only fights the normalization.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(warmup_steps: int, total_steps: int):
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out
