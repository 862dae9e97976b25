"""Predictions -> metrics, with intervals and the majority baseline: ``osteo eval RUN_DIR``.

``predictions.csv`` (columns ``path, label, pred, p_normal, p_osteopenia, p_osteoporosis,
split``; :class:`osteo.runs.RunDir` reads and writes it). :func:`compute_metrics` turns one
split of it into the numbers of ``metrics.json``, each split with what it chose
(:data:`CHOSE`: validation chose the checkpoint, temperature and thresholds; test nothing)
and ``headline`` naming the split a run's numbers are reported on; scikit-learn computes every metric it
has, and this module adds what it lacks: specificity, expected calibration error, the
stratified bootstrap, and McNemar's test (exact, or clustered where images come in groups). :data:`METRICS` is how they are shown.

The three classes are ordered (normal < osteopenia < osteoporosis), so Cohen's
kappa uses quadratic weights: calling osteoporosis "normal" costs more than calling
it "osteopenia".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.recipe import BOOTSTRAP_SEED

K = len(CLASSES)


@dataclass(frozen=True)
class Metric:
    """One number of a split's metrics, as everything that shows metrics shows it."""

    name: str  # its key in metrics.json and its column in comparison.csv
    label: str  # for people
    interval: bool = False  # a 95% bootstrap interval, <name>_ci: a function of the confusion matrix
    headline: bool = False  # in every summary too (CLI tables, bars, folds), beside the majority baseline
    higher_is_better: bool = True
    # a function of the probabilities themselves, not only of their argmax: it depends on whether they
    # are the model's own or calibrated (compute_metrics' ``probabilities`` says which, and tables show it)
    of_probabilities: bool = False


# The one list of metrics: osteo eval, the run summary, the report, the model card and MLflow
# read it. A new metric is a row here and its value in compute_metrics (in _cm_metrics too,
# with an interval).
METRICS = (
    Metric("accuracy", "accuracy", interval=True, headline=True),
    Metric("balanced_accuracy", "balanced accuracy", interval=True, headline=True),
    Metric("macro_f1", "macro F1", interval=True, headline=True),
    Metric("roc_auc", "ROC-AUC (macro, OvR)", of_probabilities=True),
    Metric("kappa_qw", "kappa (quadratic)"),
    Metric("mcc", "MCC"),
    Metric("log_loss", "log loss", higher_is_better=False, of_probabilities=True),
    Metric("brier", "Brier", higher_is_better=False, of_probabilities=True),
    Metric("ece", "ECE", higher_is_better=False, of_probabilities=True),
)
HEADLINE = tuple(m.name for m in METRICS if m.headline)

# Where a number was measured, and what that split chose: the Trainer keeps the checkpoint that
# scored best on validation (train.monitor) and osteo.calibrate fits the temperature and the
# operating points' thresholds there too; a test split and another folder (osteo eval --data)
# chose nothing. A number measured on the split that chose is optimistic.
SPLIT_NAMES = {"val": "validation", "test": "test", "external": "external"}
CHOSE = {"val": "checkpoint, temperature, thresholds", "test": "nothing", "external": "nothing"}


def external_label(name: str, record: dict) -> str:
    """What an external validation (``osteo eval RUN --data FOLDER``'s folder ``name``, its
    metrics.json ``record``) is called beside the run's splits: ``external: FOLDER``, and where
    its probabilities were averaged over augmented views, which its run's temperature and
    thresholds were not fitted on, ``(test-time augmentation)``."""
    return f"external: {name}" + (" (test-time augmentation)" if record.get("tta") else "")


def rescore_command(run_path, external, record: dict) -> str:
    """The command that scores an external validation (folder ``external``, its metrics.json
    ``record``) again as it was scored: the same data folder, test-time augmentation or not, and
    into the same folder."""
    import shlex

    tta = ["--tta"] if record.get("tta") else []
    return shlex.join(["osteo", "eval", str(run_path), "--data", str(record.get("data_dir") or "FOLDER"), *tta,
                       "--out", str(external)])


