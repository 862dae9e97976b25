"""Faults a long study meets: kills, bad input, half-written files, reruns, hostile bytes."""

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from osteo import CLASSES
from osteo.runs import RunDir

TINY = ["--model", "tiny", "--weights", "none", "--image-size", "32", "--set", "train.tensorboard=false"]


def _osteo(args, cwd, env_extra=None, **kw):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "osteo.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, **kw)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- resume


RESUME_ARGS = ["train", "seed", *TINY, "--deterministic", "--batch", "4", "--epochs", "4",
               "--set", "train.steps_per_epoch=30", "--set", "train.bootstrap=100"]


def _reference(phantom_dir, tmp_path_factory, backend):
    tmp = tmp_path_factory.mktemp(f"reference-{backend}")
    env = {"OSTEO_CACHE": str(tmp / "cache"), "KERAS_BACKEND": backend}
    ref = _osteo([*RESUME_ARGS, "--data", str(phantom_dir), "--runs", str(tmp / "ref")], tmp, env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return next((tmp / "ref" / "tiny").iterdir())


@pytest.fixture(scope="module")
def reference_run(phantom_dir, tmp_path_factory):
    """The uninterrupted run that killed-and-resumed runs must reproduce."""
    return _reference(phantom_dir, tmp_path_factory, "tensorflow")


@pytest.fixture(scope="module")
def torch_reference_run(phantom_dir, tmp_path_factory):
    """The same on the PyTorch backend, whose tiny backbone is timm's module (the timm engine)."""
    if importlib.util.find_spec("timm") is None:  # never imported here: torch beside TensorFlow can crash
        pytest.skip("needs timm (make install)")
    return _reference(phantom_dir, tmp_path_factory, "torch")


def _assert_same_run(run, ref_run):
    assert [int(r["epoch"]) for r in _rows(run / "history.csv")] == [1, 2, 3, 4]
    assert (run / "best.weights.h5").exists() and not (run / ".backup").exists()
    for a, b in zip(_rows(ref_run / "history.csv"), _rows(run / "history.csv")):
        for k in ("loss", "val_loss", "val_macro_f1"):
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-6), (k, a["epoch"])
    assert (run / "predictions.csv").read_bytes() == (ref_run / "predictions.csv").read_bytes()
    m_ref, m = json.loads((ref_run / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert m["val"]["balanced_accuracy"] == m_ref["val"]["balanced_accuracy"]
    assert m["best_epoch"] == m_ref["best_epoch"]


@pytest.mark.parametrize("backend", [pytest.param("tensorflow", marks=pytest.mark.heavy), "torch"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(phantom_dir, tmp_path, request, backend):
    reference_run = request.getfixturevalue("reference_run" if backend == "tensorflow" else "torch_reference_run")
    args = [*RESUME_ARGS, "--data", str(phantom_dir)]
    env = {**os.environ, "KERAS_BACKEND": backend, "OSTEO_CACHE": str(tmp_path / "cache")}
    # the victim kills itself in the middle of epoch 2 (30 steps an epoch): a named point, no timing
    victim = subprocess.run([sys.executable, "-m", "osteo.cli", *args, "--runs", str(tmp_path / "runs")],
                            cwd=tmp_path, env={**env, "OSTEO_KILL_AT": "train.batch@45"},
                            capture_output=True, text=True, timeout=600)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-2000:]
    history = next((tmp_path / "runs").glob("tiny/*/history.csv"))
    run = history.parent
    assert len(_rows(history)) == 1 and not (run / "metrics.json").exists()
    for f in run.iterdir():  # every file left is complete: JSON and CSV parse
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".csv":
            _rows(f)
    assert not list(run.glob(".*.tmp*")), "temporary files left visible as outputs"

    resumed = _osteo(["train", "seed", "--resume", str(run)], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run, reference_run)
    if backend == "torch":
        assert json.loads((run / "recipe.json").read_text())["model"]["impl"] == "timm"


@pytest.mark.heavy
def test_a_run_resumed_in_its_first_phase_gives_each_phase_its_own_epochs(phantom_dir, tmp_path):
    """finetune's phase 1 trains the whole model (augmentation on: no feature cache). Killed in its
    second epoch and resumed, phase 2 must still begin after phase 1's last epoch: Keras keeps the
    resumed epoch on the model, where the next fit() would take it as its own start."""
    args = ["train", "finetune", *TINY, "--data", str(phantom_dir), "--batch", "4", "--epochs", "4",
            "--set", "train.steps_per_epoch=10", "--set", "train.bootstrap=0", "--set", "data.test=0",
            "--runs", str(tmp_path / "runs")]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "OSTEO_CACHE": str(tmp_path / "cache")}
    victim = subprocess.run([sys.executable, "-m", "osteo.cli", *args], cwd=tmp_path,
                            env={**env, "OSTEO_KILL_AT": "train.batch@15"}, capture_output=True, text=True,
                            timeout=600)  # epoch 2 of phase 1, epoch 1 committed
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-2000:]
    run = next((tmp_path / "runs" / "tiny").iterdir())
    assert [(r["epoch"], r["phase"]) for r in _rows(run / "history.csv")] == [("1", "1")]
    resumed = _osteo(["train", "finetune", "--resume", str(run)], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [(int(r["epoch"]), int(r["phase"])) for r in _rows(run / "history.csv")] == [(1, 1), (2, 1), (3, 2), (4, 2)]


@pytest.mark.heavy
def test_a_kill_while_the_backup_is_written_still_resumes_exactly(phantom_dir, tmp_path, reference_run):
    """The process dies with the second epoch's weights half-written (truncated, as a kill
    leaves them): the resume starts from the last complete state and matches the reference."""
    script = f"""
import os, signal, sys
from pathlib import Path
from osteo import callbacks
calls = []
def dying_fsync(path):
    calls.append(path)
    if len(calls) == 2:  # epoch 2's weights are written, not yet committed
        with open(path, "r+b") as f:
            f.truncate(96)
        os.kill(os.getpid(), signal.SIGKILL)
callbacks._fsync = dying_fsync
from osteo.cli import main
sys.exit(main({[*RESUME_ARGS, "--data", str(phantom_dir), "--runs", str(tmp_path / "runs")]!r}))
"""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "OSTEO_CACHE": str(tmp_path / "cache")}
    victim = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-2000:]
    run = next((tmp_path / "runs" / "tiny").iterdir())
    assert len(_rows(run / "history.csv")) == 2 and not (run / "metrics.json").exists()
    resumed = _osteo(["train", "seed", "--resume", "latest", "--model", "tiny", "--runs", str(tmp_path / "runs")],
                     tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run, reference_run)


