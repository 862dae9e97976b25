"""Every run file read back is checked as it was when written: a damaged or crafted one is one
line naming the file and the fix (a skipped run with a warning in a report), never a traceback."""

import json
import shutil

import pytest
from helpers import copy_run, one_line, osteo_warnings

from osteo.cli import main
from osteo.runs import CvDir, RunDir


def _edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_calibration_predict_cannot_apply_is_refused(run, phantom_dir, tmp_path, capsys):
    """T = 0 or NaN gave NaN probabilities, every image "normal" and both screens "negative";
    T = -1 inverted the ranking; all with exit code 0."""
    image = str(next((phantom_dir / "osteoporosis").iterdir()))

    def point(**change):
        return lambda c: c["operating_points"][0].update(change)

    cases = [
        (lambda c: c.update(temperature=0), "temperature 0"),
        (lambda c: c.update(temperature=float("nan")), "temperature nan"),
        (lambda c: c.update(temperature=-1.0), "temperature -1.0"),
        (lambda c: c.update(temperature="1.5"), "temperature is text"),
        (point(threshold=7.0), "threshold 7.0 is not a probability"),
        (point(positive=[0]), "are not the ones its name says"),
        (point(name="fracture"), "is not CLASS[+]"),
    ]
    for change, message in cases:
        copy = copy_run(run, tmp_path / message.replace(" ", "_"))
        _edit(copy.calibration_path, change)
        out = tmp_path / "p.csv"
        assert main(["predict", str(copy), image, "--out", str(out)]) == 2, message
        line = one_line(capsys)
        assert f"{copy.calibration_path} is damaged" in line and message in line, line
        assert f"osteo calibrate {copy.path}" in line and not out.exists()


