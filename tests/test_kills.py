"""A kill at any instant costs at most the epoch in progress, for every command that writes.

Each test kills an ``osteo`` process at a named point (:mod:`osteo.killpoints`, never after a
sleep), checks that what it leaves is whole (the previous outputs, or a run that resumes),
and runs the command again. Temporaries a killed process leaves are made older than the
sweep's grace period (their mtime), so the next command's sweep is what removes them.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import exited_ok, osteo_process

from osteo.runs import CvDir, RunDir
from osteo.trainer import Trainer

WAIT_BOUND_S = 600  # the most a command may take to start and say it waits, on a loaded machine

TINY = ["--model", "tiny", "--weights", "none", "--image-size", "32", "--set", "train.tensorboard=false",
        "--set", "train.bootstrap=20", "--set", "train.steps_per_epoch=2"]


def _killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _age(paths) -> None:
    """Make leftovers look like a dead process's (older than the sweep's grace period)."""
    old = time.time() - 3600
    for p in paths:
        os.utime(p, (old, old), follow_symlinks=False)


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp*"))


@pytest.fixture(scope="module")
def finished(phantom_dir, tmp_path_factory, tiny_recipe):
    """A finished tiny run, copied by each test that changes it."""
    return RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=20)).run())


def _copy(run: RunDir, dest: Path) -> RunDir:
    target = dest / run.model / run.name
    shutil.copytree(run.path, target)
    return RunDir(target)


# --------------------------------------------------------------------------- train


@pytest.mark.heavy
def test_a_kill_at_an_epochs_or_a_phases_edge_resumes_as_if_never_killed(phantom_dir, tmp_path):
    """A two-phase run (2 + 2 epochs), killed and resumed with --resume latest three times, ends as the
    uninterrupted run: the same history, checkpoint and predictions. Killed after epoch 1's history
    row, before its state is committed (--resume latest said "no unfinished run to resume"); its
    resume killed after phase 1's last epoch was committed, before its end was written (phase 2 began
    from the model as built); that resume killed after phase 1's end, before phase 2's first epoch
    (phase 2 drew other augmentations and dropout masks). And every kill moved the best checkpoint to
    a later epoch of the same validation score: the resumed run took its best value from history.csv's
    8 decimals and took the next epoch's float32 value as an improvement. (One run killed three
    times, not three runs killed once: each process costs the suite seconds, and the last resume
    must undo all three.)"""
    args = ["train", "finetune", *TINY, "--set", "data.test=0", "--deterministic", "--epochs", "4", "--data", phantom_dir]
    exited_ok(osteo_process([*args, "--runs", tmp_path / "ref"], tmp_path))
    ref = RunDir(next((tmp_path / "ref" / "tiny").iterdir()))
    runs = tmp_path / "killed"
    resume = ["train", "finetune", "--resume", "latest", "--runs", runs]
    points = ("train.history_written@1", "train.epoch_committed@2", "train.phase_done@1")
    rows_left = (1, 2, 2)  # history rows after each kill
    _killed(osteo_process([*args, "--runs", runs], tmp_path, kill_at=points[0]))
    run = RunDir(next((runs / "tiny").iterdir()))
    for i, point in enumerate(points):
        assert len(run.read_history()) == rows_left[i] and not run.is_finished(), point
        if i + 1 < len(points):  # its resume is killed at the next point
            _killed(osteo_process(resume, tmp_path, kill_at=points[i + 1]))
    resumed = osteo_process(resume, tmp_path)
    exited_ok(resumed)
    assert run.is_finished()
    assert "backend: tensorflow on cpu (the run's own: a run resumes on the backend it trained on)" in resumed.stdout
    env = json.loads(run.env_path.read_text())  # the command that started it, and each that resumed it
    assert "--resume" not in env["command"] and [c.split()[-4:] for c in env["resumed_by"]] == [
        ["--resume", "latest", "--runs", str(runs)]] * 3, env
    same = ("epoch", "phase", "loss", "val_loss", "val_macro_f1", "lr")
    assert [[r[k] for k in same] for r in run.read_history()] == [[r[k] for k in same] for r in ref.read_history()]
    assert run.best_path.read_bytes() == ref.best_path.read_bytes()
    assert run.predictions_path.read_bytes() == ref.predictions_path.read_bytes()


@pytest.mark.heavy
def test_early_stopping_counts_on_across_a_kill_and_a_phase_that_stopped_stays_stopped(phantom_dir, tmp_path):
    """Phase 1 (4 epochs, patience 2) at a rate too small to move the head: its validation score ties,
    so it stops after epoch 3. Killed after that epoch was committed, the resumed run trained on
    through epoch 4: Keras' EarlyStopping began counting again from nothing. Phase 1 trains on cached
    backbone features, which the resumed run, with nothing left to train in phase 1, does not compute."""
    args = ["train", "finetune", *TINY, "--set", "data.test=0", "--deterministic", "--set", "train.epochs=4",
            "--set", "train.fine_tune_epochs=1", "--set", "train.lr=1e-12", "--set", "train.early_stopping=2",
            "--set", "train.feature_cache=on", "--data", phantom_dir, "--runs", tmp_path]
    killed = osteo_process(args, tmp_path, kill_at="train.epoch_committed@3")
    _killed(killed)
    assert "phase 1 on cached backbone features" in killed.stdout
    run = RunDir(next((tmp_path / "tiny").iterdir()))
    assert len({r["val_macro_f1"] for r in run.read_history()}) == 1, run.read_history()  # the premise: ties
    resumed = osteo_process(["train", "finetune", "--resume", "latest", "--runs", tmp_path], tmp_path)
    exited_ok(resumed)
    assert run.is_finished()
    assert [(r["epoch"], r["phase"]) for r in run.read_history()] == [("1", "1"), ("2", "1"), ("3", "1"), ("5", "2")]
    assert "phase 1 stopped early after epoch 3: val_macro_f1 did not improve for 2 epochs" in resumed.stdout
    assert "phase 1 on cached backbone features" not in resumed.stdout
    # the card says the run trained fewer epochs than its recipe's
    assert "4 + 1 epochs (frozen + fine-tuned; 4 trained: early stopping (patience 2) ended a phase)" in (
        run.model_card_path.read_text(encoding="utf-8"))


@pytest.mark.heavy
def test_a_run_killed_while_finishing_is_unfinished_refused_flagged_and_finished_by_resume(phantom_dir, tmp_path):
    runs = tmp_path / "runs"
    _killed(osteo_process(["train", "seed", *TINY, "--epochs", "1", "--data", phantom_dir, "--runs", runs], tmp_path,
                   kill_at="train.metrics_written"))
    run = RunDir(next((runs / "tiny").iterdir()))
    assert run.metrics_path.is_file() and not run.calibration_path.exists()
    assert not run.is_finished() and run.is_resumable()
    image = next((phantom_dir / "normal").iterdir())
    hint = f"finish a stopped one with: osteo train --resume {run.path}"
    for argv in (["predict", run, image, "--out", tmp_path / "p.csv"], ["eval", run],
                 ["export", run, "--out", tmp_path / "m.keras", "--format", "keras"]):  # export warned first
        proc = osteo_process(argv, tmp_path)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "is unfinished" in proc.stderr and proc.stderr.strip().endswith(hint)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.keras").exists()
    proc = osteo_process(["report", "--runs", runs, "--out", tmp_path / "rep"], tmp_path)
    assert proc.returncode == 2 and "left out 1 unfinished run(s)" in proc.stderr  # flagged, not reported
    proc = osteo_process(["report", run, "--out", tmp_path / "rep"], tmp_path)
    assert proc.returncode == 2 and f"skipped {run.path}: run {run.path} is unfinished" in proc.stderr
    exited_ok(osteo_process(hint.split(": ", 1)[1].split()[1:], tmp_path))  # the command the hint names
    assert run.is_finished() and run.calibration_path.is_file() and run.model_card_path.is_file()
    assert not [p for p in run.path.iterdir() if p.name.startswith(".backup")]


@pytest.mark.heavy
def test_a_cross_validation_killed_in_fold_2_continues_with_the_same_command(phantom_dir, tmp_path):
    """Fold 1 is kept as it is, fold 2 resumes from its committed epoch, fold 3 is trained."""
    args = ["train", "seed", *TINY, "--epochs", "2", "--data", phantom_dir, "--runs", tmp_path / "runs", "--folds", "3"]
    # fold 1 commits epochs 1 and 2; the third commit is fold 2's first epoch
    _killed(osteo_process(args, tmp_path, kill_at="train.epoch_committed@3"))
    (cv_path,) = [p.parent for p in (tmp_path / "runs").glob("tiny/*/cv.json")]
    cv = CvDir(cv_path)
    assert cv.fold(1).is_finished() and not cv.fold(2).is_finished()
    fold1 = {p.name: p.read_bytes() for p in cv.fold(1).path.iterdir() if p.is_file() and p.name != ".lock"}
    proc = osteo_process(args, tmp_path)
    exited_ok(proc)
    assert f"continuing the unfinished cross-validation {cv_path}" in proc.stdout
    assert "fold 1 of 3 is finished (kept)" in proc.stdout
    assert cv.is_finished() and len(list((tmp_path / "runs").glob("tiny/*/cv.json"))) == 1
    assert fold1 == {n: (cv.fold(1).path / n).read_bytes() for n in fold1}
    assert [r["epoch"] for r in cv.fold(2).read_history()] == ["1", "2"]


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.heavy
def test_a_damaged_backup_slot_falls_back_to_the_other_one_then_to_the_phase_start(phantom_dir, tmp_path):
    args = ["train", "seed", *TINY, "--epochs", "3", "--data", phantom_dir]
    for case in ("one", "both"):
        runs = tmp_path / case
        _killed(osteo_process([*args, "--runs", runs], tmp_path, kill_at="train.epoch_committed@2"))
        run = RunDir(next((runs / "tiny").iterdir()))
        state = json.loads((run.phase_path(1) / "state.json").read_text())
        assert (state["epoch"], state["slot"]) == (2, "b")
        _damage(run.phase_path(1) / "b" / "seeds.npz")  # the committed slot: epoch 2's
        if case == "both":
            _damage(run.phase_path(1) / "a" / "weights.weights.h5")
        proc = osteo_process(["train", "seed", "--resume", run.path], tmp_path)
        exited_ok(proc)
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("osteo: warning:")]
        assert len(warnings) == 1 and "is damaged" in warnings[0], proc.stderr
        expected = "from the one of epoch 1" if case == "one" else "starts again from its first epoch"
        assert expected in warnings[0] and "Traceback" not in proc.stderr
        assert run.is_finished() and [r["epoch"] for r in run.read_history()] == ["1", "2", "3"]


# --------------------------------------------------------------------------- the other commands


@pytest.mark.heavy
def test_a_killed_external_validation_leaves_the_previous_one_whole(finished, other_hospital_dir, tmp_path):
    run = _copy(finished, tmp_path)
    folder = tmp_path / "hospital"
    shutil.copytree(other_hospital_dir, folder)
    exited_ok(osteo_process(["eval", run, "--data", folder, "--bootstrap", "20"], tmp_path))
    out = run.eval_path / "hospital"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # with --tta the predictions differ too: a kill left them beside the old metrics
    _killed(osteo_process(["eval", run, "--data", folder, "--tta", "--out", out, "--bootstrap", "20"], tmp_path,
                   kill_at="eval.staged"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new predictions beside old metrics
    assert [p.name for p in run.eval_path.iterdir()] == ["hospital"]  # the staging folder is not a validation
    left = _temporaries(run.path)
    assert left
    _age([*left, *(p for t in left for p in t.rglob("*"))])
    exited_ok(osteo_process(["eval", run, "--data", folder, "--tta", "--out", out, "--bootstrap", "20"], tmp_path))
    assert not _temporaries(run.path) and not _temporaries(run.eval_path)
    assert json.loads((out / "metrics.json").read_text())["tta"] is True
    assert (out / "predictions.csv").read_bytes() != before["predictions.csv"]


def _waits_while_held(args, run: RunDir, cwd: Path) -> subprocess.Popen:
    """Start osteo ``args`` while this process holds ``run``'s folder; return it once it says it
    waits (the failure: it ends without waiting), having written nothing there."""
    from osteo.files import folder_lock

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "COLUMNS": "1000"}
    # its own temporaries aside (a report stages its work before it takes the folder): no file of the folder's
    files = lambda: sorted(p.name for p in run.path.iterdir() if not (p.name.startswith(".") and ".tmp" in p.name))
    before = files()
    with folder_lock(run.path, "a test's hold"):
        proc = subprocess.Popen([sys.executable, "-m", "osteo.cli", *map(str, args)], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # a bound, not a measurement: a child that hangs before it waits is killed, and the test fails
        watchdog = threading.Timer(WAIT_BOUND_S, proc.kill)
        watchdog.start()
        said = []
        try:
            for line in proc.stderr:  # until it says it waits (or it ends without waiting: the failure)
                said.append(line)
                if "waiting for another osteo command" in line:
                    break
        finally:
            watchdog.cancel()
        assert said and "waiting for another osteo command that writes in" in said[-1], "".join(said)[-2000:]
        assert files() == before  # nothing written while it waits
    return proc


def test_a_second_eval_or_calibrate_of_a_run_waits_for_the_first_to_finish_writing(finished, other_hospital_dir,
                                                                                    tmp_path):
    """Two evals of one folder interleaved their renames (one failed: 'No such file or directory');
    two calibrates of one run left its external validation at the other's thresholds. While
    another osteo command holds the run's folder, each says it waits, writes nothing, and finishes
    once the folder is free."""
    run = _copy(finished, tmp_path)
    out = run.eval_path / "hospital"
    proc = _waits_while_held(["eval", run.path, "--data", other_hospital_dir, "--out", out, "--bootstrap", "20"],
                             run, tmp_path)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-2000:]
    assert (out / "metrics.json").is_file() and not _temporaries(run.path)
    before = run.calibration_path.read_bytes()
    proc = _waits_while_held(["calibrate", run.path, "--operating-point", "osteoporosis:sensitivity=0.8",
                              "--bootstrap", "20"], run, tmp_path)
    assert run.calibration_path.read_bytes() == before
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-2000:]
    names = [p["name"] for p in json.loads(run.calibration_path.read_text())["operating_points"]]
    assert names == ["osteoporosis"], names
    external = json.loads((out / "metrics.json").read_text())["operating_points"]
    assert [p["name"] for p in external] == names  # measured again at the new point, under the same hold


def test_a_killed_export_leaves_no_file_and_its_temporary_is_swept(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _killed(osteo_process(["export", run, "--format", "keras"], tmp_path, kill_at="files.before_replace"))
    export = run.path / "export"
    assert not (export / "model.keras").exists()
    left = _temporaries(export)
    assert len(left) == 1
    _age(left)
    exited_ok(osteo_process(["export", run, "--format", "keras"], tmp_path))
    assert (export / "model.keras").is_file() and not _temporaries(export)


@pytest.mark.heavy
def test_a_killed_report_leaves_the_previous_page_and_the_next_one_sweeps(finished, tmp_path):
    out = tmp_path / "rep"
    args = ["report", finished, "--out", out, "--bootstrap", "20"]
    exited_ok(osteo_process(args, tmp_path))
    page = (out / "index.html").read_bytes()
    _killed(osteo_process(args, tmp_path, kill_at="report.replacing"))
    assert (out / "index.html").read_bytes() == page
    left = _temporaries(out)
    assert left
    _age([*left, *(p for t in left for p in t.rglob("*"))])
    exited_ok(osteo_process(args, tmp_path))
    assert not _temporaries(out) and (out / "index.html").is_file()


def test_killed_calibrate_and_predict_leave_whole_files_and_their_temporaries_are_swept(finished, phantom_dir,
                                                                                       tmp_path):
    run = _copy(finished, tmp_path)
    calibration = run.calibration_path.read_bytes()
    _killed(osteo_process(["calibrate", run, "--bootstrap", "30"], tmp_path, kill_at="files.before_replace"))
    assert run.calibration_path.read_bytes() == calibration and run.is_finished()
    _age(_temporaries(run.path))
    exited_ok(osteo_process(["calibrate", run, "--bootstrap", "30"], tmp_path))
    assert not _temporaries(run.path)

    out = tmp_path / "predictions.csv"
    _killed(osteo_process(["predict", run, phantom_dir / "normal", "--out", out], tmp_path, kill_at="files.before_replace"))
    assert not out.exists()
    _age(_temporaries(tmp_path))
    exited_ok(osteo_process(["predict", run, phantom_dir / "normal", "--out", out], tmp_path))
    assert not _temporaries(tmp_path) and len(_rows(out)) == len(list((phantom_dir / "normal").iterdir()))


def test_ctrl_c_in_training_says_how_to_continue_and_that_continues_it(phantom_dir, tmp_path):
    args = ["train", "seed", *TINY, "--epochs", "2", "--data", phantom_dir, "--runs", tmp_path / "runs"]
    proc = osteo_process(args, tmp_path, kill_at="train.epoch_committed", OSTEO_KILL_SIGNAL="INT")  # Ctrl-C after epoch 1
    assert proc.returncode == 130, proc.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    said = f"osteo: interrupted; continue the run with: osteo train --resume {run}"
    assert proc.stderr.strip().splitlines()[-1] == said
    exited_ok(osteo_process(said.split("with: ")[1].split()[1:], tmp_path))  # the command it gave, as given
    assert [r["epoch"] for r in _rows(run / "history.csv")] == ["1", "2"] and RunDir(run).is_finished()


def test_a_stop_before_the_run_folder_is_made_does_not_point_at_another_run(phantom_dir, tmp_path):
    import argparse

    from osteo.cli import _after_stop, cmd_train
    from osteo.trainer import Trainer

    args = argparse.Namespace(func=cmd_train, folds=None, cv=None, resume=None, runs=str(tmp_path / "runs"))
    assert _after_stop(args) == "no run folder was made yet: run the same command again"  # stopped in the parser
    args.trainer = Trainer.__new__(Trainer)
    args.trainer.run_dir = None  # stopped in the audit, before the run folder
    assert _after_stop(args) == "no run folder was made yet: run the same command again"
    from osteo.runs import RunDir

    args.trainer.run_dir = RunDir(tmp_path / "runs" / "tiny" / "20260101-000000")  # made, then removed as empty
    assert _after_stop(args) == ("no epoch had ended, and its empty run folder is removed: run the same command "
                                 "again")  # not a resume of a folder that is gone


def test_a_report_audit_predict_or_eval_into_a_folder_being_written_waits_and_writes_nothing(
        finished, phantom_dir, tmp_path):
    """Report, audit and predict hold their output folders, and eval of a run's own splits its run, as
    calibrate does: a second command there would otherwise put back, on its own failure, files of the
    first. Each says it waits while another osteo command holds the folder, writes nothing, and
    finishes once it is free."""
    run = _copy(finished, tmp_path)
    commands = [
        (["report", run.path, "--out", tmp_path / "rep", "--bootstrap", "20"], tmp_path / "rep", "index.html"),
        (["data", "audit", phantom_dir, "--out", tmp_path / "aud"], tmp_path / "aud", "audit.json"),
        (["predict", run.path, phantom_dir / "normal", "--out", tmp_path / "pred" / "p.csv"], tmp_path / "pred",
         "p.csv"),
        (["eval", run.path, "--bootstrap", "30"], run.path, None),
    ]
    for args, folder, made in commands:
        folder.mkdir(exist_ok=True)
        before = run.metrics_path.read_bytes()
        proc = _waits_while_held(args, RunDir(folder), tmp_path)
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-2000:]
        assert (folder / made).is_file() if made else run.metrics_path.read_bytes() != before, args
