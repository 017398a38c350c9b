"""Binary classification metrics and the choice of the decision threshold."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from pneumo.core.errors import PneumoError


def choose_threshold(labels: np.ndarray, probs: np.ndarray, method: str, fixed: float = 0.5) -> float:
    """A probability threshold (predict pneumonia when p >= threshold) chosen on validation data.

    youden: maximises sensitivity + specificity - 1; balanced: sensitivity closest to specificity
    (the equal error rate: neither kind of error favoured); max_f1: maximises F1; midpoint: halfway, in
    logit space, between the median scores of the two classes; fixed: `fixed`.
    """
    if method == "fixed":
        return float(fixed)
    _require_both_classes(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if method == "midpoint":
        return midpoint_threshold(labels, probs)
    if method in ("youden", "balanced"):
        fpr, tpr, thresholds = roc_curve(labels, probs)
        # specificity = 1 - fpr; ties go to the first, i.e. the highest, threshold
        best = int(np.argmax(tpr - fpr) if method == "youden" else np.argmin(np.abs(tpr - (1 - fpr))))
    elif method == "max_f1":
        precision, recall, thresholds = precision_recall_curve(labels, probs)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    return _off_the_boundary(probs, min(float(thresholds[best]), 1.0), "down")


def midpoint_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The probability halfway, in logit space, between the median logits of NORMAL and PNEUMONIA.

    Rules fitted to where the two classes meet on validation (youden, balanced) sit wherever validation's
    tails happen to cross. At a new site both classes' scores move, either way (noisier detectors
    push normal images up, wider fields push pneumonia down): a threshold as far as possible from both
    classes' bulk keeps the most of its decisions, whichever way they move. In logit space shifts are
    roughly additive, and medians ignore the few outliers that decide the tail-fitted rules.
    """
    labels = np.asarray(labels)
    z = _logit(np.asarray(probs, dtype=np.float64))
    centre = (np.median(z[labels == 0]) + np.median(z[labels == 1])) / 2
    return float(1 / (1 + np.exp(-centre)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _off_the_boundary(probs: np.ndarray, score: float, direction: str) -> float:
    """Halfway from `score` to the next lower (down) or higher (up) score, or to 0 or 1: the same
    decisions on this data, but no image sits on the boundary, where float32 vs float64 or another
    backend could flip it."""
    if direction == "down":
        below = probs[probs < score]
        return float((score + below.max()) / 2 if below.size else score / 2)
    above = probs[probs > score]
    return float((score + above.min()) / 2 if above.size else (score + 1) / 2)


# Clinically used operating points, each chosen on validation: the highest threshold that keeps
# sensitivity (or specificity) at the target.
OPERATING_TARGETS = (
    ("sensitivity", 0.90),
    ("sensitivity", 0.95),
    ("sensitivity", 0.99),
    ("specificity", 0.90),
    ("specificity", 0.95),
)


def operating_points(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{"sensitivity>=0.95": threshold, ...} on this (validation) data."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    _require_both_classes(labels)
    out = {}
    for measure, target in OPERATING_TARGETS:
        if measure == "sensitivity":
            pos = np.sort(probs[labels == 1])[::-1]
            score = pos[int(np.ceil(target * len(pos))) - 1]  # that many positives at or above it
            out[f"{measure}>={target:.2f}"] = _off_the_boundary(probs, score, "down")
        else:
            neg = np.sort(probs[labels == 0])
            score = neg[int(np.ceil(target * len(neg))) - 1]  # that many negatives at or below it
            out[f"{measure}>={target:.2f}"] = _off_the_boundary(probs, score, "up")
    return out


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error over equal-width bins, Brier score, and the reliability curve."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            confidence, frequency = probs[inside].mean(), labels[inside].mean()
            ece += inside.mean() * abs(confidence - frequency)
            curve.append(
                {
                    "bin": b,
                    "mean_probability": float(confidence),
                    "fraction_pneumonia": float(frequency),
                    "n": int(inside.sum()),
                }
            )
    return {"ece": float(ece), "brier": float(np.mean((probs - labels) ** 2)), "reliability": curve}


CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")


def bootstrap_ci(
    labels: np.ndarray, probs: np.ndarray, threshold: float, resamples: int = 1000, seed: int = 0, groups=None
) -> dict:
    """Percentile 95% bootstrap intervals. With `groups` (a patient id per image), whole patients are
    resampled with replacement, since images of one patient are not independent; else the images."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    units = _units(groups, len(labels))
    values = {k: [] for k in CI_METRICS}
    for _ in range(resamples):
        idx = np.concatenate([units[i] for i in rng.integers(0, len(units), len(units))])
        if labels[idx].min() == labels[idx].max():
            continue  # AUC is undefined on a one-class resample
        m = binary_metrics(labels[idx], probs[idx], threshold)
        for k in CI_METRICS:
            values[k].append(m[k])
    if not values["auc"]:  # every resample held one class: too few images or resamples for an interval
        return {}
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in values.items()}


def bootstrap_unit(groups, n: int) -> str:
    """What bootstrap_ci resamples for these groups: "patients" when some patient has several images."""
    return "patients" if groups is not None and len(set(groups)) < n else "images"


def _units(groups, n: int) -> list[np.ndarray]:
    if bootstrap_unit(groups, n) == "images":
        return [np.array([i]) for i in range(n)]
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [np.array(v) for v in members.values()]


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


def banded_auc(labels: np.ndarray, scores: np.ndarray, nuisance: np.ndarray, bands: int = 5) -> float:
    """The AUC over the pairs (positive, negative) whose `nuisance` (an image's mean grey level, say)
    falls in the same of `bands` bands of equal counts: what is left of a model's ranking where the
    nuisance cannot tell the two classes apart. NaN without such a pair."""
    edges = np.quantile(nuisance, np.linspace(0, 1, bands + 1)[1:-1])
    band = np.searchsorted(edges, nuisance)
    wins = pairs = 0.0
    for b in range(bands):
        pos, neg = scores[(band == b) & (labels == 1)], scores[(band == b) & (labels == 0)]
        wins += float((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
        pairs += len(pos) * len(neg)
    return wins / pairs if pairs else float("nan")


def bce(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def format_table(metrics: dict) -> str:
    rows = [
        ("ROC AUC", metrics["auc"]),
        ("F1", metrics["f1"]),
        ("accuracy", metrics["accuracy"]),
        ("sensitivity", metrics["sensitivity"]),
        ("specificity", metrics["specificity"]),
        ("precision", metrics["precision"]),
        ("threshold", metrics["threshold"]),
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
    if metrics.get("ood_share") is not None:
        lines += ["", f"out of the model's scope (applicability check): {100 * metrics['ood_share']:.1f}%"]
    return "\n".join(lines)


def _ratio(a: int, b: int) -> float:
    # An empty denominator (no predicted positives, say) gives 0, as sklearn's zero_division=0 does.
    return a / b if b else 0.0


def _require_both_classes(labels) -> None:
    if len(np.unique(labels)) < 2:
        raise PneumoError(
            "the labels hold one class only: ROC AUC and thresholds need both NORMAL and PNEUMONIA images"
        )
