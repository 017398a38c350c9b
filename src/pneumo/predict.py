"""Batch inference for scheduled jobs: score image files into a CSV, safely re-runnable.

The output CSV is the job's state. Rows are appended a batch at a time and flushed to disk, so a
run killed at any moment keeps every row it wrote; a re-run skips the paths already in the file
and first cuts off a last line left incomplete by the kill. A lock file (flock, released by the
kernel when its holder dies, so a stale lock is simply taken over) keeps two runs off one output.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumo.checkpoint import load_checkpoint, model_from_checkpoint
from pneumo.config import DataConfig, from_dict
from pneumo.data.folder import IMAGE_SUFFIXES
from pneumo.data.images import decode_all
from pneumo.engine import predict, prepare, resolve_device
from pneumo.errors import CheckpointError, OutputLocked, PneumoError
from pneumo.progress import batches, log

COLUMNS = ["path", "probability", "label", "model", "error"]


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


def find_images(inputs: list[str]) -> list[str]:
    """Image files named by `inputs`: folders (searched recursively), image files, or CSV lists whose
    `path` column (else first column) names files relative to the CSV. Sorted, each once."""
    found: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [str(f.resolve()) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith(".")]
        elif p.suffix.lower() == ".csv" and p.is_file():
            rows = list(csv.reader(p.read_text(encoding="utf-8-sig").splitlines()))
            column = rows[0].index("path") if rows and "path" in rows[0] else 0
            body = rows[1:] if rows and "path" in rows[0] else rows
            found += [str((p.parent / r[column].strip()).resolve()) for r in body if r and r[column].strip()]
        elif p.is_file():
            found.append(str(p.resolve()))
        else:
            raise PneumoError(f"input {item} does not exist")
    return sorted(set(found))


def checkpoint_hash(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def run_predict(checkpoint: str | Path, inputs: list[str], out: str | Path, batch_size: int = 64, device: str = "auto", workers: int = 0) -> Summary:
    start = time.perf_counter()
    out = Path(out)
    model, size, threshold, max_pixels = _load_model(checkpoint)
    model_id = checkpoint_hash(checkpoint)
    files = find_images(inputs)
    if not files:
        raise PneumoError(f"no image files found in {', '.join(inputs)}")
    dev = resolve_device(device)
    model = prepare(model, dev)

    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        done = _repair_and_read_done(out)
        todo = [f for f in files if f not in done]
        log.info("%d files, %d already in %s, %d to score with model %s", len(files), len(files) - len(todo), out, len(todo), model_id)
        bad = 0
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size == 0:
                _append(fd, _rows([COLUMNS]))
            for part in batches(len(todo), batch_size, "predicting"):
                paths = todo[part]
                # Memory stays at one batch of images, whatever the number of files.
                images, errors = decode_all(paths, size, max_pixels, skip_bad=True, workers=workers, desc="decoding")
                ok = [i for i in range(len(paths)) if i not in errors]
                probs = predict(model, torch.from_numpy(images[ok]), batch_size, dev, desc="scoring") if ok else np.zeros(0)
                scored = dict(zip(ok, probs))
                rows = []
                for i, path in enumerate(paths):
                    if i in scored:
                        p = float(scored[i])
                        rows.append([path, f"{p:.6f}", "PNEUMONIA" if p >= threshold else "NORMAL", model_id, ""])
                    else:
                        rows.append([path, "", "", model_id, errors[i]])
                bad += len(errors)
                _append(fd, _rows(rows))
        finally:
            os.close(fd)
    return Summary(len(files), len(files) - len(todo), len(todo) - bad, bad, time.perf_counter() - start)


def _load_model(path) -> tuple[torch.nn.Module, int, float, int]:
    """(model, image size, threshold, max pixels) from a pneumo checkpoint or a TorchScript export."""
    from pneumo.export import is_torchscript, load_torchscript

    try:
        if is_torchscript(path):
            model, meta = load_torchscript(path)
            return model, meta["image_size"], meta["threshold"], DataConfig().max_pixels
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path)  # validates the config it carries, naming the file
        cfg = from_dict(ckpt["config"], source=str(path))
        return model, cfg.data.image_size, ckpt["threshold"], cfg.data.max_pixels
    except PneumoError as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be loaded as an exported model ({str(e).splitlines()[0][:200]})") from None


class _locked:
    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise OutputLocked(f"another pneumo-predict (pid {holder}) is writing {self.path.name[:-5]}; try again when it has finished") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock; the file stays, harmless, for the next run to lock


def _repair_and_read_done(out: Path) -> set[str]:
    """Paths already in `out`; an incomplete last line (a kill in the middle of a write) is cut off."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s ended in an incomplete line (an earlier run was killed); removing it", out)
        with open(out, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows = list(csv.reader(io.StringIO(data.decode())))
    if rows and rows[0] != COLUMNS:
        raise PneumoError(f"{out} exists and is not a pneumo-predict output (its header is {','.join(rows[0])})")
    return {r[0] for r in rows[1:] if r}


def _rows(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _append(fd: int, data: bytes) -> None:
    # One write per batch, then fsync: a kill after this returns cannot lose these rows.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
