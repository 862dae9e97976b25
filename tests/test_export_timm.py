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
import time

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":  # before torch is imported: beside TensorFlow, triton's import can crash
    pytest.skip("the PyTorch engine: make test runs this file with KERAS_BACKEND=torch", allow_module_level=True)
if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs the export extra and onnxruntime: pip install 'osteo[dev]'", allow_module_level=True)

pytest.importorskip("timm")

from export_consumer import TOLERANCE, max_diff, probabilities, run_script, write_image_files

import osteo.export as osteo_export
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
    assert proc.stdout.strip() == (f"wrote {folder / 'model.onnx'} (its probabilities within "
                                   f"{record['parity']['max_abs_diff']:.1e} of osteo predict's on "
                                   f"{record['parity']['images']} validation images)")
    graph = onnx.load(folder / "model.onnx").graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
    assert [v.name for v in (*graph.input, *graph.output)] == ["image", "probabilities"]
    assert dims == [["batch", 32, 32, 1], ["batch", 3]]

    files = write_image_files(tmp_path / "clinic")
    script = run_script(folder / "predict.py", *files, cwd=tmp_path)
    assert script.returncode == 0 and not script.stderr, script.stderr[-2000:]
    predict_files(timm_run, [str(f) for f in files], tmp_path / "osteo.csv")  # osteo predict, calibrated
    assert max_diff(probabilities(script.stdout), probabilities((tmp_path / "osteo.csv").read_text())) <= TOLERANCE


# A consumer of a .keras file of a timm run: a fresh interpreter on PyTorch, with osteo
# (its layers) and timm, that must never unpickle (torch.load) what it loads.
_KERAS_CONSUMER = r"""
import sys
import numpy as np
import torch
def no_unpickling(*args, **kwargs):
    raise AssertionError("a .keras export must load without torch.load")
torch.load = no_unpickling
import keras
import osteo.export  # noqa: F401  (osteo's layers)
model, images, out = sys.argv[1:]
m = keras.saving.load_model(model, safe_mode=True)
x = np.load(images)
np.savez(out, float=m.predict(x["float"], verbose=0), uint8=m.predict(x["uint8"], verbose=0))
"""


