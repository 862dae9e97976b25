"""Atomic writers: every file osteo writes for users goes through here.

A file is written to a temporary sibling and renamed over the target, so a reader
(or a process killed half-way) only ever sees the old complete file or the new one.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from osteo import killpoints
from osteo.errors import OsteoError
from osteo.export_predict import sha256_file, sha256_stream, some_of  # noqa: F401  (sha256_file: osteo's too)


def default_cache_root() -> Path:
    """Where osteo keeps what it can compute again (the image cache, the audit's memo, ported
    weights): ``$OSTEO_CACHE``, else ``~/.cache/osteo``."""
    return Path(os.environ.get("OSTEO_CACHE") or Path.home() / ".cache" / "osteo")


# a file whose ctime is this close before it was read is not remembered by its stat_key: a rewrite
# within the file system's timestamp granularity could leave its stat as it was
RACY_S = 3.0


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells a file from another, or from itself written since: device, inode, size,
    modification and status-change times (writing, replacing or re-permissioning a file changes
    the last, which no tool sets back)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def settled(st: os.stat_result, racy_s: float | None = None) -> bool:
    """Whether ``st`` may be remembered by its :func:`stat_key`: its last change is ``racy_s``
    (:data:`RACY_S`) old."""
    import time

    return st.st_ctime_ns < (time.time() - (RACY_S if racy_s is None else racy_s)) * 1e9


# sha256 of files this process has hashed, by their stat_key (file_sha256)
_HASHED: dict[tuple[int, ...], str] = {}
_HASHED_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """:func:`sha256_file` of a file this process reads but never writes (a weights file), hashed
    once while it stays the same file: a cross-validation's folds and the ported weights' cache
    ask again. The key and the hash are of one open file (not of two opens of a name another file
    took meanwhile); another file, this one written since (:func:`stat_key`), or one written
    under :data:`RACY_S` before it was read, is read again. Checkpoints are verified with
    :func:`sha256_file`, which reads them each time."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = stat_key(st)
        with _HASHED_LOCK:
            known = _HASHED.get(key)
        if known is None:
            known = sha256_stream(f)
            if settled(st):
                with _HASHED_LOCK:
                    _HASHED[key] = known
    return known


def code_version(tag: str, sources: Iterable[str | os.PathLike], packages: Iterable[str]) -> str:
    """What a result osteo keeps for later depends on besides its input: the sha256 of ``tag``,
    the bytes of the ``sources`` (osteo's modules that compute it) and the installed versions of
    ``packages`` (``name=none`` where one is not installed)."""
    from importlib import metadata

    sha = hashlib.sha256(tag.encode())
    for source in sources:
        sha.update(Path(source).read_bytes())
    for package in packages:
        try:
            sha.update(f"{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            sha.update(f"{package}=none".encode())
    return sha.hexdigest()


def cannot_write(folder: str | os.PathLike, e: OSError) -> OsteoError:
    """One line for a folder osteo cannot create or write in, with the fix its error calls for: a
    full disk (or one out of files, inodes) is not fixed by another writable folder on it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some disk space (or files, where it ran out of inodes), or choose an output folder on another disk"
    else:
        fix = "choose a writable output directory"
    return OsteoError(f"cannot write to {folder}: {e.strerror or e}; {fix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    For writers that insist on a file name (Keras checkpoints, matplotlib). The
    temporary keeps the target's suffix (or ``suffix``, for Keras' ``.weights.h5``)
    because some of them pick a format by it.
    """
    path = Path(path)
    check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=owned_prefix(f".{path.stem}."), suffix=f".tmp{suffix or path.suffix}",
                                   dir=path.parent)
    except OSError as e:
        raise cannot_write(path.parent, e) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; users expect their umask
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        killpoints.reached("files.before_replace")
        os.replace(tmp_path, path)
    except OSError as e:  # a write's error names no file, or the temporary (a full disk): name the target
        if e.filename and os.fsdecode(e.filename) != str(tmp_path):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_weights(model, path: str | os.PathLike, attrs: Mapping[str, str] | None = None) -> None:
    """``model.save_weights(path)`` that leaves no HDF5 file open when it fails.

    Keras closes its HDF5 store only on success: after an error mid-write (a full disk) the
    file stays open, and h5py flushes it again when it is collected at exit, which fails
    again and crashed the process (a segmentation fault after osteo's one-line error). The
    file is closed here, its own errors ignored: the first one is the one raised.

    A disk that fills up in the middle of HDF5's own writes can still leave h5py unable to
    close the file without a segmentation fault (a real full disk did, from a few to tens of
    KB short). So a disk without room for the file is named before HDF5 writes a byte
    (:func:`check_room`); the close above is for a disk that fills up meanwhile."""
    check_room(path, weights_file_bytes(model))
    try:
        model.save_weights(path)
        if attrs:
            import h5py

            with h5py.File(path, "a") as f:
                f.attrs.update(attrs)
    except BaseException:
        _close_hdf5(path)
        raise


