"""k-fold cross-validation: K complete runs under one parent, and a pooled out-of-fold report."""

import csv
import json
import re

import pytest
from helpers import one_line, osteo_warnings

from osteo.cli import main
from osteo.data.split import INNER_VAL
from osteo.runs import CvDir, list_cvs


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cv_args(phantom_dir, runs, *extra):
    return ["train", "seed", "--model", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--data", str(phantom_dir), "--runs", str(runs), "--set", "train.tensorboard=false",
            "--set", "train.bootstrap=50", "--set", "train.steps_per_epoch=2", *extra]


@pytest.fixture(scope="module")
def two_cvs(phantom_dir, tmp_path_factory):
    """Two cross-validations of 3 folds on the same folds (the same data and seed), other rates."""
    runs = tmp_path_factory.mktemp("runs")
    for lr in ("1e-3", "3e-2"):
        assert main(_cv_args(phantom_dir, runs, "--folds", "3", "--set", f"train.lr={lr}")) == 0
    cvs = sorted((p.parent for p in runs.glob("tiny/*/cv.json")), key=lambda p: p.name)
    assert len(cvs) == 2
    return runs, [CvDir(p) for p in cvs]


def test_three_folds_make_three_complete_runs_covering_every_image_once(two_cvs, phantom_dir):
    _, (cv, _) = two_cvs
    manifest = json.loads(cv.manifest_path.read_text())
    assert manifest["folds"] == 3 and manifest["members"] == ["fold-1", "fold-2", "fold-3"]
    assert manifest["split_seed"] == 0
    held_out = []
    for i, fold in enumerate(cv.folds(), start=1):
        assert fold.is_finished(), fold
        recipe = fold.read_recipe()
        assert (recipe.data.folds, recipe.data.fold, recipe.data.inner_val) == (3, i - 1, INNER_VAL)
        split = fold.read_split()
        assert {r["split"] for r in split} == {"train", "val", "test"}  # nested: the outer fold is the test split
        held_out += [r["path"] for r in split if r["split"] == "test"]
    everything = {r["path"] for r in cv.fold(1).read_split()}
    assert sorted(held_out) == sorted(everything) and len(held_out) == len(set(held_out))


def test_the_pooled_images_chose_nothing_in_any_fold(two_cvs, monkeypatch):
    """Each fold's checkpoint (BestCheckpoint monitors the validation split), temperature and
    thresholds come from its inner split; the images pooled out-of-fold are none of them."""
    from osteo.report.load import load_cv

    _, (cv, _) = two_cvs
    pooled = load_cv(cv, n_boot=0)
    assert pooled.evaluated_on == "out-of-fold" and pooled.chose == "nothing"
    rows = iter(pooled.rows)
    for fold, stats in zip(cv.folds(), pooled.fold_metrics):
        split = fold.read_split()
        monitored = {r["path"] for r in split if r["split"] == "val"}
        outer = {r["path"] for r in split if r["split"] == "test"}
        from_this_fold = {next(rows)["path"] for _ in range(stats["n"])}  # the pool is each fold's in turn
        assert from_this_fold == outer and monitored and not monitored & from_this_fold
        assert fold.read_calibration()["n"] == len(monitored)  # the temperature was fitted on those
        monitor = fold.read_metrics()["monitor"]
        assert monitor.startswith("val_")  # what BestCheckpoint read: Keras' validation_data, the "val" split
    # the Trainer validates (and so checkpoints) on the "val" split, never on the held-out one
    from osteo.data.module import DataModule

    asked = []
    original = DataModule.eval_dataset
    monkeypatch.setattr(DataModule, "eval_dataset", lambda self, name, *a, **k: asked.append(name)
                        or original(self, name, *a, **k))
    from osteo.trainer import Trainer

    recipe = cv.fold(1).read_recipe()
    recipe.runs_dir = str(cv.path.parent.parent / "spy")
    trainer = Trainer(recipe).setup()
    assert asked == ["val"] and trainer.val_ds is not None
    trainer._held.close()


