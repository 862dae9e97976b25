"""Faults from outside: a full disk, damaged run files, resume misuse, leftovers. Each is one line, exit 2."""

import csv
import errno
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import keras
import pytest
from helpers import copy_run, one_line, osteo_warnings

from osteo.cli import main
from osteo.errors import OsteoError
from osteo.files import write_json
from osteo.runs import RunDir
from osteo.trainer import Trainer


def _tiny_args(phantom_dir, runs):
    return ["train", "seed", "--model", "tiny", "--weights", "none", "--image-size", "32", "--data", str(phantom_dir),
            "--runs", str(runs), "--set", "train.tensorboard=false", "--set", "train.bootstrap=50"]


@pytest.fixture(scope="module")
def finished_run(phantom_dir, tmp_path_factory, tiny_recipe):
    return RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=50)).run())


@pytest.fixture
def unfinished_run(phantom_dir, tmp_path, tiny_recipe):
    """A run killed after its first epoch: state saved, no predictions or metrics."""
    trainer = Trainer(tiny_recipe(phantom_dir, tmp_path / "runs", epochs=1, bootstrap=50)).setup()
    trainer.fit_phase(trainer.phases[0])
    trainer._held.close()  # as the killed process's lock would be released
    run = trainer.run_dir
    assert run.is_resumable() and not run.is_finished()
    return run


# --------------------------------------------------------------------------- the disk


def test_disk_full_while_saving_the_checkpoint_is_one_line(phantom_dir, tmp_path, monkeypatch, capsys):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else "best.weights.h5")

    monkeypatch.setattr(keras.Model, "save_weights", full)
    assert main([*_tiny_args(phantom_dir, tmp_path / "runs"), "--epochs", "1"]) == 2
    line = one_line(capsys)
    assert "No space left on device" in line and "free some disk space" in line
    assert line.endswith("or write elsewhere (--runs (make's RUNS=), or OSTEO_CACHE= for the image cache)"), line


def test_a_file_size_limit_in_h5pys_words_is_one_line_naming_the_file(phantom_dir, tmp_path, monkeypatch, capsys):
    def too_big(self, *args, **kwargs):  # h5py's message: several lines, the errno only in its text
        raise OSError("Can't synchronously write data (file write failed: time = Sat Dec  5 20:41:32 2026\n"
                      ", filename = 'x.weights.h5', file descriptor = 7, errno = 27, error message = 'File too "
                      "large', buf = 0x5, total write size = 8, bytes this sub-write = 8, offset = 0)")

    monkeypatch.setattr(keras.Model, "save_weights", too_big)
    assert main([*_tiny_args(phantom_dir, tmp_path / "runs"), "--epochs", "1"]) == 2
    line = one_line(capsys)
    assert "ulimit -f" in line and "best.weights.h5)" in line, line


def test_disk_full_while_writing_the_report_keeps_the_previous_report(finished_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "50"]) == 0
    before = (out / "index.html").read_bytes()
    capsys.readouterr()
    from osteo.report import plots

    def full(fig, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plots, "_save", full)
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "50"]) == 2
    assert "No space left on device" in one_line(capsys)
    assert (out / "index.html").read_bytes() == before  # the old page, whole
    assert not list(out.glob(".*.tmp*"))  # no staging folder left behind


def test_a_report_whose_page_cannot_be_replaced_puts_its_tables_back(finished_run, tmp_path, monkeypatch, capsys):
    """The page's rename fails (an immutable index.html; here made to fail), after the tables' renames: the
    previous tables come back, so the folder is not new tables beside the previous page."""
    out = tmp_path / "rep"
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "50"]) == 0
    tables = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    before = tables()
    real = os.replace

    def refused(src, dst):
        if os.fspath(dst) == str(out / "index.html") and ".report-" in os.fspath(src):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    capsys.readouterr()
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "20"]) == 2
    assert "Operation not permitted" in one_line(capsys)
    assert tables() == before  # the plots too
    assert {"comparison.csv", "verdict.txt", "index.html"} <= {p.name for p in before} and any(
        p.parts[0] == "plots" for p in before)