def headline_split(splits) -> str:
    """The split a run's numbers are reported on: its test split, which chose nothing, where it has one."""
    return "test" if "test" in splits else "val"


def provenance(where: str, chose: str) -> str:
    """``where`` and what it chose: 'test, which chose nothing'."""
    return f"{where}, {which_chose(chose)}"


def which_chose(chose: str) -> str:
    """'which chose nothing', or 'which chose the checkpoint, temperature and thresholds: optimistic'."""
    return "which chose nothing" if chose == "nothing" else f"which chose the {listed(chose.split(', '))}: optimistic"


def listed(words: list[str]) -> str:
    """``a, b and c``."""
    return " and ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)
PER_CLASS_CI = ("precision", "recall", "specificity", "f1")  # each class's metrics with intervals


def chosen_points(calibration: dict) -> list[dict]:
    """The operating points of a run's ``calibration.json`` that have a threshold (not those
    its validation could not choose one for: one class only)."""
    return [p for p in calibration.get("operating_points", []) if "threshold" in p]


def external_points(record: dict, calibration: dict) -> tuple[list[dict], list[dict]]:
    """An external folder's operating points (``osteo eval RUN --data FOLDER``'s metrics.json),
    split into those measured at the run's calibration now (the same temperature, a point of
    that name at the same threshold) and those measured at one it replaced."""
    then = (record.get("calibrated") or {}).get("temperature")
    now = {p.get("name"): p.get("threshold") for p in chosen_points(calibration)}
    fresh, stale = [], []
    for point in record.get("operating_points", []):
        same = (then == calibration.get("temperature") and point.get("name") in now
                and now[point["name"]] == point.get("threshold"))
        (fresh if same else stale).append(point)
    return fresh, stale


# --------------------------------------------------------------------------- what sklearn lacks


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(y_true) * K + np.asarray(y_pred), minlength=K * K).reshape(K, K)


def specificity(cm: np.ndarray) -> np.ndarray:
    """Per class: true negatives / all negatives (one-vs-rest)."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return np.divide(tn, tn + fp, out=np.zeros_like(tn), where=(tn + fp) > 0)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| x share."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    if len(y_true) == 0:
        return float("nan")
    conf, acc, count = reliability_curve(y_true, probs, bins).T
    return float(np.sum(count / len(y_true) * np.abs(acc - conf)))


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, bins: int = 10):
    """(mean confidence, accuracy, count) per non-empty equal-width bin of top-class confidence."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = [(conf[idx == b].mean(), correct[idx == b].mean(), int((idx == b).sum())) for b in range(bins) if (idx == b).any()]
    return np.array(out).reshape(-1, 3)


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot label."""
    onehot = np.eye(K)[np.asarray(y_true)]
    return float(np.mean(np.sum((np.asarray(probs) - onehot) ** 2, axis=1)))


def _cm_metrics(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised confusion-matrix metrics over a stack of matrices (B, K, K)."""
    cms = cms.astype(float)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    support = cms.sum(axis=2)
    predicted = cms.sum(axis=1)
    n = cms.sum(axis=(1, 2))
    div = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)
    precision = div(tp, predicted)
    recall = div(tp, support)
    f1 = div(2 * precision * recall, precision + recall)
    tn = n[:, None] - support - predicted + tp
    spec = div(tn, n[:, None] - support)
    present = support > 0  # sklearn's balanced accuracy averages over the classes present
    return {
        "accuracy": div(tp.sum(axis=1), n),
        "balanced_accuracy": div((recall * present).sum(axis=1), present.sum(axis=1).astype(float)),
        "macro_f1": f1.mean(axis=1),
        "precision": precision, "recall": recall, "specificity": spec, "f1": f1,
    }