@pytest.mark.heavy
def test_deterministic_runs_write_identical_bytes(phantom_dir, tmp_path):
    args = ["train", "seed", *TINY, "--data", str(phantom_dir), "--deterministic", "--epochs", "2",
            "--set", "train.bootstrap=50"]
    runs = []
    for name in ("a", "b"):
        proc = _osteo([*args, "--runs", str(tmp_path / name)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(next((tmp_path / name / "tiny").iterdir()))
    for f in ("split.csv", "predictions.csv"):
        assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes(), f
    measured = ("seconds", "train_seconds", "images_per_sec", "peak_rss_mb", "peak_gpu_mb")  # the machine's, not the run's
    strip = lambda rows: [{k: v for k, v in r.items() if k not in measured}
                          for r in rows]
    assert strip(_rows(runs[0] / "history.csv")) == strip(_rows(runs[1] / "history.csv"))


def test_split_is_identical_without_deterministic_mode(phantom_dir, tmp_path):
    from osteo.data.module import DataModule
    from osteo.data.split import write_split
    from osteo.recipe import DataConfig

    for name in ("a", "b"):
        dm = DataModule(DataConfig(dir=str(phantom_dir), image_size=32), seed=5).setup()
        write_split(tmp_path / f"{name}.csv", dm.split)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


# --------------------------------------------------------------------------- bad input


def _small_folder(root: Path, counts=(6, 6, 6), size=40):
    from osteo.data.phantom import make_image

    for c, n in zip(CLASSES, counts):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((make_image(c, size=size, seed=1, index=i) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_bad_inputs_are_one_line_exit_2_and_damage_nothing(tmp_path, phantom_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_class = _small_folder(tmp_path / "tinyclass", counts=(8, 1, 8))
    (tmp_path / "a_file").write_text("not a folder")  # unwritable as a folder, even for root
    wrong_weights = tmp_path / "wrong.weights.h5"
    import h5py

    with h5py.File(wrong_weights, "w") as f:
        f.create_dataset("junk", data=np.zeros(3))
    (tmp_path / "notarun").mkdir()
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    cases = [
        (["train", "seed", *TINY, "--data", str(tmp_path / "missing")], "does not exist"),
        (["train", "seed", *TINY, "--data", str(empty)], "no class folders"),
        (["train", "seed", *TINY, "--data", str(tiny_class)], "osteopenia"),
        (["train", "seed", "--model", "resnet9000", "--data", str(phantom_dir)], "unknown model"),
        (["train", "seed", *TINY, "--data", str(phantom_dir), "--set", "train.epoch=3"], "train.epochs"),
        (["train", "seed", *TINY, "--data", str(phantom_dir), "--set", "train.epochs=three"], "int"),
        (["train", "seed", "--model", "vgg16", "--weights", "none", "--image-size", "16", "--data", str(phantom_dir)],
         "minimum"),
        # 0 in a recipe means the backbone's default; asked for on the command line it is a mistake
        (["train", "seed", *TINY, "--data", str(phantom_dir), "--image-size", "0"], "is not an image size"),
        (["train", "seed", "--model", "tiny", "--weights", str(tmp_path), "--image-size", "32",
          "--data", str(phantom_dir)], "is a folder"),
        (["train", "seed", *TINY, "--data", str(phantom_dir), "--runs", str(tmp_path / "a_file" / "runs")],
         "writable"),
        (["train", "seed", "--model", "tiny", "--weights", str(wrong_weights), "--image-size", "32",
          "--data", str(phantom_dir), "--runs", str(tmp_path / "r")], "weights"),
        (["eval", str(tmp_path / "notarun")], "not an osteo run directory"),
        (["report", str(tmp_path / "notarun")], "not an osteo run directory"),
        (["predict", str(tmp_path / "notarun"), str(keep)], "not an osteo run directory"),
        (["train", "nosuchrecipe"], "recipe"),
    ]
    failures = []
    for argv, message in cases:
        proc = _osteo(argv, tmp_path, {"OSTEO_CACHE": str(tmp_path / "cache")})
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or message not in lines[0] or "Traceback" in proc.stderr:
            failures.append((argv, proc.returncode, proc.stderr[-500:]))
    assert not failures, failures
    assert keep.read_text() == "precious"
    assert not (tmp_path / "r").exists()  # the weights were checked before a run directory was made


def test_file_unreadable_after_the_audit_is_skipped_and_counted(tmp_path):
    from osteo.data.module import DataModule
    from osteo.recipe import DataConfig

    root = _small_folder(tmp_path / "d", counts=(10, 10, 10))
    dm = DataModule(DataConfig(dir=str(root), image_size=32))
    dm.setup()
    split = dm.split
    victim = root / split[0]["path"]
    victim.write_bytes(victim.read_bytes()[:40])  # broken after the split was made
    dm2 = DataModule(DataConfig(dir=str(root), image_size=32)).setup(split=split)
    assert dm2.skipped == [split[0]["path"]]
    assert sum(dm2.count(s) for s in ("train", "val")) == len(split) - 1


# --------------------------------------------------------------------------- atomic writes


def test_killed_writer_leaves_only_complete_files(tmp_path):
    """Kill a process that rewrites JSON, CSV and PNG outputs at each named point of an
    atomic write (bytes in the temporary, temporary complete); every file still parses."""
    script = f"""
import numpy as np, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from osteo.files import write_json, write_csv, atomic_path
out = {str(tmp_path)!r}
big = [{{"a": j, "b": "x" * 50}} for j in range(20000)]
for i in range(3):
    write_json(out + "/m.json", {{"i": i, "rows": big}})
    write_csv(out + "/h.csv", big, ["a", "b"])
    fig = plt.figure()
    plt.plot(np.arange(1000) * i)
    with atomic_path(out + "/p.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
"""
    # per round: write_json and write_csv pass both points, the PNG only files.before_replace
    for point in ("files.written@3", "files.written@4", "files.before_replace@4", "files.before_replace@5",
                  "files.before_replace@6"):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={**os.environ, "OSTEO_KILL_AT": point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["i"] in (0, 1) and len(m["rows"]) == 20000, point
        assert len(_rows(tmp_path / "h.csv")) == 20000
        Image.open(tmp_path / "p.png").load()


def _sweep_elsewhere(folder) -> list[str]:
    """What another osteo process's sweep of ``folder`` removes, however old the temporaries are."""
    code = ("import sys; from osteo.files import sweep_temporaries; "
            "print('\\n'.join(p.name for p in sweep_temporaries(sys.argv[1], grace=-1e9)))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_a_temporary_is_swept_only_once_the_process_that_writes_it_is_gone(tmp_path):
    """A temporary named by a running process is kept however long ago it was touched (an
    export waits minutes on its child); one of a process that is gone, one whose process id
    was given to a later process, and one that names no process are swept. On a folder hosts
    share, another host's temporary is kept for a day: its process cannot be asked from here
    (its id, alive or not here, says nothing). Names from before the host was in them still count."""
    import psutil

    from osteo.files import OTHER_HOST_KEEP, host_tag, sweep_temporaries

    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(gone.stdout)
    try:
        began = psutil.Process(live.pid).create_time()
        here = host_tag()
        names = {"kept": f".m.{live.pid}@{here}-k2x9q1.tmp.json", "kept_dir": f".savedmodel.{live.pid}-0a1b2c3d.tmp",
                 "reused": f".h.{live.pid}@{here}-r7m2w0.tmp.csv", "dead": f".p.{dead}-d4n8z3.tmp.png",
                 "unnamed": ".q.a1b2c3d4.tmp", "kept_elsewhere": f".e.{dead}@other_host_{here}-e5f6g7.tmp.json",
                 "old_elsewhere": f".o.{live.pid}@other_host_{here}-h8j9k0.tmp.json"}
        for key, name in names.items():
            if key == "kept_dir":
                (tmp_path / name).mkdir()
                (tmp_path / name / "saved_model.pb").write_bytes(b"x")
            else:
                (tmp_path / name).write_text("x")
            # written after the live process began, or (its id reused) an hour before it; another
            # host's: an hour ago, or a day and an hour ago
            when = {"kept": began + 0.5, "kept_dir": began + 0.5,
                    "old_elsewhere": time.time() - OTHER_HOST_KEEP - 3600}.get(key, began - 3600)
            os.utime(tmp_path / name, (when, when))
        assert sorted(_sweep_elsewhere(tmp_path)) == sorted([names["reused"], names["dead"], names["unnamed"],
                                                             names["old_elsewhere"]])
        assert (tmp_path / names["kept_elsewhere"]).is_file()
        assert (tmp_path / names["kept_dir"] / "saved_model.pb").is_file() and (tmp_path / names["kept"]).is_file()
    finally:
        live.stdin.close()
        live.wait()
    assert sorted(p.name for p in sweep_temporaries(tmp_path, grace=-1e9)) == sorted([names["kept"],
                                                                                      names["kept_dir"]])
    # this process's own id, on a temporary older than it: a killed process's, whose id this one was given
    # (process 1 in a container, every time); this process's own is kept
    from osteo.files import owned_prefix, process_start

    old, own = f"{owned_prefix('.old.')}a1b2c3.tmp.json", f"{owned_prefix('.own.')}d4e5f6.tmp.json"
    for name, when in ((old, process_start() - 3600), (own, process_start() + 0.5)):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (when, when))
    assert [p.name for p in sweep_temporaries(tmp_path, grace=-1e9)] == [old]
    assert (tmp_path / own).is_file() and (tmp_path / names["kept_elsewhere"]).is_file()


def test_hosts_whose_long_names_share_a_beginning_keep_apart_in_temporaries(tmp_path, monkeypatch):
    """Pods of one StatefulSet differ only at the end of a long name: cut to its first characters,
    one host took the other's live temporary on a shared folder for its own dead process's."""
    import socket

    from osteo.files import host_tag, owned_prefix, sweep_temporaries

    tags = {}
    for host in ("osteo-training-worker-statefulset-0", "osteo-training-worker-statefulset-1"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        tags[host] = host_tag()
        name = f"{owned_prefix('.m.')}{host[-1]}x9q1.tmp.json"
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (time.time() - 600, time.time() - 600))
    assert len(set(tags.values())) == 2 and all(len(t) <= 32 and t.isidentifier() for t in tags.values())
    # seen from the second pod, ten minutes after the last write: the first's is kept; its own (this
    # process's id, on a file older than this process: a killed one's, its id given again) is swept
    assert [p.name for p in sweep_temporaries(tmp_path, grace=-1e9)] == [f".m.{os.getpid()}@{tags[host]}-1x9q1.tmp.json"]


def test_a_folder_renamed_aside_is_kept_from_another_sweep_until_it_is_removed(tmp_path, monkeypatch):
    """replace_folder renames the previous folder aside, under its own name, before it removes it:
    a rename keeps the folder's old time, which read as a temporary of a process that is gone."""
    import shutil

    from osteo.files import process_start, replace_folder

    (tmp_path / "plots").mkdir()
    os.utime(tmp_path / "plots", (process_start() - 3600, process_start() - 3600))  # made by an older report
    (tmp_path / "new").mkdir()
    seen, rmtree = [], shutil.rmtree

    def sweep_then_remove(path, *args, **kwargs):  # another process sweeps just before the aside is removed
        seen.append((_sweep_elsewhere(tmp_path), Path(path).is_dir()))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", sweep_then_remove)
    replace_folder(tmp_path / "new", tmp_path / "plots")
    assert seen == [([], True)] and (tmp_path / "plots").is_dir()


def test_osteos_temporaries_are_kept_while_it_writes_and_swept_once_it_is_killed(tmp_path):
    """An atomic write's temporary file and an export's temporary folder, old or new, survive
    another process's sweep while their writer runs; the one a killed writer left is swept."""
    from osteo.export import _atomic_dir
    from osteo.files import atomic_path, process_start

    with atomic_path(tmp_path / "metrics.json") as tmp, _atomic_dir(tmp_path / "savedmodel") as folder:
        tmp.write_text("{}")
        for path in (tmp, folder):  # untouched since this process began: only its writer's name keeps it
            os.utime(path, (process_start(), process_start()))
        assert _sweep_elsewhere(tmp_path) == []
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "savedmodel").is_dir()
    script = ("import sys; from osteo.files import write_json; "
              "write_json(sys.argv[1], {'rows': list(range(1000))})")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "metrics.json")], capture_output=True,
                          text=True, env={**os.environ, "OSTEO_KILL_AT": "files.before_replace"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = [p.name for p in tmp_path.glob(".*.tmp*")]
    assert len(left) == 1 and _sweep_elsewhere(tmp_path) == left
    assert json.loads((tmp_path / "metrics.json").read_text()) == {}


# --------------------------------------------------------------------------- safety


def test_a_runs_model_is_rebuilt_from_its_recipe_and_its_files_are_never_deserialized(tmp_path):
    """A run folder holds weights, not code: a Keras model file with a Lambda put where the
    checkpoint goes is not executed, it is refused as a weights file."""
    import keras

    from osteo.recipe import resolve, study_protocol

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "evil.keras")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    r = study_protocol("tiny")
    r.model.weights, r.data.image_size = "none", 32
    run.write_recipe(resolve(r))  # as a run writes it: the engine named
    run.split_path.write_text("path,label,split,group\n")
    (tmp_path / "evil.keras").rename(run.best_path)
    from osteo.errors import OsteoError
    from osteo.predict import load_best

    with pytest.raises(OsteoError, match="cannot be read as a Keras weights file"):
        load_best(run.path)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(phantom_dir, tmp_path, monkeypatch, tiny_recipe):
    import keras

    from osteo import trainer
    from osteo.errors import OsteoError
    class NaNFromEpochTwo(trainer.SparseCrossEntropy):
        """The loss turns NaN after the first epoch's 6 steps (84 images, batch 16)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.calls = keras.Variable(0.0, trainable=False)

        def call(self, y_true, y_pred):
            self.calls.assign_add(1.0)
            loss = super().call(y_true, y_pred)
            return keras.ops.where(self.calls > 6, float("nan"), loss)

    monkeypatch.setattr(trainer, "SparseCrossEntropy", NaNFromEpochTwo)
    r = tiny_recipe(phantom_dir, tmp_path, epochs=3)
    with pytest.raises(OsteoError, match="not finite") as err:
        trainer.Trainer(r).run()
    assert "best checkpoint kept" in str(err.value)
    best = list(tmp_path.glob("tiny/*/best.weights.h5"))
    assert len(best) == 1
    rows = _rows(best[0].parent / "history.csv")
    assert [r["loss"] for r in rows][1:] == ["nan"] and float(rows[0]["loss"]) > 0  # the NaN epoch is on record
    assert len(rows) == 2  # and training stopped there, at epoch 2 of 3


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray((np.arange(256).reshape(16, 16) % 256).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray((np.arange(256).reshape(16, 16) % 256).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _dicom_bytes():
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm", download=False)).read_bytes()


SEEDS = {"png": _png_bytes(), "jpeg": _jpeg_bytes(), "dicom": _dicom_bytes()}


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from([*SEEDS, "random"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def test_a_dicom_whose_patient_id_is_damaged_is_unreadable_with_its_reason():
    """Found by the fuzz test below in a clean clone's make test: one flipped byte made the
    PatientID's VR 'MO', which pydicom raises on when the element is first read; that read
    came after the decoder's error handling, so the audit would have crashed."""
    from osteo.data.decode import DecodeError, decode_bytes

    good = _dicom_bytes()
    tag = b"\x10\x00\x20\x00LO"  # (0010,0020) PatientID, explicit VR little endian
    assert good.count(tag) == 1
    decode_bytes(good)  # the seed itself decodes
    with pytest.raises(DecodeError, match=r"dicom decode failed: NotImplementedError: .*'MO'"):
        decode_bytes(good.replace(tag, b"\x10\x00\x20\x00MO"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_decoder_never_crashes_on_mutated_bytes(data):
    from osteo.data.decode import DecodeError, decode_bytes

    try:
        arr, _ = decode_bytes(data)
    except DecodeError as e:
        assert str(e)  # a reason
    else:
        assert arr.ndim == 3 and arr.shape[-1] == 1 and np.isfinite(arr).all()
        assert arr.min() >= 0 and arr.max() <= 255


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(files=st.lists(mutated(), min_size=1, max_size=6))
def test_audit_marks_every_bad_file_unreadable_with_a_reason(tmp_path_factory, files):
    from osteo.data.decode import DecodeError, decode_bytes
    from osteo.data.scan import audit

    root = tmp_path_factory.mktemp("fuzz")
    (root / "normal").mkdir()
    for i, data in enumerate(files):
        (root / "normal" / f"{i}.dcm").write_bytes(data)
    result = audit(root)
    assert len(result.records) == len(files)
    for rec in result.records:
        data = (root / rec.path).read_bytes()
        try:
            decode_bytes(data)
            ok = True
        except DecodeError:
            ok = False
        assert (rec.status == "ok") == ok
        if not ok:
            assert rec.reason
    bad = sum(r.status != "ok" for r in result.records)
    line = result.left_out("RUN/audit.json")  # what osteo train says of them on the console
    assert (line is None) == (bad == 0)
    if bad:
        assert line == f"audit: {bad} of {len(files)} files unreadable, left out (RUN/audit.json gives each one's reason)"
        first = next(r for r in result.records if r.status != "ok")
        assert result.first_unreadable() == f"; e.g. {first.path}: {first.reason}"
    else:
        assert result.first_unreadable() == ""
