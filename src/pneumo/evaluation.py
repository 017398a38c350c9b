"""Evaluate a checkpoint on one split: metrics.json, predictions.csv and a printed table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from pneumo.checkpoint import atomic_write_text, load_checkpoint, model_from_checkpoint
from pneumo.config import apply_override, from_dict
from pneumo.data import bad_image_report, load_split
from pneumo.engine import predict, prepare, resolve_device
from pneumo.metrics import binary_metrics
from pneumo.numpy_backend import numpy_model_from_checkpoint, predict_numpy
from pneumo.progress import log


def evaluate(
    checkpoint: str | Path, out_dir: str | Path, split: str = "test", overrides: list[str] = (), backend: str = "torch"
) -> dict:
    """Score `split` with the checkpoint's model at the threshold chosen on validation during training.

    The data settings come from the checkpoint's config; `overrides` (`data.root=DIR`, `device=cpu`...)
    adapt them to this machine. `backend="numpy"` runs the NumPy reference network (float64) instead.
    """
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    raw = ckpt["config"]
    for item in overrides:
        raw = apply_override(raw, item)
    cfg = from_dict(raw, source=f"{checkpoint} with --set {' '.join(overrides)}" if overrides else str(checkpoint))

    data = load_split(cfg, split)
    data.require_both_classes()
    log.info("%s", data.describe())
    if backend == "numpy":
        probs = predict_numpy(numpy_model_from_checkpoint(ckpt), data.images, cfg.train.eval_batch_size)
    else:
        device = resolve_device(cfg.device)
        probs = predict(prepare(model, device), torch.from_numpy(data.images), cfg.train.eval_batch_size, device)

    metrics = {
        **binary_metrics(data.labels, probs, ckpt["threshold"]),
        "threshold_method": ckpt["threshold_method"],
        "split": split,
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": ckpt["epoch"],
        "backend": backend,
        "n_skipped": len(data.skipped),
    }
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out_dir / "predictions.csv", _predictions_csv(data.ids, data.labels, probs, ckpt["threshold"]))
    if data.skipped:
        atomic_write_text(out_dir / "bad_images.csv", bad_image_report(data))
        log.warning("skipped %d unusable image files: see %s", len(data.skipped), out_dir / "bad_images.csv")
    log.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "predictions.csv")
    return metrics


def _predictions_csv(ids, labels, probs, threshold) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "probability", "prediction"])
    for i, y, p in zip(ids, labels, probs):
        writer.writerow([i, int(y), f"{p:.6f}", int(p >= threshold)])
    return buf.getvalue()
