"""The runs a report compares, loaded as :class:`Run` rows: runs, cross-validations (pooled
out-of-fold), external validations, and the phantom's oracle. Metrics are recomputed from
each run's ``predictions.csv``, never taken from a stale ``metrics.json``.

Each row names the images it was measured on (``evaluated_on``) and what those images were
used to choose (``chose``, :data:`osteo.evaluate.CHOSE`): a run is reported on its test split
where it has one, a nested cross-validation on its outer folds, which chose nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.calibrate import (
    apply_temperature,
    calibration_digest,
    decision_metrics,
    point_goal,
    positive_score,
    shared_points,
)
from osteo.data.split import majority_label
from osteo.errors import OsteoError
from osteo.evaluate import (
    CHOSE,
    HEADLINE,
    SPLIT_NAMES,
    chosen_points,
    compute_metrics,
    expected_calibration_error,
    external_groups,
    external_label,
    external_points,
    headline_split,
    majority_baseline,
    rescore_command,
    training_majority,
)
from osteo.recipe import dotted
from osteo.runs import CvDir, RunDir, list_cvs, list_runs


def _run_id_of(run: Path) -> str:
    """A run's name in the report: its folder's, with its cross-validation's for a fold."""
    return f"{run.parent.name}/{run.name}" if CvDir(run.parent).is_cv() else run.name


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
    evaluated_on: str = "validation"  # "test", "out-of-fold" (a cross-validation, pooled), "external: <folder>"
    fold_metrics: list[dict] = field(default_factory=list)  # a cross-validation's, one per fold
    calibrated: np.ndarray | None = None  # the probabilities after the run's temperature scaling
    temperature: float | None = None
    chose: str = CHOSE["val"]  # what the images of evaluated_on were used to choose
    # the operating points at work: sensitivity and specificity per point and where measured
    points: list[dict] = field(default_factory=list)
    # the images scored, as content: rows with the same id are the same images with the same labels
    images_id: str = ""
    # balanced accuracy on the run's own validation images (a cross-validation's: its folds'
    # mean): what picks the best of runs compared on the same held-out images (NaN: none)
    val_balanced_accuracy: float = float("nan")
    # each scored image's group (duplicates, patient), for intervals that draw groups whole (None: images)
    groups: list[str] | None = None
    # an external folder's eval record (osteo eval --data): its folder, and the images it left out and why
    external_record: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.recipe.get("model", {}).get("backbone") or self.path.parent.name

    @property
    def run_id(self) -> str:
        # an external validation lives in RUN/eval/<folder>/: its row is the run's; a fold reported on its own
        # is named with its cross-validation (<cv-id>/fold-2: every cross-validation has a fold-2); the
        # phantom's oracle (RUN/oracle, no folder) with the run on whose split it was fitted
        if self.is_oracle:
            return f"{_run_id_of(self.path.parent)}/oracle"
        return _run_id_of(self.path.parent.parent if self.evaluated_on.startswith("external") else self.path)

    @property
    def is_oracle(self) -> bool:
        """The phantom's oracle on a run's split (:func:`oracle_runs`), not a run."""
        return self.model == "oracle" and self.path.name == "oracle"

    @property
    def data_dir(self) -> str:
        """The folder of the images this row was measured on: the run's data, or the external folder."""
        return (self.external_record.get("data_dir") or self.audit.get("data_dir")
                or self.recipe.get("data", {}).get("dir") or "")

    @property
    def run_dir(self) -> Path:
        """The run folder this row is of: for the oracle, the run on whose split it was fitted."""
        return self.path.parent if self.is_oracle else self.path

    @property
    def folds(self) -> int:
        return len(self.fold_metrics)

    @property
    def label(self) -> str:
        cv = self.folds or (self.external_record or {}).get("ensemble_of")  # out-of-fold, or its folds as one
        return f"{self.model} ({'cv ' if cv else ''}{self.run_id}, {self.evaluated_on})"


