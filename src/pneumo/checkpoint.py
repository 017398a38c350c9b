"""Checkpoints and other run files: written atomically, read with clear errors."""

from __future__ import annotations

import os
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import torch

from pneumo.config import Config, ConfigError, apply_override, from_dict
from pneumo.errors import PneumoError
from pneumo.models import SmallCNN, build_model

FORMAT = "pneumo-checkpoint/1"
# The model shipped with pneumo (models/ in the repository, installed as the package pneumo.weights).
BUNDLED_MODEL = "kermany.pt"


def atomic_write(path: str | Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    A crash or kill at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; others on the machine may need to read results
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """What open() would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PneumoError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        # Say so plainly: torch's own message for such files suggests loading with weights_only=False.
        raise PneumoError(f"{path} is not a readable checkpoint (not a file saved by torch)")
    try:
        # weights_only: a checkpoint is data; loading one must never run code from it.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on foreign bytes with any error type
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise PneumoError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PneumoError(f"{path} is not a pneumo checkpoint (expected format {FORMAT})")
    return ckpt


def checkpoint_config(ckpt: dict, path: str | Path, overrides: list[str] = ()) -> Config:
    """The config a checkpoint was trained with, adapted to this machine by `overrides`
    (`data.root=DIR`, `device=cpu`...)."""
    raw = ckpt["config"]
    for item in overrides:
        raw = apply_override(raw, item)
    return from_dict(raw, source=f"{path} with --set {' '.join(overrides)}" if overrides else str(path))


def bundled_checkpoint() -> Path:
    """The trained model that ships with pneumo, used when a command is given no --checkpoint."""
    candidates = [Path(__file__).resolve().parents[2] / "models" / BUNDLED_MODEL]  # a source checkout
    try:
        candidates.insert(0, Path(str(resources.files("pneumo.weights") / BUNDLED_MODEL)))  # an installed wheel
    except ModuleNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise PneumoError(f"no --checkpoint given, and the bundled model {BUNDLED_MODEL} is not installed; name a checkpoint with --checkpoint")


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> SmallCNN:
    try:
        cfg = from_dict(ckpt["config"], source=str(path))
        model = build_model(cfg.model)
        model.load_state_dict(ckpt["model"])
    except (KeyError, ConfigError, RuntimeError) as e:
        raise PneumoError(f"{path} does not match the model it describes: {str(e).splitlines()[0][:300]}") from None
    return model
