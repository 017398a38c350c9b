"""The evaluation report: ROC, precision-recall, confusion matrix and reliability plots, and report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from pneumo.checkpoint import atomic_write, atomic_write_text  # noqa: E402

PLOTS = ("roc.png", "pr.png", "confusion.png", "calibration.png")


def write_report(out_dir: Path, metrics: dict, labels: np.ndarray, probs: np.ndarray) -> None:
    _plot(out_dir / "roc.png", lambda ax: _roc(ax, labels, probs, metrics))
    _plot(out_dir / "pr.png", lambda ax: _pr(ax, labels, probs, metrics))
    _plot(out_dir / "confusion.png", lambda ax: _confusion(ax, metrics))
    _plot(out_dir / "calibration.png", lambda ax: _reliability(ax, metrics))
    atomic_write_text(out_dir / "report.md", markdown(metrics))


def markdown(m: dict) -> str:
    ci = m.get("ci95", {})
    lines = [
        f"# Evaluation: {m['split']} split",
        "",
        f"Checkpoint `{m['checkpoint']}` (epoch {m['checkpoint_epoch']}), {m['n']} images "
        f"({m['n_pneumonia']} pneumonia, {m['n_normal']} normal), backend {m['backend']}. Decision threshold "
        f"{m['threshold']:.4f} ({m['threshold_method']}, chosen on validation during training).",
        "",
        "| metric | value | 95% CI |" if ci else "| metric | value |",
        "| --- | --- | --- |" if ci else "| --- | --- |",
    ]
    for key, name in (("auc", "ROC AUC"), ("f1", "F1"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                      ("specificity", "specificity"), ("precision", "precision")):
        interval = f" | {ci[key][0]:.3f} to {ci[key][1]:.3f}" if key in ci else (" | " if ci else "")
        lines.append(f"| {name} | {m[key]:.4f}{interval} |")
    lines.append(f"| ECE (10 bins) | {m['ece']:.4f} |{' |' if ci else ''}")
    lines.append(f"| Brier score | {m['brier']:.4f} |{' |' if ci else ''}")
    if ci:
        lines += ["", f"Intervals: percentile bootstrap over the images, {m['bootstrap_resamples']} resamples, seed {m['bootstrap_seed']}."]
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    lines += ["", "## Operating points", "", "Thresholds chosen on the validation split; sensitivity and specificity here are on this split.", "",
              "| operating point | threshold | sensitivity | specificity |", "| --- | --- | --- | --- |"]
    for point in m["operating_points"]:
        lines.append(f"| {point['name']} | {point['threshold']:.4f} | {point['sensitivity']:.4f} | {point['specificity']:.4f} |")
    lines += ["", "## Confusion matrix", "", "| | predicted NORMAL | predicted PNEUMONIA |", "| --- | --- | --- |",
              f"| NORMAL | {tn} | {fp} |", f"| PNEUMONIA | {fn} | {tp} |", ""]
    lines += [f"![{name[:-4]}]({name})" for name in PLOTS]
    if m.get("explanations"):
        lines += ["", "## Grad-CAM", "", "Where the last convolutional block looked, for the images below (red: most weight).", ""]
        lines += [f"![{e['id']}]({e['file']})  \n`{e['id']}`: label {e['label']}, probability {e['probability']:.3f}" for e in m["explanations"]]
    return "\n".join(lines) + "\n"


def _plot(path: Path, draw) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    draw(ax)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


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
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")


def _confusion(ax, m):
    cm = np.array(m["confusion_matrix"])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["NORMAL", "PNEUMONIA"], yticklabels=["NORMAL", "PNEUMONIA"],
           xlabel="predicted", ylabel="true", title=f"Confusion matrix (threshold {m['threshold']:.3f})")


def _reliability(ax, m):
    curve = m["reliability"]
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot([c["mean_probability"] for c in curve], [c["fraction_pneumonia"] for c in curve], marker="o", lw=2,
            label=f"ECE {m['ece']:.3f}, Brier {m['brier']:.3f}")
    ax.set(xlabel="mean predicted probability", ylabel="fraction with pneumonia", title="Reliability diagram", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