def collect_runs(specs: list[str] | None = None, runs_dir: str | os.PathLike = "runs",
                 all_runs: bool = False, warn: Callable[[str], None] | None = None) -> list[RunDir | CvDir]:
    """The runs to report: those given, else the latest finished run and cross-validation of
    each model (or all of them).

    Unfinished runs under ``runs_dir`` are left out with one ``warn`` line naming them.
    """
    if specs:
        given: dict[Path, str] = {}  # one run given twice (R R, or as R and ./R) is one row, not a model beside itself
        for s in specs:
            key = Path(s).resolve()
            if key in given:
                if warn:
                    warn(f"{s} is {given[key]}, given before: reported once")
                continue
            given[key] = s
        return [CvDir(s) if CvDir(s).is_cv() else RunDir(s).check(need=RunDir.FINISHED) for s in given.values()]
    every_cv = list_cvs(runs_dir, finished=True)
    cvs = every_cv if all_runs else list({c.model: c for c in every_cv}.values())  # oldest first: the last wins
    runs = list_runs(runs_dir, finished=True)
    unfinished = [r for r in list_runs(runs_dir) if not r.is_finished()]
    unfinished += [c for c in list_cvs(runs_dir) if not c.is_finished()]  # a damaged cv.json too
    if unfinished and warn:
        from osteo.data.pipeline import CACHE_VERSION

        names = ", ".join(str(r) for r in unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
        older = sorted({v for r in unfinished if isinstance(r, RunDir) and (v := r.image_decoding()) not in
                        (None, CACHE_VERSION)})  # begun before osteo read some files otherwise
        caveat = (f"; one begun under osteo's image decoding {' or '.join(older)} resumes only if its images decode "
                  "as they did then (else the resume says which do not, and it must be trained again)" if older else "")
        warn(f"left out {len(unfinished)} unfinished run(s) (stopped before they ended, or training): "
             f"{names}; finish one with: osteo train --resume RUN_DIR (a cross-validation: the command that "
             f"started it){caveat}")
    if not runs and not cvs:
        if not os.path.isdir(runs_dir):
            raise OsteoError(f"--runs {runs_dir} does not exist (or is not a folder); give the folder osteo train "
                             "wrote runs to (--runs, make's RUNS=), or train one first (make train MODEL=...)")
        raise OsteoError(f"no finished runs under {runs_dir}; train one first (make train MODEL=...)")
    if all_runs:
        return [*runs, *cvs]
    latest: dict[str, RunDir] = {}
    for r in runs:  # oldest first, so the last one of each model wins
        latest[r.model] = r
    older = len(runs) - len(latest) + len(every_cv) - len(cvs)
    if older and warn:  # said: a report of the latest alone is not every run there
        warn(f"left out {older} older finished run(s) of the same models (each model's latest run and latest "
             f"cross-validation are reported); report every run with --all, or name the runs")
    return [latest[m] for m in sorted(latest)] + sorted(cvs, key=lambda c: c.model)


def load_runs(run_dirs, split: str = "auto", n_boot: int = 1000, seed: int = 0,
              warn: Callable[[str], None] | None = None) -> tuple[list[Run], list[str]]:
    """Load every run that can be reported; a damaged or incompatible one is skipped, with its reason."""
    runs, skipped = [], []
    for p in run_dirs:
        places = [(p, None)]
        evals = (CvDir(p) if CvDir(p).is_cv() else RunDir(p)).eval_path  # its external validations too
        places += [(p, e.parent) for e in sorted(evals.glob(f"*/{RunDir.PREDICTIONS}"))]
        for run, external in places:
            try:
                runs.append(load_external(run, external, n_boot, seed) if external else
                            load_run(run, split, n_boot, seed))
            except OsteoError as e:
                skipped.append(f"skipped {external or run}: {e}")
                if warn:
                    warn(skipped[-1])
    return runs, skipped


def load_run(path: str | os.PathLike, split: str = "auto", n_boot: int = 1000, seed: int = 0) -> Run:
    """One run's row on ``split``: ``auto`` is its test split where it has one (which chose
    nothing), else its validation split (which chose the checkpoint, temperature and thresholds)."""
    if CvDir(path).is_cv():
        return load_cv(CvDir(path), n_boot, seed)
    run = RunDir(path).check(finished=True)  # one killed while finishing has metrics, not its calibration
    recipe = run.read_recipe().to_dict()  # the resolved recipe (older runs' sizes filled in)
    every = run.read_predictions()  # read once: the split reported on and validation
    if split == "auto":
        split = headline_split({row["split"] for row in every[2]})
    y, probs, rows = _of_split(every, split)
    if not len(y):
        has = sorted({row["split"] for row in every[2]} & {"val", "test"})
        fix = f"report it with --split {has[0]}" if has else "train it again"
        raise OsteoError(f"run {run} has no {split} predictions ({SPLIT_NAMES.get(split, split)} split); {fix}")
    groups = run.image_groups(rows)
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed, groups=groups)
    metrics["best_epoch"] = run.read_metrics().get("best_epoch")
    majority = majority_baseline(y, training_majority(run))
    temperature, calibrated = _calibrated(run, y, probs, metrics)
    # every split's operating points: the one reported on, and validation, where they were chosen. A goal
    # set again after osteo calibrate showed the test split's figures was chosen with them in view
    calibration = run.read_calibration()
    chose = {**CHOSE, "test": CHOSE["test"] + RECHOSEN} if calibration.get("earlier_goals") else CHOSE
    points = [{**p[name], "target": point_goal(p), "evaluated_on": SPLIT_NAMES[name], "chose": chose[name]}
              for name in dict.fromkeys((split, "test", "val"))
              for p in calibration.get("operating_points", []) if name in p]
    return Run(run.path, recipe, run.read_env(), metrics, run.read_history(), y, probs, rows, majority,
               run.split_id(), run.read_audit(), evaluated_on=SPLIT_NAMES[split], calibrated=calibrated,
               temperature=temperature, chose=CHOSE[split], points=points,
               images_id=images_id(rows, run.content_sha256()),
               val_balanced_accuracy=metrics["balanced_accuracy"] if split == "val" else _val_ba(run, every), groups=groups)


