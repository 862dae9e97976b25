"""A cross-validation's fold models as one model on another folder: osteo eval CV --data FOLDER."""

import csv
import json
import shutil

import numpy as np
import pytest

from osteo.cli import main
from osteo.data.phantom import write_phantom
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
    assert "2 image(s) also in the cross-validation's data left out" in capsys.readouterr().out
    out = cv.eval_path / "hospital-b"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["excluded_training_overlap"] == 2 and metrics["external"]["n"] == 30
    assert metrics["ensemble_of"] == [str(f.path) for f in cv.folds()]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 30 and not any(r["path"].startswith("osteopenia/from-") for r in rows)

    members = [Predictor(f) for f in cv.folds()]
    images = np.stack(load_images([other / r["path"] for r in rows], members[0].size, members[0].resize)[0])
    expected = np.mean([m.calibrate(m.raw(images)) for m in members], axis=0)
    assert {m.temperature for m in members} != {1.0}  # the members' own temperatures are at work
    got = np.array([[float(r[c]) for c in PROB_COLUMNS] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    for point in metrics["operating_points"]:
        thresholds = [next(p["threshold"] for p in m.points if p["name"] == point["name"]) for m in members]
        assert point["threshold"] == pytest.approx(np.mean(thresholds)) and point["n"] == 30
    assert {p["name"] for p in metrics["operating_points"]} == {"osteoporosis", "osteopenia+"}

    # the report: the cross-validation's out-of-fold row and its ensemble's row on the folder
    assert main(["report", str(cv), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
    by_where = {r["evaluated_on"]: r for r in _rows(tmp_path / "rep" / "comparison.csv") if r["model"] == "tiny"}
    assert set(by_where) == {"out-of-fold", "external: hospital-b"}
    assert by_where["external: hospital-b"]["run_id"] == cv.name
    assert by_where["external: hospital-b"]["ece_calibrated"] == by_where["external: hospital-b"]["ece"]
    points = {(r["evaluated_on"], r["point"]) for r in _rows(tmp_path / "rep" / "operating_points.csv")}
    assert ("external: hospital-b", "osteoporosis") in points


def test_an_unfinished_cross_validation_is_not_scored(cv, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(cv.path, half, ignore=shutil.ignore_patterns("eval"))
    (half / "fold-2" / "metrics.json").unlink()
    assert main(["eval", str(half), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is unfinished (fold-2)" in err and "--cv" in err and len(err.strip().splitlines()) == 1