def weights_file_bytes(model) -> int:
    """About the size of ``model.save_weights``' file: the model's variables and its optimizer's
    (Keras saves both), with HDF5's headers of at most about 2.5 KB a variable (measured: tiny,
    VGG16, DenseNet169 and ConvNeXtTiny, with and without Adam's) counted as 4 KiB."""
    import numpy as np

    optimizer = getattr(model, "optimizer", None)
    variables = [*model.weights, *(getattr(optimizer, "variables", None) or [])]
    data = sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in variables)
    return data + 4096 * len(variables) + 2**16


def check_room(path: str | os.PathLike, size: int) -> None:
    """Raise the error a write of ``size`` bytes to ``path`` would meet, naming ``path``, before a
    byte is written: EFBIG past this process's file-size limit (``ulimit -f``), ENOSPC where its
    file system has less than ``size`` bytes free for this user (one that cannot say is let be)."""
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else -1
    if resource and limit != resource.RLIM_INFINITY and size > limit:
        raise OSError(errno.EFBIG, f"File too large (about {_size(size)}, over the file-size limit of "
                                   f"{_size(limit)})", str(path))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if hasattr(os, "statvfs"):
            st = os.statvfs(folder)  # root may write into the blocks reserved for it
            total = st.f_blocks * st.f_frsize
            free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        else:  # Windows
            import shutil

            total, _, free = shutil.disk_usage(folder)
    except OSError:
        return
    if total == 0:  # ramfs, tmpfs of size 0, some FUSE file systems: no size to go by
        return
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device (about {_size(size)} needed, {_size(free)} free)",
                      str(path))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _close_hdf5(path: str | os.PathLike) -> None:
    import h5py

    target = os.path.abspath(path)
    for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            if fid.valid and os.path.abspath(os.fsdecode(fid.name)) == target:
                # as h5py.File.close: the objects in the file first, then the file
                fid._close_open_objects(h5py.h5f.OBJ_LOCAL | ~h5py.h5f.OBJ_FILE)
                fid._close_open_objects(h5py.h5f.OBJ_LOCAL | h5py.h5f.OBJ_FILE)
        except Exception:  # the disk is full: closing may fail too, and it is not the error
            pass


