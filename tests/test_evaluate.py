import numpy as np
import pytest
from sklearn import metrics as skm

from osteo import CLASSES
from osteo.evaluate import (
    _cm_metrics,
    bootstrap,
    brier_score,
    compute_metrics,
    confusion,
    expected_calibration_error,
    majority_baseline,
    mcnemar,
    specificity,
)


def _fixed(n=300, seed=0, skill=1.5):
    """Predictions that are better than chance but far from perfect."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.4, 0.2, 0.4])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += skill
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_metrics_equal_scikit_learn():
    y, p = _fixed()
    pred = p.argmax(1)
    m = compute_metrics(y, p)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["macro_precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["kappa_qw"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-5)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["recall"] == pytest.approx(skm.recall_score(y == i, pred == i))
        assert m["per_class"][c]["precision"] == pytest.approx(skm.precision_score(y == i, pred == i))
        # specificity is the recall of the negatives
        assert m["per_class"][c]["specificity"] == pytest.approx(skm.recall_score(y != i, pred != i))
    # quadratic kappa punishes normal<->osteoporosis more than normal<->osteopenia
    far = compute_metrics(np.array([0, 1, 2, 0]), np.eye(3)[[2, 1, 2, 0]])["kappa_qw"]
    near = compute_metrics(np.array([0, 1, 2, 0]), np.eye(3)[[1, 1, 2, 0]])["kappa_qw"]
    assert near > far


def test_vectorised_confusion_metrics_match_scikit_learn():
    y, p = _fixed(seed=3)
    pred = p.argmax(1)
    v = _cm_metrics(confusion(y, pred)[None])
    assert v["accuracy"][0] == pytest.approx(skm.accuracy_score(y, pred))
    assert v["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert v["macro_f1"][0] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_specificity_on_a_known_matrix():
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # class 0: TN = 16 - 5 - 2 - 1 = 8, FP = 2 -> 0.8; class 2: TN = 11, FP = 1 -> 11/12
    np.testing.assert_allclose(specificity(cm), [0.8, 9 / 10, 11 / 12])


def test_bootstrap_interval_contains_estimate_narrows_and_is_seeded():
    y, p = _fixed(n=90, seed=1)
    pred = p.argmax(1)
    ci = bootstrap(y, pred, n_boot=1000, seed=0)
    acc = skm.accuracy_score(y, pred)
    lo, hi = ci["accuracy"]
    assert lo <= acc <= hi and hi - lo > 0.02
    assert bootstrap(y, pred, n_boot=1000, seed=0)["accuracy"] == ci["accuracy"]
    assert bootstrap(y, pred, n_boot=1000, seed=1)["accuracy"] != ci["accuracy"]
    # ten times the images (same skill): a narrower interval
    big_y, big_p = np.tile(y, 10), np.tile(p, (10, 1))
    blo, bhi = bootstrap(big_y, big_p.argmax(1), n_boot=1000, seed=0)["accuracy"]
    assert (bhi - blo) < 0.6 * (hi - lo)
    for k in ("balanced_accuracy", "macro_f1"):
        m = compute_metrics(y, p, n_boot=500, seed=0)
        assert m[f"{k}_ci"][0] <= m[k] <= m[f"{k}_ci"][1]


def test_expected_calibration_error_on_known_cases():
    y = np.zeros(10, dtype=int)
    sure = np.tile([1.0, 0.0, 0.0], (10, 1))
    assert expected_calibration_error(y, sure) == pytest.approx(0.0)
    overconfident = np.tile([0.9, 0.05, 0.05], (10, 1))  # 90% sure, always right
    assert expected_calibration_error(y, overconfident) == pytest.approx(0.1)
    half = np.tile([0.6, 0.4, 0.0], (10, 1))
    y_half = np.array([0] * 6 + [1] * 4)  # 60% sure, 60% right: calibrated
    assert expected_calibration_error(y_half, half) == pytest.approx(0.0, abs=1e-12)
    assert brier_score(y, sure) == pytest.approx(0.0)
    assert brier_score(y, overconfident) == pytest.approx(0.01 + 2 * 0.0025)


def test_mcnemar_exact_on_a_known_table():
    # 1 image only A gets right, 6 only B: p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8 / 128
    a = np.array([True] * 10 + [True] + [False] * 6)
    b = np.array([True] * 10 + [False] + [True] * 6)
    r = mcnemar(a, b)
    assert (r["only_a"], r["only_b"], r["groups"], r["method"]) == (1, 6, 17, "exact")
    assert r["p_value"] == pytest.approx(0.125)
    assert mcnemar(a, a)["p_value"] == 1.0
    assert mcnemar(a, b, groups=[f"g{i}" for i in range(17)]) == r  # groups of one image: the exact test


def test_mcnemar_counts_a_group_of_images_once():
    """Four copies of each image (one group each) are the evidence of one: the plain test on the
    copies took p from 0.34 to 0.017. With groups, the exact sign-flip test over the groups' d_k
    (only_a - only_b within the group) gives the copies the originals' p, and where every group
    holds one discordant image at most, the binomial test's: one duplicate anywhere in the data
    (it switched to a chi-squared, p 0.070 -> 0.034) changes nothing."""
    import itertools

    from osteo import evaluate

    a = np.array([True] * 20 + [True] * 3 + [False] * 7)  # 3 only A, 7 only B
    b = np.array([True] * 20 + [False] * 3 + [True] * 7)
    copies_a, copies_b, groups = np.repeat(a, 4), np.repeat(b, 4), np.repeat([f"g{i}" for i in range(30)], 4)
    clustered = mcnemar(copies_a, copies_b, groups=groups)
    assert (clustered["only_a"], clustered["only_b"], clustered["groups"]) == (12, 28, 30)
    assert clustered["method"] == "exact, clustered: 30 groups, each counted once"
    assert clustered["p_value"] == pytest.approx(mcnemar(a, b)["p_value"]) == pytest.approx(0.34375)
    assert mcnemar(copies_a, copies_b)["p_value"] < 0.02  # the inflation, without groups
    one_pair = [f"g{i}" for i in range(30)]
    one_pair[0] = one_pair[1]  # two images both models got right, grouped
    assert mcnemar(a, b, groups=one_pair)["p_value"] == pytest.approx(0.34375)
    # groups that disagree within themselves: every sign assignment of the nonzero d_k, counted by hand
    a2 = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1], bool)
    b2 = np.array([0, 0, 1, 0, 1, 0, 0, 0, 1], bool)
    g2 = ["0", "0", "1", "2", "2", "3", "3", "3", "3"]  # d = 2, -1, 0, 3
    nonzero, observed = np.array([2, 1, 3]), abs(2 - 1 + 0 + 3)
    by_hand = np.mean([abs(np.dot(signs, nonzero)) >= observed for signs in itertools.product((-1, 1), repeat=3)])
    assert mcnemar(a2, b2, groups=g2)["p_value"] == pytest.approx(by_hand) == pytest.approx(0.5)
    assert mcnemar(a2, a2, groups=g2)["p_value"] == 1.0
    assert mcnemar(a2, b2, groups=["one"] * 9)["p_value"] == 1.0  # one group shows nothing either way
    # beyond the exact test's budget: Durkalski's chi-squared, close to it
    budget = evaluate.SIGN_FLIP_CELLS
    try:
        evaluate.SIGN_FLIP_CELLS = 0
        large = mcnemar(copies_a, copies_b, groups=groups)
    finally:
        evaluate.SIGN_FLIP_CELLS = budget
    assert large["method"] == "clustered (Durkalski): 30 groups, each counted once"
    from scipy.stats import chi2

    assert large["p_value"] == pytest.approx(chi2.sf((3 - 7) ** 2 / (3 + 7), 1))


def test_majority_baseline_is_the_studys_trap():
    y = np.array([1] * 66 + [0] * 17 + [2] * 17)
    base = majority_baseline(y, "osteopenia")
    assert base["accuracy"] == pytest.approx(0.66)
    assert base["balanced_accuracy"] == pytest.approx(1 / 3)
    # a model that always answers osteopenia gets exactly the baseline
    m = compute_metrics(y, np.tile([0.1, 0.8, 0.1], (100, 1)))
    assert m["accuracy"] == base["accuracy"] and m["balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["per_class"]["normal"]["recall"] == 0.0 and m["mcc"] == 0.0


def test_copies_of_an_image_are_drawn_whole_and_narrow_no_interval():
    """Thirty images, then each four times (a folder of copies, a patient's views): drawn as
    groups, the copies add no information and the intervals are the thirty's; drawn as images,
    they shrank by half."""
    from osteo.evaluate import compute_metrics, paired_difference

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 10)
    probs = rng.dirichlet(np.ones(3), size=30)
    probs[np.arange(30), y] += rng.uniform(0, 1, 30)  # some skill
    probs /= probs.sum(1, keepdims=True)
    other = rng.dirichlet(np.ones(3), size=30)
    y4, p4, o4 = np.repeat(y, 4), np.repeat(probs, 4, axis=0), np.repeat(other, 4, axis=0)
    groups = [f"img{i:02d}" for i in np.repeat(np.arange(30), 4)]
    alone = compute_metrics(y, probs, n_boot=300, seed=1)
    copied = compute_metrics(y4, p4, n_boot=300, seed=1, groups=groups)
    naive = compute_metrics(y4, p4, n_boot=300, seed=1)
    for name in ("balanced_accuracy_ci", "accuracy_ci", "macro_f1_ci"):
        assert copied[name] == pytest.approx(alone[name])
    width = lambda m: m["balanced_accuracy_ci"][1] - m["balanced_accuracy_ci"][0]
    assert width(naive) < 0.7 * width(copied)
    assert copied["ci"]["method"].startswith("stratified cluster bootstrap over 30 groups")
    one = paired_difference(y, probs.argmax(1), other.argmax(1), n_boot=300, seed=1)
    four = paired_difference(y4, p4.argmax(1), o4.argmax(1), n_boot=300, seed=1, groups=groups)
    assert four[0] == pytest.approx(one[0]) and four[1] == pytest.approx(one[1])
    # every group one image: the image bootstrap, draw for draw
    singles = compute_metrics(y, probs, n_boot=300, seed=1, groups=[f"g{i}" for i in range(30)])
    assert singles["balanced_accuracy_ci"] == alone["balanced_accuracy_ci"] and singles["ci"] == alone["ci"]
    # the operating points' sensitivity and specificity likewise
    from osteo.calibrate import decision_metrics

    called = probs[:, 2] > 0.4
    span = lambda m, k: m[f"{k}_ci"][1] - m[f"{k}_ci"][0]
    one = decision_metrics(y, called, [2], n_boot=400, seed=1)
    four = decision_metrics(y4, np.repeat(called, 4), [2], n_boot=400, seed=1, groups=groups)
    naive = decision_metrics(y4, np.repeat(called, 4), [2], n_boot=400, seed=1)
    for k in ("sensitivity", "specificity"):
        assert four[k] == one[k] and span(four, k) == pytest.approx(span(one, k), rel=0.35)
        assert span(naive, k) < 0.7 * span(four, k)


def test_training_eval_and_the_card_draw_one_runs_intervals_alike_whatever_its_training_seed(
        phantom_dir, tmp_path, tiny_recipe):
    """A run trained with seed 3: its intervals are drawn with the bootstrap's own seed, so osteo eval
    with no options writes the numbers training wrote; eval with another --seed rewrites the card
    with its metrics (the card had cited the first intervals beside a metrics.json of others)."""
    import json

    from osteo.cli import main
    from osteo.recipe import BOOTSTRAP_SEED
    from osteo.runs import RunDir
    from osteo.trainer import Trainer

    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path / "runs", epochs=1, bootstrap=20, seed=3)).run())
    trained, card = json.loads(run.metrics_path.read_text()), run.model_card_path.read_text()
    split = trained["headline"]  # the study protocol's validation split: what the card cites
    assert trained[split]["ci"]["seed"] == BOOTSTRAP_SEED and trained[split]["ci"]["resamples"] == 20
    assert main(["eval", str(run.path)]) == 0
    assert json.loads(run.metrics_path.read_text()) == trained and run.model_card_path.read_text() == card
    assert main(["eval", str(run.path), "--seed", "5", "--bootstrap", "30"]) == 0
    again = json.loads(run.metrics_path.read_text())[split]
    assert again["ci"]["seed"] == 5 and again["balanced_accuracy_ci"] != trained[split]["balanced_accuracy_ci"]
    lo, hi = again["balanced_accuracy_ci"]
    assert f"{again['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in run.model_card_path.read_text()


def test_the_printed_table_says_how_its_intervals_were_drawn():
    """eval's intervals default to the run's own train.bootstrap: the table says how many resamples
    (and which method and seed) drew them, and says nothing of intervals where none were drawn."""
    from rich.console import Console

    from osteo.evaluate import majority_baseline, print_metrics

    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 1])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0, 0, 1, 2, 2]]
    for n_boot, said in ((50, "95% CI: stratified bootstrap, percentile, 50 resamples, seed 7"), (0, None)):
        m = {**compute_metrics(y, probs, n_boot=n_boot, seed=7), "majority_baseline": majority_baseline(y, "osteopenia")}
        console = Console(record=True, width=200)
        print_metrics({"val": m}, "val", console)
        text = console.export_text()
        assert (said in text) if said else ("resamples" not in text), text


def test_a_class_never_predicted_has_no_precision_rather_than_zero():
    """0 of 0 is no number: a class the model never called has precision None (no interval), a class
    absent from the images no recall; its F1 stays 0, as macro F1 counts it."""
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probs = np.eye(3)[[0, 0, 0, 0, 2, 2, 0, 0]]  # osteopenia never called
    m = compute_metrics(y, probs, n_boot=50)
    pc = m["per_class"]["osteopenia"]
    assert pc["precision"] is None and pc["precision_ci"] is None
    assert pc["recall"] == 0.0 and pc["f1"] == 0.0 and pc["recall_ci"] is not None
    assert m["per_class"]["normal"]["precision"] == pytest.approx(3 / 6)
    absent = compute_metrics(np.array([0, 0, 2, 2]), np.eye(3)[[0, 2, 2, 2]], n_boot=0)["per_class"]["osteopenia"]
    assert absent["recall"] is None and absent["precision"] is None and absent["specificity"] == 1.0


def test_recomputing_without_intervals_keeps_no_interval_beside_a_point_now_undefined():
    """osteo eval --bootstrap 0 takes back the intervals of the same predictions; not an older file's
    precision interval [0, 0] beside a precision that is now None (a class never called)."""
    from osteo.evaluate import _keep_intervals

    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 0, 0, 2, 2]]
    before = compute_metrics(y, probs, n_boot=50)
    before["per_class"]["osteopenia"].update(precision=0.0, precision_ci=[0.0, 0.0])  # as written before today
    before["ci"]["scored"] = "same"
    now = compute_metrics(y, probs, n_boot=0)
    _keep_intervals(now, before, "same")
    osteopenia = now["per_class"]["osteopenia"]
    assert osteopenia["precision"] is None and osteopenia.get("precision_ci") is None
    assert osteopenia["recall_ci"] == before["per_class"]["osteopenia"]["recall_ci"]  # the others taken back
