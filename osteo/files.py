"""Atomic writers: every file osteo writes for users goes through here.

A file is written to a temporary sibling and renamed over the target, so a reader
(or a process killed half-way) only ever sees the old complete file or the new one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from osteo import killpoints
from osteo.errors import OsteoError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    For writers that insist on a file name (Keras checkpoints, matplotlib). The
    temporary keeps the target's suffix (or ``suffix``, for Keras' ``.weights.h5``)
    because some of them pick a format by it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix or path.suffix}", dir=path.parent)
    except OSError as e:
        raise OsteoError(
            f"cannot write to {path.parent}: {e.strerror}; choose a writable output directory"
        ) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; users expect their umask
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        killpoints.reached("files.before_replace")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def process_start() -> float:
    """When this process started (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


def sweep_temporaries(folder: str | os.PathLike, grace: float = 60.0) -> list[Path]:
    """Remove osteo's temporaries (``.*.tmp*``) in ``folder`` left by processes that died.

    Only entries last touched ``grace`` seconds before this process started are
    removed, so a temporary that a live process is still writing is kept.
    """
    import shutil

    cutoff = process_start() - grace
    removed = []
    for p in Path(folder).glob(".*.tmp*"):
        try:
            if p.lstat().st_mtime < cutoff:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        killpoints.reached("files.written")
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
) -> None:
    """Write dict rows as CSV with a fixed column order (``\\n`` line ends, stable bytes)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    write_text(path, buf.getvalue())


def open_text(path: str | os.PathLike, **kwargs):
    """``open(path)`` for reading, for regular files only: a FIFO or a device named like a run
    file must never block or flood a reader (it raises OSError, which callers report)."""
    import stat

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(0, "not a regular file", str(path))
    return open(path, encoding="utf-8", **kwargs)


def read_csv(path: str | os.PathLike, fix: str) -> list[dict]:
    """The rows of a CSV file osteo wrote; unreadable or damaged is a one-line error ending in ``fix``."""
    try:
        with open_text(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise OsteoError(f"cannot read {path}: {e.strerror}; {fix}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise OsteoError(f"{path} is damaged ({type(e).__name__}); {fix}") from None


def read_json(path: str | os.PathLike) -> Any:
    with open_text(path) as f:
        return json.load(f)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(round(v, 8))
    if hasattr(v, "item"):  # numpy scalars
        return _csv_value(v.item())
    return v


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