def test_all_or_none_puts_back_every_file_where_links_are_refused_too(tmp_path, monkeypatch, caplog):
    """The files a failing block replaced come back with their bytes and times, a file it created
    goes, nothing is left beside them; where hard links are refused (another user's file under
    protected_hardlinks, vfat) the old files are kept as copies; a folder where a file goes is refused
    before anything; a file that cannot be put back is left beside its place and named."""
    from osteo.files import all_or_none, write_text

    a, b, new = tmp_path / "a.json", tmp_path / "b.csv", tmp_path / "new.txt"
    write_text(a, "a0")
    write_text(b, "b0")
    os.utime(a, ns=(10**18, 10**18))
    listing = lambda: sorted(p.name for p in tmp_path.iterdir())

    def fails(after):
        with pytest.raises(RuntimeError), all_or_none([a, b, new, a]):
            write_text(a, "a1")
            write_text(new, "n1")
            after()
            raise RuntimeError("the block fails")

    fails(lambda: write_text(b, "b1"))
    assert (a.read_text(), b.read_text(), a.stat().st_mtime_ns) == ("a0", "b0", 10**18)
    assert listing() == ["a.json", "b.csv"]
    link = os.link

    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    fails(lambda: write_text(b, "b1"))
    assert (a.read_text(), b.read_text(), a.stat().st_mtime_ns) == ("a0", "b0", 10**18)
    assert listing() == ["a.json", "b.csv"]
    inode = b.stat().st_ino  # a file the block left alone stays itself (its owner, its times), not its copy
    with pytest.raises(RuntimeError), all_or_none([a, b]):
        write_text(a, "a1")
        raise RuntimeError("the block fails")
    assert b.stat().st_ino == inode and a.read_text() == "a0" and listing() == ["a.json", "b.csv"]
    monkeypatch.setattr(os, "link", link)
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(OsteoError, match=r"folder\.csv exists and is a folder"), all_or_none([a, tmp_path / "folder.csv"]):
        write_text(a, "never")
    assert a.read_text() == "a0" and listing() == ["a.json", "b.csv", "folder.csv"]
    # b cannot be put back: its previous version stays beside it, named
    replace = os.replace

    def stuck(src, dst):
        if str(dst) == str(b) and ".kept-" in str(src):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return replace(src, dst)

    def then_stuck():
        write_text(b, "b1")
        monkeypatch.setattr(os, "replace", stuck)

    with caplog.at_level(logging.WARNING, logger="osteo"):
        fails(then_stuck)
    monkeypatch.setattr(os, "replace", replace)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".b.kept-")]
    assert a.read_text() == "a0" and b.read_text() == "b1" and len(kept) == 1 and kept[0].read_text() == "b0"
    assert f"{b} could not be put back; its previous version is {kept[0]}" in caplog.text


def test_read_only_output_is_one_line(finished_run, tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["report", str(finished_run), "--out", str(tmp_path / "rep"), "--bootstrap", "50"]) == 2
    assert one_line(capsys).endswith("choose a folder you can write to (--out)")  # the option report has
    assert main(["data", "phantom", str(tmp_path / ("x" * 300)), "--n", "6", "--size", "32"]) == 2
    assert one_line(capsys).endswith("shorten the path: a file or folder name is at most 255 bytes on most file "
                                     "systems")  # not "check the file and the disk"


def test_a_full_disk_names_where_each_command_writes_and_what_frees_it(tmp_path, monkeypatch, capsys):
    """The phantom's images are written by Pillow, whose full disk names no file; the fix named an
    --out the command does not have. A folder that cannot be made for want of room (or of inodes) is
    not fixed by choosing another writable folder on the same disk."""
    import tempfile

    import osteo.data.phantom
    from osteo.files import atomic_path

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(osteo.data.phantom, "write_phantom", full)
    out = tmp_path / "ph"
    assert main(["data", "phantom", str(out), "--n", "30", "--size", "32"]) == 2
    assert one_line(capsys) == (f"osteo: error: No space left on device ({out}); free some disk space, or write "
                                "elsewhere (another output folder, the command's first argument)")
    monkeypatch.setattr(tempfile, "mkstemp", full)
    refused = r"^cannot write to .*: No space left on device; free some disk space \(or files, where it ran out of inodes\)"
    with pytest.raises(OsteoError, match=refused), atomic_path(tmp_path / "x.csv"):
        pass


# --------------------------------------------------------------------------- damaged runs


def test_damaged_run_files_are_one_line_and_the_report_skips_them(finished_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    good = copy_run(finished_run, runs)
    bad_recipe = copy_run(finished_run, tmp_path / "r2")
    bad_recipe.recipe_path.write_text('{"name": "x", "data": {')
    other_classes = copy_run(finished_run, tmp_path / "r3")
    text = other_classes.predictions_path.read_text().replace(",normal,", ",fracture,")
    other_classes.predictions_path.write_text(text)
    bad_split = copy_run(finished_run, tmp_path / "r5")
    bad_split.split_path.write_bytes(b"\xff\xfe\x00 junk")
    bad_metrics = copy_run(finished_run, tmp_path / "r4")
    bad_metrics.metrics_path.write_bytes(b"\x00\x01 not json")

    assert main(["eval", str(bad_metrics)]) == 2
    line = one_line(capsys)
    assert "metrics.json is damaged" in line
    # env.json, which training alone writes: eval --data said so after its folder was written, with a warning
    # before, and told the user to run eval again
    bad_env = copy_run(finished_run, tmp_path / "r6")
    bad_env.env_path.write_text('{"backend": ')
    assert main(["eval", str(bad_env), "--data", str(finished_run.read_audit()["data_dir"])]) == 2
    line = one_line(capsys)
    assert "env.json is damaged (JSONDecodeError); it is written by training: train the run again" in line
    assert not bad_env.eval_path.exists()

    out = tmp_path / "rep"
    rc = main(["report", str(good), str(bad_recipe), str(other_classes), str(bad_split), "--out", str(out),
               "--bootstrap", "50"])
    assert rc == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("osteo: warning:")]
    assert len(warnings) == 3 and "recipe.json is damaged" in warnings[0] and "predictions.csv" in warnings[1]
    assert "split.csv is damaged" in warnings[2]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "skipped" in page and page.count(good.name) >= 1
    import csv

    with open(out / "comparison.csv", newline="") as f:
        models = [r["run_id"] for r in csv.DictReader(f) if r["model"] != "oracle"]
    assert models == [good.name]  # the good run only (beside the phantom's oracle)

    # every run damaged: an error, not an empty page
    assert main(["report", str(bad_recipe), "--out", str(tmp_path / "rep2")]) == 2
    assert "could be reported" in capsys.readouterr().err


