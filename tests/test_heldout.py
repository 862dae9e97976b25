"""With the defaults, a run's numbers are measured on a test split that chose nothing: the
checkpoint, temperature and thresholds are chosen on validation, and the metrics, the model
card, the CLI's summary and the report say where each number was measured."""

from __future__ import annotations

import csv
import html
import json
import re

import pytest

from osteo.cli import main
from osteo.data.phantom import write_phantom
from osteo.report.tables import cell_text
from osteo.runs import RunDir, list_runs

TINY = ["--model", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "2",
        "--set", "train.tensorboard=false", "--set", "train.bootstrap=20"]


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """``osteo train finetune`` with its defaults on a phantom of 300 (57 osteopenia images)."""
    root = tmp_path_factory.mktemp("heldout")
    write_phantom(root / "data", n=300, size=48, seed=2)
    assert main(["train", "finetune", *TINY, "--data", str(root / "data"), "--runs", str(root / "runs")]) == 0
    (run,) = list_runs(root / "runs")
    return root, run


def test_the_default_split_holds_out_a_test_split_that_chose_nothing(finetuned, capsys):
    _, run = finetuned
    split = run.read_split()
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "val", "test")}
    assert counts == {"train": 210, "val": 45, "test": 45}  # 70/15/15
    val = {r["path"] for r in split if r["split"] == "val"}
    test = {r["path"] for r in split if r["split"] == "test"}
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["headline"] == "test" and metrics["monitor"] == "val_macro_f1"
    assert metrics["test"]["chose"] == "nothing" and metrics["test"]["n"] == len(test)
    assert metrics["val"]["chose"] == "checkpoint, temperature, thresholds"
    calibration = run.read_calibration()
    assert calibration["n"] == len(val) and calibration["test"]["n"] == len(test)  # fitted on validation only
    assert (calibration["test"]["evaluated_on"], calibration["test"]["chose"]) == ("test", "nothing")
    for point in calibration["operating_points"]:
        assert point["chosen_on"] == "val" and point["test"]["n"] == len(test)
    card = run.model_card_path.read_text(encoding="utf-8")
    assert ("Headline: test, which chose nothing; the checkpoint (epoch " in card
            and "the temperature and the operating points' thresholds were chosen on validation." in card)
    assert f"| test | nothing | {len(test)} |" in card
    groups = {r["group"] for r in split}  # the card says what the split kept together, as split.csv has it
    assert ("- kept whole by the split: no group of two or more images" if len(groups) == len(split) else
            "- kept whole by the split, each on one side: ") in card
    assert f"| validation | checkpoint, temperature, thresholds | {len(val)} |" in card
    assert "on test (chose nothing): sensitivity" in card


def test_the_report_rows_are_on_the_test_split(finetuned):
    root, run = finetuned
    out = root / "rep"
    assert main(["report", str(run.path), "--out", str(out), "--bootstrap", "20"]) == 0
    (row,) = [r for r in _rows(out / "comparison.csv") if r["model"] == "tiny"]
    test = [r for r in run.read_split() if r["split"] == "test"]
    assert (row["evaluated_on"], row["chose"], int(row["n"])) == ("test", "nothing", len(test))
    # the oracle (the phantom's latents) is scored on the same test images
    (oracle,) = [r for r in _rows(out / "comparison.csv") if r["model"] == "oracle"]
    assert (oracle["evaluated_on"], int(oracle["n"])) == ("test", len(test))
    # named with the run on whose split it was fitted, and that run's folder (it has none of its own)
    assert (oracle["run_id"], oracle["run_dir"]) == (f"{run.name}/oracle", str(run.path))
    assert {r["chose"] for r in _rows(out / "per_class.csv")} == {"nothing"}
    points = {(r["evaluated_on"], r["chose"]) for r in _rows(out / "operating_points.csv")}
    assert points == {("test", "nothing"), ("validation", "checkpoint, temperature, thresholds")}
    page = html.unescape((out / "index.html").read_text(encoding="utf-8"))
    for r in _rows(out / "operating_points.csv"):  # the page's table gives the intervals its caption promises
        for k in ("sensitivity", "specificity"):
            x, lo, hi = (cell_text(float(r[k + end])) for end in ("", "_lo", "_hi"))
            assert f"<td>{x} [{lo}, {hi}]</td>" in page, (k, x, lo, hi)
    said = (out / "verdict.txt").read_text(encoding="utf-8")
    assert said.startswith(f"On test of data (n={len(test)}, which chose nothing): tiny ({run.name}), the only model")
    assert "The phantom's oracle" in said


def test_a_goal_set_again_after_the_test_figures_were_shown_is_said_to_be_optimistic(finetuned, tmp_path):
    """osteo calibrate prints the test split's sensitivity and specificity: a run calibrated again for
    another goal has test figures its user may have chosen by; the card and the report say so."""
    from helpers import copy_run

    _, run = finetuned
    run = copy_run(run, tmp_path)
    assert main(["calibrate", str(run.path), "--operating-point", "osteoporosis:sensitivity=0.8",
                 "--bootstrap", "20"]) == 0
    assert "was chosen with test in view, and the test figures above are then optimistic too" in (
        run.model_card_path.read_text(encoding="utf-8"))
    assert main(["report", str(run.path), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
    points = {(r["evaluated_on"], r["chose"]) for r in _rows(tmp_path / "rep" / "operating_points.csv")}
    assert points == {("test", "nothing, but the goal was set again after osteo calibrate had shown these figures: "
                               "optimistic"), ("validation", "checkpoint, temperature, thresholds")}


def test_data_too_small_for_a_test_split_is_one_line_pointing_to_folds(phantom_dir, tmp_path, capsys):
    # 120 images: 15% leaves 3 or 4 osteopenia images for testing, too few to measure anything on
    assert main(["train", "finetune", *TINY, "--data", str(phantom_dir), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("osteo: error: too few images for a held-out test split: class osteopenia gets 3 test ")
    assert "--folds 5" in err and err.endswith("--set data.test=0 (make: SET=data.test=0)")
    assert not list_runs(tmp_path / "runs")  # refused before anything was written


def test_the_seed_recipe_says_its_numbers_chose_the_checkpoint(phantom_dir, tmp_path, capsys):
    assert main(["train", "seed", *TINY, "--data", str(phantom_dir), "--runs", str(tmp_path / "runs")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ("headline: validation, which chose the checkpoint, temperature and thresholds: optimistic; hold out a "
            "test split (--set data.test=0.15; make: SET=data.test=0.15) or cross-validate (--folds 5)") in printed
    (run,) = list_runs(tmp_path / "runs")
    card = RunDir(run).model_card_path.read_text(encoding="utf-8")
    assert "Headline: validation, which chose the checkpoint, temperature and thresholds: optimistic." in card
    n = json.loads(RunDir(run).metrics_path.read_text())["val"]["n"]  # the summary's row says its images' number
    assert re.search(rf"│ validation │ +{n} │ [0-9.]+ │", printed), printed
