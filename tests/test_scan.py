import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from osteo import CLASSES
from osteo.data.decode import Gray, ImageInfo
from osteo.data.phantom import make_image
from osteo.data.scan import MANIFEST_COLUMNS, audit, write_audit
from osteo.errors import OsteoError


def _png(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).astype(np.uint8)).save(path, **kw)


@pytest.fixture
def messy(tmp_path):
    """A folder with every problem the study's data had, and a few more."""
    root = tmp_path / "data"
    for cls, folder in [("normal", "Normal"), ("osteopenia", "OSTEOPENIA"), ("osteoporosis", "osteoporosis")]:
        for i in range(6):
            _png(root / folder / "sub" / f"img{i}.png", make_image(cls, size=128, seed=11, index=i))
    # exact copy under another class (a conflict), and an exact copy in the same class
    shutil.copy(root / "Normal/sub/img0.png", root / "OSTEOPENIA/copy_of_normal0.PNG")
    shutil.copy(root / "Normal/sub/img1.png", root / "Normal/img1_again.png")
    # near duplicates: a resized JPEG of osteoporosis/img2 in the same class, and a
    # re-encoded JPEG of osteopenia/img3 filed under normal (a near conflict)
    src = Image.open(root / "osteoporosis/sub/img2.png")
    src.resize((100, 100), Image.Resampling.BILINEAR).save(root / "osteoporosis/img2_small.jpg", quality=85)
    (root / "Normal/deep/er").mkdir(parents=True)
    Image.open(root / "OSTEOPENIA/sub/img3.png").save(root / "Normal/deep/er/img3.JPEG", quality=70)
    # broken and system files
    (root / "Normal/empty.png").write_bytes(b"")
    good = (root / "Normal/sub/img2.png").read_bytes()
    (root / "Normal/truncated.png").write_bytes(good[: len(good) // 2])
    (root / "osteoporosis/notes.png").write_bytes(b"this is text, named .png")
    (root / "osteoporosis/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "osteoporosis/._img0.png").write_bytes(b"\0\5\26\7")
    (root / "Normal/Thumbs.db").write_bytes(b"x")
    _png(root / "osteoporosis/blank.png", np.full((64, 64), 0.5))  # a failed export: one gray level
    (root / "Normal/readme.txt").write_text("hello")
    (root / "loose.png").write_bytes(good)
    return root


def test_audit_finds_every_planted_problem(messy, tmp_path):
    result = audit(messy)
    info = result.to_json()
    assert info["classes"] == {"normal": 6 + 2, "osteopenia": 6 + 1, "osteoporosis": 6 + 2}
    assert info["blank"] == ["osteoporosis/blank.png"]  # a second audit recalls it (test below: to_json equal)
    unreadable = {u["path"]: u["reason"] for u in info["unreadable"]}
    assert set(unreadable) == {"Normal/empty.png", "Normal/truncated.png", "osteoporosis/notes.png"}
    assert "empty" in unreadable["Normal/empty.png"]
    assert set(info["ignored"]) == {
        "osteoporosis/.DS_Store", "osteoporosis/._img0.png", "Normal/Thumbs.db", "Normal/readme.txt", "loose.png",
    }
    groups = {frozenset(g["paths"]): g for g in info["duplicate_groups"]}
    expected = {
        frozenset({"Normal/sub/img0.png", "OSTEOPENIA/copy_of_normal0.PNG"}): ("exact", True),
        frozenset({"Normal/sub/img1.png", "Normal/img1_again.png"}): ("exact", False),
        frozenset({"osteoporosis/sub/img2.png", "osteoporosis/img2_small.jpg"}): ("near", False),
        frozenset({"OSTEOPENIA/sub/img3.png", "Normal/deep/er/img3.JPEG"}): ("near", True),
    }
    assert {k: (g["kind"], g["conflict"]) for k, g in groups.items()} == expected
    conflict = groups[frozenset({"Normal/sub/img0.png", "OSTEOPENIA/copy_of_normal0.PNG"})]
    assert conflict["labels"] == ["normal", "osteopenia"]


def test_distinct_knees_are_not_near_duplicates(tmp_path):
    # 60 different knees of one class: same anatomy, similar at low resolution
    for i in range(60):
        _png(tmp_path / "normal" / f"{i}.png", make_image("normal", size=128, seed=2, index=i))
    assert audit(tmp_path).duplicate_groups == []


# The closest distinct knees of the default phantom (``osteo data phantom``, seed 0):
# at 256 px, the ten pairs a 64 px detail check grouped (two across classes); at
# 512 px, the pairs scoring highest on the detail check now, and those it grouped then.
HARDEST_DISTINCT = {
    256: [("normal", 69, "normal", 337), ("normal", 313, "normal", 619), ("normal", 322, "normal", 504),
          ("normal", 373, "normal", 738), ("normal", 439, "normal", 747), ("normal", 533, "osteopenia", 81),
          ("normal", 535, "normal", 710), ("normal", 556, "normal", 605), ("normal", 571, "normal", 665),
          ("normal", 671, "osteopenia", 10)],
    512: [("normal", 535, "normal", 710), ("osteoporosis", 436, "osteoporosis", 783), ("normal", 2, "normal", 609),
          ("normal", 416, "osteopenia", 250), ("normal", 97, "normal", 739), ("normal", 733, "normal", 734)],
}


@pytest.mark.parametrize("size", [256, 512])
def test_near_duplicates_at_full_resolution(tmp_path, size):
    """Lookalike knees stay apart, and re-encoded or resized copies are still found."""
    root = tmp_path / "data"
    for pair in HARDEST_DISTINCT[size]:
        for label, index in (pair[:2], pair[2:]):
            img = make_image(label, size=size, seed=0, index=index)  # stored as write_phantom does
            _png(root / label / f"{label}_{index:04d}.png", np.round(img * 255) / 255)
    expected = set()
    for k, (label, index, *_) in enumerate(HARDEST_DISTINCT[size][:3]):
        src_path = f"{label}/{label}_{index:04d}.png"
        other = CLASSES[(CLASSES.index(label) + 1) % len(CLASSES)]
        src = Image.open(root / src_path)
        src.save(root / label / f"copy{k}_q70.jpg", quality=70)
        src.resize((round(size * 0.78),) * 2, Image.Resampling.BILINEAR).save(
            root / other / f"copy{k}_small.jpg", quality=85)
        src.resize((round(size * 0.7),) * 2, Image.Resampling.LANCZOS).save(root / label / f"copy{k}_small.png")
        expected.add(frozenset({src_path, f"{label}/copy{k}_q70.jpg", f"{other}/copy{k}_small.jpg",
                                f"{label}/copy{k}_small.png"}))
    groups = audit(root).duplicate_groups
    assert {frozenset(g["paths"]) for g in groups} == expected
    assert all(g["kind"] == "near" and g["conflict"] for g in groups)


def test_jpeg_copies_with_faint_texture_are_found(tmp_path, monkeypatch):
    """Knees of the default phantom (seed 0, 256 px) whose quiet tiles (band-pass rms about 0.2
    grey levels against a median of 8) JPEG's noise rewrites: their q70 and q80 copies in another
    class scored 0.56-0.71 and went undetected (43 of 300 knees at q70), so the copies could
    straddle the split and their label conflict stayed. Such tiles now count as flat."""
    from osteo.data import scan

    root = tmp_path / "data"
    (root / "osteoporosis").mkdir(parents=True)
    for index in (1, 12, 26):
        img = make_image("normal", size=256, seed=0, index=index)
        _png(root / "normal" / f"normal_{index:04d}.png", np.round(img * 255) / 255)
        for q in (70, 80):
            Image.open(root / "normal" / f"normal_{index:04d}.png").save(
                root / "osteoporosis" / f"copy{index}_q{q}.jpg", quality=q)
    want = {frozenset({f"normal/normal_{i:04d}.png", f"osteoporosis/copy{i}_q70.jpg", f"osteoporosis/copy{i}_q80.jpg"})
            for i in (1, 12, 26)}
    groups = audit(root).duplicate_groups
    assert {frozenset(g["paths"]) for g in groups} == want and all(g["conflict"] for g in groups)
    monkeypatch.setattr(scan, "FLAT_SHARE", 0.0)  # the rule before: an absolute floor only
    assert {frozenset(g["paths"]) for g in audit(root).duplicate_groups} != want


def test_copies_with_flat_borders_are_found(tmp_path):
    """Tiles flat in both images (a collimated X-ray's black border) agree."""
    for i in range(3):
        img = np.pad(make_image("normal", size=96, seed=3, index=i), 80)  # 256 px, 3/4 of it flat
        _png(tmp_path / "normal" / f"{i}.png", img)
    (tmp_path / "osteopenia").mkdir()
    Image.open(tmp_path / "normal" / "0.png").save(tmp_path / "osteopenia" / "0.jpg", quality=85)
    groups = audit(tmp_path).duplicate_groups
    assert [g["paths"] for g in groups] == [["normal/0.png", "osteopenia/0.jpg"]]


def test_manifest_and_audit_json_contract(messy, tmp_path):
    manifest, report = write_audit(audit(messy), tmp_path / "out")
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    assert set(MANIFEST_COLUMNS) <= set(rows[0])
    by_path = {r["path"]: r for r in rows}
    row = by_path["OSTEOPENIA/copy_of_normal0.PNG"]
    assert row["label"] == "osteopenia" and row["status"] == "ok" and row["conflict"] == "1"
    assert row["format"] == "png" and row["width"] == "128" and row["bit_depth"] == "8"
    assert len(row["sha256"]) == 64 and row["dup_group"]
    assert by_path["Normal/deep/er/img3.JPEG"]["format"] == "jpeg"
    assert by_path["Normal/empty.png"]["status"] == "unreadable"
    info = json.loads(report.read_text())
    for key in ("data_dir", "classes", "n_files", "n_ok", "unreadable", "ignored", "duplicate_groups"):
        assert key in info
    assert info["n_files"] == len(rows)


def test_missing_folder_and_no_class_folders_are_user_errors(tmp_path):
    with pytest.raises(OsteoError, match="does not exist"):
        audit(tmp_path / "nope")
    (tmp_path / "cats").mkdir()
    _png(tmp_path / "cats" / "a.png", make_image("normal", size=32))
    with pytest.raises(OsteoError, match="no class folders"):
        audit(tmp_path)


def test_dicom_files_are_audited(tmp_path):
    from pydicom.data import get_testdata_file

    (tmp_path / "normal").mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):
        shutil.copy(get_testdata_file(name, download=False), tmp_path / "normal" / name)
    rows = {r.path: r for r in audit(tmp_path).records}
    assert rows["normal/CT_small.dcm"].format == "dicom" and rows["normal/CT_small.dcm"].status == "ok"
    assert rows["normal/MR_truncated.dcm"].status == "unreadable"


# --------------------------------------------------------------------------- near-duplicate index


def _reference_groups(ok):
    """The previous commit's search, every pair's thumbnails then the detail check:
    (groups, the pairs that pass)."""
    from osteo.data import scan

    n = len(ok)
    uf = scan._UnionFind(n)
    thumbs = np.stack([r.features[0] for r in ok])
    details = [r.features[1] for r in ok]
    corr = thumbs @ thumbs.T
    passing = set()
    for a in range(n):
        bs = np.flatnonzero(corr[a, a + 1 :] >= scan.THUMB_CORR) + a + 1
        for b in bs[scan._detail_scores(details, a, bs) >= scan.DETAIL_CORR] if len(bs) else []:
            uf.union(a, int(b))
            passing.add((a, int(b)))
    groups = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(ok[i].path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1), passing


def test_near_duplicate_index_finds_what_comparing_every_pair_finds(monkeypatch):
    """Look-alikes (one knee's anatomy, other knees' texture: every thumbnail matches),
    flat-bordered knees, a flat image, 64 px images (a coarser tile grain), and copies
    of several kinds: the index gives the groups of the all-pairs search."""
    import io

    from scipy import ndimage

    from osteo.data import scan

    monkeypatch.setattr(scan, "INDEX_MIN_PAIRS", 0)  # the index even on a small set
    monkeypatch.setattr(scan, "INDEX_SAMPLE", 40)
    base = ndimage.gaussian_filter(make_image("normal", size=128, seed=0, index=0), 2.5)
    images = {}
    for k in range(50):
        o = make_image("normal", size=128, seed=1, index=k)
        images[f"look{k:02d}"] = np.clip(base + o - ndimage.gaussian_filter(o, 2.5), 0, 1)
    for k in range(8):
        images[f"pad{k}"] = np.pad(make_image("osteopenia", size=48, seed=2, index=k), 40)
        images[f"small{k}"] = make_image("osteoporosis", size=64, seed=3, index=k)
    images["flat"] = np.full((128, 128), 0.5)

    def jpeg(img, quality=85, side=None):
        pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
        if side:
            pil = pil.resize((side, side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=quality)
        return np.asarray(Image.open(buf), dtype=np.float32) / 255

    for name in ("look03", "look17", "pad2"):
        images[name + "_q85"] = jpeg(images[name])
    images["small5_q95"] = jpeg(images["small5"], quality=95)  # 64 px: both at the 64 px grain
    images["look03_small"] = jpeg(images["look03"], side=80)  # 64 px grain against 128
    images["pad2_q70"] = jpeg(images["pad2"], quality=70)
    ok = []
    for i, (name, img) in enumerate(sorted(images.items())):
        r = scan.Record(path=name, label="normal", sha256=f"s{i}", pixel_sha256=f"p{i}")
        px = np.round(np.asarray(img, np.float32) * 255)
        r.features = scan._hash_and_features(Gray(px, ImageInfo("png", *px.shape[::-1], 8), "float"))[1]
        ok.append(r)
    expected, passing = _reference_groups(ok)
    assert ["look03", "look03_q85", "look03_small"] in expected and len(expected) == 4
    pairs = scan._candidate_pairs(np.stack([r.features[0] for r in ok]), [r.features[1] for r in ok])
    assert passing <= set(map(tuple, pairs.tolist()))  # every pair that passes is a candidate
    assert len(pairs) < len(ok) * (len(ok) - 1) / 2 / 5  # and far fewer than all pairs are
    assert sorted(g["paths"] for g in scan._find_duplicates(ok)) == expected


def test_images_hash_and_reduce_in_strips_like_whole_ones(monkeypatch):
    """Strips of a few rows give the pixel hash and the features of one strip."""
    import io

    from osteo import export_predict
    from osteo.data import scan
    from osteo.data.decode import decode_gray

    rng = np.random.default_rng(0)
    for shape in [(300, 517), (517, 300), (1, 900), (900, 1), (1100, 700)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
        whole_hash, (whole_thumb, whole_tiles) = scan._hash_and_features(decode_gray(buf.getvalue()))
        monkeypatch.setattr(scan, "STRIP_BYTES", 4 * 1024)  # strips of a few rows
        monkeypatch.setattr(export_predict, "STRIP_BYTES", 4 * 1024)  # the box means' (osteo's and predict.py's)
        strip_hash, (strip_thumb, strip_tiles) = scan._hash_and_features(decode_gray(buf.getvalue()))
        monkeypatch.undo()
        assert strip_hash == whole_hash
        np.testing.assert_allclose(strip_thumb, whole_thumb, atol=1e-5)
        assert np.abs(strip_tiles.astype(int) - whole_tiles).max() <= 1


def test_a_folder_of_images_beside_the_classes_is_one_warning(tmp_path, caplog):
    for c in (*CLASSES, "severe"):
        for i in range(2):
            _png(tmp_path / c / f"{c}{i}.png", make_image("normal", size=32, seed=1, index=i + 3 * len(c)))
    _png(tmp_path / "severe" / "deeper" / "x.png", make_image("normal", size=32, seed=2))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    _png(tmp_path / ".git" / "logo.png", make_image("normal", size=32, seed=3))  # hidden: not a class
    with caplog.at_level("WARNING", logger="osteo"):
        result = audit(tmp_path)
    assert result.ignored_folders == [{"path": "severe/", "images": 3}]
    assert len(result.warnings) == 1 and "severe/ (3 images)" in result.warnings[0]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == result.warnings
    assert "\n" not in result.warnings[0] and "rename it" in result.warnings[0]
    assert len(result.ok()) == 6 and "severe/deeper/x.png" in result.ignored
    write_audit(result, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert info["ignored_folders"] == [{"path": "severe/", "images": 3}] and info["warnings"] == result.warnings


def test_a_file_given_as_the_data_folder_says_so_and_what_to_pass(tmp_path):
    _png(tmp_path / "data" / "normal" / "a.png", make_image("normal", size=32))
    with pytest.raises(OsteoError) as e:
        audit(tmp_path / "data" / "normal" / "a.png")
    message = str(e.value)
    assert "is a file, not a folder" in message and "does not exist" not in message
    assert f"e.g. {tmp_path / 'data'}" in message
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OsteoError, match="is a file, not a folder; pass the folder that holds the class"):
        audit(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- remembered records


@pytest.fixture
def decodes(monkeypatch):
    """Counts the audit's decodes; every file is old enough to be remembered (RACY_S)."""
    from osteo.data import scan

    calls = []
    real = scan.decode_gray

    def counted(data, *a, **kw):
        calls.append(len(data))
        return real(data, *a, **kw)

    monkeypatch.setattr(scan, "decode_gray", counted)
    monkeypatch.setattr(scan, "RACY_S", -3600.0)
    return calls


def _rows_and_groups(result):
    return result.manifest_rows(), result.duplicate_groups


def test_a_second_audit_takes_unchanged_files_back_without_decoding_them(messy, tmp_path, decodes, monkeypatch):
    from osteo.data import scan

    searches = []
    real = scan._find_duplicates
    monkeypatch.setattr(scan, "_find_duplicates", lambda ok: searches.append(len(ok)) or real(ok))
    memo = tmp_path / "cache"
    first = audit(messy, memo=memo)
    n = len(decodes)
    assert n >= len(first.ok()) and first.duplicate_groups  # the planted duplicates and conflicts
    again = audit(messy, memo=memo)
    assert len(decodes) == n and len(searches) == 1  # nothing decoded, and the groups recalled
    assert _rows_and_groups(again) == _rows_and_groups(first) == _rows_and_groups(audit(messy))
    assert again.to_json() == first.to_json()
    # a new file: its own read, and the groups searched again (it copies an image into another class)
    shutil.copy(messy / "osteoporosis/sub/img4.png", messy / "Normal/new.png")
    groups = audit(messy, memo=memo).duplicate_groups
    assert len(decodes) == 2 * n + 1 and len(searches) == 3  # with the plain audit's
    assert {"Normal/new.png", "osteoporosis/sub/img4.png"} in [set(g["paths"]) for g in groups]


def test_a_file_rewritten_in_place_with_its_old_size_and_times_is_read_again(tmp_path, decodes):
    import os

    root = tmp_path / "data"
    for i, cls in enumerate(CLASSES):
        _png(root / cls / "a.bmp", make_image(cls, size=64, seed=3, index=i))
    memo = tmp_path / "cache"
    before = {r.path: r.sha256 for r in audit(root, memo=memo).ok()}
    path = root / "normal" / "a.bmp"
    st = os.stat(path)
    other = (root / "osteoporosis" / "a.bmp").read_bytes()  # an uncompressed BMP: the same length
    assert len(other) == st.st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    while os.stat(path).st_ctime_ns == st.st_ctime_ns:  # the clock's tick: the change's ctime differs
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    n = len(decodes)
    after = {r.path: r.sha256 for r in audit(root, memo=memo).ok()}
    assert len(decodes) == n + 1
    assert after["normal/a.bmp"] == after["osteoporosis/a.bmp"] != before["normal/a.bmp"]
    assert {p: after[p] for p in after if p != "normal/a.bmp"} == {p: before[p] for p in before if p != "normal/a.bmp"}


def test_a_file_changed_just_before_it_was_read_is_not_remembered(messy, tmp_path, decodes, monkeypatch):
    from osteo.data import scan

    monkeypatch.setattr(scan, "RACY_S", 3600.0)  # every file here was written within the hour
    memo = tmp_path / "cache"
    audit(messy, memo=memo)
    n = len(decodes)
    audit(messy, memo=memo)
    assert len(decodes) == 2 * n


def test_a_damaged_or_outdated_memo_costs_one_full_audit(messy, tmp_path, decodes, monkeypatch):
    from osteo.data import scan

    memo = tmp_path / "cache"
    first = audit(messy, memo=memo)
    n = len(decodes)
    (path,) = (memo / f"audit-v{scan.MEMO_VERSION}").iterdir()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert _rows_and_groups(audit(messy, memo=memo)) == _rows_and_groups(first)
    assert len(decodes) == 2 * n
    audit(messy, memo=memo)  # written again, whole
    assert len(decodes) == 2 * n
    monkeypatch.setattr(scan, "_memo_version", lambda: "another osteo")  # new decoders or audit code
    assert _rows_and_groups(audit(messy, memo=memo)) == _rows_and_groups(first)
    assert len(decodes) == 3 * n


def test_remembered_tiles_are_read_when_a_search_needs_them_and_checked_then(messy, tmp_path, decodes):
    """The detail tiles (16 KB an image) stay on the disk, memory-mapped, until a duplicate search
    uses them; then their CRC-32 is checked, and a memo whose tiles changed on the disk is not
    trusted: the files it remembered are read again."""
    import zipfile

    from osteo.data import scan

    memo = tmp_path / "cache"
    first = audit(messy, memo=memo)
    n = len(decodes)
    (path,) = (memo / f"audit-v{scan.MEMO_VERSION}").iterdir()
    memory = scan._Memo(memo, messy).load()
    tiles = [f[1] for _, _, f in memory.records.values() if f is not None]
    assert tiles and all(isinstance(t.base, np.memmap) for t in tiles)
    assert memory.tiles_intact()
    # one byte of the tiles changed, the archive's structure left whole
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("tiles.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not scan._Memo(memo, messy).load().tiles_intact()
    assert _rows_and_groups(audit(messy, memo=memo)) == _rows_and_groups(first)  # groups recalled: tiles unused
    assert len(decodes) == n
    shutil.copy(messy / "osteoporosis/sub/img4.png", messy / "Normal/new.png")  # a search is needed
    n = len(decodes)
    fresh = audit(messy)
    every = len(decodes) - n
    n = len(decodes)
    assert _rows_and_groups(audit(messy, memo=memo)) == _rows_and_groups(fresh)
    assert len(decodes) - n == every  # every file read again, as by an audit without a memo
    n = len(decodes)
    assert _rows_and_groups(audit(messy, memo=memo)) == _rows_and_groups(fresh)  # written again, whole
    assert len(decodes) == n


def test_osteo_data_audit_reads_every_file_and_leaves_its_records(messy, tmp_path, decodes, monkeypatch):
    from osteo.cli import main

    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))
    assert main(["data", "audit", str(messy), "--out", str(tmp_path / "out")]) == 0
    n = len(decodes)
    assert main(["data", "audit", str(messy), "--out", str(tmp_path / "out")]) == 0
    assert len(decodes) == 2 * n
    audit(messy, memo=tmp_path / "cache")  # what a training run's audit does: nothing read
    assert len(decodes) == 2 * n


def test_a_multi_page_file_is_said_to_be_trained_on_by_its_first_page(tmp_path):
    for i, c in enumerate(CLASSES):
        _png(tmp_path / c / "one.png", make_image(c, size=64, seed=5, index=i))
    pages = [Image.fromarray((make_image("normal", size=64, seed=6, index=k) * 255).astype(np.uint8)) for k in range(3)]
    pages[0].save(tmp_path / "normal" / "stack.tif", save_all=True, append_images=pages[1:])
    result = audit(tmp_path)
    assert {r.path: r.frames for r in result.ok()}["normal/stack.tif"] == 3
    (said,) = [w for w in result.warnings if "several frames" in w]
    assert "1 file(s) hold several frames" in said and "normal/stack.tif (3 frames)" in said


def test_near_copies_ignore_the_group_ids_of_each_folders_own_audit(tmp_path):
    """A run image keeps the group id its own folder's audit gave it (g0001, a partner not in
    the run); two copies of each other in the outside folder got g0001 afresh, and were both
    called copies of the run's image."""
    from osteo.data.scan import near_copies

    run, ext = tmp_path / "run", tmp_path / "ext"
    _png(run / "normal" / "t.png", make_image("normal", size=128, seed=1, index=0))
    Image.open(run / "normal" / "t.png").save(run / "normal" / "t_again.jpg", quality=90)
    for name in ("e1.png", "e2.png"):  # copies of each other, not of t
        _png(ext / "osteopenia" / name, make_image("osteopenia", size=128, seed=2, index=0))
    _png(ext / "normal" / "other.png", make_image("normal", size=128, seed=3, index=0))
    theirs = [r for r in audit(run, keep_features=True).ok() if r.path == "normal/t.png"]
    assert theirs[0].dup_group == "g0001"  # from its own folder's audit
    ours = audit(ext, keep_features=True).ok()
    assert not any(near_copies(ours, theirs))
    _png(ext / "normal" / "t_copy.png", make_image("normal", size=128, seed=1, index=0))  # a copy, found
    ours = audit(ext, keep_features=True).ok()
    assert [r.path for r, copied in zip(ours, near_copies(ours, theirs)) if copied] == ["normal/t_copy.png"]


def test_the_remembered_groups_follow_a_deleted_or_relabelled_file(messy, tmp_path, decodes):
    memo = tmp_path / "cache"
    first = audit(messy, memo=memo)
    copy = {"Normal/sub/img1.png", "Normal/img1_again.png"}
    assert copy in [set(g["paths"]) for g in first.duplicate_groups]
    (messy / "Normal/img1_again.png").unlink()  # its group is gone with it
    groups = [set(g["paths"]) for g in audit(messy, memo=memo).duplicate_groups]
    assert not any("Normal/img1_again.png" in g for g in groups) and len(groups) == len(first.duplicate_groups) - 1
    (messy / "osteoporosis/sub/img0.png").rename(messy / "OSTEOPENIA/img0.png")  # filed under another class
    again = audit(messy, memo=memo)
    assert {r.path: r.label for r in again.ok()}["OSTEOPENIA/img0.png"] == "osteopenia"
    assert _rows_and_groups(again) == _rows_and_groups(audit(messy))  # as a fresh audit has them
