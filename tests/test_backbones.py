import importlib
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import save_legacy_h5

import osteo
from osteo.backbones.base import create
from osteo.backbones.keras_apps import keras_layer_groups
from osteo.classifier import GrayToRGB, Preprocess
from osteo.errors import OsteoError
from osteo.registry import get_backbone, list_backbones

STUDY = ("vgg16", "vgg19", "densenet169", "convnext_tiny")


def test_registry_lists_the_study_and_more_and_hides_the_test_backbone():
    names = list_backbones()
    assert set(STUDY) | {"resnet50", "efficientnetv2_b0", "mobilenetv3_large"} <= set(names)
    assert "tiny" not in names and "tiny" in list_backbones(include_test=True)
    assert names == sorted(names)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(OsteoError) as e:
        get_backbone("vgg61")
    assert "unknown model 'vgg61'" in str(e.value)
    assert "convnext_tiny, densenet169" in str(e.value)


@pytest.mark.parametrize("name", [n for n in list_backbones() if get_backbone(n).reference_module])
def test_preprocessing_equals_keras_applications(name):
    spec = get_backbone(name)
    module = importlib.import_module(f"keras.applications.{spec.reference_module}")
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = module.preprocess_input(rgb.copy())
    got = keras.ops.convert_to_numpy(Preprocess(spec.preprocessing)(rgb))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_models_with_their_own_preprocessing_expect_0_255():
    # ConvNeXt, EfficientNetV2 and MobileNetV3 rescale inside the model; the study fed
    # ConvNeXt [0, 1] pixels, which its built-in normalisation then squashed.
    for name in ("convnext_tiny", "efficientnetv2_b0", "mobilenetv3_large"):
        spec = get_backbone(name)
        assert spec.preprocessing == "none"
        assert spec.constructor_kwargs == {"include_preprocessing": True}


def test_gray_is_tiled_to_three_channels():
    x = np.arange(12, dtype="float32").reshape(1, 2, 2, 3)[..., :1]
    out = keras.ops.convert_to_numpy(GrayToRGB()(x))
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_sizes_and_features():
    for name in list_backbones():
        spec = get_backbone(name)
        assert spec.default_size == 224 and spec.min_size == 32
    with pytest.raises(OsteoError, match="minimum of 32"):
        get_backbone("vgg16").check_size(16)


@pytest.mark.parametrize("name", ["tiny", "vgg16"])
def test_local_weights_file_loads_with_equal_outputs(name, tmp_path):
    spec = get_backbone(name)
    keras.utils.set_random_seed(1)
    a = _keras(spec, "none")
    path = tmp_path / f"{name}.weights.h5"
    a.save_weights(path)
    keras.utils.set_random_seed(2)  # a different random init, then the file's weights
    b = _keras(spec, str(path))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a(x)), keras.ops.convert_to_numpy(b(x)), atol=1e-6)
    assert b.output_shape[-1] == spec.feature_size


def test_a_checkpoint_starts_a_new_run_on_keras_layers_scaled_as_it_was_trained(tmp_path):
    """A run's checkpoint says its input scaling (a run trained with model.preprocessing=torch on a
    backbone whose own is tf): a new run started from it on Keras' layers scales alike, and the model
    it builds loads the file; a file osteo did not write keeps the backbone's own scaling."""
    from osteo.classifier import Classifier
    from osteo.files import save_weights
    from osteo.h5files import input_scaling, scaling_attrs
    from osteo.recipe import Recipe, resolve

    trained = Classifier("tiny", image_size=32, weights="none", impl="keras", preprocessing="torch")
    model = trained.build()
    save_weights(model, tmp_path / "best.weights.h5", scaling_attrs(model))
    r = Recipe()
    r.model.backbone, r.model.weights = "tiny", str(tmp_path / "best.weights.h5")
    m = resolve(r).model
    assert (m.impl, m.preprocessing) == ("keras", "torch") and get_backbone("tiny").preprocessing == "tf"
    assert input_scaling(Classifier("tiny", image_size=32, weights=m.weights, impl=m.impl,
                                    preprocessing=m.preprocessing).build()) == "torch"
    _keras(get_backbone("tiny"), "none").save_weights(tmp_path / "plain.weights.h5")
    r.model.weights = str(tmp_path / "plain.weights.h5")
    assert resolve(r).model.preprocessing == "tf"


