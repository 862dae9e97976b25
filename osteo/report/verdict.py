"""The report's verdict, in words, from the rows of ``comparison.csv``: for each set of images
the runs were measured on, the best model and its balanced accuracy with its interval, each
other model's difference from it with a paired test (Holm-adjusted for the comparisons made
there), the majority-class baseline and, on the phantom, the oracle's ceiling.

Written from the CSV's rows, so the page, ``verdict.txt`` and ``osteo report``'s summary say
what ``comparison.csv`` holds, and nothing else.
"""

from __future__ import annotations

import math
import os

from osteo.evaluate import CHOSE, which_chose
from osteo.report.tables import to_float

ALPHA = 0.05  # the family-wise error rate of each set of comparisons (Holm)


def verdict(rows: list[dict]) -> list[str]:
    """One paragraph per set of images the runs were measured on (the oracle rows are ceilings)."""
    runs = [r for r in rows if r["model"] != "oracle"]
    sets: dict[tuple[str, str], list[dict]] = {}
    for r in runs:  # the groups osteo.report.tables.compare paired within: the same images
        sets.setdefault((r["evaluated_on"], r["chose"], r.get("images_id", "")), []).append(r)
    paragraphs = [_paragraph(group, rows) for group in sets.values()]
    if len(sets) > 1:
        paragraphs.append("Runs measured on different images (other splits or folders) are compared only with "
                          "the runs measured on the same images.")
    return paragraphs


def _paragraph(group: list[dict], rows: list[dict]) -> str:
    best = next(r for r in group if r["mcnemar_vs"] == "(best)")
    images = best["evaluated_on"]
    if images.startswith("external: "):
        images = f"the external folder {images.removeprefix('external: ')}"
    elif best.get("data_dir"):  # which data's split: two datasets' test splits are two sets of images
        images = f"{images} of {os.path.basename(os.path.normpath(best['data_dir']))}"
    where = f"{images} (n={best['n']}, {which_chose(best['chose'])})"
    val = to_float(best.get("val_balanced_accuracy"))
    if len(group) == 1:
        out = [f"On {where}: {_name(best)}, the only model measured on these images, is best, with balanced "
               f"accuracy {_ci(best)}."]
    elif best["evaluated_on"] == "out-of-fold" and best.get("best_chosen_by") == "validation" and \
            best["chose"] == CHOSE["test"]:
        # nested: each fold's inner validation images are held out by another fold, so they are among these
        # images, which chose nothing for any one model but had a part in which model is called best
        out = [f"On {where}: {_name(best)}, the best on its folds' inner validation images (balanced accuracy "
               f"{val:.3f} there), scores {_ci(best)}; each of those images is also held out by another fold, so "
               "these images, which chose nothing for any one model, had a part in choosing which model is best: "
               "mildly optimistic for it."]
    elif best["evaluated_on"] != "validation" and best.get("best_chosen_by") == "validation":
        # chosen where it chose nothing else: the highest of several test scores would be optimistic
        out = [f"On {where}: {_name(best)}, the best on its validation images (balanced accuracy {val:.3f} "
               f"there), scores {_ci(best)}."]
    elif best["evaluated_on"] != "validation":  # a run without validation predictions: these images chose
        out = [f"On {where}: {_name(best)} is best, with balanced accuracy {_ci(best)}, chosen on these images "
               "(not every run has validation predictions to choose on): an optimistic choice."]
    else:
        out = [f"On {where}: {_name(best)} is best, with balanced accuracy {_ci(best)}."]
    if best.get("settings_by_fold"):
        if best.get("settings_chosen_by") == "search":  # chosen on each fold's inner split, not on these images
            out.append(f"Its folds' {best['settings_by_fold']} (fold 1, 2, ...) were each chosen by a search on "
                       "that fold's inner split.")
        else:  # the folds' recipes differ and nothing records why: no claim of what chose them
            out.append(f"Its folds trained with different {best['settings_by_fold']} (fold 1, 2, ...), and no "
                       "search is on record as having chosen them.")
    others = [r for r in group if r is not best]  # on the same images: each tested against the best
    out += [_difference(r, best, len(others)) for r in others]
    base = to_float(best["majority_balanced_accuracy"])
    lo = to_float(best["balanced_accuracy_lo"])
    if math.isnan(lo):  # no bootstrap (--bootstrap 0): the point estimate, and that it is no test
        above = to_float(best["balanced_accuracy"]) > base
        judged = (("the best model scores above it" if above else "the best model does not score above it: it has "
                   "not learned the task") + "; no interval was computed (--bootstrap 0), so that is not a test.")
    else:
        judged = ("the best model's interval lies above it." if lo > base else
                  "the best model's interval does not clear it: it has not clearly learned the task.")
    # an external folder's baseline is its own majority class (osteo.predict.evaluate_folder), a run's the training one
    whose = "that folder's majority" if best["evaluated_on"].startswith("external: ") else "the training majority"
    out.append(f"Always answering {best['majority_class']} ({whose}) scores {base:.3f} on the same "
               f"images; {judged}")
    # the oracle of these very images: two folders' splits of files of the same names share a split_id
    oracle = next((o for o in rows if o["model"] == "oracle" and o.get("images_id", "") == best.get("images_id", "")
                   and o["split_id"] == best["split_id"] and o["evaluated_on"] == best["evaluated_on"]), None)
    if oracle is not None:
        out.append(f"The phantom's oracle (a classifier of the images' true latent variables, fitted on the same "
                   f"training images) scores {_ci(oracle)}: the ceiling.")
    return " ".join(out)


