"""Batch inference for scheduled jobs: score image files into a CSV, safely re-runnable.

The output CSV is the job's state. Rows are appended a batch at a time and synced to disk, so a run
killed at any moment keeps every row it wrote; a re-run first cuts off whatever a kill left half
written, then skips the files whose last row is this model's score. A file whose last row is an
error, or another model's score, is scored again and gets a new row: a file's last row is its result.
A lock (see fileio.FileLock) keeps two runs off one output, whatever name they reach it by.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo import __version__
from pneumo.core.config import DataConfig, config_hash
from pneumo.core.device import prepare, resolve_device
from pneumo.core.errors import CheckpointError, PneumoError
from pneumo.core.fileio import FileLock, file_sha256, read_regular, resolved_name
from pneumo.core.labels import NORMAL, PNEUMONIA
from pneumo.core.logs import log
from pneumo.core.progress import progress
from pneumo.cpu import dispatch
from pneumo.data.folder import IMAGE_SUFFIXES
from pneumo.data.images import decode_all
from pneumo.model.applicability import Applicability
from pneumo.model.checkpoint import TrainedModel
from pneumo.model.inference import predict, scored
from pneumo.model.network import SmallCNN
from pneumo.score.export import is_torchscript, load_torchscript

COLUMNS = ["path", "probability", "label", "model", "error", "pneumo", "torch", "config", "ood_score", "ood"]
# A run warns when more than this share of the files it scored is out of the model's scope.
MOSTLY_OUT_OF_SCOPE = 0.5


@dataclass
class InferenceModel:
    """What scoring needs, from a checkpoint or an exported TorchScript file."""

    network: nn.Module
    image_size: int
    threshold: float
    max_pixels: int
    model_id: str
    config_hash: str = ""
    applicability: Applicability | None = None  # None: ood_score and ood stay empty (older checkpoints, exports)

    @classmethod
    def load(cls, path: str | Path, trust_torchscript: bool = False) -> InferenceModel:
        if is_torchscript(path):
            return cls._torchscript(path, trust_torchscript)
        model = TrainedModel.load(path)
        data = model.config.data
        return cls(
            model.network().folded(),
            data.image_size,
            model.threshold,
            data.max_pixels,
            model.model_id,
            config_hash(model.config),
            model.applicability,
        )

    @classmethod
    def _torchscript(cls, path: str | Path, trusted: bool) -> InferenceModel:
        if not trusted:
            raise CheckpointError(
                f"{path} is a TorchScript file, which is code and can do anything when run; "
                "pass --trust-torchscript if you trust where it came from"
            )
        try:
            network, meta = load_torchscript(path)
            size, threshold = int(meta["image_size"]), float(meta["threshold"])
            if not 0 < threshold < 1:  # NaN fails this too
                raise ValueError(f"its threshold {threshold} is not strictly between 0 and 1")
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{path} cannot be loaded as an exported model ({str(e).splitlines()[0][:200]})"
            ) from None
        config = meta.get("provenance", {}).get("config_sha256", "")
        return cls(network, size, threshold, DataConfig().max_pixels, file_sha256(path)[:16], config)


@dataclass(frozen=True)
class Shard:
    """This job's share of the inputs: the files whose key hashes to k modulo n (k counted from 1)."""

    k: int = 1
    n: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"([0-9]{1,9})/([0-9]{1,9})", text)  # ASCII digits: int() takes others too
        if not (match and 1 <= int(match[1]) <= int(match[2])):
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise PneumoError(f"--shard {shown}: expected K/N with 1 <= K <= N < 10^9, e.g. --shard 2/8")
        return cls(int(match[1]), int(match[2]))

    def holds(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.n == self.k - 1

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


@dataclass
class Summary:
    total: int
    already_done: int
    scored: int
    bad: int
    seconds: float  # listing, decoding, scoring and writing: the rate is images scored per second of these
    shard: Shard = Shard()
    startup: float = 0.0  # getting the model ready to score (on a CPU, loading its kernels)
    out_of_scope: int | None = None  # files scored this run that the applicability check flagged
    again: int = 0  # files scored this run (or tried) whose earlier row was an error or another model's

    @property
    def out_of_scope_share(self) -> float:
        return (self.out_of_scope or 0) / self.scored if self.scored else 0.0

    def line(self, out: Path) -> str:
        rate = self.scored / self.seconds if self.seconds else 0.0
        share = f"shard {self.shard}: " if self.shard.n > 1 else ""
        flagged = "" if self.out_of_scope is None else f" ({self.out_of_scope} out of the model's scope)"
        again = f", {self.again} of these again (their last row was an error or another model's)" if self.again else ""
        line = (
            f"{share}{self.total} files: {self.scored} scored{flagged}, {self.bad} unusable{again}, "
            f"{self.already_done} already in {out}; {self.seconds:.1f} s ({rate:.1f} images/s), model ready in "
            f"{self.startup:.1f} s"
        )
        if self.out_of_scope_share > MOSTLY_OUT_OF_SCOPE:  # one sentence more, for whoever reads the job's mail
            line += (
                f". Warning: {100 * self.out_of_scope_share:.0f}% of the files scored are unlike the images this "
                "model was trained on, and its probabilities there are not to be trusted (docs/new-site.md)"
            )
        return line


def run_predict(model: InferenceModel, inputs: list[str], out: str | Path, options: PredictOptions) -> Summary:
    """Score every image file named by `inputs` (this shard's share) that `out` does not hold yet."""
    device = resolve_device(options.device)
    start = time.perf_counter()
    found = find_images(inputs)
    files = [path for path, key in found.items() if options.shard.holds(key)]
    if not found:
        raise PneumoError(f"no image files found in {', '.join(inputs)}")
    scores = ScoresCsv(out)
    busy = "another pneumo-predict (pid {pid}) is writing " + str(scores.target) + "; try again when it has finished"
    with FileLock(scores.lock_file, busy):
        latest = scores.repair_and_read()
        todo = [f for f in files if not _current(latest.get(f), model)]
        again = sum(1 for f in todo if f in latest)
        log.info(
            "%d files%s, %d already in %s, %d to score with model %s (%d of them again)",
            len(files),
            f" in shard {options.shard}" if options.shard.n > 1 else "",
            len(files) - len(todo),
            out,
            len(todo),
            model.model_id,
            again,
        )
        # Only a run with files to score gets its model ready: a nightly job with nothing new stays quick.
        scorer = _Scorer.ready(model, device, options.batch_size) if todo else None
        bad, flagged = 0, 0
        with scores.appending() as append:
            for paths, (images, errors) in decoded_batches(todo, options.batch_size * DECODE_BATCHES, model):
                rows = scorer.rows(paths, images, errors)
                bad += sum(1 for r in rows if r[4])
                flagged += sum(1 for r in rows if r[-1] == "1")
                append(rows)
    startup = scorer.startup if scorer else 0.0
    seconds = time.perf_counter() - start - startup
    summary = Summary(len(files), len(files) - len(todo), len(todo) - bad, bad, seconds, options.shard, startup)
    summary.out_of_scope = flagged if model.applicability else None
    summary.again = again
    return summary


def _current(row: list[str] | None, model: InferenceModel) -> bool:
    """Whether a file's last row is this model's score: an error row, or a row of another model (another
    checkpoint, calibration or threshold), leaves the file to score again."""
    return row is not None and not row[4] and row[3] == model.model_id


# Files are decoded this many scoring batches at a time, then scored: fewer, longer turns between
# decoding and scoring ran faster than a batch at a time (docs/performance.md).
DECODE_BATCHES = 8


@dataclass
class PredictOptions:
    batch_size: int = 32  # images the network scores at a time: its activations are most of the memory
    device: str = "auto"
    shard: Shard = Shard()


def decoded_batches(paths: list[str], batch_size: int, model: InferenceModel) -> Iterator[tuple[list[str], tuple]]:
    """(paths, (images, errors)) `batch_size` files at a time, with progress, each block decoded on all
    cores before the caller scores it on all cores. One kind of work at a time ran faster than decoding
    the next block while scoring this one (docs/performance.md): no thread of one waits at a barrier for
    a core the other holds, and torch's idle threads may spin, which an idle machine prefers."""
    parts = [paths[s : s + batch_size] for s in range(0, len(paths), batch_size)]
    for part in progress(parts, len(parts), "predicting", unit="batch"):
        yield part, _decode(part, model)


def _decode(paths: list[str], model: InferenceModel) -> tuple[np.ndarray, dict[int, str]]:
    return decode_all(paths, model.image_size, model.max_pixels, skip_bad=True, desc="decoding")


@dataclass
class _Scorer:
    model: InferenceModel
    network: nn.Module
    device: torch.device
    batch_size: int
    startup: float = 0.0

    @classmethod
    def ready(cls, model: InferenceModel, device: torch.device, batch_size: int) -> _Scorer:
        """A scorer whose network is on `device` and, on a CPU, whose kernels are loaded (numba compiles
        them at the first run after installing), before the first file is decoded."""
        start = time.perf_counter()
        network = prepare(model.network, device)
        if device.type == "cpu" and any(isinstance(m, SmallCNN) for m in network.modules()):
            dispatch.warm_up()
        return cls(model, network, device, batch_size, time.perf_counter() - start)

    def rows(self, paths: list[str], images: np.ndarray, errors: dict[int, str]) -> list[list[str]]:
        ok = [i for i in range(len(paths)) if i not in errors]
        probs, ood = self._score(images[ok]) if ok else (np.zeros(0), None)
        scored = dict(zip(ok, probs, strict=True))
        in_scope = dict(zip(ok, ood, strict=True)) if ood is not None else {}
        provenance = [__version__, str(torch.__version__), self.model.config_hash]
        rows = []
        for i, path in enumerate(paths):
            p = scored.get(i)
            if p is not None and not np.isfinite(p):
                errors[i], p = "the model gave no finite probability for this image", None
            if p is None:
                columns = ["", "", self.model.model_id, escape_path(errors[i]), *provenance, "", ""]
            else:
                label = PNEUMONIA if p >= self.model.threshold else NORMAL
                columns = [f"{p:.6f}", label, self.model.model_id, "", *provenance, *in_scope.get(i, ("", ""))]
            rows.append([escape_path(path), *columns])
        return rows

    def _score(self, images: np.ndarray) -> tuple[np.ndarray, list | None]:
        """Probabilities, and the applicability columns (ood_score, ood) where the model has the check."""
        x, check = torch.from_numpy(images), self.model.applicability
        if check is None:
            return predict(self.network, x, self.batch_size, self.device, desc="scoring"), None
        logits, ood = scored(self.network, x, self.batch_size, self.device, check, "scoring")
        columns = [(f"{s:.3f}", "1" if flag else "0") for s, flag in zip(ood, check.flags(ood), strict=True)]
        return torch.sigmoid(torch.from_numpy(logits)).numpy(), columns


def find_images(inputs: list[str]) -> dict[str, str]:
    """{resolved path: shard key} of the image files named by `inputs`: folders (searched recursively;
    key: the path inside the folder), image files (key: as given) and CSV lists whose `path` column (else
    first column) names files relative to the CSV (key: as written). The keys do not depend on where
    the data is mounted, so a shard holds the same files on every machine. Named files are kept
    whatever they are, so that one that cannot be read gets a row saying why; so do a folder's image
    files, and each subfolder that cannot be searched (its row says why; the next run tries it again)."""
    found: dict[str, str] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in _folder_entries(p):
                found.setdefault(resolved_name(f), f.relative_to(p).as_posix())
        elif p.suffix.lower() == ".csv" and p.is_file():
            for name in _csv_list(p):
                found.setdefault(resolved_name(p.parent / name), name)
        elif os.path.lexists(p):
            found.setdefault(resolved_name(p), item)
        else:
            raise PneumoError(f"input {item} does not exist")
    return dict(sorted(found.items()))


def _folder_entries(folder: Path) -> list[Path]:
    """The image files under `folder` (not hidden, links to folders not followed), and the subfolders
    that cannot be listed (unreadable, or a path longer than the system allows): silently skipping them
    would leave their X-rays unscored with nothing to say so."""
    entries: list[Path] = []
    unlisted = lambda e: entries.append(Path(e.filename))
    for parent, _, names in os.walk(folder, onerror=unlisted):
        entries += [Path(parent, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and n[0] != "."]
    return sorted(entries)


def _csv_list(path: Path) -> list[str]:
    """The paths a CSV list names, as written (relative to the CSV unless absolute). Bytes that are not
    UTF-8 are kept as the file system would name them; short rows are skipped."""
    text = read_regular(path, "input list").decode("utf-8-sig", errors="surrogateescape")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise PneumoError(f"input list {path} is not a readable CSV ({e})") from None
    has_header = bool(rows) and "path" in rows[0]
    column = rows[0].index("path") if has_header else 0
    return [r[column].strip() for r in rows[has_header:] if len(r) > column and r[column].strip()]


class ScoresCsv:
    """The output CSV. Paths are written as the file system holds them (bytes that are not UTF-8 stay
    as they are), fields with line breaks quoted, so every path reads back as it was written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.target = self.path.resolve()  # a symlink and its target share one lock
        self.lock_file = self.target.with_name(self.target.name + ".lock")

    def repair_and_read(self) -> dict[str, list[str]]:
        """The last row of each path in the file, after cutting off a half-written last row."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data.startswith(encode_row(COLUMNS[:5])) and not data.startswith(encode_row(COLUMNS)):
            raise PneumoError(
                f"{self.path} was written by an older pneumo-predict, with other columns than this one's "
                f"({','.join(COLUMNS)}); write to a new file"
            )
        if data and not data.startswith(encode_row(COLUMNS)):
            raise PneumoError(
                f"{self.path} exists and is not a pneumo-predict output (it does not start with the "
                f"header {','.join(COLUMNS)})"
            )
        rows, good = _complete_rows(data)
        if good < len(data) and not _cut_short(data[good:]):
            line = data[:good].count(b"\n") + 1
            raise PneumoError(
                f"{self.path}: line {line} is not as pneumo-predict writes rows (was the file edited?), "
                "and rows follow it; nothing was changed: restore the file, or write to a new one"
            )
        if good < len(data):
            log.warning("%s ended in an incomplete row (an earlier run was killed); removing it", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return {unescape_path(r[0]): r for r in rows[1:]}

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


def escape_path(path: str) -> str:
    """`path` as valid UTF-8 text: each byte of the name that is not UTF-8 (held by Python as a
    surrogate) written as \\xNN, and a backslash as two, so that `unescape_path` gives it back."""
    return "".join(
        "\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in path
    )


def unescape_path(text: str) -> str:
    return _ESCAPE.sub(lambda m: "\\" if m[0] == "\\\\" else chr(0xDC00 + int(m[1], 16)), text)


_ESCAPE = re.compile(r"\\\\|\\x([0-9a-f]{2})")


def encode_row(row: list[str]) -> bytes:
    buf = io.StringIO()
    # csv quotes a field with "\n" in it, but not one with only "\r", which readers take as a line end.
    quoting = csv.QUOTE_ALL if any("\r" in field for field in row) else csv.QUOTE_MINIMAL
    csv.writer(buf, lineterminator="\n", quoting=quoting).writerow(row)
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def _cut_short(tail: bytes) -> bool:
    """Whether `tail` is the beginning of a single row, as a killed run leaves its last one: the only
    thing ever cut off an output file (an edited row, with rows after it, is not)."""
    reader = csv.reader(io.StringIO(tail.decode("utf-8", errors="surrogateescape"), newline=""), strict=True)
    try:
        encoded = encode_row(next(reader))
    except (StopIteration, csv.Error):  # nothing, or a quoted field cut off by the end
        return True
    return len(tail) < len(encoded) and encoded.startswith(tail)


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
