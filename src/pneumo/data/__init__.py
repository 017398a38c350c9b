"""Data splits as in-memory uint8 arrays, from the synthetic generator or a Kermany-style folder."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pneumo.config import Config
from pneumo.data import synthetic
from pneumo.data.folder import list_split, patient_id, patient_split
from pneumo.data.images import load_images
from pneumo.errors import PneumoError
from pneumo.progress import log

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    name: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64, PNEUMONIA = 1
    ids: list[str]  # file paths, or synthetic:SPLIT:i
    patients: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        pos = int(self.labels.sum())
        return f"{self.name}: {len(self)} images ({pos} pneumonia, {len(self) - pos} normal, {len(set(self.patients))} patients)"

    def require_both_classes(self) -> None:
        if len(np.unique(self.labels)) < 2:
            only = "PNEUMONIA" if self.labels[0] else "NORMAL"
            raise PneumoError(f"split '{self.name}' holds only {only} images: ROC AUC and thresholds need both classes")


def load_split(cfg: Config, name: str) -> Split:
    """One split as the pipeline sees it: with data.val_source=carve, 'train' and 'val' are the two
    patient-grouped parts of the train folder."""
    if name not in SPLITS:
        raise PneumoError(f"unknown split '{name}': expected one of {', '.join(SPLITS)}")
    d = cfg.data
    if d.source == "synthetic":
        n = {"train": d.synthetic.n_train, "val": d.synthetic.n_val, "test": d.synthetic.n_test}[name]
        log.info("generating %d synthetic %s images (%dx%d)", n, name, d.image_size, d.image_size)
        images, labels = synthetic.make_split(name, n, d.image_size, d.synthetic.prevalence, cfg.seed)
        ids = [f"synthetic:{name}:{i}" for i in range(n)]
        return Split(name, images, labels, ids, ids)

    paths, labels = _folder_items(cfg, name)
    images = load_images(paths, d.image_size, d.workers, desc=f"decoding {name}")
    return Split(name, images, labels, paths, [patient_id(p) for p in paths])


def _folder_items(cfg: Config, name: str) -> tuple[list[str], np.ndarray]:
    d = cfg.data
    if d.val_source == "folder" or name == "test":
        return list_split(d.root, name)
    paths, labels = list_split(d.root, "train")
    is_val = patient_split([patient_id(p) for p in paths], labels, d.val_fraction, d.split_seed)
    keep = is_val if name == "val" else ~is_val
    return [p for p, k in zip(paths, keep) if k], labels[keep]


def split_manifest(*splits: Split) -> str:
    """The file lists of the splits as JSON, for the run directory."""
    return json.dumps(
        {s.name: [{"id": i, "label": int(l), "patient": p} for i, l, p in zip(s.ids, s.labels, s.patients)] for s in splits},
        indent=1,
    )