def test_the_report_pools_out_of_fold_predictions_and_pairs_the_folds(two_cvs, tmp_path, phantom_dir):
    runs, (cv_a, cv_b) = two_cvs
    out = tmp_path / "rep"
    assert main(["report", "--runs", str(runs), "--all", "--out", str(out), "--bootstrap", "50"]) == 0
    rows = {r["run_id"]: r for r in _rows(out / "comparison.csv")}
    a, b = rows[cv_a.name], rows[cv_b.name]
    n_images = len(cv_a.fold(1).read_split())
    for r in (a, b):
        assert r["evaluated_on"] == "out-of-fold" and r["folds"] == "3" and r["chose"] == "nothing"
        assert int(r["n"]) == n_images  # pooled: every image scored once
        assert float(r["balanced_accuracy_lo"]) <= float(r["balanced_accuracy"]) <= float(r["balanced_accuracy_hi"])
        assert r["balanced_accuracy_mean"] and r["balanced_accuracy_sd"]
    # images trained on: the folds' mean, not fold 1's count
    assert int(a["n_train"]) == round(sum(f.read_env()["n_train"] for f in cv_a.folds()) / 3)
    # the two are paired: McNemar on the pooled predictions, a paired t-test on the folds (one comparison:
    # Holm leaves both as they are), and the verdict says both
    other = b if a["mcnemar_vs"] == "(best)" else a
    assert other["mcnemar_p"] == other["mcnemar_p_holm"] and other["fold_ttest_p"] == other["fold_ttest_p_holm"]
    said = (out / "verdict.txt").read_text(encoding="utf-8")
    assert said.startswith(f"On out-of-fold of {phantom_dir.name} (n={n_images}, which chose nothing): ")  # which data
    # the best was chosen on the folds' inner validation images, which other folds hold out: said
    assert "the best on its folds' inner validation images" in said and "these images, which chose nothing for any " \
        "one model, had a part in choosing which model is best: mildly optimistic for it." in said
    number = r"[0-9.e+-]+"
    assert re.search(rf"McNemar p = ({number}) \(\d+ images only it got right, \d+ only the best; Holm-adjusted for 1 "
                     rf"comparison: \1\); corrected t-test over the 3 "
                     rf"folds p = ({number}) \(Holm-adjusted: \2\): ", said), said
    assert "The phantom's oracle" in said
    # the phantom has latents.csv: the oracle's ceiling, scored on the same out-of-fold images
    oracle = [r for r in _rows(out / "comparison.csv") if r["model"] == "oracle"]
    assert len(oracle) == 1 and oracle[0]["evaluated_on"] == "out-of-fold"
    assert int(oracle[0]["n"]) == n_images
    assert float(oracle[0]["balanced_accuracy"]) > max(float(a["balanced_accuracy"]), float(b["balanced_accuracy"]))
    folds = _rows(out / "folds.csv")
    assert len(folds) == 6 and {f["fold"] for f in folds} == {"1", "2", "3"}
    # what each fold trained on and which checkpoint its inner validation chose (the t-test's correction uses
    # the first: a nested fold trains on 75% of the other folds' images)
    for cv in (cv_a, cv_b):
        assert [(int(f["n_train"]), int(f["best_epoch"])) for f in folds if f["run_id"] == cv.name] == [
            (fold.read_env()["n_train"], fold.read_metrics()["best_epoch"]) for fold in cv.folds()]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Cross-validation folds" in page and "out-of-fold" in page
    # the operating points, pooled over the held-out folds at each fold's own threshold
    points = _rows(out / "operating_points.csv")
    assert {(p["run_id"], p["point"]) for p in points} == {(cv.name, name) for cv in (cv_a, cv_b)
                                                          for name in ("osteoporosis", "osteopenia+")}
    assert all(p["evaluated_on"] == "out-of-fold" and p["chose"] == "nothing" and int(p["n"]) == n_images
               for p in points)


