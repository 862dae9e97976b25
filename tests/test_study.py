"""osteo study: the grid as trials (on Ray when installed), retries, the nested learning-rate search, and Ctrl-C
or SIGTERM in the middle."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import exited_ok, osteo_process

from osteo import CLASSES
from osteo.data.split import INNER_VAL, check_split, split_rows
from osteo.errors import OsteoError
from osteo.runs import CvDir
from osteo.session import TrainOptions
from osteo.study import StudyConfig, parse_search, run_study


def _cfg(phantom_dir, tmp_path, **kw) -> StudyConfig:
    """The tests' study: the tiny backbone at 32 px, 2 epochs of 2 steps, 2 folds."""
    options = TrainOptions(data=str(phantom_dir), weights="none", image_size=32, epochs=2,
                           overrides=("train.steps_per_epoch=2", "train.tensorboard=false", "train.bootstrap=50"))
    return StudyConfig(**{"models": ["tiny"], "recipe": "seed", "folds": 2, "runs": str(tmp_path / "runs"),
                          "out": str(tmp_path / "report"), "options": options, **kw})


def _csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _study_json(cfg) -> dict:
    return json.loads((Path(cfg.out) / "study.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- no training


def _rows(n_per_class=(30, 15, 30)):
    return [{"path": f"{c}/P{i // 2:03d}_{i % 2}.png", "label": c, "status": "ok", "dup_group": ""}
            for c, n in zip(CLASSES, n_per_class) for i in range(n)]


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_the_inner_split_holds_out_the_outer_fold_and_splits_only_its_training_images(fold):
    rows = _rows()
    outer, _ = split_rows(rows, folds=3, fold=fold, seed=4, group_regex=r"^(P\d+)_")
    inner, _ = split_rows(rows, folds=3, fold=fold, seed=4, group_regex=r"^(P\d+)_", inner_val=0.25)
    side = {r["path"]: r["split"] for r in outer}
    assert {r["path"] for r in inner if r["split"] == "test"} == {p for p, s in side.items() if s == "val"}
    assert all(side[r["path"]] == "train" for r in inner if r["split"] in ("train", "val"))
    check_split(inner)  # every class on both sides of the inner split
    n_outer_train = sum(s == "train" for s in side.values())
    assert abs(sum(r["split"] == "val" for r in inner) - 0.25 * n_outer_train) <= 4  # patients of 2 images
    patients = {}
    for r in inner:
        patients.setdefault(r["path"].split("/")[1][:4], set()).add(r["split"])
    assert all(len(s) == 1 for s in patients.values())
    # the outer folds do not move when the test fraction is on: the same seed, the same folds
    assert split_rows(rows, folds=3, fold=fold, seed=4, group_regex=r"^(P\d+)_")[0] == outer


def test_search_ranges_parse_and_spread_over_the_range():
    s = parse_search("train.lr=1e-4:1e-1:log")
    assert (s.key, s.low, s.high, s.log) == ("train.lr", 1e-4, 1e-1, True)
    values = s.values(3, [0, 1])
    assert len(values) == 3 and all(1e-4 <= v <= 1e-1 for v in values)
    import math
    slices = sorted(int((math.log(v) - math.log(1e-4)) / (math.log(1e-1) - math.log(1e-4)) * 3) for v in values)
    assert slices == [0, 1, 2]  # one value from each third of the (log) range
    assert values == s.values(3, [0, 1])  # seeded
    assert parse_search("model.head.dropout=0.1:0.5").log is False
    for bad in ("train.lr", "train.lr=1:2:3:4", "train.lr=a:b", "train.lr=0:1e-3:log", "train.lr=1e-2:1e-3"):
        with pytest.raises(OsteoError, match="--search"):
            parse_search(bad)


@pytest.mark.parametrize("change, message", [
    ({"folds": 1}, "--folds must be 2 or more"),
    ({"models": ["tiny", "tiny"]}, "more than once"),
    ({"models": ["nope"]}, "unknown model"),
    ({"search": "train.nope=1:2"}, "unknown recipe key"),
    ({"search": "train.optimizer=1:2"}, "--search train.optimizer=1 (tiny): "),  # said of --search, not --set
    ({"search": "data.inner_val=0.1:0.3"}, "--search data.inner_val would change the images the trials are ranked on"),
    ({"search": "train.fine_tune_lr=1e-5:1e-3:log"}, "trains no epochs with train.fine_tune_lr"),
    ({"options": TrainOptions(weights="none", overrides=("train.epochs=-1",))}, "train.epochs must be from 0 to 10000"),
    ({"address": "127.0.0.1:1"}, "cannot reach the Ray cluster at 127.0.0.1:1"),  # in seconds: Ray retried for minutes
])
def test_a_bad_study_is_a_one_line_error_before_any_trial(phantom_dir, tmp_path, change, message):
    cfg = _cfg(phantom_dir, tmp_path, **change)
    with pytest.raises(OsteoError, match=re.escape(message)):
        run_study(cfg, say=lambda text: None, warn=lambda text: None)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "report").exists()


def test_a_study_of_a_recipe_with_a_test_split_cross_validates_it_away(phantom_dir, tmp_path):
    """finetune holds out 15% for testing; in a study each fold's held-out images are its test
    split instead, and a search trial chooses on the same inner split its fold trial will."""
    from osteo.study import _build_recipe, _inner_split, _plan

    cfg = _cfg(phantom_dir, tmp_path, recipe="finetune")
    assert _plan(cfg).recipes["tiny"].data.test == 0.15
    inner = _build_recipe(cfg, "tiny", _inner_split(cfg.folds, 2)).data
    assert (inner.folds, inner.fold, inner.test, inner.inner_val) == (2, 1, 0.0, INNER_VAL)


def test_the_search_needs_ray(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when not installed
    with pytest.raises(OsteoError, match=r"needs Ray Tune.*osteo\[study\]"):
        run_study(_cfg(phantom_dir, tmp_path, search="train.lr=1e-4:1e-2:log"), say=print, warn=print)


# --------------------------------------------------------------------------- studies


def _hospital(path, phantom_dir, copies: int = 0, seed: int = 11) -> Path:
    """Another labelled folder: 30 other phantom images, ``copies`` of the study's own (renamed)."""
    from osteo.data.phantom import write_phantom

    write_phantom(path, n=30, size=64, seed=seed)
    for i, image in enumerate(sorted((phantom_dir / "osteoporosis").glob("*.png"))[:copies]):
        shutil.copy(image, path / "normal" / f"copied-{i}.png")
    return path


@pytest.fixture(scope="module")
def ray_study(phantom_dir, tmp_path_factory):
    """2 backbones (tiny, vgg16) x 2 folds on local Ray; tiny's fold 1 is killed after its first epoch.
    Logged to MLflow (a file store in tmp): a study is one experiment. Each backbone's final model
    is scored on another hospital's folder holding 2 of the study's images."""
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("study")
    other = _hospital(tmp / "hospital-b", phantom_dir, copies=2)
    cfg = _cfg(phantom_dir, tmp, models=["tiny", "vgg16"], mlflow=True, external=[str(other)])
    cfg.options.mlflow = True
    said, warned = [], []
    # the trial kills itself once its first epoch is committed, as an OOM killer would; only the
    # first attempt (OSTEO_KILL_ONCE), only tiny's fold 1 (OSTEO_KILL_IF): a named point, no timing
    kill = tmp / "killed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSTEO_KILL_AT", "train.epoch_committed")
        mp.setenv("OSTEO_KILL_IF", r"--model tiny\b.*--fold 1\b")
        mp.setenv("OSTEO_KILL_ONCE", str(kill))
        mp.setenv("OSTEO_CACHE", str(tmp_path_factory.getbasetemp() / "osteo-cache"))
        mp.setenv("MLFLOW_TRACKING_URI", (tmp / "mlruns").as_uri())
        mp.delenv("OSTEO_MLFLOW_EXPERIMENT", raising=False)
        t0 = time.monotonic()
        page = run_study(cfg, say=said.append, warn=warned.append)
    return cfg, page, said, warned, kill, time.monotonic() - t0


@pytest.mark.heavy
def test_a_study_on_ray_reports_one_out_of_fold_row_per_backbone(ray_study):
    cfg, page, said, warned, _, seconds = ray_study
    assert page == Path(cfg.out).resolve() / "index.html" and page.is_file()
    study = _study_json(cfg)
    assert "local Ray" in study["executor"] and any("local Ray" in line for line in said)
    cvs = [Path(c["path"]) for c in study["cross_validations"]]
    assert sorted(c.parent.name for c in cvs) == ["tiny", "vgg16"]
    assert all(c["finished"] for c in study["cross_validations"])
    rows = [r for r in _csv(Path(cfg.out) / "comparison.csv")
            if r["run_id"] in {c.name for c in cvs} and r["evaluated_on"] == "out-of-fold"]
    assert sorted(r["model"] for r in rows) == ["tiny", "vgg16"]
    assert {r["folds"] for r in rows} == {"2"}
    assert Counter((t["kind"], t["status"]) for t in study["trials"]) == {("fold", "ok"): 4, ("external", "ok"): 2}
    assert not warned
    for t in (t for t in study["trials"] if t["kind"] == "fold"):
        log = Path(t["log"]).read_text(encoding="utf-8")
        assert "epoch 2/2" in log and Path(t["run"]).parent.name.startswith(study["id"])
        assert any(line.startswith(f"{t['model']} seed {t['seed']} fold {t['fold']}: done") for line in said)
    # the study's time spans its trials' (which ran meanwhile) and lies within the test's own
    assert max(t["wall_seconds"] or 0 for t in study["trials"]) <= study["wall_seconds"] <= seconds + 1


@pytest.mark.heavy
def test_each_backbones_fold_models_are_scored_as_one_on_the_external_folder(ray_study):
    """Each backbone's cross-validation is scored, its fold models as one ensemble, on the other
    hospital's folder, as Ray trials whose node is recorded; the study's own images in that folder
    are left out; the report has each backbone's row on it beside its out-of-fold row."""
    cfg, _, said, _, _, _ = ray_study
    study = _study_json(cfg)
    other = Path(cfg.external[0])
    assert study["external"] == [str(other)]
    cvs = {Path(c["path"]).parent.name: Path(c["path"]) for c in study["cross_validations"]}
    node = {t["node"] for t in study["trials"] if t["kind"] == "fold"}
    assert len(node) == 1 and len(next(iter(node))) == 56  # local Ray: one node, its id in hex
    for model, cv in cvs.items():
        scoring = next(t for t in study["trials"] if t["kind"] == "external" and t["model"] == model)
        assert (scoring["status"], scoring["folder"], scoring["scored"], scoring["left_out"]) == ("ok", str(other), 30, 2)
        assert scoring["run"] == str(cv / "eval" / "hospital-b") and {scoring["node"]} == node
        metrics = json.loads((cv / "eval" / "hospital-b" / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["ensemble_of"] == [str(cv / "fold-1"), str(cv / "fold-2")]
    rows = {(r["model"], r["evaluated_on"]): r for r in _csv(Path(cfg.out) / "comparison.csv")}
    for model, cv in cvs.items():
        assert rows[(model, "external: hospital-b")]["run_id"] == rows[(model, "out-of-fold")]["run_id"] == cv.name
    assert any(re.fullmatch(r"(tiny|vgg16) seed 0 on hospital-b: scored in \d+s, 30 images \(2 also in the study's "
                            r"data left out\) \(1 of 2 scorings, about \d+ (s|min) left\)", line) for line in said)


@pytest.mark.heavy
def test_every_trial_ends_with_the_trials_left_and_the_time_they_take(ray_study):
    _, _, said, _, _, _ = ray_study
    ends = [re.search(r"\((\d) of 4 trials(, about \d+ (s|min) left)?\)$", line) for line in said
            if re.match(r"(tiny|vgg16) seed 0 fold \d: done", line)]
    assert sorted(int(m[1]) for m in ends) == [1, 2, 3, 4]
    assert all(bool(m[2]) == (m[1] != "4") for m in ends)  # an estimate while trials are left


@pytest.mark.heavy
def test_a_killed_trial_is_resumed_and_the_study_records_the_retry(ray_study, monkeypatch):
    cfg, _, said, _, kill, _ = ray_study
    assert kill.exists(), "the trial was never killed"
    trials = {t["id"]: t for t in _study_json(cfg)["trials"]}
    killed = trials["tiny-seed0-fold1"]
    # every trial logged to MLflow, all in the study's one experiment
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants this for a file store
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or (Path(cfg.runs).parent / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(f"osteo-study-{_study_json(cfg)['id']}")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= sum(t["kind"] == "fold" for t in trials.values()) + 1
    # a fold's model tag is its backbone, not the name of its cross-validation's folder
    assert {r.data.tags["osteo.model"] for r in runs if "osteo.model" in r.data.tags} == {"tiny", "vgg16"}
    report = next(r for r in runs if r.info.run_name.endswith(" report"))
    assert "report/index.html" in [a.path for a in client.list_artifacts(report.info.run_id, "report")]
    assert (killed["status"], killed["attempts"], killed["retries"]) == ("ok", 2, 1)
    assert all(t["retries"] == 0 for i, t in trials.items() if i != "tiny-seed0-fold1")
    log = Path(killed["log"]).read_text(encoding="utf-8")
    assert "== attempt 2 of 3: osteo train seed --resume " in log and "resuming " in log
    assert any(line.startswith("tiny seed 0 fold 1: done") and "after 1 retry" in line for line in said)


def test_without_ray_the_trials_run_one_after_another_and_a_failed_one_is_reported(phantom_dir, tmp_path,
                                                                                     monkeypatch):
    """Seed 1's fold 2 cannot make its run directory (a file stands in its place): that trial
    fails for real, the others finish, and the study reports it and leaves its CV out."""
    from osteo import study as study_module

    monkeypatch.setitem(sys.modules, "ray", None)
    real = study_module.run_trial

    def blocked(spec, on_epoch=None):
        if spec["id"] == "tiny-seed1-fold2":
            Path(spec["run"]).write_text("in the way")  # its CV folder exists: run_study made cv.json
        return real(spec, on_epoch)

    monkeypatch.setattr(study_module, "run_trial", blocked)
    said, warned = [], []
    cfg = _cfg(phantom_dir, tmp_path, seeds=2)
    run_study(cfg, say=said.append, warn=warned.append)
    assert any("one after another (Ray is not installed)" in line for line in said)
    events = [line.split(": ")[1].split(" ")[0] for line in said if line.startswith("tiny seed 0 fold")]
    assert events == ["started", "done", "started", "done"]  # never two at once
    # a fold's score is of the images that chose its checkpoint, and says so
    assert any(line.startswith("tiny seed 0 fold 1: done in ") and
               " on its inner validation (which chose the checkpoint) (1 of 4 trials" in line for line in said), said
    study = _study_json(cfg)
    status = {t["id"]: t["status"] for t in study["trials"]}
    assert status == {"tiny-seed0-fold1": "ok", "tiny-seed0-fold2": "ok", "tiny-seed1-fold1": "ok",
                      "tiny-seed1-fold2": "failed"}
    assert any("tiny-seed1-fold2" in w or "seed 1 fold 2" in w for w in warned)
    rows = [r for r in _csv(tmp_path / "report" / "comparison.csv") if r["model"] == "tiny"]
    assert [r["evaluated_on"] for r in rows] == ["out-of-fold"] and rows[0]["run_id"].endswith("seed0")


@pytest.mark.slow
def test_the_search_chooses_on_inner_splits_and_the_folds_train_with_the_choice(phantom_dir, tmp_path):
    pytest.importorskip("ray")
    cfg = _cfg(phantom_dir, tmp_path, search="train.lr=1e-3:1e-1:log", trials=2)
    said = []
    run_study(cfg, say=said.append, warn=said.append)
    study = _study_json(cfg)
    chosen = {c["fold"]: c for c in study["search"]["chosen"]}
    assert sorted(chosen) == [1, 2] and all(1e-3 <= c["value"] <= 1e-1 for c in chosen.values())
    search = [t for t in study["trials"] if t["kind"] == "search"]
    assert len(search) == 4 and {t["status"] for t in search} <= {"ok", "stopped"}
    cv = Path(study["cross_validations"][0]["path"])
    for fold, c in chosen.items():
        recipe = json.loads((cv / f"fold-{fold}" / "recipe.json").read_text(encoding="utf-8"))
        assert recipe["train"]["lr"] == c["value"]
        assert c["trial"] in {t["id"] for t in search if t["fold"] == fold}
        # a nested fold holds its outer fold out as test (its checkpoint chose on an inner validation)
        held_out = {r["path"] for r in _csv(cv / f"fold-{fold}" / "split.csv") if r["split"] == "test"}
        assert held_out
        for t in (t for t in search if t["fold"] == fold):
            inner = _csv(Path(t["run"]) / "split.csv")
            assert not held_out & {r["path"] for r in inner if r["split"] in ("train", "val")}
            assert held_out == {r["path"] for r in inner if r["split"] == "test"}
            assert not (Path(t["run"]) / "best.weights.h5").exists()  # pruned: the search keeps its record only
    assert any(line.startswith("search tiny-seed0-fold1: chose train.lr=") for line in said)
    # the report says what the search chose for each fold, on its inner split (cv.json keeps it)
    assert json.loads((cv / "cv.json").read_text())["searched"] == {"train.lr": [chosen[1]["value"],
                                                                                chosen[2]["value"]]}
    (row,) = [r for r in _csv(Path(cfg.out) / "comparison.csv") if r["model"] == "tiny"]
    assert row["settings_by_fold"] == f"train.lr={chosen[1]['value']:.3g}|{chosen[2]['value']:.3g}"
    verdict = (Path(cfg.out) / "verdict.txt").read_text(encoding="utf-8")
    assert f"Its folds' {row['settings_by_fold']} (fold 1, 2, ...) were each chosen by a search on that fold's " \
           "inner split." in verdict


@pytest.mark.parametrize("external, message", [
    ("nowhere", "--external nowhere: data folder"),
    ("data", "is the study's own --data"),
    ("empty", "no class folders"),
    ("twins", "two --external folders are named hospital"),
])
def test_a_bad_external_folder_is_a_one_line_error_before_any_trial(phantom_dir, tmp_path, external, message):
    (tmp_path / "empty").mkdir()
    folders = {"nowhere": ["nowhere"], "data": [str(phantom_dir)], "empty": [str(tmp_path / "empty")],
               "twins": [str(_hospital(tmp_path / d / "hospital", phantom_dir)) for d in ("a", "b")]}[external]
    with pytest.raises(OsteoError, match=re.escape(message)) as e:
        run_study(_cfg(phantom_dir, tmp_path, external=folders), say=lambda text: None, warn=lambda text: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "report").exists()


@pytest.mark.slow  # a study killed at a trial's end continuing: CI's heavy tier (the Ctrl-C and SIGTERM study below)
def test_a_study_killed_while_scoring_continues_with_the_same_command(phantom_dir, tmp_path):
    """`osteo study ... --external A --external B` is killed once the first scoring has ended; the
    same command again keeps the fold trials and that scoring, scores B and writes the report.
    (Without Ray: the trials one after another, so the kill comes at a known point.)"""
    a = _hospital(tmp_path / "hospital-a", phantom_dir)
    b = _hospital(tmp_path / "hospital-b", phantom_dir, copies=3, seed=12)
    without_ray = "import sys; sys.modules['ray'] = None; from osteo.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", without_ray, "study", "--models", "tiny", "--recipe", "seed", "--folds", "2",
               "--data", str(phantom_dir), "--weights", "none", "--image-size", "32", "--epochs", "2",
               "--set", "train.steps_per_epoch=2", "--set", "train.tensorboard=false", "--set", "train.bootstrap=20",
               "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
               "--external", str(a), "--external", str(b)]
    # the study's own process (its command line is `-c study ...`), not a trial's, at its third trial end
    kill = {"OSTEO_KILL_AT": "study.trial_ended@3", "OSTEO_KILL_IF": r"^-c study "}
    first = subprocess.run(command, cwd=tmp_path, env={**os.environ, **kill}, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    assert "tiny seed 0 on hospital-a: scored in" in first.stdout and "hospital-b: started" not in first.stdout
    assert _study_json_at(tmp_path)["status"] == "running" and not (tmp_path / "report" / "index.html").exists()

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    study = _study_json_at(tmp_path)
    assert study["status"] == "finished" and f"study {study['id']}: continuing" in again.stdout
    trials = {t["id"]: t for t in study["trials"]}
    for fold in (1, 2):
        assert (trials[f"tiny-seed0-fold{fold}"]["status"], trials[f"tiny-seed0-fold{fold}"]["kept"]) == ("ok", True)
        assert f"tiny seed 0 fold {fold}: kept from an earlier run, best macro F1 " in again.stdout
        assert Path(trials[f"tiny-seed0-fold{fold}"]["log"]).read_text(encoding="utf-8").count("== attempt ") == 1
    scored_a, scored_b = trials["tiny-seed0-hospital-a"], trials["tiny-seed0-hospital-b"]
    assert (scored_a["status"], scored_a["kept"], scored_a["attempts"]) == ("ok", True, 1)
    assert (scored_b["status"], scored_b["kept"], scored_b["attempts"], scored_b["left_out"]) == ("ok", False, 1, 3)
    assert "tiny seed 0 on hospital-a: kept from an earlier run, 30 images" in again.stdout
    # a fold's score is of the images that chose its checkpoint, and says so
    assert "on its inner validation (which chose the checkpoint)" in again.stdout
    rows = {r["evaluated_on"] for r in _csv(tmp_path / "report" / "comparison.csv") if r["model"] == "tiny"}
    assert rows == {"out-of-fold", "external: hospital-a", "external: hospital-b"}


def _study_json_at(tmp_path) -> dict:
    return json.loads((tmp_path / "report" / "study.json").read_text(encoding="utf-8"))


def test_more_folds_than_a_class_can_fill_are_refused_before_any_trial(phantom_dir, tmp_path):
    smallest = min(len(list(c.iterdir())) for c in phantom_dir.iterdir() if c.is_dir())
    with pytest.raises(OsteoError, match=re.escape(f"use --folds {smallest} or fewer")) as e:
        run_study(_cfg(phantom_dir, tmp_path, folds=smallest + 1), say=lambda text: None, warn=lambda text: None)
    assert "\n" not in str(e.value) and not list((tmp_path / "runs").rglob("cv.json"))
    study = _study_json_at(tmp_path)  # not left "running": stopped, and why
    assert (study["status"], study["error"]) == ("stopped", str(e.value))


def test_the_studys_one_audit_fills_the_cache_at_each_models_size(phantom_dir, tmp_path, monkeypatch):
    """Models at different sizes on one folder (the tiny backbone's 64 px default, VGG16's 224): the
    study's audit, before any trial, leaves every file's entry in both caches."""
    from osteo.data import pipeline, scan

    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))
    smallest = min(len(list(c.iterdir())) for c in phantom_dir.iterdir() if c.is_dir())
    cfg = _cfg(phantom_dir, tmp_path, models=["tiny", "vgg16"], folds=smallest + 1)
    cfg.options.image_size = None  # each backbone's own default
    with pytest.raises(OsteoError, match="or fewer"):  # stops after the audit, before any trial
        run_study(cfg, say=lambda text: None, warn=lambda text: None)
    ok = scan.audit(phantom_dir, memo=tmp_path / "cache").ok()
    for size in (64, 224):
        cache = pipeline.ImageCache(size, "pad")
        assert ok and all(cache.check(r.sha256) is None for r in ok), size


def test_a_trial_whose_worker_never_started_is_a_failed_trial_not_a_traceback(tmp_path):
    """Ray's workers once imported a folder named osteo (the clone, from its parent folder) in place
    of the package: their results came back without a config, and the study died of a TypeError."""
    from types import SimpleNamespace

    from osteo.study import _outcomes

    by_id = {t: {"id": t, "run": "", "root": str(tmp_path / t)} for t in ("tiny-f1", "tiny-f2")}
    reported = {"status": "ok", "attempts": 1, "run": "r1"}
    results = [SimpleNamespace(config={"id": "tiny-f1"}, metrics=reported, error=None),
               SimpleNamespace(config=None, metrics=None,
                               error=RuntimeError("ImportError: cannot import name 'CLASSES' from 'osteo'\ntraceback"))]
    out = _outcomes(results, by_id)
    assert out["tiny-f1"]["status"] == "ok" and out["tiny-f1"]["run"] == "r1"
    assert out["tiny-f2"]["status"] == "failed" and out["tiny-f2"]["run"] == ""
    assert out["tiny-f2"]["error"] == "ImportError: cannot import name 'CLASSES' from 'osteo'"
    # none of the results says why: the trial failed all the same, and says what is known
    assert _outcomes(results[:1], by_id)["tiny-f2"]["error"] == "its worker did not start"


# --------------------------------------------------------------------------- signals


@pytest.mark.heavy
def test_ctrl_c_then_sigterm_stop_a_study_in_one_line_and_the_same_command_continues_it(phantom_dir, tmp_path):
    """Three folds, two trials side by side. Ctrl-C (SIGINT) when the first trial ends: the signal
    landed inside Ray's wait and the study ended in a SystemError or a result without a config,
    exit code 1. Then SIGTERM when a trial of the same command run again ends: Ray's own
    handler exited 1 with a crash report. Each now stops the trials and says in one line how to
    continue; the same command finishes the study without training a finished fold again. (One
    study for both signals: each start of a study on Ray costs the suite about 15 s.)"""
    args = ["study", "--models", "tiny", "--recipe", "seed", "--folds", "3", "--data", phantom_dir, "--weights",
            "none", "--image-size", "32", "--epochs", "1", "--runs", "runs", "--out", "study",
            "--set", "train.tensorboard=false", "--set", "train.bootstrap=20", "--set", "train.steps_per_epoch=2"]

    def stopped(proc, code: int, line: str, why: str) -> dict:
        assert proc.returncode == code, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [f"osteo: {line}; run the same command again to continue"]
        study = json.loads((tmp_path / "study" / "study.json").read_text())
        assert (study["status"], study["error"]) == ("stopped", why)
        return study

    def finished_folds() -> dict:
        (cv_path,) = (tmp_path / "runs" / "tiny").iterdir()
        folds = (CvDir(cv_path).fold(k) for k in (1, 2, 3))
        return {f.path: f.predictions_path.stat().st_mtime_ns for f in folds if f.is_finished()}

    first = stopped(osteo_process(args, tmp_path, kill_at="study.trial_ended", OSTEO_KILL_SIGNAL="INT",
                           OSTEO_KILL_IF="study"), 130, "interrupted", "interrupted (Ctrl-C)")
    after_int = finished_folds()
    assert 1 <= len(after_int) < 3
    second = stopped(osteo_process(args, tmp_path, kill_at="study.trial_ended", OSTEO_KILL_SIGNAL="TERM",
                            OSTEO_KILL_IF="study"), 143, "stopped by SIGTERM", "stopped by SIGTERM")
    after_term = finished_folds()  # the first trial to end may be one the first run finished
    assert second["id"] == first["id"]
    assert {k: v for k, v in after_term.items() if k in after_int} == after_int  # not trained or scored again
    exited_ok(osteo_process(args, tmp_path))
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["id"] == first["id"] and study["status"] == "finished"
    (cv_path,) = (tmp_path / "runs" / "tiny").iterdir()
    assert CvDir(cv_path).is_finished()
    assert {k: v for k, v in finished_folds().items() if k in after_term} == after_term


def test_attempts_cut_short_by_a_stop_spend_no_retry(tmp_path):
    """A study stopped three times (SIGTERM, each killing its running trial) marked that trial FAILED
    'after 2 retries' at the fourth start, without training it: the stops had counted as failures."""
    from osteo.study import RETRIES, STOPPED_MARK, _attempts_made

    log = tmp_path / "trial.log"
    assert _attempts_made(log) == 0
    stopped = "".join(f"\n== attempt {i} of 3: osteo train seed\nepoch 1/9{STOPPED_MARK}" for i in (1, 2, 3))
    log.write_text(stopped)
    assert _attempts_made(log) == 0 < RETRIES
    log.write_text(stopped + "\n== attempt 1 of 3: osteo train seed --resume r\nosteo: error: Killed\n")  # a failure
    assert _attempts_made(log) == 1
    # on Ray a stopped trial's worker may end without the mark: the study marks its unfinished trials
    from osteo.study import _mark_stopped

    running = tmp_path / "running.log"
    running.write_text("\n== attempt 1 of 3: osteo train seed\nepoch 1/9\n")
    spec = {"kind": "fold", "log": str(running), "run": str(tmp_path / "runs" / "fold-1"), "root": ""}
    _mark_stopped([spec])
    _mark_stopped([spec])  # once
    assert running.read_text().count(STOPPED_MARK) == 1 and _attempts_made(running) == 0


def test_a_trial_stopped_with_the_study_is_not_said_to_be_stopped_by_asha(tmp_path):
    """SIGTERM during --search: every running trial's end line said 'stopped by ASHA', and the same
    command then resumed and chose one of them."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from osteo.study import _Progress, _say_callback

    spec = {"id": "t1", "kind": "search", "model": "tiny", "seed": 0, "fold": 1, "set": "train.lr=0.001",
            "run": "", "root": str(tmp_path), "log": str(tmp_path / "t1.log")}
    trial = SimpleNamespace(config={"id": "t1"}, last_result={})  # ended without reporting its outcome
    said = []
    for interrupted in (False, True):
        _say_callback({"t1": spec}, said.append, _Progress([spec]), lambda i=interrupted: i).on_trial_complete(
            0, [], trial)
    label = "search tiny seed 0 fold 1 (train.lr=0.001): "
    assert len(said) == 2 and said[0].startswith(label + "stopped by ASHA (") and \
        said[1].startswith(label + "stopped with the study ("), said


def test_a_second_study_into_the_same_out_stops_in_one_line_and_a_new_one_says_what_it_replaces(phantom_dir,
                                                                                                  tmp_path):
    """Two studies into one --out ran side by side, each writing study.json and the report (the last
    one's kept); a finished study's command again started a new one over it without a word."""
    import fcntl

    from osteo.files import write_json

    cfg = _cfg(phantom_dir, tmp_path)
    busy = r"^another osteo command is writing in .*report, where this one would write a study's record and report"
    (tmp_path / "report").mkdir()
    held = os.open(tmp_path / "report", os.O_RDONLY)  # as another process's study running there holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OsteoError, match=busy):
            run_study(cfg, say=lambda text: None, warn=lambda text: None)
    finally:
        os.close(held)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [] and not (tmp_path / "runs").exists()
    write_json(tmp_path / "report" / "study.json", {"id": "study-20260101-000000", "status": "finished",
                                                    "config": {}})
    import osteo.study

    warned = []
    with pytest.MonkeyPatch.context() as m:  # the planned study itself is not run here
        m.setattr(osteo.study, "_run_planned", lambda *args: tmp_path / "report" / "index.html")
        run_study(cfg, say=lambda text: None, warn=warned.append)
    assert warned == [f"{tmp_path / 'report'} holds the study study-20260101-000000 (finished, of other settings): "
                      "this starts a new study, whose record and report replace its there (its runs stay where "
                      "they are)"]
