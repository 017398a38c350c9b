"""Data splits as uint8 arrays, from synthetic images, a Kermany folder, a CSV manifest or an npz file."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo.core.config import Config, DataConfig
from pneumo.core.errors import PneumoError
from pneumo.core.labels import CLASSES, SPLITS
from pneumo.core.logs import log
from pneumo.data import synthetic
from pneumo.data.cache import cached_decode, default_cache_dir
from pneumo.data.folder import list_split, patient_id, patient_split
from pneumo.data.manifest import read_manifest
from pneumo.data.npz import read_npz_split


@dataclass
class Split:
    name: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64, PNEUMONIA = 1
    ids: list[str]  # file paths, or FILE.npz:SPLIT:i, or synthetic:SPLIT:i
    patients: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of unusable files left out

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        pos = int(self.labels.sum())
        skipped = f", {len(self.skipped)} unusable files skipped" if self.skipped else ""
        counts = f"{pos} pneumonia, {len(self) - pos} normal, {len(set(self.patients))} patients"
        return f"{self.name}: {len(self)} images ({counts}{skipped})"

    def require_both_classes(self) -> None:
        if len(self) == 0:
            raise PneumoError(f"split '{self.name}' holds no usable images")
        if len(np.unique(self.labels)) < 2:
            only = CLASSES[int(self.labels[0])]
            raise PneumoError(f"split '{self.name}' holds only {only} images: ROC AUC and thresholds need both classes")


def resolve_format(d: DataConfig) -> str:
    if d.format != "auto":
        return d.format
    root = Path(d.root)
    if root.suffix.lower() in (".csv", ".npz"):
        return root.suffix.lower()[1:]
    if root.is_dir():
        return "folder"
    raise PneumoError(f"data.root {root} is neither a folder nor a .csv or .npz file (data.format: auto)")


def load_split(cfg: Config, name: str) -> Split:
    """One split as the pipeline sees it: with data.val_source=carve, 'train' and 'val' are the two
    patient-grouped parts of the data set's train split."""
    if name not in SPLITS:
        raise PneumoError(f"unknown split '{name}': expected one of {', '.join(SPLITS)}")
    d = cfg.data
    fmt = resolve_format(d)
    if fmt == "synthetic":
        n = {"train": d.synthetic.n_train, "val": d.synthetic.n_val, "test": d.synthetic.n_test}[name]
        log.info("generating %d synthetic %s images (%dx%d)", n, name, d.image_size, d.image_size)
        images, labels = synthetic.make_split(name, n, d.image_size, d.synthetic.prevalence, cfg.seed)
        ids = [f"synthetic:{name}:{i}" for i in range(n)]
        return Split(name, images, labels, ids, ids)

    carve = d.val_source == "carve" and name != "test"
    source = "train" if carve else name
    if fmt == "npz":
        images, labels = read_npz_split(d.root, source, d.image_size)
        ids = [f"{d.root}:{source}:{i}" for i in range(len(labels))]
        patients, bad = ids, {}  # MedMNIST gives no patient ids
    else:
        if fmt == "folder":
            paths, labels = list_split(d.root, source)
            patients = [patient_id(p) for p in paths]
        else:
            rows = [r for r in read_manifest(d.root) if r.split == source]
            if not rows:
                raise PneumoError(f"manifest {d.root} has no rows for split '{source}'")
            paths, labels, patients = (
                [r.path for r in rows],
                np.array([r.label for r in rows]),
                [r.patient for r in rows],
            )
        cache_dir = (d.cache_dir or default_cache_dir()) if d.cache else None
        images, bad = cached_decode(
            paths, d.image_size, d.max_pixels, d.on_bad_image == "skip", cache_dir, d.workers, f"decoding {source}"
        )
        ids = paths

    keep = np.ones(len(labels), dtype=bool)
    if carve:
        is_val = patient_split(patients, labels, d.val_fraction, d.split_seed)
        keep = is_val if name == "val" else ~is_val
    usable = keep.copy()
    usable[list(bad)] = False
    return Split(
        name,
        np.ascontiguousarray(images[usable]),  # into memory: training reads every image every epoch
        np.asarray(labels)[usable],
        [i for i, u in zip(ids, usable, strict=True) if u],
        [p for p, u in zip(patients, usable, strict=True) if u],
        [(ids[i], reason) for i, reason in sorted(bad.items()) if keep[i]],
    )


def split_manifest(*splits: Split) -> str:
    """The file lists of the splits as JSON, for the run directory."""
    return json.dumps(
        {
            s.name: [
                {"id": i, "label": int(label), "patient": p}
                for i, label, p in zip(s.ids, s.labels, s.patients, strict=True)
            ]
            for s in splits
        },
        indent=1,
    )


def bad_image_report(*splits: Split) -> str:
    """CSV of the files left out (data.on_bad_image: skip), with the reason."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["split", "path", "reason"])
    for s in splits:
        writer.writerows((s.name, path, reason) for path, reason in s.skipped)
    return buf.getvalue()
