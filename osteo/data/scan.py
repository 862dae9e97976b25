"""Scan a data folder and audit it: ``osteo data audit DATA [--out DIR]``.

Layout: ``DATA/<class>/**/<image>``. Class folders match ``normal``, ``osteopenia``
and ``osteoporosis`` case-insensitively; images may sit at any depth below them.
Files with an image extension (any case), and other files whose bytes are DICOM's
(``IM0001`` or a DICOM UID, as PACS exports name them; not ``DICOMDIR``), are decoded, and
the bytes decide the format; hidden files and folders (``.name``: a trash, an AppleDouble ``._*``,
a temporary a killed process left), system files (``.DS_Store``, ``Thumbs.db``) and folders (a
NAS's ``@eaDir`` of thumbnails, ``__MACOSX``, a recycle bin: :func:`osteo.export_predict.not_data`,
which ``osteo predict`` and an export's predict.py skip too), other extensions and files outside a
class folder are listed as ``ignored`` (a folder once, not walked).

Files and folders:

- Symbolic links are followed, class folders included (``audit.json`` lists every
  linked folder under ``links``, with its target). A linked folder is not followed
  when it would be walked twice: a loop (a link to a folder above it), a target
  inside the class folder (walked at its own path) or one already walked.
- Only regular files are read: a named pipe, a device or a socket with an image
  extension is listed as unreadable ("not a regular file (named pipe)") without
  being opened, so nothing blocks the audit; so is a broken link or a link loop.
  A folder that cannot be listed is an unreadable row (its path ends in ``/``).
- File names are bytes: a name that is not valid UTF-8 is listed as unreadable
  ("rename it") and written with its odd bytes as ``\\xNN`` (Python's
  ``backslashreplace``), so ``manifest.csv`` and ``audit.json`` stay valid UTF-8,
  and the split, cache and training never see a name they cannot write.

Memory is bounded: images over :data:`osteo.data.decode.MAX_PIXELS` are refused
from their header; files are decoded only while their estimated peak memory fits
in :data:`osteo.data.decode.DECODE_MEMORY` together with the others in flight (a larger one runs
alone); 8-bit pixels stay uint8, and every image is hashed and box-reduced strip
by strip (:meth:`osteo.data.decode.Gray.box_mean`), so no float32 copy of a large
image is made. Only the small features (about 17 KB an image) are kept. Ctrl-C stops the audit at once: pending files are cancelled, and the running
ones finish within a decode, since none can block.

Duplicates:

- exact: identical bytes, or identical decoded pixels (the same image saved twice
  in different containers). The pixel hash is of the decoder's own pixels (a JPEG's at
  the audit's DCT scale, :func:`audit_scale`) with their map to float; manifests written
  before 2026-12 hashed a float32 copy, so their pixel hashes match no new one (their
  byte hashes still do);
- near: a re-encoded or resized copy. Candidates are pairs whose 16x16 thumbnails
  correlate at >= 0.98. Two different knees share their anatomy at low resolution
  but not their trabecular texture, so a candidate is confirmed only when the fine
  detail agrees too: each image keeps a band-pass image (difference of Gaussians,
  sigmas 1/128 and 4/128 of the side) at 128x128 (64x64 under 128 px; a mixed pair
  compares at the coarser), cut in 8x8 tiles, and all but 6 of the 64 tiles must
  correlate at >= 0.93. A fixed 64x64 detail image averaged the texture of 256 px
  images away, so the anatomy's edges decided, and 10 pairs of distinct knees of the
  default phantom were grouped (6 at 512 px).

  A tile whose texture is under FLAT_SHARE of the image's median tile texture counts as
  flat: JPEG's quantisation noise (about 0.3 grey levels) rewrote the faint texture (about
  0.2) of the quiet parts of a knee, and 43 of 300 phantom knees at 256 px lost their q70
  copy that way (scores 0.56-0.93).

  Measured on the default phantom (seed 0; 600 knees at 256 px, 400 at 512 px) with 40
  of them copied 6 ways (JPEG q70, q80, q90; 0.78x + JPEG q85; PNG at 0.6x and 1.25x):
  the lowest score of the 40 copies of each kind, and the highest of the distinct pairs
  that pass the thumbnails (`python benchmarks/near_duplicates.py --size 256 --n 600`):

      size   copies, lowest score by kind (before the relative floor: missed of 40)   distinct pairs (count)  max
      256    q70 0.995 (5), q80 0.997 (3), 0.78x q85 0.991 (5), 0.6x 0.985 (3)       662                     0.749
      512    q70 0.998 (2), q80 0.999 (2), 0.78x q85 0.978 (3), 0.6x 0.998 (0)       188                     0.715

  Under 128 px the check is weak: at 96 px a q90 copy was missed 4 times in 40 and
  resized copies nearly always (distinct pairs scored up to 0.69): the band-pass then
  sees JPEG's noise more than the knee's texture. Exact copies (bytes or pixels) are
  found at every size.

  Not every pair is compared: look-alike knees all pass the thumbnails, and comparing
  them all was quadratic (2,010 look-alikes: 45 s; now 0.5 s, same groups). Both
  checks become distance bounds between unit vectors (corr >= t  <=>  ||a - b||^2 <=
  2 (1 - t)): a tile is its band-pass scaled to unit length plus a flag coordinate (1
  when flat), so flat agrees with flat and not with texture, as the check has it. A
  pair that passes disagrees at no more than 6 positions, so at 8 or more of any 14.
  Each position's tiles are projected on 16 principal components (a projection never
  lengthens a distance), and k-d trees list the pairs within the bound at the 14
  positions where a sample says such pairs are rarest: the candidates are the pairs
  listed at 8 of them, or, when that is fewer, all pairs within the thumbnail bound.
  They are a superset of the pairs that pass, each checked exactly as before, so the
  groups are those of comparing every pair. Sets of under :data:`INDEX_MIN_PAIRS`
  pairs are compared in full.

A duplicate group whose members are filed under different classes is a
``conflict``: its label is unknowable from the data, and splits exclude it by
default.

Outputs: ``manifest.csv`` (one row per candidate image file, :data:`MANIFEST_COLUMNS`)
and ``audit.json`` (``data_dir``, ``classes``, ``n_files``, ``n_ok``, ``unreadable``,
``ignored``, ``duplicate_groups``, ``links``, ``ignored_folders``, ``patients``,
``warnings``).

Remembered records (``memo``): a training run's audit keeps each file's record (hashes,
size, format, features) in ``$OSTEO_CACHE/audit-v1/<folder key>.npz``, keyed by the file's
path and ``stat`` (device, inode, size, modification and status-change times, in ns), and
the next run of any model, fold or study trial on the same folder takes a record back
instead of reading and decoding the file again, when all five still match. Writing a file
changes its status-change time (``ctime``), which no tool can set back, so a rewritten,
replaced or re-permissioned file is read again (git trusts its index by the same fields).
A file whose ``ctime`` is under :data:`RACY_S` before it was read is not remembered: a
rewrite within the file system's timestamp granularity could leave its ``stat`` as it was.
Only decodes are remembered (and a decoder's refusal of the bytes read); a file that could
not be opened or read, or that ran out of memory, is tried again. The memo is checked
against osteo's audit code and decoders (the sources of this module and of
:mod:`osteo.data.decode`, Pillow's, pydicom's and NumPy's versions): any change and every
file is read again. The near-duplicate detail tiles, most of a memo's bytes, are
memory-mapped: read only when a duplicate search needs them (something changed), and then
checked against their CRC-32 first; a memo damaged there has its files read again.
``osteo data audit`` always reads every file, and leaves its records for the next run.
The pixels a run trains on are still the image cache's verified entries.

Patients: a DICOM file's PatientID is in the manifest (``patient_id``); ``patients``
in ``audit.json`` counts them (:func:`patient_summary`), with the patients whose images
are filed under different classes and the DICOM files without a PatientID (each also a
warning line). The split keeps a patient's images together (:mod:`osteo.data.split`).

A folder of images beside the class folders (``severe/``, say) is not trained on: it
is listed under ``ignored_folders`` with its number of images, and named in one
warning line (logged, so the CLI prints it as ``osteo: warning: ...``; also in
``warnings``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.data.decode import (
    DECODE_MEMORY,
    DecodeError,
    Gray,
    MemoryBudget,
    dct_scale,
    decode_cost,
    decode_gray,
    open_regular,
    read_all,
    sniff_format,
    unexpected_failure,
)
from osteo.errors import OsteoError
from osteo.export_predict import (
    IMAGE_EXTENSIONS,
    NOT_UTF8,
    OTHER_IMAGE_EXTENSIONS,
    STRIP_BYTES,
    inside,
    not_data,
)
from osteo.export_predict import shown as _display
from osteo.files import (
    RACY_S,  # (see "Remembered records"; tests move it)
    all_or_none,
    code_version,
    settled,
    some_of,
    stat_key,
    sweep_temporaries,
    temporaries_of,
    write_csv,
    write_json,
)

MANIFEST_COLUMNS = (
    "path", "label", "status", "reason", "format", "width", "height", "bit_depth", "frames",
    "bytes", "sha256", "pixel_sha256", "dup_group", "dup_kind", "conflict", "patient_id",
)
THUMB_CORR = 0.98
DETAIL_SIDE = 128  # detail image side for images at least this large
FEATURE_SIDE = 2 * DETAIL_SIDE  # pixels across the box-reduced image the features are resampled from
DETAIL_GRID = 8  # 8 x 8 tiles
DETAIL_BAND = (1 / 128, 4 / 128)  # band-pass sigmas, as fractions of the side
DETAIL_OUTLIERS = 6  # tiles of 64 that may disagree: a burned-in marker, a local edit
DETAIL_CORR = 0.93
FLAT = 0.01  # band-pass rms, in grey levels, under which a tile has no texture
# ... nor under this share of the image's median tile rms: JPEG's quantisation noise (about 0.3
# grey levels) swamps texture of 0.2, so such tiles disagreed between an image and its re-encoded copy
FLAT_SHARE = 0.2

INDEX_DIMS = 16  # principal components of the near-duplicate index
INDEX_POSITIONS = 2 * (DETAIL_OUTLIERS + 1)  # tile positions it looks at (at least DETAIL_OUTLIERS + 1)
INDEX_SAMPLE = 512  # images per set on which the index estimates how selective each position is
INDEX_MIN_PAIRS = 20_000  # fewer pairs than this are all compared
INDEX_SLACK = 1e-3  # added to the squared distance bounds, for float rounding
MEMO_VERSION = 1
log = logging.getLogger("osteo")


@dataclass
class Record:
    path: str  # relative to the data folder, POSIX separators; bytes that are not UTF-8 as \xNN
    label: str
    status: str = "ok"  # ok | unreadable
    reason: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    bit_depth: int = 0
    frames: int = 0
    bytes: int = 0
    sha256: str = ""
    pixel_sha256: str = ""
    dup_group: str = ""
    dup_kind: str = ""
    conflict: bool = False
    patient_id: str = ""  # a DICOM file's PatientID; "" for other formats and DICOM files without one
    blank: bool = False  # every decoded pixel holds one value: no picture (audit.json's "blank", a warning)
    transparent: bool = False  # some pixel less than opaque, read by its colour (audit.json's "transparent")
    features: tuple | None = field(default=None, repr=False, compare=False)
    # the stat key (see "Remembered records") under which this record may be remembered, or None
    stat_key: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class Audit:
    data_dir: str
    records: list[Record]
    ignored: list[str]
    duplicate_groups: list[dict]
    links: list[dict] = field(default_factory=list)  # linked folders: path, target, class_folder, followed, reason
    ignored_folders: list[dict] = field(default_factory=list)  # folders of images beside the classes: path, images
    warnings: list[str] = field(default_factory=list)  # what the user should know, one line each (also logged)

    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == "ok"]

    def left_out(self, where: str | os.PathLike) -> str | None:
        """One line for the console when files were unreadable (``where``: the audit.json that
        gives each one's reason), else None."""
        bad = len(self.records) - len(self.ok())
        if not bad:
            return None
        return f"audit: {bad} of {len(self.records)} files unreadable, left out ({where} gives each one's reason)"

    def first_unreadable(self) -> str:
        """``; e.g. PATH: REASON`` for the first unreadable file, or "": for an error that finds
        nothing readable, so the user sees a reason without opening audit.json."""
        bad = next((r for r in self.records if r.status != "ok"), None)
        return f"; e.g. {bad.path}: {bad.reason}" if bad else ""

    def to_json(self) -> dict:
        counts = {c: 0 for c in CLASSES}
        for r in self.ok():
            counts[r.label] += 1
        return {
            "data_dir": _display(self.data_dir),
            "classes": counts,
            "n_files": len(self.records),
            "n_ok": len(self.ok()),
            "unreadable": [{"path": r.path, "reason": r.reason} for r in self.records if r.status != "ok"],
            "ignored": list(self.ignored),
            "duplicate_groups": self.duplicate_groups,
            "links": list(self.links),
            "ignored_folders": list(self.ignored_folders),
            "patients": patient_summary(self.ok()),
            "blank": [r.path for r in self.ok() if r.blank],
            "transparent": [r.path for r in self.ok() if r.transparent],
            "warnings": list(self.warnings),
        }

    def manifest_rows(self) -> list[dict]:
        rows = []
        for r in self.records:
            row = {k: v for k, v in asdict(r).items() if k not in ("features", "stat_key")}
            row["conflict"] = "1" if r.conflict else "0"
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- listing


def _is_temporary(name: str) -> bool:
    """A hidden temporary (``.name.XXXX.tmp.png``, ``.phantom.tmp-123``): a write in
    progress, or one a killed process left behind; never data."""
    return name.startswith(".") and ".tmp" in name


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a loop or a broken link is not a folder
    except OSError:
        return False


@dataclass
class _Listing:
    candidates: list[tuple[str, str]] = field(default_factory=list)  # (relative path, label)
    ignored: list[str] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)
    unlistable: list[Record] = field(default_factory=list)  # folders that could not be listed
    folders: list[dict] = field(default_factory=list)  # folders of images beside the class folders