def bootstrap(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, groups: Sequence | None = None) -> dict:
    """Stratified bootstrap percentile intervals of the confusion-matrix metrics.

    Each resample draws, within every true class, as many images as it has, with
    replacement: class supports stay fixed, as they are in the validation split.
    With ``groups`` (each image's group: its duplicates, its patient, as the split keeps them
    together), whole groups are drawn instead, within the class most of their images have: a
    patient's five images, or four copies of one, are one draw, not five independent ones
    (:func:`clusters`). Returns {metric: (lo, hi)} and {metric: (lo array, hi array)} per class.
    """
    y_true = np.asarray(y_true)
    return _intervals(y_true, y_pred, clusters(y_true, groups), n_boot, seed, level)


def _intervals(y_true: np.ndarray, y_pred: np.ndarray, units, n_boot: int, seed: int, level: float) -> dict:
    """:func:`bootstrap`'s intervals, over images or the :func:`clusters` ``units``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0 or n_boot <= 0:
        return {}
    values = _cm_metrics(_resampled(y_true, y_pred, units, n_boot, seed))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name, v in values.items():
        lo, hi = np.percentile(v, q, axis=0)
        out[name] = (lo, hi)
    return out


def clusters(y_true: np.ndarray, groups: Sequence | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(each image's cluster, each cluster's class: the one most of its images have) for a
    bootstrap over ``groups``; None where every group is one image (then images are drawn, and
    the resamples are the image bootstrap's, draw for draw)."""
    if groups is None:
        return None
    keys, unit = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    if len(keys) == len(y_true):
        return None
    counts = np.zeros((len(keys), K), dtype=np.int64)
    np.add.at(counts, (unit, np.asarray(y_true, dtype=int)), 1)
    return unit, counts.argmax(axis=1)


def _resampled(y_true: np.ndarray, y_pred: np.ndarray, units, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K, K) confusion matrices of stratified resamples: of images (``units`` None) or
    of whole clusters (:func:`clusters`), drawn within their class."""
    if units is None:
        return _resampled_confusions(y_true, y_pred, _stratified_draws(y_true, n_boot, seed))
    unit, strata = units
    per_unit = np.zeros((len(strata), K * K), dtype=np.int64)
    np.add.at(per_unit, (unit, np.asarray(y_true, dtype=int) * K + np.asarray(y_pred, dtype=int)), 1)
    return (cluster_times(strata, n_boot, seed) @ per_unit).reshape(n_boot, K, K)


def cluster_times(strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, clusters): how often each resample draws each cluster, as many draws within
    each stratum as it has clusters."""
    draws = _stratified_draws(strata, n_boot, seed)
    offsets = np.arange(n_boot)[:, None] * len(strata)
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * len(strata)).reshape(n_boot, len(strata))


