"""The Kermany folder layout ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*, patient ids, patient-grouped splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pneumo.core.errors import PneumoError
from pneumo.core.labels import CLASSES

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}

# person1234_bacteria_5678.jpeg -> person1234. IM-0117-0001 and NORMAL2-IM-0117-0001 map to the same
# id on purpose: if the two numbering schemes ever name one patient, merging them costs nothing but a
# slightly coarser split, while keeping them apart could leak that patient across the split.
# ChestX-ray14's 00001299_003.png -> 00001299 (follow-up 3 of patient 1299).
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(?:NORMAL2-)?(IM-\d+)-"),
    re.compile(r"^(\d{8})_\d{3}\.\w+$"),
)


def patient_id(path: str | Path) -> str:
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(path).stem


def list_split(root: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """Image paths (sorted, so runs are reproducible) and labels of ROOT/SPLIT."""
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise PneumoError(f"data folder {root} does not exist (set data.root)")
    if not split_dir.is_dir():
        raise PneumoError(f"split '{split}' not found: {split_dir} does not exist")
    return list_classes(split_dir, f"split '{split}'")


def list_classes(folder: str | Path, what: str) -> tuple[list[str], np.ndarray]:
    """Image paths (sorted) and labels of FOLDER/NORMAL and FOLDER/PNEUMONIA; `what` names the folder
    in errors."""
    folder = Path(folder)
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise PneumoError(f"{class_dir} does not exist: {what} needs NORMAL and PNEUMONIA folders")
        found = sorted(
            str(p)
            for p in class_dir.iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise PneumoError(f"{what} in {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths, np.asarray(labels, dtype=np.int64)


def patient_split(patients: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation part: about `fraction` of each class, whole patients only."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(patients), dtype=bool)
    members: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        members.setdefault(p, []).append(i)
    for label in (0, 1):
        # A patient goes with the class of their first image, so each patient is decided once.
        groups = sorted(p for p, idx in members.items() if labels[idx[0]] == label)
        target = fraction * int(np.sum(labels == label))
        taken = 0
        for k in rng.permutation(len(groups)):
            if taken >= target:
                break
            idx = members[groups[k]]
            is_val[idx] = True
            taken += len(idx)
    return is_val
