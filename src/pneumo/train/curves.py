"""Training curves as a picture (curves.png, rewritten after every epoch) and, if asked, as TensorBoard
event files, so that a person can watch a long run."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from pneumo.core.errors import PneumoError
from pneumo.core.fileio import atomic_write


def plot_curves(path: Path, history: list[dict]) -> None:
    """Train and validation loss, validation AUC and learning rate per epoch, in one PNG."""
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 3.4), dpi=100)
    loss, auc, lr = fig.subplots(1, 3)
    loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    loss.set(title="loss (BCE)", xlabel="epoch")
    loss.legend()
    auc.plot(epochs, [r["val_auc"] for r in history], marker="o", color="tab:green")
    best = max(history, key=lambda r: r["val_auc"])
    auc.scatter([best["epoch"]], [best["val_auc"]], color="red", zorder=3, label=f"best {best['val_auc']:.4f}")
    auc.set(title="validation ROC AUC", xlabel="epoch")
    auc.legend(loc="lower right")
    lr.plot(epochs, [r["lr"] for r in history], marker="o", color="tab:purple")
    lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


class TensorBoard:
    """Scalars of each epoch as TensorBoard event files in `folder` (needs the tensorboard package)."""

    KEYS = ("train_loss", "val_loss", "val_auc", "val_accuracy", "val_sensitivity", "val_specificity", "lr")

    def __init__(self, folder: Path):
        self.writer = summary_writer()(log_dir=str(folder))

    def add(self, row: dict) -> None:
        for key in self.KEYS:
            if key in row:
                self.writer.add_scalar(
                    key.replace("_", "/", 1) if key.startswith("val_") else key, row[key], row["epoch"]
                )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def summary_writer():
    """torch's SummaryWriter, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PneumoError(
            "output.tensorboard: true needs the tensorboard package: pip install 'pneumo[tensorboard]'"
        ) from None
    return SummaryWriter
