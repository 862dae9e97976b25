"""Scan a data folder and audit it: ``osteo data audit DATA [--out DIR]``.

Layout: ``DATA/<class>/**/<image>``. Class folders match ``normal``, ``osteopenia``
and ``osteoporosis`` case-insensitively; images may sit at any depth below them.
Files with an image extension (any case) are decoded, and the bytes decide the
format; system files (``.DS_Store``, ``._*``, ``Thumbs.db``), other extensions and
files outside a class folder are listed as ``ignored``.

Duplicates:

- exact: identical bytes, or identical decoded pixels (the same image saved twice
  in different containers);
- near: a re-encoded or resized copy. Candidates are pairs whose 16x16 thumbnails
  correlate at >= 0.98; a candidate is confirmed when the fine detail agrees too
  (the 25th percentile, over 16 tiles, of the correlation of the high-pass images
  at 64x64 is >= 0.90). Two different knees share their anatomy at low resolution
  but not their trabecular texture, so they fail the second test.

A duplicate group whose members are filed under different classes is a
``conflict``: its label is unknowable from the data, and splits exclude it by
default.

Outputs: ``manifest.csv`` (one row per candidate image file, :data:`MANIFEST_COLUMNS`)
and ``audit.json`` (``data_dir``, ``classes``, ``n_files``, ``n_ok``, ``unreadable``,
``ignored``, ``duplicate_groups``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.data.decode import DecodeError, decode_bytes
from osteo.errors import OsteoError
from osteo.files import write_csv, write_json

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
MANIFEST_COLUMNS = (
    "path", "label", "status", "reason", "format", "width", "height", "bit_depth", "frames",
    "bytes", "sha256", "pixel_sha256", "dup_group", "dup_kind", "conflict",
)
THUMB_CORR = 0.98
DETAIL_CORR = 0.90


@dataclass
class Record:
    path: str  # relative to the data folder, POSIX separators
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
    features: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class Audit:
    data_dir: str
    records: list[Record]
    ignored: list[str]
    duplicate_groups: list[dict]

    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == "ok"]

    def to_json(self) -> dict:
        counts = {c: 0 for c in CLASSES}
        for r in self.ok():
            counts[r.label] += 1
        return {
            "data_dir": self.data_dir,
            "classes": counts,
            "n_files": len(self.records),
            "n_ok": len(self.ok()),
            "unreadable": [{"path": r.path, "reason": r.reason} for r in self.records if r.status != "ok"],
            "ignored": list(self.ignored),
            "duplicate_groups": self.duplicate_groups,
        }

    def manifest_rows(self) -> list[dict]:
        rows = []
        for r in self.records:
            row = {k: v for k, v in asdict(r).items() if k != "features"}
            row["conflict"] = "1" if r.conflict else "0"
            rows.append(row)
        return rows


def list_files(data_dir: str | os.PathLike) -> tuple[list[tuple[str, str]], list[str]]:
    """(candidate (relative path, label) pairs, ignored relative paths), both sorted."""
    root = Path(data_dir)
    if not root.is_dir():
        raise OsteoError(f"data folder {root} does not exist; set DATA= to a folder with class sub-folders "
                         f"({', '.join(CLASSES)})")
    candidates: list[tuple[str, str]] = []
    ignored: list[str] = []
    class_dirs = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in CLASSES:
            class_dirs[child] = child.name.lower()
    if not class_dirs:
        raise OsteoError(f"no class folders ({', '.join(CLASSES)}) in {root}; put each image under "
                         f"{root}/<class>/")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        top = root / rel_dir.parts[0] if rel_dir.parts else None
        label = class_dirs.get(top) if top is not None else None
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            ext = os.path.splitext(name)[1].lower()
            if (label is None or name.lower() in SYSTEM_FILES or name.startswith("._")
                    or ext not in IMAGE_EXTENSIONS):
                ignored.append(rel)
            else:
                candidates.append((rel, label))
    return sorted(candidates), sorted(ignored)


def _features(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised 16x16 thumbnail, 16 normalised 16x16 high-pass tiles at 64x64)."""
    from PIL import Image

    img = Image.fromarray(arr[..., 0].astype(np.float32), mode="F")
    small = np.asarray(img.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    thumb = small.reshape(16, 4, 16, 4).mean(axis=(1, 3))
    blur = np.repeat(np.repeat(thumb, 4, axis=0), 4, axis=1)
    detail = (small - blur).reshape(4, 16, 4, 16).transpose(0, 2, 1, 3).reshape(16, 256)
    return _normalise(thumb.reshape(1, -1))[0], _normalise(detail)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def _inspect(root: Path, rel: str, label: str) -> Record:
    rec = Record(path=rel, label=label)
    try:
        data = (root / rel).read_bytes()
    except OSError as e:
        rec.status, rec.reason = "unreadable", f"cannot read file: {e.strerror}"
        return rec
    rec.bytes = len(data)
    rec.sha256 = hashlib.sha256(data).hexdigest()
    try:
        arr, info = decode_bytes(data)
    except DecodeError as e:
        rec.status, rec.reason = "unreadable", str(e)
        return rec
    except Exception as e:  # a decoder bug must not stop the audit
        rec.status, rec.reason = "unreadable", f"decode failed: {type(e).__name__}"
        return rec
    rec.format, rec.width, rec.height = info.format, info.width, info.height
    rec.bit_depth, rec.frames = info.bit_depth, info.frames
    rec.pixel_sha256 = hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()
    rec.features = _features(arr)
    return rec


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


def _find_duplicates(ok: list[Record]) -> list[dict]:
    n = len(ok)
    uf = _UnionFind(n)
    near_edges = set()
    by_hash: dict[str, int] = {}
    for i, r in enumerate(ok):
        for key in (r.sha256, "px" + r.pixel_sha256):
            if key in by_hash:
                uf.union(by_hash[key], i)
            else:
                by_hash[key] = i
    if n > 1:
        thumbs = np.stack([r.features[0] for r in ok])
        for start in range(0, n, 1024):  # blocks keep memory flat on large folders
            corr = thumbs[start : start + 1024] @ thumbs.T
            rows, cols = np.nonzero(corr >= THUMB_CORR)
            for a, b in zip(rows + start, cols):
                if a >= b or uf.find(a) == uf.find(b):
                    continue
                tiles = np.sum(ok[a].features[1] * ok[b].features[1], axis=1)
                if np.percentile(tiles, 25) >= DETAIL_CORR:
                    uf.union(a, b)
                    near_edges.add((a, b))
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
          workers: int | None = None) -> Audit:
    """Decode every candidate file, find unreadable ones and duplicate groups."""
    root = Path(data_dir)
    candidates, ignored = list_files(root)
    records: list[Record] = []
    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(workers) as pool:
        for k, rec in enumerate(pool.map(lambda c: _inspect(root, *c), candidates), 1):
            records.append(rec)
            if progress is not None:
                progress(k, len(candidates))
    ok = [r for r in records if r.status == "ok"]
    groups = _find_duplicates(ok)
    for r in records:
        r.features = None
    return Audit(str(root), records, ignored, groups)


def write_audit(result: Audit, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``manifest.csv`` and ``audit.json`` to ``out``; return both paths."""
    out = Path(out)
    manifest, report = out / "manifest.csv", out / "audit.json"
    write_csv(manifest, result.manifest_rows(), MANIFEST_COLUMNS)
    write_json(report, result.to_json())
    return manifest, report
