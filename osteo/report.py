"""The comparison report: ``osteo report [RUNS ...] [--out DIR] [--all]`` (``make report``).

Writes to ``DIR`` (default ``reports/``):

- ``comparison.csv``: one row per run, headline metrics with 95% bootstrap
  intervals, the majority-class baseline, speed, size, and McNemar's exact test
  against the best run (by balanced accuracy) on the same validation images;
- ``per_class.csv``: long form (model, run_id, class, metric, value, lo, hi);
- ``plots/*.png``: training curves, confusion matrices, ROC curves, reliability
  diagrams, sample predictions, and a bar chart of the headline metrics;
- ``index.html``: one self-contained page (images embedded, no network) with all of
  it, the data audit, and each run's recipe and environment. Every file name and
  label on the page is HTML-escaped.

Metrics are recomputed from each run's ``predictions.csv``, so the report never
trusts a stale ``metrics.json``. Runs made on different splits are reported, but
not paired.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.calibrate import apply_temperature
from osteo.data.split import majority_label
from osteo.errors import OsteoError
from osteo.evaluate import (
    compute_metrics,
    expected_calibration_error,
    majority_baseline,
    mcnemar_exact,
    reliability_curve,
)
from osteo.files import atomic_path, sweep_temporaries, write_csv, write_text
from osteo.runs import CvDir, RunDir, list_cvs, list_runs

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")
STAGE_PREFIX = ".report-"  # the staging folder inside --out while a report is written
COMPARISON_COLUMNS = (
    "model", "run_id", "evaluated_on", "folds", "weights", "precision", "backend", "image_size", "epochs",
    "best_epoch", "n_train", "n_val",
    "n_nonfinite",  # validation predictions that are NaN or infinite: a diverged model
    "accuracy", "accuracy_lo", "accuracy_hi", "balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi",
    "macro_f1", "macro_f1_lo", "macro_f1_hi",
    # cross-validations: mean and standard deviation over the folds (the row's own values are pooled)
    "accuracy_mean", "accuracy_sd", "balanced_accuracy_mean", "balanced_accuracy_sd", "macro_f1_mean", "macro_f1_sd",
    "roc_auc", "kappa_qw", "mcc", "log_loss", "brier", "ece", "ece_calibrated", "temperature",
    "majority_class", "majority_accuracy", "majority_balanced_accuracy", "mcnemar_vs", "mcnemar_p", "fold_ttest_p",
    "train_seconds", "train_images_per_sec", "params",
    *(f"{m}_{c}" for c in CLASSES for m in ("precision", "recall", "specificity", "f1")),
    "split_id", "run_dir",
)
PER_CLASS_COLUMNS = ("model", "run_id", "class", "metric", "value", "lo", "hi")
FOLD_COLUMNS = ("model", "run_id", "fold", "n", *HEADLINE)
POINT_COLUMNS = ("model", "run_id", "evaluated_on", "point", "threshold", "sensitivity", "sensitivity_lo",
                 "sensitivity_hi", "specificity", "specificity_lo", "specificity_hi", "n")


@dataclass
class Run:
    path: Path
    recipe: dict
    env: dict
    metrics: dict  # recomputed: one split's metrics with intervals
    history: list[dict]
    y: np.ndarray
    probs: np.ndarray
    rows: list[dict]
    majority: dict
    split_id: str
    audit: dict = field(default_factory=dict)
    evaluated_on: str = "validation"  # or "out-of-fold" (a cross-validation, pooled)
    fold_metrics: list[dict] = field(default_factory=list)  # a cross-validation's, one per fold
    calibrated: np.ndarray | None = None  # the probabilities after the run's temperature scaling
    temperature: float | None = None

    @property
    def model(self) -> str:
        return self.recipe.get("model", {}).get("backbone") or self.path.parent.name

    @property
    def run_id(self) -> str:
        # an external validation lives in RUN/eval/<folder>/: its row is the run's
        return self.path.parent.parent.name if self.evaluated_on.startswith("external") else self.path.name

    @property
    def folds(self) -> int:
        return len(self.fold_metrics)

    @property
    def label(self) -> str:
        where = f", {self.evaluated_on}" if self.evaluated_on.startswith("external") else ""
        return f"{self.model} ({'cv ' if self.folds else ''}{self.run_id}{where})"


def collect_runs(specs: list[str] | None = None, runs_dir: str | os.PathLike = "runs",
                 all_runs: bool = False, warn: Callable[[str], None] | None = None) -> list[RunDir | CvDir]:
    """The runs to report: those given, else the latest finished run and cross-validation of
    each model (or all of them).

    Unfinished runs under ``runs_dir`` are left out with one ``warn`` line naming them.
    """
    if specs:
        return [CvDir(s) if CvDir(s).is_cv() else RunDir(s).check(need=RunDir.FINISHED) for s in specs]
    cvs = list_cvs(runs_dir, finished=True)
    if not all_runs:
        cvs = list({c.model: c for c in cvs}.values())  # oldest first: the last of each model wins
    runs = list_runs(runs_dir, finished=True)
    unfinished = [r for r in list_runs(runs_dir) if not r.is_finished()]
    if unfinished and warn:
        names = ", ".join(str(r) for r in unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
        warn(f"left out {len(unfinished)} unfinished run(s) (no {RunDir.PREDICTIONS} or {RunDir.METRICS}): "
             f"{names}; finish one with: osteo train --resume RUN_DIR")
    if not runs and not cvs:
        raise OsteoError(f"no finished runs under {runs_dir}; train one first (make train MODEL=...)")
    if all_runs:
        return [*runs, *cvs]
    latest: dict[str, RunDir] = {}
    for r in runs:  # oldest first, so the last one of each model wins
        latest[r.model] = r
    return [latest[m] for m in sorted(latest)] + sorted(cvs, key=lambda c: c.model)


def load_cv(cv: CvDir, n_boot: int = 1000, seed: int = 0) -> Run:
    """A cross-validation as one row: its pooled out-of-fold predictions (each image scored
    once, by the fold that held it out), with the per-fold metrics beside them."""
    folds = [load_run(f, "val", 0, seed) for f in cv.folds()]
    first = folds[0]
    y = np.concatenate([f.y for f in folds])
    probs = np.concatenate([f.probs for f in folds])
    rows = [row for f in folds for row in f.rows]
    if len({row["path"] for row in rows}) != len(rows):
        raise OsteoError(f"the folds of {cv} share validation images; it is not a cross-validation of one split")
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed)
    metrics["best_epoch"] = None
    train_labels = [r["label"] for f in cv.folds() for r in f.read_split() if r["split"] == "train"]
    majority = majority_baseline(y, majority_label(train_labels))
    # one curve per epoch: the mean over the folds (each fold trained the same epochs)
    epochs = min(len(f.history) for f in folds)
    history = [{k: _mean_cell([f.history[i].get(k) for f in folds]) for k in folds[0].history[i]}
               for i in range(epochs)]
    split_id = hashlib.sha256("".join(f.split_id for f in folds).encode()).hexdigest()[:12]
    fold_metrics = [{"fold": i, "n": f.metrics["n"], **{k: f.metrics[k] for k in HEADLINE}}
                    for i, f in enumerate(folds, start=1)]
    env = {**first.env, "train_seconds": _sum_key(folds, "train_seconds"),
           "n_train": first.env.get("n_train")}
    calibrated = (np.concatenate([f.calibrated for f in folds])
                  if all(f.calibrated is not None for f in folds) else None)  # each fold's own temperature
    metrics["ece_calibrated"] = expected_calibration_error(y, calibrated) if calibrated is not None else None
    return Run(cv.path, first.recipe, env, metrics, history, y, probs, rows, majority, split_id, first.audit,
               evaluated_on="out-of-fold", fold_metrics=fold_metrics, calibrated=calibrated)


def _mean_cell(values: list) -> float | str:
    nums = [float(v) for v in values if v not in (None, "")]
    return float(np.mean(nums)) if nums else ""


def _sum_key(runs: list[Run], key: str) -> float | None:
    values = [r.env.get(key) for r in runs]
    return round(sum(values), 2) if all(isinstance(v, int | float) for v in values) else None


def load_run(path: str | os.PathLike, split: str = "val", n_boot: int = 1000, seed: int = 0) -> Run:
    from osteo.evaluate import training_majority

    if CvDir(path).is_cv():
        return load_cv(CvDir(path), n_boot, seed)
    run = RunDir(path)
    recipe = run.read_recipe().to_dict()  # the resolved recipe (older runs' sizes filled in)
    y, probs, rows = run.read_predictions(split)
    if not len(y):
        raise OsteoError(f"run {run} has no {split} predictions; choose --split val or test")
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed)
    metrics["best_epoch"] = run.read_metrics().get("best_epoch")
    majority = majority_baseline(y, training_majority(run))
    temperature, calibrated = _calibrated(run, y, probs, metrics)
    return Run(run.path, recipe, run.read_env(), metrics, run.read_history(), y, probs, rows, majority,
               run.split_id(), run.read_audit(), calibrated=calibrated, temperature=temperature)


# --------------------------------------------------------------------------- tables


def _paired(runs: list[Run]) -> dict[Path, dict]:
    """Each run against the best run scored on the same images: McNemar's exact test on the
    predictions (pooled out-of-fold ones for cross-validations) and, between two
    cross-validations on the same folds, a paired t-test on the folds' balanced accuracies."""
    from scipy.stats import ttest_rel

    out: dict[Path, dict] = {}
    groups: dict[str, list[Run]] = {}
    for r in runs:  # internal and each external folder compete separately
        groups.setdefault(r.evaluated_on, []).append(r)
    if len(groups) > 1:
        for group in groups.values():
            out.update(_paired(group))
        return out
    if not runs:
        return out
    best = max(runs, key=lambda r: _finite_or(r.metrics["balanced_accuracy"], -1.0))
    best_correct = {row["path"]: p == y for row, p, y in zip(best.rows, best.probs.argmax(1), best.y)}
    for r in runs:
        paths = [row["path"] for row in r.rows]
        if r is best:
            out[r.path] = {"vs": "(best)", "p": None, "fold_p": None}
        elif set(paths) == set(best_correct) and r.evaluated_on == best.evaluated_on:
            mine = r.probs.argmax(1) == r.y
            theirs = np.array([best_correct[p] for p in paths])
            fold_p = None
            if r.folds and r.split_id == best.split_id and r.folds == best.folds:
                a = [f["balanced_accuracy"] for f in r.fold_metrics]
                b = [f["balanced_accuracy"] for f in best.fold_metrics]
                fold_p = float(ttest_rel(a, b).pvalue) if np.ptp(np.subtract(a, b)) > 0 else 1.0
            out[r.path] = {"vs": best.label, "p": mcnemar_exact(mine, theirs)["p_value"], "fold_p": fold_p}
        else:
            out[r.path] = {"vs": "not paired (different images)", "p": None, "fold_p": None}
    return out


