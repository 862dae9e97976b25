"""The audit against hostile folders: pipes, devices, links, odd names and shapes, huge
images, killed writers (issue 13). Anything that could block runs in a subprocess or a
daemon thread with a timeout, so a regression fails instead of hanging the suite."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import cannot_list
from PIL import Image

from osteo.data.phantom import make_image
from osteo.data.scan import audit, write_audit


def _png(path, img=None, size=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = make_image("normal", size=size, seed=5, index=len(os.listdir(path.parent))) if img is None else img
    Image.fromarray(np.round(np.asarray(img) * 255).astype(np.uint8)).save(path)


def _run(code: str, *args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_a_named_pipe_in_a_class_folder_is_unreadable_and_the_audit_returns(tmp_path):
    data = tmp_path / "knees"
    _png(data / "normal" / "a.png")
    os.mkfifo(data / "normal" / "x.png")
    proc = subprocess.run([sys.executable, "-m", "osteo.cli", "data", "audit", str(data), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # a hang guard: a blocking open never returns
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert info["unreadable"] == [{"path": "normal/x.png", "reason": "not a regular file (named pipe)"}]
    assert info["n_ok"] == 1


def test_ctrl_c_stops_an_audit_at_once(tmp_path):
    """Ctrl-C arrives while the first file decodes; every decode then blocks until the audit
    has handled it. The files not started are cancelled: at most one decode per worker ever
    runs, where finishing the audit would decode all 80 (counts, not clocks)."""
    for i in range(80):
        _png(tmp_path / "normal" / f"{i:02d}.png", np.zeros((16, 16)))
    code = """
        import atexit, os, signal, sys, threading
        # Ctrl-C as a terminal delivers it, whatever the disposition this test runner passes on
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from osteo.data import scan
        decode, started, handled = scan.decode_gray, [], threading.Event()
        def blocked(data, *args):
            started.append(1)
            if len(started) == 1:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            handled.wait()
            return decode(data, *args)
        scan.decode_gray = blocked
        atexit.register(lambda: print("decoded", len(started), flush=True))  # after the workers are joined
        try:
            scan.audit(sys.argv[1], workers=2)
        except KeyboardInterrupt:
            handled.set()
            print("interrupted", flush=True)
            sys.exit(130)
        handled.set()
        print("finished", flush=True)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130 and "interrupted" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    decoded = int(proc.stdout.split("decoded ")[1].split()[0])
    assert 1 <= decoded <= 2, proc.stdout


def test_symlinked_class_folder_is_followed_and_reported(tmp_path):
    elsewhere = tmp_path / "store" / "knees_normal"
    _png(elsewhere / "a.png")
    _png(elsewhere / "sub" / "b.png")
    (elsewhere / "sub" / "loop").symlink_to(elsewhere)  # a loop back up
    (elsewhere / "again").symlink_to(elsewhere / "sub")  # inside: walked at its own path
    data = tmp_path / "data"
    data.mkdir()
    (data / "Normal").symlink_to(elsewhere)
    _png(data / "osteopenia" / "c.png")
    (data / "osteopenia" / "loop.png").symlink_to(data / "osteopenia" / "loop.png")
    (data / "osteopenia" / "gone.png").symlink_to(tmp_path / "missing.png")
    result = audit(data)
    info = result.to_json()
    assert sorted(r.path for r in result.ok()) == ["Normal/a.png", "Normal/sub/b.png", "osteopenia/c.png"]
    assert info["classes"]["normal"] == 2
    links = {link["path"]: link for link in info["links"]}
    assert links["Normal"]["class_folder"] and links["Normal"]["followed"]
    assert links["Normal"]["target"] == str(elsewhere.resolve())
    assert not links["Normal/sub/loop"]["followed"] and "loop" in links["Normal/sub/loop"]["reason"]
    assert not links["Normal/again"]["followed"]
    reasons = {u["path"]: u["reason"] for u in info["unreadable"]}
    assert "symbolic link loop" in reasons["osteopenia/loop.png"]
    assert "broken symbolic link" in reasons["osteopenia/gone.png"]


def test_a_link_to_a_folder_outside_is_followed_once(tmp_path):
    outside = tmp_path / "outside"
    _png(outside / "d.png")
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    (data / "normal" / "x").symlink_to(outside)
    (data / "normal" / "y").symlink_to(outside)
    result = audit(data)
    assert [r.path for r in result.ok()] == ["normal/x/d.png"]
    links = {link["path"]: link for link in result.links}
    assert links["normal/x"]["followed"] and not links["normal/y"]["followed"]


