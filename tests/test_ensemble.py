"""A cross-validation's fold models as one model on another folder: osteo eval CV --data FOLDER."""

import csv
import json
import shutil

import numpy as np
import pytest

from osteo.cli import main
from osteo.data.phantom import write_phantom
from osteo.files import write_json
from osteo.runs import PROB_COLUMNS, CvDir


@pytest.fixture(scope="module")
def cv(phantom_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", "seed", "--model", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1",
                 "--data", str(phantom_dir), "--runs", str(runs), "--set", "train.tensorboard=false",
                 "--set", "train.bootstrap=20", "--set", "train.steps_per_epoch=2", "--folds", "2"]) == 0
    return CvDir(next(runs.glob("tiny/*/cv.json")).parent)


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_cross_validation_scores_a_folder_as_the_mean_of_its_fold_models(cv, phantom_dir, tmp_path, capsys):
    """Each image: the mean of the fold models' calibrated probabilities; each operating point at
    the mean of their thresholds; an image of the cross-validation's data is left out whichever
    fold held it out (every image trained or chose for some fold model)."""
    from osteo.predict import Predictor, load_images

    other = tmp_path / "hospital-b"
    write_phantom(other, n=30, size=64, seed=11)
    for fold in cv.folds():  # one image each fold held out, so the other fold trained on it
        held_out = next(r for r in fold.read_split() if r["split"] != "train" and r["label"] == "osteopenia")
        shutil.copy(phantom_dir / held_out["path"], other / "osteopenia" / f"from-{fold.name}.png")
    assert main(["eval", str(cv), "--data", str(other), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "2 image(s) also in the cross-validation's data left out" in printed
    # no image set chose the mean threshold: said so, not "chosen on validation"
    mean = "the mean of the folds' thresholds, each chosen on its fold's validation split"
    assert f", {mean}), on {other}: " in printed and "chosen on validation)" not in printed
    out = cv.eval_path / "hospital-b"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["excluded_training_overlap"] == 2 and metrics["external"]["n"] == 30
    assert metrics["ensemble_of"] == [str(f.path) for f in cv.folds()]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 30 and not any(r["path"].startswith("osteopenia/from-") for r in rows)
    assert {r["probabilities"] for r in rows} == {"the mean of the folds' calibrated probabilities"}

    members = [Predictor(f) for f in cv.folds()]
    images = np.stack(load_images([other / r["path"] for r in rows], members[0].size, members[0].resize)[0])
    expected = np.mean([m.calibrate(m.raw(images)) for m in members], axis=0)
    assert {m.temperature for m in members} != {1.0}  # the members' own temperatures are at work
    got = np.array([[float(r[c]) for c in PROB_COLUMNS] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    for point in metrics["operating_points"]:
        thresholds = [next(p["threshold"] for p in m.points if p["name"] == point["name"]) for m in members]
        assert point["threshold"] == pytest.approx(np.mean(thresholds)) and point["n"] == 30
        assert point["threshold_from"] == mean
    assert {p["name"] for p in metrics["operating_points"]} == {"osteoporosis", "osteopenia+"}

    # the report: the cross-validation's out-of-fold row and its ensemble's row on the folder
    assert main(["report", str(cv), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
    by_where = {r["evaluated_on"]: r for r in _rows(tmp_path / "rep" / "comparison.csv") if r["model"] == "tiny"}
    assert set(by_where) == {"out-of-fold", "external: hospital-b"}
    assert by_where["external: hospital-b"]["run_id"] == cv.name
    assert by_where["external: hospital-b"]["ece_calibrated"] == by_where["external: hospital-b"]["ece"]
    # the ensemble trained as the cross-validation did: every fold's time, each fold's images (not fold 1's alone)
    for k in ("train_seconds", "n_train"):
        assert by_where["external: hospital-b"][k] == by_where["out-of-fold"][k] != "", k
    seconds = sum(json.loads(f.env_path.read_text())["train_seconds"] for f in cv.folds())
    assert float(by_where["out-of-fold"]["train_seconds"]) == pytest.approx(seconds, abs=0.02)
    # its ECE, ROC-AUC, log loss and Brier are of calibrated probabilities, the out-of-fold row's not: said per row
    assert [by_where[k]["probabilities"] for k in ("external: hospital-b", "out-of-fold")] == ["calibrated",
                                                                                                "uncalibrated"]
    points = {(r["evaluated_on"], r["point"]): r for r in _rows(tmp_path / "rep" / "operating_points.csv")}
    assert points[("external: hospital-b", "osteoporosis")]["threshold_from"] == mean
    assert points[("out-of-fold", "osteoporosis")]["threshold_from"] == (
        "each fold's validation split, at that fold's threshold")
    # a fold reported on its own is named with its cross-validation (every one has a fold-1)
    assert main(["report", str(cv.path / "fold-1"), "--out", str(tmp_path / "rep1"), "--bootstrap", "20"]) == 0
    assert {r["run_id"] for r in _rows(tmp_path / "rep1" / "comparison.csv") if r["model"] == "tiny"} == {
        f"{cv.name}/fold-1"}


def test_an_unfinished_cross_validation_is_not_scored(cv, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(cv.path, half, ignore=shutil.ignore_patterns("eval"))
    (half / "fold-2" / "metrics.json").unlink()
    assert main(["eval", str(half), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is unfinished (fold-2)" in err and "--cv" in err and len(err.strip().splitlines()) == 1


def test_a_fold_calibrated_for_another_goal_is_pooled_with_no_other(cv, tmp_path, capsys):
    """Fold 1 calibrated again for another goal: the cross-validation's pooled operating point and
    its ensemble's mean threshold leave that point out with a warning (one name would stand for
    decisions made to different ends), its scores on another folder are stale until scored again,
    and each point row names the goal it was chosen for."""
    from helpers import osteo_warnings

    copy = CvDir(tmp_path / "cv")
    shutil.copytree(cv.path, copy.path, ignore=shutil.ignore_patterns("eval"))
    other = tmp_path / "hospital-c"
    write_phantom(other, n=24, size=64, seed=12)
    assert main(["eval", str(copy.path), "--data", str(other), "--bootstrap", "0"]) == 0

    def report(name):
        assert main(["report", str(copy.path), "--out", str(tmp_path / name), "--bootstrap", "0"]) == 0
        where = {r["evaluated_on"] for r in _rows(tmp_path / name / "comparison.csv")}
        return where, {(r["evaluated_on"], r["point"]): r["target"] for r in
                       _rows(tmp_path / name / "operating_points.csv")}

    where, points = report("before")
    assert where == {"out-of-fold", "external: hospital-c"}
    assert points[("out-of-fold", "osteoporosis")] == points[("external: hospital-c", "osteoporosis")] == \
        "sensitivity=0.9"

    fold = copy.path / "fold-1"
    with osteo_warnings() as said:
        assert main(["calibrate", str(fold), "--operating-point", "osteoporosis:specificity=0.5",
                     "--operating-point", "osteopenia+:sensitivity=0.9", "--bootstrap", "0"]) == 0
    again = f"osteo eval {copy.path} --data {other} --out {copy.eval_path / 'hospital-c'}"  # as it was scored
    assert [w for w in said if "stale" in w] == [
        f"the cross-validation {copy.path} was scored on hospital-c with fold-1's previous calibration: those "
        f"numbers are stale until scored again: {again}"]
    capsys.readouterr()
    with osteo_warnings() as said:
        where, points = report("after")
    assert where == {"out-of-fold"}  # the ensemble's scores on hospital-c were its members' old ones
    assert f"hospital-c was scored before fold-1 was calibrated again; score it again: {again}" in " ".join(
        capsys.readouterr().err.split())
    assert ("out-of-fold", "osteoporosis") not in points and points[("out-of-fold", "osteopenia+")] == \
        "sensitivity=0.9"
    assert any("the operating point osteoporosis is left out, as its members chose it for different goals "
               "(member 1 at specificity=0.5, 2 at sensitivity=0.9)" in w for w in said)

    assert main([*again.split()[1:], "--bootstrap", "0"]) == 0  # the command it said
    where, points = report("again")
    assert where == {"out-of-fold", "external: hospital-c"}
    assert {k for k in points if k[1] == "osteoporosis"} == set()
    assert points[("external: hospital-c", "osteopenia+")] == "sensitivity=0.9"


def test_a_cross_validations_row_names_the_settings_its_folds_trained_with_apart(cv, tmp_path):
    """A study's search chooses each fold's learning rate: the row's recipe (its first fold's)
    says which settings differ by fold, and each fold's value."""
    from osteo.report.load import load_cv

    copy = CvDir(tmp_path / "cv")
    shutil.copytree(cv.path, copy.path, ignore=shutil.ignore_patterns("eval"))
    assert "differs_by_fold" not in load_cv(copy, n_boot=0).recipe
    lrs = _fold_2_trains_at_ten_times_the_lr(copy)
    assert load_cv(copy, n_boot=0).recipe["differs_by_fold"] == {"train.lr": lrs}


def _fold_2_trains_at_ten_times_the_lr(copy: CvDir) -> list[float]:
    """Edit fold 2's recipe to 10x fold 1's learning rate (as a hand or a search would); the two rates."""
    recipe = json.loads((copy.path / "fold-2" / "recipe.json").read_text())
    lrs = [recipe["train"]["lr"], recipe["train"]["lr"] * 10]
    recipe["train"]["lr"] = lrs[1]
    (copy.path / "fold-2" / "recipe.json").write_text(json.dumps(recipe))
    return lrs


def test_the_verdict_says_a_search_chose_the_folds_settings_only_where_one_is_on_record(cv, tmp_path):
    """Folds whose recipes differ with no search in cv.json (edited by hand, another tool) were said
    to have had their settings "each chosen by a search on that fold's inner split"."""
    from osteo.report.page import write_report

    copy = CvDir(tmp_path / "cv")
    shutil.copytree(cv.path, copy.path, ignore=shutil.ignore_patterns("eval"))
    lrs = _fold_2_trains_at_ten_times_the_lr(copy)

    def said(name: str) -> tuple[dict, str]:
        write_report([copy.path], tmp_path / name, n_boot=0)
        (row,) = [r for r in _rows(tmp_path / name / "comparison.csv") if r["model"] != "oracle"]
        return row, " ".join((tmp_path / name / "verdict.txt").read_text(encoding="utf-8").split())

    row, verdict = said("by-hand")
    settings = f"train.lr={lrs[0]:.3g}|{lrs[1]:.3g}"
    assert (row["settings_by_fold"], row["settings_chosen_by"]) == (settings, "recipes")
    assert "chosen by a search" not in verdict
    assert (f"Its folds trained with different {settings} (fold 1, 2, ...), and no search is on record as having "
            "chosen them.") in verdict

    write_json(copy.manifest_path, {**copy.read(), "searched": {"train.lr": lrs}})  # what a study's search records
    row, verdict = said("searched")
    assert (row["settings_by_fold"], row["settings_chosen_by"]) == (settings, "search")
    assert f"Its folds' {settings} (fold 1, 2, ...) were each chosen by a search on that fold's inner split." \
        in verdict and "no search is on record" not in verdict


def test_a_fold_calibrated_during_the_ensembles_eval_leaves_that_eval_stale(cv, tmp_path, monkeypatch, capsys):
    """The ensemble applies each fold's calibration as read when the fold was loaded; its record
    re-read them after scoring, so a fold calibrated meanwhile was recorded at its new calibration
    and the report took the numbers, made at the old one, as current."""
    from osteo import predict
    from osteo.calibrate import calibration_digest

    copy = CvDir(tmp_path / "cv")
    shutil.copytree(cv.path, copy.path, ignore=shutil.ignore_patterns("eval"))
    other = tmp_path / "hospital-d"
    write_phantom(other, n=24, size=64, seed=13)
    applied = calibration_digest(copy.fold(1).read_calibration())
    scored = predict.Ensemble.predict_paths

    def calibrated_meanwhile(self, *args, **kwargs):
        out = scored(self, *args, **kwargs)
        assert main(["calibrate", str(copy.fold(1).path), "--operating-point", "osteoporosis:specificity=0.5",
                     "--bootstrap", "0"]) == 0
        return out

    monkeypatch.setattr(predict.Ensemble, "predict_paths", calibrated_meanwhile)
    assert main(["eval", str(copy.path), "--data", str(other), "--bootstrap", "0"]) == 0
    record = json.loads((copy.eval_path / "hospital-d" / "metrics.json").read_text(encoding="utf-8"))
    assert record["member_calibrations"]["fold-1"] == applied != calibration_digest(copy.fold(1).read_calibration())
    capsys.readouterr()
    assert main(["report", str(copy.path), "--out", str(tmp_path / "rep"), "--bootstrap", "0"]) == 0
    assert "was scored before fold-1 was calibrated again" in capsys.readouterr().err
