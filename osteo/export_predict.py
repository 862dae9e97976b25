"""Classify knee X-rays with an osteo ONNX export, without osteo.

    python predict.py IMAGE_OR_FOLDER... > predictions.csv

``osteo export RUN --format onnx`` copies this file into the export folder, beside
``model.onnx`` and ``export.json`` (which says the input size and resize mode). It needs
numpy, Pillow and onnxruntime, and pydicom for DICOM files; nothing of osteo, Keras,
TensorFlow or PyTorch. It prints ``path,p_normal,p_osteopenia,p_osteoporosis`` as CSV:
the calibrated probabilities that ``osteo predict RUN FILES`` gives for the same files
(within 1e-4; the temperature is inside the ONNX model). Folders are read recursively, their
images as osteo's audit chooses them (:func:`image_file`; the other files left out, said in one
line on stderr). A file that cannot be read, or a folder that cannot be listed, gets a line on
stderr and no row; the exit status is then 1 (2 where no file was found at all). A blank image
(every pixel one gray level: a failed export, a placeholder) gets its row, as in ``osteo
predict``, and one line on stderr names such files; so does an image with transparent pixels
(read by its colours, the transparency dropped). A model file whose sha256 is not the one
``export.json`` records (changed or damaged since) is refused (exit status 2).

Each image becomes the model's input as ``osteo predict`` makes it
(``osteo.data.pipeline.load_levels``, divided by 257), in the same NumPy arithmetic, so
the two inputs are equal bit for bit:

* decode (``osteo.data.decode.decode_gray``): 8-bit images as their gray levels; a
  colour JPEG as its luminance straight from libjpeg (Pillow's draft mode), decoded at
  a reduced DCT scale (1/2, 1/4, 1/8) when the target size allows (:func:`jpeg_ratio`);
  other colour images through Pillow's ``convert("L")``; 16-bit and 32-bit integer and
  floating-point images stretched from their minimum to their maximum; DICOM after its
  modality LUT and its VOI LUT or window, stretched likewise (MONOCHROME1 inverted;
  colour DICOM as luminance; the first frame);
* resize (:func:`resize_gray`, which ``osteo.data.pipeline`` imports): an integer box filter
  (:func:`box_factor`), then a bilinear resize with half-pixel centres, padded to a
  square (``pad``) or stretched; a thin image keeps at least one pixel across;
* quantize to the 16-bit levels of osteo's image cache (``to_levels``: x 257, rounded)
  and feed ``levels / 257`` as float32.

``osteo`` keeps this file as ``osteo/export_predict.py``; tests/test_export.py checks
that its input equals ``load_levels``'s on every kind of file and on a grid of shapes.
Each function below that repeats osteo's arithmetic names the one it mirrors: a change
to one must be made to the other. The map to float (:func:`float_block`, :func:`box_means`),
the resize (:func:`resize_gray`) and the levels (:func:`to_levels`) are osteo's own, not
mirrors: its image cache computes its entries with them, so a change to their arithmetic
changes what the cache holds and must come with a new ``osteo.data.pipeline.CACHE_VERSION``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import re
import struct
import sys
import warnings
from pathlib import Path

import numpy as np

CLASSES = ("normal", "osteopenia", "osteoporosis")
COLUMNS = ("path", *(f"p_{c}" for c in CLASSES))
MAX_PIXELS = 1 << 26  # osteo.data.decode.MAX_PIXELS
STRIP_BYTES = 8 << 20  # float32 bytes of one strip of box_means (osteo.data.decode and scan use it too)
DCT_SCALES = (8, 4, 2)  # osteo.data.decode.DCT_SCALES
DETAIL_SIDE = 128  # osteo.data.scan.DETAIL_SIDE (the audit's DCT scale bounds the cache's)
SCALE = 257.0  # [0, 255] <-> [0, 65535] (osteo.data.pipeline imports it)
BATCH = 32
_F32 = np.float32


NOT_UTF8 = "file name is not valid UTF-8 (shown with \\xNN escapes); rename it, e.g. convmv -f latin1 -t utf8"


class Unreadable(Exception):
    """A file this script cannot decode; ``str(e)`` is the reason."""


def shown(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text, for a CSV or a message: bytes of a name that are not UTF-8
    (which Python carries as surrogate escapes) become ``\\xNN`` (osteo's audit and predict use
    this function too)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def name_not_utf8(path: Path, below: Path | None = None) -> bool:
    """Whether the name a file is known by is not UTF-8: its path below the folder ``below`` that
    was named (as the audit checks the path below the data folder), else its own name. Such a
    file is not read (:data:`NOT_UTF8`): its name shown with ``\\xNN`` escapes could be another
    file's real name, one that holds a backslash. The folders above it are the user's to name."""
    part = os.path.relpath(path, below) if below is not None else os.path.basename(path)
    return shown(part) != part


# --------------------------------------------------------------------------- decode


class Gray:
    """A decoded image before its conversion to float (as ``osteo.data.decode.Gray``, which shares
    its arithmetic, :func:`float_block` and :func:`box_means`): ``pixels`` (H, W) as the decoder
    gave them and the map to float32 in [0, 255]."""

    def __init__(self, pixels: np.ndarray, kind: str, lo: float = 0.0, hi: float = 0.0, transparent: bool = False):
        self.pixels, self.kind, self.lo, self.hi = pixels, kind, lo, hi
        self.transparent = transparent  # some pixel less than opaque (:func:`transparent`)

    def one_value(self) -> bool:
        """Whether every pixel holds one value: a blank image (see :func:`one_value`)."""
        return one_value(self.pixels, self.kind, self.lo, self.hi)

    def as_float(self, block: np.ndarray) -> np.ndarray:
        """float32 values in [0, 255] of ``block``, a part of :attr:`pixels` (:func:`float_block`)."""
        return float_block(block, self.kind, self.lo, self.hi)

    def to_float(self) -> np.ndarray:
        """The whole image as float32 (H, W) in [0, 255]."""
        return np.ascontiguousarray(self.as_float(self.pixels), dtype=_F32)

    def box_mean(self, box: int) -> np.ndarray:
        """:func:`box_means` of this image."""
        return box_means(self, box)


def float_block(block: np.ndarray, kind: str, lo: float, hi: float) -> np.ndarray:
    """float32 values in [0, 255] of ``block``, pixels as a decoder gave them: ``kind`` ``u8`` and
    ``float`` as they are, ``stretch`` as (x - lo) / (hi - lo) * 255 (black where the range is
    empty; NaN and infinities at its ends). osteo's decoder (``osteo.data.decode.Gray``) calls it."""
    if kind == "float":
        return block.astype(_F32, copy=False)
    out = block.astype(_F32)
    if kind == "stretch":
        if not hi > lo:
            return np.zeros_like(out)
        if not np.isfinite(out).all():
            np.nan_to_num(out, copy=False, nan=lo, posinf=hi, neginf=lo)
        return (out - lo) / (hi - lo) * 255.0
    return out


