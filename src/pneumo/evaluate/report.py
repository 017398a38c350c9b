"""The evaluation report: ROC, precision-recall, confusion matrix and reliability plots, and report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumo.core.fileio import atomic_write, atomic_write_text

PLOTS = ("roc.png", "pr.png", "confusion.png", "calibration.png")


def write_report(out_dir: Path, metrics: dict, labels: np.ndarray, probs: np.ndarray) -> None:
    _plot(out_dir / "roc.png", lambda ax: _roc(ax, labels, probs, metrics))
    _plot(out_dir / "pr.png", lambda ax: _pr(ax, labels, probs, metrics))
    _plot(out_dir / "confusion.png", lambda ax: _confusion(ax, metrics))
    _plot(out_dir / "calibration.png", lambda ax: _reliability(ax, metrics))
    atomic_write_text(out_dir / "report.md", markdown(metrics))


METRIC_ROWS = (
    ("auc", "ROC AUC"),
    ("f1", "F1"),
    ("accuracy", "accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("precision", "precision"),
)


def markdown(m: dict) -> str:
    sections = [_summary(m), _metrics_table(m), _operating_points(m), _confusion_matrix(m), _plots(), _grad_cam(m)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _summary(m: dict) -> str:
    return (
        f"# Evaluation: {m['split']} split\n\n"
        f"Checkpoint `{m['checkpoint']}` (epoch {m['checkpoint_epoch']}), {m['n']} images "
        f"({m['n_pneumonia']} pneumonia, {m['n_normal']} normal), backend {m['backend']}. Decision threshold "
        f"{m['threshold']:.4f} ({m['threshold_method']}, chosen on validation during training)." + _scope(m)
    )


def _scope(m: dict) -> str:
    if m.get("ood_share") is None:
        return " The model carries no applicability check."
    return (
        f" The applicability check flags {100 * m['ood_share']:.1f}% of these images as unlike the model's "
        "training images: its figures there say little about the rest."
    )


def _metrics_table(m: dict) -> str:
    ci = m.get("ci95", {})
    lines = ["| metric | value | 95% CI |", "| --- | --- | --- |"] if ci else ["| metric | value |", "| --- | --- |"]
    for key, name in METRIC_ROWS:
        interval = f" | {ci[key][0]:.3f} to {ci[key][1]:.3f}" if key in ci else (" | " if ci else "")
        lines.append(f"| {name} | {m[key]:.4f}{interval} |")
    lines.append(f"| ECE (10 bins) | {m['ece']:.4f} |{' |' if ci else ''}")
    lines.append(f"| Brier score | {m['brier']:.4f} |{' |' if ci else ''}")
    if ci:
        unit = m.get("bootstrap_unit", "images")
        lines += [
            "",
            f"Intervals: percentile bootstrap over the {unit}, {m['bootstrap_resamples']} resamples, "
            f"seed {m['bootstrap_seed']}.",
        ]
    return "\n".join(lines)


def _operating_points(m: dict) -> str:
    lines = [
        "## Operating points",
        "",
        "Thresholds chosen on the validation split; sensitivity and specificity here are on this split.",
        "",
        "| operating point | threshold | sensitivity | specificity |",
        "| --- | --- | --- | --- |",
    ]
    for p in m["operating_points"]:
        lines.append(f"| {p['name']} | {p['threshold']:.4f} | {p['sensitivity']:.4f} | {p['specificity']:.4f} |")
    return "\n".join(lines)


def _confusion_matrix(m: dict) -> str:
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    return "\n".join(
        [
            "## Confusion matrix",
            "",
            "| | predicted NORMAL | predicted PNEUMONIA |",
            "| --- | --- | --- |",
            f"| NORMAL | {tn} | {fp} |",
            f"| PNEUMONIA | {fn} | {tp} |",
        ]
    )


def _plots() -> str:
    return "\n".join(f"![{name[:-4]}]({name})" for name in PLOTS)


def _grad_cam(m: dict) -> str:
    if not m.get("explanations"):
        return ""
    lines = [
        "## Grad-CAM",
        "",
        "Where the last convolutional block looked, for the images below (red: most weight).",
        "",
    ]
    for e in m["explanations"]:
        lines.append(
            f"![{e['id']}]({e['file']})  \n`{e['id']}`: label {e['label']}, probability {e['probability']:.3f}"
        )
    return "\n".join(lines)


def _plot(path: Path, draw) -> None:
    # A bare Figure, not pyplot: no display backend and no global state, as a batch job needs.
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    draw(fig.subplots())
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _roc(ax, labels, probs, m):
    fpr, tpr, _ = roc_curve(labels, probs)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {m['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - m["specificity"]], [m["sensitivity"]], c="red", zorder=3, label=f"threshold {m['threshold']:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")


def _pr(ax, labels, probs, m):
    precision, recall, _ = precision_recall_curve(labels, probs)
    ax.plot(recall, precision, lw=2)
    ax.axhline(np.mean(labels), ls="--", c="grey", lw=1, label="prevalence")
    ax.scatter([m["sensitivity"]], [m["precision"]], c="red", zorder=3, label=f"threshold {m['threshold']:.3f}")
    ax.set(
        xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(loc="lower left")


def _confusion(ax, m):
    cm = np.array(m["confusion_matrix"])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=14)
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["NORMAL", "PNEUMONIA"],
        yticklabels=["NORMAL", "PNEUMONIA"],
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (threshold {m['threshold']:.3f})",
    )


def _reliability(ax, m):
    curve = m["reliability"]
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot(
        [c["mean_probability"] for c in curve],
        [c["fraction_pneumonia"] for c in curve],
        marker="o",
        lw=2,
        label=f"ECE {m['ece']:.3f}, Brier {m['brier']:.3f}",
    )
    ax.set(
        xlabel="mean predicted probability",
        ylabel="fraction with pneumonia",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="lower right")