def test_unfinished_runs_left_out_of_a_report_are_named(finished_run, unfinished_run, capsys):
    runs_dir = unfinished_run.path.parent.parent
    copy_run(finished_run, runs_dir)
    assert main(["report", "--runs", str(runs_dir), "--out", str(runs_dir / "rep"), "--bootstrap", "50"]) == 0
    err = capsys.readouterr().err
    assert "left out 1 unfinished run(s)" in err and str(unfinished_run) in err and "image decoding" not in err
    env = unfinished_run.read_env()  # begun by an older osteo, which read some files otherwise: its resume may not be
    write_json(unfinished_run.env_path, {k: v for k, v in env.items() if k != "image_decoding"})
    assert main(["report", "--runs", str(runs_dir), "--out", str(runs_dir / "rep"), "--bootstrap", "50"]) == 0
    assert ("one begun under osteo's image decoding v3 resumes only if its images decode as they did then (else the "
            "resume says which do not, and it must be trained again)") in capsys.readouterr().err


# --------------------------------------------------------------------------- resume


def test_resume_of_a_finished_run_touches_nothing(finished_run, capsys):
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished_run.path.iterdir() if p.is_file()}
    assert main(["train", "seed", "--resume", str(finished_run)]) == 2
    assert "is finished" in one_line(capsys)
    assert stamp == {p.name: (p.stat().st_mtime_ns, p.read_bytes())
                     for p in finished_run.path.iterdir() if p.is_file()}


def test_resume_applies_more_epochs_and_refuses_other_changes(unfinished_run, capsys):
    for extra, message in ((["--batch", "8"], "--batch cannot change"), (["--set", "train.lr=1"], "--set cannot"),
                           (["--epochs", "0"], "fewer than the 1"), (["--model", "vgg16"], "--model cannot change"),
                           (["--operating-point", "osteoporosis:specificity=0.5"], "--operating-point cannot"),
                           (["--weights", "start.weights.h5"], "--weights cannot change when resuming "
                                                                f"{unfinished_run} (it trained with none)"),
                           (["--mlflow"], "--mlflow cannot be turned on")):
        assert main(["train", "seed", "--resume", str(unfinished_run), *extra]) == 2, extra
        assert message in one_line(capsys)
    # another recipe or backbone named with --resume was ignored: the run finished as its own recipe said
    for named in ("finetune", "vgg16"):
        assert main(["train", named, "--resume", str(unfinished_run)]) == 2
        line = one_line(capsys)
        assert f"was trained with the recipe {unfinished_run.read_recipe().name} (tiny), not {named}" in line, line
    assert not unfinished_run.is_finished()
    # latest finds it (the only resumable run), and two more epochs are applied; its backbone's name
    # is what `make train MODEL=tiny RESUME=latest` passes as the recipe
    runs_dir = unfinished_run.path.parent.parent
    assert main(["train", "tiny", "--resume", "latest", "--runs", str(runs_dir), "--epochs", "3"]) == 0
    assert [int(r["epoch"]) for r in unfinished_run.read_history()] == [1, 2, 3]
    assert unfinished_run.read_recipe().train.epochs == 3 and unfinished_run.is_finished()


