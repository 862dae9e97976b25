"""Patients from DICOM: the audit counts them, the split never separates one (issue 18)."""

import json
import os

import numpy as np
import pytest

from osteo import CLASSES
from osteo.data.scan import audit, write_audit
from osteo.data.split import split_rows
from osteo.errors import OsteoError

pydicom = pytest.importorskip("pydicom")


def _dicom(path, pixels: np.ndarray, patient: str | None) -> None:
    from osteo.data.phantom import dicom_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dicom_bytes(pixels.astype(np.uint16), **({} if patient is None else {"PatientID": patient})))


# 8 patients per class with 1 to 4 images each, file names that say nothing of the
# patient; P-mixed has two normal images and one osteoporosis; two files have no PatientID
PATIENTS = {f"P{c[:3]}{k}": [c] * (1 + k % 4) for c in CLASSES for k in range(8)}
PATIENTS["P-mixed"] = ["normal", "normal", "osteoporosis"]


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    n = 0
    for patient, labels in [*PATIENTS.items(), (None, ["normal"]), ("", ["osteopenia"])]:
        for label in labels:  # noise: every image distinct, no duplicate groups
            _dicom(root / label / f"img{n:03d}.dcm", rng.integers(0, 4096, (16, 24)), patient)
            n += 1
    return root


def test_the_audit_counts_patients_mixed_labels_and_missing_ids(dicom_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="osteo"):
        result = audit(dicom_dir)
    assert result.duplicate_groups == [] and len(result.ok()) == sum(map(len, PATIENTS.values())) + 2
    info = result.to_json()["patients"]
    per = sorted(len(v) for v in PATIENTS.values())
    assert info["dicom_files"] == len(result.ok()) and info["patients"] == len(PATIENTS)
    assert info["files_without_patient_id"] == 2
    assert info["images_per_patient"] == {"min": per[0], "median": float(np.median(per)), "max": per[-1]}
    (mixed,) = info["mixed_labels"]
    assert mixed["patient_id"] == "P-mixed" and mixed["labels"] == ["normal", "osteoporosis"] and len(mixed["paths"]) == 3
    rows = {r.path: r.patient_id for r in result.ok()}
    assert sorted(rows[p] for p in mixed["paths"]) == ["P-mixed"] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == result.warnings and len(warnings) == 2
    assert warnings[0].startswith("2 DICOM file(s) have no PatientID")
    assert warnings[1].startswith("1 patient(s) have images under different classes (P-mixed: normal, osteoporosis)")
    write_audit(result, tmp_path)
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    assert manifest[0].endswith(",patient_id") and any(line.endswith(",P-mixed") for line in manifest)
    from rich.console import Console

    from osteo.cli import print_audit

    console = Console(record=True, width=300)
    print_audit(result, console)  # the audit's screen says who the patients are, as audit.json does
    assert (f"  patients: {len(PATIENTS)} by DICOM PatientID ({per[0]}-{per[-1]} images each): the split keeps each "
            "patient's images on one side") in console.export_text()


def test_a_folder_without_dicom_has_no_patient_statistics_and_no_nan(tmp_path):
    from PIL import Image

    for c in CLASSES:
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 9 * len(c), np.uint8)).save(tmp_path / "d" / c / "a.png")
    result = audit(tmp_path / "d")
    write_audit(result, tmp_path / "out")

    def refuse(constant):
        raise AssertionError(f"{constant} in audit.json")

    info = json.loads((tmp_path / "out" / "audit.json").read_text(), parse_constant=refuse)
    assert info["patients"] == {"dicom_files": 0, "patients": 0, "files_without_patient_id": 0,
                                "images_per_patient": None, "images_per_patient_reason": "no DICOM files",
                                "mixed_labels": []}


