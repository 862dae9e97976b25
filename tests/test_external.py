"""External validation: a trained run scored on another hospital's folder."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import copy_run, immutable

from osteo.cli import main
from osteo.data.phantom import write_phantom
from osteo.runs import PREDICTION_COLUMNS, RunDir
from osteo.trainer import Trainer


@pytest.fixture(scope="module")
def run(phantom_dir, tmp_path_factory, tiny_recipe):
    return RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=50)).run())


def test_another_folder_is_scored_with_the_runs_own_images_left_out(run, phantom_dir, tmp_path, capsys):
    run = copy_run(run, tmp_path / "mine")  # its report lists every folder the run was scored on: this test's alone
    other = tmp_path / "hospital-b"
    write_phantom(other, n=45, size=64, seed=7, proportions=(1, 1, 3))  # another seed, other proportions
    split = run.read_split()
    used = [r["path"] for r in split if r["split"] == "train"][:3] + [r["path"] for r in split if r["split"] == "val"][:2]
    for i, p in enumerate(used):  # three training and two validation images of the run, renamed, in a class
        shutil.copy(phantom_dir / p, other / p.split("/")[0] / f"copied-{i}.png")  # folder (these chose for it)
    (other / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["eval", str(run), "--data", str(other), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "5 image(s) also in the run's data (its training, validation or test split) left out" in printed
    # the numbers of the probabilities themselves are of the model's own, as predictions.csv keeps them
    assert printed.count("(uncalibrated)") == 4  # ROC-AUC, log loss, Brier and ECE (a narrow table wraps labels)
    out = run.eval_path / "hospital-b"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["excluded_training_overlap"] == 5 and metrics["unreadable"] == 1
    assert (metrics["evaluated_on"], metrics["chose"]) == ("external: hospital-b", "nothing")
    assert metrics["external"]["n"] == 45 and metrics["external"]["probabilities"] == "uncalibrated"
    assert metrics["external"]["majority_baseline"]["class"] == "osteoporosis"  # that folder's majority
    lo, hi = metrics["external"]["balanced_accuracy_ci"]
    assert lo <= metrics["external"]["balanced_accuracy"] <= hi
    assert {p["name"] for p in metrics["operating_points"]} == {"osteoporosis", "osteopenia+"}
    for p in metrics["operating_points"]:  # the validation threshold at work on this folder, with intervals
        assert p["n"] == 45 and 0 <= p["sensitivity"] <= 1 and 0 <= p["specificity"] <= 1
        assert p["sensitivity_ci"][0] <= p["sensitivity"] <= p["sensitivity_ci"][1]
        assert p["specificity_ci"][0] <= p["specificity"] <= p["specificity_ci"][1]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == (*PREDICTION_COLUMNS, "probabilities") and len(rows) == 45
    assert {(r["split"], r["probabilities"]) for r in rows} == {("external", "uncalibrated")}  # the run's as trained
    assert not any("copied" in r["path"] for r in rows)
    audit = json.loads((out / "audit.json").read_text())
    assert audit["n_files"] == 45 + len(used) + 1 and [u["path"] for u in audit["unreadable"]] == ["normal/broken.png"]
    assert "hospital-b" in run.model_card_path.read_text()
    # the report shows it beside the run's own validation, saying which data each row was scored on
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--bootstrap", "50"]) == 0
    with open(tmp_path / "rep" / "comparison.csv", newline="") as f:
        scored_on = {r["evaluated_on"]: r for r in csv.DictReader(f)}
    assert set(scored_on) == {"validation", "external: hospital-b"}
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")  # the folder's images left out, and why
    assert (f"data: {other.resolve()} (external: hospital-b, scored by tiny {run.name})" in page and "Scored: 45 images. Left out: 5 also in "
            "the run's own data" in page and "0 filed under two classes (their label is unknown), 1 unreadable" in page)
    assert scored_on["external: hospital-b"]["run_id"] == run.name
    assert scored_on["external: hospital-b"]["chose"] == "nothing"
    # two runs scored on one folder: its audit once for each (what a score left out is that run's data)
    twin = RunDir(shutil.copytree(run.path, run.path.with_name(run.name + "-twin")))
    assert main(["report", str(run), str(twin), "--out", str(tmp_path / "rep2"), "--bootstrap", "0"]) == 0
    page2 = (tmp_path / "rep2" / "index.html").read_text(encoding="utf-8")
    assert [page2.count(f"data: {other.resolve()} (external: hospital-b, scored by tiny {r.name})</h3>")
            for r in (run, twin)] == [1, 1]
    shutil.rmtree(twin.path)
    said = (tmp_path / "rep" / "verdict.txt").read_text(encoding="utf-8")
    assert f"On the external folder hospital-b (n=45, which chose nothing): tiny ({run.name})" in said
    assert "Always answering osteoporosis (that folder's majority)" in " ".join(said.split())
    with open(tmp_path / "rep" / "operating_points.csv", newline="") as f:
        points = {(r["evaluated_on"], r["point"]) for r in csv.DictReader(f)}
    assert points == {(where, p) for where in ("validation", "external: hospital-b")
                      for p in ("osteoporosis", "osteopenia+")}
    # test-time augmentation on the same folder: other probabilities, same schema, beside the plain
    # scoring (not in its place), and said wherever its numbers are shown: the run's temperature and
    # thresholds were fitted without it
    plain = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(other), "--tta", "--bootstrap", "50"]) == 0
    assert "chosen on validation without test-time augmentation), on " in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == plain
    tta = json.loads((run.eval_path / "hospital-b-tta" / "metrics.json").read_text())
    assert tta["tta"] is True and tta["external"]["n"] == 45
    label = "external: hospital-b-tta (test-time augmentation)"
    assert tta["evaluated_on"] == label
    with open(run.eval_path / "hospital-b-tta" / "predictions.csv", newline="") as f:
        tta_rows = {r["path"]: r for r in csv.DictReader(f)}
    assert {r["probabilities"] for r in tta_rows.values()} == {"uncalibrated, averaged over test-time augmentation"}
    assert any(abs(float(tta_rows[r["path"]]["p_normal"]) - float(r["p_normal"])) > 1e-4 for r in rows)
    assert f"| {label} | nothing | 45 |" in run.model_card_path.read_text()
    assert main(["report", str(run), "--out", str(tmp_path / "rep-tta"), "--bootstrap", "0"]) == 0
    with open(tmp_path / "rep-tta" / "comparison.csv", newline="") as f:
        assert {r["evaluated_on"] for r in csv.DictReader(f)} == {"validation", "external: hospital-b", label}


def test_resized_copies_of_the_runs_images_are_left_out_too(run, phantom_dir, tmp_path, capsys):
    """A copy of a training image resized (or re-encoded) is no new hospital's image: scored as
    one, it counted as chose-nothing evidence. The audit's near-duplicate rule finds it; and the
    folder's images under 128 px, where that rule is weak, are said."""
    from PIL import Image

    run = copy_run(run, tmp_path / "mine")

    other = tmp_path / "hospital-c"
    write_phantom(other, n=30, size=64, seed=7)
    train = [r["path"] for r in run.read_split() if r["split"] == "train"][:4]
    for i, p in enumerate(train):
        img = Image.open(phantom_dir / p)
        img.resize((128, 128), Image.Resampling.BICUBIC).save(other / p.split("/")[0] / f"resized-{i}.png")
    first = sorted((other / "normal").iterdir())[0]
    shutil.copy(first, other / "normal" / "again.png")  # a copy of the folder's own: one draw with it
    assert main(["eval", str(run), "--data", str(other), "--bootstrap", "20"]) == 0
    said = capsys.readouterr()
    assert "4 image(s) also in the run's data (its training, validation or test split) left out (4 of them " \
           "re-encoded or resized copies)" in said.out
    # the phantom's 30 images of 64 px and its copy (the 4 resized to 128 px are left out before)
    assert ("31 of the images to score are under 128 px, where re-encoded or resized copies of the run's images are "
            "often not recognised (exact copies are): some such copies may be scored as new images; where the "
            "originals are larger, give those") in said.err, said.err
    metrics = json.loads((run.eval_path / "hospital-c" / "metrics.json").read_text())
    assert (metrics["excluded_near_copies"], metrics["near_copies_checked"], metrics["external"]["n"]) == (4, True, 31)
    assert metrics["external"]["ci"]["method"].startswith("stratified cluster bootstrap over 30 groups")
    # the run's data folder gone: exact copies are still left out, and a warning says the rest is not looked for
    moved = copy_run(run, tmp_path / "runs")
    for name, key in (("audit.json", None), ("recipe.json", "data")):
        record = json.loads((moved.path / name).read_text())
        (record[key] if key else record).update({"data_dir" if key is None else "dir": str(tmp_path / "nowhere")})
        (moved.path / name).write_text(json.dumps(record))
    assert main(["eval", str(moved), "--data", str(other), "--bootstrap", "20"]) == 0
    assert "is not where it was trained: re-encoded or resized copies of its images are not looked for" in (
        capsys.readouterr().err)
    metrics = json.loads((moved.eval_path / "hospital-c" / "metrics.json").read_text())
    assert (metrics["excluded_near_copies"], metrics["near_copies_checked"], metrics["external"]["n"]) == (0, False, 35)


