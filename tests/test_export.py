"""``osteo export``: every format gives Keras' calibrated probabilities, outside osteo too.

The ONNX file and the SavedModel are run in subprocesses that never import osteo (what
a consumer of an export has), on phantom images as uint8 and as float; each must match
``apply_temperature(the best model's probabilities, T)`` to 1e-4. The ONNX export's
``predict.py`` reads image files of each kind as osteo does, in an interpreter that cannot
import osteo, Keras, TensorFlow or PyTorch, and gives ``osteo predict``'s probabilities; its
input path (bytes to the model's float32 input) equals osteo's ``load_levels`` / 257 bit for
bit on every kind of file and on a grid of shapes. (The timm engine's ONNX export:
tests/test_export_timm.py, on PyTorch.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from export_consumer import consume, max_diff, probabilities, run_script, write_image_files
from helpers import osteo_warnings

from osteo import export_predict
from osteo.calibrate import apply_temperature
from osteo.errors import OsteoError
from osteo.export import SCRIPT_SOURCE, export_run, isolated
from osteo.predict import load_best, predict_files
from osteo.runs import RunDir
from osteo.trainer import Trainer

NEEDS_ONNX = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("tf2onnx") is None,
    reason="needs the export extra and onnxruntime: pip install 'osteo[dev]'")

TEMPERATURE = 1.7
TOLERANCE = 1e-4



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


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float(np.abs(a.astype(np.float64) - b).max())


def test_calibration_changes_the_probabilities(expected, run, images):
    """Else parity would not show that T was applied."""
    raw = load_best(run).predict(images["float"], verbose=0)
    assert np.abs(raw - expected["float"]).max() > 1e-3


@pytest.fixture(scope="module")
def onnx_export(run) -> Path:
    """The run exported in the default format (ONNX) to the default place."""
    return export_run(run)


@NEEDS_ONNX
def test_onnx_matches_keras_without_osteo(onnx_export, images, expected, tmp_path):
    path = onnx_export
    assert path.name == "model.onnx" and path.stat().st_size > 0
    info, got = consume("onnx", path, images, tmp_path)
    assert info == {"input": ["image", "tensor(float)", ["batch", "32", "32", "1"]],
                    "output": ["probabilities", ["batch", "3"]]}
    for k in ("uint8", "float"):
        assert _max_diff(got[k], expected[k]) <= TOLERANCE, k
    assert _max_diff(got["one"], expected["float"][:1]) <= TOLERANCE
    assert not list(path.parent.glob(".*.tmp*"))  # no temporaries left beside it


@NEEDS_ONNX
def test_predict_script_refuses_a_model_file_changed_since_the_export(onnx_export, phantom_dir, tmp_path, capsys):
    """A model.onnx changed or damaged since the export gave other probabilities without a word
    (a tensor zeroed: about 1/3 each, exit 0); its sha256 is in export.json, and it is checked."""
    copy = tmp_path / "export"
    shutil.copytree(onnx_export.parent, copy)
    image = sorted(Path(phantom_dir).rglob("*.png"))[0]
    assert export_predict.main([str(image), "--export", str(copy / "export.json")]) == 0
    capsys.readouterr()
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert export_predict.main([str(image), "--export", str(copy / "export.json")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"predict.py: {copy / 'model.onnx'} is not the file export.json describes (its sha256 differs: changed or "
        "damaged since the export); export the run again with osteo export"]


@NEEDS_ONNX
def test_onnx_record_says_what_was_written_and_how_close_it_is(run, onnx_export):
    record = json.loads((onnx_export.parent / "export.json").read_text())
    assert onnx_export.parent == run.path / "export"
    n_val = sum(r["split"] == "val" for r in run.read_split())
    assert record["parity"].pop("max_abs_diff") <= TOLERANCE
    assert record["parity"].pop("runtime").startswith("onnxruntime ")
    assert record["parity"] == {"reference": "osteo predict, float32 arithmetic", "images": min(16, n_val),
                                "source": "validation", "tolerance": TOLERANCE}
    assert record["exporter"].startswith("tf2onnx ")
    assert record["sha256"] == hashlib.sha256(onnx_export.read_bytes()).hexdigest()
    assert {k: record[k] for k in ("file", "format", "opset", "engine", "backbone", "backend", "input", "output",
                                   "temperature", "calibrated", "preprocessing", "script")} == {
        "file": "model.onnx", "format": "onnx", "opset": 17, "engine": "keras", "backbone": "tiny",
        "backend": "tensorflow", "temperature": TEMPERATURE, "calibrated": True, "script": "predict.py",
        "input": {"name": "image", "shape": ["batch", 32, 32, 1], "dtype": "float32", "range": [0, 255]},
        "output": {"name": "probabilities", "shape": ["batch", 3], "dtype": "float32",
                   "classes": ["normal", "osteopenia", "osteoporosis"]},
        "preprocessing": {"decode": "osteo.data.decode", "resize": "pad", "box_filter": True, "levels": 65535}}
    assert (onnx_export.parent / "predict.py").read_text() == SCRIPT_SOURCE.read_text()
    card = (run.path / "MODEL_CARD.md").read_text()  # the card says what was exported and how close it is
    assert "## Export" in card and "`export/model.onnx`: onnx opset 17 (tf2onnx " in card
    assert f"max |difference| from `osteo predict` {record_diff(onnx_export):.1e} on {min(16, n_val)} validation" in card


def record_diff(model: Path) -> float:
    return json.loads((model.parent / "export.json").read_text())["parity"]["max_abs_diff"]


@NEEDS_ONNX
def test_predict_script_gives_osteo_predicts_probabilities_without_osteo(run, onnx_export, tmp_path):
    from PIL import Image

    files = write_image_files(tmp_path / "clinic")
    (tmp_path / "clinic" / "notes.txt").write_text("not an image")  # not an image by its name: left out, said
    (tmp_path / "clinic" / "broken.png").write_text("not an image")  # an image by its name, unreadable
    # blank images (every pixel one level; a 16-bit one decodes to black): rows, and one line names them
    blank = [tmp_path / "clinic" / "flat16.png", tmp_path / "clinic" / "flat8.png"]
    Image.fromarray(np.full((48, 40), 3000, np.uint16)).save(blank[0])
    Image.fromarray(np.full((48, 40), 200, np.uint8)).save(blank[1])
    one_off = np.full((48, 40), 200, np.uint8)
    one_off[3, 5] = 201  # off the middle row the check starts with: not blank
    Image.fromarray(one_off).save(tmp_path / "clinic" / "one_off.png")
    files += [*blank, tmp_path / "clinic" / "one_off.png"]
    cut = np.dstack([np.tile(np.arange(40, dtype=np.uint8) * 6, (48, 1))] * 3 + [np.full((48, 40), 255, np.uint8)])
    cut[:4, :4, 3] = 0  # a corner transparent: read by its colours, and said
    Image.fromarray(cut).save(tmp_path / "clinic" / "cut.png")
    files.append(tmp_path / "clinic" / "cut.png")
    proc = run_script(onnx_export.parent / "predict.py", tmp_path / "clinic", cwd=tmp_path)
    assert proc.returncode == 1  # the unreadable file: one line on stderr, no row
    assert proc.stderr.splitlines() == [
        f"predict.py: 1 file(s) in the folders given are not images it reads (by their name, or DICOM by their "
        f"bytes), e.g. {tmp_path / 'clinic' / 'notes.txt'}: left out",
        f"predict.py: {tmp_path / 'clinic' / 'broken.png'}: unknown file signature (not PNG, JPEG, BMP, TIFF or DICOM)",
        f"predict.py: 2 image(s) are blank, every pixel one gray level: {blank[0]}, {blank[1]}; their rows say "
        "nothing of a knee (a failed export, a placeholder?): check the files",
        f"predict.py: 1 image(s) have transparent pixels: {tmp_path / 'clinic' / 'cut.png'}; each is read by its "
        "colours with the transparency dropped, as training reads it, which may not be what a viewer shows"]
    got = probabilities(proc.stdout)
    predict_files(run, [str(f) for f in files], tmp_path / "osteo.csv")
    want = probabilities((tmp_path / "osteo.csv").read_text())
    assert sorted(got) == sorted(map(str, files))
    assert max_diff(got, want) <= TOLERANCE
    # what made that a consumer's interpreter: osteo and the frameworks cannot be imported there
    for name in ("osteo", "keras", "tensorflow", "torch"):
        blocked = subprocess.run(isolated(f"import {name}"), capture_output=True, text=True, cwd=tmp_path)
        assert blocked.returncode == 1 and f"ModuleNotFoundError: import of {name} halted" in blocked.stderr


@NEEDS_ONNX
def test_an_onnx_model_unlike_osteo_predict_is_not_written(run, tmp_path, monkeypatch):
    from osteo import export

    calibrated = export.calibrated_model
    monkeypatch.setattr(export, "calibrated_model", lambda model, t: calibrated(model, 3 * t))  # a wrong graph
    with pytest.raises(OsteoError, match=r"probabilities differ from osteo predict's by .* on \d+ images; "
                                         "nothing written; export --format savedmodel instead") as e:
        export_run(run, "onnx", tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_an_export_into_a_folder_that_cannot_be_made_is_one_line(run, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OsteoError, match=r"^cannot write to .*a-file/sub: Not a directory; choose a writable "
                                         "output directory$"):
        export_run(run, "keras", tmp_path / "a-file" / "sub" / "m.keras")


@NEEDS_ONNX
def test_parity_is_measured_on_noise_when_the_runs_images_are_gone(run, tmp_path):
    moved = RunDir(shutil.copytree(run.path, tmp_path / "tiny" / "moved", ignore=shutil.ignore_patterns("export")))
    recipe = moved.read_recipe()
    recipe.data.dir = str(tmp_path / "gone")
    moved.write_recipe(recipe)
    parity = json.loads((export_run(moved).parent / "export.json").read_text())["parity"]
    assert (parity["source"], parity["images"]) == ("synthetic", 16) and parity["max_abs_diff"] <= TOLERANCE


@NEEDS_ONNX
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


def test_the_parity_reference_computes_without_tf32():
    """TensorFlow allows TF32 on GPUs by default: the export's reference turns it off, and back."""
    import tensorflow as tf

    from osteo.export import _ieee_float32

    enabled = tf.config.experimental.tensor_float_32_execution_enabled
    before = enabled()
    tf.config.experimental.enable_tensor_float_32_execution(True)
    try:
        with pytest.raises(RuntimeError), _ieee_float32():
            assert not enabled()
            raise RuntimeError("an export that fails half-way")
        assert enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


