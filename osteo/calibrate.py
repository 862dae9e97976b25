"""Calibration and operating points, fitted on a run's validation predictions (no Keras).

Temperature scaling (Guo et al., 2017): one scalar T divides the model's logits, here
recovered as log-probabilities (softmax is invariant to the constant lost that way), and
is fitted by minimising the validation negative log-likelihood. T > 1 softens an
over-confident model; the ranking of the classes, and so accuracy, never changes.

An operating point turns the probabilities into a screening decision for one class or
a group of ordered classes ("osteopenia or worse" = ``osteopenia+``): the threshold on
its probability that reaches the asked sensitivity (or specificity) on validation.

``calibration.json`` in the run directory holds both; predict, eval and export apply it.
"""

from __future__ import annotations

import json

import numpy as np

from osteo.errors import OsteoError
from osteo.recipe import parse_operating_points

EPS = 1e-7


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softened (T > 1) or sharpened (T < 1) as if the logits were divided by T."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(y: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))))


LOG_T_BOUND = 3.0  # the temperature is searched from e^-3 to e^3


def temperature_note(temperature: float, n: int) -> str | None:
    """A sentence where the fitted temperature lies at the end of its search: the validation
    predictions were then close to uninformative (or far too unsure), which a user should
    hear rather than read as calibration; None otherwise."""
    log_t = float(np.log(temperature))
    if abs(log_t) < LOG_T_BOUND - 1e-2:
        return None
    what = ("close to uninformative, so calibration flattens them toward the class shares" if log_t > 0 else
            "far too unsure, so calibration sharpens them as far as it may")
    return (f"the temperature reached the end of its search (T = {temperature:.3g}, e^{log_t:+.0f}): on these {n} "
            f"validation images the model's probabilities are {what}; check that the run learned (its balanced "
            "accuracy) before reading calibrated probabilities")


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of ``y`` (bounded search on log T)."""
    from scipy.optimize import minimize_scalar

    y, probs = np.asarray(y, dtype=int), np.asarray(probs, dtype=np.float64)
    if len(y) == 0 or not np.isfinite(probs).all():
        raise OsteoError("cannot calibrate: the validation predictions are empty or not finite; retrain the run")
    result = minimize_scalar(lambda t: nll(y, apply_temperature(probs, np.exp(t))),
                             bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


# --------------------------------------------------------------------------- operating points


def positive_score(probs: np.ndarray, positive: list[int]) -> np.ndarray:
    return np.asarray(probs)[:, positive].sum(axis=1)


def sens_spec(y: np.ndarray, score: np.ndarray, positive: list[int], threshold: float) -> tuple[float, float]:
    is_pos = np.isin(y, positive)
    called = score >= threshold
    sens = float(called[is_pos].mean()) if is_pos.any() else float("nan")
    spec = float((~called[~is_pos]).mean()) if (~is_pos).any() else float("nan")
    return sens, spec


def choose_threshold(y: np.ndarray, probs: np.ndarray, spec: dict) -> float:
    """The highest threshold reaching the sensitivity asked for (or the lowest reaching the specificity)."""
    y = np.asarray(y, dtype=int)
    score = positive_score(probs, spec["positive"])
    is_pos = np.isin(y, spec["positive"])
    if not is_pos.any() or is_pos.all():
        raise OsteoError(f"cannot choose an operating point for {spec['name']}: the validation split needs "
                         "positive and negative images")
    candidates = np.unique(np.concatenate([score, [0.0, 1.0 + EPS]]))
    if spec["target"] == "sensitivity":
        ok = [t for t in candidates if sens_spec(y, score, spec["positive"], t)[0] >= spec["value"]]
        return float(max(ok))
    ok = [t for t in candidates if sens_spec(y, score, spec["positive"], t)[1] >= spec["value"]]
    return float(min(ok))


# where a cross-validation's ensemble's threshold comes from (osteo.predict.Ensemble): no image set chose it
MEAN_THRESHOLD = "the mean of the folds' thresholds, each chosen on its fold's validation split"


def operating_point_metrics(y: np.ndarray, probs: np.ndarray, point: dict, n_boot: int = 1000,
                            seed: int = 0, groups=None) -> dict:
    """Sensitivity and specificity at a stored operating point, with stratified bootstrap
    intervals (of whole ``groups`` where given), and what the point was chosen for."""
    called = positive_score(probs, point["positive"]) >= point["threshold"]
    chosen_on = point.get("chosen_on", "val")
    return {"name": point["name"], "target": point_goal(point), "threshold": point["threshold"],
            # where the threshold came from: a run's validation split, or (an ensemble) its folds' thresholds
            "threshold_from": "validation" if chosen_on == "val" else chosen_on,
            **decision_metrics(y, called, point["positive"], n_boot, seed, groups)}


def calibration_digest(calibration: dict) -> str:
    """A short digest of what a run's ``calibration.json`` makes of its probabilities (the
    temperature, and each operating point's classes, goal and threshold): an ensemble's
    external validation records its members', and is stale once one of them changes."""
    import hashlib
    import json

    from osteo.evaluate import chosen_points

    points = [[p.get("name"), p.get("positive"), point_goal(p), p["threshold"]] for p in chosen_points(calibration)]
    text = json.dumps([calibration.get("temperature", 1.0), points], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def point_goal(point: dict) -> str:
    """What an operating point's threshold was chosen to reach on validation, as it was asked
    for: ``sensitivity=0.9`` (blank for a point that does not record it)."""
    return f"{point['target']}={point['value']:g}" if "target" in point and "value" in point else ""


def _named_goal(point: dict) -> str:
    """``osteoporosis: sensitivity >= 0.9``, as the model card names a point's goal."""
    goal = f": {point['target']} >= {point['value']}" if "target" in point and "value" in point else ""
    return f"{point.get('name')}{goal}"


DAMAGED_GOALS = "unknown (the calibration replaced was damaged)"


def _earlier_goals(run, points: list[dict]) -> dict:
    """``{"earlier_goals": [...]}``: the goals of the calibrations that ``points`` replace, oldest first,
    each a sorted list of :func:`_named_goal` (:data:`DAMAGED_GOALS` for a file that could not be
    read); {} where there were none. Each osteo calibrate prints the test split's figures, so a goal
    chosen after seeing them was chosen with test in view, and the model card and the report say so."""
    try:
        before = run.read_calibration()
    except OsteoError:  # damaged: replaced, as its error says to; what it held is kept where it can be read
        try:
            raw = json.loads(run.calibration_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = None
        before = {"earlier_goals": raw.get("earlier_goals")} if isinstance(raw, dict) else {}
        before["operating_points"] = [{"name": DAMAGED_GOALS}]
    kept = before.get("earlier_goals") if isinstance(before.get("earlier_goals"), list) else []
    earlier = [[str(g) for g in entry] for entry in kept if isinstance(entry, list) and entry]
    goals = sorted(_named_goal(p) for p in before.get("operating_points", []) if isinstance(p, dict))
    if goals and goals != sorted(_named_goal(p) for p in points):
        earlier.append(goals)
    return {"earlier_goals": earlier} if earlier else {}


def shared_points(members: list[list[dict]], where: str) -> list[list[dict]]:
    """The operating points that every one of ``members`` (each a list of points with a
    threshold) has under one name for one goal (the same classes, target and value): per
    point, each member's. A name the members chose for different goals (a fold calibrated
    again with another target) is left out, with a warning line: pooling or averaging its
    thresholds would report one name for decisions made to different ends."""
    import logging

    by_name = [{p["name"]: p for p in points} for points in members]
    shared = []
    for name in by_name[0] if by_name else []:
        if not all(name in b for b in by_name):
            continue
        parts = [b[name] for b in by_name]
        goals = [(p["positive"], point_goal(p)) for p in parts]
        if len(set(map(repr, goals))) > 1:
            chosen = ", ".join(f"{i} at {point_goal(p) or 'an unrecorded target'}" for i, p in enumerate(parts, 1))
            logging.getLogger("osteo").warning(
                "%s: the operating point %s is left out, as its members chose it for different goals (member %s); "
                "calibrate them alike: osteo calibrate FOLD --operating-point ...", where, name, chosen)
            continue
        shared.append(parts)
    return shared


def decision_metrics(y: np.ndarray, called: np.ndarray, positive: list[int], n_boot: int = 1000,
                     seed: int = 0, groups=None) -> dict:
    """Sensitivity and specificity of screening decisions ``called`` (True: positive) for the classes
    ``positive``, with stratified bootstrap intervals: of images, or of whole ``groups`` (a
    patient's images, duplicates) drawn within positive or negative as most of their images
    are. Decisions made at several thresholds (each fold's own, pooled) are measured the same way."""
    y, called = np.asarray(y, dtype=int), np.asarray(called, dtype=bool)
    is_pos = np.isin(y, positive)
    sens = float(called[is_pos].mean()) if is_pos.any() else float("nan")
    spec = float((~called[~is_pos]).mean()) if (~is_pos).any() else float("nan")
    # without positive (or negative) images a sensitivity (specificity) is undefined: null, and why
    out = {"n": len(y), "sensitivity": sens if np.isfinite(sens) else None,
           "specificity": spec if np.isfinite(spec) else None}
    undefined = [f"{k}: no {kind} images" for k, kind, v in (("sensitivity", "positive", sens),
                                                              ("specificity", "negative", spec)) if np.isnan(v)]
    if undefined:
        out["undefined"] = "; ".join(undefined)
    from osteo.evaluate import cluster_times, clusters

    units = clusters(is_pos.astype(int), groups) if n_boot and len(y) else None
    if units is not None:
        unit, strata = units
        counts = np.zeros((len(strata), 4), dtype=np.int64)  # per cluster: positives called, positives,
        np.add.at(counts, unit, np.stack([called & is_pos, is_pos, ~called & ~is_pos, ~is_pos], axis=1))  # ...
        drawn = cluster_times(strata, n_boot, seed) @ counts  # negatives not called, negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = np.stack([drawn[:, 0] / drawn[:, 1], drawn[:, 2] / drawn[:, 3]], axis=1)
        for i, (k, v) in enumerate((("sensitivity", sens), ("specificity", spec))):
            if np.isfinite(v):
                lo, hi = np.nanpercentile(draws[:, i], [2.5, 97.5])
                out[f"{k}_ci"] = [float(min(lo, v)), float(max(hi, v))]
    elif n_boot and len(y):
        rng = np.random.default_rng(seed)
        pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
        draws = []
        for _ in range(n_boot):
            p = called[rng.choice(pos, len(pos))] if len(pos) else np.array([np.nan])
            n = ~called[rng.choice(neg, len(neg))] if len(neg) else np.array([np.nan])
            draws.append((p.mean(), n.mean()))
        draws = np.array(draws)
        for i, (k, v) in enumerate((("sensitivity", sens), ("specificity", spec))):
            if np.isfinite(v):
                lo, hi = np.percentile(draws[:, i], [2.5, 97.5])
                out[f"{k}_ci"] = [float(min(lo, v)), float(max(hi, v))]
    return out


# --------------------------------------------------------------------------- a run

DEFAULT_POINTS = ("osteoporosis:sensitivity=0.9", "osteopenia+:sensitivity=0.9")


def calibrate_run(run_dir, points: tuple[str, ...] | list[str] = DEFAULT_POINTS, n_boot: int = 1000,
                  seed: int = 0) -> dict:
    """Fit the temperature and the operating points on the run's validation predictions; write
    ``calibration.json`` and return it. The calibration error after scaling, and sensitivity and
    specificity at each point, are reported on validation (where they were chosen: optimistic)
    and, where the run has one, on its test split (which chose nothing). A run whose predictions
    cannot be calibrated (not finite, one class only) gets the reason recorded instead."""
    from osteo.evaluate import CHOSE, SPLIT_NAMES, expected_calibration_error
    from osteo.runs import RunDir

    if n_boot < 0:
        raise OsteoError(f"the number of bootstrap resamples must be 0 or more, got {n_boot}; e.g. --bootstrap 1000")
    run = RunDir(run_dir).check(need=(RunDir.PREDICTIONS,))
    specs = parse_operating_points(points)
    y, probs, val_rows = run.read_predictions("val")
    y_test, p_test, test_rows = run.read_predictions("test")
    # the top level's n, NLL and ECE are validation's, which chose the temperature and thresholds
    out = {"method": "temperature scaling, fitted on the validation predictions (negative log-likelihood)",
           "evaluated_on": SPLIT_NAMES["val"], "chose": CHOSE["val"],
           "n": len(y), "temperature": 1.0, "operating_points": []}
    try:
        out["temperature"] = fit_temperature(y, probs)
    except OsteoError as e:  # a diverged run: left uncalibrated, and said so
        out["error"] = str(e)
    else:
        note = temperature_note(out["temperature"], len(y))
        if note:
            out["temperature_note"] = note
    temperature = out["temperature"]
    calibrated = apply_temperature(probs, temperature)
    if "error" not in out:
        out.update(nll_before=nll(y, probs), nll_after=nll(y, calibrated),
                   ece_before=expected_calibration_error(y, probs),
                   ece_after=expected_calibration_error(y, calibrated))
        if len(y_test) and np.isfinite(p_test).all():  # where the temperature was not fitted
            out["test"] = {"evaluated_on": SPLIT_NAMES["test"], "chose": CHOSE["test"], "n": len(y_test),
                           "ece_before": expected_calibration_error(y_test, p_test),
                           "ece_after": expected_calibration_error(y_test, apply_temperature(p_test, temperature))}
    for spec in specs:
        try:
            point = {**spec, "threshold": choose_threshold(y, calibrated, spec), "chosen_on": "val"}
        except OsteoError as e:  # one class only in validation: no threshold to choose
            out["operating_points"].append({**spec, "error": str(e)})
            continue
        point["val"] = operating_point_metrics(y, calibrated, point, n_boot, seed, run.image_groups(val_rows))
        if len(y_test):
            point["test"] = operating_point_metrics(y_test, apply_temperature(p_test, temperature), point, n_boot,
                                                    seed, run.image_groups(test_rows))
        out["operating_points"].append(point)
    # the goals this calibration replaces, kept: each osteo calibrate prints the test split's figures, so
    # a goal chosen after seeing them was chosen with test in view, and the model card says so
    out.update(_earlier_goals(run, out["operating_points"]))
    run.write_calibration(out)
    _rescore_externals(run, out, n_boot, seed)
    _say_ensembles_stale(run)
    return out


def _say_ensembles_stale(run) -> None:
    """A fold of a cross-validation calibrated again: one warning line where the
    cross-validation was scored on other folders, since those scores were its members' then
    calibrated probabilities and thresholds (the report leaves them out until scored again)."""
    import logging

    from osteo.evaluate import rescore_command
    from osteo.runs import CvDir, RunDir

    cv = CvDir(run.path.parent)
    scored = sorted(p.parent for p in cv.eval_path.glob(f"*/{RunDir.METRICS}")) if cv.is_cv() else []
    if scored:
        again = "; ".join(rescore_command(cv.path, p, RunDir(p).read_metrics()) for p in scored)
        logging.getLogger("osteo").warning(
            "the cross-validation %s was scored on %s with %s's previous calibration: those numbers are stale until "
            "scored again: %s", cv.path, ", ".join(p.name for p in scored), run.path.name, again)


def external_calibration(y: np.ndarray, calibrated: np.ndarray, temperature: float | None, points: list[dict],
                         n_boot: int, seed: int, groups=None) -> dict:
    """An external folder's numbers that depend on the run's calibration (its metrics.json's
    ``calibrated`` and ``operating_points``): the calibration error at ``temperature`` and each
    point's sensitivity and specificity, from the ``calibrated`` probabilities."""
    from osteo.evaluate import expected_calibration_error

    return {"calibrated": {"temperature": temperature, "ece": expected_calibration_error(y, calibrated)},
            "operating_points": [operating_point_metrics(y, calibrated, p, n_boot, seed, groups) for p in points]}


def _rescore_externals(run, calibration: dict, n_boot: int, seed: int) -> None:
    """Each external validation of the run (``RUN/eval/<folder>/``) measured again at this
    calibration, from its stored probabilities: its calibration error and its operating points,
    so none of its numbers stays at a temperature or threshold this calibration replaced.
    One that cannot be read is left as it is, with a warning (the model card and the report
    leave its stale points out)."""
    import logging

    from osteo.evaluate import chosen_points, external_groups
    from osteo.files import sweep_temporaries, temporaries_of, write_json
    from osteo.runs import RunDir

    points = chosen_points(calibration)
    for path in sorted(run.eval_path.glob(f"*/{RunDir.METRICS}")) if run.eval_path.is_dir() else []:
        sweep_temporaries(path.parent, pattern=temporaries_of(path))  # a killed calibrate's, here
        folder = RunDir(path.parent)
        try:
            record = folder.read_metrics()
            y, raw, rows = folder.read_predictions("external")
        except OsteoError as e:
            logging.getLogger("osteo").warning("%s is not measured at the new calibration: %s", path.parent, e)
            continue
        if not len(y) or not np.isfinite(raw).all():
            continue
        t = calibration["temperature"]
        record.update(external_calibration(y, apply_temperature(raw, t), t, points, n_boot, seed,
                                           external_groups(folder, rows)))
        write_json(path, record)
