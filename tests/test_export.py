"""``osteo export``: every format gives Keras' calibrated probabilities, outside osteo too.

The ONNX file and the SavedModel are run in subprocesses that never import osteo (what
a consumer of an export has), on phantom images as uint8 and as float; each must match
``apply_temperature(the best model's probabilities, T)`` to 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from osteo.calibrate import apply_temperature
from osteo.errors import OsteoError
from osteo.export import export_run
from osteo.predict import load_best
from osteo.runs import RunDir
from osteo.trainer import Trainer

TEMPERATURE = 1.7
TOLERANCE = 1e-4

# Run in a fresh interpreter: the export's outputs on the saved images, with no osteo.
_CONSUMER = r"""
import json, sys
import numpy as np
kind, model, images, out = sys.argv[1:]
x = np.load(images)
u8, f32 = x["uint8"], x["float"]
if kind == "onnx":
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (i,), (o,) = s.get_inputs(), s.get_outputs()
    io = {"input": [i.name, i.type, [str(d) for d in i.shape]], "output": [o.name, [str(d) for d in o.shape]]}
    run = lambda a: s.run([o.name], {i.name: a})[0]
    got = {"uint8": run(u8.astype(np.float32)), "float": run(f32), "one": run(f32[:1])}
else:
    import tensorflow as tf
    m = tf.saved_model.load(model)
    io = {"signatures": sorted(m.signatures)}
    f, u = m.signatures["serving_default"], m.signatures["serve_uint8"]
    got = {"uint8": u(image=tf.constant(u8))["probabilities"].numpy(),
           "uint8_cast": f(image=tf.constant(u8.astype(np.float32)))["probabilities"].numpy(),
           "float": f(image=tf.constant(f32))["probabilities"].numpy()}
np.savez(out, **got)
print(json.dumps({"osteo_imported": any(n == "osteo" or n.startswith("osteo.") for n in sys.modules), **io}))
"""


@pytest.fixture(scope="module")
def run(phantom_dir, tmp_path_factory, tiny_recipe) -> RunDir:
    """A finished 32 px run, calibrated with T = 1.7."""
    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=50)).run())
    run.write_calibration({"temperature": TEMPERATURE})
    return run


@pytest.fixture(scope="module")
def images(phantom_dir, run) -> dict[str, np.ndarray]:
    """Six phantom images at the run's size, decoded and resized as in training: float and uint8."""
    from osteo.data.pipeline import SCALE, load_levels

    data = run.read_recipe().data
    files = sorted(Path(phantom_dir).rglob("*.png"))[::20][:6]
    x = np.stack([load_levels(f.read_bytes(), data.image_size, data.resize)[0] / SCALE for f in files]).astype(np.float32)
    assert not np.array_equal(x, np.round(x)), "the float images should have non-integer pixels"
    return {"float": x, "uint8": np.clip(np.round(x), 0, 255).astype(np.uint8)}


@pytest.fixture(scope="module")
def expected(run, images) -> dict[str, np.ndarray]:
    """Keras' probabilities, calibrated in NumPy, for each input."""
    model = load_best(run)
    return {k: apply_temperature(model.predict(v.astype(np.float32), verbose=0), TEMPERATURE)
            for k, v in images.items()}


def _consume(kind: str, model: Path, images: dict, tmp_path: Path) -> tuple[dict, dict]:
    np.savez(tmp_path / "images.npz", **images)
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", _CONSUMER, kind, str(model), str(tmp_path / "images.npz"), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info.pop("osteo_imported") is False
    with np.load(out) as got:
        return info, dict(got)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float(np.abs(a.astype(np.float64) - b).max())


def test_calibration_changes_the_probabilities(expected, run, images):
    """Else parity would not show that T was applied."""
    raw = load_best(run).predict(images["float"], verbose=0)
    assert np.abs(raw - expected["float"]).max() > 1e-3


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("tf2onnx") is None,
                    reason="needs the export extra and onnxruntime: pip install 'osteo[dev]'")
def test_onnx_matches_keras_without_osteo(run, images, expected, tmp_path):
    path = export_run(run, "onnx", None)
    assert path == run.path / "export" / "model.onnx" and path.stat().st_size > 0
    info, got = _consume("onnx", path, images, tmp_path)
    assert info == {"input": ["image", "tensor(float)", ["batch", "32", "32", "1"]],
                    "output": ["probabilities", ["batch", "3"]]}
    for k in ("uint8", "float"):
        assert _max_diff(got[k], expected[k]) <= TOLERANCE, k
    assert _max_diff(got["one"], expected["float"][:1]) <= TOLERANCE
    assert not list(path.parent.glob(".*.tmp*"))  # no temporaries left beside it


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("tf2onnx") is None,
                    reason="needs the export extra and onnxruntime: pip install 'osteo[dev]'")
