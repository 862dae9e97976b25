"""The persistent on-disk cache of resized images (no TensorFlow: both backends read it).

Output convention: images float32, shape (size, size, 1), values in [0, 255] (gray;
the model tiles to 3 channels and applies its backbone's own preprocessing);
labels int32 class indices. No augmentation here: it runs inside the model, in
training only.

1. :class:`ImageCache` holds every image once per (content, size, resize mode),
   made by :func:`load_levels`, the one way osteo turns a file into a model input
   (``osteo predict`` calls it too, so a run's own images get back its probabilities):
   :func:`osteo.data.decode.decode_gray` (JPEGs at a reduced DCT scale,
   :func:`jpeg_ratio`, when the target allows), an integer box filter
   (:func:`box_factor`, which anti-aliases), then a bilinear resize (half-pixel
   centres, as ``tf.image.resize``), padded to keep the aspect ratio (``pad``,
   default) or stretched (``stretch``), quantised to 16-bit levels (x 257).
   A training run's audit fills the cache from its own decodes (:meth:`ImageCache.store`):
   each file of a new dataset is read and decoded once, on every core.
   Each result is stored under ``$OSTEO_CACHE/<size>-<mode>-v5/<sha256[:2]>/<sha256>.entry``
   as a header of :data:`HEADER_BYTES` (JSON padded with spaces: the sha256 of the
   bytes decoded for it, which is also its key, size, resize mode, dtype, shape, and
   the length and CRC-32 of the payload) followed by the serialized uint16 tensor.
   The cache is keyed by content, so every run, model and fold on the same data
   shares it, and a changed file is decoded again. :meth:`ImageCache.fill` checks
   every entry it is given before training (but those the audit just wrote or
   checked) and rebuilds a damaged one (truncated,
   corrupted, or made from other bytes) with one warning; a file whose bytes no
   longer match the audit's hash is not cached but returned with the undecodable
   ones, for the caller to skip. Entries are written to ``tmp/`` (named
   ``<host>.<pid>.<random>.tmp``) and renamed, so two runs may fill one cache at
   once; opening a cache removes the temporaries of writers that died.
2. The batches come from :mod:`osteo.data.tfdata` (tf.data, on TensorFlow) or
   :mod:`osteo.data.feed` (on PyTorch, without TensorFlow in the process), which read
   the entries' uint16 levels (:func:`read_levels`) and divide them by :data:`SCALE`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osteo.data.decode import (
    DECODE_MEMORY,
    DecodeError,
    Gray,
    MemoryBudget,
    decode_cost,
    decode_gray,
    open_regular,
    read_all,
)
from osteo.data.scan import audit_scale
from osteo.errors import OsteoError
from osteo.export_predict import SCALE, box_factor, not_data, resize_gray, to_levels  # noqa: F401  (the one copy)
from osteo.files import default_cache_root, pid_alive

RESIZE_MODES = ("pad", "stretch")
# v5: DICOM padding, INVERSE presentation LUTs, PALETTE COLOR and widthless windows read as viewers do;
# v4: 16-bit images stretched from their minimum to their maximum (v3: / 257), EXIF orientation
# applied; v3: made by
# load_levels (NumPy resize, one gray conversion); v2 by a tf.data graph
CACHE_VERSION = "v5"
# what each version changed, in words, for a run trained before it (predict, eval and a resume say it)
DECODING_CHANGES = {
    "v4": "images of more than 8 bits (non-DICOM) stretched from their own range, EXIF orientation applied",
    "v5": "DICOM padding left out of the stretch and black, an INVERSE presentation LUT inverted, PALETTE COLOR "
          "through its palette, a window of width under 1 not applied, 16-bit colour PNGs refused (their high bytes "
          "were read), hidden files and folders and system folders (@eaDir, __MACOSX) not read",
}
HEADER_BYTES = 512  # fixed, so the tf.data graph skips it with one substr
MISSING = "missing"
TMP_MAX_AGE_S = 3600.0
_DT_UINT16 = 17  # TensorFlow's DataType enum value for uint16 (types.proto)
log = logging.getLogger("osteo")


def _number(version: str) -> int:
    return int(version.lstrip("v") or 0)


def decoding_changes(was: str) -> str:
    """What changed in how files become pixels since osteo's image decoding ``was`` (v3, v4, ...)."""
    return "; ".join(text for version, text in DECODING_CHANGES.items() if _number(version) > _number(was))


def _v4_touches(row: dict) -> bool:
    """More than 8 bits outside DICOM, or an EXIF orientation (which a manifest does not record)."""
    return row.get("format") != "dicom"