def test_a_run_begun_with_relative_paths_resumes_from_another_folder_and_a_gone_weights_file_is_named(
        phantom_dir, tmp_path, tiny_recipe, capsys, monkeypatch):
    """A run's recipe names its data folder and weights file as absolute paths, so `--resume` works
    from any folder (they were kept as typed, and a resume from elsewhere found neither), also with
    the same relative options given again; a weights file gone since is named as the run's own
    starting weights, with what to do, in one line."""
    from osteo.backbones.base import create
    from osteo.registry import get_backbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "knees").symlink_to(phantom_dir)
    (tmp_path / "w").mkdir()
    create(get_backbone("tiny"), "keras", image_size=32, weights="none").build().save_weights("w/start.weights.h5")
    r = tiny_recipe("knees", "runs", epochs=2, bootstrap=50)
    r.model.weights = "w/start.weights.h5"
    trainer = Trainer(r).setup()
    trainer.fit_phase(trainer.phases[0])  # its first epoch committed, then killed
    trainer._held.close()
    run = RunDir(tmp_path / trainer.run_dir.path)  # (runs_dir as typed: relative)
    saved = run.read_recipe_dict()
    assert (saved["data"]["dir"], saved["model"]["weights"]) == (str(tmp_path / "knees"),
                                                                 str(tmp_path / "w" / "start.weights.h5"))
    import hashlib

    sha = hashlib.sha256((tmp_path / "w" / "start.weights.h5").read_bytes()).hexdigest()
    assert run.read_env()["weights_sha256"] == sha  # which file it started from, by content
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "w" / "start.weights.h5").rename(tmp_path / "w" / "moved.weights.h5")
    assert main(["train", "--resume", "latest", "--runs", "../runs"]) == 2
    assert one_line(capsys) == (
        f"osteo: error: this run started from weights file {tmp_path / 'w' / 'start.weights.h5'}, which is not "
        "there now; a resumed run rebuilds its model from it before taking up its saved state: put the file back "
        "there, or start a new run")
    assert not run.is_finished()
    # another file put there under its name: refused, by its content
    (tmp_path / "w" / "start.weights.h5").write_bytes(b"0" + (tmp_path / "w" / "moved.weights.h5").read_bytes())
    assert main(["train", "--resume", "latest", "--runs", "../runs"]) == 2
    assert one_line(capsys) == (
        f"osteo: error: weights file {tmp_path / 'w' / 'start.weights.h5'} is not the one ../runs/tiny/{run.name} "
        "started from "
        "(its sha256 differs: replaced since?); put that file back, or start a new run")
    (tmp_path / "w" / "moved.weights.h5").replace(tmp_path / "w" / "start.weights.h5")
    assert main(["train", "--resume", "latest", "--runs", "../runs", "--data", "../knees",
                 "--weights", "../w/start.weights.h5"]) == 0
    assert run.is_finished() and [int(h["epoch"]) for h in run.read_history()] == [1, 2]
    card = (run.path / "MODEL_CARD.md").read_text()
    assert run.read_env()["weights_sha256"] == sha and f"weights start.weights.h5 (sha256 {sha[:16]}…)" in card
    # a card is shared: the data and the weights by name and content, not by where they were on this machine
    assert "- folder: `knees` (its path is in `recipe.json`)" in card and str(tmp_path) not in card
    from osteo.model_card import _command

    assert _command(shlex.join(["/home/a b/.venv/bin/osteo", "train", "--data", "/home/alice/knees x",
                                f"--weights={tmp_path}/w.pth", "--runs", "runs"])) == (
        "osteo train --data '…/knees x' --weights=…/w.pth --runs runs")  # as the card shows a command typed so


