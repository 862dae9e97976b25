"""Leakage-safe splits: stratified, seeded, group-aware; train/val(/test) or k folds.

A *group* is a set of images that must stay on one side of the split:

- members of a duplicate group from the audit (exact or near copies);
- images of one patient: a DICOM file's PatientID (the manifest's ``patient_id``), a
  patient id from ``group_regex`` (group 1 of a regular expression searched in the
  file name) or from a ``groups.csv`` (``path,group``).

``group_by`` chooses where patients come from: ``auto`` (default) uses every source
there is (the PatientIDs of the DICOM files that have one, the regex and the CSV when
given), ``dicom``, ``regex`` and ``csv`` that source alone (an error when it is missing
or when another is given too), ``none`` no patients (duplicates are still grouped).

Groups are merged transitively. Each group is stratified under the majority label
of its members. Duplicate groups whose members carry different labels
(*conflicts*) follow ``conflicts``: ``exclude`` (default: their label is unknown),
``majority`` (relabel every member with the group's most common label; ties go to
the earlier class), or ``keep``.

With ``folds=K`` the groups are dealt into K folds and fold ``fold`` is the
validation split. With ``folds=K`` and ``inner_val > 0`` the split is nested
cross-validation's inner one: fold ``fold`` becomes the *test* split and ``inner_val``
of the remaining images is the validation split. The folds are the same as without a test fraction, so the
inner split's train and val hold only the outer fold's training images: a
hyper-parameter chosen on them never saw the outer fold's validation images
(``osteo study --search`` trains its trials on this split).

The split does not depend on the order of the input rows: groups are sorted, then
shuffled by a generator seeded with ``seed``. ``split.csv`` has the columns
``path, label, split, group`` and is sorted by path, so the same data and seed give
the same bytes.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter

import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.files import read_csv, write_csv

log = logging.getLogger("osteo")

SPLIT_COLUMNS = ("path", "label", "split", "group")
# nested cross-validation (osteo train --folds, osteo study): this fraction of the outer
# training folds validates, so the outer fold, whose predictions are pooled, chooses nothing
INNER_VAL = 0.25
# A held-out test split needs this many images of every class: with fewer, one image moves a
# class's recall (and an operating point's sensitivity) by more than 0.12 and its 95% interval
# spans ~0.4, too coarse to report; 15% of the split then needs ~54 images of the smallest class.
MIN_TEST_PER_CLASS = 8
CONFLICT_POLICIES = ("exclude", "majority", "keep")
GROUP_BY = ("auto", "dicom", "regex", "csv", "none")


def majority_label(labels) -> str:
    """The most common label; a tie goes to the earlier (milder) class. The one tie-break rule."""
    counts = Counter(labels)
    return max(CLASSES, key=lambda c: (counts[c], -CLASSES.index(c)))


def _patient_sources(rows: list[dict], group_by: str, group_regex: str | None,
                     groups: dict[str, str] | None) -> tuple[bool, str | None, dict[str, str] | None]:
    """(use the DICOM PatientIDs, the regex, the CSV's groups) that ``group_by`` asks for."""
    if group_by not in GROUP_BY:
        raise OsteoError(f"unknown --group-by {group_by!r}; choose one of: {', '.join(GROUP_BY)}")
    given = {"regex": bool(group_regex), "csv": bool(groups)}
    flags = {"regex": "--group-regex PATTERN", "csv": "--groups FILE"}
    if group_by in given and not given[group_by]:
        raise OsteoError(f"--group-by {group_by} needs {flags[group_by]}; or use --group-by auto")
    extra = [flags[k] for k, v in given.items() if v and group_by not in ("auto", k)]
    if extra:
        raise OsteoError(f"--group-by {group_by} does not use {' or '.join(extra)}; drop it, or use --group-by auto "
                         "to group by every source")
    has_ids = any(r.get("patient_id") for r in rows)
    if group_by == "dicom" and not has_ids:
        raise OsteoError("--group-by dicom: no DICOM file has a PatientID; group patients with --group-by regex or "
                         "csv, or use --group-by none")
    return group_by in ("auto", "dicom") and has_ids, group_regex or None, groups or None


def assign_groups(rows: list[dict], group_regex: str | None = None,
                  groups: dict[str, str] | None = None, group_by: str = "auto") -> dict[str, str]:
    """path -> group key, merging duplicate groups and patients transitively."""
    dicom, group_regex, groups = _patient_sources(rows, group_by, group_regex, groups)
    try:
        pattern = re.compile(group_regex) if group_regex else None
    except re.error as e:
        raise OsteoError(f"invalid --group-regex {group_regex!r}: {e}; use group 1 for the patient id") from None
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    matched = listed = 0
    for r in rows:
        node = "file:" + r["path"]
        find(node)
        if r.get("dup_group"):
            union(node, "dup:" + r["dup_group"])
        if pattern is not None:
            m = pattern.search(os.path.basename(r["path"]))
            patient = (m.group(1) if m.groups() else m.group(0)) if m else None
            if patient:  # an empty (or unmatched) group 1 names no patient: never one of every such file
                matched += 1
                union(node, "patient:" + patient)
        if groups and r["path"] in groups:
            listed += 1
            union(node, "group:" + str(groups[r["path"]]))
        if dicom and r.get("patient_id"):
            union(node, "dicom:" + r["patient_id"])
    # a source that names no file's patient would leave every image a patient of its own, silently
    example = os.path.basename(rows[0]["path"]) if rows else ""
    for given, hit, what, fix in ((pattern is not None, matched, f"--group-regex {group_regex!r} matches",
                                   f"it is searched in each file's name, e.g. {example!r}; group 1 is the patient"),
                                  (bool(groups), listed, "the --groups CSV names",
                                   f"its paths are relative to the data folder, e.g. {rows[0]['path'] if rows else ''!r}")):
        if given and rows and hit == 0:
            raise OsteoError(f"{what} none of the {len(rows)} files, so no patient would be grouped; {fix}")
        if given and hit < len(rows):
            log.warning("%s %d of %d files; the other %d are each a patient of their own", what, hit, len(rows),
                        len(rows) - hit)
    # name each group after its smallest key, with file groups named by their path
    return {r["path"]: find("file:" + r["path"]).removeprefix("file:") for r in rows}


def _resolve_conflicts(rows: list[dict], policy: str) -> tuple[list[dict], list[str]]:
    if policy not in CONFLICT_POLICIES:
        raise OsteoError(f"unknown conflict policy {policy!r}; choose one of: {', '.join(CONFLICT_POLICIES)}")
    by_dup: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("dup_group"):
            by_dup.setdefault(r["dup_group"], []).append(r)
    conflicted = {g: m for g, m in by_dup.items() if len({r["label"] for r in m}) > 1}
    if not conflicted or policy == "keep":
        return rows, []
    if policy == "exclude":
        bad = {r["path"] for m in conflicted.values() for r in m}
        return [r for r in rows if r["path"] not in bad], sorted(bad)
    relabel = {}
    for m in conflicted.values():
        label = majority_label(r["label"] for r in m)
        relabel.update({r["path"]: label for r in m})
    return [{**r, "label": relabel.get(r["path"], r["label"])} for r in rows], []


def split_rows(
    rows: list[dict],
    val_fraction: float = 0.3,
    test_fraction: float = 0.0,
    folds: int = 0,
    fold: int = 0,
    seed: int = 0,
    group_regex: str | None = None,
    groups: dict[str, str] | None = None,
    conflicts: str = "exclude",
    inner_val: float = 0.0,
    group_by: str = "auto",
) -> tuple[list[dict], list[str]]:
    """Split manifest rows; return (split rows sorted by path, excluded paths)."""
    if not (0 < val_fraction < 1) or not (0 <= test_fraction < 1) or val_fraction + test_fraction >= 1:
        raise OsteoError(f"split fractions val={val_fraction} test={test_fraction} must be in (0, 1) and "
                         "sum below 1; e.g. --val 0.3 --test 0")
    if folds and not (folds >= 2 and 0 <= fold < folds):
        raise OsteoError(f"fold {fold} of {folds} folds is not valid; use --folds K (K >= 2) and 0 <= --fold < K")
    rows = sorted((r for r in rows if r.get("status", "ok") == "ok"), key=lambda r: r["path"])
    rows, excluded = _resolve_conflicts(rows, conflicts)
    group_of = assign_groups(rows, group_regex, groups, group_by)
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(group_of[r["path"]], []).append(r)
    rng = np.random.default_rng(seed)
    side: dict[str, str] = {}
    for c in CLASSES:
        keys = sorted(g for g, m in members.items() if majority_label(r["label"] for r in m) == c)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        if folds:
            load = [0] * folds
            rest = []
            for g in keys:
                k = int(np.argmin(load))
                load[k] += len(members[g])
                if k == fold:
                    side[g] = "test" if inner_val else "val"
                else:
                    side[g] = "train"
                    rest.append(g)
            if inner_val:  # nested: validation from the outer training groups, in their shuffled order
                _fill(rest, members, [("val", inner_val)], side)
            continue
        _fill(keys, members, [("test", test_fraction), ("val", val_fraction)], side)
    out = [{"path": r["path"], "label": r["label"], "split": side[group_of[r["path"]]],
            "group": group_of[r["path"]]} for r in rows]
    return out, excluded


def _fill(keys: list[str], members: dict[str, list[dict]], fractions: list[tuple[str, float]],
          side: dict[str, str]) -> None:
    """Deal groups ``keys`` (in order) to the named splits up to each one's fraction of their
    images, a group going where it brings the split closer to its target; the rest train."""
    n = sum(len(members[g]) for g in keys)
    targets = [(name, round(fraction * n)) for name, fraction in fractions]
    filled = dict.fromkeys((name for name, _ in fractions), 0)
    for g in keys:
        size = len(members[g])
        side[g] = "train"
        for name, target in targets:
            have = filled[name]
            if have < target and (have + size - target) <= (target - have):
                side[g] = name
                filled[name] += size
                break


def check_split(split: list[dict], min_train: int = 1, min_val: int = 1, min_test: int = 0,
                val_option: str = "--val") -> None:
    """Every class needs images on both sides, or the metrics mean nothing; and ``min_test``
    test images where a test split is held out (:data:`MIN_TEST_PER_CLASS`). ``val_option``:
    how the caller's user sets the validation share, for the message."""
    counts = Counter((r["split"], r["label"]) for r in split)
    empty = [c for c in CLASSES if not any(counts[(s, c)] for s in ("train", "val", "test"))]
    if empty:
        raise OsteoError(f"no images of class {' and '.join(empty)} to split: every class "
                         f"({', '.join(CLASSES)}) needs images; add them to the {' and '.join(empty)} folder"
                         f"{'s' if len(empty) > 1 else ''} (the audit lists the files it could not read or left out)")
    for c in CLASSES:
        tr, va = counts[("train", c)], counts[("val", c)]
        if tr < min_train or va < min_val:
            way = "a larger" if va < min_val else "a smaller"
            raise OsteoError(
                f"class {c} has {tr} training and {va} validation images after the split; it needs at "
                f"least {min_train} and {min_val}: add images to the {c} folder, or give validation {way} share "
                f"({val_option}){_whole_groups(split, c)}"
            )
    c = min(CLASSES, key=lambda c: counts[("test", c)])  # the smallest class says it best
    if counts[("test", c)] < min_test:
        # an error, not a fallback to reporting on validation: that is the optimistic number the
        # test split exists to avoid, and a warning would scroll away while the model card keeps it
        raise OsteoError(
            f"too few images for a held-out test split: class {c} gets {counts[('test', c)]} test image(s) "
            f"({len(split)} images in all), fewer than {min_test}; cross-validate instead (--folds 5), or report "
            "on validation, optimistically, with --set data.test=0 (make: SET=data.test=0)"
        )


def _whole_groups(split: list[dict], c: str) -> str:
    """Where a class's images form fewer groups than images (patients, duplicates), the reason a
    share cannot help: each group goes whole to one side. "" when every image is its own group."""
    images = [r for r in split if r["label"] == c]
    groups = len({r["group"] for r in images})
    if groups >= len(images):
        return ""
    return (f"; its {len(images)} images form {groups} group(s) of one patient or of duplicates, each kept whole "
            "on one side: check --group-regex or --groups if that is not what they are")


def write_split(path: str | os.PathLike, split: list[dict]) -> None:
    write_csv(path, split, SPLIT_COLUMNS)


def read_split(path: str | os.PathLike) -> list[dict]:
    rows = read_csv(path, "a run's split cannot be repaired: train a new run")
    if rows and tuple(rows[0]) != SPLIT_COLUMNS:
        raise OsteoError(f"{path} is not a split.csv (columns must be {', '.join(SPLIT_COLUMNS)})")
    return rows


def read_groups_csv(path: str | os.PathLike) -> dict[str, str]:
    """``path,group`` rows -> {path: group}."""
    fix = "give a CSV file with path,group columns (--groups), a row per file"
    rows = read_csv(path, fix)
    if not rows:  # an empty file would group no one, as if --groups had not been given, silently
        raise OsteoError(f"{path} has no rows; {fix}")
    if not {"path", "group"} <= set(rows[0]):
        raise OsteoError(f"{path} needs the columns path,group (it has {', '.join(map(repr, rows[0]))}); {fix}")
    groups: dict[str, str] = {}
    for r in rows:
        path_, group = r["path"] or "", (r["group"] or "").strip()
        if not path_:
            raise OsteoError(f"{path} has a row with no path (group {group!r}); give each row a file's path")
        if not group:  # a blank group would make one patient of every file left blank
            raise OsteoError(f"{path} gives {path_} no group; give each file's patient, or leave its row out")
        if groups.setdefault(path_, group) != group:
            raise OsteoError(f"{path} gives {path_} two groups ({groups[path_]!r} and {group!r}); give each "
                             "file one")
    return groups