def check_output(path: str | os.PathLike) -> None:
    """``path`` may be written: it does not exist, or it is a regular file (or a link to one).

    The rename of an atomic write replaces whatever is at ``path``: as root, ``--out /dev/full``
    would have become a CSV file in place of the device. A folder, device, FIFO or socket
    there is refused in one line instead.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there (or a dangling link): creating the parent reports its own errors
    except OSError as e:
        raise OsteoError(f"cannot check the output path {path}: {e.strerror}; choose another output path") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise OsteoError(f"{path} exists and is {kind}; osteo replaces only files: choose another output path")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike | None = None,
                   then: Callable[[], None] | None = None) -> None:
    """Put folder ``new`` where ``target`` is: the old one is renamed aside (as a temporary in
    ``aside``, by default ``target``'s folder, so a kill leaves it for :func:`sweep_temporaries`),
    the new one renamed in, the old one removed. A reader sees the old folder or the new one,
    whole, never a mix of their files. ``then``: what must follow it (the files that cite the new
    folder); if it fails, the old folder is put back before the error goes on."""
    import secrets
    import shutil

    new, target = Path(new), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if os.path.lexists(target):
        old = Path(aside or target.parent) / f"{owned_prefix(f'.{target.name}.old-')}{secrets.token_hex(4)}.tmp"
        os.replace(target, old)
        with contextlib.suppress(OSError):  # touched now: a rename keeps the old time, which would read
            os.utime(old)  # as a temporary older than this process, its id another's (swept while in use)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)  # the previous folder back in its place
        raise
    if then is not None:
        try:
            then()
        except BaseException:
            # the new folder back where it came from (its caller removes it), the previous one in its place
            with contextlib.suppress(OSError):
                os.replace(target, new)
                if old is not None:
                    os.replace(old, target)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def all_or_none(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """The files at ``paths``, which the block rewrites with osteo's atomic writers (each renames a
    new file over the old one), all new when it ends, or all as they were if it fails: a command
    whose files quote each other (a calibration, the external validations measured at it, the
    model card that cites both) is not left half done by a full disk or a file it cannot replace.

    Each old file is kept beside it, named as its writer's temporaries (:func:`temporaries_of`,
    swept after a kill): as a hard link, put back by a rename, which needs no room (its times put
    back too), or, where links are refused (another user's file under ``protected_hardlinks``, a
    file system without links), as a copy. A file the block created is removed. A folder or device
    at a path is refused first, as its writer would refuse it. A file that cannot be put back is
    left beside its place and named in a warning. The command that calls this holds the folder's
    lock (:func:`folder_lock`), so that its failure puts back only what it replaced itself."""
    import logging
    import secrets
    import shutil

    kept: dict[Path, Path | None] = {}
    times: dict[Path, tuple[int, int]] = {}  # each kept file's own (touched below, put back with it)
    copied: set[Path] = set()
    try:
        for p in map(Path, paths):
            if p in kept:
                continue
            check_output(p)
            if not os.path.lexists(p):
                kept[p] = None  # removed if the block fails
                continue
            backup = p.parent / f"{owned_prefix(f'.{p.stem}.kept-')}{secrets.token_hex(4)}.tmp{p.suffix}"
            st = os.lstat(p)
            try:
                os.link(p, backup, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                    raise
                shutil.copy2(p, backup, follow_symlinks=False)
                copied.add(p)
            kept[p], times[p] = backup, (st.st_atime_ns, st.st_mtime_ns)
            # touched now: a sweep in the block must not read it as a dead process's temporary
            os.utime(backup, follow_symlinks=False)
        yield
    except BaseException:
        left = []
        for p, backup in kept.items():
            try:
                if backup is None:
                    if os.path.lexists(p):
                        os.unlink(p)
                    continue
                if p in copied and _same_bytes(backup, p):
                    continue  # not replaced: the file itself stays (its owner, its times), the copy goes
                os.replace(backup, p)  # (a rename onto another link of the same file changes nothing)
                os.utime(p, ns=times[p], follow_symlinks=False)
            except OSError:
                if backup is not None and os.path.lexists(backup) and not _same_bytes(backup, p):
                    left.append((p, backup))
        for p, backup in left:
            kept[p] = None  # kept for the user: the only copy of what p was
            logging.getLogger("osteo").warning("%s could not be put back; its previous version is %s", p, backup)
        raise
    finally:
        for backup in kept.values():
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.unlink(backup)


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether files ``a`` and ``b`` hold the same bytes (False where either cannot be read)."""
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def process_start() -> float:
    """When this process started (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


def sweep_temporaries(folder: str | os.PathLike, grace: float = 60.0, pattern: str = ".*.tmp*") -> list[Path]:
    """Remove osteo's temporaries (``pattern``) in ``folder`` left by processes that died.

    Only entries last touched ``grace`` seconds before this process started are
    removed, and none whose name says its writer (:func:`owned_prefix`) is a process
    still running: a live export waiting on a child for minutes touches nothing. In a
    folder that is not osteo's own (``predict --out``'s), ``pattern`` names one target's
    temporaries only (:func:`temporaries_of`).
    """
    import shutil

    cutoff = process_start() - grace
    removed = []
    for p in Path(folder).glob(pattern):
        try:
            touched = p.lstat().st_mtime
            if touched < cutoff and not _writer_alive(p.name, touched):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


_HELD = threading.local()  # the folders each thread holds osteo's lock on (folder_lock)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait: bool = True) -> Iterator[None]:
    """Hold osteo's lock on ``folder`` (an advisory ``flock`` of the folder itself: no file is
    left) while this command replaces ``what`` there. A second osteo command that replaces files
    there waits for the first, and says so in one line: two evals of one folder, or two exports
    of one target, once interleaved their renames (a record naming the other's model, or a
    missing folder). Without ``wait`` (a study, which runs for hours), it stops in one line.

    Re-entrant in one thread: a study holds its ``--out`` and its report then takes the same
    lock there (a second ``flock`` of the folder, on another descriptor, waited for the first
    forever)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the commands are not serialized there
        yield
        return
    folder = Path(folder)
    held = _HELD.__dict__.setdefault("folders", set())
    key = os.path.realpath(folder)
    if key in held:  # this thread holds it already (outside the try below: the body's errors are its own)
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise cannot_write(folder, e) from None
    import logging

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise OsteoError(f"another osteo command is writing in {folder}, where this one would write {what}; "
                                 "let it finish, or choose another --out") from None
            logging.getLogger("osteo").warning("waiting for another osteo command that writes in %s to finish "
                                               "before writing %s", folder, what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # NFS emulates flock with POSIX locks, which a folder opened to read cannot take
            logging.getLogger("osteo").warning("cannot lock %s (%s): another osteo command writing there at the "
                                               "same time is not waited for", folder, e.strerror or e)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def folder_locks(folders: Iterable[str | os.PathLike], what: str) -> Iterator[None]:
    """:func:`folder_lock` on each of ``folders``, each folder once, however it is named (a second
    lock of one folder by this process would wait on the first), in one order (two commands never
    hold one each)."""
    with contextlib.ExitStack() as stack:
        for folder in sorted({Path(os.path.realpath(f)) for f in folders}):
            stack.enter_context(folder_lock(folder, what))
        yield


def owned_prefix(prefix: str) -> str:
    """``prefix``, this process's id and its host: a temporary whose name starts so is kept by
    :func:`sweep_temporaries` while this process runs, however long ago it was touched (and, on
    a folder other hosts share, by theirs for :data:`OTHER_HOST_KEEP` seconds)."""
    return f"{prefix}{os.getpid()}@{host_tag()}-"


def host_tag() -> str:
    """This host's name as a temporary's name carries it: letters, digits and ``_``; a name of
    more than 32 such characters is cut to 23 and its hash (``worker-statefulset-0`` and ``-1``
    stay apart)."""
    import socket

    host = socket.gethostname()
    tag = re.sub(r"[^A-Za-z0-9]", "_", host) or "_"
    return tag if len(tag) <= 32 else f"{tag[:23]}_{hashlib.sha256(host.encode()).hexdigest()[:8]}"


# the writer in a temporary's name: owned_prefix's "<pid>@<host>-" (before the host: "<pid>-"),
# then the random part and ".tmp" (the phantom's staging folders once ended in "-<pid>-<random>")
_WRITER = re.compile(r"(?:^|[.-])(\d+)(?:@([A-Za-z0-9_]+))?-[A-Za-z0-9_]+(?:\.tmp|$)")
# a temporary another host's process names cannot be checked from here: kept a day after its last touch
OTHER_HOST_KEEP = 24 * 3600.0


def _writer_alive(name: str, touched: float) -> bool:
    """Whether the temporary ``name``, last touched at ``touched``, names a process that is running
    and began before that (not a later process given the same id). Another host's process cannot
    be asked: its temporary counts as alive for a day after it was last touched."""
    import time

    found = _WRITER.findall(name)
    if not found:
        return False
    pid, host = found[-1]
    if host and host != host_tag():
        return time.time() - touched < OTHER_HOST_KEEP
    return pid_alive(int(pid), started_by=touched)


def pid_alive(pid: int, started_by: float | None = None) -> bool:
    """Whether process ``pid`` runs on this host (this process does; so does one of another
    user's), and, given ``started_by`` (epoch seconds), began no later than that."""
    import psutil

    if pid == os.getpid():  # this process, or a killed one whose id it was given (process 1 in a container)
        return started_by is None or process_start() <= started_by + 2.0
    if os.name == "nt":  # there os.kill would end the process
        if not psutil.pid_exists(pid):
            return False
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # EPERM: alive, another user's
            pass
    if started_by is None:
        return True
    try:
        return psutil.Process(pid).create_time() <= started_by + 2.0  # /proc's start time is coarse
    except psutil.NoSuchProcess:
        return False  # gone since
    except psutil.Error:
        return True  # not ours to read: kept


def temporaries_of(path: str | os.PathLike) -> str:
    """The glob pattern of :func:`atomic_path`'s temporaries for ``path`` (for :func:`sweep_temporaries`)."""
    import glob

    return f".{glob.escape(Path(path).stem)}.*.tmp*"


def umask() -> int:
    """This process's umask (read without changing it for long)."""
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
    """``obj`` as strict JSON: a NaN or infinite number is written as null (a bare ``NaN`` is not
    JSON; the writer gives the reason beside it), numpy values as plain ones."""
    text = json.dumps(_strict(obj), indent=2, sort_keys=False, allow_nan=False)
    write_text(path, text + "\n")


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
    return open(path, **{"encoding": "utf-8", **kwargs})


def read_csv(path: str | os.PathLike, fix: str) -> list[dict]:
    """The rows of a CSV file osteo wrote (or a user's: a byte-order mark, as Excel writes, is
    read as none); unreadable or damaged is a one-line error ending in ``fix``."""
    try:
        with open_text(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise OsteoError(f"cannot read {path}: {e.strerror}; {fix}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise OsteoError(f"{path} is damaged ({type(e).__name__}); {fix}") from None


def read_json(path: str | os.PathLike) -> Any:
    with open_text(path) as f:
        return json.load(f)


def csv_float(v: float) -> float:
    """``v`` as osteo's CSV files keep it: 8 decimals, or 8 significant digits for a small value
    (a p of 2e-13 is not 0)."""
    return round(v, 8) if abs(v) >= 1e-3 or v == 0 else float(f"{v:.8g}")


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(csv_float(v))
    if hasattr(v, "item"):  # numpy scalars
        return _csv_value(v.item())
    return v


CONNECT_TIMEOUT_S = 10.0  # a server answers in milliseconds; the clients osteo calls retry for minutes


def unreachable(host: str | None, port: int, timeout: float = CONNECT_TIMEOUT_S, proxied: str = "") -> str | None:
    """Why nothing at ``host:port`` accepts a connection within ``timeout`` seconds (a short
    reason), or None where it does. A server reached through a proxy (``proxied``: the URL
    scheme, ``http`` or ``https``, whose proxy the environment names and does not bypass for
    ``host``) is not probed: the client reaches it through the proxy (None)."""
    import socket
    import urllib.request

    if proxied and urllib.request.getproxies().get(proxied) and not urllib.request.proxy_bypass(host or ""):
        return None
    try:
        socket.create_connection((str(host).strip("[]"), port), timeout=timeout).close()
    except (OSError, TypeError, ValueError) as e:  # TypeError: no host; ValueError: a port out of range
        return " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__
    return None


def written_by_osteo(path: str | os.PathLike, mark: str | tuple[str, ...]) -> bool:
    """Whether the file at ``path`` may be replaced as one osteo writes under its name: a JSON object
    that holds the key ``mark`` (a str), a CSV whose header begins with the columns ``mark`` (a
    tuple), or an empty file (``mktemp``'s: nothing to lose)."""
    try:
        if os.path.getsize(path) == 0:
            return True
        if isinstance(mark, str):
            data = read_json(path)
            return isinstance(data, dict) and mark in data
        with open_text(path, newline="", encoding="utf-8-sig") as f:
            return tuple(next(csv.reader(f), [])[:len(mark)]) == mark
    except (OSError, ValueError, csv.Error):  # unreadable, not JSON, not text: not osteo's
        return False


def refuse_foreign_files(folder: str | os.PathLike, marks: dict[str, str | tuple[str, ...]], option: str,
                         fix: str) -> None:
    """A one-line error where ``folder`` holds a file of ``marks``' names (a command's outputs)
    that is not osteo's by its content (:func:`written_by_osteo`): the command would replace it."""
    folder = Path(folder)
    foreign = [n for n, mark in marks.items()
               if os.path.lexists(folder / n) and not written_by_osteo(folder / n, mark)]
    if foreign:
        raise OsteoError(f"{option} {folder} holds {some_of(foreign, 3)}, which osteo did not write and would "
                         f"replace; {fix}")


class OwnedFolder:
    """A folder a command writes its files into, beside files that are not its own
    (``report --out``, ``predict --gradcam``).

    The files the command wrote there are listed in :attr:`LIST`; it may replace only
    those. Any other file it would replace or remove is someone else's, and the command
    stops with one line before touching anything. The list is written before the files,
    so a command killed half-way leaves its files listed.
    """

    LIST = ".osteo-files.json"

    def __init__(self, folder: str | os.PathLike, option: str):
        self.folder, self.option = Path(folder), option

    def owned(self) -> set[str]:
        """The files (relative paths) listed as written here by osteo."""
        path = self.folder / self.LIST
        if not os.path.lexists(path):
            return set()
        try:
            files = read_json(path)["files"]
            if not all(isinstance(f, str) for f in files):
                raise TypeError
            return set(files)
        except (OSError, ValueError, KeyError, TypeError):
            raise OsteoError(f"{path} is damaged: which files of {self.folder} osteo wrote is not known; remove "
                             f"the folder's files you want to keep, or choose another {self.option}") from None

    def check(self, writes: Iterable[str] = (), removes: Iterable[str] = ()) -> None:
        """A one-line error unless every file of ``writes`` that exists, and every one of ``removes``,
        is osteo's."""
        owned = self.owned()
        foreign = [n for n in writes if os.path.lexists(self.folder / n) and n not in owned]
        foreign += [n for n in removes if n not in owned]
        if foreign:
            raise OsteoError(f"{self.option} {self.folder} holds {some_of(foreign, 3)}, which osteo did not write and would "
                             f"replace or remove; move them elsewhere, or choose another {self.option}")

    def claim(self, writes: Iterable[str], removes: Iterable[str] = ()) -> None:
        """:meth:`check`, then list ``writes`` as osteo's (with the listed files still there)."""
        writes = list(writes)
        self.check(writes, removes)
        kept = {n for n in self.owned() if os.path.lexists(self.folder / n)}
        write_json(self.folder / self.LIST, {"files": sorted(kept | set(writes))})


def _strict(o: Any) -> Any:
    """``o`` with numpy values as Python ones, paths as text and non-finite numbers as None."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_strict(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, str | int | bool) or o is None:
        return o
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return _strict(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