def test_a_weights_file_that_cannot_be_read_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """No permission to read it (root ignores modes, so the open is made to fail here, as the system
    fails it): h5py's errno text and a fix about another backbone's file were said instead."""
    import os

    from osteo.registry import parse_weights

    path = tmp_path / "locked.weights.h5"
    _keras(get_backbone("tiny"), "none").save_weights(path)
    assert parse_weights(str(path)) == ("file", path)
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if os.fspath(p) == str(path) else real(p, *a, **k))
    # said as such whatever the engine asked for: before the engine is chosen by the file's kind
    from osteo.recipe import Recipe, resolve

    r = Recipe()
    r.model.backbone, r.model.weights, r.model.impl = "resnet50", str(tmp_path / "missing.weights.h5"), "timm"
    with pytest.raises(OsteoError, match=r"missing\.weights\.h5 not found"):
        resolve(r, backend="torch")
    with pytest.raises(OsteoError, match=r"^weights file .*locked\.weights\.h5 cannot be read \(Permission denied\); "
                                         r"make it readable \(e\.g\. chmod a\+r FILE\), or use --weights imagenet or "
                                         r"none$"):
        parse_weights(str(path))


def test_weights_file_of_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    _keras(get_backbone("tiny"), "none").save_weights(path)
    with pytest.raises(OsteoError, match="does not match backbone vgg16"):
        _keras(get_backbone("vgg16"), str(path))
    with pytest.raises(OsteoError, match="not found"):
        _keras(get_backbone("vgg16"), str(tmp_path / "missing.h5"))
    # a kin architecture's file: every tensor has a shape VGG16 has, and VGG16's groups are all in
    # it, but VGG19's third block has a fourth layer where VGG16's fourth block begins
    vgg19 = _keras(get_backbone("vgg19"), "none")
    vgg19.save_weights(tmp_path / "vgg19.weights.h5")
    with pytest.raises(OsteoError, match=r"does not match backbone vgg16: its layer block3_conv4 is where backbone "
                                         r"vgg16 has block4_conv1 \(another depth or architecture's"):
        _keras(get_backbone("vgg16"), str(tmp_path / "vgg19.weights.h5"))
    save_legacy_h5(vgg19, tmp_path / "vgg19.h5")  # the same, in the layout of keras.applications' downloads
    with pytest.raises(OsteoError, match=r"does not match backbone vgg16: its layer block3_conv4 \(layer 8 with "
                                         r"weights\) holds tensors of shapes \[\(3, 3, 256, 256\), \(256,\)\] where "
                                         r"block4_conv1 has \[\(3, 3, 256, 512\), \(512,\)\]"):
        _keras(get_backbone("vgg16"), str(tmp_path / "vgg19.h5"))
    with pytest.raises(OsteoError, match=r"holds 13 layers with weights where backbone vgg19 has 16"):
        _keras(get_backbone("vgg19"), str(save_legacy_h5(_keras(get_backbone("vgg16"), "none"), tmp_path / "vgg16.h5")))
    (tmp_path / "vgg19.weights.h5").rename(tmp_path / "vgg19-keras3.h5")
    with pytest.raises(OsteoError, match=r"is in Keras 3's own layout, which Keras reads only from a name ending in "
                                         r"\.weights\.h5: rename it so"):
        _keras(get_backbone("vgg19"), str(tmp_path / "vgg19-keras3.h5"))
    from safetensors.numpy import save_file

    save_file({"features.0.weight": np.zeros((4, 3, 3, 3), "float32")}, str(tmp_path / "timm.safetensors"))
    with pytest.raises(OsteoError, match=r"is a PyTorch state dict, which the timm engine reads: train on PyTorch"):
        _keras(get_backbone("tiny"), str(tmp_path / "timm.safetensors"))


