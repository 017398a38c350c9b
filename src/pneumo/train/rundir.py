"""A training run's directory (`output.dir`): its files, its lock, and what a resumed run must match.

Only the main process writes here. A new run replaces every file of an earlier run in the same
directory; a resumed run continues them, and refuses when the config or the data has changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from pneumo.core.config import Config, to_dict
from pneumo.core.distributed import Context
from pneumo.core.errors import PneumoError
from pneumo.core.fileio import FileLock, atomic_write_text
from pneumo.core.logs import log, logging_to
from pneumo.data import Split, bad_image_report, split_manifest
from pneumo.model.checkpoint import read_checkpoint
from pneumo.train.curves import TensorBoard, plot_curves

# Everything a run writes, so that a new run in an old directory leaves none of the old run's files.
RUN_FILES = (
    "best.pt",
    "last.pt",
    "metrics.jsonl",
    "train.log",
    "bad_images.csv",
    "config.yaml",
    "split.json",
    "curves.png",
)


class RunDir:
    def __init__(self, path: str | Path, ctx: Context):
        self.path, self.ctx = Path(path), ctx
        self.best, self.last = self.path / "best.pt", self.path / "last.pt"
        self.data_fingerprint = ""
        self.tensorboard: TensorBoard | None = None

    def resume_point(self, cfg: Config, may_change: set[str]) -> dict:
        """The earlier run's last.pt, once its config is known to match `cfg` but for `may_change`."""
        if not self.last.exists():
            raise PneumoError(f"nothing to resume: {self.last} does not exist (run without --resume to start)")
        ckpt = read_checkpoint(self.last)
        if "training" not in ckpt:
            raise PneumoError(f"{self.last} holds no training state to resume from (written by an older pneumo?)")
        changed = config_changes(cfg, ckpt["config"], may_change)
        if changed:
            raise PneumoError(f"the config differs from the run being resumed in {self.path} at: {', '.join(changed)}")
        return ckpt

    @contextmanager
    def session(self, cfg: Config, splits: tuple[Split, ...], previous: dict | None):
        """Lock the directory, write the run's description (config, splits, skipped files) and log into
        train.log while the block runs. A resumed run must have found the same files as before."""
        self.data_fingerprint = split_fingerprint(*splits)
        if previous is not None and previous["training"]["state"]["data"] != self.data_fingerprint:
            raise PneumoError(
                f"the data differs from what the run in {self.path} was started on (files added, removed or "
                "relabelled change the validation split); start a new run instead of --resume"
            )
        if not self.ctx.main:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.resolve() / ".lock", _busy(self.path)):
            if previous is None:
                self._clear()
            with logging_to(self.path / "train.log", mode="a" if previous else "w"):
                self._describe(cfg, splits, previous)
                if cfg.output.tensorboard:
                    self.tensorboard = TensorBoard(self.path / "tensorboard")
                try:
                    yield
                finally:
                    if self.tensorboard is not None:
                        self.tensorboard.close()

    @contextmanager
    def ensemble_session(self, cfg: Config, fresh: bool):
        """Lock the directory of an ensemble and log into its train.log while its members train in
        members/; a fresh run first removes an earlier run's members."""
        if not self.ctx.main:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path.resolve() / ".lock", _busy(self.path)):
            if fresh:
                self._clear()
                shutil.rmtree(self.path / "members", ignore_errors=True)
            with logging_to(self.path / "train.log", mode="w" if fresh else "a"):
                atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
                yield

    def record(self, row: dict, history: list[dict]) -> None:
        """An epoch's figures: a line of metrics.jsonl, curves.png redrawn, TensorBoard if asked for."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        plot_curves(self.path / "curves.png", history)
        if self.tensorboard is not None:
            self.tensorboard.add(row)

    def _clear(self) -> None:
        for name in RUN_FILES:
            if (self.path / name).exists():
                if name in ("best.pt", "last.pt", "metrics.jsonl"):
                    log.warning("starting a new run in %s: replacing the earlier run's %s", self.path, name)
                (self.path / name).unlink()
        shutil.rmtree(self.path / "tensorboard", ignore_errors=True)

    def _describe(self, cfg: Config, splits: tuple[Split, ...], previous: dict | None) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(self.path / "split.json", split_manifest(*splits))
        skipped = sum(len(s.skipped) for s in splits)
        if skipped:
            atomic_write_text(self.path / "bad_images.csv", bad_image_report(*splits))
            log.warning("skipped %d unusable image files: see %s", skipped, self.path / "bad_images.csv")
        # Rewritten from the checkpoint, so epochs trained after the last checkpoint of a killed run vanish.
        history = previous["training"]["state"]["history"] if previous else []
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _busy(path: Path) -> str:
    return "another pneumo-train (pid {pid}) is running in " + str(path) + "; wait for it or choose another output.dir"


def config_changes(cfg: Config, old: dict, may_change: set[str]) -> list[str]:
    """Keys whose values differ between `cfg` and the `old` config, other than those in `may_change`."""
    new, old = _flat(to_dict(cfg)), _flat(old)
    return sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k) and k not in may_change)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def split_fingerprint(*splits: Split) -> str:
    """A hash of the splits' file lists, labels and patients: the data a run was started on."""
    text = json.dumps([[s.name, s.ids, s.labels.tolist(), s.patients] for s in splits])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
