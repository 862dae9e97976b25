"""The tf.data input pipeline and its persistent on-disk cache of resized images.

Output convention: images float32, shape (size, size, 1), values in [0, 255] (gray;
the model tiles to 3 channels and applies its backbone's own preprocessing);
labels int32 class indices. No augmentation here: it runs inside the model, in
training only.

1. :class:`ImageCache` decodes every file once per (content, size, resize mode):
   PNG and JPEG are decoded in parallel inside a tf.data graph (JPEGs at a reduced
   DCT scale, ``jpeg_ratio``, when the target allows), every other format through
   the Python decoder (:mod:`osteo.data.decode`). Images are shrunk by an integer
   box filter (``box_factor``, which anti-aliases) and then resized bilinearly,
   padded to keep the aspect ratio (``pad``, default) or stretched (``stretch``).
   Each result is stored under ``$OSTEO_CACHE/<size>-<mode>-v2/<sha256[:2]>/<sha256>.entry``
   as a header of :data:`HEADER_BYTES` (JSON padded with spaces: the sha256 of the
   bytes decoded for it, which is also its key, size, resize mode, dtype, shape, and
   the length and CRC-32 of the payload) followed by the serialized uint16 tensor.
   The cache is keyed by content, so every run, model and fold on the same data
   shares it, and a changed file is decoded again. :meth:`ImageCache.fill` checks
   every entry it is given before training and rebuilds a damaged one (truncated,
   corrupted, or made from other bytes) with one warning; a file whose bytes no
   longer match the audit's hash is not cached but returned with the undecodable
   ones, for the caller to skip. Entries are written to ``tmp/`` (named
   ``<host>.<pid>.<random>.tmp``) and renamed, so two runs may fill one cache at
   once; opening a cache removes the temporaries of writers that died.
2. :func:`make_dataset` reads the cached tensors in parallel. Evaluation keeps the
   given order. Training holds the whole split in memory as uint16 after the first
   pass and serves every later epoch from there, shuffled by a stateless
   permutation seeded by ``(seed, epoch)``: epoch ``e`` is the same whether the run
   started at epoch 0 or resumed at ``e``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError as ProtoDecodeError
from tensorflow.core.framework import types_pb2
from tensorflow.core.framework.tensor_pb2 import TensorProto

from osteo.data.decode import DecodeError, decode_bytes
from osteo.errors import OsteoError

RESIZE_MODES = ("pad", "stretch")
SCALE = 257.0  # [0, 255] float <-> [0, 65535] uint16
CACHE_VERSION = "v2"
HEADER_BYTES = 512  # fixed, so the tf.data graph skips it with one substr
MISSING = "missing"
TMP_MAX_AGE_S = 3600.0
AUTOTUNE = tf.data.AUTOTUNE
log = logging.getLogger("osteo")


def default_cache_root() -> Path:
    return Path(os.environ.get("OSTEO_CACHE") or Path.home() / ".cache" / "osteo")


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


def box_factor(width: int, height: int, size: int, resize: str = "pad") -> int:
    """Integer box-filter factor that keeps the image at least ``size`` where it matters."""
    side = max(width, height) if resize == "pad" else min(width, height)
    return max(1, side // size)


def jpeg_ratio(width: int, height: int, size: int, resize: str = "pad") -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) whose output is still at least ``size``."""
    side = max(width, height) if resize == "pad" else min(width, height)
    for r in (8, 4, 2):
        if math.ceil(side / r) >= size:
            return r
    return 1


def resize_image(img: tf.Tensor, size: int, resize: str = "pad", box: int = 1) -> tf.Tensor:
    """(H, W, 1) float -> (size, size, 1) float32: box-filter by ``box``, then bilinear.

    Any aspect ratio works: the box never exceeds the shorter side, and the padded
    image keeps at least one pixel across (a 3 x 2,000 image at 16 px is one row).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}")
    img = tf.cast(img, tf.float32)
    if box > 1:
        # a box filter as reshape + mean: TF's avg_pool2d on one channel cost 7.7 ms
        # of CPU per 512 px image here, this 0.3 ms
        shape = tf.shape(img)
        box = tf.minimum(box, tf.minimum(shape[0], shape[1]))  # a side of box pixels or fewer ends as one
        h, w = shape[0] // box, shape[1] // box
        img = img[: h * box, : w * box]
        img = tf.reduce_mean(tf.reshape(img, tf.stack([h, box, w, box, shape[2]])), axis=[1, 3])
    if resize == "pad":
        out = _resize_with_pad(img, size)
    else:
        out = tf.image.resize(img, (size, size), method="bilinear")
    return tf.clip_by_value(out, 0.0, 255.0)


def _resize_with_pad(img: tf.Tensor, size: int) -> tf.Tensor:
    """``tf.image.resize_with_pad(img, size, size)`` (the same arithmetic, so the same
    values), except that a side it would floor to 0 pixels keeps 1: TensorFlow's fails
    on a very thin image."""
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    ratio = tf.reduce_max(shape / float(size))
    scaled = shape / ratio
    resized = tf.maximum(tf.cast(tf.floor(scaled), tf.int32), 1)
    offset = tf.maximum(tf.cast(tf.floor((float(size) - scaled) / 2), tf.int32), 0)
    out = tf.image.resize(img, resized, method="bilinear")
    return tf.image.pad_to_bounding_box(out, offset[0], offset[1], size, size)


def _encode(img: tf.Tensor) -> tf.Tensor:
    return tf.io.serialize_tensor(tf.cast(tf.round(img * SCALE), tf.uint16))


def _sha256_hex(raw: bytes) -> bytes:
    return hashlib.sha256(raw).hexdigest().encode()


def _writer_gone(name: str) -> bool:
    """Whether the temporary ``name`` (``<host>.<pid>.<random>.tmp``) was left by a dead
    process of this host; another host's pids cannot be checked here."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        pass
    return False


