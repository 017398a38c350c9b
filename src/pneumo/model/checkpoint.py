"""Trained models on disk: the one place that writes checkpoints and the one that reads them.

A checkpoint is data, never code: it is read with torch's weights-only unpickler, its tensors carry a
checksum that loading verifies, and everything in it is checked before a command uses it.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from pneumo import __version__
from pneumo.core.config import Config, apply_override, config_hash, from_dict, to_dict
from pneumo.core.device import prepare, resolve_device
from pneumo.core.errors import CheckpointError, ConfigError, PneumoError
from pneumo.core.fileio import atomic_write, file_sha256
from pneumo.model.applicability import Applicability
from pneumo.model.calibration import Calibration
from pneumo.model.inference import described, logits, scored
from pneumo.model.network import Classifier, build_model

FORMAT = "pneumo-checkpoint/2"
MAX_WEIGHTS = 100_000_000  # elements in one tensor: far above any network a config can describe
READABLE_FORMATS = ("pneumo-checkpoint/1", FORMAT)
# The model shipped with pneumo (models/ in the repository, installed as the package pneumo.weights).
BUNDLED_MODEL = "kermany.pt"


@dataclass
class TrainedModel:
    """Everything a command needs from a checkpoint, checked: the network's weights (one state dict
    per ensemble member), the config it was trained with, how its logits become probabilities, the
    decision threshold and operating points chosen on validation, and where it came from."""

    config: Config
    members: list[dict[str, torch.Tensor]]
    threshold: float
    threshold_method: str
    operating_points: dict[str, float] = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)
    epoch: int | list[int] = 0
    calibration: Calibration = field(default_factory=Calibration)
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    model_id: str = ""  # the first 16 hex digits of the file's SHA-256
    # Where this machine runs it: `auto` unless the loader was told (--set device=...). The device in
    # `config` is where it was trained, which says nothing about this machine.
    device: str = "auto"
    # What its training images look like (the applicability check); None in checkpoints made before it.
    applicability: Applicability | None = None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> TrainedModel:
        """Read and check a checkpoint; `overrides` (`data.root=DIR`, `device=cpu`...) adapt its config
        to this machine."""
        raw = read_checkpoint(path)
        return cls.from_payload(raw, path, overrides)

    @classmethod
    def from_payload(cls, raw: dict, path: str | Path, overrides: list[str] = ()) -> TrainedModel:
        path = Path(path)
        try:
            members = raw["members"] if "members" in raw else [raw["model"]]  # format 1 held one model
            model = cls(
                config=_config(raw, path, overrides),
                members=members,
                threshold=_threshold(raw.get("threshold"), path),
                threshold_method=str(raw.get("threshold_method", "unknown")),
                operating_points={
                    str(k): _probability(v, f"operating point {k}", path)
                    for k, v in raw.get("operating_points", {}).items()
                },
                val_metrics=dict(raw.get("val_metrics", {})),
                epoch=raw.get("epoch", 0),
                calibration=Calibration.from_dict(raw.get("calibration", {})),
                provenance=dict(raw.get("provenance", raw.get("versions", {}))),
                path=path,
                model_id=file_sha256(path)[:16],
            )
            if "applicability" in raw:
                size = len(members) * sum(model.config.model.channels)
                model.applicability = Applicability.from_dict(raw["applicability"], size, str(path))
            if any(item.partition("=")[0].strip() == "device" for item in overrides):
                model.device = model.config.device
                resolve_device(model.device)  # a device this machine lacks stops the command here
        except ValueError as e:  # a number or a field against its meaning (calibration, metadata)
            raise CheckpointError(f"{path} is not usable: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} is not a complete pneumo checkpoint (missing or malformed {e})") from None
        model.network()  # the weights must fit the architecture the config describes
        return model

    def network(self) -> Classifier:
        """The torch module that maps images (N, 1, H, W) in [0, 1] to calibrated logits, in eval mode.
        For inference, `.folded()` of it gives the same logits faster (see SmallCNN.folded)."""
        members = []
        for state in self.members:
            member = build_model(self.config.model)
            try:
                member.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(
                    f"{self.path} does not match the model it describes: {str(e).splitlines()[0][:300]}"
                ) from None
            members.append(member)
        cal = self.calibration
        return Classifier(members, tta=self.config.model.tta, scale=cal.scale, bias=cal.bias).eval()

    def logits(self, images: np.ndarray, device: torch.device | None = None, desc: str = "predicting") -> np.ndarray:
        """The calibrated logits (float64) for uint8 images (N, H, W), by the folded network on `device`
        (default: `self.device`), in batches of train.eval_batch_size."""
        network, device = self._ready(device)
        return logits(network, _tensor(images), self.config.train.eval_batch_size, device, desc)

    def _ready(self, device: torch.device | None) -> tuple[Classifier, torch.device]:
        """The folded network on `device` (default: `self.device`), for inference."""
        device = device or resolve_device(self.device)
        return prepare(self.network().folded(), device), device

    def payload(self) -> dict:
        return {
            "config": to_dict(self.config),
            "members": self.members,
            "threshold": float(self.threshold),
            "threshold_method": self.threshold_method,
            "operating_points": self.operating_points,
            "val_metrics": self.val_metrics,
            "epoch": self.epoch,
            "calibration": self.calibration.to_dict(),
            "provenance": self.provenance,
            **({"applicability": self.applicability.to_dict()} if self.applicability else {}),
        }

    def scored(self, images: np.ndarray, device: torch.device | None = None, desc: str = "scoring") -> tuple:
        """(logits, applicability scores) for uint8 images (N, H, W), from one pass; the scores are None
        where the checkpoint has no applicability statistics."""
        if self.applicability is None:
            return self.logits(images, device, desc), None
        network, device = self._ready(device)
        batch = self.config.train.eval_batch_size
        return scored(network, _tensor(images), batch, device, self.applicability, desc)

    def out_of_scope(self, images: np.ndarray, device: torch.device | None = None) -> np.ndarray | None:
        """Which images the applicability check flags as unlike the training images (None: no check)."""
        _, scores = self.scored(images, device, "checking scope")
        return None if scores is None else self.applicability.flags(scores)

    def fit_applicability(self, train: np.ndarray, val: np.ndarray, device: torch.device | None = None) -> None:
        """Describe the training images (`train`) and set the threshold on validation's (`val`)."""
        network, device = self._ready(device)
        batch = self.config.train.eval_batch_size
        _, on_train = described(network, _tensor(train), batch, device, "describing")
        _, on_val = described(network, _tensor(val), batch, device, "describing")
        self.applicability = Applicability.fit(on_train, on_val, self.config.train.ood_quantile)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images))