def _difference(r: dict, best: dict, m: int) -> str:
    """One run against the best: by how much, the paired tests, and what they say.

    The ranking is by balanced accuracy; McNemar's test compares which images each model gets
    right, that is accuracy. So a difference is called significant only where the tests are
    (McNemar's, and the folds' corrected t-test where there is one) and the paired bootstrap
    interval of the balanced accuracy difference excludes 0; a model more accurate than the
    best is said to be."""
    diff = to_float(r["balanced_accuracy_diff"])
    lo, hi = to_float(r["balanced_accuracy_diff_lo"]), to_float(r["balanced_accuracy_diff_hi"])
    # + 0.0: no "-0.000" where the interval touches zero. The best was chosen on validation: on
    # these images another run may score above it
    if diff > 0:
        interval = "" if math.isnan(lo) else f" (95% interval {lo + 0.0:.3f} to {hi + 0.0:.3f})"
        standing = f"{diff:.3f} above the best{interval}"
    else:
        interval = "" if math.isnan(lo) else f" (95% interval {-hi + 0.0:.3f} to {-lo + 0.0:.3f})"
        standing = f"{-diff + 0.0:.3f} below the best{interval}"
    comparisons = f"{m} comparison{'s' if m > 1 else ''}"
    counted = f"{r['mcnemar_only_this']} images only it got right, {r['mcnemar_only_best']} only the best"
    if r.get("mcnemar_method", "exact") != "exact":  # images in groups: each group counts once
        counted += f"; clustered: {r['mcnemar_groups']} groups of images, each counted once"
    tests = [f"McNemar p = {_p(r, 'mcnemar_p'):.3g} ({counted}; Holm-adjusted for {comparisons}: "
             f"{_p(r, 'mcnemar_p_holm'):.3g})"]
    adjusted = [_p(r, "mcnemar_p_holm")]
    if _p(r, "fold_ttest_p_holm") is not None:
        tests.append(f"corrected t-test over the {r['folds']} folds p = {_p(r, 'fold_ttest_p'):.3g} (Holm-adjusted: "
                     f"{_p(r, 'fold_ttest_p_holm'):.3g})")
        adjusted.append(_p(r, "fold_ttest_p_holm"))
    covers_zero = not math.isnan(lo) and lo <= 0 <= hi
    if all(p < ALPHA for p in adjusted):
        said = ("a significant difference" if not covers_zero else
                "the tests find a difference, but the balanced-accuracy interval includes 0: not a clear "
                "difference in balanced accuracy")
    elif all(p >= ALPHA for p in adjusted):
        said = "no significant difference"
    else:
        said = ("significant by McNemar on the pooled images but not across the folds: not a clear difference"
                if adjusted[0] < ALPHA else "significant across the folds but not by McNemar on the pooled images: "
                "not a clear difference")
    acc, best_acc = to_float(r.get("accuracy")), to_float(best.get("accuracy"))
    if acc > best_acc:  # NaN compares False: no accuracy, nothing said
        said += (f"; {_name(r)} is the more accurate ({acc:.3f} against {best_acc:.3f}): McNemar's test compares "
                 "accuracy, the ranking balanced accuracy")
    folds = ""
    if r.get("evaluated_on") == "out-of-fold" and r.get("split_id") != best.get("split_id"):
        # the same images, each scored by a fold that did not train on it, but other folds: each
        # model's folds trained on other images and other numbers of them
        folds = (f" Its folds are not the best's ({r.get('folds') or '?'} folds training on {r.get('n_train') or '?'} "
                 f"images each, against {best.get('folds') or '?'} on {best.get('n_train') or '?'}): the two "
                 "cross-validations compare training procedures as much as models.")
    return f"{_name(r)} scores {to_float(r['balanced_accuracy']):.3f}, {standing}; {'; '.join(tests)}: {said}.{folds}"


def _name(r: dict) -> str:
    return f"{r['model']} ({r['run_id']})"


def _ci(r: dict) -> str:
    value, lo, hi = (to_float(r[k]) for k in ("balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi"))
    return f"{value:.3f}" if math.isnan(lo) else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _p(r: dict, key: str) -> float | None:
    value = r.get(key)
    return None if value in (None, "") else float(value)