def test_one_fold_at_a_time_lands_in_the_same_parent(phantom_dir, tmp_path, capsys):
    cv = tmp_path / "elsewhere" / "my-cv"  # not under --runs: the report is pointed at it
    assert main(_cv_args(phantom_dir, tmp_path / "runs", "--folds", "2", "--fold", "2", "--cv",
                         str(phantom_dir / "cv"))) == 2  # never inside the folder its folds read
    assert "is inside" in one_line(capsys) and not (phantom_dir / "cv").exists()
    for i in (2, 1):
        capsys.readouterr()
        assert main(_cv_args(phantom_dir, tmp_path / "runs", "--folds", "2", "--fold", str(i), "--cv", str(cv))) == 0
        # once every fold is finished, the result: pooled out-of-fold numbers with intervals, and the baseline
        printed = capsys.readouterr().out
        assert ("pooled out-of-fold (out-of-fold, which chose nothing: each of its " in printed) == (i == 1), printed
        assert f"compare with: osteo report {cv} RUNS..." in printed
    assert re.search(r"by the fold that held it out\): balanced accuracy [0-9.]+ \[[0-9.]+, [0-9.]+\], accuracy "
                     r".*; always answering \w+: balanced accuracy 0\.333", printed), printed
    assert CvDir(cv).is_finished()
    assert main(_cv_args(phantom_dir, tmp_path / "runs", "--folds", "3", "--fold", "1", "--cv", str(cv))) == 2
    assert main(_cv_args(phantom_dir, tmp_path / "runs", "--folds", "2", "--fold", "5")) == 2
    # a fold of other settings would be pooled with the others as if one model's: refused, naming what differs
    capsys.readouterr()
    assert main(_cv_args(phantom_dir, tmp_path / "runs", "--folds", "2", "--fold", "2", "--cv", str(cv),
                         "--image-size", "48")) == 2
    assert "was started with other settings (data.image_size)" in one_line(capsys)
    assert main(_cv_args(phantom_dir, tmp_path / "runs", "--fold", "2", "--cv", str(tmp_path / "none"))) == 2
    assert "is not a cross-validation (no cv.json there); start one with --folds K" in one_line(capsys)
    assert main(["export", str(cv)]) == 2  # a cross-validation where one run is wanted: say which it is
    assert f"is a cross-validation, not one run: give one of its folds, e.g. {cv / 'fold-1'}" in one_line(capsys)


def test_the_same_command_continues_a_cross_validation_an_older_osteo_started(phantom_dir, tmp_path, capsys):
    """cv.json's settings are a hash of the recipe, whose fields grow with osteo: the same --folds
    command after an upgrade started a new cross-validation beside the killed one, silently."""
    runs = tmp_path / "runs"
    assert main(_cv_args(phantom_dir, runs, "--folds", "2", "--fold", "1")) == 0
    (cv,) = list_cvs(runs)
    record = json.loads(cv.manifest_path.read_text())
    cv.manifest_path.write_text(json.dumps({**record, "settings": "0123456789abcdef"}))  # an older osteo's hash
    with osteo_warnings() as said:  # other settings: a new one, and the old one named
        assert main(_cv_args(phantom_dir, runs, "--folds", "2", "--fold", "2", "--image-size", "48")) == 0
    assert any(m.startswith(f"left the unfinished cross-validation {cv} as it is: its folds train other settings "
                            "(data.image_size") for m in said), said
    assert len(list_cvs(runs)) == 2
    capsys.readouterr()
    assert main(_cv_args(phantom_dir, runs, "--folds", "2", "--fold", "2")) == 0  # the same: continued
    assert f"continuing the unfinished cross-validation {cv}" in capsys.readouterr().out
    assert cv.is_finished() and len(list_cvs(runs)) == 2


def test_folds_the_data_cannot_fill_are_refused_before_anything_is_written(phantom_dir, tmp_path, capsys):
    """--folds 500 on 120 images trained every fold, those past the smallest class's size holding
    out nothing; a class too small for the inner validation named data.val, which folds do not
    use; and each refusal left an empty cross-validation folder behind."""
    import shutil

    counts = {c.name: len(list(c.iterdir())) for c in phantom_dir.iterdir() if c.is_dir()}
    smallest = min(counts.values())
    runs = tmp_path / "runs"
    assert main(_cv_args(phantom_dir, runs, "--folds", str(smallest + 1))) == 2
    line = one_line(capsys)
    assert f"--folds {smallest + 1} is more folds than class" in line and f"use --folds {smallest} or fewer" in line
    few = tmp_path / "few"
    shutil.copytree(phantom_dir, few)
    for f in sorted((few / "osteopenia").iterdir())[2:]:  # two osteopenia images: one held out, one to train
        f.unlink()
    assert main(_cv_args(few, runs, "--folds", "2")) == 2
    line = one_line(capsys)
    assert "class osteopenia has" in line and "--set data.inner_val=F" in line, line
    assert not runs.exists() or not any(runs.rglob("cv.json")), "a refused cross-validation left its folder"


