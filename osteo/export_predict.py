"""Classify knee X-rays with an osteo ONNX export, without osteo.

    python predict.py IMAGE_OR_FOLDER... > predictions.csv

``osteo export RUN --format onnx`` copies this file into the export folder, beside
``model.onnx`` and ``export.json`` (which says the input size and resize mode). It needs
numpy, Pillow and onnxruntime, and pydicom for DICOM files; nothing of osteo, Keras,
TensorFlow or PyTorch. It prints ``path,p_normal,p_osteopenia,p_osteoporosis`` as CSV:
the calibrated probabilities that ``osteo predict RUN FILES`` gives for the same files
(within 1e-4; the temperature is inside the ONNX model). Folders are read recursively
(hidden files skipped). A file that cannot be read gets a line on stderr and no row; the
exit status is then 1.

Each image goes through osteo's own steps, rewritten here in NumPy:

* decode (``osteo.data.decode``): 8-bit images as their gray levels (colour through
  Pillow's luminance), 16-bit images scaled by 1/257, floating-point TIFFs and DICOM
  stretched from their minimum to their maximum (DICOM after its modality LUT and its
  VOI LUT or window; MONOCHROME1 inverted; colour DICOM as luminance; the first frame);
* resize (``osteo.data.pipeline.resize_image``): an integer box filter, then TensorFlow's
  bilinear resize (half-pixel centres), padded to a square (``pad``) or stretched;
* quantize to the 16-bit levels of osteo's image cache (``round(x * 257) / 257``).

Where osteo's resize would make a side of a very thin image 0 pixels wide, this keeps it
1 pixel wide. ``osteo`` keeps this file as ``osteo/export_predict.py`` and tests it
against its own decode and resize.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

CLASSES = ("normal", "osteopenia", "osteoporosis")
COLUMNS = ("path", *(f"p_{c}" for c in CLASSES))
MAX_PIXELS = 1 << 26  # osteo.data.decode.MAX_PIXELS
LEVELS = np.float32(257.0)  # osteo.data.pipeline.SCALE: [0, 255] <-> [0, 65535]
BATCH = 32
_F32 = np.float32


class Unreadable(Exception):
    """A file this script cannot decode; ``str(e)`` is the reason."""


# --------------------------------------------------------------------------- decode


def decode(data: bytes) -> np.ndarray:
    """The image in ``data`` as float32 (H, W) gray levels in [0, 255], as osteo decodes it."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return _decode_dicom(data)
    if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")):
        raise Unreadable("unknown file signature (not PNG, JPEG, BMP, TIFF or DICOM)")
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            _check_pixels(*img.size)
            img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            return np.clip(np.asarray(img).astype(_F32), 0, 65535) / 257.0
        if img.mode == "F":
            return _stretch(np.asarray(img).astype(_F32))
        if img.mode == "CMYK":
            img = img.convert("RGB")
        return np.asarray(img if img.mode == "L" else img.convert("L")).astype(_F32)
    except Unreadable:
        raise
    except Exception as e:  # Pillow raises many types on corrupt data
        raise Unreadable(f"decode failed: {type(e).__name__}: {str(e)[:120]}") from None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise Unreadable(f"{width} x {height} pixels exceeds the limit of {MAX_PIXELS:,}; downscale it")


