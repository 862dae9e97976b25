"""The spine: one resolve(), a Keras-free registry and device plan, recipes in the package, quiet errors."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from osteo.errors import OsteoError
from osteo.recipe import Recipe, apply_overrides, load_recipe, recipe_for, resolve, set_total_epochs

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, **kw)


# --------------------------------------------------------------------------- resolve


def test_resolve_fills_the_backbones_defaults_once_and_is_idempotent():
    # the backend named, not taken from whichever Keras an earlier test imported (run alone,
    # no Keras is loaded, and resolve() leaves the engine, and with it preprocessing, open)
    r = resolve(recipe_for("densenet169"), backend="tensorflow")
    assert (r.data.image_size, r.model.impl, r.model.preprocessing) == (224, "keras", "torch")
    assert resolve(r, backend="tensorflow").to_dict() == r.to_dict()
    small = recipe_for("vgg16")
    small.data.image_size = 48
    assert resolve(small).data.image_size == 48
    assert recipe_for("vgg16").data.image_size == 0  # resolve() returned a copy


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=sgd", "train.optimizer must be one of: adam, adamw; got 'sgd'"),
    ("train.schedule=step", "train.schedule must be one of: constant, cosine"),
    ("train.class_weight=inverse", "train.class_weight must be one of: none, balanced"),
    ("train.feature_cache=maybe", "train.feature_cache must be one of: auto, on, off"),
    ("train.monitor=val_auc", "train.monitor must be one of"),
    ("train.precision=float8", "train.precision must be one of"),
    ("data.resize=crop", "data.resize must be one of: pad, stretch"),
])
def test_every_enumerated_choice_is_checked_where_it_is_set(override, message):
    with pytest.raises(OsteoError, match=re.escape(message)):
        apply_overrides(Recipe(), [override])


@pytest.mark.parametrize("field, value, message", [
    ("train.optimizer", "sgd", "train.optimizer must be one of"),  # set by a recipe file, not --set
    ("data.batch_size", 0, "data.batch_size must be from 1 to 4096"),
    ("train.seed", -1, "train.seed must be from 0"),
    ("data.image_size", 100_000, "data.image_size must be from 1 to 2048"),
    ("train.lr", 0.0, "train.lr must be from 1e-12 to 10"),
    ("train.epochs", 2.5, "train.epochs expects int"),
    ("data.val", 1.0, "data.val must be between 0 and 1"),
    ("model.augment.zoom", -0.1, "model.augment.zoom must be from 0 to 1"),
])
def test_resolve_refuses_bad_values_from_any_source(field, value, message):
    r = Recipe()
    section, name = field.rsplit(".", 1)
    obj = r
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, name, value)
    with pytest.raises(OsteoError, match=re.escape(message)):
        resolve(r)


def _numeric_fields(obj, prefix=""):
    """(key, type hint) of every number of a recipe: ints, floats and tuples of them, recursively."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(getattr(obj, f.name), f"{key}.")
        elif hint in (int, float) or (typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in (int, float)):
            yield key, hint


def test_every_number_of_a_recipe_has_a_rule_that_bounds_it():
    """A number without a rule reached Keras as it was: model.head.units 0 and -5 were tracebacks,
    10**8 a segfault with a half-made run folder; train.lr 1e300 passed as float64 and was inf in
    float32. Each field here must have a rule that refuses the absurd, huge and tiny alike."""
    from osteo.recipe import _RULES

    fields = dict(_numeric_fields(Recipe()))
    assert len(fields) > 30 and "model.head.units" in fields
    missing = sorted(set(fields) - set(_RULES))
    assert not missing, f"recipe numbers without a rule: {missing}"
    for key, hint in fields.items():
        rule = _RULES[key][0]
        huge = {int: 10**23, float: 1e300}.get(hint, 10**8)
        assert not rule(huge) and not rule(-huge), key
        if hint is float and key.endswith("lr"):
            assert not rule(1e-300), key  # 0 in float32