def test_a_cross_validation_whose_first_fold_fails_on_its_weights_leaves_nothing(phantom_dir, tmp_path, capsys):
    """Weights of another backbone are refused when fold 1 builds its model, before an epoch ends: as
    a single run leaves no folder then, the new cross-validation leaves none either (its cv.json
    was left with no fold, reported unfinished by every report, and nothing to resume); a --cv
    folder the user made stays, without a cv.json."""
    from osteo.backbones.base import create
    from osteo.registry import get_backbone

    wrong = tmp_path / "vgg16.weights.h5"
    create(get_backbone("vgg16"), "keras", image_size=32, weights="none").build().save_weights(wrong)
    runs = tmp_path / "runs"
    args = [a if a != "none" else str(wrong) for a in _cv_args(phantom_dir, runs, "--folds", "2")]
    assert main(args) == 2
    assert "does not match backbone tiny" in one_line(capsys)
    assert not [p for p in runs.rglob("*") if p.name != "tiny"], sorted(runs.rglob("*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main([*args, "--cv", str(mine)]) == 2
    assert "does not match backbone tiny" in one_line(capsys)
    assert mine.is_dir() and not any(mine.iterdir())


def test_a_cross_validation_takes_its_inner_validation_share_from_the_command_line(phantom_dir, tmp_path):
    """--folds 3 --set data.inner_val=0.5 was refused: 'needs data.folds >= 2', although --folds was given."""
    from osteo.errors import OsteoError
    from osteo.session import TrainOptions, build_recipe

    options = TrainOptions(data=str(phantom_dir), weights="none", image_size=32, runs=str(tmp_path / "runs"),
                           overrides=("data.inner_val=0.5",))
    recipe = build_recipe("finetune", "tiny", options, folds=3)  # finetune holds out a test split on its own
    assert (recipe.data.inner_val, recipe.data.folds, recipe.data.test) == (0.5, 3, 0.0)
    with pytest.raises(OsteoError, match=r"needs data\.folds >= 2"):  # a plain run has no use for it
        build_recipe("finetune", "tiny", options)


def test_the_folds_pre_check_fills_the_image_cache_so_the_folds_decode_nothing_again(phantom_dir, tmp_path,
                                                                                     monkeypatch):
    """The check that every fold can be scored audits a new folder before the first fold: its
    decodes fill the image cache at the folds' size, as a run's own audit does; before, the first
    fold decoded every file a second time."""
    import shutil

    from osteo.data import pipeline, scan
    from osteo.data.module import DataModule
    from osteo.recipe import resolve
    from osteo.session import TrainOptions, _fold_recipe, build_recipe, check_folds

    data = tmp_path / "new"  # a folder no audit has seen
    shutil.copytree(phantom_dir, data)
    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(scan, "RACY_S", -3600.0)  # the files were just copied: remembered all the same
    options = TrainOptions(data=str(data), weights="none", image_size=32, runs=str(tmp_path / "runs"))
    recipe = build_recipe("seed", "tiny", options, folds=3)
    check_folds(recipe, 3)
    cache = pipeline.ImageCache(32, recipe.data.resize)
    found = scan.audit(data, memo=cache.root)
    assert found.ok() and all(cache.path(r.sha256).is_file() for r in found.ok())
    decoded = []
    monkeypatch.setattr(pipeline, "decode_gray", lambda *a, **k: decoded.append(a) or None)
    monkeypatch.setattr(scan, "decode_gray", lambda *a, **k: decoded.append(a) or None)
    fold = resolve(_fold_recipe(recipe, 3, 1), backend="tensorflow")
    module = DataModule(fold.data, seed=fold.train.seed).setup()  # what the first fold's trainer does
    assert len(module.split) == len(found.ok()) and not decoded  # every file recalled, every entry cached


def test_a_continued_cross_validation_trains_on_the_backend_of_its_folds(two_cvs, tmp_path):
    """Its folds are pooled as one model's: a command that continues it plans the backend its first
    started fold trained on (env.json), as --resume does for a run, not what auto picks today."""
    import json
    import shutil

    from osteo.session import continued_cv_backend

    _, cvs = two_cvs
    copy = tmp_path / "cv"
    shutil.copytree(cvs[0].path, copy)
    env = json.loads((copy / "fold-1" / "env.json").read_text())
    (copy / "fold-1" / "env.json").write_text(json.dumps({**env, "backend": "torch"}))
    recipe = CvDir(copy).fold(1).read_recipe()
    assert continued_cv_backend(recipe, None, str(copy)) == "torch"
    shutil.rmtree(copy / "fold-1")  # the first started fold is the one asked
    assert continued_cv_backend(recipe, None, str(copy)) == env["backend"]
    assert continued_cv_backend(recipe, 3, None) is None  # no unfinished one of this recipe to continue


def test_one_audit_fills_the_image_cache_at_the_size_of_every_model_on_the_folder(phantom_dir, tmp_path,
                                                                                 monkeypatch):
    """A study audits each folder once; its models may train at other sizes (a backbone's own
    default): each size's cache gets every file from that one decode, so no model's first run
    decodes the folder again."""
    import copy
    import shutil

    from osteo.data import pipeline, scan
    from osteo.session import TrainOptions, audited_rows, build_recipe

    data = tmp_path / "new"
    shutil.copytree(phantom_dir, data)
    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))
    recipe = build_recipe("seed", "tiny", TrainOptions(data=str(data), weights="none", image_size=32,
                                                       runs=str(tmp_path / "runs")))
    other = copy.deepcopy(recipe)
    other.data.image_size = 48
    decoded = []
    real = scan.decode_gray
    monkeypatch.setattr(scan, "decode_gray", lambda *a, **k: decoded.append(a) or real(*a, **k))
    rows = audited_rows(recipe, [recipe, other])
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(decoded) == len(ok) > 100  # each file decoded once, for both sizes
    for size in (32, 48):
        cache = pipeline.ImageCache(size, recipe.data.resize)
        assert all(cache.check(r["sha256"]) is None for r in ok), size