@pytest.mark.parametrize("name", [RunDir.RECIPE, RunDir.ENV, RunDir.AUDIT, RunDir.METRICS, RunDir.CALIBRATION])
@pytest.mark.parametrize("text", ["[]", "null", "7"])
def test_json_of_the_wrong_type_in_a_run_file_skips_that_run_in_a_report(run, tmp_path, capsys, name, text):
    good = copy_run(run, tmp_path / "good")
    bad = copy_run(run, tmp_path / "bad")
    (bad.path / name).write_text(text)
    assert main(["report", str(good), str(bad), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"osteo: warning: skipped {bad.path}") and name in err[0], err
    if name in (RunDir.RECIPE, RunDir.CALIBRATION):  # what predict reads
        assert main(["predict", str(bad), str(bad.split_path), "--out", str(tmp_path / "p.csv")]) == 2
        assert f"{bad.path / name} " in one_line(capsys)


def test_nested_values_of_the_wrong_type_are_named(run, tmp_path, capsys):
    cases = [(RunDir.AUDIT, lambda a: a.update(duplicate_groups=[{"kind": "exact"}]), "duplicate_groups[0] has no"),
             (RunDir.AUDIT, lambda a: a.update(classes=[1, 2]), "classes is a list, not an object"),
             (RunDir.ENV, lambda e: e.update(device="cpu"), "device is text, not an object"),
             (RunDir.METRICS, lambda m: m.update(best_epoch="3"), "best_epoch is text")]
    for name, change, message in cases:
        bad = copy_run(run, tmp_path / message.split()[0])
        _edit(bad.path / name, change)
        assert main(["report", str(bad), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.heavy
def test_paths_in_a_runs_csv_files_stay_in_its_data_folder(run, tmp_path, capsys):
    """An absolute or ../ path made the report read any image on the machine into its page."""
    for name in (RunDir.PREDICTIONS, RunDir.SPLIT):
        for path in ("/etc/hosts", "../../secret.png", "normal/../../x.png"):
            bad = copy_run(run, tmp_path / f"{name}-{len(path)}")
            text = (bad.path / name).read_text().splitlines()
            first = text[1].split(",")
            text[1] = ",".join([path, *first[1:]])
            (bad.path / name).write_text("\n".join(text) + "\n")
            assert main(["report", str(run), str(bad), "--out", str(tmp_path / "rep"), "--bootstrap", "20"]) == 0
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{bad.path / name} line 2: '{path}' is not a path inside the data folder" \
                in err[0], err


def test_recipe_json_is_checked_by_every_reader(run, phantom_dir, tmp_path, capsys):
    image = str(next((phantom_dir / "normal").iterdir()))
    for change, message in [(lambda r: r["data"].update(image_size=4096), "data.image_size must be from 1 to 2048"),
                            (lambda r: r.update(data=[]), "'data' in recipe.json is a section"),
                            (lambda r: r["model"]["head"].update(units=[0]), "model.head.units must be from 1"),
                            (lambda r: r["model"].update(backbone=5), "model.backbone expects str"),
                            (lambda r: r["model"].update(impl="auto"), "model.impl 'auto' names no engine")]:
        bad = copy_run(run, tmp_path / message.split()[0].strip("'"))
        _edit(bad.recipe_path, change)
        for argv in (["predict", str(bad), image, "--out", str(tmp_path / "p.csv")], ["calibrate", str(bad)],
                     ["export", str(bad), "--format", "keras", "--out", str(tmp_path / "m.keras")]):
            assert main(argv) == 2, (message, argv)
            line = one_line(capsys)
            assert f"{bad.recipe_path} does not hold a valid recipe" in line and message in line, line
        assert main(["report", str(bad), "--out", str(tmp_path / "rep")]) == 2
        assert message in capsys.readouterr().err
    # what belongs to the machine it trained on is not checked again: its weights file may be gone
    gone = copy_run(run, tmp_path / "gone")
    _edit(gone.recipe_path, lambda r: r["model"].update(weights=str(tmp_path / "deleted.weights.h5")))
    assert main(["predict", str(gone), image, "--out", str(tmp_path / "p.csv")]) == 0
    # a run trained before a check was added still reads: 10 resamples, a warm-up with a constant schedule
    older = copy_run(run, tmp_path / "older")
    _edit(older.recipe_path, lambda r: r["train"].update(bootstrap=10, schedule="constant", warmup_epochs=50))
    assert main(["predict", str(older), image, "--out", str(tmp_path / "p2.csv")]) == 0


def test_a_fold_count_beyond_the_folders_on_disk_is_named_before_any_fold_is_built(run, tmp_path, capsys):
    """cv.json with 3 million folds made the report build every fold before checking one."""
    cv = CvDir(tmp_path / "tiny" / "cv")
    shutil.copytree(run.path, cv.fold(1).path)
    for folds, message in ((3_000_000, "fold count 3000000, not from 2 to 1000"), (5, "names 5 folds, 1 of them")):
        cv.manifest_path.write_text(json.dumps({"folds": folds}))
        assert main(["report", str(cv.path), "--out", str(tmp_path / "rep")]) == 2
        err = capsys.readouterr().err
        assert f"skipped {cv.path}" in err and message in err, err
        assert not CvDir(cv.path).is_finished()


def test_a_checkpoint_changed_since_training_is_refused(run, phantom_dir, tmp_path, capsys):
    """best.weights.h5 with a weight's bytes overwritten (same size, still a valid HDF5 file) gave
    (0, 1, 0) for every image, exit 0, and an ONNX export whose parity check passed against the
    same damaged model: the run's env.json records the checkpoint's sha256 when the run finishes."""
    image = str(next((phantom_dir / "osteoporosis").iterdir()))
    assert len(run.read_env()[RunDir.BEST_SHA256]) == 64
    import h5py

    copy = copy_run(run, tmp_path / "changed")
    size = copy.best_path.stat().st_size
    with h5py.File(copy.best_path, "r+") as f:  # a convolution's kernel overwritten in place
        kernels = []
        f.visititems(lambda name, obj: kernels.append(obj) if isinstance(obj, h5py.Dataset) and obj.ndim == 4 else None)
        kernels[0][...] = 0.5
    assert copy.best_path.stat().st_size == size
    out = tmp_path / "p.csv"
    for argv in (["predict", str(copy), image, "--out", str(out)],
                 ["export", str(copy), "--format", "keras", "--out", str(tmp_path / "m.keras")]):
        assert main(argv) == 2, argv
        line = one_line(capsys)
        assert f"{copy.best_path} is not the checkpoint this run trained" in line and "retrain the run" in line, line
    assert not out.exists() and not (tmp_path / "m.keras").exists()
    # an unreadable record leaves the checkpoint loadable, unchecked, with a warning
    unchecked = copy_run(run, tmp_path / "no-record")
    unchecked.env_path.write_text("[]")
    with osteo_warnings() as said:
        assert main(["predict", str(unchecked), image, "--out", str(out)]) == 0
    assert len(said) == 1 and said[0].startswith("cannot check best.weights.h5") and "env.json" in said[0], said


def test_a_run_without_its_calibration_says_so_where_its_probabilities_are_used(run, phantom_dir, tmp_path):
    """predict, eval --data and export of a run whose calibration.json was lost gave raw
    probabilities and no operating point without a word."""
    image = str(next((phantom_dir / "osteoporosis").iterdir()))
    copy = copy_run(run, tmp_path / "lost")
    copy.calibration_path.unlink()
    out = tmp_path / "p.csv"
    with osteo_warnings() as said:
        assert main(["predict", str(copy), image, "--out", str(out)]) == 0
    assert said == [f"run {copy.path} has no calibration.json: its probabilities are not calibrated (temperature 1) "
                    f"and no operating point decides; calibrate it with: osteo calibrate {copy.path}"]
    assert not any(c.startswith("screen_") for c in out.read_text().splitlines()[0].split(","))
    # asked for the raw probabilities: nothing to say
    with osteo_warnings() as said:
        assert main(["predict", str(copy), image, "--out", str(tmp_path / "raw.csv"), "--no-calibration"]) == 0
    assert said == []
