"""Decode any supported image to one convention: float32, (H, W, 1), values in [0, 255].

The bytes decide the format (``sniff_format``), never the file name. Supported:

- PNG, JPEG, BMP, TIFF through Pillow: 8-bit gray, 16-bit gray (kept at full
  dynamic range, scaled by 1/257 so 65535 -> 255.0), RGB, RGBA, palette, CMYK
  (converted to luminance).
- DICOM through pydicom (with the pylibjpeg plugins for JPEG / JPEG 2000 transfer
  syntaxes): the modality LUT (rescale slope/intercept), then the VOI LUT or window
  centre/width when the file has one, then a min-max stretch to [0, 255];
  MONOCHROME1 (inverted) images are flipped so bone is bright; a multi-frame file
  gives its first frame (``info.frames`` says how many there were).

Anything else raises :class:`DecodeError` with a short reason; the audit records it
as ``unreadable``.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np

SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class DecodeError(Exception):
    """A file that cannot be decoded; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's first bytes, or None."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, name in SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_file(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror}") from None
    return decode_bytes(data)


def decode_bytes(data: bytes) -> tuple[np.ndarray, ImageInfo]:
    """Decode ``data`` -> (float32 array (H, W, 1) in [0, 255], ImageInfo)."""
    if not data:
        raise DecodeError("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("unknown file signature (not PNG, JPEG, BMP, TIFF or DICOM)")
    if fmt == "dicom":
        return _decode_dicom(data)
    return _decode_pillow(data, fmt)


def _decode_pillow(data: bytes, fmt: str) -> tuple[np.ndarray, ImageInfo]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        frames = int(getattr(img, "n_frames", 1) or 1)
        mode = img.mode
        bit_depth = 8
        if mode.startswith("I;16") or mode == "I":
            arr = np.asarray(img).astype(np.float32)
            bit_depth = 16
            arr = np.clip(arr, 0, 65535) / 257.0
        elif mode == "F":
            arr = np.asarray(img).astype(np.float32)
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            bit_depth = 32
        else:
            if mode == "CMYK":
                img = img.convert("RGB")
            if img.mode != "L":
                img = img.convert("L")
            arr = np.asarray(img).astype(np.float32)
    except DecodeError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data
        raise DecodeError(f"{fmt} decode failed: {type(e).__name__}: {str(e)[:120]}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DecodeError(f"{fmt} decode failed: unexpected shape {arr.shape}")
    h, w = arr.shape
    return np.ascontiguousarray(arr[..., None], dtype=np.float32), ImageInfo(fmt, w, h, bit_depth, frames)


def _decode_dicom(data: bytes) -> tuple[np.ndarray, ImageInfo]:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            pixels = ds.pixel_array
            if frames > 1:
                pixels = pixels[0]
            if getattr(ds, "SamplesPerPixel", 1) > 1:  # colour: luminance
                pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            else:
                pixels = apply_modality_lut(pixels, ds)
                if "WindowCenter" in ds or "VOILUTSequence" in ds:
                    pixels = apply_voi_lut(pixels, ds)
        arr = np.asarray(pixels, dtype=np.float64)
    except Exception as e:  # pydicom raises many types on truncated or odd files
        raise DecodeError(f"dicom decode failed: {type(e).__name__}: {str(e)[:120]}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DecodeError(f"dicom decode failed: unexpected pixel shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 255.0 - arr
    h, w = arr.shape
    bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    return arr[..., None].astype(np.float32), ImageInfo("dicom", w, h, bits, frames)
