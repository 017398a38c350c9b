"""Evaluate a checkpoint on one split: metrics.json, predictions.csv and a printed table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from pneumo.checkpoint import atomic_write_text, checkpoint_config, load_checkpoint, model_from_checkpoint
from pneumo.data import bad_image_report, load_split
from pneumo.data.images import load_image
from pneumo.engine import predict, prepare, resolve_device
from pneumo.explain import grad_cam, most_confident_errors, save_overlay
from pneumo.metrics import binary_metrics, bootstrap_ci, calibration
from pneumo.numpy_backend import numpy_model_from_checkpoint, predict_numpy
from pneumo.progress import log
from pneumo.report import write_report


def evaluate(
    checkpoint: str | Path,
    out_dir: str | Path,
    split: str = "test",
    overrides: list[str] = (),
    backend: str = "torch",
    bootstrap: int = 1000,
    seed: int = 0,
    explain: int = 0,
    explain_files: list[str] = (),
) -> dict:
    """Score `split` with the checkpoint's model at the threshold chosen on validation during training,
    and write metrics.json, predictions.csv and the report (plots and report.md) into `out_dir`.

    The data settings come from the checkpoint's config; `overrides` (`data.root=DIR`, `device=cpu`...)
    adapt them to this machine. `backend="numpy"` runs the NumPy reference network (float64) instead.
    `bootstrap` resamples give the 95% intervals (0: none). Grad-CAM overlays are saved for the
    `explain` most confident errors and for each of `explain_files`.
    """
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    cfg = checkpoint_config(ckpt, checkpoint, overrides)

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
        **calibration(data.labels, probs),
        "threshold_method": ckpt["threshold_method"],
        "split": split,
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": ckpt["epoch"],
        "backend": backend,
        "n_skipped": len(data.skipped),
        "operating_points": _operating_points(ckpt, data.labels, probs),
    }
    if bootstrap:
        metrics.update(ci95=bootstrap_ci(data.labels, probs, ckpt["threshold"], bootstrap, seed), bootstrap_resamples=bootstrap, bootstrap_seed=seed)
    out_dir = Path(out_dir)
    if explain or explain_files:
        metrics["explanations"] = _explain(model, data, probs, ckpt["threshold"], explain, explain_files, out_dir)
    write_report(out_dir, metrics, data.labels, probs)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out_dir / "predictions.csv", _predictions_csv(data.ids, data.labels, probs, ckpt["threshold"]))
    if data.skipped:
        atomic_write_text(out_dir / "bad_images.csv", bad_image_report(data))
        log.warning("skipped %d unusable image files: see %s", len(data.skipped), out_dir / "bad_images.csv")
    log.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "predictions.csv")
    return metrics


def _explain(model, data, probs, threshold, n, files, out_dir: Path) -> list[dict]:
    picks = [(data.ids[i], data.images[i], int(data.labels[i])) for i in most_confident_errors(data.labels, probs, threshold, n)]
    size = data.images.shape[1]
    picks += [(str(f), load_image(str(f), size), None) for f in files]  # any file, labelled or not
    if not picks:
        log.info("no misclassified images to explain")
        return []
    heat, p = grad_cam(model, np.stack([image for _, image, _ in picks]))
    out = []
    for k, ((ident, image, label), h) in enumerate(zip(picks, heat)):
        name = f"gradcam_{k:02d}_{Path(ident.split(':')[-1]).stem}.png"
        save_overlay(out_dir / name, image, h)
        out.append({"id": ident, "file": name, "label": {0: "NORMAL", 1: "PNEUMONIA", None: "unknown"}[label], "probability": float(p[k])})
    log.info("saved %d Grad-CAM overlays in %s", len(out), out_dir)
    return out


def _operating_points(ckpt: dict, labels, probs) -> list[dict]:
    points = {"stored threshold": ckpt["threshold"], **ckpt.get("operating_points", {})}
    out = []
    for name, threshold in points.items():
        m = binary_metrics(labels, probs, threshold)
        out.append({"name": name, "threshold": float(threshold), "sensitivity": m["sensitivity"], "specificity": m["specificity"]})
    return out


def _predictions_csv(ids, labels, probs, threshold) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "probability", "prediction"])
    for i, y, p in zip(ids, labels, probs):
        writer.writerow([i, int(y), f"{p:.6f}", int(p >= threshold)])
    return buf.getvalue()
