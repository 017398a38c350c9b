"""CSV manifests: `path,label[,patient_id,split]`, paths relative to the CSV file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pneumo.core.errors import PneumoError
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
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PneumoError(f"manifest {csv_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PneumoError(f"manifest {csv_path} cannot be read: {e}") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    if not {"path", "label"} <= set(columns):
        raise PneumoError(
            f"manifest {csv_path} needs a header with the columns path and label (found: "
            f"{', '.join(columns) or 'none'})"
        )
    rows, seen = [], {}
    for line, raw in enumerate(reader, start=2):
        record = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
        where = f"{csv_path} line {line}"
        if not record["path"]:
            raise PneumoError(f"{where}: empty path")
        label = LABELS.get(record["label"].upper())
        if label is None:
            raise PneumoError(f"{where}: unknown label '{record['label']}' (expected NORMAL, PNEUMONIA, 0 or 1)")
        split = record.get("split") or "train"
        if split not in SPLITS:
            raise PneumoError(f"{where}: unknown split '{split}' (expected train, val or test)")
        path = str((csv_path.parent / record["path"]).resolve())
        if path in seen:
            raise PneumoError(f"{where}: {record['path']} is listed twice (first on line {seen[path]})")
        seen[path] = line
        rows.append(Row(path, label, record.get("patient_id") or patient_id(path), split))
    if not rows:
        raise PneumoError(f"manifest {csv_path} lists no images")
    return rows
