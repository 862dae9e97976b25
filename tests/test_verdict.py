"""The report's verdict: the best model, by how much, whether the difference is real (Holm), on
which images and what they chose. Run directories are written by hand (no training)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from osteo import CLASSES
from osteo.cli import main
from osteo.evaluate import holm
from osteo.files import write_csv, write_json
from osteo.report import write_report
from osteo.runs import RunDir

TRAIN = ["normal"] * 10 + ["osteopenia"] * 5 + ["osteoporosis"] * 20  # the training majority: osteoporosis
TEST = ["normal"] * 25 + ["osteopenia"] * 15 + ["osteoporosis"] * 25
VAL = ["normal"] * 6 + ["osteopenia"] * 4 + ["osteoporosis"] * 6


def skilled(labels: list[str], seed: int) -> np.ndarray:
    """A model that has learned the task: the true class's logit raised."""
    rng = np.random.default_rng(seed)
    y = np.array([CLASSES.index(c) for c in labels])
    logits = rng.normal(size=(len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += 2.0
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def majority(labels: list[str]) -> np.ndarray:
    return np.tile([0.2, 0.2, 0.6], (len(labels), 1))  # always osteoporosis


def make_run(root: Path, run_id: str, test_probs: np.ndarray, test_prefix: str = "", content: str = "",
             val_probs: np.ndarray | None = None) -> Path:
    """A finished run with train / val / test splits, as the trainer leaves it (metrics aside);
    with ``content``, its manifest gives each image a sha256 made from it and the path."""
    run = root / "tiny" / run_id
    run.mkdir(parents=True)
    write_json(run / "recipe.json", {"name": run_id, "model": {"backbone": "tiny", "weights": "none"},
                                     "data": {"image_size": 32, "dir": str(root / "no-images")},
                                     "train": {"epochs": 1, "fine_tune_epochs": 0}})
    rows = {name: [{"path": f"{test_prefix if name == 'test' else ''}{c}/{name}_{i}.png", "label": c}
                   for i, c in enumerate(labels)] for name, labels in (("train", TRAIN), ("val", VAL), ("test", TEST))}
    write_csv(run / "split.csv", [{**r, "split": name, "group": r["path"]} for name, rs in rows.items() for r in rs],
              ("path", "label", "split", "group"))
    if content:
        import hashlib

        RunDir(run).write_manifest([{"path": r["path"], "label": r["label"], "status": "ok",
                                     "sha256": hashlib.sha256(f"{content}{r['path']}".encode()).hexdigest()}
                                    for rs in rows.values() for r in rs])
    kept = RunDir(run).write_predictions(rows["val"], skilled(VAL, 7) if val_probs is None else val_probs, "val",
                                         "uncalibrated")
    RunDir(run).write_predictions(rows["test"], test_probs, "test", "uncalibrated", append_to=kept)
    write_json(run / "metrics.json", {"model": "tiny", "best_epoch": 1, "monitor": "val_macro_f1"})
    write_json(run / "env.json", {"backend": "tensorflow", "precision": "float32", "n_train": len(TRAIN)})
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def discordant(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The test images only A gets right, and only B."""
    y = np.array([CLASSES.index(c) for c in TEST])
    return int(np.sum((a.argmax(1) == y) & (b.argmax(1) != y))), int(np.sum((a.argmax(1) != y) & (b.argmax(1) == y)))


def mcnemar_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar: the discordant pairs under Binomial(n, 1/2), two-sided."""
    only_a, only_b = discordant(a, b)
    return min(1.0, binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def test_holm_against_a_hand_computation():
    # m = 4 tests: sorted 0.01, 0.02, 0.03, 0.5 -> 4*0.01, max(that, 3*0.02), max(that, 2*0.03), max(that, 1*0.5)
    assert holm([0.03, None, 0.01, 0.5, 0.02]) == pytest.approx([0.06, None, 0.04, 0.5, 0.06])
    assert holm([0.4, 0.6]) == [0.8, 0.8]  # capped at 1 and never below a smaller p's adjustment
    assert holm([]) == [] and holm([None]) == [None]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Trained, a twin of the same quality, the majority class, all on one test split; and a
    trained run on other test images."""
    root = tmp_path_factory.mktemp("verdict")
    probs = {"trained": skilled(TEST, 0), "twin": skilled(TEST, 1), "majority": majority(TEST)}
    val = {"trained": skilled(VAL, 2), "twin": skilled(VAL, 0), "majority": majority(VAL)}  # twin: best on test
    runs = [make_run(root, name, p, val_probs=val[name]) for name, p in probs.items()]
    runs.append(make_run(root, "elsewhere", skilled(TEST, 2), test_prefix="other/"))
    out = root / "rep"
    write_report(runs, out, n_boot=200)
    rows = {r["run_id"]: r for r in read_csv(out / "comparison.csv")}
    return probs, rows, (out / "verdict.txt").read_text(encoding="utf-8"), out


def test_the_verdict_names_the_best_the_differences_and_the_baseline(report):
    probs, rows, said, out = report
    # the best is chosen on validation: the test images choose nothing, not even which run is best
    val = {k: float(rows[k]["val_balanced_accuracy"]) for k in ("trained", "twin", "majority")}
    best = max(("trained", "twin"), key=val.get)
    twin = "twin" if best == "trained" else "trained"
    assert val[best] > val[twin] > val["majority"] and rows[best]["balanced_accuracy"] != max(
        rows[k]["balanced_accuracy"] for k in ("trained", "twin"))  # the fixture: not the best on test
    b = rows[best]
    assert b["mcnemar_vs"] == "(best)" and b["evaluated_on"] == "test" and b["chose"] == "nothing"
    assert said.startswith(f"On test of no-images (n={len(TEST)}, which chose nothing): tiny ({best}), the best on its "
                           f"validation "
                           f"images (balanced accuracy {val[best]:.3f} there), scores "
                           f"{float(b['balanced_accuracy']):.3f} [{float(b['balanced_accuracy_lo']):.3f}, "
                           f"{float(b['balanced_accuracy_hi']):.3f}].")
    t = rows[twin]  # above the best on test: said so, with the difference's interval as it is
    assert (f"tiny ({twin}) scores {float(t['balanced_accuracy']):.3f}, {float(t['balanced_accuracy_diff']):.3f} above "
            f"the best (95% interval {float(t['balanced_accuracy_diff_lo']):.3f} to "
            f"{float(t['balanced_accuracy_diff_hi']):.3f})") in said
    # raw McNemar p-values by hand, then Holm by hand over the two paired comparisons
    raw = {k: mcnemar_by_hand(probs[k], probs[best]) for k in (twin, "majority")}
    counts = {k: discordant(probs[k], probs[best]) for k in raw}
    for k in raw:  # the CSV keeps 8 decimals
        assert float(rows[k]["mcnemar_p"]) == pytest.approx(raw[k], abs=1e-8)
        assert (int(rows[k]["mcnemar_only_this"]), int(rows[k]["mcnemar_only_best"])) == counts[k]
        assert rows[k]["mcnemar_method"] == "exact" and int(rows[k]["mcnemar_groups"]) == len(TEST)
    said_counts = {k: f"{counts[k][0]} images only it got right, {counts[k][1]} only the best" for k in raw}
    low, high = sorted(raw, key=raw.get)
    adjusted = {low: min(1.0, 2 * raw[low])}
    adjusted[high] = min(1.0, max(adjusted[low], raw[high]))
    for k in raw:
        assert float(rows[k]["mcnemar_p_holm"]) == pytest.approx(adjusted[k], abs=1e-8)
    assert adjusted["majority"] < 0.05 <= adjusted[twin]
    m = rows["majority"]
    diff = float(m["balanced_accuracy"]) - float(b["balanced_accuracy"])
    assert float(m["balanced_accuracy_diff"]) == pytest.approx(diff)
    assert float(m["balanced_accuracy_diff_lo"]) <= diff <= float(m["balanced_accuracy_diff_hi"])
    assert (f"tiny (majority) scores 0.333, {-diff:.3f} below the best (95% interval "
            f"{-float(m['balanced_accuracy_diff_hi']):.3f} to {-float(m['balanced_accuracy_diff_lo']):.3f}); "
            f"McNemar p = {raw['majority']:.3g} ({said_counts['majority']}; Holm-adjusted for 2 comparisons: "
            f"{adjusted['majority']:.3g}): a significant difference.") in said
    assert (f"McNemar p = {raw[twin]:.3g} ({said_counts[twin]}; Holm-adjusted for 2 comparisons: {adjusted[twin]:.3g}): "
            f"no significant difference; tiny ({twin}) is the more accurate") in said
    # other images: a set of their own, with its own best, not tested against the others and not
    # counted among their comparisons
    e = rows["elsewhere"]
    assert e["mcnemar_vs"] == "(best)" and not e["mcnemar_p"] and e["images_id"] != b["images_id"]
    assert (f"tiny (elsewhere), the only model measured on these images, is best, with balanced accuracy "
            f"{float(e['balanced_accuracy']):.3f} [") in said
    assert said.strip().endswith("Runs measured on different images (other splits or folders) are compared only "
                                 "with the runs measured on the same images.")
    assert ("Always answering osteoporosis (the training majority) scores 0.333 on the same images; the best "
            "model's interval lies above it.") in said
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>Comparison</h2>")
    assert "a significant difference." in page and "no significant difference;" in page


def test_runs_of_the_same_file_names_in_other_images_are_not_paired(tmp_path):
    """Two data folders with the same names and split (two phantoms of one recipe): the same
    split.csv, other images. Paired, McNemar called their difference significant."""
    same = [make_run(tmp_path, name, skilled(TEST, i), content="folder A") for i, name in enumerate(("a1", "a2"))]
    other = make_run(tmp_path, "b", majority(TEST), content="folder B")
    assert RunDir(same[0]).split_id() == RunDir(other).split_id()
    write_report([*same, other], tmp_path / "rep", n_boot=50)
    rows = {r["run_id"]: r for r in read_csv(tmp_path / "rep" / "comparison.csv")}
    assert rows["b"]["mcnemar_vs"] == "(best)" and not rows["b"]["mcnemar_p"]
    assert rows["a1"]["images_id"] == rows["a2"]["images_id"] != rows["b"]["images_id"]
    assert {rows["a1"]["mcnemar_vs"], rows["a2"]["mcnemar_vs"]} - {"(best)"}  # the same images: paired
    assert any(rows[k]["mcnemar_p"] for k in ("a1", "a2"))


def test_osteo_report_opens_with_the_verdict(report, tmp_path, capsys):
    out = report[3]
    runs = [str(out.parent / "tiny" / name) for name in ("trained", "majority")]
    assert main(["report", *runs, "--out", str(tmp_path / "cli"), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    verdict = (tmp_path / "cli" / "verdict.txt").read_text(encoding="utf-8").strip()
    assert "On test of no-images (n=65, which chose nothing): tiny (trained), the best on its validation images" in verdict
    assert "; Holm-adjusted for 1 comparison: " in verdict and "a significant difference." in verdict
    flat, verdict = " ".join(printed.split()), " ".join(verdict.split())  # as the terminal wrapped it
    assert verdict in flat and flat.index(verdict) < flat.index(" comparison ")  # the verdict, then the table
    from osteo.cli import _metric_cell, _p_cell

    # the table's p-values read as the verdict's (three significant digits), its metrics to 3 decimals
    assert (_p_cell("0.0015071"), _p_cell("0.5"), _p_cell("")) == ("0.00151", "0.5", "-")
    assert (_metric_cell("0.8123"), _metric_cell("0.0001234")) == ("0.812", "0.000123")


def test_runs_that_chose_on_their_images_are_compared_apart_and_called_optimistic(tmp_path):
    trained = make_run(tmp_path, "trained", skilled(TEST, 0))
    write_report([trained], tmp_path / "test", n_boot=0)
    said = (tmp_path / "test" / "verdict.txt").read_text(encoding="utf-8")
    assert ("the best model scores above it; no interval was computed (--bootstrap 0), so that is not a test."
            in " ".join(said.split()))  # no interval to lie above the baseline, nor one that fails to
    write_report([trained], tmp_path / "val", split="val", n_boot=0)
    said = (tmp_path / "val" / "verdict.txt").read_text(encoding="utf-8")
    assert said.startswith(f"On validation of no-images (n={len(VAL)}, which chose the checkpoint, temperature and "
                           "thresholds: "
                           "optimistic): tiny (trained), the only model measured on these images, is best")
    rows = read_csv(tmp_path / "val" / "comparison.csv")
    assert rows[0]["evaluated_on"] == "validation" and rows[0]["chose"] == "checkpoint, temperature, thresholds"


def _pair(ba: float, diff: tuple[float, float, float], acc: tuple[float, float], p: float) -> list[dict]:
    """The best and one other run on the same images, as comparison.csv holds them."""
    common = {"evaluated_on": "test", "chose": "nothing", "n": "65", "split_id": "s", "majority_class": "normal",
              "majority_balanced_accuracy": "0.333", "folds": "", "fold_ttest_p": "", "fold_ttest_p_holm": ""}
    best = {**common, "model": "vgg16", "run_id": "a", "mcnemar_vs": "(best)", "balanced_accuracy": str(ba),
            "balanced_accuracy_lo": str(ba - 0.05), "balanced_accuracy_hi": str(ba + 0.05), "accuracy": str(acc[0]),
            "balanced_accuracy_diff": "", "balanced_accuracy_diff_lo": "", "balanced_accuracy_diff_hi": "",
            "mcnemar_p": "", "mcnemar_p_holm": ""}
    other = {**common, "model": "tiny", "run_id": "b", "mcnemar_vs": "vgg16 (a)", "accuracy": str(acc[1]),
             "balanced_accuracy": str(ba + diff[0]), "balanced_accuracy_lo": str(ba + diff[0] - 0.05),
             "balanced_accuracy_hi": str(ba + diff[0] + 0.05), "balanced_accuracy_diff": str(diff[0]),
             "balanced_accuracy_diff_lo": str(diff[1]), "balanced_accuracy_diff_hi": str(diff[2]),
             "mcnemar_p": str(p), "mcnemar_p_holm": str(p), "mcnemar_only_this": "3", "mcnemar_only_best": "9",
             "mcnemar_groups": "65", "mcnemar_method": "exact"}
    return [best, other]


def test_a_significant_mcnemar_is_no_significant_difference_where_the_interval_covers_zero():
    """McNemar compares accuracy, the ranking balanced accuracy: a run more accurate than the best,
    whose balanced-accuracy difference interval covered 0, was called "a significant difference"."""
    from osteo.report.verdict import verdict

    (said,) = verdict(_pair(0.334, (-0.014, -0.088, 0.058), (0.217, 0.317), 0.025))
    assert "a significant difference" not in said and "not a clear difference in balanced accuracy" in said
    assert "tiny (b) is the more accurate (0.317 against 0.217)" in said
    (said,) = verdict(_pair(0.6, (-0.2, -0.3, -0.1), (0.6, 0.4), 0.001))  # both say so: significant
    assert "a significant difference." in said and "more accurate" not in said
    (said,) = verdict(_pair(0.6, (-0.02, -0.08, 0.04), (0.6, 0.59), 0.4))
    assert "no significant difference." in said and "folds" not in said


def test_two_cross_validations_on_other_folds_are_said_to_be():
    """Out-of-fold predictions of the same images by a 3-fold and a 2-fold cross-validation: paired,
    as every image was scored by a fold that did not train on it, but the folds trained on other
    numbers of images, which the verdict said nothing of."""
    from osteo.report.verdict import verdict

    best, other = _pair(0.6, (-0.02, -0.08, 0.04), (0.6, 0.59), 0.4)
    best.update(evaluated_on="out-of-fold", folds="3", n_train="90", split_id="s3")
    other.update(evaluated_on="out-of-fold", folds="2", n_train="66", split_id="s2")
    (said,) = verdict([best, other])
    assert ("Its folds are not the best's (2 folds training on 66 images each, against 3 on 90): the two "
            "cross-validations compare training procedures as much as models.") in said
    other.update(folds="3", n_train="90", split_id="s3")  # the same folds: nothing to say
    (said,) = verdict([best, other])
    assert "folds are not" not in said


def test_a_tiny_p_value_keeps_its_digits_and_seeds_of_one_model_their_own_colours(tmp_path):
    from osteo.report.load import load_run
    from osteo.report.plots import run_colours

    write_csv(tmp_path / "p.csv", [{"p": 2.26e-13, "q": 0.123456789, "r": 0.0}], ("p", "q", "r"))
    assert read_csv(tmp_path / "p.csv") == [{"p": "2.26e-13", "q": "0.12345679", "r": "0.0"}]
    runs = [load_run(make_run(tmp_path, f"seed{i}", skilled(TEST, i)), n_boot=0) for i in range(3)]
    assert len(set(run_colours(runs).values())) == 3  # one model, three runs: three colours


def test_the_folds_t_test_is_corrected_for_their_shared_training_images():
    """Nadeau and Bengio: the variance of k folds' differences is (1/k + n_test/n_train) times
    theirs, not 1/k; with 5 folds of 20 images, t is sqrt(0.2 / 0.45) of the plain paired t."""
    from scipy.stats import t as student
    from scipy.stats import ttest_rel

    from osteo.report.tables import corrected_fold_ttest

    a, b = np.array([0.80, 0.78, 0.85, 0.82, 0.79]), np.array([0.74, 0.77, 0.78, 0.75, 0.76])
    plain = ttest_rel(a, b)
    want = 2 * student.sf(abs(plain.statistic) * np.sqrt(0.2 / (0.2 + 20 / 80)), 4)
    assert corrected_fold_ttest(a - b, [20] * 5) == pytest.approx(want)
    assert corrected_fold_ttest(a - b, [20] * 5) > plain.pvalue
    assert corrected_fold_ttest(np.full(5, 0.03), [20] * 5) == 0.0  # every fold says the same: no doubt
    assert corrected_fold_ttest(np.zeros(5), [20] * 5) == 1.0
    # a nested cross-validation trains each fold on 75% of the others' images (60 of 80): a larger correction
    nested = 2 * student.sf(abs(plain.statistic) * np.sqrt(0.2 / (0.2 + 20 / 60)), 4)
    got = corrected_fold_ttest(a - b, [20] * 5, [60] * 5)
    assert got == pytest.approx(nested) and got > want
    assert corrected_fold_ttest(a - b, [20] * 5, [60, None, 60, 60, 60]) == pytest.approx(want)  # a count unknown


def test_a_best_chosen_on_the_compared_images_is_said_to_be(tmp_path):
    """One run without validation predictions: the test images pick the best, and the verdict
    says so instead of "the best on its validation images"."""
    runs = [make_run(tmp_path, "a", skilled(TEST, 0)), make_run(tmp_path, "b", skilled(TEST, 1))]
    rows = read_csv(runs[1] / "predictions.csv")
    write_csv(runs[1] / "predictions.csv", [r for r in rows if r["split"] != "val"], tuple(rows[0]))
    write_report(runs, tmp_path / "rep", n_boot=20)
    got = {r["run_id"]: r for r in read_csv(tmp_path / "rep" / "comparison.csv")}
    assert {r["best_chosen_by"] for r in got.values()} == {"test"} and not got["b"]["val_balanced_accuracy"]
    said = " ".join((tmp_path / "rep" / "verdict.txt").read_text(encoding="utf-8").split())
    assert "chosen on these images (not every run has validation predictions to choose on): an optimistic choice." \
        in said and "the best on its validation images" not in said


def test_a_runs_intervals_draw_its_splits_groups_whole(tmp_path):
    from osteo.report.load import load_run

    run = make_run(tmp_path, "paired", skilled(TEST, 0))
    rows = read_csv(run / "split.csv")
    tests = [r for r in rows if r["split"] == "test"]
    for i, r in enumerate(tests):  # two images a patient (or a duplicate pair)
        r["group"] = f"patient-{i // 2}"
    write_csv(run / "split.csv", rows, tuple(rows[0]))
    loaded = load_run(run, n_boot=50)
    assert loaded.metrics["ci"]["method"].startswith(f"stratified cluster bootstrap over {-(-len(TEST) // 2)} groups")
    assert loaded.groups == [f"patient-{i // 2}" for i in range(len(TEST))]


def test_the_reports_mcnemar_counts_a_group_of_images_once(tmp_path):
    """The report's comparison passes each run's groups (duplicates, a patient's images) to McNemar:
    the same answers, paired 2 by 2 into groups, are tested over the groups, and the row says so."""
    import dataclasses

    from osteo.report.load import load_run
    from osteo.report.tables import comparison_rows

    runs = [load_run(make_run(tmp_path, name, skilled(TEST, i)), n_boot=0) for i, name in enumerate(("a", "b"))]
    pairs = [f"g{i // 2}" for i in range(len(TEST))]
    plain = {r["run_id"]: r for r in comparison_rows(runs, n_boot=0)}
    grouped = {r["run_id"]: r for r in comparison_rows([dataclasses.replace(r, groups=pairs) for r in runs], n_boot=0)}
    other = next(k for k, r in plain.items() if r["mcnemar_vs"] != "(best)")
    assert (plain[other]["mcnemar_method"], plain[other]["mcnemar_groups"]) == ("exact", len(TEST))
    assert grouped[other]["mcnemar_method"] == f"exact, clustered: {len(set(pairs))} groups, each counted once"
    assert grouped[other]["mcnemar_groups"] == len(set(pairs))
    for k in ("mcnemar_only_this", "mcnemar_only_best"):  # the same images counted, tested otherwise
        assert grouped[other][k] == plain[other][k]
    assert grouped[other]["mcnemar_p"] != plain[other]["mcnemar_p"]
    from osteo.report.verdict import verdict

    said = " ".join(" ".join(verdict(list(grouped.values()))).split())
    assert (f"{grouped[other]['mcnemar_only_this']} images only it got right, {grouped[other]['mcnemar_only_best']} "
            f"only the best; clustered: {len(set(pairs))} groups of images, each counted once;") in said, said