def _v5_touches(row: dict) -> bool:
    """DICOM, any PNG (a 16-bit colour one, refused now, was recorded as 8-bit then: only its high
    bytes were read), or a hidden or system file."""
    parts = str(row.get("path", "")).split("/")
    return (row.get("format") in ("dicom", "png")
            or any(not_data(name, folder=i < len(parts) - 1) for i, name in enumerate(parts)))


# which images each change of DECODING_CHANGES can have made decode otherwise, by a manifest row
DECODING_TOUCHES = {"v4": _v4_touches, "v5": _v5_touches}


def decoding_touches(was: str, rows) -> bool:
    """Whether a change of osteo's image decoding since ``was`` can have touched any of ``rows``
    (a run's manifest: what it trained and was calibrated on); with no rows, unknown: True."""
    tests = [test for version, test in DECODING_TOUCHES.items() if _number(version) > _number(was)]
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    return not rows or any(test(r) for r in rows for test in tests)


def decodes_otherwise(was: str, old: dict, new) -> bool:
    """Whether an image decodes otherwise now than under osteo's image decoding ``was``: its
    decoded pixels' hash in the run's manifest (``old``) against the audit's now (``new``), which
    is exact; a manifest without one (older than the hash) by what v4 changed, more than 8 bits
    (non-DICOM) or a quarter turn."""
    if old.get("pixel_sha256") and new.pixel_sha256:
        return old["pixel_sha256"] != new.pixel_sha256
    return _number(was) < 4 and ((new.format != "dicom" and new.bit_depth > 8) or (
        new.width != new.height and (str(new.width), str(new.height)) == (old.get("height"), old.get("width"))))


@dataclass(frozen=True)
class Entry:
    """One image file to cache: absolute path, content hash and what the audit saw."""

    path: str
    sha256: str
    format: str
    width: int
    height: int
    frames: int = 1
    bit_depth: int = 8

    @classmethod
    def from_row(cls, root: str | os.PathLike, row) -> Entry:
        get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
        return cls(str(Path(root) / get("path")), get("sha256"), get("format"), int(get("width")),
                   int(get("height")), int(get("frames") or 1), int(get("bit_depth") or 8))


def jpeg_ratio(width: int, height: int, size: int, resize: str = "pad") -> int:
    """The DCT scale (1, 2, 4, 8) a JPEG is decoded at for ``size``: the largest whose output
    is still at least ``size``, and no coarser than the audit's (:func:`osteo.data.scan.audit_scale`),
    so that the audit's own decode serves the cache whenever the target allows."""
    side = max(width, height) if resize == "pad" else min(width, height)
    for r in (8, 4, 2):
        if math.ceil(side / r) >= size:
            return min(r, audit_scale(width, height))
    return 1


def load_levels(data: bytes, size: int, resize: str = "pad") -> tuple[np.ndarray, Gray]:
    """The bytes of an image file -> (its model input as uint16 levels (size, size, 1), the decoded
    image it came from): what the cache stores and ``osteo predict`` feeds. Raises DecodeError."""
    gray = decode_gray(data, functools.partial(jpeg_ratio, size=size, resize=resize))
    return to_levels(resize_gray(gray, size, resize)), gray


def _payload(levels: np.ndarray) -> bytes:
    """The serialized tensor: what ``tf.io.serialize_tensor`` writes for a uint16 array."""
    return _payload_head(levels.shape) + levels.astype("<u2", copy=False).tobytes()


@functools.lru_cache(maxsize=8)
def _payload_head(shape: tuple[int, ...]) -> bytes:
    """A serialized TensorProto's bytes up to its tensor_content (the same for every image of a
    shape), encoded here so the cache needs no TensorFlow: field 1 dtype, field 2 the shape
    (one Dim message, field 2, per dimension: its size, field 1), field 4 the content's length.
    ``tf.io.parse_tensor`` reads the result (tests/test_cache.py checks both ways)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    dims = b"".join(b"\x12" + varint(len(d)) + d for d in (b"\x08" + varint(n) for n in shape))
    return b"\x08" + varint(_DT_UINT16) + b"\x12" + varint(len(dims)) + dims + b"\x22" + varint(2 * math.prod(shape))


def read_levels(path: str | os.PathLike, size: int) -> np.ndarray:
    """A checked cache entry's image as uint16 levels (size, size, 1): the file's last bytes."""
    data = Path(path).read_bytes()
    return np.frombuffer(data, "<u2", count=size * size, offset=len(data) - 2 * size * size).reshape(size, size, 1)


def _writer_gone(name: str) -> bool:
    """Whether the temporary ``name`` (``<host>.<pid>.<random>.tmp``) was left by a dead
    process of this host; another host's pids cannot be checked here."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def load_split(files: Sequence[str], size: int) -> np.ndarray:
    """Every cached image of a split as one uint16 array (n, size, size, 1), read on two threads."""
    out = np.empty((len(files), size, size, 1), np.uint16)

    def read(i: int) -> None:
        out[i] = read_levels(files[i], size)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(read, range(len(files))))
    return out