def test_savedmodel_matches_keras_without_osteo(run, images, expected, tmp_path):
    out = tmp_path / "exports" / "sm"
    for _ in range(2):  # the second export replaces the first
        assert export_run(run, "savedmodel", out) == out
    assert (out / "saved_model.pb").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["sm"]  # no temporaries left
    record = json.loads((out / "osteo_export.json").read_text())  # checked loaded back, as a timm run's
    assert (record["engine"], record["ported_to"], record["temperature"]) == ("keras", None, TEMPERATURE)
    assert record["parity"]["max_abs_diff"] <= TOLERANCE and record["parity"]["images"] > 0
    info, got = consume("savedmodel", out, images, tmp_path)
    assert info == {"signatures": ["serve", "serve_uint8", "serving_default"]}
    for k, ref in (("uint8", "uint8"), ("uint8_cast", "uint8"), ("float", "float")):
        assert _max_diff(got[k], expected[ref]) <= TOLERANCE, k


def test_a_savedmodel_that_does_not_match_is_not_written(run, tmp_path, monkeypatch):
    import osteo.export

    monkeypatch.setattr(osteo.export, "PARITY_TOLERANCE", -1.0)  # no SavedModel passes
    out = tmp_path / "exports" / "sm"
    with pytest.raises(OsteoError, match=r"SavedModel's probabilities differ from osteo predict's .* nothing written"):
        export_run(run, "savedmodel", out)
    assert not list(out.parent.iterdir())  # nor any temporary