def load_cv(cv: CvDir, n_boot: int = 1000, seed: int = 0) -> Run:
    """A cross-validation as one row: its pooled out-of-fold predictions (each image scored
    once, by the fold that held it out), with the per-fold metrics beside them.

    A nested cross-validation's folds (``osteo train --folds``) hold their outer fold out as
    their test split and chose everything on an inner split: the pooled predictions, the
    calibration error after each fold's temperature and the operating points at each fold's
    thresholds chose nothing. Folds made before (the outer fold their validation split) chose
    their checkpoint, temperature and thresholds on the images they are pooled from."""
    members = cv.folds()
    split = "test" if all(f.read_predictions("test")[0].size for f in members) else "val"
    folds = [load_run(f, split, 0, seed) for f in members]
    first = folds[0]
    y = np.concatenate([f.y for f in folds])
    probs = np.concatenate([f.probs for f in folds])
    rows = [row for f in folds for row in f.rows]
    if len({row["path"] for row in rows}) != len(rows):
        raise OsteoError(f"the folds of {cv} share held-out images; it is not a cross-validation of one split")
    groups = [f.groups or [row["path"] for row in f.rows] for f in folds]  # a fold without groups: its images
    groups = [g for part in groups for g in part] if any(f.groups for f in folds) else None
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed, groups=groups)
    metrics["best_epoch"] = None
    train_labels = [r["label"] for f in cv.folds() for r in f.read_split() if r["split"] == "train"]
    majority = majority_baseline(y, majority_label(train_labels))
    # one curve per epoch: the mean over the folds that trained it (early stopping ends a fold's phase
    # at its own epoch; a phase's epochs keep their numbers, so rows of one number are of one phase)
    by_epoch: dict[int, list[dict]] = {}
    for f in folds:
        for row in f.history:
            by_epoch.setdefault(int(float(row["epoch"])), []).append(row)
    history = [{k: _mean_cell([row.get(k) for row in rows]) for k in rows[0]} for _, rows in sorted(by_epoch.items())]
    split_id = hashlib.sha256("".join(f.split_id for f in folds).encode()).hexdigest()[:12]
    fold_metrics = [{"fold": i, "n": f.metrics["n"], "n_train": f.env.get("n_train"),
                     "best_epoch": f.metrics.get("best_epoch"), **{k: f.metrics[k] for k in HEADLINE}}
                    for i, f in enumerate(folds, start=1)]
    env = _folds_env([f.env for f in folds])
    calibrated = (np.concatenate([f.calibrated for f in folds])
                  if all(f.calibrated is not None for f in folds) else None)  # each fold's own temperature
    metrics["ece_calibrated"] = expected_calibration_error(y, calibrated) if calibrated is not None else None
    recipe = {**first.recipe, **({"differs_by_fold": differs} if (differs := _differs_by_fold(folds)) else {})}
    with contextlib.suppress(OsteoError):  # a study's search: what it chose for each fold (equal values too)
        if isinstance(searched := cv.read().get("searched"), dict):
            recipe["searched_by_fold"] = searched
    return Run(cv.path, recipe, env, metrics, history, y, probs, rows, majority, split_id, first.audit,
               evaluated_on="out-of-fold", fold_metrics=fold_metrics, calibrated=calibrated, chose=CHOSE[split],
               points=_pooled_points(members, folds, CHOSE[split], n_boot, seed, groups),
               images_id=images_id(rows, {p: h for f in members for p, h in f.content_sha256().items()}),
               val_balanced_accuracy=float(np.mean([f.val_balanced_accuracy for f in folds])), groups=groups)