def test_external_validation_refuses_a_folder_with_nothing_new(run, phantom_dir, tmp_path, capsys):
    same = tmp_path / "same"
    for p in [r["path"] for r in run.read_split() if r["split"] == "train"][:6]:
        (same / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(phantom_dir / p, same / p)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(same)]) == 2
    assert "no image of" in capsys.readouterr().err
    junk = tmp_path / "junk"
    (junk / "normal").mkdir(parents=True)
    (junk / "normal" / "a.png").write_bytes(b"not an image")
    assert main(["eval", str(run), "--data", str(junk)]) == 2
    err = capsys.readouterr().err  # nothing readable: the reason on screen, not only in audit.json
    assert "no image of" in err and "(0 readable" in err and "e.g. normal/a.png: " in err


def test_a_new_calibration_measures_the_external_folders_again(run, phantom_dir, tmp_path, capsys):
    """After `osteo calibrate` chose other thresholds, the model card and operating_points.csv
    showed an external folder's sensitivity and specificity at the old ones (and at a point
    that no longer existed)."""
    from osteo.calibrate import apply_temperature, operating_point_metrics
    from osteo.model_card import write_model_card

    copy = RunDir(shutil.copytree(run.path, tmp_path / "runs" / "tiny" / run.name, ignore=shutil.ignore_patterns("eval")))
    other = tmp_path / "hospital-c"
    write_phantom(other, n=45, size=64, seed=11, proportions=(1, 1, 3))
    assert main(["eval", str(copy), "--data", str(other), "--bootstrap", "20"]) == 0
    out = copy.eval_path / "hospital-c"
    before = json.loads((out / "metrics.json").read_text())
    assert {p["name"] for p in before["operating_points"]} == {"osteoporosis", "osteopenia+"}
    # the disk fills up as calibrate writes the folder's measures at the new thresholds: calibration.json,
    # written first, went back, and the card too (they would have disagreed with that folder's file)
    import errno

    import osteo.files

    files = lambda: {p: p.read_bytes() for p in copy.path.rglob("*") if p.is_file()}
    kept, writes = files(), osteo.files.write_json

    def full(path, obj):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes(path, obj)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(osteo.files, "write_json", full)
        assert main(["calibrate", str(copy), "--operating-point", "osteoporosis:sensitivity=0.6",
                     "--bootstrap", "20"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "write elsewhere" not in err  # calibrate writes in the run alone
    assert files() == kept  # every file as it was, and no temporary left
    assert main(["calibrate", str(copy), "--operating-point", "osteoporosis:sensitivity=0.6", "--bootstrap", "20"]) == 0
    assert "; measured again at it: hospital-c" in capsys.readouterr().out
    calibration = copy.read_calibration()
    (now,) = calibration["operating_points"]
    after = json.loads((out / "metrics.json").read_text())
    (point,) = after["operating_points"]
    assert point["name"] == "osteoporosis" and point["threshold"] == now["threshold"]
    assert after["calibrated"]["temperature"] == calibration["temperature"]
    assert after["external"] == before["external"]  # the argmax numbers do not depend on the calibration
    # the same numbers osteo eval gives at this calibration, from the stored probabilities
    y, raw, _ = RunDir(out).read_predictions("external")
    want = operating_point_metrics(y, apply_temperature(raw, calibration["temperature"]), now, 20, 0)
    assert point == json.loads(json.dumps(want))
    card = copy.model_card_path.read_text()
    assert card.count("on hospital-c (external: chose nothing)") == 1 and "earlier calibration" not in card

    # a record left at an earlier calibration (an eval file restored, a calibrate killed before it
    # reached the folder) is named as such, and left out of the report
    (out / "metrics.json").write_text(json.dumps({**after, "operating_points": [
        {**point, "threshold": point["threshold"] / 2}]}))
    write_model_card(copy)
    card = copy.model_card_path.read_text()
    assert "on hospital-c: measured at an earlier calibration" in card and "(external: chose nothing)" not in card
    assert main(["report", str(copy), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
    with open(tmp_path / "rep" / "operating_points.csv", newline="") as f:
        assert {r["evaluated_on"] for r in csv.DictReader(f)} == {"validation"}


def test_an_eval_during_which_the_run_is_calibrated_again_is_measured_at_the_new_calibration(run, tmp_path,
                                                                                                monkeypatch, capsys):
    """An eval reads the run's calibration when it loads the model; a calibrate that ran meanwhile
    measured the run's external validations again, but not this one, not yet written: it was left
    at the thresholds the calibrate had replaced, without a word. It is measured at the calibration
    in force when it writes (under the lock calibrate holds while it writes)."""
    from osteo import predict

    copy = RunDir(shutil.copytree(run.path, tmp_path / "runs" / "tiny" / run.name, ignore=shutil.ignore_patterns("eval")))
    other = tmp_path / "hospital-d"
    write_phantom(other, n=45, size=64, seed=12, proportions=(1, 1, 3))
    scored = predict.Predictor.predict_paths

    def calibrated_meanwhile(self, *args, **kwargs):
        out = scored(self, *args, **kwargs)
        assert main(["calibrate", str(copy), "--operating-point", "osteoporosis:sensitivity=0.6",
                     "--bootstrap", "20"]) == 0
        return out

    monkeypatch.setattr(predict.Predictor, "predict_paths", calibrated_meanwhile)
    assert main(["eval", str(copy), "--data", str(other), "--bootstrap", "20"]) == 0
    capsys.readouterr()
    calibration = copy.read_calibration()
    (now,) = calibration["operating_points"]
    record = json.loads((copy.eval_path / "hospital-d" / "metrics.json").read_text())
    assert [(p["name"], p["threshold"]) for p in record["operating_points"]] == [("osteoporosis", now["threshold"])]
    assert record["calibrated"]["temperature"] == calibration["temperature"]


def test_an_eval_written_outside_the_run_leaves_the_run_as_it_was(run, tmp_path, capsys):
    """eval --out elsewhere rewrote the run's model card (which lists only the run's own eval/):
    on a read-only run it wrote its folder, then failed with 'cannot write to' the run."""
    copy = RunDir(shutil.copytree(run.path, tmp_path / "runs" / "tiny" / run.name, ignore=shutil.ignore_patterns("eval")))
    other = tmp_path / "hospital-e"
    write_phantom(other, n=45, size=64, seed=13, proportions=(1, 1, 3))

    def files():
        return {p.relative_to(copy.path): (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.path.rglob("*")
                if p.is_file()}

    before = files()
    assert main(["eval", str(copy), "--data", str(other), "--out", str(tmp_path / "elsewhere"), "--bootstrap", "20"]) == 0
    capsys.readouterr()
    assert (tmp_path / "elsewhere" / "metrics.json").is_file() and files() == before


def test_a_second_folder_of_the_same_name_does_not_replace_the_firsts_validation(run, tmp_path, capsys):
    """eval --data siteA/ext, then siteB/ext: both go to RUN/eval/ext/ by default, and the second
    replaced the first without a word (osteo study refuses two such folders)."""
    copy = RunDir(shutil.copytree(run.path, tmp_path / "runs" / "tiny" / run.name, ignore=shutil.ignore_patterns("eval")))
    for site, seed in (("siteA", 14), ("siteB", 15)):
        write_phantom(tmp_path / site / "ext", n=45, size=64, seed=seed, proportions=(1, 1, 3))
    assert main(["eval", str(copy), "--data", str(tmp_path / "siteA" / "ext"), "--bootstrap", "20"]) == 0
    first = (copy.eval_path / "ext" / "metrics.json").read_bytes()
    assert json.loads(first)["data_dir"] == str((tmp_path / "siteA" / "ext").resolve())
    capsys.readouterr()
    assert main(["eval", str(copy), "--data", str(tmp_path / "siteB" / "ext"), "--bootstrap", "20"]) == 2
    err = capsys.readouterr().err
    assert f"holds the external validation of {(tmp_path / 'siteA' / 'ext').resolve()}, another folder" in err, err
    assert f"give --out {copy.eval_path}/<another name>" in err
    assert (copy.eval_path / "ext" / "metrics.json").read_bytes() == first
    # the same folder again is measured again, in place; without one class, what each average is over is said
    # and a class of fewer images than a run's own test split needs: said too (its intervals had zero width)
    shutil.rmtree(tmp_path / "siteA" / "ext" / "osteoporosis")
    for image in sorted((tmp_path / "siteA" / "ext" / "normal").iterdir())[5:]:
        image.unlink()
    assert main(["eval", str(copy), "--data", str(tmp_path / "siteA" / "ext"), "--bootstrap", "20"]) == 0
    err = capsys.readouterr().err
    assert ("has no osteoporosis images scored: ROC-AUC is left out; balanced accuracy averages the classes present, "
            "macro F1 all three (a class without images counts 0)") in err, err
    assert ("has fewer than 8 scored images of normal (5): one image moves that class's recall by 0.20 or more, so "
            "its numbers are coarse and their intervals wide (or of zero width); add images of those classes") in err
    # a model card that cannot be replaced (immutable): the eval's folder is not replaced either, the card
    # citing its numbers
    import errno

    kept = {p: p.read_bytes() for p in copy.path.rglob("*") if p.is_file()}
    with immutable(copy.model_card_path):
        assert main(["eval", str(copy), "--data", str(tmp_path / "siteA" / "ext"), "--bootstrap", "30"]) == 2
    said = capsys.readouterr().err  # the fix is the run's folder, not an --out (its card is in the run)
    assert "Operation not permitted" in said and f"make the run's folder {copy.path} writable" in said, said
    assert {p: p.read_bytes() for p in copy.path.rglob("*") if p.is_file()} == kept
    # the card's write fails (a full disk) after the folder was replaced: the previous folder comes back
    import osteo.predict

    def full(run):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.model_card_path))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(osteo.predict, "write_model_card", full)
        assert main(["eval", str(copy), "--data", str(tmp_path / "siteA" / "ext"), "--bootstrap", "30"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in copy.path.rglob("*") if p.is_file()} == kept


def test_a_folder_of_the_same_name_validated_while_this_eval_scores_is_not_replaced(run, tmp_path, monkeypatch):
    """eval --data siteB/ext checks RUN/eval/ext/ before it scores; siteA/ext's eval, run meanwhile, writes
    it: checked again under the folder lock, siteB's eval stops and siteA's validation stays."""
    from osteo.errors import OsteoError
    from osteo.predict import Predictor, evaluate_folder

    copy = RunDir(shutil.copytree(run.path, tmp_path / "runs" / "tiny" / run.name, ignore=shutil.ignore_patterns("eval")))
    for site, seed in (("siteA", 14), ("siteB", 15)):
        write_phantom(tmp_path / site / "ext", n=30, size=64, seed=seed)
    scoring, meanwhile = Predictor.predict_paths, []

    def predict_paths(self, paths, *args, **kwargs):  # siteB's, once past its first check: siteA's eval runs
        if not meanwhile:
            meanwhile.append("siteA")  # before: siteA's eval scores through here too
            evaluate_folder(copy.path, tmp_path / "siteA" / "ext", n_boot=0)
        return scoring(self, paths, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_paths", predict_paths)
    with pytest.raises(OsteoError, match=r"holds the external validation of .*siteA/ext, another folder than "):
        evaluate_folder(copy.path, tmp_path / "siteB" / "ext", n_boot=0)
    assert meanwhile and json.loads((copy.eval_path / "ext" / "metrics.json").read_text())["data_dir"] == str(
        (tmp_path / "siteA" / "ext").resolve())
    assert sorted(p.name for p in copy.eval_path.iterdir()) == ["ext"]  # no stage of siteB's left


def test_an_image_filed_under_two_classes_scores_nothing(run, tmp_path, capsys):
    """A class folder linked to another (or the same image copied into two): its label is unknown,
    so it is left out of the score, counted and said, as the split leaves it out of training."""
    other = tmp_path / "hospital-d"
    write_phantom(other, n=30, size=64, seed=13)
    n_osteoporosis = len(list((other / "osteoporosis").glob("*.png")))
    shutil.rmtree(other / "osteoporosis")
    (other / "osteoporosis").symlink_to(other / "osteopenia")
    n_osteopenia = len(list((other / "osteopenia").glob("*.png")))
    assert main(["eval", str(run.path), "--data", str(other), "--bootstrap", "0"]) == 0
    out = capsys.readouterr()
    metrics = json.loads((run.eval_path / "hospital-d" / "metrics.json").read_text())
    assert metrics["excluded_label_conflicts"] == 2 * n_osteopenia
    assert metrics["external"]["n"] == 30 - n_osteoporosis - n_osteopenia
    with open(run.eval_path / "hospital-d" / "predictions.csv", newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} == {"normal"}
    assert f"{2 * n_osteopenia} image(s) of {other} are filed under two classes" in " ".join(out.err.split())
    assert f"{2 * n_osteopenia} filed under two classes left out" in out.out


def test_a_killed_writers_leftovers_in_a_run_are_swept_by_the_next_command_that_writes_there(run, tmp_path):
    """A calibrate killed while it rewrote an external validation's metrics.json left a temporary
    there, and every later eval of that folder was refused ('holds ..., which osteo eval did not
    write'); a killed eval or export left the model card's, which only calibrate swept. Each
    command that writes a file now sweeps that file's leftovers; the folder it writes has the
    umask's mode, not mkdtemp's 0700."""
    import os
    import stat
    import subprocess
    import sys

    from osteo.files import umask

    copy = copy_run(run, tmp_path / "runs")
    other = tmp_path / "hospital-e"
    write_phantom(other, n=24, size=64, seed=14)
    assert main(["eval", str(copy.path), "--data", str(other), "--bootstrap", "0"]) == 0
    out = copy.eval_path / "hospital-e"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a process that has ended: a killed writer
    left = [out / f".metrics.{gone}-a1b2c3d4.tmp.json", copy.path / f".MODEL_CARD.{gone}-e5f6a7b8.tmp.md"]
    for path in left:
        path.write_text("half")
        os.utime(path, (0, 0))
    assert main(["eval", str(copy.path), "--data", str(other), "--bootstrap", "0"]) == 0
    assert not any(p.exists() for p in left)
    left[0].write_text("half")
    os.utime(left[0], (0, 0))
    assert main(["calibrate", str(copy.path), "--bootstrap", "0"]) == 0
    assert not left[0].exists()