def test_a_link_to_the_data_folder_or_another_class_is_not_walked_under_this_class(tmp_path, caplog):
    """``normal/loop -> ..`` walked the whole data folder again under normal (every osteopenia
    image counted as normal too), and ``normal/x -> ../osteopenia/sub`` filed another class's
    images under this one; neither is followed, each link with its reason. ``osteo predict`` of
    the class folder does not follow the first either."""
    import logging

    from osteo.predict import _expand

    data = tmp_path / "data"
    _png(data / "normal" / "a.png")
    _png(data / "osteopenia" / "sub" / "b.png")
    _png(data / "osteoporosis" / "c.png")
    (data / "normal" / "loop").symlink_to("..")
    (data / "normal" / "x").symlink_to(data / "osteopenia" / "sub")
    (data / "normal" / "root").symlink_to("/")
    result = audit(data)
    assert sorted((r.path, r.label) for r in result.ok()) == [
        ("normal/a.png", "normal"), ("osteopenia/sub/b.png", "osteopenia"), ("osteoporosis/c.png", "osteoporosis")]
    links = {link["path"]: link for link in result.links}
    assert not links["normal/loop"]["followed"] and "holds this class folder" in links["normal/loop"]["reason"]
    assert not links["normal/root"]["followed"] and "holds this class folder" in links["normal/root"]["reason"]
    assert not links["normal/x"]["followed"]
    assert links["normal/x"]["reason"] == "its target holds another class's images (osteopenia/), audited there " \
                                          "under their own label"
    with caplog.at_level(logging.WARNING, logger="osteo"):
        # a link elsewhere is followed (predict files no label), one to a folder that holds it is not
        assert _expand([str(data / "normal")])[0] == [data / "normal" / "a.png", data / "normal" / "x" / "b.png"]
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"not following {data / 'normal' / 'loop'}: it links to {data}") for m in said), said


def test_file_names_that_are_not_utf8_are_listed_and_written(tmp_path):
    data = tmp_path / "data"
    _png(data / "normal" / "ok.png")
    raw = os.fsencode(data / "normal")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(raw + b"/\xff\xfe.png"))
    os.mkdir(os.fsdecode(raw + b"/d\xe9j\xe0"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(raw + b"/d\xe9j\xe0/x.png"))
    (data / "normal" / "caf\u00e9, \"quoted\"\n.png").write_bytes((data / "normal" / "ok.png").read_bytes())
    open(os.fsdecode(raw + b"/notes\xff.txt"), "w").close()
    result = audit(data)
    manifest, report = write_audit(result, tmp_path / "out")
    info = json.loads(report.read_text(encoding="utf-8"))
    reasons = {u["path"]: u["reason"] for u in info["unreadable"]}
    assert set(reasons) == {"normal/\\xff\\xfe.png", "normal/d\\xe9j\\xe0/x.png"}
    assert all("not valid UTF-8" in r and "rename" in r for r in reasons.values())
    assert "normal/notes\\xff.txt" in info["ignored"]
    rows = list(csv.DictReader(manifest.open(encoding="utf-8", newline="")))
    assert {r["path"] for r in rows} >= {"normal/\\xff\\xfe.png", "normal/caf\u00e9, \"quoted\"\n.png"}
    assert info["n_ok"] == 2  # the odd but valid UTF-8 name is fine


def test_a_name_that_is_not_utf8_is_not_predicted_by_an_export_whatever_folder_holds_it(tmp_path, monkeypatch,
                                                                                         capsys):
    """An export's predict.py wrote such a file's row under its name with \\xNN escapes, which is
    also the real name of another file (one with a backslash in it): two rows that read alike. It
    now says the file is unreadable with the audit's reason and fix, and reads the file whose name
    merely looks escaped. As the audit checks the path below the data folder, only the name below
    the folder named counts: the folders above it are the user's (osteo predict: test_predict.py)."""
    from osteo import export_predict

    above = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))  # not UTF-8, and not the files' names
    raw = os.fsencode(above / "in")
    odd = Path(os.fsdecode(raw + b"/a\xff.png"))
    look_alike = above / "in" / "a\\xff.png"  # its name is the text the other one is shown as
    _png(odd)
    _png(look_alike)
    _png(above / "in" / "sub" / "b.png")
    assert export_predict.shown(odd) == export_predict.shown(look_alike)
    assert "not valid UTF-8" in export_predict.NOT_UTF8 and "rename" in export_predict.NOT_UTF8
    named = set()
    assert export_predict._expand([str(above / "in"), str(odd)], not_utf8=named)[0] == [
        look_alike, odd, above / "in" / "sub" / "b.png", odd]
    assert named == {odd}

    (tmp_path / "export.json").write_text(json.dumps({"file": "m.onnx", "input": {"shape": [None, 32, 32, 1]},
                                                      "preprocessing": {"resize": "pad"}}))
    monkeypatch.setattr(export_predict, "session", lambda model: None)
    monkeypatch.setattr(export_predict, "probabilities", lambda sess, x: np.full((len(x), 3), 1 / 3))
    assert export_predict.main([os.fsdecode(raw), "--export", str(tmp_path / "export.json")]) == 1
    out, err = capsys.readouterr()
    shown = export_predict.shown
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == [shown(look_alike), shown(above / "in/sub/b.png")]
    assert err.splitlines() == [f"predict.py: {shown(odd)}: {export_predict.NOT_UTF8}"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 900), (900, 1), (3, 2000)])
