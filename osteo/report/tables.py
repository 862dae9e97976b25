"""The report's CSV files as rows: ``comparison.csv``, ``per_class.csv``, ``folds.csv`` and
``operating_points.csv``, and how their cells are read and shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.calibrate import MEAN_THRESHOLD
from osteo.evaluate import (
    HEADLINE,
    METRICS,
    PER_CLASS_CI,
    Metric,
    holm,
    mcnemar,
    paired_difference,
)
from osteo.report.load import Run


def metric_columns(metric: Metric) -> tuple[str, ...]:
    """A metric's columns: its value, and the bounds of its interval if it has one."""
    name = metric.name
    return (name, f"{name}_lo", f"{name}_hi") if metric.interval else (name,)


COMPARISON_COLUMNS = (
    # evaluated_on: the images every number of the row was measured on; chose: what those images were
    # used to choose (nothing, or the checkpoint, temperature and thresholds: optimistic)
    "model", "run_id", "evaluated_on", "chose", "folds", "weights", "precision", "backend", "engine", "image_size",
    "epochs", "epochs_run",
    "best_epoch", "n_train", "n",
    "n_nonfinite",  # predictions that are NaN or infinite: a diverged model
    *(c for m in METRICS if m.headline for c in metric_columns(m)),
    # cross-validations: mean and standard deviation over the folds (the row's own values are pooled)
    *(f"{k}_{stat}" for k in HEADLINE for stat in ("mean", "sd")),
    *(c for m in METRICS if not m.headline for c in metric_columns(m)),
    # what ROC-AUC, log loss, Brier and ECE were computed from: the model's own probabilities
    # (uncalibrated), or, for a cross-validation's ensemble on another folder, its folds' calibrated ones
    "probabilities", "ece_calibrated", "temperature",
    "majority_class", "majority_accuracy", "majority_balanced_accuracy",
    # against the best run on the same images: its balanced accuracy minus the best's (paired bootstrap
    # interval), McNemar's p (exact on independent images, clustered where they come in groups, on the
    # images only this run and only the best got right) and, between cross-validations of the same
    # folds, a corrected t-test over the folds; each p raw and Holm-adjusted for the comparisons made on
    # those images
    "mcnemar_vs", "balanced_accuracy_diff", "balanced_accuracy_diff_lo", "balanced_accuracy_diff_hi",
    "mcnemar_only_this", "mcnemar_only_best", "mcnemar_groups", "mcnemar_method",
    "mcnemar_p", "mcnemar_p_holm", "fold_ttest_p", "fold_ttest_p_holm",
    "train_seconds", "train_images_per_sec", "params",
    *(f"{m}_{c}" for c in CLASSES for m in PER_CLASS_CI),
    "val_balanced_accuracy", "best_chosen_by", "settings_by_fold", "settings_chosen_by", "split_id", "images_id", "data_dir", "run_dir",
)


def settings_by_fold(recipe: dict) -> str:
    """A cross-validation's settings a study's search chose for each fold on its inner split (else
    those its folds do not share), each with its value per fold: ``train.fine_tune_lr=1.3e-05|0.00035``;
    else ""."""
    differs = recipe.get("searched_by_fold") or recipe.get("differs_by_fold") or {}
    return "; ".join(f"{k}={'|'.join(f'{v:.3g}' if isinstance(v, float) else str(v) for v in values)}"
                     for k, values in differs.items())


def settings_chosen_by(recipe: dict) -> str:
    """What chose the settings of ``settings_by_fold``: "search" where the cross-validation records
    a study's search (cv.json's ``searched``), "recipes" where its folds' recipes differ with no
    search on record (edited by hand, or written by another tool), else ""."""
    return "search" if recipe.get("searched_by_fold") else "recipes" if recipe.get("differs_by_fold") else ""