def _differs_by_fold(folds: list[Run]) -> dict[str, list]:
    """The recipe settings the folds trained with that are not all the same (a study's search
    chose each fold's learning rate on its own inner split), each with its value per fold; the
    fold's own number and split aside."""
    each = [dotted(f.recipe) for f in folds]
    keys = dict.fromkeys(k for e in each for k in e)
    return {k: [e.get(k) for e in each] for k in keys
            if k not in ("data.fold",) and len({repr(e.get(k)) for e in each}) > 1}


def _pooled_points(members: list[RunDir], folds: list[Run], chose: str, n_boot: int, seed: int,
                   groups: list[str] | None = None) -> list[dict]:
    """Each operating point over the pooled out-of-fold images, every image decided at its own
    fold's threshold (on its fold's calibrated probabilities); a point some fold lacks is left out."""
    if any(fold.calibrated is None for fold in folds):
        return []
    chosen = [chosen_points(run.read_calibration()) for run in members]
    y = np.concatenate([f.y for f in folds])
    out = []
    for parts in shared_points(chosen, f"the folds of {members[0].path.parent}"):
        called = np.concatenate([positive_score(fold.calibrated, p["positive"]) >= p["threshold"]
                                 for p, fold in zip(parts, folds)])
        out.append({"name": parts[0]["name"], "target": point_goal(parts[0]), "threshold": None,
                    "evaluated_on": "out-of-fold", "chose": chose,
                    **decision_metrics(y, called, parts[0]["positive"], n_boot, seed, groups)})
    return out


def _mean_cell(values: list) -> float | str:
    nums = [float(v) for v in values if v not in (None, "")]
    return float(np.mean(nums)) if nums else ""


