import logging
from collections import Counter

import pytest

from osteo import CLASSES
from osteo.data.split import check_split, read_split, split_rows, write_split
from osteo.errors import OsteoError


def _rows(n_per_class=(40, 20, 40), dup_every=0):
    rows = []
    for c, n in zip(CLASSES, n_per_class):
        for i in range(n):
            rows.append({"path": f"{c}/P{i // 2:03d}_{i % 2}.png", "label": c, "status": "ok",
                         "dup_group": f"d{c}{i // 3}" if dup_every and i % dup_every == 0 else ""})
    return rows


def test_stratified_70_30():
    split, excluded = split_rows(_rows(), seed=0)
    assert excluded == []
    counts = Counter((r["split"], r["label"]) for r in split)
    for c, n in zip(CLASSES, (40, 20, 40)):
        assert counts[("val", c)] == round(0.3 * n)
        assert counts[("train", c)] == n - round(0.3 * n)


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    a, _ = split_rows(_rows(), seed=7)
    b, _ = split_rows(list(reversed(_rows())), seed=7)
    write_split(tmp_path / "a.csv", a)
    write_split(tmp_path / "b.csv", b)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    c, _ = split_rows(_rows(), seed=8)
    assert [r["split"] for r in a] != [r["split"] for r in c]
    assert read_split(tmp_path / "a.csv") == a


def _straddles(split):
    sides = {}
    for r in split:
        sides.setdefault(r["group"], set()).add(r["split"])
    return [g for g, s in sides.items() if len(s) > 1]


def test_groups_never_straddle_duplicates_and_patients():
    rows = _rows(dup_every=2)
    split, _ = split_rows(rows, seed=1, group_regex=r"^(P\d+)_", test_fraction=0.1)
    assert _straddles(split) == []
    by_patient = {}
    for r in split:
        by_patient.setdefault(r["path"].split("/")[1][:4], set()).add(r["split"])  # across classes too
    assert all(len(s) == 1 for s in by_patient.values())
    assert {r["split"] for r in split} == {"train", "val", "test"}


def test_groups_csv_keeps_listed_images_together():
    rows = _rows()
    groups = {r["path"]: "same" for r in rows if r["label"] == "normal"}
    split, _ = split_rows(rows, seed=0, groups=groups)
    assert len({r["split"] for r in split if r["label"] == "normal"}) == 1


def test_a_groups_csv_that_would_group_no_one_or_everyone_wrongly_is_refused(tmp_path):
    from osteo.data.split import read_groups_csv

    cases = {
        "": "has no rows",  # an empty file: before, as if --groups had not been given
        "path,group\r\n": "has no rows",
        "file,patient\nnormal/a.png,P1\n": r"needs the columns path,group \(it has 'file', 'patient'\)",
        "path,group\nnormal/a.png,P1\n\nnormal/b.png,\nnormal/c.png, \n": "gives normal/b.png no group",
        "path,group\n,P1\n": "has a row with no path \\(group 'P1'\\)",
        "path,group\nnormal/a.png,P1\nnormal/a.png,P2\n": r"gives normal/a.png two groups \('P1' and 'P2'\)",
    }
    for i, (text, error) in enumerate(cases.items()):
        csv_file = tmp_path / f"g{i}.csv"
        csv_file.write_text(text, newline="")
        with pytest.raises(OsteoError, match=error):
            read_groups_csv(csv_file)
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a byte-order mark and CRLF
    excel.write_bytes("\ufeffpath,group\r\nnormal/a.png, P1\r\nnormal/b.png,P1\r\nnormal/a.png,P1\r\n".encode())
    assert read_groups_csv(excel) == {"normal/a.png": "P1", "normal/b.png": "P1"}


def test_a_regex_whose_patient_is_empty_names_no_patient():
    rows = _rows()  # P000_0.png ...: group 1 of ^(Q?)P is empty for every file, and optional for (Q)?P
    for regex in (r"^(Q?)P", r"^(Q)?P"):
        with pytest.raises(OsteoError, match="matches none of the 100 files"):  # not one patient of all 100
            split_rows(rows, group_regex=regex)


def test_a_patient_source_that_names_no_file_is_an_error_and_one_that_names_some_a_warning():
    rows = _rows()  # 100 files named like P007_1.png
    with pytest.raises(OsteoError, match=r"^--group-regex '\^\(Q\[0-9\]\+\)_' matches none of the 100 files"):
        split_rows(rows, group_regex=r"^(Q[0-9]+)_")  # every image would have been a patient of its own
    with pytest.raises(OsteoError, match=r"^the --groups CSV names none of the 100 files.*relative to the data"):
        split_rows(rows, groups={"/elsewhere/normal/P000_0.png": "a"})
    said = []
    listener = logging.Handler(logging.WARNING)  # the CLI prints these as `osteo: warning:` lines
    listener.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("osteo").addHandler(listener)
    try:
        split_rows(rows, group_regex=r"^(P00[0-4])_")  # P000-P004: 10 files of each class, 30 of 100
        split_rows(rows, group_regex=r"^(P[0-9]+)_")  # all: nothing to say
    finally:
        logging.getLogger("osteo").removeHandler(listener)
    assert said == ["--group-regex '^(P00[0-4])_' matches 30 of 100 files; the other 70 are each a patient of their own"]


def test_conflicting_groups_are_excluded_by_default():
    rows = _rows()
    rows[0]["dup_group"] = rows[-1]["dup_group"] = "clash"  # one normal, one osteoporosis
    split, excluded = split_rows(rows, seed=0)
    assert excluded == sorted([rows[0]["path"], rows[-1]["path"]])
    assert len(split) == len(rows) - 2
    kept, _ = split_rows(rows, seed=0, conflicts="majority")
    assert len(kept) == len(rows)
    assert len({r["label"] for r in kept if r["path"] in excluded}) == 1


def test_k_folds_cover_every_image_once():
    rows = _rows(dup_every=2)
    seen = Counter()
    for k in range(5):
        split, _ = split_rows(rows, folds=5, fold=k, seed=3)
        assert _straddles(split) == []
        seen.update(r["path"] for r in split if r["split"] == "val")
        val = Counter(r["label"] for r in split if r["split"] == "val")
        assert all(val[c] > 0 for c in CLASSES)
    assert set(seen.values()) == {1} and len(seen) == len(rows)


def test_bad_options_and_tiny_classes_are_user_errors():
    with pytest.raises(OsteoError, match="fraction"):
        split_rows(_rows(), val_fraction=0.8, test_fraction=0.3)
    with pytest.raises(OsteoError, match="regex"):
        split_rows(_rows(), group_regex="(")
    split, _ = split_rows(_rows((10, 1, 10)), seed=0)
    with pytest.raises(OsteoError, match="osteopenia") as e:
        check_split(split)
    assert "a larger share (--val)" in str(e.value)  # its one image trains: validation needs more of the class
    assert "group" not in str(e.value)  # every image is a group of its own: grouping is not the reason
    split, _ = split_rows(_rows(), seed=0, group_regex="^(P)")  # a regex that makes everyone one patient
    with pytest.raises(OsteoError, match=r"its 40 images form 1 group\(s\) of one patient .*--group-regex"):
        check_split(split)
    with pytest.raises(OsteoError, match=r"a larger share \(--set data.val=F\)"):
        check_split(split, val_option="--set data.val=F")
    split, _ = split_rows(_rows((10, 0, 0)), seed=0)
    with pytest.raises(OsteoError, match=r"^no images of class osteopenia and osteoporosis to split: .*folders"):
        check_split(split)  # every missing class named at once; no share of nothing helps
