"""CSV manifests: `path,label[,patient_id,split]`, paths relative to the CSV file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pneumo.core.errors import PneumoError
from pneumo.core.fileio import read_regular
from pneumo.core.labels import CLASSES, SPLITS
from pneumo.data.folder import patient_id

LABELS = {**{name: label for label, name in enumerate(CLASSES)}, "0": 0, "1": 1}


@dataclass(frozen=True)
class Row:
    path: str
    label: int
    patient: str
    split: str


def read_manifest(csv_path: str | Path) -> list[Row]:
    """Every row, checked: known labels and splits, no path twice. Without a split column every row is 'train'."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise PneumoError(f"manifest {csv_path} does not exist")
    try:
        text = read_regular(csv_path, "manifest").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PneumoError(f"manifest {csv_path} cannot be read: {e}") from None
    try:
        return _rows(csv_path, csv.DictReader(text.splitlines()))
    except csv.Error as e:  # a field over csv's size limit, say
        raise PneumoError(f"manifest {csv_path} is not a readable CSV ({e})") from None


def _rows(csv_path: Path, reader: csv.DictReader) -> list[Row]:
    columns = [c.strip() for c in reader.fieldnames or []]
    if not {"path", "label"} <= set(columns):
        raise PneumoError(
            f"manifest {csv_path} needs a header with the columns path and label (found: "
            f"{', '.join(columns) or 'none'})"
        )
    rows, seen = [], {}
    for line, record in enumerate(_records(reader), start=2):
        where = f"{csv_path} line {line}"
        if not record["path"]:
            raise PneumoError(f"{where}: empty path")
        label = LABELS.get(record["label"].upper())
        if label is None:
            raise PneumoError(f"{where}: unknown label '{record['label']}' (expected NORMAL, PNEUMONIA, 0 or 1)")
        split = record.get("split") or "train"
        if split not in SPLITS:
            raise PneumoError(f"{where}: unknown split '{split}' (expected train, val or test)")
        path = _resolved(csv_path.parent / record["path"], where)
        if path in seen:
            raise PneumoError(f"{where}: {record['path']} is listed twice (first on line {seen[path]})")
        seen[path] = line
        rows.append(Row(path, label, record.get("patient_id") or patient_id(path), split))
    if not rows:
        raise PneumoError(f"manifest {csv_path} lists no images")
    return rows


def column(source: str | Path, name: str, paths: list[str]) -> list[str]:
    """The manifest `source`'s column `name` (one pneumo does not read: a view, an age) for each of
    `paths`, resolved as read_manifest gives them; '' where it has no value, and for every path when
    `source` is not a manifest (a folder of NORMAL/ and PNEUMONIA/)."""
    source = Path(source)
    if not source.is_file():
        return [""] * len(paths)
    text = read_regular(source, "manifest").decode("utf-8-sig")
    by_path = {
        _resolved(source.parent / row["path"], str(source)): row.get(name, "")
        for row in _records(csv.DictReader(text.splitlines()))
        if row.get("path")
    }
    return [by_path.get(p, "") for p in paths]


def _records(reader: csv.DictReader):
    """The reader's rows with their column names and values stripped of spaces, as a hand-made CSV has them."""
    for raw in reader:
        yield {k.strip(): (v or "").strip() for k, v in raw.items() if k}


def _resolved(path: Path, where: str) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise PneumoError(f"{where}: {path} cannot be resolved ({e})") from None
