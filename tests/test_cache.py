"""The image cache checks its entries, reports OS errors in one line and sweeps its temporaries."""

import errno
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osteo.data.pipeline import (
    SCALE,
    TMP_MAX_AGE_S,
    Entry,
    ImageCache,
    load_levels,
)
from osteo.data.scan import audit
from osteo.data.tfdata import make_dataset
from osteo.errors import OsteoError


@pytest.fixture
def few(phantom_dir, tmp_path):
    """Entries of four phantom PNGs and a TIFF, copied into a private folder and audited."""
    root = tmp_path / "d"
    (root / "normal").mkdir(parents=True)
    for src in sorted(phantom_dir.rglob("*.png"))[:4]:
        shutil.copy(src, root / "normal" / src.name)
    Image.open(src).save(root / "normal" / "t.tif")
    return [Entry.from_row(root, r) for r in audit(root).ok()]


def _reference(e: Entry) -> np.ndarray:
    return load_levels(Path(e.path).read_bytes(), 32)[0].astype(np.float32) / np.float32(SCALE)


def _damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]


@pytest.mark.parametrize("keep", [0, 100, 600, -1], ids=["empty", "in-header", "in-tensor", "last-byte"])
def test_truncated_entry_is_rebuilt_with_one_warning(few, tmp_path, caplog, keep):
    entries = few
    cache = ImageCache(32, root=tmp_path / "c")
    assert cache.fill(entries) == []
    e = entries[1]
    good = cache.path(e.sha256).read_bytes()
    cache.path(e.sha256).write_bytes(good[:keep])
    assert cache.missing(entries) == [e]
    with caplog.at_level(logging.WARNING, logger="osteo"):
        assert ImageCache(32, root=tmp_path / "c").fill(entries) == []
    (msg,) = _damage_warnings(caplog)
    assert "\n" not in msg and e.sha256[:12] in msg
    assert cache.path(e.sha256).read_bytes() == good
    (x, _), = make_dataset([str(cache.path(e.sha256))], [0], size=32, batch_size=1)
    np.testing.assert_allclose(x[0].numpy(), _reference(e), atol=0.01)


def test_entry_of_another_image_copied_over_is_rebuilt(few, tmp_path, caplog):
    entries = few
    cache = ImageCache(32, root=tmp_path / "c")
    cache.fill(entries)
    a, b = entries[0], entries[1]
    shutil.copy(cache.path(b.sha256), cache.path(a.sha256))
    assert cache.check(a.sha256).startswith("its header has sha256=")
    with caplog.at_level(logging.WARNING, logger="osteo"):
        assert cache.fill(entries) == []
    assert len(_damage_warnings(caplog)) == 1
    assert cache.check(a.sha256) is None
    np.testing.assert_allclose(cache.load(a.sha256), _reference(a), atol=0.01)


def test_flipped_pixel_byte_is_caught_by_the_checksum(few, tmp_path):
    entries = few
    cache = ImageCache(32, root=tmp_path / "c")
    cache.fill(entries)
    path = cache.path(entries[0].sha256)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.check(entries[0].sha256) == "checksum mismatch"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_file_changed_after_the_audit_is_not_cached_under_its_old_hash(few, tmp_path, suffix):
    entries = few
    victim = next(e for e in entries if e.path.endswith(suffix))
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(victim.path)  # new pixels, same name
    cache = ImageCache(32, root=tmp_path / "c")
    assert cache.fill(entries) == [victim]
    assert cache.check(victim.sha256) == "missing"
    assert [e for e in entries if cache.check(e.sha256)] == [victim]
    assert list(cache.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_cache_is_one_line_with_the_fix(few, tmp_path, monkeypatch, code):
    # the tests run as root, where chmod does not stop writes: inject the OSError
    entries = few
    cache = ImageCache(32, root=tmp_path / "c")

    def fail(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OsteoError) as err:
        cache.fill(entries)
    msg = str(err.value)
    assert "\n" not in msg and str(cache.dir) in msg and "OSTEO_CACHE" in msg and os.strerror(code) in msg
    assert ("free some space" in msg) == (code == errno.ENOSPC)
    assert list(cache.tmp_dir.iterdir()) == []  # no partial file left behind
    assert all(cache.check(e.sha256) == "missing" for e in entries)


def test_cache_folder_that_cannot_be_made_is_one_line(few, tmp_path, monkeypatch):
    entries = few
    cache = ImageCache(32, root=tmp_path / "c")

    def fail(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(type(cache.dir), "mkdir", fail)
    with pytest.raises(OsteoError, match="OSTEO_CACHE") as err:
        cache.fill(entries)
    assert "\n" not in str(err.value)


def test_complete_cache_on_a_read_only_folder_is_usable(few, tmp_path, monkeypatch):
    entries = few
    ImageCache(32, root=tmp_path / "c").fill(entries)

    def fail(*args, **kwargs):
        raise AssertionError("nothing to write")

    monkeypatch.setattr(os, "replace", fail)
    assert ImageCache(32, root=tmp_path / "c").fill(entries) == []


def test_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    cache = ImageCache(32, root=tmp_path / "c")
    cache.tmp_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    names = {
        "dead": f"{host}.{dead.pid}.aa.tmp",
        "live": f"{host}.{os.getpid()}.bb.tmp",
        "live-but-old": f"{host}.{os.getpid()}.cc.tmp",
        "other-host": f"elsewhere.{dead.pid}.dd.tmp",
        "other-host-old": f"elsewhere.{dead.pid}.ee.tmp",
    }
    for name in names.values():
        (cache.tmp_dir / name).write_bytes(b"x")
    old = time.time() - TMP_MAX_AGE_S - 60
    for key in ("live-but-old", "other-host-old"):
        os.utime(cache.tmp_dir / names[key], (old, old))
    ImageCache(32, root=tmp_path / "c")
    assert sorted(p.name for p in cache.tmp_dir.iterdir()) == sorted([names["live"], names["other-host"]])


def test_two_fills_of_one_cache_at_once_write_identical_entries(few, tmp_path):
    entries = few
    ref = ImageCache(32, root=tmp_path / "ref")
    ref.fill(entries)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ImageCache(32, root=tmp_path / "c").fill(entries)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[], []]
    cache = ImageCache(32, root=tmp_path / "c")
    for e in entries:
        assert cache.path(e.sha256).read_bytes() == ref.path(e.sha256).read_bytes()
    assert list(cache.tmp_dir.iterdir()) == []