def provenance(cfg: Config, **extra) -> dict:
    """Which pneumo, torch and config made a file, and when."""
    return {
        "pneumo": __version__,
        "torch": str(torch.__version__),
        "config_sha256": config_hash(cfg),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write `payload` (a TrainedModel's, plus anything training needs to resume) atomically, with
    the format tag and the checksum of its weights."""
    payload = {"format": FORMAT, **payload, "weights_sha256": weights_digest(payload["members"])}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except RuntimeError as e:  # torch reports a failed write (a full disk, say) as a RuntimeError
        first_line = (str(e).splitlines() or ["write failed"])[0][:200]
        raise PneumoError(f"cannot write the checkpoint {path} ({first_line}); is the disk full?") from None


def read_checkpoint(path: str | Path) -> dict:
    """The checked contents of a checkpoint file: a readable format, weights that match their checksum."""
    path = Path(path)
    _require_regular_file(path)
    if not zipfile.is_zipfile(path):
        # Say so plainly: torch's own message for such files suggests loading with weights_only=False.
        raise CheckpointError(f"{path} is not a readable checkpoint (not a file saved by torch)")
    try:
        # weights_only: a checkpoint is data; loading one must never run code from it.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on foreign bytes with any error type
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a pneumo checkpoint (expected format {FORMAT})")
    _check_weights(raw, path)
    return raw


def weights_digest(members: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for i, state in enumerate(members):
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_weights(raw: dict, path: Path) -> None:
    members = raw.get("members", [raw.get("model")])
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise CheckpointError(f"{path} holds no model weights")
    for state in members:
        if not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{path} holds model weights that are not tensors")
        # Before anything reads them: a tensor whose strides repeat its few stored numbers (stride 0)
        # would be gigabytes once the checksum or a check below walks it.
        for name, t in state.items():
            if not t.is_contiguous() or t.numel() > MAX_WEIGHTS:
                raise CheckpointError(
                    f"{path} holds a tensor that is not a plain array of weights ({name}: shape "
                    f"{tuple(t.shape)[:8]}, strides {t.stride()[:8]})"
                )
    expected = raw.get("weights_sha256")
    if expected is not None and expected != weights_digest(members):
        raise CheckpointError(f"{path} is damaged: its weights do not match the checksum they were saved with")
    for state in members:
        for name, t in state.items():
            if t.is_complex() or not (t.is_floating_point() or name.endswith("num_batches_tracked")):
                raise CheckpointError(f"{path} holds weights that are not real numbers ({name}, {t.dtype})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{path} holds non-finite weights ({name}): it cannot give usable probabilities")
            if name.endswith("running_var") and (t < 0).any():
                raise CheckpointError(f"{path} holds a negative BatchNorm variance ({name}): it is damaged")


def _require_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file")


def _config(raw: dict, path: Path, overrides: list[str]) -> Config:
    config = raw["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} carries no config")
    for item in overrides:
        config = apply_override(config, item)
    source = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    try:
        return from_dict(config, source=source)
    except ConfigError as e:
        if overrides:
            raise  # the user's override is at fault: a plain input error
        raise CheckpointError(f"{path} does not carry a usable config: {e}") from None


def _threshold(value, path: Path) -> float:
    """A decision threshold strictly between 0 and 1: at 0 or 1 every image gets one label."""
    t = _probability(value, "threshold", path)
    if not 0 < t < 1:
        raise CheckpointError(f"{path} has no usable threshold (expected a number strictly between 0 and 1, found {t})")
    return t


def _probability(value, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
        raise CheckpointError(f"{path} has no usable {what} (expected a number in [0, 1], found {value!r})")
    return float(value)


def bundled_checkpoint() -> Path:
    """The trained model that ships with pneumo, used when a command is given no --checkpoint."""
    candidates = [Path(__file__).resolve().parents[3] / "models" / BUNDLED_MODEL]  # a source checkout
    try:
        candidates.insert(0, Path(str(resources.files("pneumo.weights") / BUNDLED_MODEL)))  # an installed wheel
    except ModuleNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise PneumoError(
        f"no --checkpoint given, and the bundled model {BUNDLED_MODEL} is not installed; name a "
        "checkpoint with --checkpoint"
    )