def _folds_env(envs: list[dict]) -> dict:
    """A cross-validation's environment, for its pooled row and its ensemble's rows on other folders:
    the first fold's, with the training time of all its folds and the images each fold trained on
    (their mean: each fold trains on its own images, not the first fold's count)."""
    seconds = [e.get("train_seconds") for e in envs]
    trained = [e.get("n_train") for e in envs]
    return {**envs[0], "train_seconds": round(sum(seconds), 2) if all(isinstance(v, int | float) for v in seconds)
            else None, "n_train": round(float(np.mean(trained))) if all(isinstance(n, int) for n in trained) else None}


# what the test split chose, for a run calibrated again for another goal (calibration.json's earlier_goals)
RECHOSEN = ", but the goal was set again after osteo calibrate had shown these figures: optimistic"


def load_external(run_dir, external: Path, n_boot: int = 1000, seed: int = 0) -> Run:
    """A run scored on another folder (``osteo eval RUN --data FOLDER``) as its own row; a
    cross-validation's row is its fold models' ensemble (:class:`osteo.predict.Ensemble`), with
    its first fold's recipe and its folds' environment (:func:`_folds_env`)."""
    ensemble = CvDir(run_dir).is_cv()
    run = CvDir(run_dir).fold(1) if ensemble else RunDir(run_dir)
    if ensemble:
        _check_members_calibrations(CvDir(run_dir), external)
    y, probs, rows = RunDir(external).read_predictions("external")
    if not len(y):
        raise OsteoError(f"{external} holds no external predictions; run osteo eval {run_dir} --data FOLDER again")
    groups = external_groups(RunDir(external), rows)
    metrics = compute_metrics(y, probs, n_boot=n_boot, seed=seed, groups=groups,
                              probabilities="calibrated" if ensemble else "uncalibrated")
    metrics["best_epoch"] = None if ensemble else run.read_metrics().get("best_epoch")
    if ensemble:  # its probabilities are its members' calibrated ones: no temperature of its own
        temperature, calibrated = None, probs
        metrics["ece_calibrated"] = expected_calibration_error(y, probs)
    else:
        temperature, calibrated = _calibrated(run, y, probs, metrics)
    majority = majority_baseline(y, majority_label(r["label"] for r in rows))
    split_id = hashlib.sha256("\n".join(sorted(r["path"] for r in rows)).encode()).hexdigest()[:12]
    audit = RunDir(external).read_audit()
    record = RunDir(external).read_metrics()
    where = external_label(external.name, record)
    # a run's points at the thresholds it has now; an ensemble's are its members' as measured
    calibration = run.read_calibration()
    recorded = record.get("operating_points", []) if ensemble else external_points(record, calibration)[0]
    goals = {p.get("name"): point_goal(p) for p in calibration.get("operating_points", [])}  # older records lack it
    points = [{**p, "target": p.get("target") or ("" if ensemble else goals.get(p.get("name"), "")),
               "evaluated_on": where, "chose": CHOSE["external"]} for p in recorded]
    env = _folds_env([f.read_env() for f in CvDir(run_dir).folds()]) if ensemble else run.read_env()
    return Run(external, run.read_recipe().to_dict(), env, metrics, [], y, probs, rows, majority,
               split_id, audit, evaluated_on=where, calibrated=calibrated, temperature=temperature,
               chose=CHOSE["external"], points=points, images_id=images_id(rows, RunDir(external).content_sha256()),
               val_balanced_accuracy=float(np.mean([_val_ba(f) for f in CvDir(run_dir).folds()])) if ensemble
               else _val_ba(run), groups=groups, external_record=record)


