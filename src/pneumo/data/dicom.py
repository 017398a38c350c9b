"""DICOM radiographs to 8-bit grayscale, through pydicom (the optional extra "pneumo[dicom]")."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from pneumo.core.errors import BadImageError


def read_dicom(f: BinaryIO, path: str, max_pixels: int) -> np.ndarray:
    """Pixel data with the modality LUT (rescale slope/intercept) and the VOI LUT or window applied,
    mapped to 0..255, MONOCHROME1 inverted so that dense tissue is bright, as in every other file.

    The header is read first: pixel data larger than `max_pixels` (rows x columns x frames) is refused
    before it is decompressed.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # this file's row says so; the job's other files are scored
        raise BadImageError(path, "a DICOM file: reading DICOM needs pydicom (pip install 'pneumo[dicom]')") from None
    try:
        header = pydicom.dcmread(f, stop_before_pixels=True)
        pixels = int(header.get("Rows", 0)) * int(header.get("Columns", 0)) * int(header.get("NumberOfFrames", 1) or 1)
        if pixels > max_pixels:
            raise BadImageError(
                path, f"{pixels} pixels is more than data.max_pixels ({max_pixels}); a decompression bomb?"
            )
        f.seek(0)
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom reports broken files with many exception types
        raise BadImageError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if pixels.ndim != 2:
        raise BadImageError(path, f"expected one grayscale frame, got pixel data of shape {pixels.shape}")
    try:
        return _to_8_bit(pixels, ds, apply_modality_lut, apply_voi_lut)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise BadImageError(path, f"unusable DICOM display settings ({type(e).__name__}: {e})") from None


def _to_8_bit(pixels: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        # DICOM PS3.3 C.11.2.1.2.1, linear function: the window maps onto the full output range.
        values = np.clip((values - (center - 0.5)) / max(width - 1, 1) + 0.5, 0, 1) * 255
    else:
        if "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds).astype(np.float64)
        span = values.max() - values.min()
        values = (values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)
    if not np.isfinite(values).all():
        raise ValueError("the display settings give non-finite values")
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        values = 255 - values
    return np.clip(values + 0.5, 0, 255).astype(np.uint8)


def _first(value) -> float:
    # Window center and width may be multi-valued (several presets): the first is the default.
    try:
        return float(value)
    except TypeError:
        return float(value[0])
