"""The preprocessing cache: each list of files decoded and resized once, kept as a uint8 array on disk.

An entry is a folder named by a hash of everything its contents depend on: the paths with their
sizes and modification times, the image size, the pixel limit and the decoder's version. A changed,
added or removed file, or another image size, gives another key, hence a rebuild. Entries are built
in a temporary folder and renamed into place, so a build killed half way leaves nothing a later run
would use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from pneumo.core.errors import BadImageError
from pneumo.core.logs import log
from pneumo.data.images import decode_all

# Bump when decoding changes in a way that changes pixels, so that old entries are not reused.
DECODER_VERSION = 6


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pneumo"


def cache_key(paths: list[str], size: int, max_pixels: int) -> str:
    h = hashlib.sha256(json.dumps({"decoder": DECODER_VERSION, "size": size, "max_pixels": max_pixels}).encode())
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(path)}\0missing\n".encode())
    return h.hexdigest()[:32]


def cached_decode(
    paths: list[str],
    size: int,
    max_pixels: int,
    skip_bad: bool,
    cache_dir: str | Path | None,
    workers: int = 0,
    desc: str = "decoding",
) -> tuple[np.ndarray, dict[int, str]]:
    """(images, {index: reason}) for `paths`, from the cache when an entry exists, else decoded and stored.

    The images come memory-mapped from the cache file. A cached entry that lists bad files still
    honours `skip_bad`: without it, the first bad file is an error, as when decoding.
    """
    if cache_dir is None:
        return decode_all(paths, size, max_pixels, skip_bad, workers, desc)
    entry = Path(cache_dir) / cache_key(paths, size, max_pixels)
    cached = _read_entry(entry, (len(paths), size, size))
    if cached is None:
        images, bad = decode_all(paths, size, max_pixels, skip_bad, workers, desc)
        _store(entry, images, bad, paths)
        log.info("cached %d decoded images in %s", len(paths), entry)
        cached = _read_entry(entry, (len(paths), size, size))
    images, bad = cached
    if bad and not skip_bad:
        i = min(bad)
        raise BadImageError(paths[i], bad[i])
    return images, bad


def _read_entry(entry: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, dict[int, str]] | None:
    """The entry's images (memory-mapped) and bad files, or None when there is no usable entry. A damaged
    one (cut short by a full disk, or altered) is removed, to be built again."""
    if not (entry / "meta.json").exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        if images.shape != shape or images.dtype != np.uint8 or zlib.crc32(images) != meta["crc32"]:
            raise ValueError("its contents do not match its description")
        return images, {int(i): reason for i, reason in meta["bad"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("the cache entry %s is damaged (%s): decoding again", entry, str(e).splitlines()[0][:120])
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _store(entry: Path, images: np.ndarray, bad: dict[int, str], paths: list[str]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np.save(tmp / "images.npy", images)
        # meta.json last: an entry counts only once it exists, and the rename below makes both appear at once.
        meta = {"paths": paths, "bad": {str(i): r for i, r in bad.items()}, "crc32": zlib.crc32(images)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # not another process that built the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
