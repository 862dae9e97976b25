import json
import re
import subprocess
import sys

import pytest
from helpers import one_line

from osteo.cli import main


def test_phantom_then_audit(tmp_path, capsys):
    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "12", "--size", "48", "--seed", "2"]) == 0
    assert len(list((tmp_path / "ph").rglob("*.png"))) == 12
    assert main(["data", "audit", str(tmp_path / "ph"), "--out", str(tmp_path / "audit")]) == 0
    out = capsys.readouterr().out
    assert "12 files: 12 readable" in out
    assert "  ignored (not images by their name or bytes, hidden or system files and folders, or outside the class " \
        "folders; audit.json lists them): latents.csv" in out  # what it did not read, said where it is read
    assert "patients:" not in out  # PNGs: no PatientID to group by
    assert out.splitlines()[0].strip()  # no blank line left by a progress bar where there is no terminal
    info = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert sum(info["classes"].values()) == 12
    # another folder's audit into the same --out, whose audit.json cannot be replaced (immutable): nothing
    # replaced, not that folder's manifest beside this one's audit.json
    from helpers import immutable

    assert main(["data", "phantom", str(tmp_path / "ph2"), "--n", "15", "--size", "48", "--seed", "3"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "audit").iterdir()}
    with immutable(tmp_path / "audit" / "audit.json"):
        assert main(["data", "audit", str(tmp_path / "ph2"), "--out", str(tmp_path / "audit")]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "audit").iterdir()} == before
    # what a killed audit left there (its writer's temporary, the copies it kept) goes with the next audit
    import os

    left = [tmp_path / "audit" / f".{name}.kept-999999-00ff.tmp{ext}" for name, ext in (("audit", ".json"),
                                                                                        ("manifest", ".csv"))]
    for p in left:
        p.write_text("kept")
        os.utime(p, (1e9, 1e9))  # touched long before this process began, by a process gone since
    assert main(["data", "audit", str(tmp_path / "ph2"), "--out", str(tmp_path / "audit")]) == 0
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["audit.json", "manifest.csv"]
    # a folder of a user's own manifest.csv and audit.json (not an audit's): not replaced, and said
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("patient,file\nP1,a.png\n")
    (mine / "audit.json").write_text('{"reviewed": true}')
    capsys.readouterr()
    assert main(["data", "audit", str(tmp_path / "ph2"), "--out", str(mine)]) == 2
    assert "holds manifest.csv, audit.json, which osteo did not write and would replace" in one_line(capsys)
    assert (mine / "manifest.csv").read_text() == "patient,file\nP1,a.png\n"