def _check_members_calibrations(cv: CvDir, external: Path) -> None:
    """An error unless ``external`` was scored by ``cv``'s folds at the calibrations they have now:
    an ensemble's probabilities are its members' calibrated ones and its thresholds their mean,
    so a fold calibrated again since makes every one of its numbers stale."""
    record = RunDir(external).read_metrics()
    then = record.get("member_calibrations")
    now = {f.name: calibration_digest(f.read_calibration()) for f in cv.folds()}
    if then != now:
        why = ("records no calibrations of its folds (scored by an older osteo)" if not isinstance(then, dict) else
               f"was scored before {', '.join(k for k in now if then.get(k) != now[k])} was calibrated again")
        raise OsteoError(f"{external} {why}; score it again: {rescore_command(cv.path, external, record)}")


def _of_split(every: tuple, split: str) -> tuple:
    """(labels, probabilities, rows) of one split, from ``read_predictions()``'s of them all."""
    y, probs, rows = every
    keep = np.array([r["split"] == split for r in rows], dtype=bool)
    return y[keep], probs[keep], [r for r in rows if r["split"] == split]


def _val_ba(run: RunDir, every: tuple | None = None) -> float:
    """Balanced accuracy on the run's validation split (NaN without one); ``every``: the run's
    predictions of all splits, where already read."""
    y, probs, _ = _of_split(every or run.read_predictions(), "val")
    return float(compute_metrics(y, probs, n_boot=0)["balanced_accuracy"]) if len(y) else float("nan")


def images_id(rows: list[dict], contents: dict[str, str]) -> str:
    """A short hash of the images ``rows`` scored: each one's path, content (sha256, where the
    audit's manifest records it) and label. Two runs of the same file names in folders of other
    images (or of other labels: ``data.conflicts``) get other ids, so they are not paired."""
    keys = sorted(f"{r['path']}\t{contents.get(r['path'], '')}\t{r['label']}" for r in rows)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:12]


def _calibrated(run: RunDir, y: np.ndarray, probs: np.ndarray, metrics: dict):
    """(the run's temperature, ``probs`` scaled by it); sets ``metrics["ece_calibrated"]``.
    (None, None) for a run not calibrated, or probabilities that are not finite."""
    temperature = run.read_calibration().get("temperature")
    calibrated = apply_temperature(probs, temperature) if temperature and np.isfinite(probs).all() else None
    metrics["ece_calibrated"] = expected_calibration_error(y, calibrated) if calibrated is not None else None
    return temperature, calibrated


def oracle_runs(runs: list[Run], n_boot: int = 1000, seed: int = 0) -> list[Run]:
    """The phantom's ceiling for each split the runs were scored on, where the data has latents.csv.

    The oracle is fitted on each run's own training split and scored on the images its row
    is on (its test or validation split; for a cross-validation, the same out-of-fold images).
    """
    from osteo.oracle import oracle_probs, read_latents

    out, seen = [], set()
    for r in runs:
        if r.evaluated_on.startswith("external"):  # its training data is another folder's
            continue
        data_dir = r.data_dir
        if (data_dir, r.split_id) in seen:
            continue
        seen.add((data_dir, r.split_id))
        latents = read_latents(data_dir) if data_dir else None
        if latents is None:
            continue
        parts = [(RunDir(r.path), r.rows)]
        if r.folds:  # the rows are each fold's held-out ones in turn
            chunks = np.split(np.arange(len(r.rows)), np.cumsum([f["n"] for f in r.fold_metrics])[:-1])
            parts = [(f, [r.rows[i] for i in idx]) for f, idx in zip(CvDir(r.path).folds(), chunks)]
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
            metrics = {**compute_metrics(r.y, probs, n_boot=n_boot, seed=seed, groups=r.groups), "best_epoch": None}
            recipe = {"model": {"backbone": "oracle"}, "data": r.recipe.get("data", {})}
            # fitted on the training images only: the images it is scored on chose nothing for it
            out.append(Run(r.path / "oracle", recipe, {}, metrics, [], r.y, probs, r.rows, r.majority, r.split_id,
                           r.audit, r.evaluated_on, folds if r.folds else [], chose="nothing",
                           images_id=r.images_id))
    return out