def test_a_savedmodel_past_a_file_size_limit_is_one_line_and_keeps_the_previous_export(run, tmp_path):
    """TensorFlow reports a full disk or a file size limit as its own errors (ResourceExhaustedError,
    OutOfRangeError), which ended the export in a traceback and exit code 1."""
    import os
    import resource
    import sys

    out = tmp_path / "sm"
    assert export_run(run, "savedmodel", out) == out
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    variables = max(p.stat().st_size for p in (out / "variables").iterdir())
    limit = variables // 2  # the weights cannot be written; the parity images' files are smaller

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "osteo", "export", str(run.path), "--format", "savedmodel",
                           "--out", str(out)], capture_output=True, text=True, preexec_fn=limited, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(f"osteo: error: File too large ({out}); a file size limit was reached"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no temporaries left


def test_keras_format_loads_in_safe_mode_and_matches(run, images, expected, tmp_path):
    import keras

    path = export_run(run, "keras", tmp_path / "m.keras")
    model = keras.saving.load_model(path, safe_mode=True)
    assert '"Lambda"' not in json.dumps(model.get_config())
    for k in ("uint8", "float"):  # the uint8 array as it is: Keras casts it
        assert _max_diff(model.predict(images[k], verbose=0), expected[k]) <= TOLERANCE, k
    # checked as loaded back before it was put in place, as the other formats are; its record beside it
    record = json.loads((tmp_path / "m.keras.json").read_text())
    assert (record["format"], record["engine"], record["temperature"]) == ("keras", "keras", TEMPERATURE)
    assert record["parity"]["max_abs_diff"] <= TOLERANCE and record["parity"]["images"] > 0
    # the run's own export: its model card says what was exported and how close it came
    own = export_run(run, "keras")
    assert own == run.export_path / "model.keras" and (run.export_path / "model.keras.json").is_file()
    assert "`export/model.keras`: the whole Keras model with osteo's layers" in run.model_card_path.read_text()


def test_a_keras_file_that_does_not_match_is_not_written(run, tmp_path, monkeypatch):
    import osteo.export

    monkeypatch.setattr(osteo.export, "PARITY_TOLERANCE", -1.0)  # no model passes
    out = tmp_path / "exports" / "m.keras"
    with pytest.raises(OsteoError, match=r"the .keras model's probabilities differ from osteo predict's .* nothing "
                                         r"written"):
        export_run(run, "keras", out)
    assert not list(out.parent.iterdir())  # neither the model nor its record, nor a temporary


def test_uncalibrated_run_exports_its_own_probabilities(run, images, tmp_path):
    import keras

    copy = RunDir(shutil.copytree(run.path, tmp_path / run.model / run.name))
    copy.calibration_path.unlink()
    with osteo_warnings() as said:
        model = keras.saving.load_model(export_run(copy, "keras", None), safe_mode=True)
    assert said == [f"run {copy.path} has no calibration.json: its probabilities are not calibrated (temperature 1) "
                    f"and no operating point decides; calibrate it with: osteo calibrate {copy.path}"]
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
    an_image = tmp_path / "knee.png"  # somebody's data, where --out points
    an_image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (tmp_path / "mine").mkdir()  # a user's own predict.py, which an ONNX export's script replaced
    (tmp_path / "mine" / "predict.py").write_text("print('mine')\n")
    (tmp_path / "two").mkdir()  # another model's ONNX export: a second one there orphaned it
    (tmp_path / "two" / "export.json").write_text(json.dumps({"file": "a.onnx", "format": "onnx"}))
    (tmp_path / "theirs").mkdir()  # a user's own export.json, a JSON object but no export's record: replaced before
    (tmp_path / "theirs" / "export.json").write_text(json.dumps({"mine": 1}))
    cases = [
        ((not_run, "onnx", None), "not an osteo run directory"),
        ((no_best.path, "onnx", None), "best.weights.h5"),
        ((run.path, "tflite", None), "unknown export format"),
        ((run.path, "keras", run.best_path), "would overwrite the run's own best.weights.h5"),
        ((run.path, "keras", tmp_path / "m.h5"), "must end in .keras"),
        ((run.path, "onnx", tmp_path), "is a folder; give a file"),
        ((run.path, "savedmodel", a_file), "is a file; a SavedModel is a folder"),
        ((run.path, "onnx", an_image), r"is an image \(png\), which this would replace"),
        ((run.path, "onnx", tmp_path / "x.keras"), r"must end in \.onnx"),
        ((run.path, "onnx", tmp_path / "mine" / "knee.onnx"), "predict.py is not the script osteo writes beside an "
                                                             "ONNX export, and exporting would replace it; export into "
                                                             "a folder of its own"),
        ((run.path, "onnx", tmp_path / "two" / "b.onnx"), r"holds the ONNX export a\.onnx \(export\.json and "
                                                          r"predict\.py are its own\), which exporting b\.onnx there"),
        ((run.path, "onnx", tmp_path / "theirs" / "m.onnx"), "export.json is not an osteo export's record, and "
                                                             "exporting would replace it"),
        ((run.path, "onnx", a_file / "m.onnx"), "cannot write to"),  # a file where the folder would be: named as such
        ((bad_t.path, "keras", tmp_path / "m.keras"), "not a positive number"),
    ]
    for args, message in cases:
        with pytest.raises(OsteoError, match=message) as e:
            export_run(*args)
        assert "\n" not in str(e.value)
    assert an_image.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "mine" / "predict.py").read_text() == "print('mine')\n"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["export.json"]
    assert json.loads((tmp_path / "theirs" / "export.json").read_text()) == {"mine": 1}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(OsteoError, match=r"needs tf2onnx: pip install 'osteo\[export\]'"):
        export_run(run.path, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and run.best_path.is_file()


# --------------------------------------------------------------------------- predict.py's input path

SIZES = (17, 32, 224)
MODES = ("pad", "stretch")


def _more_image_kinds(folder: Path) -> list[Path]:
    """Pillow modes, formats and DICOM encodings beyond write_image_files's, and JPEGs large
    enough to be decoded at a reduced DCT scale."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(11)
    gray = rng.integers(0, 256, (23, 37), dtype=np.uint8)
    rgb = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    floats = rng.normal(0, 1000, (19, 29)).astype(np.float32)
    floats[0, :3] = [np.nan, np.inf, -np.inf]
    # smooth, with noise: JPEG keeps it, and each DCT scale gives other pixels
    ramp = np.add.outer(np.linspace(0, 120, 1500), np.linspace(0, 120, 2100))
    big = np.clip(ramp[..., None] + [0, 40, 90] + rng.normal(0, 20, (1500, 2100, 3)), 0, 255).astype(np.uint8)
    kinds = {
        "rgb.png": Image.fromarray(rgb), "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(rgb).convert("RGBA"), "la.png": Image.fromarray(gray).convert("LA"),
        "bits.png": Image.fromarray(gray).convert("1"), "gray.jpg": Image.fromarray(gray),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "gray.bmp": Image.fromarray(gray),
        "rgb.bmp": Image.fromarray(rgb), "gray.tif": Image.fromarray(gray), "rgb.tif": Image.fromarray(rgb),
        "gray16.tif": Image.fromarray(rng.integers(0, 65536, (21, 34)).astype(np.uint16)),
        "float.tif": Image.fromarray(floats, "F"),
        "int32.tif": Image.fromarray(rng.integers(-5000, 90000, (17, 21)).astype(np.int32), "I"),
        "big-colour.jpg": Image.fromarray(big), "big-gray.jpg": Image.fromarray(big[..., 1]),
        "big-tall.jpg": Image.fromarray(np.ascontiguousarray(big[:, :700].transpose(1, 0, 2))),
    }
    for name, img in kinds.items():
        img.save(folder / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    Image.fromarray(big).save(folder / "big-progressive.jpg", quality=80, progressive=True)
    ds = pydicom.dcmread(folder / "knee.dcm")  # write_image_files's MONOCHROME1, inverted back
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(folder / "knee-m2.dcm")
    bare = pydicom.Dataset()  # its elements alone: no preamble, no "DICM", no file meta
    bare.update(ds)
    bare.save_as(folder / "knee-bare", implicit_vr=True, little_endian=True)
    dicoms = [Path(get_testdata_file(n, download=False))
              for n in ("MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm")]
    return [folder / n for n in (*kinds, "big-progressive.jpg", "knee-m2.dcm", "knee-bare")] + dicoms


def _osteo_input(data: bytes, size: int, resize: str) -> np.ndarray:
    """What osteo predict feeds the model for a file's bytes (osteo.predict.load_images)."""
    from osteo.data.pipeline import SCALE, load_levels

    return load_levels(data, size, resize)[0].astype(np.float32) / np.float32(SCALE)


def test_predict_script_keeps_osteos_constants():
    from osteo.data import decode, pipeline, scan

    assert export_predict.MAX_PIXELS == decode.MAX_PIXELS
    assert export_predict.DCT_SCALES == decode.DCT_SCALES and export_predict.DETAIL_SIDE == scan.DETAIL_SIDE
    assert pipeline.RESIZE_MODES == MODES
    # one copy, which predict.py carries (no mirror to drift): the sniff of a DICOM without preamble, the map
    # to float and the box means of a decoded image, the resize and the cache's levels
    assert decode.bare_dicom is export_predict.bare_dicom and decode.preambled_dicom is export_predict.preambled_dicom
    assert decode.box_means is export_predict.box_means and decode.float_block is export_predict.float_block
    assert (pipeline.resize_gray, pipeline.to_levels, pipeline.box_factor, pipeline.SCALE) == (
        export_predict.resize_gray, export_predict.to_levels, export_predict.box_factor, export_predict.SCALE)
    heads = {b"\x08\x00\x05\x00CS\x0a\x00": True, b"\x02\x00\x00\x00UL\x04\x00": True,
             b"\x08\x00\x00\x00\x04\x00\x00\x00": True, b"\x10\x00\x10\x00PN\x04\x00": False,
             b"\x08\x00\x20\x00\x0b\x00\x00\x00": False, b"\x89PNG\r\n\x1a\n": False}
    assert {h: export_predict.bare_dicom(h) for h in heads} == heads
    sides = (1, 2, 3, 7, 16, 17, 31, 32, 33, 64, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025,
             1792, 2000, 5000)
    for w in sides:
        for h in sides:
            assert export_predict.dct_scale(w, h, 128) == decode.dct_scale(w, h, 128)
            for size in (1, *SIZES, 512):
                for resize in MODES:
                    args = (w, h, size, resize)
                    assert export_predict.jpeg_ratio(*args) == pipeline.jpeg_ratio(*args), args


def test_predict_script_decodes_every_kind_as_osteo_does(tmp_path):
    """The script's whole input path, bytes to float32 model input, equals osteo predict's bit for
    bit on every kind of file osteo reads, at each size and resize mode; its decode too."""
    from osteo.data.decode import DecodeError, decode_bytes, decode_gray
    from osteo.data.pipeline import jpeg_ratio, load_levels
    from osteo.predict import load_images

    files = write_image_files(tmp_path) + _more_image_kinds(tmp_path)
    reduced = set()
    for f in files:
        data = f.read_bytes()
        want, got = decode_gray(data), export_predict.decode(data)
        assert (got.kind, got.lo, got.hi, got.pixels.dtype) == (want.kind, want.lo, want.hi, want.pixels.dtype), f.name
        np.testing.assert_array_equal(got.pixels, want.pixels, err_msg=f.name)
        np.testing.assert_array_equal(got.to_float(), want.to_float()[..., 0], err_msg=f.name)
        for size in SIZES:
            for resize in MODES:
                what = f"{f.name} at {size} {resize}"
                levels, gray = export_predict.load_levels(data, size, resize)
                assert gray.one_value() == decode_gray(data).one_value(), what
                assert levels.dtype == np.uint16 and levels.shape == (size, size, 1), what
                np.testing.assert_array_equal(levels, load_levels(data, size, resize)[0], err_msg=what)
                x, same = export_predict.prepare(data, size, resize)
                assert (same.one_value(), same.transparent) == (gray.one_value(), decode_gray(data).info.transparent)
                assert x.dtype == np.float32, what
                np.testing.assert_array_equal(x, _osteo_input(data, size, resize), err_msg=what)
                if f.suffix == ".jpg":
                    info = decode_bytes(data)[1]
                    ratio = jpeg_ratio(info.width, info.height, size, resize)
                    if ratio > 1:
                        reduced.add((f.name, ratio))
                        assert export_predict.decode(data, lambda w, h, r=ratio: r).pixels.shape == (
                            -(-info.height // ratio), -(-info.width // ratio)), what
        (ref,), _ = load_images([f], 32, "pad")  # osteo predict's own reading of the file
        np.testing.assert_array_equal(export_predict.prepare(data, 32, "pad")[0], ref, err_msg=f.name)
    # the DCT scale was exercised, at more than one scale, for colour, gray and progressive JPEGs
    assert {r for _, r in reduced} >= {2, 4} and {n for n, _ in reduced} >= {
        "big-colour.jpg", "big-gray.jpg", "big-tall.jpg", "big-progressive.jpg"}, reduced
    # the inversion of MONOCHROME1 happened in both (the DICOM file is otherwise the same)
    m1, m2 = (export_predict.decode((tmp_path / n).read_bytes()).to_float() for n in ("knee.dcm", "knee-m2.dcm"))
    np.testing.assert_allclose(m1, 255 - m2, atol=1e-4)
    png = (tmp_path / "gray8.png").read_bytes()
    for data in (b"", b"not an image", png[:-40]):  # what osteo cannot read, predict.py cannot either
        with pytest.raises(DecodeError):
            decode_bytes(data)
        with pytest.raises(export_predict.Unreadable):
            export_predict.decode(data)


# (height, width): tiny, near the sizes, non-square both ways, and thin (a padded side of one pixel)
SHAPES = [(1, 1), (2, 3), (7, 5), (5, 17), (31, 32), (33, 32), (64, 64), (100, 37), (37, 100), (257, 300),
          (300, 257), (999, 1000), (1, 700), (700, 1), (3, 2000), (2000, 3), (5, 700), (700, 5), (40, 2000),
          (5000, 7), (7, 5000), (1800, 2400)]  # the last: box_mean sums it in several strips


def _grays(pixels: np.ndarray, rng) -> dict:
    """One image's pixels as each kind of Gray osteo's decoders make (with the map to float they carry)."""
    floats = (pixels.astype(np.float32) - 20) * np.float32(3.7)
    floats.flat[:: max(1, floats.size // 3)] = np.nan  # non-finite values, stretched as the finite extremes
    finite = floats[np.isfinite(floats)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    u16 = pixels.astype(np.uint16) * 256 + rng.integers(0, 256, pixels.shape, dtype=np.uint16)
    i32 = (pixels.astype(np.int32) - 30) * 300
    return {"u8": (pixels, "u8", 0.0, 0.0),
            "u16": (u16, "stretch", float(u16.min()), float(u16.max())),
            "i32": (i32, "stretch", float(i32.min()), float(i32.max())),
            "stretch": (floats, "stretch", lo, hi),
            "float": (pixels.astype(np.float32) + rng.uniform(0, 1, pixels.shape).astype(np.float32), "float", 0.0, 0.0)}


def test_predict_script_resizes_as_osteo_does_on_a_grid_of_shapes(tmp_path):
    """Box filter, bilinear resize, padding and levels equal osteo's bit for bit on each kind of
    decoded image and, through files, on the whole input path, at extreme aspect ratios too."""
    from PIL import Image

    from osteo.data.decode import Gray, ImageInfo
    from osteo.data.pipeline import box_factor, load_levels, resize_gray, to_levels

    box = box_factor(2400, 1800, 17, "stretch")
    assert export_predict.STRIP_BYTES // (4 * box * 2400) < 1800 // box  # several strips
    rng = np.random.default_rng(5)
    for h, w in SHAPES:
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for name, (px, kind, lo, hi) in _grays(pixels, rng).items():
            ours = export_predict.Gray(px, kind, lo, hi)
            theirs = Gray(px, ImageInfo("png", w, h, 8), kind, lo, hi)
            for size in (1, *SIZES):
                for resize in MODES:
                    what = f"{h}x{w} {name} at {size} {resize}"
                    got = export_predict.resize_gray(ours, size, resize)
                    assert got.shape == (size, size) and got.dtype == np.float32, what
                    want = resize_gray(theirs, size, resize)
                    np.testing.assert_array_equal(got, want, err_msg=what)
                    np.testing.assert_array_equal(export_predict.to_levels(got), to_levels(want), err_msg=what)
        # the whole path, from files: 8-bit, 16-bit and colour JPEG (whose DCT scale follows the shape)
        Image.fromarray(pixels).save(tmp_path / "g.png")
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "g16.png")
        Image.fromarray(np.stack([pixels, pixels[::-1], 255 - pixels], axis=-1)).save(tmp_path / "c.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned a quarter: both decoders turn it
        Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif)
        for f in ("g.png", "g16.png", "c.jpg", "turned.jpg"):
            data = (tmp_path / f).read_bytes()
            for size in (1, *SIZES):
                for resize in MODES:
                    what = f"{h}x{w} {f} at {size} {resize}"
                    np.testing.assert_array_equal(export_predict.load_levels(data, size, resize)[0],
                                                  load_levels(data, size, resize)[0], err_msg=what)
                    np.testing.assert_array_equal(export_predict.prepare(data, size, resize)[0],
                                                  _osteo_input(data, size, resize), err_msg=what)


def test_the_export_leaves_out_every_augmentation_layer(run):
    """Augmentation is an identity at inference and ONNX has no kernels for its random ops: the
    exported graph keeps none of the layers the classifier names as augmenting, RandAugment too."""
    from osteo.classifier import AUGMENTATION, Classifier
    from osteo.export import calibrated_model
    from osteo.recipe import AugmentConfig

    clf = Classifier("tiny", image_size=32, weights="none", augment=AugmentConfig(randaugment=True, rotation=0.1))
    model = clf.build()
    assert set(AUGMENTATION) <= {layer.name for layer in model.layers}
    exported = calibrated_model(model, 1.5)
    assert not set(AUGMENTATION) & {layer.name for layer in exported._flatten_layers(include_self=False)}
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(exported.predict(x, verbose=0),
                               apply_temperature(model.predict(x, verbose=0), 1.5), atol=1e-6)