class ImageCache:
    """Content-keyed, verified cache of images resized to ``size`` (see the module docstring)."""

    def __init__(self, size: int, resize: str = "pad", root: str | os.PathLike | None = None):
        if resize not in RESIZE_MODES:
            raise OsteoError(f"unknown resize mode {resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        self.size, self.resize = int(size), resize
        self.dir = Path(root or default_cache_root()) / f"{self.size}-{resize}-{CACHE_VERSION}"
        self.tmp_dir = self.dir / "tmp"
        self._sweep()

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
        try:
            tensor = TensorProto.FromString(payload)
        except ProtoDecodeError:
            return "unparseable tensor"
        shape = [d.size for d in tensor.tensor_shape.dim]
        if (tensor.dtype != types_pb2.DT_UINT16 or shape != [self.size, self.size, 1]
                or len(tensor.tensor_content) != 2 * self.size * self.size):
            return f"not a uint16 tensor of shape {[self.size, self.size, 1]} (dtype {tensor.dtype}, shape {shape})"
        return None

    def missing(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries (one per content hash) that are not cached or whose entry is damaged."""
        return [e for e, why in self._checked(entries) if why]

    def load(self, sha256: str) -> np.ndarray:
        return (tf.cast(_read_cached(str(self.path(sha256)), self.size), tf.float32) / SCALE).numpy()

    def fill(self, entries: Sequence[Entry], progress: Callable[[int, int], None] | None = None) -> list[Entry]:
        """Cache every missing or damaged entry; return the entries that could not be decoded
        or whose file changed since the audit (their new bytes were never audited)."""
        checked = self._checked(entries)
        damaged = [(e, why) for e, why in checked if why and why != MISSING]
        if damaged:
            e, why = damaged[0]
            log.warning("rebuilding %d damaged image cache entr%s in %s (%s: %s)", len(damaged),
                        "y" if len(damaged) == 1 else "ies", self.dir, e.sha256[:12], why)
        todo = [e for e, why in checked if why]
        if not todo:
            return []
        try:
            for sub in {self.path(e.sha256).parent for e in todo} | {self.tmp_dir}:
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None
        done = 0
        failed: list[Entry] = []
        fast = [e for e in todo if e.format in ("png", "jpeg") and e.frames <= 1]
        is_fast = set(fast)  # membership in the list was quadratic: ~1 s of compares at 2,000 files
        fast_keys: dict[tuple[str, int, int], list[Entry]] = {}
        for e in fast:
            ratio = jpeg_ratio(e.width, e.height, self.size, self.resize) if e.format == "jpeg" else 1
            w, h = math.ceil(e.width / ratio), math.ceil(e.height / ratio)
            key = (e.format, ratio, box_factor(w, h, self.size, self.resize), e.bit_depth > 8)
            fast_keys.setdefault(key, []).append(e)
        retry: list[Entry] = []
        for (fmt, ratio, box, deep), group in sorted(fast_keys.items()):
            written, changed = self._fill_graph(group, fmt, ratio, box, deep)
            failed += changed
            retry += [e for e in group if e.sha256 not in written and e not in changed]
            done += len(group)
            if progress is not None:
                progress(done, len(todo))
        for e in retry + [e for e in todo if e not in is_fast]:
            try:
                data = Path(e.path).read_bytes()
                arr, info = decode_bytes(data)
            except (OSError, DecodeError):
                failed.append(e)
                continue
            if hashlib.sha256(data).hexdigest() != e.sha256:  # see _fill_graph
                failed.append(e)
                continue
            box = box_factor(info.width, info.height, self.size, self.resize)
            self._write(e.sha256, _encode(resize_image(tf.constant(arr), self.size, self.resize, box)).numpy())
            if e not in is_fast:
                done += 1
                if progress is not None:
                    progress(done, len(todo))
        return failed

    def _checked(self, entries: Sequence[Entry]) -> list[tuple[Entry, str | None]]:
        seen: set[str] = set()
        out = []
        for e in entries:
            if e.sha256 not in seen:
                seen.add(e.sha256)
                out.append((e, self.check(e.sha256)))
        return out

    def _meta(self, sha256: str) -> dict:
        """What the header of a good entry for ``sha256`` says, besides its payload's length and CRC."""
        return {"cache": CACHE_VERSION, "sha256": sha256, "size": self.size, "resize": self.resize,
                "dtype": "uint16", "shape": [self.size, self.size, 1]}

    def _write(self, sha256: str, payload: bytes) -> None:
        """Header + serialized tensor, written to a temporary and renamed: readers and a
        concurrent writer of the same entry only ever see complete entries. No fsync: an
        entry torn by a power cut fails :meth:`check` and is rebuilt."""
        meta = {**self._meta(sha256), "payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload)}
        header = json.dumps(meta, separators=(",", ":")).encode().ljust(HEADER_BYTES - 1) + b"\n"
        tmp = self.tmp_dir / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, self.path(sha256))
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

    def _fill_graph(self, group: list[Entry], fmt: str, ratio: int, box: int,
                    deep: bool) -> tuple[set[str], list[Entry]]:
        """Decode and resize one group in parallel in a tf.data graph and cache it; return
        (the hashes written, the entries whose file changed since the audit)."""
        size, resize = self.size, self.resize

        def work(path, sha):
            raw = tf.io.read_file(path)
            # the hash of the very bytes decoded: a file rewritten since the audit must not
            # have its new pixels cached (and trained on) under the audited hash
            got = tf.numpy_function(_sha256_hex, [raw], tf.string)
            if fmt == "jpeg":
                img = tf.io.decode_jpeg(raw, channels=1, ratio=ratio)
                img = tf.cast(img, tf.float32)
            elif deep:  # 16-bit PNG: keep the range, scale to [0, 255]
                img = tf.cast(tf.io.decode_png(raw, channels=1, dtype=tf.uint16), tf.float32) / SCALE
            else:
                img = tf.cast(tf.io.decode_png(raw, channels=1), tf.float32)
            return sha, got, _encode(resize_image(img, size, resize, box))

        ds = tf.data.Dataset.from_tensor_slices(([e.path for e in group], [e.sha256 for e in group]))
        # unreadable or undecodable files drop out here and get a second try in Python
        ds = ds.map(work, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
        of = {e.sha256: e for e in group}
        written: set[str] = set()
        changed: list[Entry] = []
        for sha, got, payload in ds.as_numpy_iterator():
            sha = sha.decode()
            if got.decode() != sha:
                changed.append(of[sha])
            else:
                self._write(sha, payload)
                written.add(sha)
        return written, changed


def _read_cached(path: tf.Tensor | str, size: int) -> tf.Tensor:
    # ImageCache.fill has checked the entry; the graph only skips its header
    img = tf.io.parse_tensor(tf.strings.substr(tf.io.read_file(path), HEADER_BYTES, -1), tf.uint16)
    return tf.ensure_shape(img, (size, size, 1))


def make_dataset(
    files: Sequence[str],
    labels: Sequence[int],
    size: int,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    start_epoch: int = 0,
) -> tf.data.Dataset:
    """Batches of (float32 (B, size, size, 1) in [0, 255], int32 (B,)) from cached tensors.

    ``training``: an endless stream of epochs, each a fresh seeded permutation of every
    image (the last batch of an epoch may be short), starting at ``start_epoch``.
    Otherwise one pass in the given order.
    """
    n = len(files)
    items = tf.data.Dataset.from_tensor_slices((list(files), np.asarray(labels, dtype=np.int32)))
    items = items.map(lambda f, y: (_read_cached(f, size), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    to_float = lambda x, y: (tf.cast(x, tf.float32) / SCALE, y)
    if not training:
        return items.batch(batch_size).map(to_float, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    def epochs(images, ys):
        def one_epoch(epoch):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int32), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
            return tf.data.Dataset.from_tensor_slices(perm).batch(batch_size).map(
                lambda idx: (tf.gather(images, idx), tf.gather(ys, idx)))

        return tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch)

    # the whole split, once, as uint16 in memory; every epoch is then a gather
    ds = items.batch(max(1, n)).flat_map(epochs)
    return ds.map(to_float, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
