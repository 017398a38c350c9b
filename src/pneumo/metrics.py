"""Binary classification metrics and the choice of the decision threshold."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from pneumo.errors import PneumoError


def choose_threshold(labels: np.ndarray, probs: np.ndarray, method: str, fixed: float = 0.5) -> float:
    """A probability threshold (predict pneumonia when p >= threshold) chosen on validation data.

    youden: maximises sensitivity + specificity - 1; max_f1: maximises F1; fixed: `fixed`.
    """
    if method == "fixed":
        return float(fixed)
    _require_both_classes(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(labels, probs)
        best = int(np.argmax(tpr - fpr))
    elif method == "max_f1":
        precision, recall, thresholds = precision_recall_curve(labels, probs)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    chosen = min(float(thresholds[best]), 1.0)
    # Halfway down to the next lower score: the same decisions on this data, but no image sits on
    # the boundary, where float32 vs float64 or another backend could flip it.
    below = probs[probs < chosen]
    return (chosen + float(below.max())) / 2 if below.size else chosen / 2


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    _require_both_classes(labels)
    pred = probs >= threshold
    tp = int(np.sum(pred & (labels == 1)))
    tn = int(np.sum(~pred & (labels == 0)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    sensitivity = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(labels)),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "threshold": float(threshold),
        "n": int(len(labels)),
        "n_pneumonia": int(np.sum(labels == 1)),
        "n_normal": int(np.sum(labels == 0)),
        # rows: true NORMAL, PNEUMONIA; columns: predicted NORMAL, PNEUMONIA (sklearn's layout)
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def bce(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def format_table(metrics: dict) -> str:
    rows = [
        ("ROC AUC", metrics["auc"]), ("F1", metrics["f1"]), ("accuracy", metrics["accuracy"]),
        ("sensitivity", metrics["sensitivity"]), ("specificity", metrics["specificity"]),
        ("precision", metrics["precision"]), ("threshold", metrics["threshold"]),
    ]
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    lines = [f"{name:<12} {value:7.4f}" for name, value in rows]
    lines += [
        f"{'n':<12} {metrics['n']:7d}  ({metrics['n_pneumonia']} pneumonia, {metrics['n_normal']} normal)",
        "",
        "                 predicted",
        "                 NORMAL  PNEUMONIA",
        f"true NORMAL     {tn:7d}  {fp:9d}",
        f"true PNEUMONIA  {fn:7d}  {tp:9d}",
    ]
    return "\n".join(lines)


def _ratio(a: int, b: int) -> float:
    # An empty denominator (no predicted positives, say) gives 0, as sklearn's zero_division=0 does.
    return a / b if b else 0.0


def _require_both_classes(labels) -> None:
    if len(np.unique(labels)) < 2:
        raise PneumoError("the labels hold one class only: ROC AUC and thresholds need both NORMAL and PNEUMONIA images")