_SAID_OLDER: set[Path] = set()  # caches whose older neighbours were named


class ImageCache:
    """Content-keyed, verified cache of images resized to ``size`` (see the module docstring)."""

    def __init__(self, size: int, resize: str = "pad", root: str | os.PathLike | None = None):
        if resize not in RESIZE_MODES:
            raise OsteoError(f"unknown resize mode {resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        self.size, self.resize = int(size), resize
        self.root = Path(root or default_cache_root())  # also where the audit remembers its records
        self.dir = self.root / f"{self.size}-{resize}-{CACHE_VERSION}"
        self.tmp_dir = self.dir / "tmp"
        self._stored: set[str] = set()  # entries store() wrote or checked, for the next fill not to read again
        self._damaged: dict[str, str] = {}  # entries store() found damaged and rebuilt: why
        self._made: set[Path] = set()  # folders known to exist
        if not self.dir.exists() and self.dir not in _SAID_OLDER:  # once a process, before its first entry
            _SAID_OLDER.add(self.dir)
            self._say_older()
        self._sweep()

    def _say_older(self) -> None:
        """This size's cache is begun (again) beside the entries of an older osteo's image decoding,
        which no reader opens any more: one warning line names them, for their space."""
        with contextlib.suppress(OSError):
            older = sorted(p.name for p in self.root.glob(f"{self.size}-{self.resize}-v*")
                           if re.fullmatch(r"v\d+", version := p.name.rsplit("-", 1)[1]) and p.is_dir()
                           and _number(version) < _number(CACHE_VERSION))
            if older:
                log.warning("image cache: building %s beside %s, an older osteo's image decoding, which nothing reads "
                            "any more; remove %s to free its space", self.dir, ", ".join(older),
                            " ".join(str(self.root / name) for name in older))

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.entry"

    def check(self, sha256: str) -> str | None:
        """None when the entry of ``sha256`` is good, else why not (:data:`MISSING`, or the damage)."""
        try:
            data = memoryview(self.path(sha256).read_bytes())
        except FileNotFoundError:
            return MISSING
        except OSError as e:
            return f"unreadable ({e.strerror})"
        try:
            meta = json.loads(bytes(data[:HEADER_BYTES]))
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            return "no header"
        for key, want in self._meta(sha256).items():
            if meta.get(key) != want:
                return f"its header has {key}={meta.get(key)!s:.16}, expected {want!s:.16}"
        payload = data[HEADER_BYTES:]
        if len(payload) != meta.get("payload_bytes"):
            return f"truncated ({len(payload)} of {meta.get('payload_bytes')} tensor bytes)"
        if zlib.crc32(payload) != meta.get("payload_crc32"):
            return "checksum mismatch"
        # the head encodes dtype, shape and the content's length: equal heads, equal tensors' layout
        head = _payload_head((self.size, self.size, 1))
        if bytes(payload[: len(head)]) != head or len(payload) != len(head) + 2 * self.size * self.size:
            return f"not a uint16 tensor of shape {[self.size, self.size, 1]}"
        return None

    def missing(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries (one per content hash) that are not cached or whose entry is damaged,
        each read and checked now."""
        return [e for e, why in self._checked(entries) if why]

    def load(self, sha256: str) -> np.ndarray:
        """The cached image of ``sha256`` as float32 (size, size, 1) in [0, 255]."""
        return read_levels(self.path(sha256), self.size).astype(np.float32) / np.float32(SCALE)

    def store(self, sha256: str, data: bytes, gray: Gray) -> None:
        """Cache ``gray``, the audit's decode of ``data`` (whose hash is ``sha256``), unless its
        entry is good. A JPEG the audit decoded at another DCT scale than :func:`jpeg_ratio`
        gives for this size is decoded again at that one, so the entry is :func:`load_levels`'."""
        if sha256 in self._stored:
            return
        why = self.check(sha256)
        if why is not None:
            if why != MISSING:
                self._damaged[sha256] = why
            info = gray.info
            if info.format == "jpeg" and gray.scale != jpeg_ratio(info.width, info.height, self.size, self.resize):
                self._write(sha256, load_levels(data, self.size, self.resize)[0])
            else:
                self._write(sha256, to_levels(resize_gray(gray, self.size, self.resize)))
        self._stored.add(sha256)

    def fill(self, entries: Sequence[Entry], progress: Callable[[int, int], None] | None = None,
             workers: int | None = None) -> list[Entry]:
        """Cache every missing or damaged entry (decoding on ``workers`` threads); return the
        entries that could not be decoded or whose file changed since the audit (their new
        bytes were never audited). The entries :meth:`store` handled since the last fill
        are not read again: the audit that fed this fill wrote or checked them a moment ago."""
        fresh, self._stored = self._stored, set()
        checked = self._checked(entries, fresh)
        damaged = [(e.sha256, why) for e, why in checked if why and why != MISSING]
        damaged += [(e.sha256, self._damaged.pop(e.sha256)) for e, _ in checked if e.sha256 in self._damaged]
        if damaged:
            sha, why = damaged[0]
            log.warning("rebuilding %d damaged image cache entr%s in %s (%s: %s)", len(damaged),
                        "y" if len(damaged) == 1 else "ies", self.dir, sha[:12], why)
        todo = [e for e, why in checked if why]
        if not todo:
            return []
        budget = MemoryBudget(DECODE_MEMORY)
        failed: list[Entry] = []
        pool = ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) + 1))
        try:
            for k, (e, ok) in enumerate(pool.map(lambda e: (e, self._fill_one(e, budget)), todo), 1):
                if not ok:
                    failed.append(e)
                if progress is not None:
                    progress(k, len(todo))
        except BaseException as e:  # Ctrl-C or an unwritable cache: drop the files not started
            # Ctrl-C returns at once; an error waits for the running writes to clean up their
            # temporaries, so the cache is as it was when the error is reported
            pool.shutdown(wait=not isinstance(e, KeyboardInterrupt), cancel_futures=True)
            raise
        pool.shutdown()
        return failed

    def _fill_one(self, e: Entry, budget: MemoryBudget) -> bool:
        """Decode and cache one file; False when it cannot be decoded or its bytes are no
        longer the audited ones (a file rewritten since must not have its new pixels
        cached, and trained on, under the audited hash)."""
        try:
            with open_regular(e.path) as f:
                _, _, need = decode_cost(f)
                with budget.take(need):
                    data = read_all(f)
                    if hashlib.sha256(data).hexdigest() != e.sha256:
                        return False
                    levels, _ = load_levels(data, self.size, self.resize)
        except (DecodeError, MemoryError):
            return False
        self._write(e.sha256, levels)
        return True

    def _checked(self, entries: Sequence[Entry], good: set[str] = frozenset()) -> list[tuple[Entry, str | None]]:
        seen: set[str] = set()
        out = []
        for e in entries:
            if e.sha256 not in seen:
                seen.add(e.sha256)
                out.append((e, None if e.sha256 in good else self.check(e.sha256)))
        return out

    def _meta(self, sha256: str) -> dict:
        """What the header of a good entry for ``sha256`` says, besides its payload's length and CRC."""
        return {"cache": CACHE_VERSION, "sha256": sha256, "size": self.size, "resize": self.resize,
                "dtype": "uint16", "shape": [self.size, self.size, 1]}

    def _write(self, sha256: str, levels: np.ndarray) -> None:
        """Header + serialized tensor, written to a temporary and renamed: readers and a
        concurrent writer of the same entry only ever see complete entries. No fsync: an
        entry torn by a power cut fails :meth:`check` and is rebuilt."""
        payload = _payload(levels)
        meta = {**self._meta(sha256), "payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload)}
        header = json.dumps(meta, separators=(",", ":")).encode().ljust(HEADER_BYTES - 1) + b"\n"
        path = self.path(sha256)
        tmp = self.tmp_dir / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            for folder in (self.tmp_dir, path.parent):
                if folder not in self._made:
                    folder.mkdir(parents=True, exist_ok=True)
                    self._made.add(folder)
            with open(tmp, "xb") as f:
                f.write(header + payload)  # one write call
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise self._unwritable(e) from None

    def _unwritable(self, e: OSError) -> OsteoError:
        fix = ("free some space there or set OSTEO_CACHE to a folder with free space" if e.errno == errno.ENOSPC
               else "set OSTEO_CACHE to a writable folder")
        return OsteoError(f"cannot write the image cache in {self.dir}: {e.strerror or e}; {fix}")

    def _sweep(self) -> None:
        """Remove the temporaries of killed writers: this host's whose process is gone, and
        anyone's older than TMP_MAX_AGE_S (a live writer renames its own within milliseconds)."""
        try:
            names = os.listdir(self.tmp_dir)
        except OSError:  # no cache yet
            return
        now = time.time()
        for name in names:
            path = self.tmp_dir / name
            with contextlib.suppress(OSError):  # renamed meanwhile, or a read-only cache
                if _writer_gone(name) or now - path.stat().st_mtime > TMP_MAX_AGE_S:
                    path.unlink()