# Run on PyTorch, in a process of its own (beside TensorFlow, torch's imports can crash): a timm
# module's state dict, every tensor drawn at random, saved as .pth, and its features for x
_TIMM_FILE = """
import sys
import numpy as np, torch
from osteo.backbones.timm_torch import _prune_unused, create_module
from osteo.registry import IMAGENET_MEAN_TORCH, IMAGENET_STD_TORCH, get_backbone
name, out, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = create_module(get_backbone(name).timm_name).eval()
_prune_unused(module, size)
gen = torch.Generator().manual_seed(7)
with torch.no_grad():
    for key, v in module.state_dict().items():
        if v.is_floating_point():
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5 if key.endswith(("running_var", "norm1.weight"))
                    else v + 0.05 * torch.randn(v.shape, generator=gen))
torch.save(module.state_dict(), out)
x = np.random.default_rng(3).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (IMAGENET_MEAN_TORCH, IMAGENET_STD_TORCH))
with torch.no_grad():
    y = module.forward_features((torch.from_numpy(x).permute(0, 3, 1, 2) - mean) / std).permute(0, 2, 3, 1)
np.savez(out + ".npz", x=x, y=y.numpy())
"""


def test_a_timm_weights_file_trains_on_keras_layers_on_tensorflow(tmp_path, monkeypatch):
    """On TensorFlow a timm state dict of a study backbone (a .pth here) is read by timm's module
    in a PyTorch process of its own and ported into Keras' layers: the plan says so, the input is
    scaled as timm's module was (torch mode: not VGG's caffe, also for torch.save's format under
    another name), and Keras' layers give timm's feature map. A file of another architecture is
    the timm engine's one-line refusal, with the keras engine's fix; without torch or timm, one
    line says what to install."""
    import os
    import subprocess
    import sys

    import osteo.backbones.keras_apps as keras_apps
    from osteo.device import Device, plan
    from osteo.files import host_tag
    from osteo.h5files import SCRATCH
    from osteo.recipe import Recipe, resolve

    path, size = tmp_path / "densenet169.pth", 32
    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))  # no entry of another test's: the child runs
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run([sys.executable, "-c", _TIMM_FILE, "densenet169", str(path), str(size)], env=env, check=True,
                   capture_output=True)
    spec = get_backbone("densenet169")
    chosen = plan(spec, Device(kind="cpu", name="cpu", cpu_class="avx2"), backend="tensorflow",
                  available=("tensorflow", "torch"), weights=str(path))
    assert chosen.impl == "keras" and "ported into Keras' layers" in chosen.why["impl"]
    requested = plan(spec, Device(kind="cpu", name="cpu", cpu_class="avx2"), impl="keras",
                     available=("tensorflow", "torch"), weights=str(path))
    assert requested.why["impl"].startswith("requested; the PyTorch state dict is read by timm's module")
    # torch.save's format under a name of its own, as training scripts save it: told by its bytes, so scaled
    # as timm's module was (it was read through timm's module, and scaled as Keras' VGG is: caffe); a damaged
    # .pth, by its name: the PyTorch reader's to refuse, not Keras'
    (tmp_path / "model_best.pth.tar").write_bytes(path.read_bytes())
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:4096])
    from osteo.device import torch_weights_file

    assert torch_weights_file(str(tmp_path / "model_best.pth.tar")) and torch_weights_file(str(tmp_path / "cut.pth"))
    assert not torch_weights_file("imagenet") and not torch_weights_file(str(tmp_path / "densenet169.pth.npz"))
    r = Recipe()
    r.model.backbone, r.model.weights, r.model.impl = "densenet169", str(path), "keras"
    assert resolve(r).model.preprocessing == "torch"
    for weights in (path, tmp_path / "model_best.pth.tar"):
        vgg = Recipe()
        vgg.model.backbone, vgg.model.weights, vgg.model.impl = "vgg16", str(weights), "keras"
        assert resolve(vgg).model.preprocessing == "torch"  # timm's VGG was trained so, not as Keras' (caffe)
    import tempfile

    # a child's folder (a copy of the weights) that a kill -9 left: removed by the next child
    left = Path(tempfile.mkdtemp(prefix=f"{SCRATCH}999999999@{host_tag()}-"))
    os.utime(left, (0, 0))
    engine = create(spec, "keras", image_size=size, weights=str(path), preprocessing="torch")
    layer = engine.build()
    assert not left.exists()
    with np.load(f"{path}.npz") as f:
        x, want = f["x"], f["y"]
    got = keras.ops.convert_to_numpy(layer(Preprocess("torch")(x), training=False))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
    assert np.abs(np.diff(want, axis=0)).max() > 1e-2 * np.abs(want).max()  # the images give different maps
    # what the child read is remembered by the file's content: the same bytes under another name (a
    # fold, a resume, a new run) are ported without a child; an entry of another reader (osteo's code,
    # timm's version), or damaged on the disk, is not used
    children = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: children.append(a) or run(*a, **k))
    (entry,) = (Path(os.environ["OSTEO_CACHE"]) / "ported-v1" / "densenet169").iterdir()
    copy = tmp_path / "renamed.pth"
    copy.write_bytes(path.read_bytes())
    again = create(spec, "keras", image_size=size, weights=str(copy), preprocessing="torch").build()
    assert not children
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(Preprocess("torch")(x), training=False)), got)
    remembered = keras_apps.PortedStates(spec)
    with np.load(entry) as f:
        assert remembered.recall(remembered.record(copy)).keys() == {k for k in f.files if k != "__osteo__"}
    with monkeypatch.context() as m:
        m.setattr(keras_apps.PortedStates, "reader", lambda self: "another")
        assert remembered.recall(remembered.record(copy)) is None
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 1
    entry.write_bytes(data)
    assert remembered.recall(remembered.record(copy)) is None and not children
    before = remembered.record(copy)  # a file replaced while the child read it: what it read is not kept
    copy.write_bytes(b"0" + path.read_bytes())
    entry.unlink()
    np.savez(tmp_path / "state.npz", w=np.zeros(3, np.float32))  # (what a child would have written)
    remembered.remember(copy, before, tmp_path / "state.npz")
    assert not entry.exists() and not any(entry.parent.iterdir())
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(OsteoError, match=r"^weights file .*densenet169\.pth does not match backbone vgg16: missing "
                                         r"features\.0\.bias.*; pass a weights file of timm's vgg16 or a Keras weights file of "
                                         r"vgg16, or --weights none") as e:
        create(get_backbone("vgg16"), "keras", image_size=size, weights=str(path)).build()
    assert "\n" not in str(e.value)
    assert not (Path(os.environ["OSTEO_CACHE"]) / "ported-v1" / "vgg16").exists()  # a refusal is not remembered
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "timm" else real(n, *a))
    with pytest.raises(OsteoError, match=r"is a PyTorch state dict, which Keras' layers read through timm's module: "
                                         r"that needs torch and timm; run `make install`"):
        keras_apps.timm_module_state(path, spec)