@pytest.mark.parametrize("override, message", [
    ("train.lr=1e300", "train.lr must be from 1e-12 to 10"),
    ("train.fine_tune_lr=1e-300", "train.fine_tune_lr must be from 1e-12 to 10"),
    ("train.epochs=100000000000000000000000", "train.epochs must be from 0 to 10000"),
    ("model.head.units=0", "model.head.units must be from 1 to 16384"),
    ("model.head.units=-5", "model.head.units must be from 1 to 16384"),
    ("model.head.units=100000000", "model.head.units must be from 1 to 16384"),
    ("model.augment.zoom=5", "model.augment.zoom must be from 0 to 1"),
    ("data.folds=1", "data.folds must be 0 (no cross-validation) or from 2"),
    ("train.bootstrap=1000000000", "train.bootstrap must be 0 (no intervals) or from 20 to 100000"),
    ("train.bootstrap=1", "train.bootstrap must be 0 (no intervals) or from 20 to 100000"),
    ("train.warmup_epochs=2", "train.warmup_epochs=2 has no effect with train.schedule=constant"),
    ("train.fine_tune_blocks=2", "--set train.fine_tune_blocks has no effect: this run trains no fine-tuning phase"),
    ("train.fine_tune_lr=1e-2", "--set train.fine_tune_lr has no effect: this run trains no fine-tuning phase"),
])
def test_numbers_beyond_what_the_model_holds_are_one_line_before_anything_is_written(override, message, tmp_path,
                                                                                    phantom_dir, capsys):
    from osteo.cli import main

    assert main(["train", "seed", "--model", "tiny", "--weights", "none", "--image-size", "32", "--data",
                 str(phantom_dir), "--runs", str(tmp_path / "runs"), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("osteo: error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_fine_tuning_settings_are_taken_where_the_recipe_fine_tunes(phantom_dir, tmp_path):
    from osteo.session import TrainOptions, build_recipe

    options = TrainOptions(data=str(phantom_dir), weights="none", image_size=32, runs=str(tmp_path / "runs"),
                           overrides=("train.fine_tune_blocks=1", "train.fine_tune_lr=3e-4"))
    t = build_recipe("finetune", "tiny", options).train
    assert (t.fine_tune_blocks, t.fine_tune_lr) == (1, 3e-4) and t.fine_tune_epochs > 0
    with pytest.raises(OsteoError, match=r"has no effect: .*--epochs 1 leaves the recipe's fine-tuning phase no "
                                         r"epochs .*give --epochs 2 or more"):
        build_recipe("finetune", "tiny", replace(options, epochs=1))  # one epoch: the head's alone


def test_set_names_the_key_meant_and_takes_lists_in_brackets_too():
    r = recipe_for("seed", "tiny")
    with pytest.raises(OsteoError, match=r"^unknown recipe key 'train.lrr'; did you mean train.lr\? \(--set train.lr=...\)$"):
        apply_overrides(r, ["train.lrr=1e-3"])
    with pytest.raises(OsteoError, match=r"unknown recipe key 'zzz'; valid keys: .*train.lr"):
        apply_overrides(r, ["zzz=1"])
    for text in ("64,32", "[64,32]", "(64, 32)"):
        assert apply_overrides(r, [f"model.head.units={text}"]).model.head.units == (64, 32)


def test_a_warm_up_fits_in_every_phase_that_trains():
    r = recipe_for("finetune", "tiny")  # cosine, one warm-up epoch
    r.model.weights = "none"
    set_total_epochs(r, 2)  # a phase of one epoch each: the warm-up fills it, and that is allowed
    resolve(r)
    apply_overrides(r, ["train.warmup_epochs=50"])
    with pytest.raises(OsteoError, match=r"train.warmup_epochs=50 is longer than the head's phase \(train.epochs\), "
                                         r"1 epoch\(s\): .*never reach its peak; set train.warmup_epochs=1 or fewer"):
        resolve(r)
    apply_overrides(r, ["train.epochs=0", "train.fine_tune_epochs=3"])
    with pytest.raises(OsteoError, match=r"the fine-tuning phase \(train.fine_tune_epochs\), 3 epoch"):
        resolve(r)
    # a run's own recipe, trained before the check (resumed, or read back), is held to its old bounds
    apply_overrides(r, ["train.bootstrap=5"])
    resumed = resolve(r, trained=True)
    assert (resumed.train.bootstrap, resumed.train.warmup_epochs) == (5, 50)
    with pytest.raises(OsteoError, match=r"train.bootstrap must be 0 \(no intervals\) or from 20"):
        resolve(r)  # a new run is held to today's


def test_bad_choices_fail_before_a_run_directory_exists(tmp_path, phantom_dir):
    from osteo.cli import main

    for bad in ("train.optimizer=sgd", "train.schedule=step", "train.class_weight=x", "train.feature_cache=x"):
        rc = main(["train", "seed", "--model", "tiny", "--weights", "none", "--data", str(phantom_dir),
                   "--runs", str(tmp_path / "runs"), "--set", bad])
        assert rc == 2, bad
    for bad in (["--epochs", "0"], ["--batch", "0"], ["--batch", "-5"], ["--seed", "-1"], ["--image-size", "100000"]):
        rc = main(["train", "seed", "--model", "tiny", "--weights", "none", "--data", str(phantom_dir),
                   "--runs", str(tmp_path / "runs"), *bad])
        assert rc == 2, bad
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- recipes


def test_one_finetune_recipe_serves_every_backbone_and_seed_honours_model():
    from osteo.recipe import list_recipes
    from osteo.registry import list_backbones

    assert {"finetune", "seed", "demo"} <= set(list_recipes())
    for name in list_backbones():
        r = recipe_for(name)  # `make train MODEL=name`
        assert (r.name, r.model.backbone) == (f"finetune-{name}", name)
        assert r.train.fine_tune_epochs > 0
    seed = recipe_for("seed", "vgg16")  # make train RECIPE=seed MODEL=vgg16
    assert (seed.name, seed.model.backbone) == ("seed-vgg16", "vgg16")
    assert load_recipe("demo", backbone="densenet169").model.backbone == "densenet169"
    with pytest.raises(OsteoError, match="unknown recipe 'nosuch'; choose one of: demo, finetune, seed"):
        recipe_for("nosuch")


@pytest.mark.parametrize("body, line, error", [
    ("def recipe(:\n    pass\n", 1, "SyntaxError"),
    ("import nosuch_module_of_the_user\n", 1, "ModuleNotFoundError: No module named 'nosuch_module_of_the_user'"),
    ("from osteo.recipe import Recipe\n\ndef recipe():\n    raise ValueError('no learning rate')\n", 4,
     "ValueError: no learning rate"),
])
def test_a_recipe_files_own_error_is_one_line_naming_the_file_and_line(tmp_path, capsys, body, line, error):
    from osteo.cli import main

    path = tmp_path / "mine.py"
    path.write_text(body)
    assert main(["train", str(path), "--model", "tiny", "--data", str(tmp_path / "d"), "--runs", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"osteo: error: recipe file {path}, line {line} failed while "), err
    assert error in err[0] and err[0].endswith("; fix the recipe file, or pass a shipped recipe")
    assert not (tmp_path / "r").exists()


def test_recipes_ship_inside_the_installed_package(tmp_path):
    """A non-editable install finds the recipes: the wheel carries them as osteo.recipes. Built from a
    copy of the sources: setuptools builds in the source folder (build/, osteo.egg-info), which two test
    runs at once would share, and whose leftovers it would pack."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("osteo", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-1500:]
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("osteo-*.whl"))).namelist()
    assert {"osteo/recipes/finetune.py", "osteo/recipes/seed.py", "osteo/recipes/demo.py"} <= set(names)
    assert not any(n.startswith("recipes/") for n in names)


# --------------------------------------------------------------------------- Keras-free


def test_registry_device_plan_and_recipe_errors_never_import_keras_or_tensorflow(tmp_path):
    code = """
import sys
from osteo.cli import main
from osteo.registry import get_backbone, list_backbones
from osteo import device
assert len(list_backbones()) >= 7
spec = get_backbone("convnext_tiny")
p = device.plan(spec, device.probe(), available=("tensorflow", "torch"))
assert p.backend in ("tensorflow", "torch") and p.why["backend"]
assert main(["train", "nosuchrecipe"]) == 2
assert main(["train", "vgg16", "--set", "train.optimizer=sgd"]) == 2
loaded = [m for m in ("keras", "tensorflow", "torch") if m in sys.modules]
print("LOADED", loaded)
"""
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout
    assert "unknown recipe 'nosuchrecipe'" in proc.stderr


_FREED_AND_TAKEN_AGAIN = """
import ctypes, json, os, resource, sys
from osteo import device
did = device.keep_freed_memory() if sys.argv[1] == "kept" else "untouched"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
n = 48 << 20  # a step's activation: over glibc's largest dynamic mmap threshold (32 MiB)

def step():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)  # every page written, as a tensor's are
    libc.free(p)

def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = resident()
released = device.release_freed_memory(did)
print(json.dumps({"did": did, "faults": faults, "released": released, "handed_back": held - resident()}))
"""


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_training_process_keeps_the_memory_a_step_frees():
    """keep_freed_memory (what osteo train sets before its audit): a 48 MiB block freed
    and taken again is not faulted in again; glibc's default hands it back to the kernel, whose
    every page then faults anew, zeroed (49,152 faults in 4 KiB pages for the four). Page-fault
    counts, not clocks. A user's own malloc settings are left alone."""
    anew = 4 * (48 << 20) // (2 << 20)  # four blocks faulted in again, even in 2 MiB pages (THP "always")
    runs = {}
    for how, extra in (("default", {}), ("kept", {}), ("kept", {"MALLOC_TRIM_THRESHOLD_": "131072"})):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        proc = subprocess.run([sys.executable, "-c", _FREED_AND_TAKEN_AGAIN, how], capture_output=True, text=True,
                              env={**env, **extra}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[how, bool(extra)] = json.loads(proc.stdout)
    assert runs["default", False]["faults"] >= anew, runs
    assert runs["kept", False]["did"].startswith("freed memory kept"), runs
    assert runs["kept", False]["faults"] * 10 < runs["default", False]["faults"], runs
    assert runs["kept", True]["did"] == "left as it was: MALLOC_TRIM_THRESHOLD_ set", runs
    assert runs["kept", True]["faults"] >= anew, runs
    # once the audit is done, what it left free goes back to the kernel (release_freed_memory):
    # the kept 48 MiB block leaves the resident set; where nothing was kept nothing is done
    assert runs["kept", False]["released"] and runs["kept", False]["handed_back"] > (40 << 20), runs
    assert not runs["default", False]["released"] and not runs["kept", True]["released"], runs


_PLAN_THEN_TORCH = """
import json, sys
from osteo.recipe import recipe_for
from osteo.session import plan_device
plan = plan_device(sys.argv[1], recipe_for("vgg16"), lambda s: None)
import torch  # libgomp reads its settings now and, with OMP_DISPLAY_ENV, prints them to stderr
print("OPENMP", json.dumps(plan.why.get("openmp")))
"""


def test_a_pytorch_run_sets_short_openmp_spin_waits_before_torch_loads():
    """osteo train on PyTorch (plan_device) sets libgomp's spin count before torch is imported,
    as libgomp itself then reports (OMP_DISPLAY_ENV); a user's OpenMP setting stands; a
    TensorFlow run leaves libgomp's default (300,000)."""
    pytest.importorskip("torch")
    from osteo.device import SPIN_COUNT

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KERAS_BACKEND")}
    seen = {}
    for backend, extra in (("torch", {}), ("torch", {"GOMP_SPINCOUNT": "50000"}), ("tensorflow", {})):
        proc = subprocess.run([sys.executable, "-c", _PLAN_THEN_TORCH, backend], capture_output=True, text=True,
                              env={**env, "OMP_DISPLAY_ENV": "VERBOSE", **extra}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        said = json.loads(proc.stdout.split("OPENMP", 1)[1])
        spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
        assert spin, proc.stderr[-2000:]
        seen[backend, bool(extra)] = (said, int(spin.group(1)))
    assert seen["torch", False][0].startswith("short spin waits"), seen
    assert seen["torch", False][1] == SPIN_COUNT, seen
    assert seen["torch", True] == ("left as it was: GOMP_SPINCOUNT set", 50000), seen
    assert seen["tensorflow", False] == (None, 300000), seen
    # torch already loaded: too late for libgomp, and said so
    from osteo.device import short_spin_waits

    mine: dict = {}
    assert short_spin_waits(mine, loaded=True).startswith("left as it was: torch") and mine == {}


# --------------------------------------------------------------------------- quiet errors


def test_an_error_after_tensorflow_loaded_is_one_line_even_on_the_noisy_path(tmp_path, phantom_dir):
    """TF_ENABLE_ONEDNN_OPTS=1 makes TensorFlow print its oneDNN notice at import on any x86 CPU;
    with OSTEO_TF_LOGS=1 the notice is shown (the path is noisy), without it the error is alone."""
    import h5py

    wrong = tmp_path / "wrong.weights.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("junk", data=np.zeros(3))
    argv = [sys.executable, "-m", "osteo.cli", "train", "seed", "--model", "tiny", "--weights", str(wrong),
            "--image-size", "32", "--data", str(phantom_dir), "--runs", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS="1", OSTEO_CACHE=str(tmp_path / "cache"))
    noisy = subprocess.run(argv, capture_output=True, text=True, env={**env, "OSTEO_TF_LOGS": "1"}, timeout=300)
    assert noisy.returncode == 2
    assert "oneDNN" in noisy.stderr and len(noisy.stderr.strip().splitlines()) > 1
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = quiet.stderr.strip().splitlines()
    assert quiet.returncode == 2 and len(lines) == 1, quiet.stderr
    assert lines[0].startswith("osteo: error: weights file") and "does not match" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_importing_osteo_leaves_the_import_system_and_environment_alone():
    """The filter is the osteo command's (cli.main), not every program's that imports the library."""
    code = """
import os, sys
before, env = list(sys.meta_path), dict(os.environ)
import osteo, osteo.cli, osteo.recipe, osteo.runs
print(sys.meta_path == before and dict(os.environ) == env)
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]


_OPTIONAL_CODE = """
import sys
from osteo.cli import main
main(["--help"])  # what every osteo command does first, before it loads Keras
import keras
loaded = sorted(m for m in ("sklearn", "pandas", "matplotlib") if m in sys.modules)
import sklearn.metrics, pandas, matplotlib.pyplot  # osteo's own uses load them as usual
import keras.src.trainers.data_adapters.array_slicing as slicing
print(loaded, slicing.pandas is None, sklearn.metrics.accuracy_score([0, 1], [0, 1]))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_osteo_commands_load_keras_without_its_optional_sklearn_pandas_and_matplotlib(backend):
    """About 150 MB of a training process at its peak (benchmarks/README.md): loaded by Keras for
    features osteo does not use; osteo's own imports of them still work."""
    if backend == "torch":
        pytest.importorskip("torch")
    env = {"KERAS_BACKEND": backend, "OSTEO_KERAS_OPTIONAL": ""}  # not the caller's setting
    lean = _python(_OPTIONAL_CODE, env)
    assert lean.returncode == 0, lean.stderr[-2000:]
    assert lean.stdout.strip().splitlines()[-1] == "[] True 1.0"
    if backend == "torch":  # Keras' imports of them do not depend on the backend: the control once
        return
    # the user's way back to Keras' own imports; and the control: without the hook Keras loads them
    full = _python(_OPTIONAL_CODE, {**env, "OSTEO_KERAS_OPTIONAL": "1"})
    assert full.returncode == 0, full.stderr[-2000:]
    assert full.stdout.strip().splitlines()[-1] == "['matplotlib', 'pandas', 'sklearn'] False 1.0"


def test_the_optional_imports_hook_refuses_only_kerass_guarded_imports_during_its_import(tmp_path):
    """Refused: a Keras site's ``try: import X / except ImportError`` while keras is being
    imported. Not refused: the same import unguarded (a later Keras that needs it), from
    another module, or once keras has loaded. X is a stand-in package written here."""
    (tmp_path / "optional_pkg.py").write_text("VALUE = 1\n")
    guarded = tmp_path / "guarded.py"
    guarded.write_text("try:\n    import optional_pkg\n    from optional_pkg import VALUE\n"
                       "except ImportError:\n    optional_pkg = None\n")
    bare = tmp_path / "bare.py"
    bare.write_text("import optional_pkg\n")
    code = f"""
import importlib.util, sys, types
sys.path.insert(0, {str(tmp_path)!r})
from osteo import _lean
_lean.OPTIONAL, _lean.SITES = ("optional_pkg",), {{"keras.src.site", "keras.src.site_bare"}}
assert _lean.install() and _lean.install()  # idempotent
assert sum(isinstance(f, _lean._OptionalFinder) for f in sys.meta_path) == 1

def load(name, path):
    sys.modules.pop("optional_pkg", None)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.optional_pkg is not None

keras = types.ModuleType("keras"); keras.__spec__ = types.SimpleNamespace(_initializing=True)
sys.modules["keras"] = keras  # as while `import keras` runs
print(load("keras.src.site", {str(guarded)!r}), load("keras.src.other", {str(guarded)!r}),
      load("osteo.report", {str(guarded)!r}), load("keras.src.site_bare", {str(bare)!r}))
keras.__spec__._initializing = False  # keras has loaded
print(load("keras.src.site", {str(guarded)!r}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["False True True True", "True"]
    # nothing to do where Keras is loaded already, or where the user asked for Keras' own imports
    assert _python("import keras\nfrom osteo import _lean\nprint(_lean.install())").stdout.strip() == "False"
    assert _python("from osteo import _lean\nprint(_lean.install())",
                   {"OSTEO_KERAS_OPTIONAL": "1"}).stdout.strip() == "False"


def test_filter_keeps_real_messages_and_the_user_can_ask_for_tensorflows_logs():
    code = """
import os, sys
from osteo import _quiet
with _quiet.filtered_stderr():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1795851492.385031    3379 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"a real problem\\n")
print("wanted" if _quiet.wanted() else "quiet")
"""
    proc = _python(code)
    assert proc.stderr.strip().splitlines() == ["a real problem"]
    assert proc.stdout.strip() == "quiet"
    assert _python(code, {"TF_CPP_MIN_LOG_LEVEL": "0"}).stdout.strip() == "wanted"
    assert _python(code, {"OSTEO_TF_LOGS": "1"}).stdout.strip() == "wanted"
    assert _python(code, {"TF_CPP_MIN_LOG_LEVEL": "2"}).stdout.strip() == "quiet"


def test_tensorflows_python_warnings_are_kept_from_users_unless_asked_for():
    code = """
from osteo import _quiet
_quiet.install()
import tensorflow as tf
tf.get_logger().warning("5 out of the last 5 calls to <function f> triggered tf.function retracing")
tf.get_logger().error("a real TensorFlow error")
"""
    quiet = _python(code).stderr
    assert "retracing" not in quiet and "a real TensorFlow error" in quiet
    assert "retracing" in _python(code, {"OSTEO_TF_LOGS": "1"}).stderr  # osteo --debug sets it


# --------------------------------------------------------------------------- bench


def test_make_bench_passes_arguments_models_py_accepts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import models
    finally:
        sys.path.pop(0)
    for extra in ([], ["BENCH=full"]):
        dry = subprocess.run(["make", "-n", "bench", *extra], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        line = next(ln for ln in dry.stdout.splitlines() if "benchmarks/models.py" in ln)
        argv = shlex.split(line)
        args = models.build_parser().parse_args(argv[argv.index("benchmarks/models.py") + 1 :])
        assert args.sizes == ("224,64" if extra else "64")
        assert args.full == bool(extra)


def test_a_failed_reporting_step_keeps_the_measurement():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import models
    finally:
        sys.path.pop(0)
    out = {"train_img_s": 41.8}

    def mfu():
        raise ValueError("object __array__ method not producing an array")

    models._keep_going(out, mfu)
    assert out["train_img_s"] == 41.8 and "ValueError" in out["errors"]["mfu"]
    # and the step that failed on bfloat16 CPUs now reads bfloat16 back
    assert models._peak_matmul(64, "bfloat16") > 0
    json.dumps(out)


def test_make_train_passes_recipe_overrides_as_the_cli_takes_them():
    """``SET`` is how a make user gives what osteo's messages tell CLI users to ``--set``."""
    from osteo.cli import build_parser

    dry = subprocess.run(["make", "-n", "train", "MODEL=tiny", "SET=data.test=0 train.lr=3e-4", "DATA=my knees"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = next(ln for ln in dry.stdout.splitlines() if " train " in ln and "--model" in ln)
    argv = shlex.split(line)
    args = build_parser().parse_args(argv[argv.index("train") :])
    assert args.set == ["data.test=0", "train.lr=3e-4"] and args.data == "my knees"


def test_make_study_passes_out_set_and_batch_as_make_help_lists_them():
    """``make study OUT=... SET=... BATCH=...`` dropped all three: the study wrote reports/study."""
    from osteo.cli import build_parser

    dry = subprocess.run(["make", "-n", "study", "MODELS=tiny", "OUT=my study", "SET=train.steps_per_epoch=2",
                          "BATCH=8"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = dry.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if " study " in ln and "--models" in ln)
    command = [lines[start]]
    while command[-1].rstrip().endswith("\\"):  # the recipe's continued lines, and no other make output
        command.append(lines[start + len(command)])
    argv = shlex.split(" ".join(ln.rstrip().removesuffix("\\") for ln in command))
    args = build_parser().parse_args(argv[argv.index("study") :])
    assert (args.out, args.set) == ("my study", ["data.batch_size=8", "train.steps_per_epoch=2"]), argv