def _finite_range(arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """(arr - min) / (max - min) * 255 over the finite values (non-finite ones clipped to them)."""
    lo, hi = _finite_range(arr)
    if not hi > lo:
        return np.zeros(arr.shape, _F32)
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    return ((arr - lo) / (hi - lo) * 255.0).astype(_F32)


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError:
        raise Unreadable("a DICOM file needs pydicom: pip install pydicom") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            _check_pixels(int(ds.Columns), int(ds.Rows))
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            pixels = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
            if getattr(ds, "SamplesPerPixel", 1) > 1:  # colour: luminance
                pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            else:
                pixels = apply_modality_lut(pixels, ds)
                if "WindowCenter" in ds or "VOILUTSequence" in ds:
                    pixels = apply_voi_lut(pixels, ds)
        arr = np.array(pixels, dtype=np.float64)
    except Exception as e:  # pydicom raises many types on truncated or odd files
        raise Unreadable(f"dicom decode failed: {type(e).__name__}: {str(e)[:120]}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise Unreadable(f"dicom decode failed: unexpected pixel shape {arr.shape}")
    lo, hi = _finite_range(arr)
    if hi > lo:
        arr = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo) * 255.0
    else:
        arr = np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 255.0 - arr
    return arr.astype(_F32)


# --------------------------------------------------------------------------- resize


def box_factor(width: int, height: int, size: int, resize: str = "pad") -> int:
    """The integer box-filter factor osteo shrinks an image by before its bilinear resize."""
    side = max(width, height) if resize == "pad" else min(width, height)
    return max(1, side // size)


def resize_image(img: np.ndarray, size: int, resize: str = "pad") -> np.ndarray:
    """float32 (H, W) -> (size, size) in [0, 255]: box filter, then bilinear, padded or stretched.

    The arithmetic is TensorFlow's, in float32 (``tf.image.resize_with_pad`` decides the
    resized size and the padding; ``tf.image.resize(..., "bilinear")`` interpolates).
    """
    if resize not in ("pad", "stretch"):
        raise ValueError(f"resize must be pad or stretch, not {resize!r}")
    img = _box_filter(np.asarray(img, _F32), box_factor(img.shape[1], img.shape[0], size, resize))
    if resize == "stretch":
        out = _bilinear(img, size, size)
    else:
        h, w, target = _F32(img.shape[0]), _F32(img.shape[1]), _F32(size)
        ratio = max(w / target, h / target)
        rh, rw = h / ratio, w / ratio
        top, left = (max(0, int(np.floor((target - r) / _F32(2)))) for r in (rh, rw))
        resized = _bilinear(img, max(1, int(np.floor(rh))), max(1, int(np.floor(rw))))
        out = np.zeros((size, size), _F32)
        out[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return np.clip(out, _F32(0), _F32(255))


def _box_filter(img: np.ndarray, box: int) -> np.ndarray:
    """Means of ``box`` x ``box`` blocks (the rows and columns left over are dropped).

    A side shorter than ``box`` becomes one block of all of it (osteo's would become 0).
    The means are summed in float64: TensorFlow sums float32 in an order of its own (SIMD
    lanes, a tree over long blocks), so no float32 order here would match it everywhere;
    the means differ from its by about 1e-5 of 255.
    """
    if box == 1:
        return img
    (h, w), (bh, bw) = img.shape, (min(box, img.shape[0]), min(box, img.shape[1]))
    img = img[: h // bh * bh, : w // bw * bw]
    return img.reshape(h // bh, bh, w // bw, bw).mean(axis=(1, 3), dtype=np.float64).astype(_F32)


def _bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow's ResizeBilinear with half-pixel centres and no antialiasing."""
    (y0, y1, ly), (x0, x1, lx) = _weights(img.shape[0], out_h), _weights(img.shape[1], out_w)
    rows0, rows1 = img[y0], img[y1]
    top = rows0[:, x0] + (rows0[:, x1] - rows0[:, x0]) * lx
    bottom = rows1[:, x0] + (rows1[:, x1] - rows1[:, x0]) * lx
    return top + (bottom - top) * ly[:, None]


def _weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each output pixel's two source pixels and the weight of the second, as TensorFlow computes them."""
    scale = _F32(in_size) / _F32(out_size)
    src = (np.arange(out_size, dtype=_F32) + _F32(0.5)) * scale - _F32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, src - floor


def prepare(data: bytes, size: int, resize: str) -> np.ndarray:
    """A file's bytes -> the model's input (size, size, 1), as ``osteo predict`` makes it."""
    img = resize_image(decode(data), size, resize)
    return (np.round(img * LEVELS) / LEVELS)[..., None]


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


def _expand(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            out.append(p)
    return out


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
        sess = session(model)
    except Exception as e:  # onnxruntime's own error types
        print(f"predict.py: cannot load {model} ({type(e).__name__}: {str(e)[:200]}); "
              "export the run again with osteo export", file=sys.stderr)
        return 2
    failed = 0
    writer = sys.stdout
    writer.write(",".join(COLUMNS) + "\n")
    paths = _expand(args.images)
    for start in range(0, len(paths), BATCH):
        ready, arrays = [], []
        for path in paths[start : start + BATCH]:
            try:
                with open(path, "rb") as f:
                    arrays.append(prepare(f.read(), size, resize))
                ready.append(path)
            except (OSError, Unreadable) as e:
                failed += 1
                print(f"predict.py: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        if arrays:
            for path, p in zip(ready, probabilities(sess, np.stack(arrays))):
                writer.write(",".join([_csv_path(path), *(f"{float(v):.6f}" for v in p)]) + "\n")
    return 1 if failed else 0


def _csv_path(path: Path) -> str:
    """A path as a CSV field (quoted when it holds a comma, a quote or a line break)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


if __name__ == "__main__":
    sys.exit(main())
