"""Decode any supported image to one convention: float32, (H, W, 1), values in [0, 255].

The bytes decide the format (``sniff_format``), never the file name. Supported:

- PNG, JPEG, BMP, TIFF through Pillow: 8-bit gray, 16-bit and 32-bit integer gray
  (stretched from the image's own minimum to its maximum, as DICOM is: 12-bit data stored
  in 16 bits, 0-4095, was 0-16 of 255 at a fixed 1/257), RGB, RGBA, palette, CMYK
  (converted to luminance). Colour converts to gray one way everywhere (the audit,
  the image cache, ``osteo predict``, the report all decode here): a colour JPEG
  gives its luminance channel (Y, libjpeg's own gray output), anything else Pillow's
  ``convert("L")`` (ITU-R 601-2 weights, rounded to 8 bits); transparency (alpha, a
  palette's or colour key's) is dropped, the pixels read by their colour, as Keras' loaders
  read them (``info.transparent`` says where some pixel was not opaque; the audit warns).
  An EXIF orientation is
  applied, as image viewers do (:func:`upright`); ``info`` gives the size as shown.
- JPEGs can be decoded at a reduced DCT scale (1/2, 1/4, 1/8: libjpeg reduces while
  it decodes, anti-aliased and several times faster): ``decode_gray(data, scale)``,
  where ``scale(width, height)`` picks it (:func:`dct_scale`). A reduced image is
  ``ceil(width / s) x ceil(height / s)``; ``info`` still gives the file's own size.
- DICOM through pydicom (with the pylibjpeg plugins for JPEG / JPEG 2000 transfer
  syntaxes), also a data set written without the preamble (:func:`bare_dicom`): the
  modality LUT (rescale slope/intercept), then the VOI LUT or window centre/width when
  the file has one, then a min-max stretch to [0, 255];
  MONOCHROME1 (inverted) images are flipped so bone is bright; a multi-frame file
  gives its first frame (``info.frames`` says how many there were, and only that
  frame is decoded); ``info.patient_id`` is its PatientID, which groups a patient's
  images in the split.

Limits, so that no file can hang or exhaust a reader (the audit, the image cache,
``osteo predict``, the report all decode through here):

- only regular files are read (:func:`open_regular`): a named pipe, a device, a
  socket or a folder is refused before it is opened, and again with ``fstat`` on
  the opened descriptor (opened with ``O_NONBLOCK``, so a path swapped for a pipe
  in between cannot block either); a symbolic link is followed, a loop of them is
  reported;
- files of at most :data:`MAX_FILE_BYTES`;
- images of at most :data:`MAX_PIXELS` pixels (the first frame of a DICOM), checked
  from the header before any pixel is decoded. Pillow's own decompression-bomb
  limits are above it.

Anything else raises :class:`DecodeError` with a short reason; the audit records it
as ``unreadable``.

:func:`decode_gray` keeps the pixels as decoded (uint8 for 8-bit images: a quarter
of float32's memory) with the map to float32 that :func:`decode_bytes` applies to
the whole image, so a reader can convert strip by strip and get the same values.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

# the exported predictor (predict.py, run without osteo) is the one copy of these: both read files alike
from osteo.export_predict import (
    Unreadable,
    bare_dicom,
    bomb_pixels,
    box_means,
    dicom_failure,
    finite_range,
    float_block,
    png_refusal,
    preambled_dicom,
    read_dicom_gray,
    said,
    too_many_pixels,
    transparent,
)
from osteo.export_predict import one_value as _one_value
from osteo.export_predict import read_dicom as _read_dicom

SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
MAX_PIXELS = 1 << 26  # 67,108,864 = 8192 x 8192, over 3x a 43 cm flat-panel radiograph at 100 um
MAX_FILE_BYTES = 1 << 30  # 1 GiB
DECODE_MEMORY = 512 << 20  # bytes of decoding in flight at once, per reader (a larger file runs alone)
DCT_SCALES = (8, 4, 2)  # libjpeg's reduced scales, largest first

# Bytes per pixel that decode_gray holds at its peak, by Pillow mode (Pillow stores
# 2 to 4 bands in 4 bytes a pixel): the decoded image, its luminance, the array.
_PEAK_BYTES_PER_PIXEL = {"1": 2, "L": 2, "P": 3, "I;16": 4, "I;16L": 4, "I;16B": 4, "I;16N": 4, "I": 8, "F": 8}
_PEAK_BYTES_OTHER = 6  # RGB, RGBA, LA, CMYK (CMYK goes through RGB: 10), YCbCr ...
_FILE_KINDS = (
    (stat.S_ISFIFO, "named pipe"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
)


class DecodeError(Exception):
    """A file that cannot be decoded; ``str(e)`` is the reason, on one line (a decoder's own
    message may run over several: pydicom's does)."""

    def __init__(self, reason: str):
        super().__init__(" ".join(str(reason).split()))


def unexpected_failure(e: BaseException) -> str:
    """The reason given for a file whose decoding raised what no decoder here expects (a bug, a
    library's new exception): the file is left out with it, as an unreadable one, and the other
    files go on (the audit, predict and training)."""
    return f"decode failed: {said(e)}"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    bit_depth: int
    frames: int = 1
    patient_id: str = ""  # a DICOM file's PatientID (0010,0020), stripped; "" when it has none
    # some pixel less than opaque (an alpha channel, a palette's or a colour key's transparency): the
    # pixels are its colour all the same, alpha dropped, as Keras' loaders read it (the audit says so)
    transparent: bool = False


@dataclass
class Gray:
    """A decoded image before its conversion to float: ``pixels`` (H, W) as the decoder
    gave them (uint8, uint16, int32 or float32) and the elementwise map to float32 in
    [0, 255] (:meth:`as_float`), which may be applied to any block of them."""

    pixels: np.ndarray
    info: ImageInfo
    kind: str  # "u8": as is; "stretch": (x - lo) / (hi - lo) * 255; "float": as is
    lo: float = 0.0
    hi: float = 0.0
    scale: int = 1  # the DCT scale a JPEG was decoded at (pixels are 1/scale of info's size)
    _boxed: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def one_value(self) -> bool:
        """Whether every pixel holds one value (a failed export, a placeholder): an image stretched
        from its minimum to its maximum (16-bit, float) whose range is empty decodes to black."""
        return _one_value(self.pixels, self.kind, self.lo, self.hi)

    def as_float(self, block: np.ndarray) -> np.ndarray:
        """float32 values in [0, 255] of ``block``, a part of :attr:`pixels`
        (:func:`osteo.export_predict.float_block`)."""
        return float_block(block, self.kind, self.lo, self.hi)

    def to_float(self) -> np.ndarray:
        """The whole image as float32 (H, W, 1)."""
        return np.ascontiguousarray(self.as_float(self.pixels)[..., None], dtype=np.float32)

    def box_mean(self, box: int) -> np.ndarray:
        """:func:`osteo.export_predict.box_means` of this image; the last result is kept: the
        audit's features and the image cache often reduce by the same box."""
        box = max(1, min(box, *self.pixels.shape))
        if self._boxed is None or self._boxed[0] != box:
            self._boxed = (box, box_means(self, box))
        return self._boxed[1]


class MemoryBudget:
    """Bytes of memory shared by decoding threads: each takes its estimate (at most the
    whole budget, so a large file runs alone) and gives it back when done."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free = capacity
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        n = max(0, min(int(n), self.capacity))
        with self.cond:
            while self.free < n:
                self.cond.wait()
            self.free -= n
        try:
            yield
        finally:
            with self.cond:
                self.free += n
                self.cond.notify_all()


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's first bytes (at least 132 of them for DICOM), or None."""
    if preambled_dicom(data) or bare_dicom(data):
        return "dicom"
    for magic, name in SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def refuse_to_replace_an_image(path: str | os.PathLike, option: str, fix: str) -> None:
    """An output path where an image (or a DICOM file) is, is somebody's data: a CSV or a model
    written there would replace it. Refused in one line; anything else is the caller's to check."""
    try:
        with open(path, "rb") as f:
            kind = sniff_format(f.read(132))
    except OSError:  # nothing there, a folder, or unreadable: the caller's own checks say so
        return
    if kind is not None:
        from osteo.errors import OsteoError

        raise OsteoError(f"{option} {path} is an image ({kind}), which this would replace; {fix}")


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``named pipe``, ``character device`` ...)."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "special file"