def test_any_shape_is_audited(tmp_path, shape):
    _png(tmp_path / "normal" / "thin.png", np.linspace(0, 1, shape[0] * shape[1]).reshape(shape))
    _png(tmp_path / "normal" / "knee.png")
    (rec,) = [r for r in audit(tmp_path).records if r.path == "normal/thin.png"]
    assert rec.status == "ok" and (rec.height, rec.width) == shape


def test_an_image_over_the_pixel_limit_is_named(tmp_path, monkeypatch):
    from osteo.data import decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 64 * 64)
    _png(tmp_path / "normal" / "big.png", np.zeros((65, 64)))
    _png(tmp_path / "normal" / "fits.png", np.zeros((64, 64)))
    info = audit(tmp_path).to_json()
    assert info["unreadable"] == [{"path": "normal/big.png", "reason": "4,160 pixels (64 x 65) exceeds osteo's "
                                   "limit of 4,096 (MAX_PIXELS); downscale it"}]


def test_audit_memory_is_bounded_on_huge_images(tmp_path):
    """Four 9,400 x 9,400 px PNGs (over the limit: refused from the header) and two of
    5,000 x 5,000 px (25 M pixels, hashed and reduced in strips): the audit's peak memory
    grows by less than 250 MB (measured: 50 to 140). The previous version took 2.8 GB on
    eight of the first kind, and 480 MB on the two others."""
    for i, side in enumerate([9400] * 4 + [5000] * 2):
        img = Image.new("L", (side, side), 40)
        img.paste(Image.fromarray((np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256)), (side // 3,) * 2)
        (tmp_path / ("normal" if i % 2 else "osteopenia")).mkdir(exist_ok=True)
        img.save(tmp_path / ("normal" if i % 2 else "osteopenia") / f"{side}_{i}.png", compress_level=1)
        del img
    proc = _run("""
        import json, resource, sys
        import numpy, PIL.Image, scipy.ndimage
        from osteo.data.scan import audit
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = audit(sys.argv[1])
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps({"grew_mb": grew, **result.to_json()}))
    """, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["n_ok"] == 2 and len(info["unreadable"]) == 4
    assert all("88,360,000 pixels (9400 x 9400) exceeds osteo's limit" in u["reason"] for u in info["unreadable"])
    print(f"audit peak memory grew by {info['grew_mb']:.0f} MB")
    assert info["grew_mb"] < 250, info["grew_mb"]


def test_hidden_temporaries_are_ignored(tmp_path):
    _png(tmp_path / "normal" / "a.png")
    (tmp_path / "normal" / ".normal_0003.k2j4h.tmp.png").write_bytes(b"")  # a killed atomic write
    (tmp_path / "normal" / ".sub.tmp-123").mkdir()
    (tmp_path / "normal" / ".sub.tmp-123" / "b.png").write_bytes(b"")
    info = audit(tmp_path).to_json()
    assert info["unreadable"] == [] and info["n_ok"] == 1
    assert set(info["ignored"]) == {"normal/.normal_0003.k2j4h.tmp.png", "normal/.sub.tmp-123/"}


def test_a_folder_that_cannot_be_listed_is_a_row(tmp_path, monkeypatch):
    """No permission to list a folder (root ignores modes, and the suite runs as root in CI: the
    listing is made to fail here, as the system fails it)."""
    _png(tmp_path / "normal" / "a.png")
    _png(tmp_path / "normal" / "locked" / "b.png")
    cannot_list(monkeypatch, "locked")
    info = audit(tmp_path).to_json()
    assert info["unreadable"] == [{"path": "normal/locked/", "reason": "cannot list folder: Permission denied"}]
    assert info["n_ok"] == 1


def test_a_cmyk_jpeg_is_audited_and_cached_without_a_word_on_stderr(tmp_path):
    """libjpeg printed "Unsupported color conversion request" to descriptor 2 when asked for
    gray from CMYK; the whole process's stderr, C libraries included, must stay empty."""
    gray = (np.arange(40 * 60).reshape(40, 60) % 251).astype(np.uint8)
    (tmp_path / "normal").mkdir()
    Image.fromarray(gray).convert("CMYK").save(tmp_path / "normal" / "cmyk.jpg")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "normal" / "rgb.jpg")
    _png(tmp_path / "normal" / "gray.png")
    proc = _run("""
        import sys
        from osteo import _quiet
        _quiet.install()  # TensorFlow's start-up notices, as the CLI filters them; anything else shows
        from osteo.data.pipeline import Entry, ImageCache
        from osteo.data.scan import audit
        result = audit(sys.argv[1])
        entries = [Entry.from_row(sys.argv[1], r) for r in result.ok()]
        assert ImageCache(32, root=sys.argv[2]).fill(entries) == []
        assert audit(sys.argv[1], cache=ImageCache(16, root=sys.argv[2])).ok() == result.ok()
        print(len(entries), sorted(r.format for r in result.ok()))
    """, tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "['jpeg',", "'jpeg',", "'png']"]
    assert proc.stderr == ""


def test_predict_says_which_folder_it_could_not_list(tmp_path, monkeypatch, caplog):
    """A folder that cannot be listed (no permission; root ignores modes, so the listing is made to
    fail here) was skipped by osteo predict with no row and no word."""
    import logging

    from osteo.predict import _expand

    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "locked" / "b.png")
    cannot_list(monkeypatch, "locked")
    with caplog.at_level(logging.WARNING, logger="osteo"):
        assert _expand([str(tmp_path / "in")]) == ([tmp_path / "in" / "a.png"], [str(tmp_path / "in" / "locked")])
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot list {tmp_path / 'in' / 'locked'}: Permission denied; its files are not predicted"]


def test_predict_script_says_which_folder_it_could_not_list_and_exits_1(tmp_path, monkeypatch, capsys):
    """predict.py beside an ONNX export skipped a folder it could not list with no word and exit 0,
    and gave an empty folder a header alone and exit 0: as osteo predict, a line and exit 1 for
    the first, a line and exit 2 where no file was found at all."""
    from osteo import export_predict

    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "locked" / "b.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "export.json").write_text(json.dumps({"file": "m.onnx", "input": {"shape": [None, 32, 32, 1]},
                                                      "preprocessing": {"resize": "pad"}}))
    monkeypatch.setattr(export_predict, "session", lambda model: None)
    monkeypatch.setattr(export_predict, "probabilities", lambda sess, x: np.full((len(x), 3), 1 / 3))
    cannot_list(monkeypatch, "locked")
    record = ["--export", str(tmp_path / "export.json")]
    assert export_predict.main([str(tmp_path / "in"), *record]) == 1
    out, err = capsys.readouterr()
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == [str(tmp_path / "in" / "a.png")]
    assert err.splitlines() == [
        f"predict.py: cannot list {tmp_path / 'in' / 'locked'}: Permission denied; its files are not predicted"]
    assert export_predict.main([str(tmp_path / "empty"), *record]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"predict.py: no files in {tmp_path / 'empty'}; pass image files or folders that hold them"]
    assert export_predict.main([str(tmp_path / "in" / "locked"), *record]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        f"predict.py: no file could be found: {tmp_path / 'in' / 'locked'} cannot be listed (each said above); make "
        "them readable (chmod), or pass other folders")


