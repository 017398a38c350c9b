"""Batch inference for scheduled jobs: score image files into a CSV, safely re-runnable.

The output CSV is the job's state. Rows are appended a batch at a time and synced to disk, so a run
killed at any moment keeps every row it wrote; a re-run first cuts off whatever a kill left half
written, then skips the paths already in the file. A lock (see fileio.FileLock) keeps two runs off
one output, whatever name they reach it by.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo.checkpoint import TrainedModel
from pneumo.config import DataConfig
from pneumo.data.folder import IMAGE_SUFFIXES
from pneumo.data.images import decode_all
from pneumo.device import prepare, resolve_device
from pneumo.engine import predict
from pneumo.errors import CheckpointError, PneumoError
from pneumo.export import is_torchscript, load_torchscript
from pneumo.fileio import FileLock, file_sha256
from pneumo.labels import NORMAL, PNEUMONIA
from pneumo.logs import log
from pneumo.progress import batches

COLUMNS = ["path", "probability", "label", "model", "error"]


@dataclass
class InferenceModel:
    """What scoring needs, from a checkpoint or an exported TorchScript file."""

    network: nn.Module
    image_size: int
    threshold: float
    max_pixels: int
    model_id: str

    @classmethod
    def load(cls, path: str | Path, trust_torchscript: bool = False) -> InferenceModel:
        if is_torchscript(path):
            if not trust_torchscript:
                raise CheckpointError(
                    f"{path} is a TorchScript file, which is code and can do anything when run; "
                    "pass --trust-torchscript if you trust where it came from"
                )
            try:
                network, meta = load_torchscript(path)
                return cls(
                    network,
                    int(meta["image_size"]),
                    float(meta["threshold"]),
                    DataConfig().max_pixels,
                    file_sha256(path)[:16],
                )
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise CheckpointError(
                    f"{path} cannot be loaded as an exported model ({str(e).splitlines()[0][:200]})"
                ) from None
        model = TrainedModel.load(path)
        return cls(
            model.network(), model.config.data.image_size, model.threshold, model.config.data.max_pixels, model.model_id
        )


@dataclass
class Summary:
    total: int
    already_done: int
    scored: int
    bad: int
    seconds: float

    def line(self, out: Path) -> str:
        rate = self.scored / self.seconds if self.seconds else 0.0
        return (
            f"{self.total} files: {self.scored} scored, {self.bad} unusable, {self.already_done} already in {out}; "
            f"{self.seconds:.1f} s ({rate:.1f} images/s)"
        )


def run_predict(
    model: InferenceModel, inputs: list[str], out: str | Path, batch_size: int = 64, device: str = "auto"
) -> Summary:
    """Score every image file named by `inputs` that `out` does not hold yet, appending rows to `out`."""
    start = time.perf_counter()
    files = find_images(inputs)
    if not files:
        raise PneumoError(f"no image files found in {', '.join(inputs)}")
    dev = resolve_device(device)
    network = prepare(model.network, dev)
    scores = ScoresCsv(out)
    with FileLock(
        scores.lock_file,
        "another pneumo-predict (pid {pid}) is writing " + scores.path.name + "; try again when it has finished",
    ):
        done = scores.repair_and_read()
        todo = [f for f in files if f not in done]
        log.info(
            "%d files, %d already in %s, %d to score with model %s",
            len(files),
            len(files) - len(todo),
            out,
            len(todo),
            model.model_id,
        )
        bad = 0
        with scores.appending() as append:
            for part in batches(len(todo), batch_size, "predicting"):
                rows = _score_batch(model, network, dev, todo[part])
                bad += sum(1 for r in rows if r[4])
                append(rows)
    return Summary(len(files), len(files) - len(todo), len(todo) - bad, bad, time.perf_counter() - start)


def _score_batch(model: InferenceModel, network: nn.Module, device: torch.device, paths: list[str]) -> list[list[str]]:
    # Memory stays at one batch of images, whatever the number of files.
    images, errors = decode_all(paths, model.image_size, model.max_pixels, skip_bad=True, desc="decoding")
    ok = [i for i in range(len(paths)) if i not in errors]
    probs = predict(network, torch.from_numpy(images[ok]), len(paths), device, desc="scoring") if ok else np.zeros(0)
    scored = dict(zip(ok, probs, strict=True))
    rows = []
    for i, path in enumerate(paths):
        p = scored.get(i)
        if p is not None and not np.isfinite(p):
            errors[i], p = "the model gave no finite probability for this image", None
        if p is None:
            rows.append([path, "", "", model.model_id, errors[i]])
        else:
            rows.append([path, f"{p:.6f}", PNEUMONIA if p >= model.threshold else NORMAL, model.model_id, ""])
    return rows


def find_images(inputs: list[str]) -> list[str]:
    """Image files named by `inputs`: folders (searched recursively), image files, or CSV lists whose
    `path` column (else first column) names files relative to the CSV. Sorted, each once. Named files
    are kept whatever they are, so that one that cannot be read gets a row saying why."""
    found: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [
                str(f.resolve())
                for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith(".")
            ]
        elif p.suffix.lower() == ".csv" and p.is_file():
            found += _csv_list(p)
        elif os.path.lexists(p):
            found.append(str(p.resolve()))
        else:
            raise PneumoError(f"input {item} does not exist")
    return sorted(set(found))


def _csv_list(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    has_header = bool(rows) and "path" in rows[0]
    column = rows[0].index("path") if has_header else 0
    return [
        str((path.parent / r[column].strip()).resolve())
        for r in rows[has_header:]
        if len(r) > column and r[column].strip()
    ]


class ScoresCsv:
    """The output CSV. Paths are written as the file system holds them (bytes that are not UTF-8 stay
    as they are), fields with line breaks quoted, so every path reads back as it was written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        target = self.path.resolve()  # a symlink and its target share one lock
        self.lock_file = target.with_name(target.name + ".lock")

    def repair_and_read(self) -> set[str]:
        """Paths already in the file, after cutting off whatever follows its last complete row."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        if data and not data.startswith(encode_row(COLUMNS)):
            raise PneumoError(
                f"{self.path} exists and is not a pneumo-predict output (it does not start with the "
                f"header {','.join(COLUMNS)})"
            )
        rows, good = _complete_rows(data)
        if good < len(data):
            log.warning("%s ended in an incomplete row (an earlier run was killed); removing it", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return {r[0] for r in rows[1:]}

    def appending(self):
        return _Appender(self.path)


class _Appender:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size == 0:
            self([COLUMNS])
        return self

    def __call__(self, rows: list[list[str]]) -> None:
        # One write per batch, then fsync: a kill after this returns cannot lose these rows.
        view = memoryview(b"".join(encode_row(r) for r in rows))
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def encode_row(row: list[str]) -> bytes:
    buf = io.StringIO()
    # csv quotes a field with "\n" in it, but not one with only "\r", which readers take as a line end.
    quoting = csv.QUOTE_ALL if any("\r" in field for field in row) else csv.QUOTE_MINIMAL
    csv.writer(buf, lineterminator="\n", quoting=quoting).writerow(row)
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def _complete_rows(data: bytes) -> tuple[list[list[str]], int]:
    """The rows of an output file, and how many of its bytes they fill: each row is checked by writing
    it again, so a row cut short anywhere (even just after a line break inside a quoted path) ends
    the good part."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""), strict=True)
    rows, good = [], 0
    while True:
        try:
            row = next(reader)
        except (StopIteration, csv.Error):  # the end, or a quoted field cut off by the end
            return rows, good
        encoded = encode_row(row)
        if len(row) != len(COLUMNS) or data[good : good + len(encoded)] != encoded:
            return rows, good
        rows.append(row)
        good += len(encoded)
