"""Decoding one image file of any common kind into a grayscale uint8 array, size x size."""

from __future__ import annotations

import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo.core.errors import BadImageError
from pneumo.core.logs import log
from pneumo.core.progress import progress
from pneumo.data.dicom import read_dicom

DICOM_SUFFIXES = {".dcm", ".dicom"}
# data.max_pixels is checked from every file's header before decoding (see below), so Pillow's own,
# lower limit must not override a user who raises it.
Image.MAX_IMAGE_PIXELS = None
# A DCT-domain reduction (JPEG decoders can halve a file's size up to three times while decoding)
# is taken only as far as it keeps this many times the target size, for the final resize to work on.
DRAFT_MARGIN = 2
# A resize by more than twice this factor first averages whole blocks of pixels (Pillow's reduce),
# then resamples the rest of the way: faster than resampling all the way, and for X-rays no further
# from the 224x224 copies (tests/test_data_images.py; the gap was chosen in docs/performance.md).
REDUCING_GAP = 1.1


def load_image(path: str, size: int, max_pixels: int = 100_000_000) -> np.ndarray:
    """One image as grayscale uint8, squashed (not cropped) to size x size like the Kermany 224 copies."""
    if os.path.splitext(path)[1].lower() in DICOM_SUFFIXES:
        with open_regular(path) as f:
            gray = Image.fromarray(read_dicom(f, path, max_pixels))
    else:
        gray = _read_with_pillow(path, size, max_pixels)
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return np.asarray(gray, dtype=np.uint8)


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file; a FIFO, device or socket could block a job
    for ever, so it is refused without reading from it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except OSError as e:
        raise BadImageError(path, e.strerror or type(e).__name__) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadImageError(path, "not a regular file (a FIFO, device, socket or folder)")
    return os.fdopen(fd, "rb")


class PixelBudget:
    """The pixels of the images being decoded at once, by all threads, held under `limit`: decoding an
    image takes a few bytes per pixel (Pillow's buffer, then an 8-bit copy), so that without a budget
    memory would have to fit the largest allowed image once per core. Ordinary X-rays fit many times
    over; an image larger than the budget waits until it can decode alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.turns = threading.Condition()

    @contextmanager
    def share(self, pixels: int) -> Iterator[None]:
        with self.turns:
            self.turns.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.turns:
                self.used -= pixels
                self.turns.notify_all()


DECODING = PixelBudget(150_000_000)  # about 1 GB at the most a pixel costs (float images)


def _read_with_pillow(path: str, size: int, max_pixels: int) -> Image.Image:
    with open_regular(path) as f:
        try:
            with _open(f, path) as im:
                # The header gives the size: refuse a bomb before decoding a single pixel.
                if im.width * im.height > max_pixels:
                    raise BadImageError(
                        path,
                        f"{im.width} x {im.height} pixels is more than data.max_pixels ({max_pixels}); "
                        "a decompression bomb?",
                    )
                if im.format == "JPEG":
                    _draft(im, size)
                with DECODING.share(im.width * im.height):  # the size to decode to, after any draft
                    im.load()
                    # In place: a copy of every image that needs no turn is what it would return otherwise.
                    ImageOps.exif_transpose(im, in_place=True)
                    return to_grayscale(im)
        except BadImageError:
            raise
        except UnidentifiedImageError:
            raise BadImageError(
                path, "empty file (0 bytes)" if _is_empty(path) else "cannot identify image file"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError) as e:
            reason = "empty file (0 bytes)" if _is_empty(path) else str(e) or type(e).__name__
            raise BadImageError(path, reason) from None


# warnings.catch_warnings swaps process-wide state, so decoding threads take turns in it.
_CATCHING = threading.Lock()


def _open(f: BinaryIO, path: str) -> Image.Image:
    """Image.open, with its EXIF block parsed (Pillow keeps it for exif_transpose), logging what Pillow
    finds damaged in the file's header with the file's name: its own warnings name no file. The image
    decodes all the same, upright if the orientation tag survived."""
    with _CATCHING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = Image.open(f)
        im.getexif()
    for w in caught:
        log.warning("%s: damaged metadata (%s)", path, w.message)
    return im


def _draft(im: Image.Image, size: int) -> None:
    """Let the JPEG decoder do part of the work: colour files decoded straight to their luma (what
    to_grayscale would compute from RGB), large files reduced in the DCT domain as far as
    DRAFT_MARGIN allows."""
    target = round(DRAFT_MARGIN * size)
    reduce = min(im.size) >= target
    gray = "L" if im.mode in ("RGB", "YCbCr") else None
    if reduce or gray:
        im.draft(gray, (target, target) if reduce else im.size)


def to_grayscale(im: Image.Image) -> Image.Image:
    """Mode "L", whatever the source mode: bit depth kept in proportion, transparency on black."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Medical PNGs often hold 12 or 14 significant bits in 16: scale by the depth actually used.
        most = max(rows.max() for rows in _float64_rows(im))
        top = next((t for t in (255, 4095, 16383, 65535) if most <= t), most)
        return _rows_to_uint8(im, lambda rows: np.clip(rows / top * 255 + 0.5, 0, 255))
    if im.mode == "F":
        # Floating-point images carry no depth: their own range becomes 0 to 255 (NaN as 0).
        extremes = [(rows.min(), rows.max()) for rows in map(np.nan_to_num, _float64_rows(im))]
        lo = min(low for low, _ in extremes)
        span = max(high for _, high in extremes) - lo
        if not span > 0:
            return Image.new("L", im.size)
        return _rows_to_uint8(im, lambda rows: (np.nan_to_num(rows) - lo) / span * 255 + 0.5)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
    if im.mode == "CMYK":
        return im.convert("RGB").convert("L")
    return im.convert("L")


ROWS_AT_A_TIME = 256


def _rows_to_uint8(im: Image.Image, scale) -> Image.Image:
    """Mode "L" of `scale(rows)` (float64 arithmetic), a block of rows at a time: a 10000 x 10000 16-bit
    or float image then needs 1 byte per pixel beside Pillow's own, not the 30 or more of whole-image
    float64 steps (times one image per decoding thread)."""
    out = np.empty((im.height, im.width), np.uint8)
    for r, rows in enumerate(_float64_rows(im)):
        out[r * ROWS_AT_A_TIME : (r + 1) * ROWS_AT_A_TIME] = scale(rows)
    return Image.fromarray(out)


def _float64_rows(im: Image.Image) -> Iterator[np.ndarray]:
    """The image's pixels as float64, a block of rows at a time, copied out of Pillow block by block."""
    for r in range(0, max(im.height, 1), ROWS_AT_A_TIME):
        yield np.asarray(im.crop((0, r, im.width, min(r + ROWS_AT_A_TIME, im.height))), dtype=np.float64)


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def decode_all(paths: list[str], size: int, max_pixels: int, skip_bad: bool, workers: int = 0, desc: str = "decoding"):
    """Decode `paths` into (N, size, size) uint8, using every core; returns (images, {index: reason}).

    With skip_bad, an unusable file leaves zeros and an entry in the dict; otherwise the first one
    raises BadImageError.
    """
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    bad: dict[int, str] = {}

    def one(path):
        try:
            return load_image(path, size, max_pixels)
        except BadImageError as e:
            if not skip_bad:
                raise
            return e.reason

    # Pillow releases the GIL while decoding and resizing, so threads use every core without the
    # start-up cost and memory of processes.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, result in enumerate(progress(pool.map(one, paths), total=len(paths), desc=desc, unit="img")):
            if isinstance(result, str):
                bad[i] = result
            else:
                out[i] = result
    return out, bad
