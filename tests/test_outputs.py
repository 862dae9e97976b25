"""osteo writes only what is its own: no output replaces a device, a FIFO, a run's files, an
input image or a file someone else put in an output folder; and what it writes is strict and quiet."""

import hashlib
import json
import os
import shutil
import stat

import pytest
from helpers import copy_run, one_line

from osteo.cli import main
from osteo.errors import OsteoError
from osteo.files import write_text
from osteo.runs import RunDir


def _digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_that_is_a_fifo_or_a_folder_is_refused_and_left_as_it_is(run, phantom_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """As root, --out /dev/full became a CSV file in place of the device: the atomic rename
    replaced whatever was there. A FIFO stands for the device here."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OsteoError, match="not a regular file"):
        write_text(fifo, "x")
    assert main(["predict", str(run), str(phantom_dir / "normal"), "--out", str(fifo)]) == 2
    assert "not a regular file (a device, FIFO or socket)" in one_line(capsys)
    monkeypatch.chdir(tmp_path)  # --out -: not a file named "-" here, nor a folder (data audit)
    for argv in (["predict", str(run), str(phantom_dir / "normal"), "--out", "-"],
                 ["data", "audit", str(phantom_dir), "--out", "-"]):
        assert main(argv) == 2
        assert "--out - is not standard output here: osteo writes files" in one_line(capsys) and \
            not os.path.lexists("-")
    assert main(["predict", str(run), str(phantom_dir / "normal"), "--out", "./-"]) == 0  # asked for by its path
    assert os.path.isfile("-")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["predict", str(run), str(phantom_dir / "normal"), "--out", str(folder)]) == 2
    assert "is a folder" in one_line(capsys)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_no_output_lands_in_a_run_folder_but_the_commands_own_place(run, phantom_dir, tmp_path, capsys):
    copy = copy_run(run, tmp_path)
    external = copy.eval_path / "hospital"  # an external validation, and a killed run's resume state
    RunDir(external).write_predictions([{"path": "normal/x.png", "label": "normal"}], [[0.5, 0.3, 0.2]], "external",
                                         "uncalibrated")
    before = _digest(copy.path)
    images = str(phantom_dir / "normal")
    cases = [
        (["predict", str(copy), images, "--out", str(external / "predictions.csv")], "inside the run"),
        (["predict", str(copy), images, "--out", str(copy.backup_path / "state.csv")], "inside the run"),
        (["predict", str(copy), images, "--out", str(copy.split_path)], "would overwrite the run's own split.csv"),
        (["predict", str(copy), images, "--out", "p.csv", "--gradcam", str(copy.path / "cams")], "inside the run"),
        (["report", str(run), "--out", str(copy.path / "report")], "inside the run"),
        (["data", "split", str(phantom_dir), "--out", str(copy.split_path)], "would overwrite"),
        (["eval", str(run), "--data", str(phantom_dir), "--out", str(external)], "inside the run"),
        (["eval", str(copy), "--data", str(phantom_dir), "--out", str(copy.eval_path)], "not a folder of"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line(capsys), argv
    assert _digest(copy.path) == before and not (copy.path / "cams").exists()
    theirs = tmp_path / "theirs"  # a folder of a user's own metrics.json: an eval --out would have replaced it
    theirs.mkdir()
    (theirs / "metrics.json").write_text('{"auc": 0.9}')
    assert main(["eval", str(copy), "--data", str(phantom_dir), "--out", str(theirs)]) == 2
    assert "holds metrics.json, which osteo did not write and would replace" in one_line(capsys)
    assert (theirs / "metrics.json").read_text() == '{"auc": 0.9}'
    from osteo.files import refuse_foreign_files
    from osteo.predict import EVAL_FILES

    older = tmp_path / "older"  # an older osteo's eval: no evaluated_on yet, which is no reason to refuse it
    older.mkdir()
    (older / "metrics.json").write_text(json.dumps({"run": str(copy.path), "data_dir": str(phantom_dir), "n": 3}))
    (older / "predictions.csv").write_text("path,label,pred,p_normal,p_osteopenia,p_osteoporosis,split\n")
    refuse_foreign_files(older, EVAL_FILES, "--out", "")


def test_gradcam_into_the_images_folder_never_replaces_an_image(run, phantom_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(phantom_dir / "normal", images)
    before = _digest(images)
    assert main(["predict", str(run), str(images), "--gradcam", str(images), "--out", str(tmp_path / "p.csv")]) == 2
    assert "the folder the command reads images from" in one_line(capsys)
    assert _digest(images) == before and not (tmp_path / "p.csv").exists()
    cams = tmp_path / "cams"
    for _ in range(2):  # its own overlays it replaces
        assert main(["predict", str(run), str(images), "--gradcam", str(cams), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(list(cams.glob("*.png"))) == len(before)


def test_no_output_lands_where_osteo_would_read_it_as_images(run, phantom_dir, tmp_path, capsys):
    """Report plots and Grad-CAM overlays written into a class folder became that class's
    training images at the next audit; a run inside its own data folder met its plots there."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    before = _digest(data)
    normal = data / "normal"
    cases = [
        (["report", str(run), "--out", str(normal / "rep"), "--bootstrap", "20"], "a class folder of the dataset"),
        (["data", "audit", str(data), "--out", str(normal / "aud")], "a class folder of the dataset"),
        (["data", "audit", str(data), "--out", str(normal)], "a class folder of the dataset"),
        (["export", str(run), "--out", str(normal / "m.onnx")], "a class folder of the dataset"),
        (["predict", str(run), str(phantom_dir / "normal"), "--out", "p.csv", "--gradcam", str(normal / "gc")],
         "a class folder of the dataset"),
        (["eval", str(run), "--data", str(data), "--out", str(data / "ev")], "the folder the command reads"),
        (["train", "tiny", "--data", str(data), "--runs", str(data / "runs"), "--weights", "none",
          "--image-size", "32"], f"the folder the command reads images from, where osteo would meet what it "
                                 f"writes at every audit; write outside it, e.g. --runs {tmp_path / 'runs'}"),
        # the data folder itself: the suggestion is another folder, not the one refused
        (["train", "tiny", "--data", str(data), "--runs", str(data), "--weights", "none", "--image-size", "32"],
         f"write outside it, e.g. --runs {tmp_path / 'data-runs'}"),
        # a report of runs trained on a folder, written into that folder
        (["report", str(run), "--out", str(phantom_dir / "rep"), "--bootstrap", "20"], "the folder the command reads"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = one_line(capsys)
        assert message in line and "; " in line, (argv, line)
    assert _digest(data) == before and sorted(p.name for p in data.iterdir()) == sorted(
        p.name for p in phantom_dir.iterdir())
    # a folder merely named like a class, with no class folder beside it, is no dataset
    assert main(["data", "audit", str(data), "--out", str(tmp_path / "normal")]) == 0
    capsys.readouterr()
    # a class folder that links elsewhere: the folder it reaches is named as anything, and audited as the class
    store = tmp_path / "store" / "scans-2024"
    shutil.move(data / "osteoporosis", store)
    (data / "osteoporosis").symlink_to(store, target_is_directory=True)
    before = _digest(store)
    for argv in (["eval", str(run), "--data", str(data), "--out", str(store / "ev")],
                 ["data", "audit", str(data), "--out", str(store / "aud")]):
        assert main(argv) == 2, argv
        line = one_line(capsys)
        assert f"is inside {store}, where {data / 'osteoporosis'}, a class folder of {data}, links" in line, line
    assert _digest(store) == before and sorted(p.name for p in store.parent.iterdir()) == ["scans-2024"]


def test_a_report_replaces_only_what_an_earlier_report_wrote(run, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["report", str(run), "--out", str(out), "--bootstrap", "20"]
    assert main(args) == 0
    (out / "notes.txt").write_text("the user's")  # beside the report: kept
    (out / "plots" / "mine.png").write_text("the user's too")  # in plots/, which a report replaces whole
    page = (out / "index.html").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "plots/mine.png, which osteo did not write" in one_line(capsys)
    assert (out / "plots" / "mine.png").read_text() == "the user's too" and (out / "index.html").read_bytes() == page
    (out / "plots" / "mine.png").unlink()
    assert main(args) == 0
    assert (out / "notes.txt").read_text() == "the user's"
    fresh = tmp_path / "other"
    fresh.mkdir()
    (fresh / "index.html").write_text("someone's page")
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(fresh), "--bootstrap", "20"]) == 2
    assert "index.html, which osteo did not write" in one_line(capsys)
    assert (fresh / "index.html").read_text() == "someone's page"


# --------------------------------------------------------------------------- strict and quiet


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_an_external_folder_of_one_class_is_strict_json_and_one_warning_line(run, other_hospital_dir, tmp_path,
                                                                            capsys):
    folder = tmp_path / "one-class"
    shutil.copytree(other_hospital_dir / "normal", folder / "normal")
    copy = copy_run(run, tmp_path)
    assert main(["eval", str(copy), "--data", str(folder), "--bootstrap", "20"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("osteo: warning:") for line in err), err
    err = [line for line in err if "under 128 px" not in line]  # the phantom's 64 px images: said too
    assert len(err) == 1 and "no osteopenia or osteoporosis" in err[0], err
    metrics = _strict_json(copy.eval_path / "one-class" / "metrics.json")
    for point in metrics["operating_points"]:
        assert point["sensitivity"] is None and point["undefined"] == "sensitivity: no positive images"
    assert metrics["external"]["roc_auc"] is None


@pytest.mark.heavy
def test_a_report_of_many_rows_prints_no_library_warning(run, other_hospital_dir, tmp_path):
    """In a real process (pytest records warnings itself): matplotlib's tight_layout warning
    reached the terminal with a grid of several rows."""
    import subprocess
    import sys

    runs = [copy_run(run, tmp_path / name) for name in ("a", "b", "c")]
    assert main(["eval", str(runs[0]), "--data", str(other_hospital_dir), "--bootstrap", "20"]) == 0
    proc = subprocess.run([sys.executable, "-m", "osteo.cli", "report", *map(str, runs), "--out", str(tmp_path / "rep"),
                           "--bootstrap", "20"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
