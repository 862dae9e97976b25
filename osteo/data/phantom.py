"""The phantom: a synthetic knee-radiograph dataset, built in, for the demo, tests and benchmarks.

    osteo data phantom OUT [--n 1947] [--size 256] [--seed 0] [--proportions 780,374,793] [--bit-depth 8|16]
                           [--overlap 2]

Each image is an antero-posterior view of a knee: the distal femur with its two
condyles, the tibial plateau and shaft, the fibular head, the joint space between
them, soft tissue around, and a side marker burned in. Intensity is X-ray
attenuation: brighter means more mineral in the beam path.

What a class means physically (each drawn per image from overlapping normals, as
bone mineral density overlaps between patients):

    class          mineral density   trabecular bone fraction   cortical thickness
    normal         1.00 +- 0.07      0.62 +- 0.05               0.070 +- 0.010
    osteopenia     0.74 +- 0.07      0.44 +- 0.05               0.045 +- 0.008
    osteoporosis   0.52 +- 0.07      0.26 +- 0.05               0.025 +- 0.006

(cortical thickness as a fraction of the image width). These are the spreads at
``--overlap 1``; the default, 2, doubles every standard deviation (see
:data:`DEFAULT_OVERLAP`). Each image's draws are written to ``latents.csv``. Lower density dims bone
against soft tissue; a lower bone fraction thins and disconnects the trabecular
network; the cortex thins.

Nuisance variation drawn per image, none of it related to the class: exposure and
gamma, quantum noise, blur, rotation (+-8 degrees), scale (0.88-1.12), position,
left/right laterality (mirror), the side marker's corner, and soft-tissue thickness.

Everything is a pure function of (seed, class, index): the same seed gives the same
bytes. Images are float32 in [0, 1]; ``write_phantom`` stores 8- or 16-bit PNGs in
``OUT/<class>/``. Default proportions are those of the public 1,947-image knee
dataset (780 normal / 374 osteopenia / 793 osteoporosis).

Sizes go from 16 to :data:`osteo.recipe.MAX_IMAGE_SIZE` px (a 2,048 px image takes
about 0.5 GB while it is drawn), and ``n`` is at least 3. ``OUT`` is complete or
absent: the images are written to a hidden sibling folder (``.OUT.<pid>@<host>-<hex>.tmp``)
renamed to ``OUT`` at the end, and removed on any error or Ctrl-C; one that a killed
run left behind is removed by the next run for the same ``OUT`` (and the audit
ignores hidden temporaries). An ``OUT`` that exists and is not empty is refused,
never mixed with.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.files import cannot_write, owned_prefix, sweep_temporaries, write_csv
from osteo.recipe import MAX_IMAGE_SIZE
from osteo.runs import class_folder_above

DEFAULT_PROPORTIONS = (780, 374, 793)

# mean, sd of (mineral density, trabecular fraction, cortical thickness) per class
CLASS_PARAMS = {
    "normal": ((1.00, 0.07), (0.62, 0.05), (0.070, 0.010)),
    "osteopenia": ((0.74, 0.07), (0.44, 0.05), (0.045, 0.008)),
    "osteoporosis": ((0.52, 0.07), (0.26, 0.05), (0.025, 0.006)),
}
MIN_SIZE = 16
# The spread of the class latents, as a multiple of the table above. At 1 a Bayes classifier
# on the three latents scores a balanced accuracy of 0.997 (the classes barely overlap); at
# the default 2 it scores 0.898, like the best published models on real knee radiographs
# (0.8-0.9 accuracy); 3 gives 0.773 (Monte Carlo, 20,000 knees per class, equal priors;
# the report's oracle row measures it on each split).
DEFAULT_OVERLAP = 2.0
LATENTS_FILE = "latents.csv"
MIN_N = 3


def class_counts(n: int, proportions: Sequence[int] = DEFAULT_PROPORTIONS) -> list[int]:
    """Split ``n`` images over the classes by ``proportions`` (largest remainder)."""
    if len(proportions) != len(CLASSES) or any(p < 0 for p in proportions) or sum(proportions) <= 0:
        raise OsteoError(f"proportions must be {len(CLASSES)} non-negative numbers like 780,374,793, got {tuple(proportions)}")
    total = float(sum(proportions))
    exact = [n * p / total for p in proportions]
    counts = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _box(x, y, x0, x1, y0, y1):
    """Signed distance (positive inside) to an axis-aligned box."""
    return np.minimum(np.minimum(x - x0, x1 - x), np.minimum(y - y0, y1 - y))


def _ellipse(x, y, cx, cy, rx, ry):
    """Approximate signed distance (positive inside) to an ellipse."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return (1.0 - r) * min(rx, ry)