def test_hidden_and_system_files_and_folders_are_no_ones_images_for_the_audit_predict_and_an_export(tmp_path):
    """A Synology NAS's @eaDir (thumbnails of every image), a trash, an archive's __MACOSX and a
    hidden file are not data: the audit lists each as ignored (a folder once, not walked), and
    osteo predict and an export's predict.py skip the same files."""
    from osteo import export_predict
    from osteo.predict import _expand

    _png(tmp_path / "normal" / "a.png")
    for junk in ("@eaDir/a.png/SYNOPHOTO_THUMB_M.jpg", ".Trash-1000/files/b.png", "__MACOSX/c.png", ".hidden.png",
                 "sub/#recycle/d.png", "sub/e.png"):
        _png(tmp_path / "normal" / junk)
    info = audit(tmp_path).to_json()
    assert info["n_ok"] == 2 and info["unreadable"] == []  # a.png and sub/e.png
    assert set(info["ignored"]) == {"normal/@eaDir/", "normal/.Trash-1000/", "normal/__MACOSX/", "normal/.hidden.png",
                                    "normal/sub/#recycle/"}
    want = [tmp_path / "normal" / "a.png", tmp_path / "normal" / "sub" / "e.png"]
    assert _expand([str(tmp_path / "normal")]) == (want, [])
    assert export_predict._expand([str(tmp_path / "normal")]) == (want, [])


