"""Typed experiment configuration: YAML in, validated dataclasses out.

Every key has a type and, where it matters, a range. Loading checks the whole file before any work
starts, so a typo in a nightly job's config fails in the first second, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pneumo.core.errors import ConfigError


def _range(lo=None, hi=None, **kw):
    return {"min": lo, "max": hi, **kw}


@dataclass
class SyntheticConfig:
    n_train: int = field(default=800, metadata=_range(2, 100_000))
    n_val: int = field(default=200, metadata=_range(2, 100_000))
    n_test: int = field(default=200, metadata=_range(2, 100_000))
    prevalence: float = field(default=0.5, metadata=_range(0.05, 0.95))


@dataclass
class DataConfig:
    # synthetic: generated from the seed, nothing to download; folder: ROOT/{train,val,test}/{NORMAL,PNEUMONIA};
    # csv: a manifest path,label[,patient_id,split]; npz: MedMNIST arrays; auto: folder, .csv or .npz by root
    format: Literal["synthetic", "auto", "folder", "csv", "npz"] = "synthetic"
    root: str | None = None
    image_size: int = field(default=224, metadata=_range(16, 1024))
    # carve: a patient-grouped validation set taken out of train; official: the data set's own val split
    val_source: Literal["carve", "official"] = "carve"
    val_fraction: float = field(default=0.15, metadata=_range(0.01, 0.9))
    # Separate from `seed`, so that runs with different training seeds are compared on one validation set.
    split_seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    # error: stop at the first unusable file, naming it; skip: leave it out and list it in bad_images.csv
    on_bad_image: Literal["error", "skip"] = "error"
    # Larger images are refused as possible decompression bombs (a 7000 x 7000 radiograph is 49 M).
    max_pixels: int = field(default=100_000_000, metadata=_range(1, 2_000_000_000))
    workers: int = field(default=0, metadata=_range(0, 256, doc="image decoding threads; 0 = all cores"))
    # Decoded, resized images are kept as uint8 arrays here (default: $XDG_CACHE_HOME/pneumo or ~/.cache/pneumo).
    cache: bool = True
    cache_dir: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotate_deg: float = field(default=7.0, metadata=_range(0, 45))
    translate: float = field(default=0.05, metadata=_range(0, 0.3))
    scale: float = field(default=0.08, metadata=_range(0, 0.5))
    brightness: float = field(default=0.1, metadata=_range(0, 1))
    contrast: float = field(default=0.1, metadata=_range(0, 1))
    # Width against height stretched by up to this factor either way. Kermany's PNEUMONIA originals
    # are wider than its NORMAL ones (mean aspect 1.50 against 1.21), and squashing them to a square
    # leaves the class in the shape of the chest: this makes the shape useless as a cue.
    aspect: float = field(default=0.0, metadata=_range(0, 1))
    hflip: float = field(default=0.0, metadata=_range(0, 1, doc="probability of a left-right mirror"))
    # Exposure: pixel values raised to exp(u), u uniform in [-gamma, gamma].
    gamma: float = field(default=0.0, metadata=_range(0, 1))
    # Sharpness: a Gaussian blur of sigma uniform in [0, blur] pixels. NORMAL originals are larger, so
    # at 224x224 they keep more fine detail than PNEUMONIA ones; blurring makes detail a weaker cue.
    blur: float = field(default=0.0, metadata=_range(0, 5))
    # Probability of blanking one random rectangle (2% to 20% of the image) to the image's mean, so no
    # single region (a side marker, a corner) can decide the label.
    erase: float = field(default=0.0, metadata=_range(0, 1))
    # Sharpness: an unsharp mask of strength uniform in [0, sharpen], as sites that enhance edges give.
    sharpen: float = field(default=0.0, metadata=_range(0, 5))
    # Sensor noise: Gaussian, of standard deviation uniform in [0, noise] (in units of the full range).
    noise: float = field(default=0.0, metadata=_range(0, 0.5))


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata=_range(1, 1024))
    stem_stride: int = field(default=2, metadata=_range(1, 4))
    dropout: float = field(default=0.1, metadata=_range(0, 0.9))
    # A step before the network that removes each image's own exposure (model.network.normalize).
    per_image: Literal["none", "standardize", "equalize"] = "none"
    # Test-time augmentation: the mean logit of each image and its mirror image.
    tta: bool = False


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=_range(1, 10_000))
    batch_size: int = field(default=32, metadata=_range(1, 4096))
    eval_batch_size: int = field(default=128, metadata=_range(1, 4096))
    lr: float = field(default=2e-3, metadata=_range(0, 10))
    weight_decay: float = field(default=1e-4, metadata=_range(0, 10))
    warmup_epochs: float = field(default=1.0, metadata=_range(0, 1000))
    # auto: n_negative / n_positive of the training split; null: unweighted
    pos_weight: float | Literal["auto"] | None = field(default=None, metadata=_range(0, 1000))
    # epochs without a better validation AUC before stopping; 0 never stops early
    patience: int = field(default=5, metadata=_range(0, 10_000))
    # Decision threshold chosen on validation: youden, balanced and max_f1 fit validation's score
    # distributions; midpoint sits halfway between the classes' median logits, keeping a margin to both
    # for a site whose scores shift either way (see docs/new-site.md); fixed is fixed_threshold.
    threshold: Literal["fixed", "max_f1", "youden", "balanced", "midpoint"] = "youden"
    fixed_threshold: float = field(default=0.5, metadata=_range(0, 1))
    # Training arithmetic. auto: bf16 autocast on GPUs that support it and on CPUs with AMX, float32
    # elsewhere (without AMX, bf16 on a CPU is emulated). Inference is float32 on every device.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The applicability check: the share of validation images its threshold keeps in scope (the rest
    # is what it flags there; see docs/new-site.md).
    ood_quantile: float = field(default=0.98, metadata=_range(0.5, 0.9999))
    # An ensemble: this many networks, trained with seeds seed, seed + 1, ..., whose logits are averaged.
    members: int = field(default=1, metadata=_range(1, 16))
    # Fitted on validation after training, so that probabilities can be read as probabilities:
    # platt (scale and shift of the logit), temperature (scale only) or none.
    calibration: Literal["platt", "temperature", "none"] = "platt"
    # torch.compile the model: its compile time pays back on GPUs in long runs (see docs/performance.md)
    compile: bool = False
    # Under torchrun on GPUs, BatchNorm statistics over the global batch (torch's SyncBatchNorm is GPU-only)
    sync_bn: bool = True
    # Start from a trained model's weights instead of random ones: each network from the checkpoint's
    # network trained with the same seed (else its first), e.g. to learn a new site's images.
    init_from: str | None = None


@dataclass
class OutputConfig:
    dir: str = "runs/quickstart"
    # Also write TensorBoard event files into DIR/tensorboard (the tensorboard extra); curves.png always.
    tensorboard: bool = False


@dataclass
class Config:
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # false: torch's operators only, never pneumo's CPU kernels (pneumo.cpu); true leaves it to the
    # environment (PNEUMO_CPU_KERNELS).
    cpu_kernels: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes: not an experiment file")
    try:
        raw = parse_yaml(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {_show(raw)}")
    # Field by field first, so an error names the file or the override that brought the bad value.
    _build(Config, raw, str(path), prefix="")
    for item in overrides:
        raw = apply_override(raw, item)
        _build(Config, raw, f"--set {item}", prefix="")
    return from_dict(raw, source=str(path))


def apply_override(raw: dict, item: str) -> dict:
    """Return a copy of `raw` with `a.b.c=value` set; the value is read as a YAML scalar."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected section.key=value")
    value = parse_yaml(text, f"--set {item}") if text.strip() else None
    out = _deepcopy(raw)
    node = out
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: {part} is not a section")
        node = child
    node[leaf] = value
    return out