@pytest.mark.parametrize("options", [
    {"val_fraction": 0.3}, {"val_fraction": 0.2, "test_fraction": 0.2},
    *({"folds": 4, "fold": k} for k in range(4)),
    *({"folds": 3, "fold": k, "inner_val": 0.25} for k in range(3)),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_no_patient_is_on_two_sides_of_any_split(dicom_dir, options):
    rows = audit(dicom_dir).manifest_rows()
    patient_of = {r["path"]: r["patient_id"] for r in rows}
    for seed in range(3):
        split, excluded = split_rows(rows, seed=seed, **options)
        assert excluded == [] and len(split) == len(rows)
        sides: dict[str, set[str]] = {}
        for r in split:
            if patient_of[r["path"]]:
                sides.setdefault(patient_of[r["path"]], set()).add(r["split"])
        assert set(sides) == set(PATIENTS)
        assert all(len(s) == 1 for s in sides.values()), {p: s for p, s in sides.items() if len(s) > 1}
        assert len({r["split"] for r in split}) == (3 if options.get("test_fraction") or options.get("inner_val") else 2)
    # the folds hold every image once
    if "folds" in options and not options.get("inner_val"):
        held = [r["path"] for k in range(options["folds"])
                for r in split_rows(rows, seed=0, folds=options["folds"], fold=k)[0] if r["split"] == "val"]
        assert sorted(held) == sorted(r["path"] for r in rows)


def test_group_by_chooses_the_source_and_says_what_is_missing(dicom_dir):
    rows = audit(dicom_dir).manifest_rows()
    by_patient = {r["path"]: r["patient_id"] for r in rows}
    mixed = [p for p, pid in by_patient.items() if pid == "P-mixed"]
    for group_by in ("auto", "dicom"):
        split, _ = split_rows(rows, seed=0, group_by=group_by)
        groups = {r["path"]: r["group"] for r in split}
        assert len({groups[p] for p in mixed}) == 1 and groups[mixed[0]] == "dicom:P-mixed"
    split, _ = split_rows(rows, seed=0, group_by="none")
    assert len({r["group"] for r in split}) == len(rows)  # every image its own group
    png_rows = [{**r, "patient_id": ""} for r in rows]
    cases = [
        (dict(rows=png_rows, group_by="dicom"), "--group-by dicom: no DICOM file has a PatientID"),
        (dict(rows=rows, group_by="regex"), "--group-by regex needs --group-regex PATTERN"),
        (dict(rows=rows, group_by="csv"), "--group-by csv needs --groups FILE"),
        (dict(rows=rows, group_by="dicom", group_regex=r"(\d+)"), "--group-by dicom does not use --group-regex"),
        (dict(rows=rows, group_by="bogus"), "unknown --group-by 'bogus'; choose one of: auto, dicom, regex, csv, none"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OsteoError) as e:
            split_rows(kwargs.pop("rows"), **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_cli_passes_group_by_to_the_split_and_to_training(dicom_dir, tmp_path):
    """`osteo data split --group-by` reaches the split; `osteo train --group-by` the recipe's data.group_by."""
    import csv
    import os
    import subprocess
    import sys

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "OSTEO_CACHE": str(tmp_path / "cache")}
    osteo = lambda *a: subprocess.run([sys.executable, "-m", "osteo.cli", *a], capture_output=True, text=True,
                                      env=env, cwd=tmp_path, timeout=600)
    for mode, grouped in (("dicom", True), ("none", False)):
        out = tmp_path / f"split-{mode}.csv"
        proc = osteo("data", "split", str(dicom_dir), "--out", str(out), "--group-by", mode, "--val", "0.4")
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(out.open()))
        groups = {r["group"] for r in rows}
        assert (len(groups) < len(rows)) == grouped, (mode, len(groups), len(rows))
    proc = osteo("data", "split", str(dicom_dir), "--out", str(tmp_path / "x.csv"), "--group-by", "regex")
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("osteo: warning:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--group-regex" in errors[0], proc.stderr
    from osteo.cli import _train_options, build_parser
    from osteo.session import build_recipe

    args = build_parser().parse_args(["train", "seed", "--model", "tiny", "--weights", "none", "--group-by", "dicom"])
    options = _train_options(args)
    assert build_recipe("seed", "tiny", options).data.group_by == "dicom"
    assert options.as_args()[-2:] == ["--group-by", "dicom"]  # a study's trials pass it on
    # the options the errors name exist on train too
    args = build_parser().parse_args(["train", "seed", "--model", "tiny", "--weights", "none", "--group-by", "regex",
                                      "--group-regex", r"^(P\d+)_", "--groups", "g.csv"])
    options = _train_options(args)
    data = build_recipe("seed", "tiny", options).data
    assert (data.group_by, data.group_regex, data.groups_csv) == ("regex", r"^(P\d+)_", "g.csv")
    assert options.as_args()[-6:] == ["--group-by", "regex", "--group-regex", r"^(P\d+)_", "--groups", "g.csv"]


def test_dicom_files_named_without_an_image_extension_are_audited_and_other_files_ignored(tmp_path):
    rng = np.random.default_rng(1)
    for i, c in enumerate(CLASSES):
        _dicom(tmp_path / c / "IM0001", rng.integers(0, 4096, (16, 24)), f"P{i}")  # as PACS exports name them
        _dicom(tmp_path / c / f"IM{i}.DICOM", rng.integers(0, 4096, (16, 24)), f"Q{i}")
        _dicom(tmp_path / c / f"1.2.840.113619.2.55.{i}", rng.integers(0, 4096, (16, 24)), f"R{i}")  # a UID
    bare = pydicom.dcmread(tmp_path / "osteopenia" / "IM0001")  # the data set alone, as ACR-NEMA wrote it
    del bare.file_meta
    bare.preamble = None
    bare.save_as(tmp_path / "osteopenia" / "IM0002", implicit_vr=True, little_endian=True)
    _dicom(tmp_path / "normal" / "DICOMDIR", rng.integers(0, 4096, (16, 24)), "index")  # an index, no image
    (tmp_path / "normal" / "README").write_text("not an image, and no extension")
    os.mkfifo(tmp_path / "normal" / "PIPE")  # never opened: the audit would block on it
    result = audit(tmp_path)
    assert sorted(r.path for r in result.ok()) == sorted(
        [f"{c}/IM0001" for c in CLASSES] + [f"{c}/IM{i}.DICOM" for i, c in enumerate(CLASSES)]
        + [f"{c}/1.2.840.113619.2.55.{i}" for i, c in enumerate(CLASSES)] + ["osteopenia/IM0002"])
    assert {r.format for r in result.ok()} == {"dicom"} and len(result.records) == len(result.ok())
    assert set(result.ignored) == {"normal/README", "normal/PIPE", "normal/DICOMDIR"}


def test_the_model_card_says_how_many_groups_the_split_kept_whole(tmp_path):
    """A patient's images and copies of one image stay on one side of the split: the card says how many
    such groups there were (it said nothing of patients)."""
    from osteo.model_card import _kept_whole
    from osteo.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    rows = [{"path": f"normal/{i}.dcm", "label": "normal", "split": "train" if i < 6 else "val",
             "group": "dicom:P1" if i < 3 else "dup:7" if i < 5 else f"normal/{i}.dcm"} for i in range(8)]
    run.write_split(rows)
    assert _kept_whole(run) == ("- kept whole by the split, each on one side: 2 groups of images (a patient's, or copies "
                                "of one image), 5 images in all")
    run.write_split([{**r, "group": r["path"]} for r in rows])
    assert _kept_whole(run) == "- kept whole by the split: no group of two or more images"
