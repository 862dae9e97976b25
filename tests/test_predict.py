"""osteo predict: the training pixels, calibration, operating points, TTA, Grad-CAM, DICOM, folders."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import osteo_warnings

from osteo import CLASSES
from osteo.calibrate import apply_temperature
from osteo.cli import main
from osteo.runs import RunDir
from osteo.trainer import Trainer

P = [f"p_{c}" for c in CLASSES]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(phantom_dir, tmp_path_factory, tiny_recipe):
    return RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=2, bootstrap=50)).run())


def test_predict_reproduces_the_runs_validation_probabilities(run, phantom_dir, tmp_path):
    val = {r["path"]: r for r in _rows(run.predictions_path) if r["split"] == "val"}
    files = [str(phantom_dir / p) for p in val]
    with osteo_warnings() as warnings:
        assert main(["predict", str(run), *files, "--out", str(tmp_path / "raw.csv"), "--no-calibration"]) == 0
    raw = _rows(tmp_path / "raw.csv")
    assert len(raw) == len(val)
    # the thresholds were chosen on calibrated probabilities: no decision on the model's own
    assert not any(c.startswith("screen_") for c in raw[0])
    assert [w for w in warnings if "screening columns" in w] == [
        "the model's own probabilities (not calibrated) leave out the screening columns (screen_osteoporosis, "
        "screen_osteopenia_or_worse): their thresholds were chosen on calibrated probabilities; predict without "
        "--no-calibration for them"]
    for row in raw:
        ref = val[str(Path(row["path"]).relative_to(phantom_dir))]
        assert row["status"] == "ok" and row["pred"] == ref["pred"]
        np.testing.assert_allclose([float(row[c]) for c in P], [float(ref[c]) for c in P], atol=1e-4)
    # by default the run's temperature is applied, and every operating point decides
    assert main(["predict", str(run), *files, "--out", str(tmp_path / "cal.csv")]) == 0
    cal = _rows(tmp_path / "cal.csv")
    t = run.read_calibration()["temperature"]
    want = apply_temperature(np.array([[float(r[c]) for c in P] for r in raw]), t)
    np.testing.assert_allclose([[float(r[c]) for c in P] for r in cal], want, atol=2e-6)
    assert {r["screen_osteoporosis"] for r in cal} <= {"positive", "negative"}
    assert "screen_osteopenia_or_worse" in cal[0]
    # each file says what its probabilities are (the two files' columns were the same)
    assert {r["probabilities"] for r in raw} == {"uncalibrated"}
    assert {r["probabilities"] for r in cal} == {f"calibrated (temperature {t:.4g}, fitted on validation)"}


def test_gradcam_overlays_name_the_layer_their_heat_is_of(run, phantom_dir, tmp_path, monkeypatch):
    """Each overlay's title names the layer and its grid; a map not of the last stage is a warning,
    worded as the report words it."""
    from osteo import explain
    from osteo.registry import get_backbone

    titles = []
    monkeypatch.setattr(explain, "overlay", lambda ax, image, heat, title="", **kw: titles.append(title))
    files = sorted((phantom_dir / "normal").iterdir())[:2]
    with osteo_warnings() as warnings:
        assert main(["predict", str(run), *map(str, files), "--out", str(tmp_path / "p.csv"),
                     "--gradcam", str(tmp_path / "cam")]) == 0
    from osteo.predict import load_best

    target = explain.gradcam_target(load_best(run), get_backbone(run.read_recipe().model.backbone))
    grid = f"heat on {target.layer} ({target.cells[0]}x{target.cells[1]})"
    assert len(titles) == 2 and all(t.endswith(grid) for t in titles), titles
    assert target.layer == target.last and not [w for w in warnings if w.startswith("Grad-CAM")]
    # an input too small for the last stage's map: the heat is of an earlier layer, and said
    coarse = explain.Target(target.layer, target.cells, "the_last_stage", (2, 2))
    monkeypatch.setattr(explain, "gradcam_target", lambda model, spec: coarse)
    with osteo_warnings() as warnings:
        assert main(["predict", str(run), *map(str, files), "--out", str(tmp_path / "p2.csv"),
                     "--gradcam", str(tmp_path / "cam2")]) == 0
    assert warnings == [f"Grad-CAM: {coarse.describe(32)}"]
    assert "the last stage (the_last_stage) is 2x2 at 32 px" in warnings[0]


def test_a_predict_that_fails_while_writing_its_overlays_leaves_the_previous_calls_files(run, phantom_dir,
                                                                                           tmp_path, monkeypatch,
                                                                                           capsys):
    """The disk fills up at the second overlay of a call: the first call's overlays and CSV stay, all
    of them (some overlays of the second call beside the first's CSV had disagreed with it)."""
    import errno

    from osteo import explain

    files = sorted((phantom_dir / "normal").iterdir())[:3]
    args = ["predict", str(run), *map(str, files), "--out", str(tmp_path / "p.csv"), "--gradcam", str(tmp_path / "cam")]
    assert main(args) == 0
    written = lambda: {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = written()
    assert len([n for n in before if n.endswith(".png")]) == 3
    real, calls = explain.atomic_path, []

    def fills_up(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(explain, "atomic_path", fills_up)
    capsys.readouterr()
    assert main([*args, "--no-calibration"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert written() == before  # the first overlay went back, the CSV was not replaced; no temporary left


def test_a_run_trained_in_bfloat16_records_the_probabilities_predict_gives(phantom_dir, tmp_path, tiny_recipe):
    """Its temperature and thresholds are chosen on the outputs they are applied to: predict,
    eval and export run float32 (the run's own predictions came from its bfloat16 model, 4e-4 away)."""
    r = tiny_recipe(phantom_dir, tmp_path / "runs", epochs=1, bootstrap=20, precision="mixed_bfloat16")
    run = RunDir(Trainer(r).run())
    assert run.read_env()["precision"] == "mixed_bfloat16"
    val = {r["path"]: r for r in _rows(run.predictions_path) if r["split"] == "val"}
    out = tmp_path / "raw.csv"
    assert main(["predict", str(run), *[str(phantom_dir / p) for p in val], "--out", str(out), "--no-calibration"]) == 0
    for row in _rows(out):
        ref = val[str(Path(row["path"]).relative_to(phantom_dir))]
        np.testing.assert_allclose([float(row[c]) for c in P], [float(ref[c]) for c in P], atol=1e-5)


def test_a_file_named_with_a_leading_dash_is_told_how_to_name_it(run, phantom_dir, tmp_path, monkeypatch, capsys):
    from helpers import one_line

    monkeypatch.chdir(tmp_path)
    shutil.copy(next((phantom_dir / "normal").iterdir()), tmp_path / "-knee.png")
    for args in (["-knee.png"], ["ok.png", "-knee.png"]):  # alone: "images" missing; after one: unrecognized
        assert main(["predict", str(run), *args]) == 2
        assert "-knee.png is a file, read as an option: name it ./-knee.png" in one_line(capsys)
    assert main(["predict", str(run), "./-knee.png", "--out", "p.csv"]) == 0


def test_a_run_trained_with_another_image_decoding_is_said_once(run, phantom_dir, tmp_path):
    import json

    from helpers import copy_run, osteo_warnings

    from osteo import predict

    old = copy_run(run, tmp_path / "runs")
    env = json.loads(old.env_path.read_text())
    old.env_path.write_text(json.dumps({k: v for k, v in env.items() if k != "image_decoding"}))  # before v4
    predict._SAID_DECODING.clear()
    with osteo_warnings() as said:
        for out in ("a.csv", "b.csv"):
            assert main(["predict", str(old), str(phantom_dir / "normal"), "--out", str(tmp_path / out)]) == 0
    assert [s for s in said if "image decoding v3, and images now decode as v5 (images of more than 8 bits (non-DICOM) "
                                "stretched from their own range, EXIF orientation applied; DICOM padding left out" in s] == [said[0]]
    predict._SAID_DECODING.clear()
    with osteo_warnings() as said:  # the run as trained now: nothing to say
        assert main(["predict", str(run), str(phantom_dir / "normal"), "--out", str(tmp_path / "c.csv")]) == 0
    assert not [s for s in said if "image decoding" in s]
    # trained under v4 on JPEGs, which v5's changes (DICOM, 16-bit colour PNGs, hidden files) leave as they were:
    # nothing to say; its manifest with a DICOM file among them: said (the phantom's PNGs, named JPEGs here)
    old.env_path.write_text(json.dumps({**env, "image_decoding": "v4"}))
    old.manifest_path.write_text(old.manifest_path.read_text().replace(",png,", ",jpeg,"))
    predict._SAID_DECODING.clear()
    with osteo_warnings() as said:
        assert main(["predict", str(old), str(phantom_dir / "normal"), "--out", str(tmp_path / "d.csv")]) == 0
    assert not [s for s in said if "image decoding" in s]
    lines = old.manifest_path.read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    first[header.index("format")] = "dicom"
    old.manifest_path.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    with osteo_warnings() as said:
        assert main(["predict", str(old), str(phantom_dir / "normal"), "--out", str(tmp_path / "e.csv")]) == 0
    assert [s for s in said if "image decoding v4, and images now decode as v5 (DICOM padding" in s]


def test_a_linked_folder_is_predicted_once_as_the_audit_follows_it(run, phantom_dir, tmp_path):
    folder = tmp_path / "clinic"
    folder.mkdir()
    (folder / "linked").symlink_to(phantom_dir / "normal", target_is_directory=True)
    (folder / "again").symlink_to(phantom_dir / "normal", target_is_directory=True)  # the same folder twice
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out)]) == 0
    rows = _rows(out)
    n = len(list((phantom_dir / "normal").iterdir()))
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    assert len({Path(r["path"]).name for r in rows}) == n


def test_folders_recursively_dicom_tta_and_gradcam(run, phantom_dir, tmp_path):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "clinic"
    shutil.copytree(phantom_dir / "osteoporosis", folder / "a" / "b")
    shutil.copy(get_testdata_file("MR_small.dcm", download=False), folder / "scan.dcm")
    twin = next((folder / "a" / "b").iterdir())
    (folder / "c").mkdir()
    shutil.copy(twin, folder / "c" / twin.name)  # one name in two folders
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--tta", "--gradcam", str(tmp_path / "cam")]) == 0
    rows = _rows(out)
    n = len(list((phantom_dir / "osteoporosis").iterdir())) + 2
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    assert any(r["path"].endswith("scan.dcm") for r in rows)
    probs = np.array([[float(r[c]) for c in P] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    overlays = list((tmp_path / "cam").glob("*.png"))
    assert len(overlays) == n
    # each row names its overlay: two images of one name in two folders, two overlays
    assert sorted(r["gradcam"] for r in rows) == sorted(o.name for o in overlays)
    assert sorted(r["gradcam"] for r in rows if Path(r["path"]).name == twin.name) == [
        f"{twin.stem}-2.png", f"{twin.stem}.png"]
    # TTA averages other views: not the plain prediction
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "plain.csv")]) == 0
    plain = np.array([[float(r[c]) for c in P] for r in _rows(tmp_path / "plain.csv")])
    assert np.abs(plain - probs).max() > 1e-4


def test_a_decoder_failure_no_one_expected_is_that_files_reason_not_the_end_of_predict(tmp_path, monkeypatch):
    """A decoder raising what osteo does not expect (a library's bug, a new exception type) leaves
    that file out with its reason, as the audit does, and the other files are read."""
    from PIL import Image

    from osteo.data import pipeline
    from osteo.predict import load_images

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    for f in (good, bad):
        Image.fromarray(np.tile(np.arange(40, dtype=np.uint8), (40, 1))).save(f)
    real = pipeline.load_levels

    def flaky(data, size, resize):
        if data == bad.read_bytes() and size == 32:
            raise ValueError("UID is not a transfer syntax.")
        return real(data, size, resize)

    bad.write_bytes(bad.read_bytes() + b"\0")  # other bytes than good's
    monkeypatch.setattr(pipeline, "load_levels", flaky)
    images, reasons = load_images([good, bad], 32, "pad")
    assert images[0] is not None and images[1] is None
    assert reasons == ["", "decode failed: ValueError: UID is not a transfer syntax."]


def test_a_folder_that_cannot_be_listed_is_a_warning_and_exit_status_1(run, phantom_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """Its images have no row, as an unreadable file has no prediction: the exit status says so (it
    was 0); a folder named that cannot be listed finds nothing, and the error says why."""
    from helpers import cannot_list

    knees = sorted((phantom_dir / "normal").iterdir())[:2]
    (tmp_path / "in" / "locked").mkdir(parents=True)
    shutil.copy(knees[0], tmp_path / "in" / knees[0].name)
    shutil.copy(knees[1], tmp_path / "in" / "locked" / knees[1].name)
    cannot_list(monkeypatch, "locked")
    out = tmp_path / "p.csv"
    with osteo_warnings() as said:
        assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(out)]) == 1
    assert [Path(r["path"]).name for r in _rows(out)] == [knees[0].name]
    assert said == [f"cannot list {tmp_path / 'in' / 'locked'}: Permission denied; its files are not predicted"]
    capsys.readouterr()
    assert main(["predict", str(run), str(tmp_path / "in" / "locked"), "--out", str(tmp_path / "q.csv")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"osteo: error: no file could be found: {tmp_path / 'in' / 'locked'} cannot be listed (each said above); "
        "make them readable (chmod), or pass other folders")
    assert not (tmp_path / "q.csv").exists()


def test_a_name_that_is_not_utf8_below_the_folder_named_is_unreadable_and_one_above_it_is_fine(run, phantom_dir,
                                                                                                 tmp_path):
    """Its row used to be written with \\xNN escapes, the real name of another file (one with a
    backslash in it). Now it is unreadable with the audit's reason and fix, the look-alike is
    predicted, and a folder above the one named may be called anything (as the audit's data folder)."""
    import os

    from osteo.export_predict import NOT_UTF8, shown

    knee = sorted((phantom_dir / "normal").iterdir())[0]
    above = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    odd = Path(os.fsdecode(os.fsencode(above) + b"/in/a\xff.png"))
    look_alike = above / "in" / "a\\xff.png"
    odd.parent.mkdir(parents=True)
    for f in (odd, look_alike):
        shutil.copy(knee, f)
    out = tmp_path / "p.csv"
    with osteo_warnings() as said:
        assert main(["predict", str(run), str(above / "in"), "--out", str(out)]) == 1
    rows = {(r["path"], r["status"], r["reason"]) for r in _rows(out)}
    assert rows == {(shown(look_alike), "ok", ""), (shown(odd), "unreadable", NOT_UTF8)}
    assert said == [f"1 of 2 files are unreadable and have no prediction (status=unreadable, with the reason, in {out})"]
    assert main(["predict", str(run), str(odd), "--out", str(tmp_path / "q.csv")]) == 2  # the file named alone
    assert [r["reason"] for r in _rows(tmp_path / "q.csv")] == [NOT_UTF8]


def test_a_blank_or_transparent_image_is_predicted_and_its_row_and_one_warning_say_so(run, phantom_dir, tmp_path):
    """An image whose every pixel holds one gray level (8-bit, or 16-bit, which decodes to black)
    gets its prediction all the same, as the audit trains on it, but its row's reason says it is
    blank and one warning line names it; a radiograph, and an image one pixel off its level (off
    the middle row the check starts with), are not blank. An image with transparent pixels,
    read by its colour as training reads it, is said likewise."""
    from PIL import Image

    from osteo.predict import BLANK, TRANSPARENT

    folder = tmp_path / "clinic"
    folder.mkdir()
    knee = next((phantom_dir / "normal").iterdir())
    shutil.copy(knee, folder / knee.name)
    Image.fromarray(np.full((48, 40), 200, np.uint8)).save(folder / "flat8.png")
    Image.fromarray(np.full((48, 40), 3000, np.uint16)).save(folder / "flat16.png")
    one_off = np.full((48, 40), 200, np.uint8)
    one_off[3, 5] = 201
    Image.fromarray(one_off).save(folder / "one_off.png")
    cut = np.dstack([np.asarray(Image.open(knee).convert("L").resize((40, 48)))] * 3 + [np.full((48, 40), 255, np.uint8)])
    cut[:4, :4, 3] = 0
    Image.fromarray(cut).save(folder / "cut.png")
    out = tmp_path / "p.csv"
    with osteo_warnings() as said:
        assert main(["predict", str(run), str(folder), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert all(r["status"] == "ok" and r["pred"] in CLASSES for r in rows.values())
    assert {name for name, r in rows.items() if r["reason"] == BLANK} == {"flat8.png", "flat16.png"}
    assert rows["cut.png"]["reason"] == TRANSPARENT
    assert all(rows[name]["reason"] == "" for name in (knee.name, "one_off.png"))
    (line,) = [w for w in said if "are blank" in w]  # (the test's own folder is named blank too)
    assert line.startswith("2 image(s) are blank") and "flat8.png" in line and "flat16.png" in line
    assert "one_off.png" not in line
    (line,) = [w for w in said if "have transparent" in w]
    assert line.startswith("1 image(s) have transparent pixels") and "cut.png" in line