def test_ported_weights_are_kept_by_file_and_reader_the_three_used_last_per_backbone(tmp_path, monkeypatch):
    """The cache of what timm's module read from a weights file (PortedStates, without a child here):
    an entry per file and reader, so two osteo versions sharing a cache keep one each; the three
    entries used last per backbone are kept; a temporary of a writer that died is removed; an entry
    that cannot be used, or kept, is one warning each, and the file is read again; a cache where an
    entry cannot be marked used (read-only) still gives it."""
    import os

    from helpers import osteo_warnings

    import osteo.backbones.keras_apps as keras_apps
    from osteo.files import host_tag

    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path / "cache"))
    kept = keras_apps.PortedStates(get_backbone("densenet169"))
    written = tmp_path / "state.npz"
    files = []
    for i in range(4):
        files.append(tmp_path / f"w{i}.pth")
        files[-1].write_bytes(bytes([i]) * 10)

    def child_wrote() -> Path:  # each remembered state.npz is moved into the cache, as the child's is
        np.savez(written, w=np.arange(3, dtype=np.float32))
        return written

    for i, f in enumerate(files[:3]):
        kept.remember(f, kept.record(f), child_wrote())
        os.utime(kept.entry(kept.record(f)), (i + 1, i + 1))  # written in this order, long ago
    np.testing.assert_array_equal(kept.recall(kept.record(files[0]))["w"], np.arange(3))  # used now: kept
    dead = kept.folder / f".x.999999999@{host_tag()}-abc.tmp.npz"  # a writer killed mid-copy
    dead.write_bytes(b"cut")
    os.utime(dead, (0, 0))
    kept.remember(files[3], kept.record(files[3]), child_wrote())
    assert sorted(p.name for p in kept.folder.iterdir()) == sorted(kept.entry(kept.record(f)).name
                                                                  for f in (files[0], files[2], files[3]))
    with osteo_warnings() as said:
        with monkeypatch.context() as m:  # another osteo's reader: an entry of its own, beside this one's
            m.setattr(keras_apps.PortedStates, "reader", lambda self: "f" * 64)
            assert kept.recall(kept.record(files[3])) is None
            kept.remember(files[3], kept.record(files[3]), child_wrote())
            assert kept.recall(kept.record(files[3])) is not None
        twin = tmp_path / "w3.safetensors"  # the same bytes, read by safetensors' reader: not this entry
        twin.write_bytes(files[3].read_bytes())
        assert kept.record(twin)["file_sha256"] == kept.record(files[3])["file_sha256"]
        assert kept.recall(kept.record(twin)) is None
        with monkeypatch.context() as m:  # a cache it may read but not touch
            m.setattr(os, "utime", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
            assert kept.recall(kept.record(files[3])) is not None
        assert not said
        assert len(list(kept.folder.iterdir())) == 3  # files[2]'s, used longest ago, made room for it
        entry = kept.entry(kept.record(files[3]))
        entry.write_bytes(entry.read_bytes()[:100])
        assert kept.recall(kept.record(files[3])) is None
        assert said == [f"ported weights {entry} cannot be used (File is not a zip file); reading the weights file again"]
        said.clear()
        monkeypatch.setenv("OSTEO_CACHE", str(written))  # a file: no folder can be made there
        keras_apps.PortedStates(get_backbone("densenet169")).remember(files[0], kept.record(files[0]), child_wrote())
        assert said == [f"cannot keep ported weights in {written}/ported-v1/densenet169 (Not a directory): each run "
                        "reads w0.pth through timm's module again; set OSTEO_CACHE to a writable folder with room"]


def test_offline_imagenet_fails_fast_and_names_the_fix(tmp_path, monkeypatch, fails_fast_offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty weights cache
    fails_fast_offline("storage.googleapis.com", lambda: _keras(get_backbone("vgg16"), "imagenet"))


def _keras(spec, weights):
    return create(spec, "keras", image_size=32, weights=weights).build()


@pytest.mark.parametrize("layout", ["keras", "legacy"])
def test_a_weights_file_with_its_top_loads_the_backbone_and_leaves_the_top_unread(layout, tmp_path):
    """keras.applications' full files load on the Keras engine, as a state dict's classifier does on
    the timm engine: VGG16's top is three more layers; ConvNeXt's puts its head_layernorm where the
    model without a top has a LayerNormalization Keras named itself. The top's tensors are not read:
    a crafted one declaring 1.6 GB, compressed, changes nothing."""
    import h5py

    for name, build in (("vgg16", keras.applications.VGG16), ("convnext_tiny", keras.applications.ConvNeXtTiny)):
        keras.utils.set_random_seed(1)
        full = build(include_top=True, weights=None, input_shape=(32, 32, 3), classes=3)
        path = tmp_path / (f"{name}.weights.h5" if layout == "keras" else f"{name}.h5")
        save_legacy_h5(full, path) if layout == "legacy" else full.save_weights(path)
        top = [layer for layer in full.layers if layer.weights][-1]
        with h5py.File(path, "a") as f:  # the top's last tensor, declared huge
            group = f[top.name] if layout == "legacy" else f[f"layers/{_group_of(f, top.name)}/vars"]
            key = (top.name + "/" + top.weights[0].name) if layout == "legacy" else "0"
            shape = group[key].shape
            del group[key]
            group.create_dataset(key, shape=(20000, 20000), dtype="float32", compression="gzip", chunks=(1000, 1000))
        keras.utils.set_random_seed(2)
        b = _keras(get_backbone(name), str(path))
        assert shape != (20000, 20000) and len(b.weights) < len(full.weights)
        for ours, theirs in zip(b.weights, full.weights):  # the backbone's weights come first, in layer order
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
        if layout == "keras":  # osteo names the groups Keras reads as Keras does; the rest is the top
            with h5py.File(path) as f:
                rest = {f[f"layers/{k}/vars"].attrs["name"] for k in f["layers"]} - {
                    f[f"{k}/vars"].attrs["name"] for k in keras_layer_groups(b)}
            assert rest == ({"flatten", "fc1", "fc2", "predictions"} if name == "vgg16"
                            else {"convnext_tiny_head_gap", "convnext_tiny_head_dense"})


@pytest.mark.parametrize("layout", ["keras", "legacy", "archive", "osteo"])
def test_a_backbone_nested_in_a_larger_model_loads_from_that_models_file(layout, tmp_path):
    """The files a Keras user has: a model built around the backbone (frozen, as transfer learning
    does), saved as .weights.h5, as a whole .h5, or as a .keras archive, and an osteo run's own
    checkpoint. The legacy layout lists a frozen backbone's BatchNorm statistics among its other
    weights, not after them: matched by name, not by order (by order, tiny's gamma and moving
    mean, both of shape (8,), would swap)."""
    keras.utils.set_random_seed(1)
    if layout == "osteo":
        from osteo.classifier import Classifier
        from osteo.recipe import study_protocol

        recipe = study_protocol("tiny")
        recipe.model.impl, recipe.data.image_size = "keras", 32
        model = Classifier.from_recipe(recipe, weights="none").build()
        base = next(layer for layer in model.layers if layer.name == "tiny")
    else:
        base = _keras(get_backbone("tiny"), "none")
        base.trainable = False
        model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Flatten(), keras.layers.Dense(3)])
    for layer in base.layers:  # BatchNorm statistics unlike their gamma and beta
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 0.25, "float32"))
    path = tmp_path / {"keras": "m.weights.h5", "legacy": "m.h5", "archive": "m.keras", "osteo": "best.weights.h5"}[layout]
    if layout in ("keras", "osteo"):
        model.save_weights(path)
    elif layout == "legacy":
        save_legacy_h5(model, path)
    else:
        model.save(path)
    keras.utils.set_random_seed(2)
    loaded = _keras(get_backbone("tiny"), str(path))
    for ours, theirs in zip(loaded.weights, base.weights):
        assert ours.path == theirs.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def test_a_whole_convnext_h5_loads_whatever_numbers_keras_gave_its_unnamed_weights(tmp_path):
    """ConvNeXt's layer scales and last LayerNormalization are named by Keras, numbered per process
    (layer_scale/variable_18, layer_normalization_1): a whole .h5 loaded on the first build in a
    process and not the second (a second fold), or never, when saved by a process that built more."""
    keras.utils.set_random_seed(1)
    _keras(get_backbone("convnext_tiny"), "none")  # the numbers move on
    base = _keras(get_backbone("convnext_tiny"), "none")
    path = save_legacy_h5(keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Flatten(),
                                          keras.layers.Dense(3)]), tmp_path / "m.h5")
    for seed in (2, 3):
        keras.utils.set_random_seed(seed)
        loaded = _keras(get_backbone("convnext_tiny"), str(path))
        for ours, theirs in zip(loaded.weights, base.weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def test_a_nested_backbone_file_that_is_not_one_backbones_is_refused_before_a_weight_changes(tmp_path):
    import zipfile

    import h5py

    a, b = _keras(get_backbone("tiny"), "none"), _keras(get_backbone("tiny"), "none")
    x = keras.Input((32, 32, 3))
    two = keras.Model(x, keras.layers.Concatenate()([keras.Sequential([a], name="wrap")(x), b(x)]))
    with pytest.raises(OsteoError, match=r"holds 2 models like tiny; save the one to start from alone"):
        _keras(get_backbone("tiny"), str(save_legacy_h5(two, tmp_path / "two.h5")))
    one = keras.Sequential([keras.Input((32, 32, 3)), a, keras.layers.Flatten(), keras.layers.Dense(3)])
    save_legacy_h5(one, tmp_path / "one.h5")
    with h5py.File(tmp_path / "one.h5", "a") as f:  # a gamma of a shape another layer's gamma has
        del f["tiny/tiny_block1_bn/gamma"]
        f["tiny/tiny_block1_bn/gamma"] = np.ones(16, "float32")
    keras.utils.set_random_seed(5)
    target = _keras(get_backbone("tiny"), "none")
    before = [keras.ops.convert_to_numpy(v) for v in target.weights]
    with pytest.raises(OsteoError, match=r"its tensor /tiny/tiny_block1_bn/gamma has the shape \(16,\) where "
                                         r"tiny_block1_bn/gamma has \(8,\)"):
        from osteo.backbones.keras_apps import load_weights_file

        load_weights_file(target, tmp_path / "one.h5", "tiny")
    assert all(np.array_equal(w, keras.ops.convert_to_numpy(v)) for w, v in zip(before, target.weights))
    one.save(tmp_path / "one.keras")  # its weights' deflate stream damaged: one line, not zlib's traceback
    with zipfile.ZipFile(tmp_path / "one.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    with zipfile.ZipFile(tmp_path / "bad.keras", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    raw = bytearray((tmp_path / "bad.keras").read_bytes())
    start = raw.find(b"model.weights.h5") + len("model.weights.h5")
    raw[start + 200:start + 600] = bytes(range(256)) + bytes(144)
    (tmp_path / "bad.keras").write_bytes(bytes(raw))
    with pytest.raises(OsteoError, match=r"is a damaged \.keras archive") as e:
        _keras(get_backbone("tiny"), str(tmp_path / "bad.keras"))
    assert "\n" not in str(e.value)


def _group_of(f, layer_name):
    return next(k for k in f["layers"] if f[f"layers/{k}/vars"].attrs.get("name") == layer_name)


def test_only_the_backbones_and_the_device_plan_compare_engine_names():
    """The engine is chosen once (osteo.device) and asked, never named, elsewhere (issue 17)."""
    root = Path(osteo.__file__).parent
    engine = r"""["']timm["']"""  # "keras" is also an export format; an engine test names impl
    compares = re.compile(rf"""(?:==|!=)\s*{engine}|{engine}\s*(?:==|!=)|\bin\s*[\(\[{{]\s*{engine}"""
                          r"""|\bimpl\s*(?:==|!=|\bin\b)|timm_name["']\s*,\s*None\)""")
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("backbones/") or rel == "device.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if compares.search(line.split("#")[0]):
                found.append(f"osteo/{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    # the pattern does catch what it is for
    assert compares.search('if recipe.model.impl == "timm":') and compares.search('if getattr(layer, "timm_name", None):')


def test_a_crafted_weights_file_is_refused_from_its_declared_shapes(tmp_path):
    """A 62 KB file declaring a compressed 20000x20000 tensor (1.6 GB inflated) is refused from
    the shape HDF5 declares: the message names that shape, which only the metadata carries."""
    import h5py

    path = tmp_path / "crafted.weights.h5"
    with h5py.File(path, "w") as f:
        # where Keras reads the kernel of tiny's first Conv2D, tiny_block1_conv
        f.create_dataset("layers/conv2d/vars/0", shape=(20000, 20000), dtype="float32",
                         compression="gzip", fillvalue=0.0, chunks=(1000, 1000))
    assert path.stat().st_size < 100_000
    with pytest.raises(OsteoError, match=r"does not match backbone tiny: it holds a tensor of shape \(20000, 20000\) that no weight of the model has"):
        _keras(get_backbone("tiny"), str(path))
    linked = tmp_path / "linked.weights.h5"
    with h5py.File(linked, "w") as f:
        f["layers"] = h5py.ExternalLink(str(path), "/layers")
    with pytest.raises(OsteoError, match=r"links to another file") as e:
        _keras(get_backbone("tiny"), str(linked))
    assert "\n" not in str(e.value)
    # a group linked into itself is walked once (it hung the walk, whose paths grew without end)
    _keras(get_backbone("tiny"), "none").save_weights(tmp_path / "loop.weights.h5")
    with h5py.File(tmp_path / "loop.weights.h5", "a") as f:
        f["layers/loop"] = f["layers"]  # layers/loop/loop/loop/...
    _keras(get_backbone("tiny"), str(tmp_path / "loop.weights.h5"))
    # a group Keras reads, linked under a second name the walk meets first: checked where Keras reads it
    _keras(get_backbone("tiny"), "none").save_weights(tmp_path / "twice.weights.h5")
    with h5py.File(tmp_path / "twice.weights.h5", "a") as f:
        f.move("layers/conv2d", "aaa")
        f["layers/conv2d"] = f["aaa"]
        del f["aaa/vars/0"]
        f["aaa/vars"].create_dataset("0", shape=(2**28,), dtype="float32", compression="gzip", chunks=(2**20,))
    with pytest.raises(OsteoError, match=r"holds a tensor of shape \(268435456,\) that no weight of the model has"):
        _keras(get_backbone("tiny"), str(tmp_path / "twice.weights.h5"))
    # a tensor of a shape the model has, in a layer that has another: named with its layer, before
    # Keras reads the file (Keras' own refusal names a "nested container")
    _keras(get_backbone("tiny"), "none").save_weights(tmp_path / "shape.weights.h5")
    with h5py.File(tmp_path / "shape.weights.h5", "a") as f:
        gamma = f"layers/{_group_of(f, 'tiny_block1_bn')}/vars/0"
        assert f[gamma].shape == (8,)
        del f[gamma]
        f[gamma] = np.ones(16, "float32")  # the shape of tiny_block2_bn's gamma
    with pytest.raises(OsteoError, match=r"does not match backbone tiny: its layer tiny_block1_bn "
                                         r"\(layers/batch_normalization\) holds tensors of shapes "
                                         r"\[\(8,\), \(8,\), \(8,\), \(16,\)\] where backbone tiny's has "
                                         r"\[\(8,\), \(8,\), \(8,\), \(8,\)\]") as e:
        _keras(get_backbone("tiny"), str(tmp_path / "shape.weights.h5"))
    assert "\n" not in str(e.value)
    # the legacy layout: a kernel of the model's shape whose elements are 400 kB strings, refused unread
    legacy = save_legacy_h5(_keras(get_backbone("tiny"), "none"), tmp_path / "strings.h5")
    with h5py.File(legacy, "a") as f:
        del f["tiny_block1_conv/tiny_block1_conv/kernel"]
        f.create_dataset("tiny_block1_conv/tiny_block1_conv/kernel", shape=(3, 3, 3, 8), dtype="S400000",
                         compression="gzip")
    with pytest.raises(OsteoError, match=r"holds a tensor of type \|S400000 where weights are numbers"):
        _keras(get_backbone("tiny"), str(legacy))


def test_the_readmes_tables_are_the_registrys():
    """README's decisions and stages tables are generated from osteo.registry; this keeps them so."""
    from osteo.registry import decisions_markdown, stages_markdown

    readme = (Path(osteo.__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for tag, table in (("decisions", decisions_markdown()), ("stages", stages_markdown())):
        block = re.search(rf"<!-- {tag}: [^>]*-->\n(.*?)\n<!-- /{tag} -->", readme, re.S)
        assert block, f"README.md lost its {tag} table"
        assert block.group(1) == table, f"README.md's {tag} table is stale; paste osteo.registry.{tag}_markdown():\n{table}"


def test_a_librarys_long_error_is_quoted_to_a_sentence_or_word_end():
    """A truncated .pth quoted by osteo's weights error read "...your checkpoint file is; pass ..."."""
    from osteo.errors import SHORT, short

    long = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is " * 4).strip()
    said = short(RuntimeError(long))
    assert len(said) <= SHORT + 4 and said.endswith("directory. ...") and long.startswith(said[:-4])
    words = RuntimeError("word " * 80)
    assert short(words).endswith("word ...") and len(short(words)) <= SHORT + 4
    assert short(RuntimeError("a\n  short   one")) == "a short one" and short(RuntimeError()) == "RuntimeError"
    path = "cannot open /data/" + "x" * 300  # one long word: cut in it, not before it
    assert short(RuntimeError(path)) == path[:SHORT] + " ..."


def test_which_engine_a_weights_file_is_for_is_asked_again_when_the_file_changes(tmp_path):
    """Routing asks once per file version whether a Keras weights file holds a PyTorch module's state
    dict (a timm run's checkpoint, for the timm engine) or Keras' layers' tensors; a file written again at
    the same path (another size, another mtime) is another version, asked again, not the first's answer."""
    import os

    import h5py

    from osteo.device import keras_weights_file

    path = tmp_path / "backbone.weights.h5"
    with h5py.File(path, "w") as f:  # Keras' layers name their tensors 0, 1 ...
        f.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 1, 4), "float32"))
    assert keras_weights_file(str(path)) and keras_weights_file(str(path))
    with h5py.File(path, "w") as f:  # a TorchModuleWrapper stores the state dict under its own names
        g = f.create_group("layers/timm_layer/torch_module_wrapper/vars")
        g.create_dataset("stem.0.weight", data=np.zeros((4, 1, 3, 3), "float32"))
        g.create_dataset("stem.0.bias", data=np.zeros(4, "float32"))
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution: another version
    assert not keras_weights_file(str(path))