def list_files(data_dir: str | os.PathLike) -> tuple[list[tuple[str, str]], list[str]]:
    """(candidate (relative path, label) pairs, ignored relative paths), both sorted."""
    listing = _list(Path(data_dir))
    return listing.candidates, listing.ignored


def _list(root: Path) -> _Listing:
    if not root.is_dir():
        if root.exists():
            raise OsteoError(f"{_display(str(root))} is a file, not a folder; pass the folder that holds the class "
                             f"sub-folders ({', '.join(CLASSES)}){_data_folder_hint(root)}")
        raise OsteoError(f"data folder {_display(str(root))} does not exist; give the folder that holds the "
                         f"class sub-folders ({', '.join(CLASSES)})")
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise OsteoError(f"cannot list the data folder {_display(str(root))}: {e.strerror}; check its permissions") from None
    classes = [e for e in entries if e.name.lower() in CLASSES and _is_dir(e)]
    if not classes:
        others = [f"{_display(e.name)}/" for e in entries if not e.name.startswith(".") and _is_dir(e)]
        found = f" (it has {', '.join(others[:5])}{' ...' if len(others) > 5 else ''})" if others else ""
        raise OsteoError(f"no class folders ({', '.join(CLASSES)}) in {_display(str(root))}{found}; put each image "
                         f"under {_display(str(root))}/<class>/, or rename the folders to the classes")
    out = _Listing()
    for e in entries:
        if e in classes:
            _walk_class(e, out, [os.path.realpath(c.path) for c in classes if c is not e])
        elif _is_dir(e) and not e.is_symlink() and not _is_temporary(e.name):
            before = len(out.ignored)
            _walk_ignored(e.path, e.name, out)
            images = sum(_is_image_name(p) for p in out.ignored[before:])
            if images and not e.name.startswith("."):  # a class the study does not have, e.g. severe/
                out.folders.append({"path": _display(e.name + "/"), "images": images})
        else:
            out.ignored.append(_display(e.name + ("/" if _is_dir(e) else "")))
    out.candidates.sort()
    out.ignored.sort()
    return out