def _marker(size: int, rng: np.random.Generator) -> np.ndarray:
    """A burned-in side marker: a block letter L or R in a random corner."""
    out = np.zeros((size, size), np.float32)
    s = max(3, size // 14)
    glyph = np.zeros((5, 4), np.float32)
    if rng.random() < 0.5:  # L
        glyph[:, 0] = 1
        glyph[4, :] = 1
    else:  # R
        glyph[:, 0] = 1
        glyph[0, :3] = glyph[2, :3] = 1
        glyph[1, 3] = 1
        glyph[3, 2] = glyph[4, 3] = 1
    g = np.kron(glyph, np.ones((max(1, s // 4), max(1, s // 4)), np.float32))
    h, w = g.shape
    if h >= size or w >= size:
        return out
    margin = max(1, size // 32)
    top = margin if rng.random() < 0.5 else size - h - margin
    left = margin if rng.random() < 0.5 else size - w - margin
    out[top : top + h, left : left + w] = g
    return out


def make_image(label: str, size: int = 256, seed: int = 0, index: int = 0,
               overlap: float = DEFAULT_OVERLAP) -> np.ndarray:
    """One phantom radiograph of class ``label``: float32 (size, size) in [0, 1]."""
    return make_sample(label, size, seed, index, overlap)[0]


def make_sample(label: str, size: int = 256, seed: int = 0, index: int = 0,
                overlap: float = DEFAULT_OVERLAP) -> tuple[np.ndarray, dict, np.ndarray]:
    """(image, its latents and nuisance values, its bone mask (size, size) bool).

    ``overlap`` scales the spread of the three class latents (1: the table above);
    everything else is drawn as for any overlap, so only the class signal changes.
    """
    if label not in CLASSES:
        raise OsteoError(f"unknown class {label!r}; choose one of: {', '.join(CLASSES)}")
    _check_size(size)
    if not 0 < overlap <= 10:
        raise OsteoError(f"overlap must be above 0 and at most 10, got {overlap}; the default is {DEFAULT_OVERLAP}")
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    (dm, ds), (fm, fs), (cm, cs) = CLASS_PARAMS[label]
    density = max(0.3, rng.normal(dm, ds * overlap))
    fraction = float(np.clip(rng.normal(fm, fs * overlap), 0.12, 0.85))
    thickness = max(0.012, rng.normal(cm, cs * overlap))
    cortex = thickness * 2  # in [-1, 1] coordinates

    # pose: rotation, scale, shift, laterality
    angle = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.88, 1.12)
    shift = rng.uniform(-0.08, 0.08, size=2)
    flip = rng.random() < 0.5
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    x = (c * (xx - shift[0]) + s * (yy - shift[1])) / scale
    y = (-s * (xx - shift[0]) + c * (yy - shift[1])) / scale
    if flip:
        x = -x

    # anatomy as signed distances; the union of shapes is their maximum
    width = rng.uniform(0.9, 1.1)
    femur = np.maximum.reduce([
        _box(x, y, -0.20 * width, 0.20 * width, -1.3, -0.30),
        _ellipse(x, y, 0.0, -0.30, 0.40 * width, 0.16),
        _ellipse(x, y, -0.19 * width, -0.17, 0.19 * width, 0.17),
        _ellipse(x, y, 0.19 * width, -0.17, 0.19 * width, 0.17),
    ])
    gap = rng.uniform(0.035, 0.06)
    tibia = np.maximum.reduce([
        _box(x, y, -0.42 * width, 0.42 * width, 0.0 + gap, 0.20),
        _ellipse(x, y, 0.0, 0.20, 0.42 * width, 0.12),
        _box(x, y, -0.19 * width, 0.19 * width, 0.15, 1.3),
    ])
    fibula = np.maximum(_ellipse(x, y, 0.40 * width, 0.26, 0.08, 0.07), _box(x, y, 0.36 * width, 0.43 * width, 0.26, 1.3))
    bone_sd = np.maximum.reduce([femur, tibia, fibula])
    bone = np.clip(bone_sd * size / 2 + 0.5, 0, 1)  # anti-aliased mask
    shell = bone * np.clip((cortex - bone_sd) * size / 2 + 0.5, 0, 1)

    # trabecular network: band-pass noise thresholded at the bone fraction
    sigma = max(0.6, size / 55) * rng.uniform(0.85, 1.15)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    band = ndimage.gaussian_filter(noise, sigma, truncate=3.0) - ndimage.gaussian_filter(noise, 2.5 * sigma, truncate=3.0)
    band /= band.std() + 1e-6
    thresh = np.quantile(band, 1 - fraction)
    trabeculae = 1 / (1 + np.exp(-(band - np.float32(thresh)) * 3))

    tissue_w = rng.uniform(0.72, 0.9)
    tissue = np.clip(_ellipse(x, y, 0.0, 0.0, tissue_w, 1.6) * 6, 0, 1)
    attenuation = (
        0.35 * tissue
        + density * bone * (0.35 + 0.55 * trabeculae)
        + density * shell * 0.6
    )

    # exposure, gamma, blur, noise, marker
    exposure = rng.uniform(1.8, 2.4)
    img = 1 - np.exp(-exposure * attenuation)
    gamma = rng.uniform(0.8, 1.25)
    img = img ** gamma
    blur = rng.uniform(0.3, 1.0)
    img = ndimage.gaussian_filter(img.astype(np.float32), blur * size / 256, truncate=3.0)
    gain, offset = rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.05)
    img = img * gain + offset
    noise_sd = rng.uniform(0.005, 0.025)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * noise_sd
    img = np.maximum(img, _marker(size, rng) * 0.97)
    latents = {
        "mineral_density": density, "trabecular_fraction": fraction, "cortical_thickness": thickness,
        "rotation_deg": float(np.rad2deg(angle)), "scale": scale, "shift_x": shift[0], "shift_y": shift[1],
        "mirrored": int(flip), "bone_width": width, "joint_gap": gap, "trabecular_sigma_px": sigma,
        "tissue_width": tissue_w, "exposure": exposure, "gamma": gamma, "blur": blur, "gain": gain,
        "offset": offset, "noise_sd": noise_sd,
    }
    return np.clip(img, 0, 1).astype(np.float32), {k: float(v) for k, v in latents.items()}, bone > 0.5


def check_options(n: int, size: int, proportions: Sequence[int] = DEFAULT_PROPORTIONS, bit_depth: int = 8,
                  overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Every option of :func:`write_phantom` checked (one-line errors); the images per class."""
    if bit_depth not in (8, 16):
        raise OsteoError(f"bit depth must be 8 or 16, got {bit_depth}")
    _check_size(size)
    if n < MIN_N:
        raise OsteoError(f"number of images must be at least {MIN_N} (one per class), got {n}")
    if not 0 < overlap <= 10:
        raise OsteoError(f"overlap must be above 0 and at most 10, got {overlap}; the default is {DEFAULT_OVERLAP}")
    return class_counts(n, proportions)


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise OsteoError(f"image size {size} is too small; use {MIN_SIZE} to {MAX_IMAGE_SIZE} px")
    if size > MAX_IMAGE_SIZE:
        raise OsteoError(f"image size {size} is too large; use {MIN_SIZE} to {MAX_IMAGE_SIZE} px")


def write_phantom(
    out: str | os.PathLike,
    n: int = 1947,
    size: int = 256,
    seed: int = 0,
    proportions: Sequence[int] = DEFAULT_PROPORTIONS,
    bit_depth: int = 8,
    progress: Callable[[int], None] | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> dict[str, int]:
    """Write ``n`` phantom PNGs to ``out/<class>/<class>_NNNN.png``; return counts per class.

    ``out/latents.csv`` records each image's latents and nuisance values (the oracle's
    input, :mod:`osteo.oracle`). ``out`` must not exist or be an empty folder; it appears
    complete, or not at all.
    """
    from PIL import Image

    counts = check_options(n, size, proportions, bit_depth, overlap)
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise OsteoError(f"{out} exists and is not an empty folder; choose a new folder or remove it first")
    folder = class_folder_above(Path(os.path.realpath(out)))
    if folder is not None:  # its images of all three classes would be read as that folder's class
        raise OsteoError(f"{out} is inside {folder}, a class folder of the dataset {folder.parent}: its images of "
                         f"every class would be read as {folder.name}; choose a folder outside {folder.parent}")
    _sweep_stale(out)
    tmp = out.with_name(f"{owned_prefix(f'.{out.name}.')}{secrets.token_hex(3)}.tmp")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise cannot_write(out.parent, e) from None
        done = 0
        latent_rows = []
        for label, k in zip(CLASSES, counts):
            folder = tmp / label
            folder.mkdir()
            for i in range(k):
                img, latents, _ = make_sample(label, size=size, seed=seed, index=i, overlap=overlap)
                latent_rows.append({"path": f"{label}/{label}_{i:04d}.png", "label": label, **latents})
                if bit_depth == 8:
                    pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
                else:
                    pil = Image.fromarray(np.round(img * 65535).astype(np.uint16))
                pil.save(folder / f"{label}_{i:04d}.png", format="PNG")
                done += 1
                if progress is not None:
                    progress(done)
        write_csv(tmp / LATENTS_FILE, latent_rows, list(latent_rows[0]))
        try:
            if out.is_dir():
                out.rmdir()  # empty (checked above); fails if something appeared in it since
            os.replace(tmp, out)
        except OSError as e:
            raise OsteoError(f"cannot move the finished phantom to {out}: {e.strerror}; "
                             f"choose a new folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(zip(CLASSES, counts))


def _sweep_stale(out: Path) -> None:
    """Remove the temporaries of earlier runs for ``out`` that were killed: older than
    this process, made by a process that is gone (:func:`osteo.files.sweep_temporaries`; on a
    folder hosts share, another host's is kept a day), also those named as before the host was
    in the name (``.OUT.tmp-<pid>-<hex>``)."""
    import glob

    for pattern in (f".{glob.escape(out.name)}.*.tmp", f".{glob.escape(out.name)}.tmp-*"):
        sweep_temporaries(out.parent, grace=0.0, pattern=pattern)


def dicom_bytes(pixels: np.ndarray, syntax: str | None = None, fragments: list[bytes] | None = None,
                **elements) -> bytes:
    """``pixels`` (H, W) as the bytes of a DX DICOM file, as a PACS exports one: explicit VR
    little endian, MONOCHROME2, 16 bits allocated and 12 stored (8 and 8 for uint8 pixels),
    unless ``elements`` (keywords: PatientID, PhotometricInterpretation, PixelPaddingValue, ...)
    say otherwise; an element given None is written empty (not the pixel description's: BitsAllocated
    and its kin must be numbers). The pixels are cast to the allocated bits as they are (a value that
    does not fit wraps). ``syntax``: another transfer syntax UID, whose pixel data is then the
    encapsulated ``fragments`` (``pixels`` giving only the size). For the tests and the benchmarks'
    DICOM rows."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = UID(syntax) if syntax else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", *pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    eight = pixels.dtype == np.uint8 or elements.get("BitsAllocated") == 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8, 8, 7, 0) if eight else (16, 12, 11, 0)
    for k, v in elements.items():
        setattr(ds, k, v)
    if syntax:
        ds.PixelData = encapsulate(fragments or [])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