def test_split_command_writes_split_csv(tmp_path, capsys):
    main(["data", "phantom", str(tmp_path / "ph"), "--n", "30", "--size", "48"])
    assert main(["data", "split", str(tmp_path / "ph"), "--out", str(tmp_path / "split.csv"), "--seed", "1"]) == 0
    lines = (tmp_path / "split.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,group" and len(lines) == 31
    # a fold counted as osteo train counts them (fold-1/ ... fold-K/): data split's fold 1 is train's fold-1
    from osteo.data.scan import audit
    from osteo.data.split import split_rows

    rows = audit(tmp_path / "ph").manifest_rows()
    for fold in (1, 3):
        out = tmp_path / f"fold{fold}.csv"
        assert main(["data", "split", str(tmp_path / "ph"), "--out", str(out), "--folds", "3", "--fold", str(fold)]) == 0
        val = {ln.split(",")[0] for ln in out.read_text().splitlines()[1:] if ln.split(",")[2] == "val"}
        assert val == {r["path"] for r in split_rows(rows, folds=3, fold=fold - 1)[0] if r["split"] == "val"}
    assert main(["data", "split", str(tmp_path / "ph"), "--out", str(out), "--folds", "3", "--fold", "4"]) == 2
    # an --out that is an image, or any file but a split, is somebody's: not replaced (a split is: asked)
    image = next((tmp_path / "ph" / "normal").glob("*.png"))
    (tmp_path / "notes.txt").write_text("mine")
    import shutil

    shutil.copy(image, tmp_path / "knee.png")
    for target, said in ((tmp_path / "knee.png", r"is an image \(png\), which this would replace"),
                         (tmp_path / "notes.txt", "is not a split osteo wrote")):
        before = target.read_bytes()
        capsys.readouterr()
        assert main(["data", "split", str(tmp_path / "ph"), "--out", str(target)]) == 2
        assert re.search(said, one_line(capsys)) and target.read_bytes() == before
    (tmp_path / "empty.csv").write_text("")  # an empty file (mktemp's) holds nothing to lose: written
    assert main(["data", "split", str(tmp_path / "ph"), "--out", str(tmp_path / "empty.csv")]) == 0
    assert (tmp_path / "empty.csv").read_text().startswith("path,label,split,group")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["data", "audit", "/no/such/folder"], "does not exist"),
        (["data", "phantom", "X", "--bogus"], "unrecognized arguments: --bogus (see 'osteo data phantom --help')"),
        (["--frobnicate"], "unknown option --frobnicate: options go after the command"),
        (["data", "phantom", "X", "--proportions", "1,x"], "comma-separated"),
        (["data", "phantom", "X", "--proportions", "1,2"], "proportions"),
        (["data", "split", "X", "--folds", "3", "--fold", "0"], "--fold: must be 1 or more"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "osteo.cli", *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_folder_without_class_folders_exits_2(tmp_path, capsys):
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "a.txt").write_text("x")
    assert main(["data", "audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no class folders" in err and "(it has misc/)" in err  # what it found instead, to be renamed


def test_a_phantom_inside_a_datasets_class_folder_is_refused(tmp_path, capsys):
    """Its images of every class would be read as that folder's class by the dataset's audit and training."""
    assert main(["data", "phantom", str(tmp_path / "knees"), "--n", "12", "--size", "48"]) == 0
    inside = tmp_path / "knees" / "normal" / "ph"
    assert main(["data", "phantom", str(inside), "--n", "12", "--size", "48"]) == 2
    err = capsys.readouterr().err
    assert f"{inside} is inside {tmp_path / 'knees' / 'normal'}, a class folder of the dataset" in err
    assert not inside.exists()
    # a folder merely named like a class, in no dataset, is no class folder
    assert main(["data", "phantom", str(tmp_path / "normal" / "ph"), "--n", "12", "--size", "48"]) == 0


def test_a_said_line_stays_one_line_in_a_log(capsys, monkeypatch):
    """Training's messages (a warning of a kept data fault, the headline's provenance) run past the
    200 columns of a log: each stays one line, for grep, as a terminal shows it wrapped."""
    from osteo.cli import _console, _say

    monkeypatch.delenv("COLUMNS", raising=False)
    text = "one message " * 40  # 480 characters
    _say(_console())(text.strip())
    assert capsys.readouterr().out.splitlines() == [text.strip()]


def test_audit_strict_exits_1_on_the_datas_own_faults_and_writes_its_report_all_the_same(tmp_path, capsys):
    """`osteo data audit --strict` is for scripts and CI: the faults a study trained on the data
    inherits (an image filed under two classes, the published notebook's; a file that cannot be
    read; a blank image; a class without images) are exit status 1 and one stderr line, the report
    written all the same; clean data, or the same audit without --strict, exit 0."""
    import shutil

    import numpy as np
    from PIL import Image

    ph = tmp_path / "ph"
    assert main(["data", "phantom", str(ph), "--n", "12", "--size", "48", "--seed", "2"]) == 0
    assert main(["data", "audit", str(ph), "--out", str(tmp_path / "clean"), "--strict"]) == 0
    first = sorted((ph / "normal").glob("*.png"))[0]
    shutil.copy(first, ph / "osteopenia" / "copy.png")  # byte for byte, under another class
    (ph / "osteoporosis" / "cut.png").write_bytes(first.read_bytes()[:60])
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(ph / "osteoporosis" / "flat.png")
    capsys.readouterr()
    assert main(["data", "audit", str(ph), "--out", str(tmp_path / "a"), "--strict"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"osteo: audit --strict: 1 duplicate group with conflicting labels, 1 unreadable file, 1 blank "
                       f"image (listed in {tmp_path / 'a' / 'audit.json'}); fix the data, or audit without --strict")
    info = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert len(info["unreadable"]) == 1 and info["blank"] == ["osteoporosis/flat.png"]
    assert main(["data", "audit", str(ph), "--out", str(tmp_path / "b")]) == 0  # a report, not a verdict
    for p in (ph / "osteoporosis").iterdir():
        p.unlink()
    assert main(["data", "audit", str(ph), "--out", str(tmp_path / "c"), "--strict"]) == 1
    assert "1 duplicate group with conflicting labels, no readable images of osteoporosis (" in capsys.readouterr().err