PER_CLASS_COLUMNS = ("model", "run_id", "evaluated_on", "chose", "class", "metric", "value", "lo", "hi")
# n_train: the images the fold trained on; best_epoch: the checkpoint its inner validation chose
FOLD_COLUMNS = ("model", "run_id", "evaluated_on", "chose", "fold", "n", "n_train", "best_epoch", *HEADLINE)
POINT_COLUMNS = ("model", "run_id", "evaluated_on", "chose", "point", "target", "threshold", "threshold_from",
                 "sensitivity", "sensitivity_lo",
                 "sensitivity_hi", "specificity", "specificity_lo", "specificity_hi", "n")


def comparison_rows(runs: list[Run], oracles: list[Run] = (), n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per run, then one per oracle (the phantom's ceiling: compared with nothing)."""
    paired = {**compare(runs, n_boot, seed), **{o.path: {"vs": ""} for o in oracles}}
    runs = [*runs, *oracles]
    rows = []
    for r in runs:
        m, t = r.metrics, r.recipe.get("train", {})
        row = {
            "model": r.model, "run_id": r.run_id, "weights": r.recipe.get("model", {}).get("weights"),
            "precision": r.env.get("precision"), "backend": r.env.get("backend"),
            "engine": r.recipe.get("model", {}).get("impl"),  # keras.applications layers, or timm's module
            "image_size": r.recipe.get("data", {}).get("image_size"),
            "epochs": int(t.get("epochs", 0)) + int(t.get("fine_tune_epochs", 0)), "best_epoch": m.get("best_epoch"),
            "epochs_run": r.env.get("epochs_run"),  # fewer than epochs where early stopping ended a phase
            "n_train": r.env.get("n_train"), "n": m["n"], "n_nonfinite": m["n_nonfinite"],
            "probabilities": m.get("probabilities", "uncalibrated"), "ece_calibrated": m.get("ece_calibrated"),
            "temperature": r.temperature, "majority_class": r.majority["class"],
            "majority_accuracy": r.majority["accuracy"], "majority_balanced_accuracy": r.majority["balanced_accuracy"],
            "mcnemar_vs": paired[r.path]["vs"], "mcnemar_p": paired[r.path].get("p"),
            **{f"mcnemar_{k}": paired[r.path].get(k) for k in ("only_this", "only_best", "groups", "method")},
            "mcnemar_p_holm": paired[r.path].get("p_holm"), "fold_ttest_p": paired[r.path].get("fold_p"),
            "fold_ttest_p_holm": paired[r.path].get("fold_p_holm"),
            "balanced_accuracy_diff": paired[r.path].get("diff"),
            "balanced_accuracy_diff_lo": (paired[r.path].get("diff_ci") or (None, None))[0],
            "balanced_accuracy_diff_hi": (paired[r.path].get("diff_ci") or (None, None))[1],
            "folds": r.folds or None, "evaluated_on": r.evaluated_on, "chose": r.chose,
            "train_seconds": r.env.get("train_seconds"), "train_images_per_sec": r.env.get("train_images_per_sec"),
            "params": r.env.get("params"), "split_id": r.split_id, "images_id": r.images_id,
            "val_balanced_accuracy": r.val_balanced_accuracy if np.isfinite(r.val_balanced_accuracy) else None,
            "best_chosen_by": paired[r.path].get("chosen_by"),
            "settings_by_fold": settings_by_fold(r.recipe), "settings_chosen_by": settings_chosen_by(r.recipe),
            "data_dir": r.data_dir, "run_dir": str(r.run_dir),
        }
        for metric in METRICS:
            k = metric.name
            row[k] = m.get(k)
            if metric.interval:
                row[f"{k}_lo"], row[f"{k}_hi"] = m.get(f"{k}_ci", (None, None))
            if metric.headline:
                values = [f[k] for f in r.fold_metrics]
                row[f"{k}_mean"] = float(np.mean(values)) if values else None
                row[f"{k}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for c in CLASSES:
            for k in PER_CLASS_CI:
                row[f"{k}_{c}"] = m["per_class"][c][k]
        rows.append(row)
    return rows


def groups(runs: list[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """The runs that compete with each other: those measured on the same images (the same
    files, contents and labels: :func:`osteo.report.load.images_id`), of the same kind (test,
    validation, out-of-fold, one external folder), that chose the same things."""
    out: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        out.setdefault((r.evaluated_on, r.chose, r.images_id), []).append(r)
    return out


def best_of(runs: list[Run]) -> Run:
    """The run with the highest balanced accuracy on its validation images (the first of equals;
    a NaN one never wins): the images it is compared on (test, out-of-fold, a folder) choose
    nothing, not even which run is called best; the highest of several runs' test scores is an
    optimistic one. Where a run has no validation score, the compared images decide
    (:func:`best_chosen_by` says which)."""
    if best_chosen_by(runs) == "validation":
        return max(runs, key=lambda r: r.val_balanced_accuracy)
    return max(runs, key=lambda r: _finite_or(r.metrics["balanced_accuracy"], -1.0))


def best_chosen_by(runs: list[Run]) -> str:
    """What picks the best of ``runs``: ``validation`` (each run's own validation images) where
    every one has a validation score, else the images they are compared on."""
    return "validation" if all(np.isfinite(r.val_balanced_accuracy) for r in runs) else runs[0].evaluated_on


def compare(runs: list[Run], n_boot: int = 1000, seed: int = 0) -> dict[Path, dict]:
    """Each run against the best of its group (:func:`groups`) on the same images: its balanced
    accuracy minus the best's with a paired bootstrap interval, McNemar's test on the
    predictions (pooled out-of-fold ones for cross-validations; clustered where the images come in
    groups, as the interval draws them) and, between two
    cross-validations on the same folds, the corrected resampled t-test on the folds' balanced
    accuracies (:func:`corrected_fold_ttest`);
    the p-values Holm-adjusted for the comparisons made in the group. A run on other images
    is in another group (:func:`groups`), with its own best: never paired with this one."""
    out: dict[Path, dict] = {}
    for group in groups(runs).values():
        best, chosen_by = best_of(group), best_chosen_by(group)
        order = {row["path"]: i for i, row in enumerate(best.rows)}
        for r in group:
            if r is best:
                out[r.path] = {"vs": "(best)", "chosen_by": chosen_by}
            else:  # the same images (one images_id): the best's answers, in r's order
                theirs = best.probs.argmax(1)[[order[row["path"]] for row in r.rows]]
                mine = r.probs.argmax(1)
                diff, diff_ci = paired_difference(r.y, mine, theirs, n_boot=n_boot, seed=seed, groups=r.groups)
                fold_p = None
                if r.folds and r.split_id == best.split_id and r.folds == best.folds:
                    a = [f["balanced_accuracy"] for f in r.fold_metrics]
                    b = [f["balanced_accuracy"] for f in best.fold_metrics]
                    fold_p = corrected_fold_ttest(np.subtract(a, b), [f["n"] for f in r.fold_metrics],
                                                  [f.get("n_train") for f in r.fold_metrics])
                test = mcnemar(mine == r.y, theirs == r.y, groups=r.groups)
                out[r.path] = {"vs": best.label, "p": test["p_value"], "only_this": test["only_a"],
                               "only_best": test["only_b"], "groups": test["groups"], "method": test["method"],
                               "fold_p": fold_p, "diff": diff, "diff_ci": diff_ci, "chosen_by": chosen_by}
        tested = [r for r in group if "p" in out[r.path]]
        for key in ("p", "fold_p"):
            for r, adjusted in zip(tested, holm([out[r.path][key] for r in tested])):
                out[r.path][f"{key}_holm"] = adjusted
    return out


def corrected_fold_ttest(diffs, held_out: list[int], trained: list | None = None) -> float:
    """Two-sided p of the folds' paired differences by Nadeau and Bengio's corrected resampled
    t-test: the folds share most of their training images, so their differences are correlated,
    and the plain paired t-test's variance (1/k) is too small by the ratio of held-out to
    training images (about 1/(k-1) for k folds): it rejects too often. Each fold's training
    images: ``trained`` (a nested cross-validation trains on 75% of the other folds' images, the
    rest validates), or where a count is unknown the others' held-out ones. Differences that do not
    vary: 1.0 where they are all 0, 0.0 where they are all the same other value (every fold says the same)."""
    from scipy.stats import t as student

    d = np.asarray(diffs, dtype=float)
    k, total = len(d), float(sum(held_out))
    if k < 2:
        return 1.0
    if not np.ptp(d) > 0:
        return 1.0 if d[0] == 0 else 0.0
    known = trained is not None and all(isinstance(t, int) and t > 0 for t in trained)
    training = list(trained) if known else [total - n for n in held_out]
    ratio = float(np.mean([n / t for n, t in zip(held_out, training)]))  # held-out / training, per fold
    stat = d.mean() / np.sqrt((1 / k + ratio) * d.var(ddof=1))
    return float(2 * student.sf(abs(stat), k - 1))


def _finite_or(value, default: float) -> float:
    return float(value) if isinstance(value, int | float) and np.isfinite(value) else default


def per_class_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        for c in CLASSES:
            pc = r.metrics["per_class"][c]
            for k in (*PER_CLASS_CI, "roc_auc", "support"):
                lo, hi = pc.get(f"{k}_ci") or (None, None)
                rows.append({"model": r.model, "run_id": r.run_id, "evaluated_on": r.evaluated_on, "chose": r.chose,
                             "class": c, "metric": k, "value": pc[k], "lo": lo, "hi": hi})
    return rows


def fold_rows(runs: list[Run]) -> list[dict]:
    """Long form of the cross-validations' per-fold metrics (empty without one), each on its held-out images."""
    return [{"model": r.model, "run_id": r.run_id, "evaluated_on": f"fold {f['fold']} held out", "chose": r.chose,
             **f} for r in runs for f in r.fold_metrics]


def point_rows(runs: list[Run]) -> list[dict]:
    """Each run's operating points, chosen on its validation split, at work on every data it was
    scored on (validation too, where the thresholds were chosen); a cross-validation's pooled
    over its held-out images, each at its own fold's threshold (threshold blank)."""
    rows = []
    for r in runs:
        for p in r.points:
            lo_s, hi_s = p.get("sensitivity_ci", (None, None))
            lo_p, hi_p = p.get("specificity_ci", (None, None))
            rows.append({"model": r.model, "run_id": r.run_id, "evaluated_on": p["evaluated_on"], "chose": p["chose"],
                         "point": p["name"], "target": p.get("target", ""), "threshold": p["threshold"],
                         "threshold_from": _threshold_from(r, p),
                         "sensitivity": p["sensitivity"],
                         "sensitivity_lo": lo_s, "sensitivity_hi": hi_s, "specificity": p["specificity"],
                         "specificity_lo": lo_p, "specificity_hi": hi_p, "n": p.get("n")})
    return rows


def _threshold_from(r: Run, point: dict) -> str:
    """Where a point's threshold came from: the run's validation split; a cross-validation's pooled
    rows, each fold's own; its ensemble on another folder, the mean of its folds' (records before
    eval wrote it say nothing)."""
    if point.get("threshold_from"):
        return point["threshold_from"]
    if point.get("threshold") in (None, ""):
        return "each fold's validation split, at that fold's threshold"
    if r.metrics.get("probabilities") == "calibrated":
        return MEAN_THRESHOLD
    return "validation"


def cell_text(v) -> str:
    """A cell for people: ``-`` when empty, 3 decimals (3 significant digits below 0.001)."""
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def to_float(v) -> float:
    """A number from a CSV or JSON cell; blank, text, None and +-inf become NaN (a gap in a plot)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return np.nan
    return x if np.isfinite(x) else np.nan