def _walk_ignored(path: str, rel: str, out: _Listing) -> None:
    """Everything under a folder outside the class folders, listed as ignored (links not followed)."""
    stack = [(path, rel)]
    while stack:
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            out.ignored.append(_display(rel + "/"))
            continue
        for e in entries:
            r = f"{rel}/{e.name}"
            if e.is_dir(follow_symlinks=False) and not _is_temporary(e.name):
                stack.append((e.path, r))
            else:
                out.ignored.append(_display(r + ("/" if _is_dir(e) else "")))


def _walk_class(top: os.DirEntry, out: _Listing, others: Sequence[str] = ()) -> None:
    """Every file under a class folder: candidates and ignored ones; linked folders
    followed unless that would walk a folder twice, or walk another class's images (the
    real paths ``others``) under this class's label."""
    label = top.name.lower()
    try:
        st = os.stat(top.path)
    except OSError as e:
        out.unlistable.append(Record(top.name + "/", label, "unreadable", f"cannot list folder: {e.strerror}"))
        return
    real_top = os.path.realpath(top.path)
    if top.is_symlink():
        out.links.append({"path": _display(top.name), "target": _display(real_top), "class_folder": True,
                          "followed": True, "reason": ""})
    visited = {(st.st_dev, st.st_ino)}
    stack = [(top.path, top.name, frozenset(visited))]
    while stack:
        path, rel, above = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.unlistable.append(Record(_display(rel + "/"), label, "unreadable", f"cannot list folder: {e.strerror}"))
            continue
        folders = []
        for e in entries:
            r = f"{rel}/{e.name}"
            if _is_temporary(e.name) or not_data(e.name, folder=_is_dir(e)):  # not walked, not read
                out.ignored.append(_display(r + ("/" if _is_dir(e) else "")))
            elif _is_dir(e):
                try:
                    s = os.stat(e.path)
                except OSError as err:
                    out.unlistable.append(Record(_display(r + "/"), label, "unreadable",
                                                 f"cannot list folder: {err.strerror}"))
                    continue
                key = (s.st_dev, s.st_ino)
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    why = ""
                    other = next((o for o in others if inside(target, o) or inside(o, target)), None)
                    if key in above or inside(real_top, target):
                        why = "a loop: it links to a folder that holds this class folder"
                    elif key in visited:
                        why = "its target was already audited through another path"
                    elif inside(target, real_top):
                        why = "its target is inside the class folder, audited at its own path"
                    elif other is not None:
                        why = (f"its target holds another class's images ({_display(os.path.basename(other))}/), "
                               "audited there under their own label")
                    out.links.append({"path": _display(r), "target": _display(target), "class_folder": False,
                                      "followed": not why, "reason": why})
                    if why:
                        continue
                visited.add(key)
                folders.append((e.path, r, above | {key}))
            elif not _is_image_name(e.name) and not _dicom_by_content(e):
                out.ignored.append(_display(r))
            else:  # regular or not: the decoder checks, without opening anything else
                out.candidates.append((r, label))
        stack.extend(reversed(folders))


def _is_image_name(path: str) -> bool:
    """Whether a file is an image candidate by its name (the bytes decide its format later)."""
    name = path.rsplit("/", 1)[-1]
    return not not_data(name, folder=False) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _dicom_by_content(e: os.DirEntry) -> bool:
    """A regular file whose name has no image extension (``IM0001``, or a DICOM UID such as
    ``1.2.840.113619.2.55.3.604688119.969``, as PACS exports name them) and whose bytes say
    DICOM ("DICM" after the 128-byte preamble, or a data set without one: ``decode.bare_dicom``).
    Not ``DICOMDIR``, a media index with no image."""
    ext = os.path.splitext(e.name)[1].lower()
    if e.name.upper() == "DICOMDIR" or not_data(e.name, folder=False) or ext in OTHER_IMAGE_EXTENSIONS:
        return False
    try:
        if not e.is_file():  # links followed; a named pipe or device is not opened
            return False
        with open(e.path, "rb") as f:
            return sniff_format(f.read(132)) == "dicom"
    except OSError:
        return False


def _data_folder_hint(path: Path) -> str:
    """``; e.g. DIR`` for the nearest folder above ``path`` with class sub-folders, if any."""
    for folder in path.absolute().parents:
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            if any(e.name.lower() in CLASSES and _is_dir(e) for e in it):
                return f", e.g. {_display(str(folder))}"
    return ""



# --------------------------------------------------------------------------- features