def test_a_weights_file_is_hashed_once_while_it_stays_the_same_file(tmp_path, monkeypatch):
    """A cross-validation's folds (a Trainer each) and the ported weights' cache ask a weights file's
    sha256 again: its bytes are read once while it stays the same file; one put there under its name,
    or written in place since, is read again, and so is one written just before it was read (its
    time stamps could stay as they were through a rewrite: files.RACY_S)."""
    import hashlib

    from osteo import files

    reads = []
    real = files.sha256_stream
    monkeypatch.setattr(files, "sha256_stream", lambda f: reads.append(f) or real(f))
    w = tmp_path / "w.pth"
    w.write_bytes(b"a" * 100)
    monkeypatch.setattr(files, "RACY_S", 3600.0)  # as if it had been written just now, however slow this machine
    assert files.file_sha256(w) == files.file_sha256(str(w)) == hashlib.sha256(b"a" * 100).hexdigest()
    assert len(reads) == 2  # just written: not remembered
    monkeypatch.setattr(files, "RACY_S", -3600.0)  # as if every file here were written an hour ago
    assert files.file_sha256(w) == files.file_sha256(w) == hashlib.sha256(b"a" * 100).hexdigest()
    assert len(reads) == 3
    (tmp_path / "new").write_bytes(b"b" * 100)
    (tmp_path / "new").replace(w)  # another file under its name, of the same size
    assert files.file_sha256(w) == hashlib.sha256(b"b" * 100).hexdigest() and len(reads) == 4
    before = w.stat()
    with open(w, "r+b") as f:  # written in place, the same size; its clock a second on
        f.write(b"c" * 100)
    os.utime(w, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert files.file_sha256(w) == hashlib.sha256(b"c" * 100).hexdigest() and len(reads) == 5


def test_a_run_that_recorded_its_paths_as_typed_trains_the_same_recipe_as_one_given_them_absolute(
        finished_run, tmp_path, monkeypatch):
    """A run of an older osteo kept data.dir as typed (relative): a cross-validation's fold, or a
    study's trial, is the same recipe when the same folder is named again, now absolute."""
    from osteo.recipe import resolve
    from osteo.session import _differences

    run = copy_run(finished_run, tmp_path)
    d = run.read_recipe_dict()
    data = Path(d["data"]["dir"])
    wanted = resolve(run.read_recipe())
    monkeypatch.chdir(data.parent)
    write_json(run.recipe_path, {**d, "data": {**d["data"], "dir": data.name}})
    assert run.read_recipe().data.dir == data.name and _differences(run, wanted) == []
    wanted.data.dir = str(data.parent / "other")
    assert _differences(run, wanted) == ["data.dir"]


def test_resume_refuses_a_split_image_whose_bytes_changed(phantom_dir, tmp_path, tiny_recipe, capsys, monkeypatch):
    from osteo.data import scan

    monkeypatch.setattr(scan, "RACY_S", -3600.0)  # the run's audit remembers every file: the resume recalls them
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    trainer = Trainer(tiny_recipe(data, tmp_path / "runs", epochs=2, bootstrap=50)).setup()
    trainer.fit_phase(trainer.phases[0])
    trainer._held.close()
    run = trainer.run_dir
    split = run.read_split()
    val = next(r["path"] for r in split if r["split"] == "val")
    train = next(r["path"] for r in split if r["split"] == "train" and r["label"] != split[0]["label"])
    shutil.copy(data / train, data / val)  # a training image under a validation image's name
    kept = {p: (run.path / p).read_bytes() for p in ("manifest.csv", "split.csv", "audit.json")}
    assert main(["train", "seed", "--resume", str(run)]) == 2
    line = one_line(capsys)
    assert "1 image(s) of the run's split changed since it began" in line and val in line, line
    assert kept == {p: (run.path / p).read_bytes() for p in kept} and not run.is_finished()


def test_resume_refuses_images_that_decode_otherwise_since_the_run_began(tmp_path, tiny_recipe, capsys):
    """A run begun with osteo's image decoding v3 (16-bit images at 1/257) and resumed after v4
    (stretched from their own range): its later epochs would train on other pixels."""
    import json

    from osteo.data.phantom import write_phantom

    data = tmp_path / "data16"
    write_phantom(data, n=60, size=48, seed=2, bit_depth=16)
    trainer = Trainer(tiny_recipe(data, tmp_path / "runs", epochs=2, bootstrap=20)).setup()
    trainer.fit_phase(trainer.phases[0])
    trainer._held.close()
    run = trainer.run_dir
    env = json.loads(run.env_path.read_text())
    assert env["image_decoding"] == "v5"
    manifest_csv = run.path / "manifest.csv"
    with open(manifest_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0])

    def manifest(edit):
        with open(manifest_csv, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(edit(dict(r)) for r in rows)

    # as a run begun before today, whose manifest (older than the pixel hash) holds none: by what v4 changed
    run.env_path.write_text(json.dumps({**env, "image_decoding": "v3"}))
    manifest(lambda r: {**r, "pixel_sha256": ""})
    assert main(["train", "seed", "--resume", str(run)]) == 2
    line = one_line(capsys)
    assert "image(s) of" in line and "decode otherwise than when it began (osteo's image decoding v3 -> v5" in line
    # begun under v4, with pixel hashes: exactly the image whose decoded pixels differ now
    val = next(r["path"] for r in run.read_split() if r["split"] == "val")
    run.env_path.write_text(json.dumps({**env, "image_decoding": "v4"}))
    manifest(lambda r: {**r, "pixel_sha256": "0" * 64} if r["path"] == val else r)
    assert main(["train", "seed", "--resume", str(run)]) == 2
    line = one_line(capsys)
    assert f"1 image(s) of {run.path}'s split decode otherwise than when it began (osteo's image decoding v4 -> v5" in \
        line and line.endswith(f"e.g. {val}; train a new run"), line
    # an image read then and not now (a hidden file: no one's image since v5) is not left out in silence
    os.rename(data / val, data / val.replace("/", "/.", 1))
    hidden = val.replace("/", "/.", 1)
    manifest(lambda r: {**r, "path": hidden} if r["path"] == val else r)
    run.write_split([{**r, "path": hidden} if r["path"] == val else r for r in run.read_split()])
    assert main(["train", "seed", "--resume", str(run)]) == 2
    said = capsys.readouterr().err.strip().splitlines()  # the data module's warning that it left it out, then:
    assert said[-1].startswith("osteo: error: 1 image(s) of ") and said[-1].endswith(f"e.g. {hidden}; train a new run")
    manifest(lambda r: r)  # as it began: nothing decodes otherwise, and the resume finishes the run
    os.rename(data / hidden, data / val)
    run.write_split([{**r, "path": val} if r["path"] == hidden else r for r in run.read_split()])
    assert main(["train", "seed", "--resume", str(run)]) == 0
    assert run.is_finished()


def test_a_run_folder_that_is_none_is_said_as_what_it_is(finished_run, unfinished_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-such-run")]) == 2
    assert f"{tmp_path / 'no-such-run'} does not exist; pass a run's folder" in one_line(capsys)
    model_folder = finished_run.path.parent  # runs/<model>/, for the run it holds
    assert main(["predict", str(model_folder), str(tmp_path)]) == 2
    assert f"{model_folder} holds 1 run(s), and is not one: pass one of them, e.g. {finished_run.path}" in \
        one_line(capsys)
    assert main(["eval", str(unfinished_run)]) == 2  # training, or stopped: both said, not only the resume
    assert one_line(capsys).endswith("its training is going on, or was stopped before it ended); wait for it, or "
                                     f"finish a stopped one with: osteo train --resume {unfinished_run.path}")


def test_output_folders_and_names_that_are_not_what_they_should_be_are_said(finished_run, phantom_dir, tmp_path,
                                                                          capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for argv in (["report", str(finished_run), "--out", str(a_file)],
                 ["data", "audit", str(phantom_dir), "--out", str(a_file)],
                 ["train", "seed", "--data", str(phantom_dir), "--runs", str(a_file)]):
        assert main(argv) == 2, argv
        assert f"{a_file} is a file, not a folder; give the name of a folder" in one_line(capsys), argv  # not "File exists"
    assert a_file.read_text() == "mine"
    assert main(["report", "--runs", str(tmp_path / "none")]) == 2
    assert f"--runs {tmp_path / 'none'} does not exist (or is not a folder)" in one_line(capsys)
    assert main(["train", "vgg61"]) == 2  # make train MODEL=vgg61: the recipe is the model's name
    assert "a registered model name (convnext_tiny, densenet169," in one_line(capsys)
    assert main(["train", "seed", "--data", str(phantom_dir), "--epochs", "0"]) == 2
    assert "--epochs (make's EPOCHS=) must be at least 1, got 0" in one_line(capsys)


def test_a_run_being_trained_is_locked(unfinished_run, capsys):
    with unfinished_run.locked():
        assert main(["train", "seed", "--resume", str(unfinished_run)]) == 2
    line = one_line(capsys)
    assert f"is being trained by process {os.getpid()}" in line
    assert not unfinished_run.is_finished()


def test_a_run_that_failed_before_its_first_epoch_leaves_nothing(phantom_dir, tmp_path, monkeypatch, capsys):
    def broken(self, phase):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Trainer, "fit_phase", broken)
    assert main([*_tiny_args(phantom_dir, tmp_path / "runs"), "--epochs", "1"]) == 2
    assert "Input/output error" in one_line(capsys)
    assert list((tmp_path / "runs" / "tiny").iterdir()) == []
    assert main(["train", "seed", "--resume", "latest", "--runs", str(tmp_path / "runs")]) == 2
    assert "no unfinished run to resume" in one_line(capsys)


# --------------------------------------------------------------------------- bad values, predict, leftovers


def test_bad_counts_and_seeds_are_one_line_before_anything_runs(finished_run, phantom_dir, tmp_path, capsys):
    cases = [
        (["eval", str(finished_run), "--bootstrap", "-5"], "--bootstrap: must be 0 (no intervals) or from 20 to 100000"),
        (["report", str(finished_run), "--out", str(tmp_path / "r"), "--bootstrap", "-1"], "--bootstrap"),
        (["calibrate", str(finished_run), "--bootstrap", "-5"], "--bootstrap: must be 0 (no intervals) or from 20 to 100000"),
        (["eval", str(finished_run), "--bootstrap", "1"], "--bootstrap: must be 0 (no intervals) or from 20"),
        (["eval", str(finished_run), "--seed", "-1"], "--seed: must be from 0"),
        (["calibrate", str(finished_run), "--seed", "-1"], "--seed: must be from 0"),
        (["data", "split", str(phantom_dir), "--out", str(tmp_path / "s.csv"), "--seed", "-1"], "--seed"),
        (["data", "phantom", str(tmp_path / "ph"), "--seed", "-1"], "--seed"),
        ([*_tiny_args(phantom_dir, tmp_path / "runs"), "--folds", "0"], "--folds: must be from 2 to 1000"),
        ([*_tiny_args(phantom_dir, tmp_path / "runs"), "--folds", "3", "--fold", "0"], "--fold: must be 1 or more"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line(capsys), argv
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ph").exists()


def test_a_fifo_named_like_a_run_file_is_refused_not_read(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "runs")
    run.metrics_path.unlink()
    os.mkfifo(run.metrics_path)
    assert main(["eval", str(run)]) == 2  # returns at once: a read would block forever
    assert "not a regular file" in one_line(capsys)


def test_predict_never_overwrites_run_files_and_lists_unreadable_files(finished_run, phantom_dir, tmp_path,
                                                                         capsys):
    before = finished_run.predictions_path.read_bytes()
    assert main(["predict", str(finished_run), str(phantom_dir / "normal"), "--out",
                 str(finished_run.predictions_path)]) == 2
    assert "would overwrite the run's own predictions.csv" in one_line(capsys)
    assert finished_run.predictions_path.read_bytes() == before
    folder = tmp_path / "imgs"
    shutil.copytree(phantom_dir / "normal", folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "scan.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "p.csv"
    said = []  # the CLI prints osteo's logged warnings as `osteo: warning:` lines (its handler keeps the
    listener = logging.Handler(logging.WARNING)  # stderr of the first main() of this process: listen here)
    listener.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("osteo").addHandler(listener)
    try:
        assert main(["predict", str(finished_run), str(folder), "--out", str(out)]) == 1  # as predict.py: not all
    finally:
        logging.getLogger("osteo").removeHandler(listener)
    n = len(list(folder.glob("*.png")))  # notes.txt is no image, by its name: left out, and said
    assert [m for m in said if "unreadable" in m] == [
        f"1 of {n} files are unreadable and have no prediction (status=unreadable, with the reason, in {out})"]
    assert [m for m in said if "left out" in m] == [
        f"1 file(s) in {folder} are not images osteo reads (by their name, or DICOM by their bytes), e.g. "
        f"{folder / 'notes.txt'}: left out"]
    capsys.readouterr()
    image = folder / sorted(p.name for p in folder.glob("*.png") if p.name != "scan.png")[0]
    before_image = image.read_bytes()
    assert main(["predict", str(finished_run), str(folder), "--out", str(image)]) == 2  # an input, as --out
    assert "is an image (png), which this would replace" in one_line(capsys)
    assert image.read_bytes() == before_image
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(finished_run), str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv")]) == 2
    assert "no files in" in one_line(capsys) and not (tmp_path / "e.csv").exists()
    junk = tmp_path / "junk.csv"
    assert main(["predict", str(finished_run), str(folder / "notes.txt"), str(folder / "scan.png"),
                 "--out", str(junk)]) == 2
    assert "none of the 2 file(s) could be read as an image" in one_line(capsys)
    assert junk.read_text().count("unreadable") == 2  # the reasons are written all the same
    import csv

    with open(out, newline="") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert "notes.txt" not in rows  # in a folder, left out (named, above: read, and unreadable)
    assert rows["scan.png"]["status"] == "unreadable" and rows["scan.png"]["reason"]
    assert sum(r["status"] == "ok" for r in rows.values()) == len(list((phantom_dir / "normal").iterdir()))


def test_stale_temporaries_are_swept_and_live_ones_kept(finished_run, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    stale, live = out / ".comparison.abc.tmp.csv", out / ".index.def.tmp.html"
    stale.write_text("half")
    live.write_text("being written")
    old = time.time() - 3600 * 24
    os.utime(stale, (old, old))
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "50"]) == 0
    assert not stale.exists() and live.exists() and (out / "index.html").exists()


def test_a_run_made_before_weights_only_checkpoints_still_loads(finished_run, tmp_path, phantom_dir, capsys):
    """Its best.keras (the whole model) is loaded with Keras' safe_mode; predict works on it."""
    import numpy as np

    from osteo.predict import load_best

    old = copy_run(finished_run, tmp_path)
    load_best(old.path).save(old.legacy_best_path)
    old.best_path.unlink()
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(load_best(old.path).predict(x, verbose=0),
                               load_best(finished_run.path).predict(x, verbose=0), atol=1e-6)
    assert main(["predict", str(old.path), str(phantom_dir / "normal"), "--out", str(tmp_path / "p.csv")]) == 0


def test_predict_without_out_never_replaces_an_earlier_csv_unasked(finished_run, phantom_dir, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = str(phantom_dir / "normal")
    assert main(["predict", str(finished_run), images]) == 0
    first = (tmp_path / "predictions.csv").read_bytes()
    capsys.readouterr()
    one = str(next((phantom_dir / "normal").iterdir()))
    assert main(["predict", str(finished_run), one]) == 2  # the default is there: refused, kept
    assert "predictions.csv exists (an earlier osteo predict's?); pass --out predictions.csv" in one_line(capsys)
    assert main(["predict", str(tmp_path / "no-such-run"), one]) == 2  # the missing run is what is said
    line = one_line(capsys)
    assert "no-such-run" in line and "predictions.csv" not in line, line
    assert (tmp_path / "predictions.csv").read_bytes() == first
    assert main(["predict", str(finished_run), one, "--out", "predictions.csv"]) == 0  # asked: replaced
    assert (tmp_path / "predictions.csv").read_bytes() != first
    capsys.readouterr()
    assert main(["predict", str(finished_run), one, "--out", "p.csv", "--gradcam", "gc"]) == 0
    assert "wrote p.csv; Grad-CAM overlays in gc" in capsys.readouterr().out  # two places, each named


def test_a_weights_file_that_fails_mid_write_leaves_no_hdf5_file_open(tmp_path, monkeypatch):
    """On a full disk Keras' save_weights raised and left its HDF5 file open; h5py flushed it
    again when it was collected at exit, failed again, and the process died of a segmentation
    fault after osteo's one-line error. A disk that fills mid-write stands in for the real one."""
    import h5py
    import keras

    from osteo.files import save_weights

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    path = tmp_path / "w.weights.h5"

    def still_open():
        return [fid for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
                if fid.valid and os.path.abspath(os.fsdecode(fid.name)) == str(path)]

    with monkeypatch.context() as m:
        m.setattr(h5py.Group, "create_dataset", full)
        with pytest.raises(OSError, match="No space left") as failed:
            save_weights(model, path)
    # the traceback (Keras' frames and their store) is still alive here, as it was when osteo's
    # error line printed: the file is closed all the same
    assert failed.value.__traceback__ is not None and still_open() == []
    save_weights(model, path)  # the same path writes once there is room
    assert still_open() == [] and h5py.is_hdf5(path)


_SAVE_UNDER_A_LIMIT = """
import os, resource, signal, sys
import keras
from osteo.files import save_weights
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(3)])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk's with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
try:
    save_weights(model, sys.argv[1])
except OSError as e:
    print("refused", e.errno, os.path.exists(sys.argv[1]), e)
"""


def test_a_weights_file_that_cannot_fit_is_refused_before_hdf5_writes_a_byte(tmp_path, monkeypatch):
    """A real write failure inside HDF5 (a full disk; here a file-size limit, which fails the same
    writes with EFBIG) left h5py unable to close the file without a segmentation fault, in
    osteo's close and at exit alike: a file that cannot fit is refused before it is begun."""
    import errno
    import subprocess
    import sys
    import types

    path = tmp_path / "w.weights.h5"
    done = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_LIMIT, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # -11 without the check
    assert done.stdout.startswith(f"refused {errno.EFBIG} False [Errno {errno.EFBIG}] File too large (about ")
    assert "over the file-size limit of 8 KB" in done.stdout and not path.exists()
    # no room on the disk: the same, before the file is made
    import keras

    from osteo.files import atomic_path, save_weights

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    full = types.SimpleNamespace(f_blocks=10**6, f_bfree=3, f_bavail=3, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda p: full)
    with (pytest.raises(OSError, match=r"No space left on device \(about \d+ KB needed, 12 KB free\)") as e,
          atomic_path(tmp_path / "best.weights.h5", suffix=".weights.h5") as tmp):
        save_weights(model, tmp)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "best.weights.h5")  # the target's name
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # a file system that reports no size at all (ramfs, FUSE) is let be: the save goes ahead
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_blocks=0, f_bfree=0, f_bavail=0, f_frsize=4096))
    save_weights(model, tmp_path / "w.weights.h5")
    assert (tmp_path / "w.weights.h5").is_file()


def test_a_folder_that_cannot_be_locked_is_written_with_a_warning(tmp_path, monkeypatch):
    """On NFS flock is emulated with POSIX locks, which a folder opened to read cannot take (EBADF):
    osteo calibrate, eval and export stopped there with '[Errno 9] Bad file descriptor'."""
    import fcntl

    from osteo.files import folder_lock

    def nfs(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", nfs)
    entered = False
    with osteo_warnings() as said, folder_lock(tmp_path, "a file"):
        entered = True
    assert entered and said == [f"cannot lock {tmp_path} (Bad file descriptor): another osteo command writing there "
                                "at the same time is not waited for"]


def test_a_folder_lock_taken_again_in_one_thread_is_held_not_waited_for(tmp_path):
    """A study holds its --out and its report takes the lock there again: the report's flock, on another
    descriptor of the same folder, waited for the study's for ever (every study hung at its report).
    Another thread still waits, as another process does."""
    import threading

    from osteo.files import folder_lock

    steps = []

    def another():
        with folder_lock(tmp_path, "another thread's file"):
            steps.append("another thread")

    def nested():
        with folder_lock(tmp_path, "a study"), folder_lock(tmp_path / ".", "its report"):
            steps.append("inside")
            other = threading.Thread(target=another, daemon=True)
            other.start()
            other.join(1.0)
            steps.append("it waits" if other.is_alive() else "it did not wait")
        other.join(30)  # and enters once the folder is free

    worker = threading.Thread(target=nested, daemon=True)  # a hang fails the test, not the suite
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and steps == ["inside", "it waits", "another thread"], steps
    # the body's own error, not "cannot write" the folder
    with folder_lock(tmp_path, "a study"), pytest.raises(OSError, match="No space left"), \
            folder_lock(tmp_path, "its report"):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_folder_locks_take_one_lock_per_folder_however_it_is_named(tmp_path, monkeypatch):
    """predict locks --out's folder and --gradcam's: the same folder under two names (a link) is locked
    once; a second flock of it by the same process would have waited on the first for ever."""
    import contextlib

    import osteo.files

    taken = []

    @contextlib.contextmanager
    def lock(folder, what):
        taken.append(folder)
        yield

    monkeypatch.setattr(osteo.files, "folder_lock", lock)
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with osteo.files.folder_locks([tmp_path / "out", tmp_path / "link", tmp_path / "out" / "."], "x"):
        pass
    assert taken == [(tmp_path / "out").resolve()]