MAX_CONFIG_BYTES = 1_000_000


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML without aliases (a few bytes of nested aliases can expand to gigabytes) and without
    repeated keys (a second `train:` section would silently replace the first)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in pneumo configs", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())[:300]}") from None


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, raw, source, prefix="")
    _check_consistency(cfg, source)
    return cfg


def _check_consistency(cfg: Config, source: str) -> None:
    if cfg.data.format != "synthetic" and not cfg.data.root:
        raise ConfigError(
            f"{source}: data.root: must name the data (a folder, .csv or .npz) when data.format is '{cfg.data.format}'"
        )
    factor = cfg.model.stem_stride * 2 ** len(cfg.model.channels)
    if cfg.data.image_size < factor:
        raise ConfigError(
            f"{source}: data.image_size: {cfg.data.image_size} is smaller than the model's total "
            f"downsampling ({factor}: stem_stride {cfg.model.stem_stride}, {len(cfg.model.channels)} pooled blocks)"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _deepcopy(d):
    return {k: _deepcopy(v) for k, v in d.items()} if isinstance(d, dict) else d


def _build(cls, raw: Any, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'top level'}: expected a section (a mapping), got {_show(raw)}"
        )
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys here: {known})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f.metadata, source, prefix + name)
    return cls(**values)


def _coerce(value: Any, tp: Any, meta: dict, source: str, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, meta, source, key)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key}: expected {_describe(tp, meta)}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{source}: {key}: expected {_describe(tp, meta)}, got {_show(value)}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, meta, source, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = _scalar(value, tp)
    if ok is _BAD:
        raise ConfigError(f"{source}: {key}: expected {_describe(tp, meta)}, got {_show(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(ok, (int, float)) and not isinstance(ok, bool):
        if (lo is not None and ok < lo) or (hi is not None and ok > hi):
            raise ConfigError(f"{source}: {key}: {ok} is out of range, expected {_bounds(meta)}")
    return ok


_BAD = object()


def _scalar(value, tp):
    if tp is type(None):
        return None if value is None else _BAD
    if get_origin(tp) is Literal:
        return value if value in get_args(tp) else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" as a string; users mean the number.
            try:
                value = float(value)
            except ValueError:
                return _BAD
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return _BAD
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _BAD
    raise TypeError(f"unsupported config type {tp}")


def _describe(tp, meta) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(t, meta) for t in get_args(tp))
    if origin is list:
        return f"a non-empty list of {_describe(get_args(tp)[0], meta).removeprefix('an ').removeprefix('a ')}s"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    base = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}[tp]
    if tp in (int, float) and (meta.get("min") is not None or meta.get("max") is not None):
        base += f" {_bounds(meta)}"
    return base


def _bounds(meta) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _show(value) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"


# Settings of how the arithmetic runs, not of what it computes (the same numbers up to rounding): a
# model's hash does not change with them.
UNHASHED = ("cpu_kernels",)


def config_hash(cfg: Config) -> str:
    """The first 16 hex digits of the SHA-256 of the config as canonical JSON: same settings, same hash."""
    raw = {k: v for k, v in to_dict(cfg).items() if k not in UNHASHED}
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