def _os_reason(path: str | os.PathLike, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "cannot read file: symbolic link loop"
    if e.errno == errno.ENOENT and os.path.islink(path):
        return "cannot read file: broken symbolic link (its target does not exist)"
    return f"cannot read file: {e.strerror or e}"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (symbolic links followed) of
    at most :data:`MAX_FILE_BYTES`; raise :class:`DecodeError` otherwise.

    The path is checked with ``stat`` before it is opened (opening a named pipe
    blocks until a writer comes, opening a device can have effects), then opened with
    ``O_NONBLOCK`` and checked again on the descriptor, so a path swapped in between
    cannot make a reader block.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise DecodeError(_os_reason(path, e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError(f"not a regular file ({file_kind(st.st_mode)})")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise DecodeError(_os_reason(path, e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(f"not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > MAX_FILE_BYTES:
            raise DecodeError(_too_big(st.st_size))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_big(size: int) -> str:
    return f"{size:,} bytes exceeds osteo's file size limit of {MAX_FILE_BYTES:,} (MAX_FILE_BYTES); downscale or compress it"


def read_all(f: BinaryIO) -> bytes:
    """The rest of an :func:`open_regular` file, refusing one that grew past the limit."""
    try:
        data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise DecodeError(_too_big(len(data)))
    return data


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return read_all(f)


def decode_file(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """Decode the file at ``path`` -> (float32 array (H, W, 1) in [0, 255], ImageInfo)."""
    return decode_bytes(read_file(path))


def decode_bytes(data: bytes) -> tuple[np.ndarray, ImageInfo]:
    """Decode ``data`` -> (float32 array (H, W, 1) in [0, 255], ImageInfo)."""
    gray = decode_gray(data)
    return gray.to_float(), gray.info


def decode_gray(data: bytes, scale: Callable[[int, int], int] | None = None) -> Gray:
    """Decode ``data`` to one gray channel, kept in the decoder's own type (see :class:`Gray`).

    ``scale(width, height)``: the DCT scale (1, 2, 4 or 8) to decode a JPEG at; full size
    without it. Other formats ignore it.
    """
    if not data:
        raise DecodeError("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("unknown file signature (not PNG, JPEG, BMP, TIFF or DICOM)")
    if fmt == "dicom":
        return _decode_dicom(data)
    return _decode_pillow(data, fmt, scale)


def dct_scale(width: int, height: int, side: int) -> int:
    """The largest JPEG DCT scale (8, 4, 2, else 1) at which ``side`` is at most
    ``ceil(width / s)`` and ``ceil(height / s)``: the shorter side keeps ``side`` pixels."""
    for s in DCT_SCALES:
        if -(-min(width, height) // s) >= side:
            return s
    return 1


def check_pixels(width: int, height: int) -> None:
    """Raise :class:`DecodeError` when an image has more than :data:`MAX_PIXELS` pixels."""
    if width * height > MAX_PIXELS:
        raise DecodeError(too_many_pixels(width * height, f"{width} x {height}", MAX_PIXELS))


def decode_cost(f: BinaryIO) -> tuple[int, int, int]:
    """(width, height, bytes) of the file ``f`` (an :func:`open_regular` file) from its
    header alone, without decoding pixels: bytes is roughly the most memory
    :func:`decode_gray` takes on it, its bytes included. Raises :class:`DecodeError`
    when the header says the image is over :data:`MAX_PIXELS`; a header it cannot read
    gives (0, 0, file size) (decoding will say what is wrong). Leaves ``f`` at its start.
    """
    size = os.fstat(f.fileno()).st_size
    try:
        head = f.read(132)
        f.seek(0)
        fmt = sniff_format(head)
        if fmt == "dicom":
            w, h, peak = _dicom_cost(f)
            return w, h, size + peak
        if fmt is not None:
            w, h, peak = _pillow_cost(f)
            return w, h, size + peak
    except DecodeError:
        raise
    except Exception:  # the decoder will say what is wrong with it
        pass
    finally:
        f.seek(0)
    return 0, 0, size


def _pillow_cost(f: BinaryIO) -> tuple[int, int, int]:
    img = _pillow_open(f)  # an image opened on a file object leaves the file open
    w, h = img.size
    per = _PEAK_BYTES_PER_PIXEL.get(img.mode, 10 if img.mode == "CMYK" else _PEAK_BYTES_OTHER)
    return w, h, w * h * per


def _dicom_cost(f: BinaryIO) -> tuple[int, int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_dicom(f, stop_before_pixels=True)
    rows, cols = int(ds.Rows), int(ds.Columns)
    check_pixels(cols, rows)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    # the frame as stored, float64 for the LUTs (twice, and per sample for colour), the float32 result
    return cols, rows, rows * cols * (samples * max(1, bits // 8) + 8 * (samples + 2) + 4)


def _pillow_open(data: bytes | BinaryIO):
    """Image.open with the pixel limit checked and the decompression-bomb warnings of
    Pillow (over 89 M pixels; an error over 179 M) turned into our limit's message."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # bomb warnings: our limit is lower; the rest: noise on odd files
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as e:
        raise DecodeError(too_many_pixels(bomb_pixels(e), limit=MAX_PIXELS)) from None
    check_pixels(*img.size)
    return img


def _decode_pillow(data: bytes, fmt: str, scale: Callable[[int, int], int] | None = None) -> Gray:
    if fmt == "png" and png_refusal(data):
        raise DecodeError(png_refusal(data))
    dct = 1
    try:
        img = _pillow_open(data)
        width, height = img.size
        if fmt == "jpeg":
            # at the DCT scale asked for (Pillow takes the largest that keeps the size given,
            # so 1/s of each side gives s), and gray straight from libjpeg: a colour JPEG's
            # luminance (Y) channel. CMYK has no such gray: converted below.
            want = scale(width, height) if scale else 1
            drafted = img.draft(None if img.mode == "CMYK" else "L", (max(1, width // want), max(1, height // want)))
            dct = round(width / drafted[1][2]) if drafted else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        frames = int(getattr(img, "n_frames", 1) or 1)
        img, turned = upright(img)
        if turned:  # a quarter turn: the image as shown is height x width
            width, height = height, width
        mode = img.mode
        lo = hi = 0.0
        clear = transparent(img)
        if mode.startswith("I;16") or mode == "I":
            # stretched from the image's own minimum to its maximum, as DICOM is: 12-bit data in a
            # 16-bit file (0-4095) decoded to 0-16 of 255 at 1/257, near black; a 32-bit TIFF clipped
            pixels, kind, bit_depth = np.asarray(img), "stretch", 16 if mode.startswith("I;16") else 32
            lo, hi = finite_range(pixels)
        elif mode == "F":
            pixels, kind, bit_depth = np.asarray(img), "stretch", 32
            lo, hi = finite_range(pixels)
        else:
            if mode == "CMYK":
                img = img.convert("RGB")
            if img.mode != "L":
                img = img.convert("L")
            pixels, kind, bit_depth = np.asarray(img), "u8", 8
        del img  # the decoder's copy: the array holds its own
    except DecodeError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data
        raise DecodeError(f"{fmt} decode failed: {said(e)}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise DecodeError(f"{fmt} decode failed: unexpected shape {pixels.shape}")
    return Gray(pixels, ImageInfo(fmt, width, height, bit_depth, frames, transparent=clear), kind, lo, hi, dct)


def upright(img):
    """(the image as a viewer shows it, whether that turned it a quarter): its EXIF orientation
    applied (a phone's photo of a film, a scanner's export), as every image viewer does."""
    from PIL import ImageOps

    orientation = img.getexif().get(0x0112, 1)
    if orientation not in range(2, 9):
        return img, False
    return ImageOps.exif_transpose(img), orientation in (5, 6, 7, 8)


def _decode_dicom(data: bytes) -> Gray:
    """The first frame as a viewer shows it (:func:`osteo.export_predict.dicom_gray`, which an
    ONNX export's predict.py runs too), with the file's facts."""
    try:
        ds, arr, frames = read_dicom_gray(data, check_pixels, keep=(DecodeError,))
    except Unreadable as e:
        raise DecodeError(str(e)) from None
    try:  # pydicom converts an element when it is first read: a damaged one raises here, as a reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bits = int(getattr(ds, "BitsAllocated", 16) or 16)
            patient = str(ds.get("PatientID", "") or "").strip()
    except Exception as e:
        raise DecodeError(dicom_failure(ds, e)) from None
    h, w = arr.shape
    return Gray(arr, ImageInfo("dicom", w, h, bits, frames, patient), "float")
