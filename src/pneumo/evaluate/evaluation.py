"""Evaluate a trained model on one split: metrics.json, predictions.csv, the report and a printed table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pneumo import __version__, cpu
from pneumo.core.config import config_hash
from pneumo.core.fileio import atomic_write_text
from pneumo.core.labels import class_name
from pneumo.core.logs import log
from pneumo.data import Split, bad_image_report, load_split
from pneumo.data.images import load_image
from pneumo.evaluate.explain import grad_cam, most_confident_errors, save_overlay
from pneumo.evaluate.metrics import binary_metrics, bootstrap_ci, bootstrap_unit, calibration_metrics
from pneumo.evaluate.report import write_report
from pneumo.model.checkpoint import TrainedModel
from pneumo.reference.backend import numpy_classifier, predict_numpy


@dataclass
class EvalOptions:
    """How to evaluate: the backend (torch, or the NumPy reference network in float64), the bootstrap
    resamples of the 95% intervals (0: none) and their seed, and which images get Grad-CAM overlays
    (the `explain` most confident errors, and each of `explain_files`)."""

    backend: str = "torch"
    bootstrap: int = 1000
    seed: int = 0
    explain: int = 0
    explain_files: list[str] = field(default_factory=list)


def evaluate(model: TrainedModel, split: str, out_dir: str | Path, options: EvalOptions | None = None) -> dict:
    """Score `split` at the threshold chosen on validation during training, and write metrics.json,
    predictions.csv and the report (plots and report.md) into `out_dir`. The data settings come from
    the model's config (adapted to this machine by the overrides it was loaded with)."""
    options = options or EvalOptions()
    data = load_split(model.config, split)
    data.require_both_classes()
    log.info("%s", data.describe())
    with cpu.kernels(model.config.cpu_kernels):
        probs, flagged = _score_and_scope(model, data.images, options.backend)
    metrics = {
        **binary_metrics(data.labels, probs, model.threshold),
        **calibration_metrics(data.labels, probs),
        "threshold_method": model.threshold_method,
        "split": split,
        "checkpoint": str(model.path),
        "checkpoint_epoch": model.epoch,
        "backend": options.backend,
        "n_skipped": len(data.skipped),
        "operating_points": _operating_points(model, data.labels, probs),
        # The share the applicability check flags as unlike the training images (None: the model has none).
        "ood_share": None if flagged is None else float(flagged.mean()),
        "provenance": {
            "pneumo": __version__,
            "torch": str(torch.__version__),
            "config_sha256": config_hash(model.config),
            "model": model.model_id,
        },
    }
    if options.bootstrap:
        metrics["ci95"] = bootstrap_ci(
            data.labels, probs, model.threshold, options.bootstrap, options.seed, data.patients
        )
        unit = bootstrap_unit(data.patients, len(data))
        metrics.update(bootstrap_resamples=options.bootstrap, bootstrap_seed=options.seed, bootstrap_unit=unit)
    out_dir = Path(out_dir)
    if options.explain or options.explain_files:
        metrics["explanations"] = _explain(model, data, probs, options, out_dir)
    _write(out_dir, metrics, data, probs, model.threshold)
    return metrics


def score(model: TrainedModel, images: np.ndarray, backend: str = "torch") -> np.ndarray:
    """Probabilities of pneumonia for uint8 images (N, H, W), by the torch or the NumPy network."""
    batch = model.config.train.eval_batch_size
    if backend == "numpy":
        return predict_numpy(numpy_classifier(model), images, batch)
    return torch.sigmoid(torch.from_numpy(model.logits(images))).numpy()


def _score_and_scope(model: TrainedModel, images: np.ndarray, backend: str) -> tuple:
    """Probabilities, and which images the applicability check flags (None: the model has none): from
    one pass of the torch network, or the NumPy network's probabilities beside the torch network's check."""
    if backend == "numpy":
        return score(model, images, backend), model.out_of_scope(images)
    logits, scores = model.scored(images)
    flagged = None if scores is None else model.applicability.flags(scores)
    return torch.sigmoid(torch.from_numpy(logits)).numpy(), flagged


def _write(out_dir: Path, metrics: dict, data: Split, probs: np.ndarray, threshold: float) -> None:
    write_report(out_dir, metrics, data.labels, probs)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out_dir / "predictions.csv", _predictions_csv(data.ids, data.labels, probs, threshold))
    if data.skipped:
        atomic_write_text(out_dir / "bad_images.csv", bad_image_report(data))
        log.warning("skipped %d unusable image files: see %s", len(data.skipped), out_dir / "bad_images.csv")
    log.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "predictions.csv")


def _explain(model: TrainedModel, data: Split, probs: np.ndarray, options: EvalOptions, out_dir: Path) -> list[dict]:
    errors = most_confident_errors(data.labels, probs, model.threshold, options.explain)
    picks = [(data.ids[i], data.images[i], class_name(data.labels[i])) for i in errors]
    size = data.images.shape[1]
    picks += [(str(f), load_image(str(f), size), "unknown") for f in options.explain_files]  # any file, labelled or not
    if not picks:
        log.info("no misclassified images to explain")
        return []
    heat, p = grad_cam(model.network(), np.stack([image for _, image, _ in picks]))
    out = []
    for k, ((ident, image, label), h) in enumerate(zip(picks, heat, strict=True)):
        name = f"gradcam_{k:02d}_{Path(ident.split(':')[-1]).stem}.png"
        save_overlay(out_dir / name, image, h)
        out.append({"id": ident, "file": name, "label": label, "probability": float(p[k])})
    log.info("saved %d Grad-CAM overlays in %s", len(out), out_dir)
    return out


def _operating_points(model: TrainedModel, labels, probs) -> list[dict]:
    points = {"stored threshold": model.threshold, **model.operating_points}
    out = []
    for name, threshold in points.items():
        m = binary_metrics(labels, probs, threshold)
        out.append(
            {
                "name": name,
                "threshold": float(threshold),
                "sensitivity": m["sensitivity"],
                "specificity": m["specificity"],
            }
        )
    return out


def _predictions_csv(ids, labels, probs, threshold) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "probability", "prediction"])
    for i, y, p in zip(ids, labels, probs, strict=True):
        writer.writerow([i, int(y), f"{p:.6f}", int(p >= threshold)])
    return buf.getvalue()