def test_epochs_in_all_are_shared_between_the_phases_a_set_leaves(phantom_dir, tmp_path):
    """--epochs 4 --set train.epochs=0 (the whole model from the start, for 4 epochs) ran 2 epochs:
    --epochs halved its total between both phases first, then the --set emptied the first."""
    from osteo.errors import OsteoError
    from osteo.session import TrainOptions, build_recipe

    def recipe(epochs, *sets):
        options = TrainOptions(data=str(phantom_dir), weights="none", image_size=32, runs=str(tmp_path / "runs"),
                               epochs=epochs, overrides=sets)
        t = build_recipe("finetune", "tiny", options).train
        return t.epochs, t.fine_tune_epochs

    assert recipe(4) == (2, 2)
    assert recipe(4, "train.epochs=0") == (0, 4)
    assert recipe(4, "train.fine_tune_epochs=0") == (4, 0)
    assert recipe(4, "train.epochs=00") == (0, 4)  # the value, not its text
    # a one-phase recipe (seed: the head alone) too: the whole model, 4 epochs (it trained the head 4 epochs)
    options = TrainOptions(data=str(phantom_dir), weights="none", image_size=32, runs=str(tmp_path / "runs"), epochs=4,
                           overrides=("train.epochs=0",))
    t = build_recipe("seed", "tiny", options).train
    assert (t.epochs, t.fine_tune_epochs) == (0, 4)
    assert recipe(None, "train.epochs=0", "train.fine_tune_epochs=3") == (0, 3)
    with pytest.raises(OsteoError, match=r"--epochs 4 is the total over both phases and --set train\.epochs=3 one "
                                         r"phase's: give one of them"):
        recipe(4, "train.epochs=3")
    with pytest.raises(OsteoError, match=r"leave --epochs 4 no phase: drop one of them"):
        recipe(4, "train.epochs=0", "train.fine_tune_epochs=0")


def test_the_pooled_curve_averages_each_epoch_over_the_folds_that_trained_it(two_cvs, tmp_path):
    """Early stopping ends folds at different epochs (and a later phase's epochs keep their
    numbers): the curve was averaged row by row and cut at the shortest fold."""
    import shutil

    from osteo.files import write_csv
    from osteo.report.load import load_cv

    cv = CvDir(shutil.copytree(two_cvs[1][0].path, tmp_path / "cv"))
    first = cv.fold(1)
    rows = first.read_history()
    later = {**rows[-1], "epoch": "3", "phase": "2", "val_loss": "0.25"}  # fold 1 alone trained an epoch 3
    with open(first.history_path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f))
    write_csv(first.history_path, [*rows, later], columns)
    history = load_cv(cv, n_boot=0).history
    assert [int(h["epoch"]) for h in history] == [1, 3]
    assert history[0]["val_loss"] == pytest.approx(
        sum(float(f.read_history()[0]["val_loss"]) for f in cv.folds()) / 3)
    assert history[1]["val_loss"] == 0.25 and history[1]["phase"] == 2.0