def _stratified_draws(y_true: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) image indices: within every true class, as many draws as it has images."""
    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, len(y_true)), dtype=np.int64)
    col = 0
    for c in range(K):
        members = np.flatnonzero(y_true == c)
        if len(members):
            idx[:, col : col + len(members)] = members[rng.integers(0, len(members), (n_boot, len(members)))]
            col += len(members)
    return idx


def _resampled_confusions(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
    codes = y_true[idx] * K + y_pred[idx]
    offsets = np.arange(len(idx))[:, None] * K * K
    return np.bincount((codes + offsets).ravel(), minlength=len(idx) * K * K).reshape(len(idx), K, K)


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, metric: str = "balanced_accuracy",
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                      groups: Sequence | None = None) -> tuple[float, list[float] | None]:
    """``metric`` of predictions A minus that of B on the same images, with a paired stratified
    bootstrap interval (each resample scores both on the same draws, of whole ``groups`` where
    given: :func:`bootstrap`); None without resamples."""
    y_true, pred_a, pred_b = (np.asarray(v, dtype=int) for v in (y_true, pred_a, pred_b))
    diff = float(_cm_metrics(confusion(y_true, pred_a)[None])[metric][0]
                 - _cm_metrics(confusion(y_true, pred_b)[None])[metric][0])
    if not len(y_true) or n_boot <= 0:
        return diff, None
    units = clusters(y_true, groups)  # the same seed: both scored on the same draws
    draws = (_cm_metrics(_resampled(y_true, pred_a, units, n_boot, seed))[metric]
             - _cm_metrics(_resampled(y_true, pred_b, units, n_boot, seed))[metric])
    lo, hi = np.percentile(draws, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return diff, _contain(lo, hi, diff)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, groups: Sequence | None = None) -> dict:
    """McNemar's exact test on paired correctness: ``only_a`` images only A got right, ``only_b`` only B.

    On independent images (``groups`` None, or every group one image) a binomial test of ``only_a``
    out of ``only_a + only_b``. Images in groups (copies, a patient's images) are not independent,
    and counting each one makes the same evidence look stronger: four copies of every image take p
    from 0.34 to 0.017. There a group counts once: with d_k = only_a - only_b within group k, the
    exact sign-flip test of sum d_k (under no difference each group's d_k is as likely -d_k), whose
    p is the binomial test's where every |d_k| <= 1 and, for many groups, what Durkalski et al.'s
    (2003) clustered chi-squared approximates.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if groups is None:
        index, n_groups = np.arange(len(a)), len(a)
    else:
        keys, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        n_groups = len(keys)
    out = {"only_a": only_a, "only_b": only_b, "groups": n_groups}
    if n_groups == len(a):
        n = only_a + only_b
        p = 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)
        return {**out, "p_value": min(1.0, p), "method": "exact"}
    d = (np.bincount(index, weights=(a & ~b).astype(float), minlength=n_groups)
         - np.bincount(index, weights=(~a & b).astype(float), minlength=n_groups)).astype(int)
    if np.count_nonzero(d) * (2 * np.abs(d).sum() + 1) <= SIGN_FLIP_CELLS:
        return {**out, "p_value": sign_flip_p(d), "method": f"exact, clustered: {n_groups} groups, each counted once"}
    # very many groups: the large-sample form, Durkalski et al.'s statistic
    from scipy.stats import chi2

    p = float(chi2.sf(float(np.sum(d)) ** 2 / float(np.sum(d ** 2)), 1))
    return {**out, "p_value": min(1.0, p), "method": f"clustered (Durkalski): {n_groups} groups, each counted once"}


# the exact sign-flip test's work (discordant groups x possible sums): 5e7 is about a second; beyond,
# there are thousands of discordant groups, where the chi-squared approximation is close
SIGN_FLIP_CELLS = 50_000_000


def sign_flip_p(d: np.ndarray) -> float:
    """Two-sided p of the sum of integer differences ``d`` under random signs: P(|S| >= |sum d|),
    S = sum of +-|d_k|, each sign 1/2, exactly (the distribution of S built one term at a time)."""
    d = np.asarray(d, dtype=int)
    observed = abs(int(np.sum(d)))
    d = np.abs(d[d != 0])
    top = int(np.sum(d))
    if observed == 0:
        return 1.0
    dist = np.zeros(2 * top + 1)  # P(S = s) at index s + top
    dist[top] = 1.0
    for step in d:
        dist = 0.5 * (np.roll(dist, step) + np.roll(dist, -step))  # no wrap: |S| never exceeds top
    s = np.arange(-top, top + 1)
    return float(min(1.0, dist[np.abs(s) >= observed].sum()))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, not counted).

    With m tests sorted ascending, the i-th smallest (from 1) becomes
    min(1, max over j <= i of (m - j + 1) p_(j)): the family-wise error stays at the level
    asked, for any dependence between the tests.
    """
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    out: list[float | None] = [None] * len(p_values)
    m, running = len(tested), 0.0
    for rank, (p, i) in enumerate(sorted(tested)):
        running = max(running, min(1.0, (m - rank) * float(p)))
        out[i] = running
    return out


# --------------------------------------------------------------------------- metrics


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 0, seed: int = BOOTSTRAP_SEED,
                    groups: Sequence | None = None, probabilities: str = "uncalibrated") -> dict:
    """Every metric of one set of predictions (scikit-learn where it has them); intervals by
    a stratified bootstrap over ``groups`` where given (:func:`bootstrap`). ``probabilities``
    says what ``probs`` are, recorded with them: ``uncalibrated`` (the model's own, before the
    run's temperature, as predictions.csv keeps them) or ``calibrated`` (a cross-validation's
    ensemble averages its folds' calibrated ones); the metrics of the probabilities themselves
    (:attr:`Metric.of_probabilities`) depend on it, the others not.

    A row with a non-finite probability (a diverged model) keeps its argmax as the
    prediction, as ``predictions.csv`` records it, and is counted in ``n_nonfinite``;
    the metrics of the probabilities themselves (ROC-AUC, log loss, Brier, ECE) are
    then None rather than an error or a number from part of the split.
    """
    from sklearn import metrics as skm

    if n_boot < 0:
        raise OsteoError(f"the number of bootstrap resamples must be 0 or more, got {n_boot}; e.g. --bootstrap 1000")
    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    labels = list(range(K))
    y_pred = probs.argmax(axis=1)
    n_nonfinite = int((~np.isfinite(probs).all(axis=1)).sum())
    prec, rec, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    spec = specificity(cm)
    # AUC needs both positives and negatives, and scikit-learn refuses NaN scores
    present = [c for c in labels if (y_true == c).any() and (y_true != c).any()] if not n_nonfinite else []
    auc_per_class = {}
    for c in labels:
        auc_per_class[c] = float(skm.roc_auc_score(y_true == c, probs[:, c])) if c in present else None
    aucs = [v for v in auc_per_class.values() if v is not None]
    clipped = np.clip(probs, 1e-7, 1)
    clipped /= clipped.sum(axis=1, keepdims=True)
    avg = lambda name, average: float(getattr(skm, f"{name}_score")(y_true, y_pred, average=average, labels=labels, zero_division=0))
    m = {
        "n": len(y_true),
        "n_nonfinite": n_nonfinite,
        "probabilities": probabilities,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_precision": avg("precision", "macro"),
        "macro_recall": avg("recall", "macro"),
        "macro_f1": avg("f1", "macro"),
        "weighted_precision": avg("precision", "weighted"),
        "weighted_recall": avg("recall", "weighted"),
        "weighted_f1": avg("f1", "weighted"),
        "roc_auc": float(np.mean(aucs)) if len(aucs) == K else None,
        "kappa_qw": _nan_to_none(skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "log_loss": None if n_nonfinite else float(skm.log_loss(y_true, clipped, labels=labels)),
        "brier": None if n_nonfinite else brier_score(y_true, probs),
        "ece": None if n_nonfinite else expected_calibration_error(y_true, probs),
        # a class never predicted has no precision (0 of 0), one absent no recall, one of every image
        # no specificity: None (shown "-"), not 0 [0, 0]; F1 stays 0 there, as macro F1 counts it
        "per_class": {
            c: {"precision": _defined(prec[i], cm[:, i].sum()), "recall": _defined(rec[i], support[i]),
                "specificity": _defined(spec[i], len(y_true) - support[i]),
                "f1": float(f1[i]), "support": int(support[i]), "roc_auc": auc_per_class[i]}
            for i, c in enumerate(CLASSES)
        },
        "confusion_matrix": cm.tolist(),
    }
    if n_boot:
        units = clusters(y_true, groups)
        ci = _intervals(y_true, y_pred, units, n_boot, seed, 0.95)
        method = ("stratified bootstrap, percentile" if units is None else
                  f"stratified cluster bootstrap over {len(units[1])} groups (duplicates, patients), percentile")
        m["ci"] = {"method": method, "level": 0.95, "resamples": n_boot, "seed": seed}
        for name in (metric.name for metric in METRICS if metric.interval):
            m[f"{name}_ci"] = _contain(ci[name][0], ci[name][1], m[name])
        for i, c in enumerate(CLASSES):
            for name in PER_CLASS_CI:
                point = m["per_class"][c][name]
                m["per_class"][c][f"{name}_ci"] = None if point is None else _contain(ci[name][0][i], ci[name][1][i],
                                                                                      point)
    return m


def _defined(value: float, of: int) -> float | None:
    """``value``, a share of ``of`` images; None where there were none (0 of 0 is no number)."""
    return float(value) if of > 0 else None


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's, without its warnings for classes missing from ``y_true``: a split of one
    class is said where it is shown (the report's failures, ``osteo eval --data``)."""
    import warnings

    from sklearn import metrics as skm

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def _contain(lo: float, hi: float, value: float) -> list[float]:
    """[lo, hi] widened to hold ``value``.

    A model that predicts one class has the same confusion matrix in every resample,
    so its interval collapses to a point, and the bootstrap's sums (in another order
    than scikit-learn's) can put that point a rounding error beside the estimate.
    """
    lo, hi, value = float(lo), float(hi), float(value)
    if not np.isfinite(value):
        return [lo, hi]
    return [min(lo, value), max(hi, value)]


def _nan_to_none(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def majority_baseline(y_true: np.ndarray, majority: str) -> dict:
    """Accuracy and balanced accuracy of always answering the training majority class."""
    from sklearn import metrics as skm

    y_pred = np.full_like(np.asarray(y_true), CLASSES.index(majority))
    return {
        "class": majority,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred) if len(y_true) else 0.0,
    }


# --------------------------------------------------------------------------- runs


def training_majority(run) -> str:
    """The run's most common training label (the majority-class baseline answers it)."""
    from osteo.data.split import majority_label
    from osteo.runs import RunDir

    return majority_label(r["label"] for r in RunDir(run).read_split() if r["split"] == "train")


# what metrics.json keeps about the checkpoint when it is recomputed by `osteo eval`
CHECKPOINT_KEYS = ("model", "best_epoch", "monitor", "best_value", "best_value_measured")


def external_groups(folder, rows: list[dict]) -> list[str] | None:
    """Each scored image's group in an external folder, from its audit's manifest (None without
    one): :func:`folder_groups`."""
    from osteo.files import read_csv

    if not folder.manifest_path.exists():
        return None
    return folder_groups(read_csv(folder.manifest_path, "run osteo eval again"), [r["path"] for r in rows])


def folder_groups(manifest: list[dict], paths: Sequence[str]) -> list[str]:
    """The group of each of ``paths`` in a folder whose audit's manifest rows are ``manifest``:
    its duplicates and its DICOM patient, as a split of that folder would keep them."""
    from osteo.data.split import assign_groups

    groups = assign_groups([m for m in manifest if m["status"] == "ok"])
    return [groups.get(p, p) for p in paths]


def evaluate_run(run_dir: str | os.PathLike, splits: Sequence[str] | None = None, n_boot: int = 1000,
                 seed: int = 0, checkpoint: dict | None = None) -> dict:
    """Compute a run's ``metrics.json`` from its ``predictions.csv``, write it once, return it.

    ``checkpoint`` (model, best epoch, monitor, best value) comes from the Trainer at the
    end of training; ``osteo eval`` keeps the one already in ``metrics.json``.
    """
    from osteo.runs import RunDir

    run = RunDir(run_dir).check(need=(RunDir.PREDICTIONS,))
    before = run.read_metrics()
    if checkpoint is None:
        checkpoint = {k: v for k, v in before.items() if k in CHECKPOINT_KEYS}
    majority = training_majority(run)
    metrics = {**checkpoint, "majority_class": majority}
    _, _, rows = run.read_predictions()
    available = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    # a split not asked for keeps its numbers: osteo eval --split val leaves the headline test split's
    metrics.update({s: before[s] for s in available if s in before and splits and s not in splits})
    for name in splits or available:
        if name not in available:
            raise OsteoError(f"{run.path} has no {name} predictions; choose one of: {', '.join(available) or 'none'}")
        y, p, scored = run.read_predictions(name)
        groups = run.image_groups(scored)
        metrics[name] = compute_metrics(y, p, n_boot=n_boot, seed=seed, groups=groups)
        _keep_intervals(metrics[name], before.get(name), scored_id(y, p, groups))
        metrics[name]["majority_baseline"] = majority_baseline(y, majority)
        metrics[name].update(evaluated_on=SPLIT_NAMES[name], chose=CHOSE[name])
    metrics["headline"] = headline_split(available)
    run.write_metrics(metrics)
    return metrics


def scored_id(y: np.ndarray, probs: np.ndarray, groups: Sequence[str] | None) -> str:
    """A short hash of what a split's intervals were drawn from: labels, probabilities, groups."""
    import hashlib

    sha = hashlib.sha256(np.asarray(y, np.int64).tobytes())
    sha.update(np.asarray(probs, np.float64).tobytes())
    sha.update("\n".join(groups or ()).encode("utf-8", "surrogateescape"))
    return sha.hexdigest()[:16]


def _keep_intervals(metrics: dict, before: dict | None, scored: str) -> None:
    """Mark ``metrics``' intervals with what they were drawn from (``ci.scored``); without
    intervals (``--bootstrap 0``), take back those ``before`` drew from the same predictions,
    so that recomputing the point estimates loses nothing already written."""
    if "ci" in metrics:
        metrics["ci"]["scored"] = scored
        return
    if not before or (before.get("ci") or {}).get("scored") != scored:
        return
    metrics.update({k: v for k, v in before.items() if k == "ci" or k.endswith("_ci")})
    for c, row in metrics.get("per_class", {}).items():  # not beside a point now undefined (0 of 0: no number)
        row.update({k: v for k, v in before.get("per_class", {}).get(c, {}).items()
                    if k.endswith("_ci") and (v is None or row.get(k[: -len("_ci")]) is not None)})


def print_metrics(metrics: dict, split: str, console, title: str = "") -> None:
    """A rich table of one split's metrics, the majority baseline beside them."""
    from rich.table import Table

    m = metrics[split]
    base = m["majority_baseline"]
    where = provenance(SPLIT_NAMES.get(split, split), m.get("chose", CHOSE.get(split, "nothing")))
    table = Table(title=title or f"{metrics.get('model', '')} on {where} (n={m['n']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column(f"majority ({base['class']})", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for metric in METRICS:
        ci = m.get(f"{metric.name}_ci")
        label = f"{metric.label} ({m['probabilities']})" if metric.of_probabilities and m.get("probabilities") else \
            metric.label
        table.add_row(label, fmt(m.get(metric.name)), f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                      fmt(base.get(metric.name)) if metric.headline else "")
    for c in CLASSES:
        pc = m["per_class"][c]
        table.add_row(f"{c}: precision / recall / specificity / F1",
                      " / ".join(fmt(pc[k]) for k in ("precision", "recall", "specificity", "f1")),
                      f"n={pc['support']}", "")
    if m.get("ci"):  # how the intervals were drawn: eval's default is the run's own train.bootstrap
        ci = m["ci"]
        table.caption = f"95% CI: {ci['method']}, {ci['resamples']:,} resamples, seed {ci['seed']}"
    console.print(table)
    if m.get("n_nonfinite"):
        left_out = [metric.label for metric in METRICS if m.get(metric.name) is None]
        console.print(f"[red]{m['n_nonfinite']} of {m['n']} {split} predictions are not finite (NaN or infinite): "
                      f"the model diverged; left out: {', '.join(left_out)}[/red]")