def box_means(gray, box: int) -> np.ndarray:
    """float32 (H // box, W // box): means of box x box blocks of ``gray``'s float image (the last
    partial row and column of blocks dropped; ``box`` at most the shorter side), summed from the
    decoder's own pixels strip by strip, so no float32 copy of the image is made. ``gray``: this
    file's :class:`Gray` or osteo's (``osteo.data.decode.Gray``, which keeps the last result)."""
    box = max(1, min(box, *gray.pixels.shape))
    px = gray.pixels
    # the map to float is affine for these, so it can follow the averaging
    after = gray.kind in ("u8", "float")
    h, w = px.shape[0] // box, px.shape[1] // box
    out = np.empty((h, w), _F32)
    step = max(1, STRIP_BYTES // (4 * box * px.shape[1]))  # output rows per strip
    for r in range(0, h, step):
        block = px[r * box : min(r + step, h) * box, : w * box]
        if not after:
            block = gray.as_float(block)
        rows = block[0::box].astype(_F32)
        for k in range(1, box):  # strided adds: numpy's sum over a short axis is several times slower
            rows += block[k::box]
        if box == 1:
            out[r : r + len(rows)] = rows
            continue
        acc = rows[:, 0::box].copy()
        for k in range(1, box):
            acc += rows[:, k::box]
        out[r : r + len(acc)] = acc
    if box > 1:
        out *= _F32(1 / (box * box))
    return out


def one_value(pixels: np.ndarray, kind: str, lo: float, hi: float) -> bool:
    """Whether every pixel of a decoded image holds one value (a failed export, a placeholder):
    an image stretched from its minimum to its maximum (16-bit, float) whose range is empty
    decodes to black. osteo's audit and ``osteo predict`` call this function too."""
    if kind == "stretch":
        return lo == hi
    first = pixels.flat[0]
    if (pixels[pixels.shape[0] // 2] != first).any():  # a radiograph's middle row: no full pass
        return False
    return not (pixels != first).any()


def decode(data: bytes, scale=None) -> Gray:
    """The image in ``data`` as one gray channel, as osteo decodes it (mirrors
    ``osteo.data.decode.decode_gray``). ``scale(width, height)``: the DCT scale to decode
    a JPEG at (:func:`jpeg_ratio`); full size without it."""
    if not data:
        raise Unreadable("empty file")
    if preambled_dicom(data) or bare_dicom(data):
        return _decode_dicom(data)
    formats = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
               (b"MM\x00*", "tiff"))
    fmt = next((name for magic, name in formats if data.startswith(magic)), None)
    if fmt is None:
        raise Unreadable("unknown file signature (not PNG, JPEG, BMP, TIFF or DICOM)")
    return _decode_pillow(data, fmt, scale)


DICOM_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
                      b"UL UN UR US UT UV".split())


def preambled_dicom(head: bytes) -> bool:
    """A DICOM file as the standard writes it: "DICM" after a 128-byte preamble. osteo's own
    decoder (``osteo.data.decode``) imports this function, so the two find the same files."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def bare_dicom(head: bytes) -> bool:
    """Whether ``head`` starts a DICOM data set written without the 128-byte preamble and
    "DICM" (ACR-NEMA files and some old exports): its first element, little endian, in group
    0002 (file meta) or 0008 (identification), followed by an explicit VR or by an even,
    non-zero implicit length (4 for the group's length element), as DCMTK and pydicom
    (``force=True``) read such files. osteo's own decoder imports this function too."""
    if len(head) < 8:
        return False
    group, element, length = struct.unpack_from("<HHI", head)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    if element == 0:  # the group's length: a 4-byte UL
        return head[4:8] == b"UL\x04\x00" or length == 4
    return head[4:6] in DICOM_VRS or (0 < length < 0x10000 and length % 2 == 0)


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise Unreadable(too_many_pixels(width * height, f"{width} x {height}"))


def too_many_pixels(pixels: int, shape: str = "", limit: int = MAX_PIXELS) -> str:
    """Why an image of ``pixels`` pixels (``shape``: its width x height, where known) is not read.
    osteo's own decoder says it in these words too (with its own ``limit``)."""
    shape = f" ({shape})" if shape else ""
    return f"{pixels:,} pixels{shape} exceeds osteo's limit of {limit:,} (MAX_PIXELS); downscale it"


def bomb_pixels(e: Exception) -> int:
    """The pixels of an image Pillow refused as a decompression bomb (its message names them)."""
    from PIL import Image

    m = re.search(r"\((\d+) pixels\)", str(e))
    return int(m.group(1)) if m else 2 * (Image.MAX_IMAGE_PIXELS or MAX_PIXELS)


def png_refusal(data: bytes) -> str | None:
    """Why a PNG is not read: 16-bit colour or gray with alpha, of which Pillow keeps only the
    high byte of each sample (12-bit data decoded near black, 16 gray levels). osteo's own
    decoder calls this function too."""
    if data[12:16] == b"IHDR" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6):
        kind = {2: "colour", 4: "gray with alpha", 6: "colour with alpha"}[data[25]]
        return (f"a 16-bit {kind} PNG, of whose samples only the high byte can be read here; save it as a "
                "16-bit grayscale PNG (e.g. convert IN -colorspace gray -alpha off -depth 16 OUT.png)")
    return None


def said(e: BaseException, limit: int = 120) -> str:
    """A decoder's exception as the start of one line: its type and its message, whitespace folded
    and an in-memory file's address (``<_io.BytesIO object at 0x...>``) said as "the file"."""
    message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", " ".join(str(e).split()))
    return f"{type(e).__name__}: {message[:limit]}"


def _decode_pillow(data: bytes, fmt: str, scale=None) -> Gray:
    """Mirrors ``osteo.data.decode._decode_pillow``."""
    from PIL import Image

    if fmt == "png" and png_refusal(data):
        raise Unreadable(png_refusal(data))
    try:
        with warnings.catch_warnings():  # Pillow's decompression-bomb warnings: our limit is lower
            warnings.simplefilter("ignore")
            try:
                img = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as e:  # past twice Pillow's own limit: ours is far lower
                raise Unreadable(too_many_pixels(bomb_pixels(e))) from None
        width, height = img.size
        _check_pixels(width, height)
        if fmt == "jpeg":
            # at the DCT scale asked for (Pillow takes the largest that keeps the size given),
            # and gray straight from libjpeg: a colour JPEG's luminance (Y) channel. CMYK has
            # no such gray: converted below.
            want = scale(width, height) if scale else 1
            img.draft(None if img.mode == "CMYK" else "L", (max(1, width // want), max(1, height // want)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        orientation = img.getexif().get(0x0112, 1)  # as a viewer shows it (osteo.data.decode.upright)
        if orientation in range(2, 9):
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
        mode = img.mode
        lo = hi = 0.0
        clear = transparent(img)
        if mode.startswith("I;16") or mode in ("I", "F"):  # stretched from their minimum to their maximum
            pixels, kind = np.asarray(img), "stretch"
            lo, hi = finite_range(pixels)
        else:
            if mode == "CMYK":
                img = img.convert("RGB")
            if img.mode != "L":
                img = img.convert("L")
            pixels, kind = np.asarray(img), "u8"
    except Unreadable:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data
        raise Unreadable(f"{fmt} decode failed: {said(e)}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise Unreadable(f"{fmt} decode failed: unexpected shape {pixels.shape}")
    return Gray(pixels, kind, lo, hi, clear)


def transparent(img) -> bool:
    """Whether some pixel of a Pillow image is less than opaque: an alpha channel below 255
    somewhere, or a palette entry or colour key (PNG's tRNS: of a palette, a gray image of 8 or
    16 bits, an RGB one) marked transparent that some pixel uses. One pass over the pixels, no
    converted copy; an image with neither costs nothing. osteo's own decoder calls this too."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return img.getchannel("A").getextrema()[0] < 255
    key = img.info.get("transparency")
    if key is None:
        return False
    px = np.asarray(img)
    if img.mode == "P":
        alpha = np.full(256, 255, np.uint8)
        if isinstance(key, bytes):  # an alpha per palette index
            alpha[: min(len(key), 256)] = np.frombuffer(key[:256], np.uint8)
        elif isinstance(key, int) and 0 <= key < 256:  # one transparent index
            alpha[key] = 0
        used = np.bincount(px.ravel(), minlength=256)[:256] > 0
        return bool((used & (alpha < 255)).any())
    if isinstance(key, tuple) and px.ndim == 3 and len(key) == px.shape[-1]:  # an RGB colour key
        return bool((px == np.asarray(key, px.dtype)).all(axis=-1).any())
    if isinstance(key, int) and px.ndim == 2:  # a gray level (8 or 16 bits)
        return bool((px == key).any())
    return False


def finite_range(arr: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values of ``arr``; (0, 0) when there are none (osteo's decoder calls it)."""
    finite = np.isfinite(arr)
    if finite.all():
        return float(arr.min()), float(arr.max())
    if not finite.any():
        return 0.0, 0.0
    return float(arr[finite].min()), float(arr[finite].max())


def read_dicom(source, **kwargs):
    """pydicom's data set of ``source`` (a binary file object); a bare one (:func:`bare_dicom`)
    read with ``force`` and given the transfer syntax its elements were found in, which its
    pixels need. osteo's own decoder imports this function (one reading, no mirror)."""
    import pydicom
    from pydicom import uid

    bare = not preambled_dicom(source.read(132))
    source.seek(0)
    ds = pydicom.dcmread(source, force=bare, **kwargs)
    if bare and "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    return ds


PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def dicom_gray(ds, check_pixels) -> tuple[np.ndarray, int]:
    """(the first frame of the DICOM data set ``ds`` as a viewer shows it, float32 (H, W) in
    [0, 255]; its number of frames). osteo's own decoder calls this function too.

    - colour (RGB, YBR) as its luminance; PALETTE COLOR through its palette, then luminance;
    - gray through its modality LUT (rescale slope and intercept), then its VOI LUT or its
      window (a window of width under 1, which the standard does not allow, is not applied);
    - stretched from its minimum to its maximum, over the image's own pixels: those of its
      ``PixelPaddingValue`` (up to ``PixelPaddingRangeLimit``), outside the image, are left
      out of the stretch and shown black;
    - inverted where it is MONOCHROME1, or its ``PresentationLUTShape`` is INVERSE (a DX
      image's MONOCHROME1 says INVERSE too: one inversion).

    ``check_pixels(width, height)`` refuses a size before the pixels are decoded. A data set
    without pixels (a structured report, a key object) raises :class:`Unreadable`; a damaged
    one, the decoder's own exception (see :func:`dicom_failure`).
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    if not any(k in ds for k in PIXEL_ELEMENTS):
        if "DirectoryRecordSequence" in ds:  # a DICOMDIR: read in a folder, it is skipped
            raise Unreadable("a DICOMDIR, a DICOM medium's index of its files (no image); pass the folder that holds "
                             "the images instead")
        kind = str(ds.get("Modality", "") or "").strip()
        raise Unreadable(f"a DICOM file without an image{f' (modality {kind})' if kind else ''}, e.g. a "
                         "structured report or a key object; leave it out of the image folders")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    check_pixels(int(ds.Columns), int(ds.Rows))
    pixels = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array  # one frame decoded
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    padding = None
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:  # colour: luminance
        pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    else:
        padding = _padding(ds, pixels)  # on the stored values, before any LUT
        pixels = apply_modality_lut(pixels, ds)
        if "VOILUTSequence" in ds or ("WindowCenter" in ds and (dicom_number(ds.get("WindowWidth")) or 0) >= 1):
            pixels = apply_voi_lut(pixels, ds)
    # pydicom converts an element when it is first read: a damaged one (an unknown VR, a bad
    # length) raises here, as a reason, not later as a crash
    inverse = photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    arr = np.asarray(pixels, dtype=np.float64)
    del pixels
    if not arr.flags.writeable:  # written in place below
        arr = arr.copy()
    if arr.ndim != 2 or arr.size == 0:
        raise Unreadable(f"dicom decode failed: unexpected pixel shape {arr.shape}")
    lo, hi = finite_range(arr if padding is None else arr[~padding])
    if not np.isfinite(arr).all():
        np.nan_to_num(arr, copy=False, nan=lo, posinf=hi, neginf=lo)
    if hi > lo:  # in place: (arr - lo) / (hi - lo) * 255, without float64 temporaries
        arr -= lo
        arr /= hi - lo
        arr *= 255.0
    else:
        arr[...] = 0.0
    if inverse:
        np.subtract(255.0, arr, out=arr)
    if padding is not None:
        arr[padding] = 0.0
    return arr.astype(_F32), frames


def dicom_number(value) -> float | None:
    """The first of a DICOM value's numbers (a window may list several), or None without one
    (an element left empty)."""
    if value is not None and not isinstance(value, (str, bytes, int, float)):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _padding(ds, stored: np.ndarray) -> np.ndarray | None:
    """The pixels of ``ds``'s padding (``PixelPaddingValue``, up to ``PixelPaddingRangeLimit``)
    among its ``stored`` values; None without padding (no element, an empty one, no pixel of it,
    or every pixel, which would leave no image)."""
    first = dicom_number(ds.get("PixelPaddingValue"))
    if first is None:
        return None
    last = dicom_number(ds.get("PixelPaddingRangeLimit"))
    last = first if last is None else last
    mask = (stored >= min(first, last)) & (stored <= max(first, last))
    return None if mask.all() or not mask.any() else mask


def dicom_failure(ds, e: BaseException) -> str:
    """The one-line reason a DICOM file could not be decoded: pixel data in a transfer syntax
    without a decoder here (compressed, or a UID pydicom does not know) named with the fix,
    else the decoder's exception."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and "transfer syntax" in str(e).lower():
        try:
            compressed, name = syntax.is_compressed, syntax.name
        except Exception:  # not a transfer syntax pydicom knows (JPEG XL in pydicom 3.0, say)
            compressed, name = True, str(syntax)
        if compressed:
            return (f"dicom pixel data in {name}, a transfer syntax with no decoder here; convert it to "
                    "uncompressed DICOM, e.g. gdcmconv --raw IN OUT")
    return f"dicom decode failed: {said(e)}"


def read_dicom_gray(data: bytes, check_pixels, keep: tuple[type[BaseException], ...] = ()) -> tuple:
    """(the data set, :func:`dicom_gray`'s first frame and number of frames) of DICOM file bytes
    ``data``, or :class:`Unreadable` with the reason (:func:`dicom_failure`); exceptions of the
    types ``keep`` (a caller's own ``check_pixels`` refusal) pass as they are. osteo's decoder
    calls this function too."""
    ds = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dicom(io.BytesIO(data))
            arr, frames = dicom_gray(ds, check_pixels)
    except (Unreadable, *keep):
        raise
    except Exception as e:  # pydicom raises many types on truncated or odd files
        raise Unreadable(dicom_failure(ds, e)) from None
    return ds, arr, frames


def _decode_dicom(data: bytes) -> Gray:
    """``osteo.data.decode._decode_dicom``'s reading, without the image's facts."""
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise Unreadable("a DICOM file needs pydicom: pip install pydicom") from None
    return Gray(read_dicom_gray(data, _check_pixels)[1], "float")


# --------------------------------------------------------------------------- resize


def dct_scale(width: int, height: int, side: int) -> int:
    """Mirrors ``osteo.data.decode.dct_scale``: the largest JPEG DCT scale at which the
    shorter side keeps ``side`` pixels."""
    for s in DCT_SCALES:
        if -(-min(width, height) // s) >= side:
            return s
    return 1


def jpeg_ratio(width: int, height: int, size: int, resize: str = "pad") -> int:
    """The DCT scale a JPEG is decoded at for ``size`` (mirrors ``osteo.data.pipeline.jpeg_ratio``,
    with ``osteo.data.scan.audit_scale``: at most the audit's, dct_scale(..., DETAIL_SIDE))."""
    side = max(width, height) if resize == "pad" else min(width, height)
    for r in (8, 4, 2):
        if math.ceil(side / r) >= size:
            return min(r, dct_scale(width, height, DETAIL_SIDE))
    return 1


def box_factor(width: int, height: int, size: int, resize: str = "pad") -> int:
    """The integer box-filter factor that keeps the image at least ``size`` where it matters (never
    more than the shorter side: a thin image keeps one pixel across)."""
    side = max(width, height) if resize == "pad" else min(width, height)
    return max(1, min(side // size, width, height))


def resize_gray(gray: Gray, size: int, resize: str = "pad") -> np.ndarray:
    """(size, size) float32 in [0, 255]: ``gray`` box-filtered by :func:`box_factor` of its decoded
    size, then resized bilinearly with half-pixel centres (the arithmetic of ``tf.image.resize``),
    padded to keep its aspect (``pad``) or stretched. Any aspect ratio works: a padded side keeps
    at least one pixel, and every size is integer arithmetic. osteo's image cache calls it
    (``osteo.data.pipeline``: the one copy)."""
    if resize not in ("pad", "stretch"):
        raise ValueError(f"resize must be pad or stretch, not {resize!r}")
    h, w = gray.pixels.shape
    img = gray.box_mean(box_factor(w, h, size, resize))
    if resize == "stretch":
        return _bilinear(img, size, size)
    h, w = img.shape
    long = max(h, w)
    rh, rw = max(1, h * size // long), max(1, w * size // long)
    top, left = size * (long - h) // (2 * long), size * (long - w) // (2 * long)
    out = np.zeros((size, size), _F32)
    out[top : top + rh, left : left + rw] = _bilinear(img, rh, rw)
    return out


@functools.lru_cache(maxsize=512)  # osteo's audit meets many sizes
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps with half-pixel centres: each output pixel's lower and upper source
    index and the upper one's weight."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    low = np.floor(src)
    lo = np.clip(low, 0, n_in - 1).astype(np.intp)
    hi = np.clip(np.ceil(src), 0, n_in - 1).astype(np.intp)
    weight = (src - low).astype(_F32)
    for a in (lo, hi, weight):  # shared by the cache
        a.flags.writeable = False
    return lo, hi, weight


def _bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Rows, then columns."""
    lo, hi, t = _taps(img.shape[0], out_h)
    top = img[lo]
    rows = top + (img[hi] - top) * t[:, None]
    lo, hi, t = _taps(img.shape[1], out_w)
    left = rows[:, lo]
    return left + (rows[:, hi] - left) * t


def to_levels(img: np.ndarray) -> np.ndarray:
    """float [0, 255] (size, size) -> the uint16 levels of osteo's image cache (size, size, 1)."""
    return np.clip(np.round(img * _F32(SCALE)), 0, 65535).astype(np.uint16)[..., None]


def load_levels(data: bytes, size: int, resize: str = "pad") -> tuple[np.ndarray, Gray]:
    """A file's bytes -> (its uint16 levels (size, size, 1), the decoded image they came from)
    (mirrors ``osteo.data.pipeline.load_levels``)."""
    gray = decode(data, functools.partial(jpeg_ratio, size=size, resize=resize))
    return to_levels(resize_gray(gray, size, resize)), gray


def prepare(data: bytes, size: int, resize: str) -> tuple[np.ndarray, Gray]:
    """A file's bytes -> (the model's input, float32 (size, size, 1), as ``osteo predict`` makes
    it (``osteo.predict.load_images``: the levels / 257); the decoded image, which says whether
    it is blank or has transparent pixels)."""
    levels, gray = load_levels(data, size, resize)
    return levels.astype(_F32) / _F32(SCALE), gray


# --------------------------------------------------------------------------- model


def session(model: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its notices would mix with the CSV's warnings
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def probabilities(sess, images: np.ndarray) -> np.ndarray:
    """The model's calibrated probabilities (N, 3) for float32 images (N, size, size, 1)."""
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    return sess.run([out.name], {inp.name: np.asarray(images, _F32)})[0]


# --------------------------------------------------------------------------- command line


# what an operating system, a NAS or an archiver keeps beside the images: not data
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
SYSTEM_FOLDERS = frozenset({"@eadir", "#recycle", "#snapshot", "__macosx", "$recycle.bin", "system volume information"})


def not_data(name: str, folder: bool) -> bool:
    """A file or folder that holds no one's images, by its name: hidden (``.name``: a trash, an
    AppleDouble ``._name``, a write in progress), a system file, or a system folder (a
    Synology NAS's ``@eaDir`` of thumbnails, an archive's ``__MACOSX``, a recycle bin). osteo's
    audit and ``osteo predict`` skip what this function says, as this script does."""
    return name.startswith(".") or name.lower() in (SYSTEM_FOLDERS if folder else SYSTEM_FILES)


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".ima"})
# images osteo does not read: in a class folder they are ignored, and the audit says so in one line
OTHER_IMAGE_EXTENSIONS = frozenset({".gif", ".webp", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl", ".pgm",
                                    ".ppm", ".nii", ".nrrd", ".mha", ".mhd"})


def image_file(path: str | os.PathLike) -> bool:
    """Whether a file found in a folder is an image to read, as osteo's audit decides: not
    :func:`not_data`, and an image extension (any case), or no such extension and a regular
    file whose bytes say DICOM (``IM0001``, a UID, as PACS exports name them; not ``DICOMDIR``)."""
    name = os.path.basename(path)
    ext = os.path.splitext(name)[1].lower()
    if not_data(name, folder=False):
        return False
    if ext in IMAGE_EXTENSIONS:
        return True
    if name.upper() == "DICOMDIR" or ext in OTHER_IMAGE_EXTENSIONS or not os.path.isfile(path):
        return False  # a named pipe is not opened
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return preambled_dicom(head) or bare_dicom(head)


def inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or below it (False across drives)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


def walk_images(top: Path, unlistable=None, not_followed=None) -> tuple[list[Path], list[Path]]:
    """(the images below folder ``top``, as osteo's audit chooses them (:func:`image_file`), and the
    other files there, left out), each list sorted. Linked folders are followed, as the audit
    follows them, each real folder once (a loop is not walked again), but not one that holds
    ``top`` (a link to ``..`` or ``/``, which would walk far outside what was asked): each such link
    goes to ``not_followed(link, target)``, and each folder that cannot be listed to
    ``unlistable(error)``, where given. ``osteo predict`` walks folders with this function too."""
    found, walked, real_top = [], set(), os.path.realpath(top)
    for folder, dirs, files in os.walk(top, followlinks=True, onerror=unlistable):
        real = os.path.realpath(folder)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            target = os.path.realpath(os.path.join(folder, d))
            if inside(real_top, target):
                if not_followed:
                    not_followed(Path(folder) / d, Path(target))
                dirs.remove(d)
        dirs[:] = sorted(d for d in dirs if not not_data(d, folder=True))
        found += [Path(folder) / f for f in files if not not_data(f, folder=False)]
    images, left_out = [], []
    for f in sorted(found):
        (images if image_file(f) else left_out).append(f)
    return images, left_out


def _expand(paths: list[str], unlistable=None, not_utf8: set | None = None) -> tuple[list[Path], list[Path]]:
    """(the files to read: each named, and the images below each folder named; the other files
    below those folders, left out); each folder that cannot be listed goes to ``unlistable(error)``,
    and each file whose name is not UTF-8 (:func:`name_not_utf8`) into ``not_utf8`` as well."""
    out, left_out = [], []
    for p in map(Path, paths):
        if p.is_dir():
            images, others = walk_images(p, unlistable=unlistable)
            out += images
            left_out += others
            if not_utf8 is not None:
                not_utf8.update(f for f in images if name_not_utf8(f, p))
        else:
            out.append(p)
            if not_utf8 is not None and name_not_utf8(p):
                not_utf8.add(p)
    return out, left_out


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="Classify knee X-rays with an osteo ONNX export (CSV on stdout).")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF, DICOM) or folders")
    parser.add_argument("--export", default=str(here / "export.json"),
                        help="the export's record (default: export.json beside this script)")
    args = parser.parse_args(argv)
    record_path = Path(args.export)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        model = record_path.parent / record["file"]
        size, resize = int(record["input"]["shape"][1]), record["preprocessing"]["resize"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"predict.py: cannot read {record_path} ({type(e).__name__}: {e}); give the export's "
              "export.json with --export", file=sys.stderr)
        return 2
    try:
        changed = record.get("sha256") is not None and sha256_file(model) != record["sha256"]
    except OSError as e:
        print(f"predict.py: cannot read {model} ({e.strerror or e}); export the run again with osteo export",
              file=sys.stderr)
        return 2
    if changed:  # a file changed or damaged since the export would give other probabilities, without a word
        print(f"predict.py: {model} is not the file {record_path.name} describes (its sha256 differs: changed or "
              "damaged since the export); export the run again with osteo export", file=sys.stderr)
        return 2
    try:
        sess = session(model)
    except Exception as e:  # onnxruntime's own error types
        print(f"predict.py: cannot load {model} ({type(e).__name__}: {str(e)[:200]}); "
              "export the run again with osteo export", file=sys.stderr)
        return 2
    failed, blank, clear, unlisted = 0, [], [], []

    def unlistable(e: OSError) -> None:  # os.walk skips a folder it cannot list, silently
        unlisted.append(str(e.filename))
        print(f"predict.py: cannot list {e.filename}: {e.strerror}; its files are not predicted", file=sys.stderr)

    not_utf8: set[Path] = set()
    paths, left_out = _expand(args.images, unlistable, not_utf8)
    if left_out:
        print(f"predict.py: {len(left_out)} file(s) in the folders given are not images it reads (by their name, or "
              f"DICOM by their bytes), e.g. {left_out[0]}: left out", file=sys.stderr)
    if not paths:  # a header alone and exit 0 said nothing of an empty folder (osteo predict's words)
        print("predict.py: " + (f"no file could be found: {some_of(unlisted, 3)} cannot be listed (each "
                                "said above); make them readable (chmod), or pass other folders" if unlisted else
                                f"no files in {', '.join(args.images)}; pass image files or folders that hold them"),
              file=sys.stderr)
        return 2
    writer = sys.stdout
    writer.write(",".join(COLUMNS) + "\n")
    for start in range(0, len(paths), BATCH):
        ready, arrays = [], []
        for path in paths[start : start + BATCH]:
            try:
                if path in not_utf8:
                    raise Unreadable(NOT_UTF8)
                if os.path.exists(path) and not os.path.isfile(path):  # a named pipe would block the read
                    raise Unreadable("not a regular file")
                with open(path, "rb") as f:
                    x, gray = prepare(f.read(), size, resize)
                arrays.append(x)
                ready.append(path)
                if gray.one_value():
                    blank.append(str(path))
                elif gray.transparent:
                    clear.append(str(path))
            except (OSError, Unreadable) as e:
                failed += 1
                print(f"predict.py: {shown(path)}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            except Exception as e:  # a decoder failure no one expected: that file's line, not the script's end
                failed += 1
                print(f"predict.py: {shown(path)}: decode failed: {said(e)}", file=sys.stderr)
        if arrays:
            for path, p in zip(ready, probabilities(sess, np.stack(arrays))):
                writer.write(",".join([_csv_path(path), *(f"{float(v):.6f}" for v in p)]) + "\n")
    if blank:  # as osteo predict says it: predicted all the same
        print(f"predict.py: {len(blank)} image(s) are blank, every pixel one gray level: {some_of(blank, 3)}; "
              "their rows say nothing of a knee (a failed export, a placeholder?): check the files", file=sys.stderr)
    if clear:  # as osteo predict says it: read by their colours
        print(f"predict.py: {len(clear)} image(s) have transparent pixels: {some_of(clear, 3)}; each is read "
              "by its colours with the transparency dropped, as training reads it, which may not be what a viewer "
              "shows", file=sys.stderr)
    return 1 if failed or unlisted else 0


def some_of(items, k: int, sep: str = ", ") -> str:
    """The first ``k`` of ``items`` joined by ``sep``, and how many more there are: ``a, b and 4 more``
    (osteo's messages use this function too)."""
    return sep.join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (osteo's own writers use this function too)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f) -> str:
    """The sha256 of the rest of the binary file ``f``, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _csv_path(path: Path) -> str:
    """A path as a CSV field (quoted when it holds a comma, a quote or a line break)."""
    text = shown(path)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


if __name__ == "__main__":
    sys.exit(main())