def _finite_or(value, default: float) -> float:
    return float(value) if isinstance(value, int | float) and np.isfinite(value) else default


def comparison_rows(runs: list[Run], oracles: list[Run] = ()) -> list[dict]:
    """One row per run, then one per oracle (the phantom's ceiling: compared with nothing)."""
    unpaired = {"vs": "", "p": None, "fold_p": None}
    paired = {**_paired(runs), **{o.path: unpaired for o in oracles}}
    runs = [*runs, *oracles]
    rows = []
    for r in runs:
        m, t = r.metrics, r.recipe.get("train", {})
        row = {
            "model": r.model, "run_id": r.run_id, "weights": r.recipe.get("model", {}).get("weights"),
            "precision": r.env.get("precision"), "backend": r.env.get("backend"),
            "image_size": r.recipe.get("data", {}).get("image_size"),
            "epochs": int(t.get("epochs", 0)) + int(t.get("fine_tune_epochs", 0)), "best_epoch": m.get("best_epoch"),
            "n_train": r.env.get("n_train"), "n_val": m["n"], "n_nonfinite": m["n_nonfinite"],
            "roc_auc": m["roc_auc"], "kappa_qw": m["kappa_qw"], "mcc": m["mcc"], "log_loss": m["log_loss"],
            "brier": m["brier"], "ece": m["ece"], "ece_calibrated": m.get("ece_calibrated"),
            "temperature": r.temperature, "majority_class": r.majority["class"],
            "majority_accuracy": r.majority["accuracy"], "majority_balanced_accuracy": r.majority["balanced_accuracy"],
            "mcnemar_vs": paired[r.path]["vs"], "mcnemar_p": paired[r.path]["p"],
            "fold_ttest_p": paired[r.path]["fold_p"], "folds": r.folds or None, "evaluated_on": r.evaluated_on,
            "train_seconds": r.env.get("train_seconds"), "train_images_per_sec": r.env.get("train_images_per_sec"),
            "params": r.env.get("params"), "split_id": r.split_id, "run_dir": str(r.path),
        }
        for k in HEADLINE:
            row[k] = m[k]
            row[f"{k}_lo"], row[f"{k}_hi"] = m.get(f"{k}_ci", (None, None))
            values = [f[k] for f in r.fold_metrics]
            row[f"{k}_mean"] = float(np.mean(values)) if values else None
            row[f"{k}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for c in CLASSES:
            for k in ("precision", "recall", "specificity", "f1"):
                row[f"{k}_{c}"] = m["per_class"][c][k]
        rows.append(row)
    return rows


def oracle_runs(runs: list[Run], n_boot: int = 1000, seed: int = 0) -> list[Run]:
    """The phantom's ceiling for each split the runs were scored on, where the data has latents.csv.

    The oracle is fitted on each run's own training split and scored on the same
    validation (or, for a cross-validation, the same out-of-fold) images.
    """
    from osteo.oracle import oracle_probs, read_latents

    out, seen = [], set()
    for r in runs:
        if r.evaluated_on.startswith("external"):  # its training data is another folder's
            continue
        data_dir = r.audit.get("data_dir") or r.recipe.get("data", {}).get("dir", "")
        if (data_dir, r.split_id) in seen:
            continue
        seen.add((data_dir, r.split_id))
        latents = read_latents(data_dir) if data_dir else None
        if latents is None:
            continue
        parts = [(f, f.read_predictions("val")[2]) for f in CvDir(r.path).folds()] if r.folds else \
                [(RunDir(r.path), r.rows)]
        probs, folds = [], []
        for run, rows in parts:
            p = oracle_probs(latents, [x for x in run.read_split() if x["split"] == "train"], rows)
            if p is None:
                break
            probs.append(p)
            y = np.array([CLASSES.index(x["label"]) for x in rows])
            m = compute_metrics(y, p)
            folds.append({"fold": len(folds) + 1, "n": m["n"], **{k: m[k] for k in HEADLINE}})
        else:
            probs = np.concatenate(probs)
            metrics = {**compute_metrics(r.y, probs, n_boot=n_boot, seed=seed), "best_epoch": None}
            recipe = {"model": {"backbone": "oracle"}, "data": r.recipe.get("data", {})}
            out.append(Run(r.path / "oracle", recipe, {}, metrics, [], r.y, probs, r.rows, r.majority, r.split_id,
                           r.audit, r.evaluated_on, folds if r.folds else []))
    return out


def point_rows(runs: list[Run]) -> list[dict]:
    """Each run's operating points, chosen on its validation split, at work on every data it was scored on."""
    rows = []
    for r in runs:
        if r.evaluated_on.startswith("external"):
            points = RunDir(r.path)._read(r.path / RunDir.METRICS, default={}).get("operating_points", [])
        elif not r.folds and r.path.name != "oracle":
            points = [p["val"] for p in RunDir(r.path).read_calibration().get("operating_points", []) if "val" in p]
        else:
            points = []
        for p in points:
            lo_s, hi_s = p.get("sensitivity_ci", (None, None))
            lo_p, hi_p = p.get("specificity_ci", (None, None))
            rows.append({"model": r.model, "run_id": r.run_id, "evaluated_on": r.evaluated_on, "point": p["name"],
                         "threshold": p["threshold"], "sensitivity": p["sensitivity"], "sensitivity_lo": lo_s,
                         "sensitivity_hi": hi_s, "specificity": p["specificity"], "specificity_lo": lo_p,
                         "specificity_hi": hi_p, "n": p.get("n")})
    return rows


def fold_rows(runs: list[Run]) -> list[dict]:
    """Long form of the cross-validations' per-fold metrics (empty without one)."""
    return [{"model": r.model, "run_id": r.run_id, **f} for r in runs for f in r.fold_metrics]


def per_class_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        for c in CLASSES:
            pc = r.metrics["per_class"][c]
            for k in ("precision", "recall", "specificity", "f1", "roc_auc", "support"):
                lo, hi = pc.get(f"{k}_ci", (None, None))
                rows.append({"model": r.model, "run_id": r.run_id, "class": c, "metric": k,
                             "value": pc[k], "lo": lo, "hi": hi})
    return rows


# --------------------------------------------------------------------------- plots


def _colours(runs: list[Run]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    names = sorted({r.model for r in runs})
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _names(runs: list[Run]) -> list[str]:
    """What plots call each run: its model, or model and run id where a model has several (--all)."""
    models = [r.model for r in runs]
    return models if len(set(models)) == len(models) else [r.label for r in runs]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _float(v) -> float:
    """A number from a CSV or JSON cell; blank, text, None and +-inf become NaN (a gap in a plot)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return np.nan
    return x if np.isfinite(x) else np.nan


def _floats(rows: list[dict], key: str) -> np.ndarray:
    return np.array([_float(r.get(key)) for r in rows])


def _nonfinite(v) -> bool:
    """A cell that reads as a number but is NaN or infinite (a blank cell is only missing)."""
    try:
        return not np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def plot_curves(runs: list[Run], colours, out: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 2.8 * len(runs)), squeeze=False)
    for (ax_acc, ax_loss), r in zip(axes, runs):
        h = r.history
        if not h:
            ax_acc.set_title(f"{r.label}: no history")
            continue
        ep = _floats(h, "epoch")
        col = colours[r.model]
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.plot(ep, _floats(h, key), color=col, linestyle="--", marker="o", markersize=3, label=f"train {key}")
            ax.plot(ep, _floats(h, f"val_{key}"), color=col, marker="o", markersize=3, label=f"validation {key}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            step = np.diff(_floats(h, "phase"))
            change = np.flatnonzero(np.isfinite(step) & (step != 0) & np.isfinite(ep[:-1]))
            for i in change:
                ax.axvline(ep[i] + 0.5, color="grey", linestyle=":", label="phase 2 starts")
            ax.set_xlabel("epoch")
            ax.set_title(f"{r.label}: {key}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        best = _float(r.metrics.get("best_epoch"))
        if np.isfinite(best):
            ax_acc.axvline(best, color="black", alpha=0.4, linewidth=3, label="best")
    fig.tight_layout()
    return _save(fig, out / "curves.png")


def plot_confusions(runs: list[Run], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(8, 3.4 * len(runs)), squeeze=False)
    for (ax_n, ax_r), r in zip(axes, runs):
        cm = np.array(r.metrics["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        for ax, mat, title, fmt in ((ax_n, cm, "counts", "{:.0f}"), (ax_r, norm, "row-normalised", "{:.2f}")):
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            for i in range(len(CLASSES)):
                for j in range(len(CLASSES)):
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
            ax.set_xticks(range(len(CLASSES)), CLASSES, fontsize=8)
            ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{r.label}: {title}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "confusion.png")


def plot_roc(runs: list[Run], colours, out: Path) -> Path:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, len(CLASSES), figsize=(4 * len(CLASSES), 4))
    for ax, (i, c) in zip(axes, enumerate(CLASSES)):
        for r, name in zip(runs, _names(runs)):
            auc = r.metrics["per_class"][c]["roc_auc"]
            if auc is None:  # one class only in the split, or non-finite probabilities: no curve
                continue
            fpr, tpr, _ = roc_curve(r.y == i, r.probs[:, i])
            ax.plot(fpr, tpr, color=colours[r.model], label=f"{name} AUC {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"{c} vs rest", fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, out / "roc.png")


def plot_reliability(runs: list[Run], colours, out: Path) -> Path:
    """Reliability diagrams before and after each run's temperature scaling."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, after in zip(axes, (False, True)):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for r, name in zip(runs, _names(runs)):
            probs = r.calibrated if after else r.probs
            if probs is None:
                continue
            finite = np.isfinite(probs).all(axis=1)  # a NaN row has no confidence to bin
            curve = reliability_curve(r.y[finite], probs[finite])
            ece = r.metrics["ece_calibrated"] if after else r.metrics["ece"]
            ax.plot(curve[:, 0], curve[:, 1], marker="o", color=colours[r.model], label=f"{name} ECE {_fmt(ece)}")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("after temperature scaling" if after else "as trained (validation)")
    fig.tight_layout()
    return _save(fig, out / "reliability.png")


def plot_bars(runs: list[Run], colours, out: Path, oracles: list[Run] = ()) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(4.2 * len(HEADLINE), 3.8), sharey=True)
    names = _names(runs)
    for ax, k in zip(axes, HEADLINE):
        vals = [r.metrics[k] for r in runs]
        lo = [r.metrics.get(f"{k}_ci", (v, v))[0] for r, v in zip(runs, vals)]
        hi = [r.metrics.get(f"{k}_ci", (v, v))[1] for r, v in zip(runs, vals)]
        x = np.arange(len(runs))
        ax.bar(x, vals, color=[colours[r.model] for r in runs],
               yerr=[np.subtract(vals, lo), np.subtract(hi, vals)], capsize=4)
        if k in ("accuracy", "balanced_accuracy"):
            # each run's own baseline: runs on other splits (one class only, say) have other ones
            ax.hlines([r.majority[k] for r in runs], x - 0.4, x + 0.4, color="red", linestyle="--",
                      label="majority class")
        for o in oracles:  # the ceiling: a classifier that sees the phantom's true latents
            ax.axhline(o.metrics[k], color="green", linestyle=":", label=f"oracle {o.metrics[k]:.2f}")
        if k in ("accuracy", "balanced_accuracy") or oracles:
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(k.replace("_", " ") + " (95% CI)", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "metrics.png")


def _sample(r: Run, per_kind: int) -> list[int | None]:
    """The ``per_kind`` most confident correct, then wrong, predictions (None where there are fewer)."""
    pred, conf = r.probs.argmax(1), np.nan_to_num(r.probs.max(1), nan=-1.0)
    order = np.argsort(-conf, kind="stable")
    right = [int(i) for i in order if pred[i] == r.y[i]][:per_kind]
    wrong = [int(i) for i in order if pred[i] != r.y[i]][:per_kind]
    return [*right, *[None] * (per_kind - len(right)), *wrong, *[None] * (per_kind - len(wrong))]


def plot_gradcam(runs: list[Run], out: Path, per_kind: int = 3) -> Path:
    """Per run: Grad-CAM on a fixed sample of its correct and wrong validation images.

    A cross-validation shows its first fold; a run whose model cannot be loaded (or an
    external row) gets a note instead of maps.
    """
    import matplotlib.pyplot as plt

    cols = 2 * per_kind
    fig, axes = plt.subplots(len(runs), cols, figsize=(1.7 * cols, 2.1 * len(runs)), squeeze=False)
    for axrow, r, name in zip(axes, runs, _names(runs)):
        for ax in axrow:
            ax.axis("off")
        try:
            sample, images, maps, picked = _gradcam_sample(r, per_kind)
        except (OsteoError, OSError, ValueError) as e:
            axrow[0].text(0, 0.5, f"{name}: no Grad-CAM ({str(e)[:80]})", fontsize=7, transform=axrow[0].transAxes)
            continue
        from osteo.explain import overlay

        for ax, i, image, heat in zip(axrow, picked, images, maps):
            p, y = sample.probs[i], sample.y[i]
            overlay(ax, image, heat, f"true {CLASSES[y]}\npred {CLASSES[p.argmax()]} {p.max():.2f}",
                    "green" if p.argmax() == y else "red")
        axrow[0].text(-0.1, 0.5, name, transform=axrow[0].transAxes, rotation=90, ha="right", va="center",
                      fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "gradcam.png")


def _gradcam_sample(r: Run, per_kind: int):
    from osteo.explain import gradcam
    from osteo.predict import load_best, load_images
    from osteo.registry import get_backbone

    if r.evaluated_on.startswith("external") or r.path.name == "oracle":
        raise OsteoError("not a validation row")
    run = CvDir(r.path).fold(1) if r.folds else RunDir(r.path)
    sample = r if not r.folds else load_run(run, "val", 0)
    picked = [i for i in _sample(sample, per_kind) if i is not None]
    if not picked:
        raise OsteoError("no validation images")
    recipe = run.read_recipe()
    data_dir = Path(sample.audit.get("data_dir") or recipe.data.dir)
    images, reasons = load_images([data_dir / sample.rows[i]["path"] for i in picked], recipe.data.image_size,
                                  recipe.data.resize)
    if any(img is None for img in images):
        raise OsteoError(next(x for x in reasons if x))
    images = np.stack(images)
    maps, _ = gradcam(load_best(run), get_backbone(recipe.model.backbone), images,
                      classes=sample.probs[picked].argmax(1))
    return sample, images, maps, picked


def plot_samples(runs: list[Run], out: Path, per_kind: int = 4) -> Path:
    """Per model: the most confident correct and wrong validation predictions."""
    import matplotlib.pyplot as plt

    from osteo.data.decode import DecodeError, decode_file

    cols = 2 * per_kind
    fig, axes = plt.subplots(len(runs), cols, figsize=(1.6 * cols, 2.0 * len(runs)), squeeze=False)
    for axrow, r in zip(axes, runs):
        data_dir = Path(r.audit.get("data_dir") or r.recipe.get("data", {}).get("dir", "."))
        pred = r.probs.argmax(1)
        conf = r.probs.max(1)
        right = [i for i in np.argsort(-conf) if pred[i] == r.y[i]][:per_kind]
        wrong = [i for i in np.argsort(-conf) if pred[i] != r.y[i]][:per_kind]
        for ax, i in zip(axrow, [*right, *[None] * (per_kind - len(right)), *wrong]):
            ax.axis("off")
            if i is None:
                continue
            try:
                img = decode_file(data_dir / r.rows[i]["path"])[0][..., 0]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            except DecodeError:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
            ok = pred[i] == r.y[i]
            ax.set_title(f"true {CLASSES[r.y[i]]}\npred {CLASSES[pred[i]]} {conf[i]:.2f}",
                         fontsize=6, color="green" if ok else "red")
        axrow[0].text(-0.1, 0.5, r.model, transform=axrow[0].transAxes, rotation=90, ha="right", va="center",
                      fontsize=8)
    fig.suptitle("most confident correct (green) and wrong (red) validation predictions", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "samples.png")


# --------------------------------------------------------------------------- page


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    return str(v)


def _table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers or columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.warn{color:#a00;font-weight:bold}
details{margin:.5em 0}.scroll{overflow-x:auto}"""


def _audit_section(runs: list[Run]) -> str:
    e = html.escape
    parts = []
    seen = set()
    for r in runs:
        a = r.audit
        key = a.get("data_dir")
        if not a or key in seen:
            continue
        seen.add(key)
        groups = a.get("duplicate_groups", [])
        conflicts = [g for g in groups if g.get("conflict")]
        rows = [{"class": c, "readable images": a.get("classes", {}).get(c)} for c in CLASSES]
        parts.append(f"<h3>data: {e(str(key))}</h3>")
        parts.append(_table(rows, ["class", "readable images"]))
        parts.append(
            f"<p>{a.get('n_files', 0)} image files, {a.get('n_ok', 0)} readable, {len(a.get('unreadable', []))} "
            f"unreadable, {len(a.get('ignored', []))} ignored; {len(groups)} duplicate groups "
            f"({sum(g['kind'] == 'exact' for g in groups)} exact, {sum(g['kind'] == 'near' for g in groups)} near), "
            f"{len(conflicts)} filed under two classes and excluded from the split "
            f"({r.env.get('excluded_conflicts', 0)} images).</p>")
        if conflicts:
            items = "".join(f"<li>{e(', '.join(g['paths']))} ({e(', '.join(g['labels']))})</li>" for g in conflicts[:50])
            parts.append(f"<details><summary>conflicting duplicate groups</summary><ul>{items}</ul></details>")
        if a.get("unreadable"):
            items = "".join(f"<li>{e(u['path'])}: {e(u['reason'])}</li>" for u in a["unreadable"][:50])
            parts.append(f"<details><summary>unreadable files</summary><ul>{items}</ul></details>")
    return "".join(parts) or "<p>no audit recorded</p>"


def failures(run: Run, row: dict, split: str) -> list[str]:
    """Why ``run`` has failed, one sentence each; none for a run that beats the majority baseline.

    Written to survive the runs it exists to flag: a NaN or None metric is itself a
    failure, never an exception or a silently passed comparison.
    """
    who = f"{row['model']} ({row['run_id']})"
    out = []
    if row.get("n_nonfinite"):
        out.append(f"{who}: {row['n_nonfinite']} of {row['n_val']} {split} predictions are not finite (NaN or "
                   "infinite): the model diverged, and ROC-AUC and calibration are left out.")
    bad_history = [k for k in (run.history[0] if run.history else {})
                   if any(_nonfinite(h.get(k)) for h in run.history)]
    if bad_history:
        out.append(f"{who}: history.csv holds NaN or infinite {', '.join(map(str, bad_history))}: training diverged.")
    bad_metrics = [k for k in HEADLINE if not np.isfinite(_float(row.get(k)))]
    if bad_metrics:
        out.append(f"{who}: {', '.join(bad_metrics)} not finite: the run cannot be compared.")
    classes = sorted({CLASSES[i] for i in run.y})
    ba, base = _float(row.get("balanced_accuracy")), _float(row.get("majority_balanced_accuracy"))
    if len(classes) == 1:
        # every model equals the baseline here, so the margin test below would blame the model
        out.append(f"{who}: its {split} split holds only {classes[0]} images: balanced accuracy cannot tell a "
                   "model from always answering one class.")
    elif np.isfinite(ba) and np.isfinite(base) and ba - base < 0.05:
        out.append(f"{who}: balanced accuracy {ba:.3f} is within 0.05 of always answering {row['majority_class']} "
                   f"({base:.3f}): it has not learned the task.")
    return out


def render_html(runs: list[Run], rows: list[dict], plots: dict[str, Path], split: str,
                skipped: list[str] = (), n_boot: int = 1000, points: list[dict] = ()) -> str:
    e = html.escape
    cols = ["model", "run_id", "evaluated_on", "folds", "weights", "precision", "image_size", "epochs", "best_epoch",
            "n_train", "n_val", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "kappa_qw", "mcc", "ece",
            "ece_calibrated",
            "majority_accuracy", "majority_balanced_accuracy", "mcnemar_p", "train_images_per_sec"]
    table_rows = []
    for row in rows:
        t = dict(row)
        for k in HEADLINE:
            if row.get(f"{k}_lo") is not None:
                t[k] = f"{_fmt(row[k])} [{_fmt(row[f'{k}_lo'])}, {_fmt(row[f'{k}_hi'])}]"
        table_rows.append(t)
    warnings = [w for r, row in zip(runs, rows) for w in failures(r, row, split)]
    warn_html = "".join(f'<p class="warn">{e(w)}</p>' for w in [*warnings, *skipped])
    sections = [
        ("Headline metrics", "bars", "accuracy, balanced accuracy and macro F1 with 95% bootstrap intervals; "
                                     "the red dashes are each run's majority-class baseline"),
        ("Training curves", "curves", "dashed: training, solid: validation; dotted: the start of fine-tuning"),
        ("Confusion matrices", "confusion", ""),
        ("ROC curves", "roc", "one class against the rest"),
        ("Calibration", "reliability", "a calibrated model lies on the diagonal; right: after each run's "
                                       "temperature scaling (fitted on its validation predictions)"),
        ("Sample predictions", "samples", ""),
        ("Where the models look (Grad-CAM)", "gradcam", "the most confident correct (green) and wrong (red) "
                                                        "validation images of each run, heat on the layer its "
                                                        "backbone's spec names"),
    ]
    body = [f"<h1>osteo: model comparison ({e(split)} split)</h1>", warn_html,
            "<h2>Comparison</h2>",
            _table(table_rows, cols, [c.replace("_", " ") for c in cols]),
            f"<p>Intervals: stratified bootstrap, {n_boot:,} resamples, 95% percentile. McNemar: exact test "
            "against the best run by balanced accuracy on the same images.</p>"]
    for title, key, caption in sections:
        if key in plots:
            body.append(f"<h2>{e(title)}</h2><p>{e(caption)}</p>{_img(plots[key], title)}")
    if points:
        body.append("<h2>Operating points</h2><p>Thresholds chosen on each run's validation split (after "
                    "calibration) for a screening sensitivity or specificity, and what they give on every data "
                    "the run was scored on, with 95% bootstrap intervals.</p>"
                    + _table(list(points), [c for c in POINT_COLUMNS if not c.endswith(("_lo", "_hi"))]))
    folds = fold_rows(runs)
    if folds:
        body.append("<h2>Cross-validation folds</h2><p>Each fold's validation metrics; the comparison table "
                    "shows the pooled out-of-fold predictions, and the mean and SD over the folds in "
                    "comparison.csv.</p>" + _table(folds, list(FOLD_COLUMNS)))
    body.append("<h2>Data audit</h2>" + _audit_section(runs))
    body.append("<h2>Runs</h2>")
    for r in runs:
        body.append(f"<details><summary>{e(r.label)}: recipe and environment</summary>"
                    f"<pre>{e(json.dumps(r.recipe, indent=2))}</pre><pre>{e(json.dumps(r.env, indent=2))}</pre></details>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>osteo report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def load_runs(run_dirs, split: str = "val", n_boot: int = 1000, seed: int = 0,
              warn: Callable[[str], None] | None = None) -> tuple[list[Run], list[str]]:
    """Load every run that can be reported; a damaged or incompatible one is skipped, with its reason."""
    runs, skipped = [], []
    for p in run_dirs:
        places = [(p, None)]
        if not CvDir(p).is_cv() and RunDir(p).eval_path.is_dir():  # its external validations too
            places += [(p, e.parent) for e in sorted(RunDir(p).eval_path.glob(f"*/{RunDir.PREDICTIONS}"))]
        for run, external in places:
            try:
                runs.append(load_external(run, external, n_boot, seed) if external else
                            load_run(run, split, n_boot, seed))
            except OsteoError as e:
                skipped.append(f"skipped {external or run}: {e}")
                if warn:
                    warn(skipped[-1])
    return runs, skipped


def _calibrated(run: RunDir, y: np.ndarray, probs: np.ndarray, metrics: dict):
    """(the run's temperature, ``probs`` scaled by it); sets ``metrics["ece_calibrated"]``.
    (None, None) for a run not calibrated, or probabilities that are not finite."""
    temperature = run.read_calibration().get("temperature")
    calibrated = apply_temperature(probs, temperature) if temperature and np.isfinite(probs).all() else None
    metrics["ece_calibrated"] = expected_calibration_error(y, calibrated) if calibrated is not None else None
    return temperature, calibrated


def load_external(run_dir, external: Path, n_boot: int = 1000, seed: int = 0) -> Run:
    """A run scored on another folder (``osteo eval RUN --data FOLDER``) as its own row."""
    run = RunDir(run_dir)
    y, probs, rows = RunDir(external).read_predictions("external")
    if not len(y):
        raise OsteoError(f"{external} holds no external predictions; run osteo eval {run} --data FOLDER again")
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed)
    metrics["best_epoch"] = run.read_metrics().get("best_epoch")
    temperature, calibrated = _calibrated(run, y, probs, metrics)
    majority = majority_baseline(y, majority_label(r["label"] for r in rows))
    split_id = hashlib.sha256("\n".join(sorted(r["path"] for r in rows)).encode()).hexdigest()[:12]
    audit = RunDir(external).read_audit()
    return Run(external, run.read_recipe().to_dict(), run.read_env(), metrics, [], y, probs, rows, majority,
               split_id, audit, evaluated_on=f"external: {external.name}", calibrated=calibrated,
               temperature=temperature)


def write_report(run_dirs: list, out: str | os.PathLike, split: str = "val", n_boot: int = 1000,
                 seed: int = 0, warn: Callable[[str], None] | None = None) -> Path:
    """Write the CSVs, plots and ``index.html`` for ``run_dirs`` to ``out``; return the page.

    A run that cannot be read (damaged files, another class set) is skipped with one
    ``warn`` line and named on the page. Everything is first written to a staging
    folder inside ``out`` and moved into place with ``index.html`` last, so a report
    killed half-way leaves the previous one whole.
    """
    import matplotlib

    matplotlib.use("Agg")
    if n_boot < 0:
        raise OsteoError(f"the number of bootstrap resamples must be 0 or more, got {n_boot}; e.g. --bootstrap 1000")
    out = Path(out)
    runs, skipped = load_runs(run_dirs, split, n_boot, seed, warn)
    if not runs:
        raise OsteoError(f"none of the {len(skipped)} run(s) could be reported (see the warnings); "
                         "re-run `osteo eval RUN_DIR` on them or train again")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OsteoError(f"cannot create {out}: {e.strerror}; choose a writable --out folder") from None
    sweep_temporaries(out)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, suffix=".tmp", dir=out))
    try:
        oracles = oracle_runs(runs, n_boot, seed)
        rows = comparison_rows(runs, oracles)
        write_csv(stage / "comparison.csv", rows, COMPARISON_COLUMNS)
        write_csv(stage / "per_class.csv", per_class_rows(runs), PER_CLASS_COLUMNS)
        write_csv(stage / "folds.csv", fold_rows(runs), FOLD_COLUMNS)
        points = point_rows(runs)
        write_csv(stage / "operating_points.csv", points, POINT_COLUMNS)
        plots_dir = stage / "plots"
        colours = _colours(runs)
        plots = {
            "bars": plot_bars(runs, colours, plots_dir, oracles),
            "curves": plot_curves(runs, colours, plots_dir),
            "confusion": plot_confusions(runs, plots_dir),
            "roc": plot_roc(runs, colours, plots_dir),
            "reliability": plot_reliability(runs, colours, plots_dir),
            "samples": plot_samples(runs, plots_dir),
            "gradcam": plot_gradcam(runs, plots_dir),
        }
        write_text(stage / "index.html", render_html(runs, rows, plots, split, skipped, n_boot, points))
        for name in ("comparison.csv", "per_class.csv", "folds.csv", "operating_points.csv"):
            os.replace(stage / name, out / name)
        _replace_folder(plots_dir, out / "plots")
        os.replace(stage / "index.html", out / "index.html")  # last: the page appears only when all is there
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "index.html"


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` where ``target`` is, removing the old one (two renames, then a delete)."""
    old = None
    if target.exists():
        old = target.with_name(f"{STAGE_PREFIX}old-{os.getpid()}.tmp")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