def test_predict_reads_in_a_folder_the_files_the_audit_reads_and_says_what_it_left_out(tmp_path):
    """A folder's other files (the phantom's latents.csv, a report) are no images: osteo predict and an
    export's predict.py leave them out in one warning, not a row each saying "unknown signature";
    a DICOM file named as a PACS names it is read, and a file named is read whatever its name."""
    from helpers import osteo_warnings

    from osteo import export_predict
    from osteo.predict import _expand

    _png(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "latents.csv").write_text("path,x\n")
    (tmp_path / "in" / "notes.txt").write_text("knee")
    import pydicom
    from pydicom.data import get_testdata_file

    pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False)).save_as(tmp_path / "in" / "IM0001")
    want = [tmp_path / "in" / "IM0001", tmp_path / "in" / "a.png"]
    with osteo_warnings() as said:
        assert _expand([str(tmp_path / "in")]) == (want, [])
    assert said == [f"2 file(s) in {tmp_path / 'in'} are not images osteo reads (by their name, or DICOM by their "
                    f"bytes), e.g. {tmp_path / 'in' / 'latents.csv'}: left out"]
    assert export_predict._expand([str(tmp_path / "in")]) == (want, [tmp_path / "in" / "latents.csv",
                                                                      tmp_path / "in" / "notes.txt"])
    assert _expand([str(tmp_path / "in" / "notes.txt")]) == ([tmp_path / "in" / "notes.txt"], [])  # named: read


def test_an_exports_script_neither_hangs_on_a_named_pipe_nor_stops_on_an_unexpected_failure(tmp_path, monkeypatch,
                                                                                          capsys):
    """predict.py beside an ONNX export: a named pipe called x.png is a line, not a read that never
    ends; a decoder failure no one expected is that file's line; a linked folder is followed once, as
    osteo predict follows it (not a link to a folder above)."""
    from osteo import export_predict

    folder = tmp_path / "in"
    _png(folder / "a.png")
    _png(tmp_path / "elsewhere" / "b.png")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    (folder / "up").symlink_to(tmp_path)  # holds the folder named: not walked
    os.mkfifo(folder / "pipe.png")
    _png(folder / "odd.png")
    (tmp_path / "export.json").write_text(json.dumps({"file": "m.onnx", "input": {"shape": [None, 32, 32, 1]},
                                                      "preprocessing": {"resize": "pad"}}))
    real = export_predict.prepare

    def prepare(data, size, resize):
        if data == (folder / "odd.png").read_bytes() and size == 32:
            raise ValueError("a bug")
        return real(data, size, resize)

    (folder / "odd.png").write_bytes((folder / "odd.png").read_bytes() + b"\0")
    monkeypatch.setattr(export_predict, "prepare", prepare)
    monkeypatch.setattr(export_predict, "session", lambda model: None)
    monkeypatch.setattr(export_predict, "probabilities", lambda sess, x: np.full((len(x), 3), 1 / 3))
    assert export_predict.main([str(folder), "--export", str(tmp_path / "export.json")]) == 1
    out, err = capsys.readouterr()
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == [str(folder / "a.png"),
                                                                     str(folder / "linked" / "b.png")]
    assert err.splitlines() == [f"predict.py: {folder / 'odd.png'}: decode failed: ValueError: a bug",
                                f"predict.py: {folder / 'pipe.png'}: not a regular file"]
