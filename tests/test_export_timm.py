"""``osteo export`` of a timm-engine run: ONNX through PyTorch's exporter, checked without osteo.

These tests need the PyTorch backend, fixed when Keras is imported: ``make test`` runs
this file a second time with ``KERAS_BACKEND=torch`` (the TensorFlow pass skips it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":  # before torch is imported: beside TensorFlow, triton's import can crash
    pytest.skip("the PyTorch engine: make test runs this file with KERAS_BACKEND=torch", allow_module_level=True)
if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs the export extra and onnxruntime: pip install 'osteo[dev]'", allow_module_level=True)

pytest.importorskip("timm")

from export_consumer import TOLERANCE, max_diff, probabilities, run_script, write_image_files

from osteo.export import export_run
from osteo.predict import predict_files
from osteo.runs import RunDir

TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def timm_run(phantom_dir, tmp_path_factory, tiny_recipe) -> RunDir:
    """A finished one-epoch run of the tiny backbone on the timm engine, calibrated with T = 1.7."""
    from osteo.trainer import Trainer

    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=20)).run())
    run.write_calibration({"temperature": TEMPERATURE})
    return run


def test_the_cli_exports_a_timm_run_to_onnx_that_predict_py_runs_without_osteo(timm_run, tmp_path):
    """No KERAS_BACKEND and no --format: the CLI picks PyTorch for the run and writes ONNX."""
    import onnx

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run([sys.executable, "-m", "osteo.cli", "export", str(timm_run.path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = timm_run.path / "export"
    record = json.loads((folder / "export.json").read_text())
    assert (record["engine"], record["backend"], record["format"], record["opset"]) == ("timm", "torch", "onnx", 17)
    assert record["exporter"].startswith("torch.onnx ") and record["temperature"] == TEMPERATURE
    assert record["parity"]["max_abs_diff"] <= TOLERANCE and record["parity"]["source"] == "validation"
    assert record["parity"]["images"] == min(16, sum(r["split"] == "val" for r in timm_run.read_split()))
    graph = onnx.load(folder / "model.onnx").graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
    assert [v.name for v in (*graph.input, *graph.output)] == ["image", "probabilities"]
    assert dims == [["batch", 32, 32, 1], ["batch", 3]]

    files = write_image_files(tmp_path / "clinic")
    script = run_script(folder / "predict.py", *files, cwd=tmp_path)
    assert script.returncode == 0 and not script.stderr, script.stderr[-2000:]
    predict_files(timm_run, [str(f) for f in files], tmp_path / "osteo.csv")  # osteo predict, calibrated
    assert max_diff(probabilities(script.stdout), probabilities((tmp_path / "osteo.csv").read_text())) <= TOLERANCE


def test_a_run_trained_in_mixed_precision_exports_in_float32(timm_run, tmp_path):
    """The export builds the model in float32 whatever the process's policy: no bfloat16 in the graph."""
    import onnx

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        path = export_run(timm_run, "onnx", tmp_path / "m.onnx")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model = onnx.load(path)
    types = {t.data_type for t in model.graph.initializer}
    casts = {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert onnx.TensorProto.BFLOAT16 not in types | casts and onnx.TensorProto.FLOAT in types
    assert json.loads((tmp_path / "export.json").read_text())["parity"]["max_abs_diff"] <= TOLERANCE


def test_keras_layers_export_through_pytorch(timm_run, tmp_path, monkeypatch):
    """Keras' LayerNormalization (ConvNeXt's blocks, its stem and downsampling Sequential models in
    keras.applications, the pooled norm) reads its shape from the traced input, which PyTorch's
    exporter refuses; grouped convolutions and exact GELU as in ConvNeXt."""
    import onnxruntime as ort

    from osteo import export
    from osteo.calibrate import apply_temperature

    image = keras.Input((32, 32, 1), name="image")
    stem = keras.Sequential([keras.layers.Conv2D(8, 3, padding="same"), keras.layers.LayerNormalization()])
    x = stem(image / 255.0)
    x = keras.layers.Conv2D(8, 7, padding="same", groups=8)(x)
    x = keras.layers.Activation("gelu")(keras.layers.LayerNormalization(epsilon=1e-6)(x))
    x = keras.layers.LayerNormalization(center=False)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(image, keras.layers.Dense(3, activation="softmax")(x))
    monkeypatch.setattr(export, "load_best", lambda _: model)  # a run's best model, made of these layers
    path = export_run(timm_run, "onnx", tmp_path / "ops.onnx")
    x = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 1)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    want = apply_temperature(model.predict(x, verbose=0), TEMPERATURE)
    assert np.abs(got - want).max() <= TOLERANCE


def test_the_parity_reference_computes_without_tf32():
    """On CUDA PyTorch allows TF32 convolutions by default (3.6e-4 off float32 on an H200 for
    densenet169): the export's reference turns them off and restores the setting after."""
    import torch

    from osteo.export import _ieee_float32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    before = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError), _ieee_float32():
            assert flags() == (False, False)
            raise RuntimeError("an export that fails half-way")
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