def test_onnx_converts_what_the_real_backbones_use(run, images, tmp_path, monkeypatch):
    """Captured constants (EfficientNetV2), grouped convolutions and exact GELU (ConvNeXt)."""
    import keras
    import onnxruntime as ort

    image = keras.Input((32, 32, 1), name="image")
    x = keras.layers.Normalization(mean=[100.0], variance=[900.0])(image)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.Conv2D(8, 7, padding="same", groups=8)(x)
    x = keras.layers.Activation("gelu")(keras.layers.LayerNormalization()(x))
    probs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(image, probs)
    from osteo import export

    monkeypatch.setattr(export, "load_best", lambda _: model)  # a run's best model, made of these ops
    path = export_run(run, "onnx", tmp_path / "ops.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images["float"]})[0]
    want = apply_temperature(model.predict(images["float"], verbose=0), TEMPERATURE)
    assert _max_diff(got, want) <= TOLERANCE


def test_savedmodel_matches_keras_without_osteo(run, images, expected, tmp_path):
    out = tmp_path / "exports" / "sm"
    for _ in range(2):  # the second export replaces the first
        assert export_run(run, "savedmodel", out) == out
    assert (out / "saved_model.pb").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sm"]  # no temporaries left
    info, got = _consume("savedmodel", out, images, tmp_path)
    assert info == {"signatures": ["serve", "serve_uint8", "serving_default"]}
    for k, ref in (("uint8", "uint8"), ("uint8_cast", "uint8"), ("float", "float")):
        assert _max_diff(got[k], expected[ref]) <= TOLERANCE, k


def test_keras_format_loads_in_safe_mode_and_matches(run, images, expected, tmp_path):
    import keras

    path = export_run(run, "keras", tmp_path / "m.keras")
    model = keras.saving.load_model(path, safe_mode=True)
    assert '"Lambda"' not in json.dumps(model.get_config())
    for k in ("uint8", "float"):  # the uint8 array as it is: Keras casts it
        assert _max_diff(model.predict(images[k], verbose=0), expected[k]) <= TOLERANCE, k


def test_uncalibrated_run_exports_its_own_probabilities(run, images, tmp_path):
    import keras

    copy = RunDir(shutil.copytree(run.path, tmp_path / run.model / run.name))
    copy.calibration_path.unlink()
    model = keras.saving.load_model(export_run(copy, "keras", None), safe_mode=True)
    raw = load_best(copy).predict(images["float"], verbose=0)
    assert _max_diff(model.predict(images["float"], verbose=0), apply_temperature(raw, 1.0)) <= TOLERANCE


def test_errors_are_one_line_osteo_errors(run, tmp_path, monkeypatch):
    not_run = tmp_path / "nothing"
    not_run.mkdir()
    no_best = RunDir(tmp_path / "tiny" / "unfinished")
    no_best.path.mkdir(parents=True)
    for name in (RunDir.RECIPE, RunDir.SPLIT):
        shutil.copy(run.path / name, no_best.path / name)
    bad_t = RunDir(shutil.copytree(run.path, tmp_path / "tiny" / "bad-t", ignore=shutil.ignore_patterns("export")))
    bad_t.write_calibration({"temperature": 0})
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    cases = [
        ((not_run, "onnx", None), "not an osteo run directory"),
        ((no_best.path, "onnx", None), "best.weights.h5"),
        ((run.path, "tflite", None), "unknown export format"),
        ((run.path, "keras", run.best_path), "would overwrite the run's own best.weights.h5"),
        ((run.path, "keras", tmp_path / "m.h5"), "must end in .keras"),
        ((run.path, "onnx", tmp_path), "is a folder; give a file"),
        ((run.path, "savedmodel", a_file), "is a file; a SavedModel is a folder"),
        ((bad_t.path, "keras", tmp_path / "m.keras"), "not a positive number"),
    ]
    for args, message in cases:
        with pytest.raises(OsteoError, match=message) as e:
            export_run(*args)
        assert "\n" not in str(e.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(OsteoError, match=r"needs tf2onnx: pip install 'osteo\[export\]'"):
        export_run(run.path, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and run.best_path.is_file()
