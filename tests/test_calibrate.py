"""Temperature scaling, operating points, and the model card."""

import csv
import json

import numpy as np
import pytest

from osteo.calibrate import (
    apply_temperature,
    choose_threshold,
    fit_temperature,
    operating_point_metrics,
    temperature_note,
)
from osteo.cli import main
from osteo.errors import OsteoError
from osteo.evaluate import expected_calibration_error
from osteo.recipe import parse_operating_point, parse_operating_points
from osteo.runs import RunDir
from osteo.trainer import Trainer


def _overconfident(n=600, accuracy=0.7, seed=0):
    """Predictions right 70% of the time but 97-99% sure of every answer."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    right = rng.random(n) < accuracy
    pred = np.where(right, y, (y + rng.integers(1, 3, n)) % 3)
    top = rng.uniform(0.97, 0.99, n)
    probs = np.full((n, 3), 0.0)
    probs[np.arange(n), pred] = top
    for i in range(n):
        others = [c for c in range(3) if c != pred[i]]
        probs[i, others] = (1 - top[i]) / 2
    return y, probs


def test_a_temperature_at_the_end_of_its_search_is_said():
    t = fit_temperature(*_overconfident())  # a sound fit, inside the search: nothing to say
    assert temperature_note(t, 600) is None
    y, probs = _overconfident(accuracy=1 / 3)  # sure of answers that are chance: T goes to the top
    t = fit_temperature(y, probs)
    assert t == pytest.approx(np.exp(3), rel=1e-2)
    note = temperature_note(t, len(y))
    assert note.startswith("the temperature reached the end of its search (T = 20.") and "e^+3" in note
    assert "600 validation images" in note and "close to uninformative" in note


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_and_keeps_its_answers():
    y, probs = _overconfident()
    t = fit_temperature(y, probs)
    calibrated = apply_temperature(probs, t)
    before, after = expected_calibration_error(y, probs), expected_calibration_error(y, calibrated)
    assert t > 1.5  # softened
    assert before > 0.2 and after < before / 3, (before, after)
    np.testing.assert_array_equal(calibrated.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(calibrated.sum(1), 1.0)
    # on held-out predictions of the same model too
    y2, probs2 = _overconfident(seed=1)
    assert expected_calibration_error(y2, apply_temperature(probs2, t)) < expected_calibration_error(y2, probs2) / 3


def test_a_deliberately_overconfident_trained_model_is_brought_back(phantom_dir, tmp_path, tiny_recipe):
    """A trained model made over-confident (its logits x 4, as an over-trained net's are) is
    brought back by temperature scaling: T near 4 and ECE falling, answers unchanged."""
    from osteo.predict import Predictor, load_images

    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=3, lr=3e-3, bootstrap=0)).run())
    y, probs, _ = run.read_predictions("val")
    overconfident = apply_temperature(probs, 0.25)  # softmax(4 * logits)
    t = fit_temperature(y, overconfident)
    assert expected_calibration_error(y, apply_temperature(overconfident, t)) < expected_calibration_error(
        y, overconfident)
    assert t > 2
    # the same through the model: predictions of the run's own images, made over-confident
    predictor = Predictor(run, calibrated=False)
    images, _ = load_images([phantom_dir / r["path"] for r in run.read_split() if r["split"] == "val"], 32, "pad")
    np.testing.assert_allclose(predictor.raw(np.stack(images)), probs, atol=1e-4)


def test_operating_points_reach_the_asked_sensitivity_and_group_ordered_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    probs = rng.dirichlet([1, 1, 1], 400)
    probs[y == 2, 2] += 0.5  # osteoporosis scores higher when present
    probs /= probs.sum(1, keepdims=True)
    spec = parse_operating_point("osteoporosis:sensitivity=0.90")
    assert spec["positive"] == [2]
    point = {**spec, "threshold": choose_threshold(y, probs, spec)}
    m = operating_point_metrics(y, probs, point, n_boot=200)
    assert m["sensitivity"] >= 0.90 and m["sensitivity_ci"][0] <= m["sensitivity"] <= m["sensitivity_ci"][1]
    # the highest threshold that does it: one step higher misses the target
    higher = operating_point_metrics(y, probs, {**point, "threshold": point["threshold"] + 1e-9}, n_boot=0)
    assert higher["sensitivity"] < 0.90
    worse = parse_operating_point("osteopenia+:specificity=0.8")
    assert worse["positive"] == [1, 2] and worse["target"] == "specificity"
    t = choose_threshold(y, probs, worse)
    assert operating_point_metrics(y, probs, {**worse, "threshold": t}, n_boot=0)["specificity"] >= 0.8
    for bad in ("fracture:sensitivity=0.9", "osteoporosis:sensitivity=1.5", "osteoporosis:recall=0.9"):
        with pytest.raises(OsteoError, match="operating point"):
            parse_operating_point(bad)
    with pytest.raises(OsteoError, match=r"calls every class positive .*no image is negative"):
        parse_operating_point("normal+:sensitivity=0.9")  # the lowest class or worse: everyone
    with pytest.raises(OsteoError, match="two operating points for osteoporosis"):  # they would share a column
        parse_operating_points(["osteoporosis:sensitivity=0.9", "Osteoporosis:sensitivity=0.8"])
    assert [p["name"] for p in parse_operating_points(["osteoporosis:sensitivity=0.9", "osteopenia+:specificity=0.8",
                                                       "osteopenia:sensitivity=0.7"])] == [
        "osteoporosis", "osteopenia+", "osteopenia"]


def test_a_trained_run_is_calibrated_with_a_model_card_and_recalibrates_on_demand(phantom_dir, tmp_path,
                                                                                   tiny_recipe, capsys):
    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=1, bootstrap=50)).run())
    cal = run.read_calibration()
    assert cal["temperature"] > 0 and {p["name"] for p in cal["operating_points"]} == {"osteoporosis", "osteopenia+"}
    # the top level's NLL and ECE are validation's, which chose
    assert (cal["evaluated_on"], cal["chose"]) == ("validation", "checkpoint, temperature, thresholds")
    card = run.model_card_path.read_text()
    assert "not for diagnosis" in card and "Temperature" in card and "osteopenia+" in card
    assert "tiny on the keras engine (keras.applications layers)" in card
    assert "| ECE (uncalibrated) |" in card  # the results table's; its calibration is the section below
    assert main(["calibrate", str(run), "--operating-point", "osteoporosis:specificity=0.5",
                 "--bootstrap", "50"]) == 0
    said = capsys.readouterr()
    assert "temperature" in said.out
    # the default point not asked for again is dropped: said, not only recorded
    assert ("osteo: warning: osteopenia+ is no longer an operating point of this run (osteo predict drops its "
            "screening column; its goal is kept in earlier_goals)") in said.err
    assert [p["name"] for p in run.read_calibration()["operating_points"]] == ["osteoporosis"]
    card = run.model_card_path.read_text()
    assert "specificity >= 0.5" in card
    # the goals it replaced, which the first calibrate's test figures may have led away from, are kept and said
    assert run.read_calibration()["earlier_goals"] == [["osteopenia+: sensitivity >= 0.9",
                                                        "osteoporosis: sensitivity >= 0.9"]]
    # this run has no test split: nothing to have been shown
    assert ("Calibrated for other goals before these, oldest first (osteopenia+: sensitivity >= 0.9, osteoporosis: "
            "sensitivity >= 0.9).") in card
    assert main(["calibrate", str(run), "--operating-point", "osteoporosis:specificity=0.5",
                 "--bootstrap", "50"]) == 0  # the same goal again: nothing more to say
    assert len(run.read_calibration()["earlier_goals"]) == 1
    # a damaged calibration.json is replaced (its error says to), its record of earlier goals kept where it can be
    # read, and its own goals said to be unknown; an entry edited by hand into nonsense is dropped
    record = json.loads(run.calibration_path.read_text())
    run.calibration_path.write_text(json.dumps({**record, "temperature": -1, "earlier_goals": [
        *record["earlier_goals"], None, []]}))
    assert main(["calibrate", str(run), "--bootstrap", "50"]) == 0
    assert run.read_calibration()["earlier_goals"] == [
        ["osteopenia+: sensitivity >= 0.9", "osteoporosis: sensitivity >= 0.9"],
        ["unknown (the calibration replaced was damaged)"]]
    run.calibration_path.write_text("{")  # not JSON at all
    assert main(["calibrate", str(run), "--bootstrap", "50"]) == 0
    assert run.read_calibration()["earlier_goals"] == [["unknown (the calibration replaced was damaged)"]]
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--bootstrap", "50"]) == 0
    with open(tmp_path / "rep" / "comparison.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["temperature"]) == pytest.approx(cal["temperature"]) and row["ece_calibrated"]