def test_a_timm_runs_predict_under_keras_backend_tensorflow_runs_on_pytorch_and_says_so(timm_run, phantom_dir,
                                                                                        tmp_path):
    """KERAS_BACKEND=tensorflow is set aside for a run that cannot load there, as a resume sets it
    aside: one warning line, and the predictions (eval, predict and export had refused)."""
    image = next((phantom_dir / "normal").iterdir())
    proc = subprocess.run([sys.executable, "-m", "osteo", "predict", str(timm_run.path), str(image), "--out",
                           str(tmp_path / "p.csv")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"osteo: warning: KERAS_BACKEND=tensorflow is set, but {timm_run.name} was trained on the timm engine, "
            "which runs on torch only: using torch") in proc.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 2


def test_a_timm_run_exports_a_keras_file_that_loads_in_safe_mode_and_matches(timm_run, phantom_dir, tmp_path):
    """``--format keras`` on the timm engine: the module is rebuilt from its config (timm's name,
    the size), not unpickled, and its state dict (BatchNorm statistics too) comes back from the
    file, so a fresh process gives the run's calibrated probabilities."""
    import zipfile
    from pathlib import Path

    from osteo.calibrate import apply_temperature
    from osteo.data.pipeline import SCALE, load_levels
    from osteo.predict import load_best

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the CLI picks PyTorch for the run
    out = tmp_path / "m.keras"
    proc = subprocess.run([sys.executable, "-m", "osteo.cli", "export", str(timm_run.path), "--format", "keras",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # checked as loaded back, as the other formats are, and said: its record beside it
    record = json.loads((tmp_path / "m.keras.json").read_text())
    assert (record["format"], record["engine"], record["backend"]) == ("keras", "timm", "torch")
    assert record["parity"]["max_abs_diff"] <= TOLERANCE and record["parity"]["images"] > 0
    assert f"(its probabilities within {record['parity']['max_abs_diff']:.1e} of osteo predict's" in proc.stdout
    with zipfile.ZipFile(out) as z:
        config = json.loads(z.read("config.json"))
    layers = [layer for layer in config["config"]["layers"] if layer["class_name"] == "TimmLayer"]
    assert len(layers) == 1 and "module" not in layers[0]["config"]  # no pickled module in the file
    assert layers[0]["config"]["timm_name"] and layers[0]["config"]["image_size"] == 32

    data = timm_run.read_recipe().data
    files = sorted(Path(phantom_dir).rglob("*.png"))[::20][:6]
    x = np.stack([load_levels(f.read_bytes(), data.image_size, data.resize)[0] / SCALE
                  for f in files]).astype(np.float32)
    np.savez(tmp_path / "images.npz", float=x, uint8=np.clip(np.round(x), 0, 255).astype(np.uint8))
    proc = subprocess.run([sys.executable, "-c", _KERAS_CONSUMER, str(out), str(tmp_path / "images.npz"),
                           str(tmp_path / "got.npz")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, "KERAS_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = load_best(timm_run)
    with np.load(tmp_path / "got.npz") as got:
        for kind in ("float", "uint8"):
            want = apply_temperature(best.predict(np.load(tmp_path / "images.npz")[kind].astype(np.float32),
                                                  verbose=0), TEMPERATURE)
            assert np.abs(got[kind] - want).max() <= TOLERANCE, kind
    assert np.abs(np.diff(want, axis=0)).max() > 1e-3  # the images give different answers: a real comparison


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


# ------------------------------------------------------------------ SavedModel: the weights in Keras' layers

PORTED = ("vgg16", "vgg19", "densenet169", "convnext_tiny")


def _draw_at_random(module) -> None:
    """Every float tensor of ``module``'s state dict drawn at random: positive variances and scales,
    other weights moved by noise about their own size (BatchNorm's statistics too)."""
    import torch

    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, v in module.state_dict().items():
            if v.is_floating_point():
                low = 0.5 if key.endswith(("running_var", "gamma")) or (".norm" in key and key.endswith("weight")) else -1
                v.copy_(torch.rand(v.shape, generator=gen) * (1.5 - low) + low if low > 0
                        else v + 0.05 * torch.randn(v.shape, generator=gen))


@pytest.mark.parametrize("name", PORTED)
def test_the_study_backbones_compute_in_keras_layers_what_they_computed_in_timm(name):
    """Each study backbone's timm layer, every tensor of its state dict drawn at random (BatchNorm's
    statistics too), gives the feature map its Keras-layers twin gives with the weights ported:
    a kernel transposed the wrong way, a norm's statistics swapped, or an input scaled otherwise
    would not."""
    from osteo.backbones.base import create
    from osteo.backbones.port import keras_backbone, port_backbone
    from osteo.classifier import Preprocess
    from osteo.registry import get_backbone

    spec = get_backbone(name)
    backbone = create(spec, "timm", image_size=32, weights="none")
    layer = backbone.build()
    _draw_at_random(layer.module)
    state, scaling = backbone.keras_port()
    assert scaling == "torch"  # timm's mean and std are ImageNet's for these four
    twin = keras_backbone(spec, 32)
    port_backbone(twin, state, spec.keras_port)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(layer(x, training=False))
    got = keras.ops.convert_to_numpy(twin(Preprocess(scaling)(x), training=False))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()
    assert np.abs(np.diff(want, axis=0)).max() > 1e-2 * np.abs(want).max()  # the images give different maps


@pytest.mark.parametrize(("name", "form"), [
    pytest.param("vgg16", "checkpoint", marks=pytest.mark.heavy),  # ~60-80 MB files
    pytest.param("vgg19", "pth", marks=pytest.mark.heavy),
    pytest.param("densenet169", "pth", marks=pytest.mark.heavy),  # on TensorFlow in test_backbones.py
    ("convnext_tiny", "safetensors")])
def test_a_timm_weights_file_loads_into_keras_layers_and_computes_what_timms_module_did(name, form, tmp_path):
    """A timm weights file of a study backbone (.pth, .safetensors, or a timm run's checkpoint)
    trains on Keras' layers too (model.impl=keras): the file is read by timm's module, with every
    check the timm engine makes, and ported into Keras' own DenseNet (its epsilon kept, PyTorch's
    moved into the variances) and ConvNeXt (its trailing per-position norm, which timm has not, at
    scale 1 and shift 0: it still normalizes, so the maps are compared at its input). The input is
    scaled as timm's module was (torch mode, or ConvNeXt's own Normalization), and Keras' layers
    give the feature map the timm layer gives, every tensor drawn at random, BatchNorm's statistics
    too."""
    import torch

    from osteo.backbones.base import create
    from osteo.backbones.keras_apps import _before_top_norm
    from osteo.backbones.timm_torch import data_config
    from osteo.classifier import Preprocess
    from osteo.recipe import Recipe, resolve
    from osteo.registry import IMAGENET_MEAN_TORCH, IMAGENET_STD_TORCH, get_backbone

    spec, size = get_backbone(name), 32
    layer = create(spec, "timm", image_size=size, weights="none").build()
    _draw_at_random(layer.module)
    cfg = data_config(layer.module)  # what "torch" scaling stands for: ImageNet's, for these four
    assert np.allclose(cfg["mean"], IMAGENET_MEAN_TORCH) and np.allclose(cfg["std"], IMAGENET_STD_TORCH)
    state = {k: v.contiguous() for k, v in layer.module.state_dict().items()}
    if form == "pth":
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
    elif form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
    else:  # a timm run's checkpoint: the module's state dict where Keras' TorchModuleWrapper stores it
        path = tmp_path / "best.weights.h5"
        keras.Sequential([keras.Input((size, size, 3)), layer, keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(3)]).save_weights(path)
    r = Recipe()
    r.model.backbone, r.model.weights, r.model.impl = name, str(path), "keras"
    resolved = resolve(r).model
    assert (resolved.impl, resolved.preprocessing) == ("keras", "none" if spec.preprocessing == "none" else "torch")
    engine = create(spec, "keras", image_size=size, weights=str(path), preprocessing=resolved.preprocessing)
    keras_layers = engine.build()
    x = np.random.default_rng(2).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(layer(x, training=False))  # the timm layer scales its own input
    got = keras.ops.convert_to_numpy(keras.Model(keras_layers.input, _before_top_norm(keras_layers))(
        x if engine.scales_own_input else Preprocess(engine.preprocessing)(x), training=False))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
    assert np.abs(np.diff(want, axis=0)).max() > 1e-2 * np.abs(want).max()  # the images give different maps
    epsilons = {b.epsilon for b in keras_layers.layers if isinstance(b, keras.layers.BatchNormalization)}
    assert epsilons <= {1.001e-5}  # Keras' own DenseNet, not the export's twin
    if name == "convnext_tiny":
        norm = keras_layers.layers[-1]
        assert isinstance(norm, keras.layers.LayerNormalization)
        gamma, beta = norm.get_weights()
        assert (gamma == 1).all() and (beta == 0).all()


@pytest.mark.parametrize("name", PORTED)
def test_gradcam_reads_the_same_activations_on_both_engines(name):
    """One model, the same weights on both engines (the timm layer and its Keras-layers twin):
    the default Grad-CAM layer, the last stage's output, gives the same maps on either, and so
    does the deeper layer each engine falls back to where that stage is too coarse. The grids
    alone could agree on different tensors (ConvNeXt's block before or after its residual sum,
    or its downsampling's LayerNormalization)."""
    from osteo.backbones.port import keras_backbone, port_backbone
    from osteo.classifier import Classifier
    from osteo.explain import Target, _engine_call, gradcam, gradcam_target
    from osteo.export import _head_weights
    from osteo.recipe import AugmentConfig
    from osteo.registry import get_backbone

    keras.utils.set_random_seed(0)  # the weights: not whatever the tests before left torch's generator at
    spec, size, no_aug = get_backbone(name), 64, AugmentConfig(flip=False, zoom=0.0, shear=0.0)
    timm_model = Classifier(name, image_size=size, weights="none", augment=no_aug, impl="timm").build()
    engine = timm_model.osteo_backbone  # timm's own initialisation: drawn wider, VGG's softmax saturates
    state, scaling = engine.keras_port()
    backbone = keras_backbone(spec, size)
    keras_model = Classifier(name, image_size=size, weights="none", augment=no_aug, impl="keras",
                             preprocessing=scaling).build(backbone=backbone)
    port_backbone(backbone, state, spec.keras_port)
    for layer_name, weights in _head_weights(timm_model, engine.layer).items():
        keras_model.get_layer(layer_name).set_weights(weights)
    images = np.random.default_rng(6).uniform(0, 255, (3, size, size, 1)).astype(np.float32)
    found, fallback = [], []
    for model in (timm_model, keras_model):
        last, cells = _engine_call(model, spec, "feature_maps")[-1]  # the default layer, at any size
        found.append(gradcam(model, spec, images, classes=np.array([0, 1, 2]), target=Target(last, cells, last,
                                                                                            cells)))
        # at 64 px the last stage is too coarse: the deepest layer with 7x7 cells, chosen per engine
        target = gradcam_target(model, spec)
        assert target.layer != target.last
        fallback.append(gradcam(model, spec, images, classes=np.array([0, 1, 2]), target=target)[0])
    (timm_maps, timm_probs), (keras_maps, keras_probs) = found
    np.testing.assert_allclose(keras_probs, timm_probs, atol=1e-5)
    assert np.abs(np.diff(timm_maps, axis=0)).max() > 0.1  # the maps differ between images: a real comparison
    np.testing.assert_allclose(keras_maps, timm_maps, atol=1e-3)
    assert np.abs(np.diff(fallback[0], axis=0)).max() > 0.1
    # seeded above: the deeper layer's maps of a random model can be ill-conditioned (a map's peak a small
    # sum of large terms); over seeds 0-9 they were within 1e-3 but for DenseNet169's at two (2.3e-3, 4.9e-3)
    np.testing.assert_allclose(fallback[1], fallback[0], atol=1e-3)


def test_gradcam_on_keras_layers_convnext_reads_timms_last_stage():
    """The Keras engine's own ConvNeXt (keras.applications' model, its Normalization and trailing
    LayerNormalization in), given timm's weights: the activations its default Grad-CAM layer
    reads are what timm's forward_features gives, the last stage's sum (not its residual branch,
    nor the trailing norm's output)."""
    from osteo.backbones.base import create
    from osteo.backbones.keras_apps import keras_gradcam_parts
    from osteo.backbones.port import _leaves, keras_backbone, port_backbone
    from osteo.classifier import Classifier
    from osteo.recipe import AugmentConfig
    from osteo.registry import get_backbone

    spec, size = get_backbone("convnext_tiny"), 64
    timm_backbone = create(spec, "timm", image_size=size, weights="none")
    timm_layer = timm_backbone.build()
    state, _ = timm_backbone.keras_port()
    twin = keras_backbone(spec, size)
    port_backbone(twin, state, spec.keras_port)
    model = Classifier("convnext_tiny", image_size=size, weights="none", impl="keras",
                       augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0)).build()
    own = {layer.name: layer for layer in _leaves(model.osteo_backbone.layer)}
    for layer in _leaves(twin):  # every weight but the trailing norm's (and the Normalization's constants)
        own[layer.name].set_weights(layer.get_weights())
    before, feature, _ = keras_gradcam_parts(model, spec)
    x = np.random.default_rng(7).uniform(0, 255, (2, size, size, 1)).astype(np.float32)
    h = x
    for layer in before:
        h = layer(h)
    got = keras.ops.convert_to_numpy(feature(h)[0])
    want = keras.ops.convert_to_numpy(timm_layer(np.repeat(x, 3, axis=-1), training=False))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("child, message", [
    ("import os, signal, sys; print('I0000 00:00:1 port.cc:153] a log line', file=sys.stderr); "
     "os.kill(os.getpid(), signal.SIGKILL)", "was killed by SIGKILL (out of memory?)"),
    ("import sys; print('the twin has no such layer', file=sys.stderr); "
     "print('W0000 00:00:1.2 port.cc:153] a log line after it', file=sys.stderr); sys.exit(1)",
     "failed (the twin has no such layer)"),
    ("import sys; print('the last line is no result')", "gave no result ('the last line is no result')"),
    ("print('{\"max_abs_diff\": 2e-4, \"max_abs_diff_uncalibrated\": 0.0, \"ported_to\": \"x\", \"runtime\": \"y\"}')",
     "the SavedModel's probabilities differ from osteo predict's by 0.0002 (over 0.0001) on 16 images"),
])
def test_a_port_child_that_fails_is_one_line_and_leaves_nothing(vgg_run, tmp_path, monkeypatch, child, message):
    """Killed (the out-of-memory killer), refused, silent, or a SavedModel off ``osteo predict``'s
    probabilities: one line naming why (not TensorFlow's last log line); no SavedModel, and neither
    its temporary nor the working folder left."""
    from osteo.errors import OsteoError

    monkeypatch.setattr(osteo_export, "_PORT_CHILD", child)
    out = tmp_path / "exports" / "sm"
    with pytest.raises(OsteoError) as e:
        export_run(vgg_run, "savedmodel", out)
    assert message in str(e.value) and "nothing written" in str(e.value) and "\n" not in str(e.value)
    assert not list(out.parent.iterdir())


def test_a_port_child_that_meets_a_full_disk_says_so_as_the_machines_error(vgg_run, tmp_path, monkeypatch):
    """The child's SavedModel write fails for want of room: the export raises the OSError it is, naming
    the export (the CLI's one line says to free space, not to export ONNX instead); nothing is left."""
    import errno

    full = ("import osteo.export as e\n"
            "def full(*a):\n    raise OSError(28, 'No space left on device')\n"
            "e.write_ported_savedmodel = full\n")
    monkeypatch.setattr(osteo_export, "_PORT_CHILD", full + osteo_export._PORT_CHILD)
    out = tmp_path / "exports" / "sm"
    with pytest.raises(OSError) as e:
        export_run(vgg_run, "savedmodel", out)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(out))
    assert not list(out.parent.iterdir())


def test_an_export_waiting_on_its_child_keeps_its_temporaries_from_another_exports_sweep(vgg_run, tmp_path,
                                                                                        monkeypatch):
    """A second export of the same target, started while the first's child still writes,
    sweeps the temporaries of killed exports only: the first's folder and its child's
    working folder, however old, are kept, and the first export completes."""
    child = ("import json, os, subprocess, sys\n"
             "out = sys.argv[4]\n"
             "code = ('import sys; from osteo.files import sweep_temporaries, temporaries_of; '\n"
             "        'print(len(sweep_temporaries(sys.argv[1], grace=-1e9, pattern=temporaries_of(sys.argv[2]))))')\n"
             "target = os.path.join(os.path.dirname(out), 'sm')\n"
             "swept = subprocess.run([sys.executable, '-c', code, os.path.dirname(out), target], check=True,\n"
             "                       capture_output=True, text=True).stdout.strip()\n"
             "assert swept == '0', swept\n"
             "open(os.path.join(out, 'saved_model.pb'), 'wb').close()\n"
             "print(json.dumps({'max_abs_diff': 0.0, 'max_abs_diff_uncalibrated': 0.0, 'ported_to': 'x', "
             "'runtime': 'y'}))\n")
    monkeypatch.setattr(osteo_export, "_PORT_CHILD", child)
    out = tmp_path / "exports" / "sm"
    assert export_run(vgg_run, "savedmodel", out) == out
    assert (out / "saved_model.pb").is_file() and (out / "osteo_export.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["sm"]


def test_a_killed_export_takes_its_child_with_it(vgg_run, tmp_path):
    """An export killed (SIGKILL) while its child writes the SavedModel leaves no child running
    on into its temporaries: the child dies with it. The export is killed at its named point
    right after it starts the child; the child here would wait for a signal for ever."""
    import psutil

    marker = f"# the child of {tmp_path}"  # in its command line: how the test finds it
    child = f"{marker}\nimport signal\nsignal.pause()\n"
    script = ("import sys; import osteo.export as e; from osteo.runs import RunDir\n"
              "e._PORT_CHILD = sys.argv[1]\ne.export_run(RunDir(sys.argv[2]), 'savedmodel', sys.argv[3])\n")
    proc = subprocess.run([sys.executable, "-c", script, child, str(vgg_run.path), str(tmp_path / "sm")],
                          capture_output=True, text=True, env={**os.environ, "OSTEO_KILL_AT": "export.child_started"})
    assert proc.returncode == -9, proc.stderr[-2000:]

    def running() -> list[psutil.Process]:  # the child, unless gone or a zombie no one reaps (which runs nothing)
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if any(marker in arg for arg in p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        return found

    deadline = time.monotonic() + 60
    while running():
        if time.monotonic() > deadline:
            for p in running():
                p.kill()
            pytest.fail("the export's child ran on after the export was killed")
        time.sleep(0.05)


def test_a_state_dict_that_is_not_the_architecture_ports_nothing():
    """A tensor missing, one left over, or one of another shape: one line naming it."""
    from osteo.backbones.base import create
    from osteo.backbones.port import keras_backbone, port_backbone
    from osteo.errors import OsteoError
    from osteo.registry import get_backbone

    spec = get_backbone("vgg16")
    backbone = create(spec, "timm", image_size=32, weights="none")
    backbone.build()
    state, _ = backbone.keras_port()
    twin = keras_backbone(spec, 32)
    with pytest.raises(OsteoError, match=r"has no 'features\.28\.bias'"):
        port_backbone(twin, {k: v for k, v in state.items() if k != "features.28.bias"}, "vgg")
    with pytest.raises(OsteoError, match=r"1 tensors of the timm state dict have no Keras weight \(pre_logits"):
        port_backbone(twin, {**state, "pre_logits.fc1.weight": np.zeros((4, 4), "float32")}, "vgg")
    with pytest.raises(OsteoError, match="'block1_conv1' have shapes"):
        port_backbone(twin, {**state, "features.0.bias": np.zeros(65, "float32")}, "vgg")


@pytest.fixture(scope="module")
def vgg_run(phantom_dir, tmp_path_factory, tiny_recipe) -> RunDir:
    """A finished one-epoch VGG16 run on the timm engine (32 px, from scratch), calibrated with T = 1.7."""
    from osteo.trainer import Trainer

    run = RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), backbone="vgg16", epochs=1,
                                     bootstrap=20)).run())
    assert run.read_recipe().model.impl == "timm"
    run.write_calibration({"temperature": TEMPERATURE})
    return run


@pytest.mark.heavy
def test_a_timm_run_exports_a_savedmodel_that_tensorflow_serves_without_osteo(vgg_run, phantom_dir, tmp_path,
                                                                            monkeypatch):
    """A timm run's SavedModel: written by Keras' layers on TensorFlow with the run's
    weights ported, and only if it gives ``osteo predict``'s probabilities; served by TensorFlow
    alone (no osteo), as float32 and as uint8, it gives the run's calibrated probabilities."""
    from pathlib import Path

    from export_consumer import consume

    from osteo.calibrate import apply_temperature
    from osteo.data.pipeline import SCALE, load_levels
    from osteo.predict import load_best

    target = vgg_run.path / "export" / "savedmodel"
    # another osteo first on PYTHONPATH and in the working folder (an old checkout): the child
    # runs this process's own
    poisoned = tmp_path / "checkout" / "osteo"
    poisoned.mkdir(parents=True)
    (poisoned / "__init__.py").write_text("raise ImportError('another osteo')\n")
    monkeypatch.chdir(poisoned.parent)
    monkeypatch.setenv("PYTHONPATH", str(poisoned.parent))
    assert export_run(vgg_run, "savedmodel") == target
    monkeypatch.undo()
    record = json.loads((target / "osteo_export.json").read_text())
    assert (record["engine"], record["ported_to"], record["preprocessing"]) == ("timm", "keras.applications VGG16",
                                                                                 "torch")
    assert record["parity"]["source"] == "validation" and record["temperature"] == TEMPERATURE
    assert max(record["parity"]["max_abs_diff"], record["parity"]["max_abs_diff_uncalibrated"]) <= TOLERANCE
    card = vgg_run.model_card_path.read_text()  # the run's card says what was exported, and its parity
    assert (f"ported into keras.applications VGG16; max |difference| from `osteo predict` "
            f"{record['parity']['max_abs_diff']:.1e} calibrated (the SavedModel as loaded back), "
            f"{record['parity']['max_abs_diff_uncalibrated']:.1e} uncalibrated") in card
    assert "16 validation images" in card

    data = vgg_run.read_recipe().data
    files = sorted(Path(phantom_dir).rglob("*.png"))[::20][:6]
    x = np.stack([load_levels(f.read_bytes(), data.image_size, data.resize)[0] / SCALE
                  for f in files]).astype(np.float32)
    images = {"float": x, "uint8": np.clip(np.round(x), 0, 255).astype(np.uint8)}
    info, got = consume("savedmodel", target, images, tmp_path)
    assert info == {"signatures": ["serve", "serve_uint8", "serving_default"]}
    best = load_best(vgg_run)
    for kind, ref in (("uint8", "uint8"), ("uint8_cast", "uint8"), ("float", "float")):
        want = apply_temperature(best.predict(images[ref].astype(np.float32), verbose=0), TEMPERATURE)
        assert np.abs(got[kind] - want).max() <= TOLERANCE, kind
    assert np.abs(np.diff(want, axis=0)).max() > 1e-4  # the images give different answers: a real comparison