def feature_box(width: int, height: int) -> int:
    """The integer box filter applied before the features: the reduced image keeps at
    least FEATURE_SIDE pixels across (so the detail image is resampled from twice its
    resolution or more), and a large image is hashed and reduced without a float copy."""
    return max(1, min(width, height) // FEATURE_SIDE)


def _feature_memory(width: int, height: int) -> int:
    """Bytes that hashing and reducing a width x height image takes on top of its pixels:
    two strips, the box-reduced float32 image and its copy in Pillow, the small ones."""
    k = feature_box(width, height)
    return 2 * STRIP_BYTES + 8 * -(-width // k) * -(-height // k) + (1 << 20)


def _reduced_features(reduced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised 16x16 thumbnail, band-pass detail tiles as int8: 16 KB at 128 px) of an
    image from its box-reduced float32 pixels: area averages (Pillow's BOX filter) to
    16 x 16 and to the detail side."""
    from PIL import Image

    img = Image.fromarray(reduced)
    thumb = np.asarray(img.resize((16, 16), Image.Resampling.BOX), dtype=np.float32)
    side = _detail_side(*reduced.shape)
    small = np.asarray(img.resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    tiles = _tiles(_band_pass(small))
    # int8 per tile: a quarter of float32's memory, tile correlations within 0.004
    peak = np.maximum(np.abs(tiles).max(axis=1, keepdims=True), 1e-6)
    return _normalise(thumb.reshape(1, -1))[0], np.round(tiles * (127 / peak)).astype(np.int8)


def _hash_and_features(gray: Gray) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    return _pixel_hash(gray), _gray_features(gray)


def _pixel_hash(gray: Gray) -> str:
    """sha256 of the decoded pixels as the decoder gave them, with their conversion to
    float and their shape, hashed strip by strip. (Not of their float32 copy: 4x the bytes
    to hash, for the same equality.)"""
    px = gray.pixels
    h, w = px.shape
    sha = hashlib.sha256(f"{gray.kind} {gray.lo!r} {gray.hi!r} {px.dtype.str} {h}x{w}".encode())
    rows = max(1, STRIP_BYTES // (px.itemsize * w))
    for start in range(0, h, rows):
        sha.update(np.ascontiguousarray(px[start : start + rows]))
    return sha.hexdigest()


def _gray_features(gray: Gray) -> tuple[np.ndarray, np.ndarray]:
    """The features from :meth:`Gray.box_mean` by :func:`feature_box` (kept on ``gray``:
    the image cache often reduces by the same box)."""
    h, w = gray.pixels.shape
    return _reduced_features(gray.box_mean(feature_box(w, h)))


def _detail_side(height: int, width: int) -> int:
    """DETAIL_SIDE, halved while the image has less resolution than that (down to 64;
    smaller images are upsampled). Sides a power of two apart let a mixed-size pair
    compare at the coarser side by an exact block average."""
    side = DETAIL_SIDE
    while side > 64 and side > min(height, width):
        side //= 2
    return side


def _band_pass(small: np.ndarray) -> np.ndarray:
    """Difference of Gaussians with sigmas fixed as fractions of the side, so images of
    different sizes keep the same band: the finer sigma drops pixel noise and
    resampling loss, the coarser one the anatomy's shading. scipy's gaussian_filter
    (reflected edges) as products with its matrices: 4x faster on a 128 px image."""
    stacked, fine, coarse = _band_matrices(small.shape[0])
    y = stacked @ small
    n = small.shape[0]
    return y[:n] @ fine.T - y[n:] @ coarse.T


@functools.lru_cache(maxsize=4)
def _band_matrices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fine over coarse, fine, coarse): the n x n matrices of scipy's 1-D Gaussian filters
    of DETAIL_BAND (column j is the filter of the j-th unit vector)."""
    from scipy import ndimage

    fine, coarse = (ndimage.gaussian_filter1d(np.eye(n), f * n, axis=0).astype(np.float32) for f in DETAIL_BAND)
    stacked = np.concatenate([fine, coarse])
    for m in (stacked, fine, coarse):
        m.flags.writeable = False
    return stacked, fine, coarse


def _tiles(detail: np.ndarray) -> np.ndarray:
    """DETAIL_GRID x DETAIL_GRID tiles, one per row, each centred and scaled to unit rms;
    a tile without texture (rms under FLAT grey levels, or under FLAT_SHARE of the image's
    median tile rms) is all zeros. The relative floor, under the median, never makes more
    than half an image's tiles flat."""
    g, t = DETAIL_GRID, detail.shape[0] // DETAIL_GRID
    tiles = detail.reshape(g, t, g, t).transpose(0, 2, 1, 3).reshape(g * g, t * t)
    tiles = tiles - tiles.mean(axis=1, keepdims=True)
    rms = np.sqrt(np.mean(tiles**2, axis=1, keepdims=True))
    floor = max(FLAT, FLAT_SHARE * float(np.median(rms)))
    return np.where(rms > floor, tiles / np.maximum(rms, FLAT), 0).astype(np.float32)


def _detail_scores(details: list[np.ndarray], a: int, bs: np.ndarray) -> np.ndarray:
    """For each partner b of image a: the (DETAIL_OUTLIERS + 1)-th lowest correlation of
    their corresponding tiles, at the coarser of the two sides (the detail both have).
    Partners go in batches so that thousands of look-alikes stay fast."""
    scores = np.empty(len(bs), np.float32)
    sizes = np.array([details[b].shape[1] for b in bs])
    for size in np.unique(sizes):
        n = min(math.isqrt(details[a].shape[1]), math.isqrt(int(size)))
        ours = _tiles_at(details[a], n)
        ks = np.flatnonzero(sizes == size)
        for chunk in np.array_split(ks, -(-len(ks) // 256)):
            theirs = _tiles_at(np.stack([details[b] for b in bs[chunk]]), n)
            sq_theirs, sq_ours = np.einsum("mgt,mgt->mg", theirs, theirs), np.einsum("gt,gt->g", ours, ours)
            corr = np.einsum("mgt,gt->mg", theirs, ours) / np.sqrt(np.maximum(sq_theirs * sq_ours, 1e-24))
            corr[(sq_theirs == 0) & (sq_ours == 0)] = 1  # flat in both images agrees, in one only not
            scores[chunk] = np.partition(corr, DETAIL_OUTLIERS, axis=1)[:, DETAIL_OUTLIERS]
    return scores


def _tiles_at(tiles: np.ndarray, n: int) -> np.ndarray:
    """float32 tiles of n x n from tiles (..., tiles, t*t) of a side that n divides: a block
    average inside each tile, the same as tiling the coarser band-pass image."""
    t = math.isqrt(tiles.shape[-1])
    out = tiles.astype(np.float32)
    if t == n:
        return out
    lead, f = out.shape[:-1], t // n
    return out.reshape(*lead, n, f, n, f).mean(axis=(-3, -1)).reshape(*lead, n * n)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def audit_scale(width: int, height: int) -> int:
    """The DCT scale the audit decodes a JPEG at: the coarsest that keeps DETAIL_SIDE pixels
    across, all the near-duplicate features need (a JPEG's pixel hash is of these pixels)."""
    return dct_scale(width, height, DETAIL_SIDE)


def _inspect(root: Path, rel: str, label: str, budget: MemoryBudget, cache=None) -> Record:
    rec = Record(path=_display(rel), label=label)
    if rec.path != rel:
        rec.status, rec.reason = "unreadable", NOT_UTF8
        return rec
    key = None  # set once the bytes are read: from there on the outcome depends on them alone
    try:
        with open_regular(root / rel) as f:
            width, height, need = decode_cost(f)
            with budget.take(need + _feature_memory(width, height)):
                st = os.fstat(f.fileno())
                data = read_all(f)
                key = stat_key(st) if settled(st, RACY_S) else None
                rec.bytes = len(data)
                rec.sha256 = hashlib.sha256(data).hexdigest()
                gray = decode_gray(data, audit_scale)
                info = gray.info
                rec.format, rec.width, rec.height = info.format, info.width, info.height
                rec.bit_depth, rec.frames, rec.patient_id = info.bit_depth, info.frames, info.patient_id
                rec.transparent = info.transparent
                rec.pixel_sha256, rec.features = _hash_and_features(gray)
                rec.blank = gray.one_value()
                if cache is not None:  # the same decode feeds the image cache: each file is decoded once
                    cache.store(rec.sha256, data, gray)
        rec.stat_key = key
    except DecodeError as e:  # remembered when the decoder refused the bytes read (not an open or read error)
        rec.status, rec.reason, rec.stat_key = "unreadable", str(e), key
    except MemoryError:
        rec.status, rec.reason = "unreadable", "out of memory while decoding it; downscale it"
    except OsteoError:  # the image cache cannot be written: the user's to fix, not the file's
        raise
    except Exception as e:  # a decoder bug must not stop the audit
        rec.status, rec.reason = "unreadable", unexpected_failure(e)
    if rec.status != "ok":
        rec.features = None
    return rec


# --------------------------------------------------------------------------- remembered records

# the fields of a record a memo keeps (path and label come from the listing)
_MEMO_FIELDS = ("status", "reason", "format", "width", "height", "bit_depth", "frames", "bytes", "sha256",
                "pixel_sha256", "patient_id", "blank", "transparent")


class _Memo:
    """The remembered records of one data folder (see "Remembered records" above)."""

    def __init__(self, memo_root: str | os.PathLike, root: Path):
        self.root = os.path.realpath(root)
        name = hashlib.sha256(self.root.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = Path(memo_root) / f"audit-v{MEMO_VERSION}" / f"{name}.npz"
        self.records: dict[str, tuple[tuple, dict, tuple | None]] = {}  # path: (stat key, fields, features)
        self.groups: list[dict] | None = None  # the duplicate groups found among those records
        self.dups: dict[str, tuple[str, str, bool]] = {}  # path: (dup_group, dup_kind, conflict)
        self.recalled: set[str] = set()  # the paths whose records were taken back
        self._tiles_intact: Callable[[], bool] = lambda: True  # the tiles' CRC check, run once

    def load(self) -> _Memo:
        """Read the memo; an unreadable, damaged or outdated one is as none (every file is read)."""
        import json

        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("version") != _memo_version() or meta.get("root") != self.root:
                    return self
                thumbs = z["thumbs"]
            # 16 KB an image: read only where a search needs them, and checked then (tiles_intact)
            tiles, intact = _mapped(self.path, "tiles")
            self._tiles_intact = functools.cache(intact)
            at = 0
            for r in meta["records"]:
                features = None
                if r["status"] == "ok":
                    rows, cols = r["tiles"]
                    features = (thumbs[r["thumb"]], tiles[at : at + rows * cols].reshape(rows, cols))
                    at += rows * cols
                self.records[r["path"]] = (tuple(r["stat"]), {k: r[k] for k in _MEMO_FIELDS}, features)
            self.groups = meta.get("groups")
            self.dups = {p: tuple(d) for p, d in meta.get("dups", {}).items()}
        except FileNotFoundError:
            pass
        except Exception as e:  # a damaged memo costs one full audit, nothing else
            log.debug("audit memo %s not used: %s", self.path, e)
            self.forget()
        return self

    def unchanged(self, records: list[Record]) -> bool:
        """``records`` are those remembered: the same files, all with their remembered stat
        (a readable file that was read again, or is new, makes it False)."""
        keep = [r for r in records if r.stat_key is not None]
        if any(r.status == "ok" and r.stat_key is None for r in records) or len(keep) != len(self.records):
            return False
        return all(self.records.get(r.path, (None,))[0] == r.stat_key for r in keep)

    def tiles_intact(self) -> bool:
        """Whether the remembered detail tiles are as written (their CRC-32; read once)."""
        return self._tiles_intact()

    def forget(self) -> None:
        """As if no memo had been read: the next :meth:`save` writes one whole."""
        self.records.clear()
        self.groups, self.dups = None, {}
        self.recalled.clear()

    def recall_groups(self, records: list[Record]) -> list[dict] | None:
        """The duplicate groups of ``records`` as remembered, when they are the records remembered
        (the groups depend on every image of the folder); else None."""
        if self.groups is None or not self.unchanged(records):
            return None
        for r in records:
            if r.path in self.dups:
                r.dup_group, r.dup_kind, r.conflict = self.dups[r.path]
        return self.groups

    def recall(self, root: Path, rel: str, label: str) -> Record | None:
        """The remembered record of ``rel`` when its file's stat is still the one remembered."""
        hit = self.records.get(rel)
        if hit is None:
            return None
        try:
            st = os.stat(root / rel)
        except OSError:
            return None
        key, fields, features = hit
        if stat_key(st) != key:
            return None
        self.recalled.add(rel)
        return Record(path=rel, label=label, **fields, features=features, stat_key=key)

    def save(self, records: list[Record], groups: list[dict]) -> None:
        """Remember ``records`` (those with a stat key) and their duplicate ``groups``, unless they
        are what was loaded. A memo that cannot be written is skipped: it only saves time."""
        import json

        from osteo.files import atomic_path

        if self.groups is not None and self.unchanged(records):
            return
        keep = [r for r in records if r.stat_key is not None]
        metas, thumbs, tiles = [], [], []
        for r in keep:
            m = {"path": r.path, "stat": list(r.stat_key), **{k: getattr(r, k) for k in _MEMO_FIELDS}}
            if r.status == "ok":
                m["thumb"], m["tiles"] = len(thumbs), list(r.features[1].shape)
                thumbs.append(r.features[0])
                tiles.append(r.features[1].ravel())
            metas.append(m)
        # the groups only where every readable file is remembered: they are recalled only then
        whole = not any(r.status == "ok" and r.stat_key is None for r in records)
        dups = {r.path: [r.dup_group, r.dup_kind, r.conflict] for r in keep if r.dup_group}
        meta = json.dumps({"version": _memo_version(), "root": self.root, "records": metas,
                           **({"groups": groups, "dups": dups} if whole else {})})
        try:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                np.savez(f, meta=np.frombuffer(meta.encode(), np.uint8),
                         thumbs=np.stack(thumbs).astype(np.float32) if thumbs else np.zeros((0, 0), np.float32),
                         tiles=np.concatenate(tiles) if tiles else np.zeros(0, np.int8))
        except (OSError, OsteoError) as e:
            log.debug("audit memo %s not written: %s", self.path, e)


def _mapped(path: Path, name: str) -> tuple[np.ndarray, Callable[[], bool]]:
    """The array ``name`` of the .npz file at ``path`` (stored uncompressed, as ``np.savez``
    writes it) as a read-only memory map, whose pages are read when they are used, and a check
    of the member's CRC-32 (which reads them all)."""
    import zipfile
    import zlib

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field follow
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"no local header for {name}")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if not math.prod(shape):
        return np.zeros(shape, dtype), lambda: True
    member = np.memmap(path, np.uint8, "r", start, (info.file_size,))

    def intact() -> bool:
        crc = 0
        for at in range(0, len(member), 1 << 24):
            crc = zlib.crc32(member[at : at + (1 << 24)], crc)
        return crc == info.CRC

    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C"), intact


@functools.lru_cache(maxsize=1)
def _memo_version() -> str:
    """What a remembered record depends on: this module's and the decoders' code (a DICOM file's
    pixels are :func:`osteo.export_predict.dicom_gray`'s), Pillow's,
    pydicom's (and its decoder plugins') and NumPy's versions."""
    from osteo import export_predict
    from osteo.data import decode

    return code_version(f"{MEMO_VERSION}", (__file__, decode.__file__, export_predict.__file__),  # the last: DICOM
                        ("pillow", "pydicom", "numpy", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                         "pylibjpeg-rle", "python-gdcm"))  # pydicom's decoders: a new one reads what was refused


# --------------------------------------------------------------------------- duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _pca_basis(x: np.ndarray, k: int) -> np.ndarray:
    """(d, k) orthonormal columns: the top principal directions of the rows of x. Any
    orthonormal columns give a valid (never lengthening) projection; principal ones
    keep the most of the distances."""
    d = x.shape[1]
    if d <= k:
        return np.eye(d, dtype=np.float32)
    if len(x) < 2 * k:  # too few to estimate
        return np.eye(d, k, dtype=np.float32)
    if len(x) > 4096:
        x = x[np.random.default_rng(0).choice(len(x), 4096, replace=False)]
    x = x.astype(np.float64) - x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return np.ascontiguousarray(vecs[:, ::-1][:, :k], dtype=np.float32)


def _unit_tiles(tiles: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles (m, t*t) at n x n, each scaled to unit length, and whether it is flat (all
    zeros)). With the flag as one more coordinate, the dot product of two tiles is the
    tile correlation of :func:`_detail_scores` (flat-flat 1, flat-textured 0)."""
    if len(tiles) == 0:
        return np.zeros((0, n * n), np.float32), np.zeros(0, bool)
    x = _tiles_at(tiles, n)
    norm = np.sqrt(np.einsum("mt,mt->m", x, x))
    flat = norm == 0
    x /= np.where(flat, 1, norm)[:, None]
    return x, flat


def _close_pairs(a: np.ndarray, b: np.ndarray | None, radius: float, count: bool = False):
    """Pairs of points within ``radius``: within ``a`` (b None; i < j) or across a and b,
    as (m, 2) local indices; or, with count, only how many."""
    from scipy.spatial import cKDTree

    ta = cKDTree(a)
    tb = ta if b is None else cKDTree(b)
    if count:
        c = int(ta.count_neighbors(tb, radius))
        return (c - ta.n) // 2 if b is None else c
    if b is None:
        return ta.query_pairs(radius, output_type="ndarray").astype(np.int64).reshape(-1, 2)
    m = ta.sparse_distance_matrix(tb, radius, output_type="ndarray")
    return np.stack([m["i"], m["j"]], axis=1).astype(np.int64).reshape(-1, 2)


def _candidate_pairs(thumbs: np.ndarray, details: list[np.ndarray]) -> np.ndarray:
    """(m, 2) pairs (a < b, sorted): a superset of the pairs that pass both near-duplicate
    checks, found with k-d trees instead of comparing every pair (see the module doc)."""
    n = len(details)
    grain = np.array([math.isqrt(d.shape[1]) for d in details])  # tile side: 16 at 128 px, 8 at 64
    levels = sorted(set(grain.tolist()), reverse=True)
    found = [np.empty((0, 2), np.int64)]
    for i, gi in enumerate(levels):
        for gj in levels[i:]:  # a pair compares at the coarser of its two tile sides
            a = np.flatnonzero(grain == gi)
            b = None if gi == gj else np.flatnonzero(grain == gj)
            local = _pairs_at(thumbs, details, a, b, gj)
            found.append(np.stack([a[local[:, 0]], (a if b is None else b)[local[:, 1]]], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def _pairs_at(thumbs: np.ndarray, details: list[np.ndarray], a: np.ndarray, b: np.ndarray | None,
              grain: int) -> np.ndarray:
    """Candidate pairs within ``a`` (b None) or between ``a`` and ``b`` (tiles compared at
    grain x grain), as (m, 2) local indices (into a, into b or a)."""
    groups = [a] if b is None else [a, b]
    total = len(a) * (len(a) - 1) // 2 if b is None else len(a) * len(b)
    if total <= INDEX_MIN_PAIRS:  # few: all of them
        if b is None:
            return np.argwhere(np.triu(np.ones((len(a), len(a)), bool), 1))
        return np.argwhere(np.ones((len(a), len(b)), bool))
    rng = np.random.default_rng(0)

    def sample(sizes: list[int]) -> list[np.ndarray]:
        return [np.sort(rng.choice(m, min(m, INDEX_SAMPLE), replace=False)) for m in sizes]

    def close(points: list[np.ndarray], radius: float) -> np.ndarray:
        return _close_pairs(points[0], points[1] if b is not None else None, radius)

    def estimate(points: list[np.ndarray], radius: float, sampled: bool = False) -> float:
        """Pairs within the radius, estimated from a sample: only to choose where to look.
        ``points`` are of the whole sets, or of their sample (``picks``) when sampled."""
        sizes = [len(g) for g in groups] if sampled else [len(p) for p in points]
        sub = points if sampled else [p[s] for p, s in zip(points, sample(sizes))]
        if b is None:
            m, full = len(sub[0]), sizes[0]
            scale = full * (full - 1) / max(1, m * (m - 1))
        else:
            scale = sizes[0] * sizes[1] / max(1, len(sub[0]) * len(sub[1]))
        return _close_pairs(sub[0], sub[1] if b is not None else None, radius, count=True) * scale

    # thumbnails at unit length; a zero one (a flat image) correlates with nothing
    live = [np.flatnonzero(np.linalg.norm(thumbs[g], axis=1) > 0) for g in groups]
    units = [thumbs[g[k]] / np.linalg.norm(thumbs[g[k]], axis=1, keepdims=True) for g, k in zip(groups, live)]
    basis = _pca_basis(np.concatenate([u[s] for u, s in zip(units, sample([len(u) for u in units]))]), INDEX_DIMS)
    thumb_points = [u @ basis for u in units]
    thumb_radius = math.sqrt(2 * (1 - THUMB_CORR) + INDEX_SLACK)
    # detail tiles, per position, projected; the flat flag kept as its own coordinate
    stacks = [np.stack([details[i] for i in g]) for g in groups]  # (members, positions, t*t) each
    picked = [st[s] for st, s in zip(stacks, sample([len(g) for g in groups]))]
    textured = [x[~flat] for p in range(DETAIL_GRID**2) for x, flat in
                (_unit_tiles(st[:, p], grain) for st in picked)]
    basis = _pca_basis(np.concatenate(textured), INDEX_DIMS)

    def tile_points(p: int, members: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate([x @ basis, flat[:, None].astype(np.float32)], axis=1)
                for x, flat in (_unit_tiles(st[:, p], grain) for st in members)]

    radius = math.sqrt(2 * (1 - DETAIL_CORR) + INDEX_SLACK)
    counts = np.array([estimate(tile_points(p, picked), radius, sampled=True) for p in range(DETAIL_GRID**2)])
    # a pair that passes agrees at all but DETAIL_OUTLIERS of any set of positions: take
    # the rarest INDEX_POSITIONS, and keep the pairs close at enough of them
    use = np.argsort(counts, kind="stable")[: min(DETAIL_GRID**2, INDEX_POSITIONS)]
    if min(len(k) for k in live) == 0 or estimate(thumb_points, thumb_radius) <= counts[use].sum():
        if min(len(k) for k in live) == 0:
            return np.empty((0, 2), np.int64)
        q = close(thumb_points, thumb_radius)
        return np.stack([live[0][q[:, 0]], live[-1][q[:, 1]]], axis=1)
    width = len(groups[-1])
    keys = []
    for p in use:
        q = close(tile_points(int(p), stacks), radius)
        keys.append(q[:, 0] * width + q[:, 1])
    keys, hits = np.unique(np.concatenate(keys), return_counts=True)
    keys = keys[hits >= len(use) - DETAIL_OUTLIERS]
    return np.stack([keys // width, keys % width], axis=1)


def _find_duplicates(ok: list[Record]) -> list[dict]:
    n = len(ok)
    uf = _UnionFind(n)
    by_hash: dict[str, int] = {}
    for i, r in enumerate(ok):
        for key in (r.sha256, "px" + r.pixel_sha256):
            if key in by_hash:
                uf.union(by_hash[key], i)
            else:
                by_hash[key] = i
    if n > 1:
        thumbs = np.stack([r.features[0] for r in ok])
        details = [r.features[1] for r in ok]
        pairs = _candidate_pairs(thumbs, details)
        keep = np.zeros(len(pairs), bool)
        for s in range(0, len(pairs), 1 << 16):  # chunks keep the gathered thumbnails small
            p = pairs[s : s + (1 << 16)]
            keep[s : s + len(p)] = np.einsum("ij,ij->i", thumbs[p[:, 0]], thumbs[p[:, 1]]) >= THUMB_CORR
        pairs = pairs[keep]
        starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]) if len(pairs) else []
        for s, e in zip(starts, [*starts[1:], len(pairs)]):
            a, bs = int(pairs[s, 0]), pairs[s:e, 1]
            bs = bs[[uf.find(int(b)) != uf.find(a) for b in bs]]  # joined already: nothing to learn
            if len(bs):
                for b in bs[_detail_scores(details, a, bs) >= DETAIL_CORR]:
                    uf.union(a, int(b))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    groups = []
    for idx in sorted((m for m in members.values() if len(m) > 1), key=lambda m: ok[m[0]].path):
        exact = len({ok[i].pixel_sha256 for i in idx}) == 1
        labels = sorted({ok[i].label for i in idx}, key=CLASSES.index)
        gid = f"g{len(groups) + 1:04d}"
        kind = "exact" if exact else "near"
        for i in idx:
            ok[i].dup_group, ok[i].dup_kind, ok[i].conflict = gid, kind, len(labels) > 1
        groups.append({"id": gid, "kind": kind, "paths": sorted(ok[i].path for i in idx),
                       "labels": labels, "conflict": len(labels) > 1})
    return groups


def audit(data_dir: str | os.PathLike, progress: Callable[[int, int], None] | None = None,
          workers: int | None = None, cache=None, memo: str | os.PathLike | None = None,
          recall: bool = True, keep_features: bool = False) -> Audit:
    """Decode every candidate file, find unreadable ones and duplicate groups.

    ``cache``: an :class:`osteo.data.pipeline.ImageCache` to fill from the same decodes
    (a training run's setup): every readable file gets its entry, unless it has a good one.
    ``memo``: the folder (the image cache's root) where the records are remembered for the
    next audit of this folder; with ``recall``, a file whose stat is unchanged since then is
    not read again (see "Remembered records"). ``osteo data audit`` reads every file
    (``recall=False``) and leaves its records for the next run. ``keep_features``: the records
    keep their near-duplicate features (for :func:`near_copies`).
    """
    from threadpoolctl import threadpool_limits

    root = Path(data_dir)
    listing = _list(root)
    candidates = listing.candidates
    records: list[Record] = list(listing.unlistable)
    budget = MemoryBudget(DECODE_MEMORY)
    # POSIX only: Windows' st_ctime is the file's creation time, which a rewrite leaves as it was
    memory = _Memo(memo, root) if memo is not None and os.name == "posix" else None
    if memory is not None and recall:
        memory.load()

    def one(rel: str, label: str) -> Record:
        rec = memory.recall(root, rel, label) if memory is not None else None
        return rec if rec is not None else _inspect(root, rel, label, budget, cache)

    # BLAS on one thread: the audit's matrices are small and its own threads use every
    # core; OpenBLAS's threads spinning for them made the duplicate search 4x slower
    with threadpool_limits(1, user_api="blas"):
        pool = ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 1))
        try:
            for k, rec in enumerate(pool.map(lambda c: one(*c), candidates), 1):
                records.append(rec)
                if progress is not None:
                    progress(k, len(candidates))
        except BaseException as e:  # drop the files not started; Ctrl-C returns at once (running ones
            # end within a decode), an error (an unwritable cache) waits for them to clean up
            pool.shutdown(wait=not isinstance(e, KeyboardInterrupt), cancel_futures=True)
            raise
        pool.shutdown()
        records.sort(key=lambda r: r.path)
        groups = memory.recall_groups(records) if memory is not None and recall else None
        if memory is not None and memory.recalled and (groups is None or keep_features) and not memory.tiles_intact():
            # the remembered features are about to be used, and the memo's bytes changed on the disk
            log.debug("audit memo %s damaged: its files are read again", memory.path)
            records = [_inspect(root, r.path, r.label, budget, cache) if r.path in memory.recalled else r
                       for r in records]
            memory.forget()
            groups = None
        if groups is None:
            groups = _find_duplicates([r for r in records if r.status == "ok"])
    if memory is not None:
        memory.save(records, groups)
    for r in records if not keep_features else ():
        r.features = None
    ok = [r for r in records if r.status == "ok"]
    return Audit(str(root), records, listing.ignored, groups, listing.links, listing.folders,
                 _warn(_folder_warnings(root, listing.folders) + _format_warnings(listing.ignored)
                       + _patient_warnings(ok) + _size_warnings(ok) + _frame_warnings(ok) + _blank_warnings(ok)
                       + _transparent_warnings(ok)))


def near_copies(ours: list[Record], theirs: list[Record]) -> list[bool]:
    """For each of ``ours``: is it an exact or near duplicate (the audit's rule) of one of
    ``theirs``? Records with their features (``audit(..., keep_features=True)``); neither list
    is changed."""
    from dataclasses import replace

    # fresh group fields: a group id left from either folder's own audit would join unrelated images
    both = [replace(r, dup_group="", dup_kind="", conflict=False) for r in [*ours, *theirs]]
    _find_duplicates(both)
    # a group holding one of theirs: its members are their copies
    copied = {r.dup_group for r in both[len(ours):] if r.dup_group}
    return [bool(r.dup_group) and r.dup_group in copied for r in both[: len(ours)]]


def patient_summary(ok: list[Record]) -> dict:
    """Patients of the DICOM files (by PatientID): how many, images per patient, those
    whose images are filed under different classes, and the files without a PatientID.
    No NaN: statistics of no patients are null, with the reason."""
    dicom = [r for r in ok if r.format == "dicom"]
    by: dict[str, list[Record]] = {}
    for r in dicom:
        if r.patient_id:
            by.setdefault(r.patient_id, []).append(r)
    counts = sorted(len(v) for v in by.values())
    out: dict = {"dicom_files": len(dicom), "patients": len(by),
                 "files_without_patient_id": sum(not r.patient_id for r in dicom)}
    if counts:
        out["images_per_patient"] = {"min": counts[0], "median": float(np.median(counts)), "max": counts[-1]}
    else:
        out["images_per_patient"] = None
        out["images_per_patient_reason"] = "no DICOM file has a PatientID" if dicom else "no DICOM files"
    out["mixed_labels"] = [
        {"patient_id": p, "labels": sorted({r.label for r in v}, key=CLASSES.index), "paths": sorted(r.path for r in v)}
        for p, v in sorted(by.items()) if len({r.label for r in v}) > 1
    ]
    return out


def _patient_warnings(ok: list[Record]) -> list[str]:
    info = patient_summary(ok)
    out = []
    if info["patients"] and info["files_without_patient_id"]:
        out.append(f"{info['files_without_patient_id']} DICOM file(s) have no PatientID: each counts as a patient of "
                   "its own in the split; give them their PatientID, or group them with --group-regex or --groups")
    if info["mixed_labels"]:
        shown = some_of([f"{m['patient_id']}: {', '.join(m['labels'])}" for m in info["mixed_labels"]], 3, "; ")
        out.append(f"{len(info['mixed_labels'])} patient(s) have images under different classes ({shown}): "
                   "check the labels (audit.json lists the files); a training run keeps each patient's images on one "
                   "side of every split")
    return out


# an image this small, or this elongated, is no radiograph of a knee (a 1 x 1 PNG, a 10000 x 20 strip)
ODD_SIDE, ODD_ASPECT = 8, 8


def _size_warnings(ok: list[Record]) -> list[str]:
    odd = [r for r in ok if r.width and r.height and (min(r.width, r.height) < ODD_SIDE
                                                      or max(r.width, r.height) > ODD_ASPECT * min(r.width, r.height))]
    if not odd:
        return []
    shown = ", ".join(f"{r.path} ({r.width} x {r.height})" for r in odd[:3]) + (" ..." if len(odd) > 3 else "")
    return [f"{len(odd)} image(s) are under {ODD_SIDE} px on a side or over {ODD_ASPECT}x as long as wide, unlike a "
            f"radiograph: {shown}; each is resized and trained on all the same: check them, or move them out"]


def _blank_warnings(ok: list[Record]) -> list[str]:
    """Images of one gray level carry no picture of a knee, and a 16-bit one decodes to black: said."""
    blank = [r.path for r in ok if r.blank]
    if not blank:
        return []
    return [f"{len(blank)} image(s) are blank, every pixel one gray level (a failed export, a placeholder?): "
            f"{some_of(blank, 3)}; each is trained on all the same and teaches nothing of its class: check them, "
            "or move them out (audit.json lists them under \"blank\")"]


def _transparent_warnings(ok: list[Record]) -> list[str]:
    """Transparency is dropped, each pixel read by its colour as Keras' loaders read it; a viewer
    shows such pixels over its background, which may not be what was trained on: said."""
    clear = [r.path for r in ok if r.transparent]
    if not clear:
        return []
    return [f"{len(clear)} image(s) have transparent pixels: {some_of(clear, 3)}; each is read by its colours with "
            "the transparency dropped, as Keras' loaders read it, which may not be what a viewer shows: flatten them "
            "onto the background you mean (e.g. convert IN -background black -alpha remove OUT.png), or check them "
            "(audit.json lists them under \"transparent\")"]


def _frame_warnings(ok: list[Record]) -> list[str]:
    """A multi-frame DICOM or multi-page TIFF is trained on by its first frame alone: said."""
    many = [r for r in ok if r.frames > 1]
    if not many:
        return []
    shown = ", ".join(f"{r.path} ({r.frames} frames)" for r in many[:3]) + (" ..." if len(many) > 3 else "")
    return [f"{len(many)} file(s) hold several frames (DICOM frames, TIFF pages) and only the first of each is used: "
            f"{shown}; save each frame as a file of its own to use the others"]


def _format_warnings(ignored: list[str]) -> list[str]:
    """Images in a class folder that osteo cannot read (a GIF, a WebP) are left out: said, with the fix."""
    counts: dict[str, int] = {}
    for path in ignored:
        ext = os.path.splitext(path)[1].lower()
        if "/" in path and path.split("/", 1)[0].lower() in CLASSES and ext in OTHER_IMAGE_EXTENSIONS:
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return []
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return [f"{sum(counts.values())} file(s) in the class folders are images in a format osteo does not read "
            f"({kinds}) and are left out; convert them to PNG (or DICOM) to include them"]


def _folder_warnings(root: Path, folders: list[dict]) -> list[str]:
    if not folders:
        return []
    named = ", ".join(f"{f['path']} ({f['images']} image{'s' if f['images'] != 1 else ''})" for f in folders)
    return [f"ignoring {named} in {_display(str(root))}: not a class folder ({', '.join(CLASSES)}); rename "
            "it to one of them, or move it out of the data folder"]


def _warn(lines: list[str]) -> list[str]:
    """Log each line as a warning (the CLI prints them as ``osteo: warning:`` lines); return them."""
    for line in lines:
        log.warning("%s", line)
    return lines


# what osteo's manifest.csv and audit.json hold, by which an earlier audit's are told from a user's files
AUDIT_MARKS = {"manifest.csv": MANIFEST_COLUMNS[:3], "audit.json": "n_files"}


def write_audit(result: Audit, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``manifest.csv`` and ``audit.json`` to ``out``; return both paths."""
    out = Path(out)
    manifest, report = out / "manifest.csv", out / "audit.json"
    for path in (manifest, report):  # a killed audit's temporaries and kept copies
        sweep_temporaries(out, pattern=temporaries_of(path))
    with all_or_none([manifest, report]):  # never one folder's manifest beside another's audit
        write_csv(manifest, result.manifest_rows(), MANIFEST_COLUMNS)
        write_json(report, result.to_json())
    return manifest, report
