"""The PyTorch engine: timm's module inside the Keras model (osteo.backbones.timm_torch).

These tests need the PyTorch backend, fixed when Keras is imported: ``make test`` runs
this file a second time with ``KERAS_BACKEND=torch`` (the TensorFlow pass skips it).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":  # before torch is imported: beside TensorFlow, triton's import can crash
    pytest.skip("the PyTorch engine: make test runs this file with KERAS_BACKEND=torch", allow_module_level=True)

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from helpers import save_legacy_h5  # noqa: E402

from osteo.backbones.timm_torch import TimmLayer  # noqa: E402
from osteo.classifier import Classifier  # noqa: E402
from osteo.errors import OsteoError  # noqa: E402
from osteo.recipe import AugmentConfig  # noqa: E402

NO_AUG = AugmentConfig(flip=False, zoom=0.0, shear=0.0)


def _module_inputs(clf: Classifier, images: np.ndarray) -> torch.Tensor:
    """What the timm module receives for ``images`` (a forward pre-hook on its first convolution)."""
    seen = []
    first = clf.backbone.module.get_submodule(clf.backbone.module.pretrained_cfg["first_conv"])
    hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        clf.model.predict(images, verbose=0)
    finally:
        hook.remove()
    return seen[0].float().cpu()


@pytest.mark.parametrize("name", ["tiny", "convnext_tiny"])
def test_model_input_equals_timms_own_transform(name):
    """osteo's gray [0, 255] image, tiled to RGB and scaled by the module's pretrained_cfg, is
    exactly what timm's resolve_data_config transform makes of the same image."""
    from PIL import Image

    clf = Classifier(name, image_size=32, weights="none", augment=NO_AUG, impl="timm")
    clf.build()
    cfg = timm.data.resolve_data_config({}, model=clf.backbone.module)
    assert (cfg["mean"], cfg["std"]) == (clf.backbone.config["mean"], clf.backbone.config["std"])
    gray = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    # the image is already at the input size, so timm's resize and crop leave it as it is
    transform = timm.data.create_transform(**{**cfg, "input_size": (3, 32, 32), "crop_pct": 1.0})
    want = transform(Image.fromarray(gray).convert("RGB"))[None]
    got = _module_inputs(clf, gray[None, :, :, None].astype("float32"))
    assert got.is_contiguous(memory_format=torch.channels_last)  # handed over without a copy to NCHW
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if name == "tiny":  # timm's test_resnet: mean 0.5, std 0.5 (not ImageNet's)
        assert cfg["mean"] == (0.5, 0.5, 0.5)


def test_features_are_the_modules_own_in_channels_last_and_the_head_is_pruned():
    clf = Classifier("convnext_tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm")
    model = clf.build()
    layer = clf.backbone
    assert "head" in layer.dropped  # ConvNeXt's head norm: not used by forward_features, not trained
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in layer.module.parameters() if p.dim() == 4)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x, training=False))
    assert out.shape == (2, 1, 1, 768) and model.get_layer("convnext_tiny").output.shape == (None, 1, 1, 768)
    ref = layer.module.eval().forward_features((torch.as_tensor(x).permute(0, 3, 1, 2) - layer._mean) / layer._std)
    np.testing.assert_allclose(out, ref.permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)


def test_vgg_keeps_only_its_convolutions():
    """timm's VGG carries a 120M-parameter pre_logits block that forward_features never uses."""
    layer = TimmLayer("vgg16", "vgg16.tv_in1k", image_size=32)
    assert layer.dropped == ("pre_logits",)
    assert sum(p.numel() for p in layer.module.parameters()) == 14_714_688  # keras.applications VGG16, no top


def test_mixed_precision_runs_the_module_under_autocast():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm")
        clf.build()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    dtypes = []
    conv = next(m for m in clf.backbone.module.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    probs = clf.model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0)
    assert dtypes == [torch.bfloat16] and probs.dtype == np.float32
    assert all(p.dtype == torch.float32 for p in clf.backbone.module.parameters())  # float32 master weights


def test_phases_freeze_and_unfreeze_the_modules_parameters():
    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm")
    clf.build()
    params = dict(clf.backbone.module.named_parameters())
    bn = {f"{prefix}.{n}" for prefix, m in clf.backbone.module.named_modules()
          if isinstance(m, torch.nn.BatchNorm2d) for n, _ in m.named_parameters(recurse=False)}
    assert bn
    clf.freeze_backbone()
    assert not any(p.requires_grad for p in params.values())
    assert clf.trainable_counts()["backbone_trainable"] == 0
    clf.unfreeze_backbone(top_stages=1)  # the second stage (layer3, layer4) only, never BatchNorm's scale and shift
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(n.startswith(("layer3.", "layer4.")) and n not in bn for n in trainable)
    assert any(n.startswith("layer3.") for n in trainable)
    assert {id(v.value) for v in clf.backbone.trainable_weights} == {id(params[n]) for n in trainable}
    clf.unfreeze_backbone(0)
    assert {n for n, p in params.items() if p.requires_grad} == set(params) - bn


@pytest.mark.parametrize("engine", ["keras", "timm"])
def test_unfreezing_again_trains_what_the_new_depth_says_on_both_engines(engine):
    """unfreeze(1) and then unfreeze(0) left the keras engine at the top stage only."""
    def counts(*depths, freeze_bn=True):
        clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl=engine, freeze_bn=freeze_bn)
        clf.build()
        clf.freeze_backbone()
        for depth in depths:
            clf.unfreeze_backbone(depth)
        return clf.trainable_counts()["backbone_trainable"]

    assert 0 < counts(1) < counts(0)
    assert counts(1, 0) == counts(0) and counts(0, 1) == counts(1) and counts(1, 2) == counts(2)
    assert counts(1, 0, freeze_bn=False) == counts(0, freeze_bn=False) > counts(0)


@pytest.mark.parametrize("engine", ["keras", "timm"])
def test_batchnorm_frozen_in_a_backbone_from_scratch_is_said_on_both_engines(engine):
    """freeze_bn with weights none keeps BatchNorm's initial statistics while the backbone fine-tunes:
    osteo train warns, with the backbone's count of BatchNorm layers, where it has any, on either engine."""
    from osteo.recipe import fine_tune_protocol, study_protocol
    from osteo.trainer import frozen_statistics_warning

    def recipe(backbone, protocol=fine_tune_protocol, **model):
        r = protocol(backbone)
        r.model.weights = "none"
        for k, v in model.items():
            setattr(r.model, k, v)
        return r

    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl=engine)
    clf.build()
    assert clf.batchnorms > 0
    said = frozen_statistics_warning(recipe("tiny"), clf)
    assert f"tiny's {clf.batchnorms} BatchNorm layers keep their initial statistics" in said
    assert "model.freeze_bn=false" in said
    assert frozen_statistics_warning(recipe("tiny", freeze_bn=False), clf) == ""
    assert frozen_statistics_warning(recipe("tiny", weights="imagenet"), clf) == ""
    assert frozen_statistics_warning(recipe("tiny", study_protocol), clf) == ""  # the backbone never trains
    convnext = Classifier("convnext_tiny", image_size=32, weights="none", augment=NO_AUG, impl=engine)
    convnext.build()  # LayerNorm only: nothing to say
    assert convnext.batchnorms == 0
    assert frozen_statistics_warning(recipe("convnext_tiny"), convnext) == ""


def test_channels_first_is_the_same_model_in_another_memory_format():
    """The timm engine channels-first (device.choose_layout: VGG on AVX2 CPUs) keeps its module in
    PyTorch's default layout and computes what the channels-last one does, weight for weight."""
    x = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    last, first = (Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm", channels_last=cl)
                   for cl in (True, False))
    last.build(), first.build()
    first.model.set_weights(last.model.get_weights())
    conv = {c: next(w for w in clf.backbone.module.parameters() if w.dim() == 4) for c, clf in (("last", last),
                                                                                              ("first", first))}
    assert conv["last"].is_contiguous(memory_format=torch.channels_last) and not conv["last"].is_contiguous()
    assert conv["first"].is_contiguous()
    assert first.backbone.channels_last is False and last.backbone.channels_last is True
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first.model(x, training=False)),
                               keras.ops.convert_to_numpy(last.model(x, training=False)), rtol=1e-4, atol=1e-5)


def test_a_run_trained_channels_first_predicts_its_splits_channels_last_as_osteo_predict(phantom_dir, tmp_path,
                                                                                         tiny_recipe, monkeypatch):
    """Inference runs channels-last whatever the training layout (measured faster for every study
    backbone, VGG on AVX2 included, where channels-first trains faster): osteo predict's model
    (load_best) is, and a run trained channels-first predicts its val and test splits, on which
    its temperature and thresholds are chosen, with that same model, not its training one."""
    import torch

    from osteo import device
    from osteo.predict import load_best
    from osteo.trainer import Trainer

    def first_conv(model):
        module = next(layer for layer in model.layers if hasattr(layer, "module")).module
        return next(p for p in module.parameters() if p.dim() == 4)

    monkeypatch.setattr(device, "choose_layout", lambda *args: (False, "channels-first: a test's decision"))
    predicted = []
    predict = keras.Model.predict
    monkeypatch.setattr(keras.Model, "predict", lambda self, *a, **k: predicted.append(self) or predict(self, *a, **k))
    recipe = tiny_recipe(phantom_dir, tmp_path, epochs=1, steps_per_epoch=1, bootstrap=0)
    recipe.model.impl = "timm"
    trainer = Trainer(recipe)
    run = trainer.run()
    assert trainer.clf.backbone.channels_last is False and first_conv(trainer.model).is_contiguous()  # trained so
    assert predicted and all(m is not trainer.model for m in predicted)
    for model in [*predicted, load_best(run)]:
        conv = first_conv(model)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_the_trainer_builds_the_timm_engine_in_the_plans_memory_format(phantom_dir, tmp_path, tiny_recipe,
                                                                       monkeypatch):
    """The plan's layout (device.choose_layout, asked with the run's image size) is the one the run's
    timm module trains in, and env.json says which and why."""
    from osteo import device
    from osteo.trainer import Trainer

    asked = []
    monkeypatch.setattr(device, "choose_layout",
                        lambda *args: asked.append(args) or (False, "channels-first: a test's decision"))
    recipe = tiny_recipe(phantom_dir, tmp_path, epochs=1, steps_per_epoch=1)
    recipe.model.impl = "timm"
    trainer = Trainer(recipe).setup()
    assert asked and asked[-1][4] == recipe.data.image_size == 32
    assert trainer.clf.engine.channels_last is False and trainer.clf.backbone.channels_last is False
    assert next(w for w in trainer.clf.backbone.module.parameters() if w.dim() == 4).is_contiguous()
    env = trainer.run_dir.read_env()
    assert env["device"]["channels_last"] is False
    assert env["device"]["why"]["layout"] == "channels-first: a test's decision"
    trainer._held.close()  # as a killed run's: its lock gone, its directory left to --resume

    # resumed where the decision has changed since (osteo's measurements, a size threshold): the run keeps its own
    from osteo.recipe import resolve
    from osteo.registry import get_backbone

    monkeypatch.setattr(device, "choose_layout", lambda *args: (True, "channels-last: a later decision"))
    shared = device.plan(get_backbone("tiny"), device.probe(), backend="torch", impl="timm", image_size=32)
    resumed = Trainer(resolve(trainer.run_dir.read_recipe(), trained=True), resume=trainer.run_dir, plan=shared)
    resumed.setup()
    assert resumed.clf.backbone.channels_last is False and resumed.plan.channels_last is False
    assert shared.channels_last is True  # a cross-validation's plan, shared by its folds, is not changed
    env = resumed.run_dir.read_env()
    assert env["device"]["channels_last"] is False
    assert env["device"]["why"]["layout"] == ("channels-first, the run's own: a run resumes in the memory format it "
                                              "started in (a new one would take channels-last: a later decision)")
    resumed._held.close()


@pytest.mark.parametrize("engine", ["keras", "timm"])
def test_batchnorm_frozen_for_fine_tuning_keeps_its_statistics_on_both_engines(engine):
    """Unfrozen with freeze_bn (the default with pretrained weights), a training step leaves every
    BatchNorm's running statistics as they were, on both engines; without freeze_bn they move,
    except in the stages fine-tuning leaves frozen."""
    x = np.random.default_rng(4).uniform(0, 255, (8, 32, 32, 1)).astype("float32")

    def statistics(clf) -> dict[str, np.ndarray]:
        if engine == "timm":
            return {k: v.detach().cpu().numpy().copy() for k, v in clf.backbone.module.state_dict().items()
                    if "running_" in k}
        return {v.path: np.array(v.numpy()) for v in clf.backbone.weights if "moving_" in v.path}

    for freeze_bn, top in ((True, 0), (False, 0), (False, 1)):
        clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl=engine, freeze_bn=freeze_bn)
        clf.build()
        clf.freeze_backbone()
        clf.unfreeze_backbone(top)
        before = statistics(clf)
        assert before
        clf.model(x, training=True)
        after = statistics(clf)
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        if freeze_bn:
            assert moved == []
        elif top == 0:
            assert sorted(moved) == sorted(before)
        else:  # the top stage learns: its BatchNorms move, the frozen stage's keep theirs (Keras' rule)
            assert 0 < len(moved) < len(before), (engine, moved)


@pytest.mark.parametrize("engine", ["keras", "timm"])
def test_built_from_scratch_with_frozen_batchnorm_every_convolution_learns_on_both_engines(engine):
    """timm builds a ResNet block's last BatchNorm at scale 0 (zero_init_last); frozen (freeze_bn, with
    weights none) it stayed 0, and only the stem and the shortcut convolutions learned on the timm
    engine (5 of ResNet50's 53), every one on Keras'."""
    x = np.random.default_rng(5).uniform(0, 255, (6, 32, 32, 1)).astype("float32")
    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl=engine, freeze_bn=True)
    clf.build()
    clf.freeze_backbone()
    clf.unfreeze_backbone(0)

    def kernels() -> dict[str, np.ndarray]:
        return {v.path: keras.ops.convert_to_numpy(v).copy() for v in clf.backbone.weights
                if v.trainable and len(v.shape) == 4}

    before = kernels()
    clf.model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    clf.model.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2]))
    after = kernels()
    assert len(before) >= 2 and [k for k in before if np.array_equal(before[k], after[k])] == [], engine


def _timm_state(name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()  # with its classifier, as timm saves them


def test_local_weights_files_load_and_are_checked(tmp_path):
    from safetensors.torch import save_file

    state = _timm_state("test_resnet", 1)
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0, global_pool="")
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    cfg = ref.pretrained_cfg
    want = ref.eval().forward_features((torch.as_tensor(x).permute(0, 3, 1, 2) / 255 - torch.tensor(cfg["mean"])
                                        .view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
    for f in ("w.pth", "w.safetensors"):
        layer = TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / f))
        got = keras.ops.convert_to_numpy(layer(x, training=False))
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)
    # a torchvision checkpoint: its classifier under torchvision's names (a VGG's three linear layers)
    torchvision = {**state, "classifier.0.weight": torch.zeros(8, 4), "classifier.6.bias": torch.zeros(1000)}
    torch.save(torchvision, tmp_path / "tv.pth")
    got = keras.ops.convert_to_numpy(TimmLayer("tiny", "test_resnet", image_size=32,
                                               weights=str(tmp_path / "tv.pth"))(x, training=False))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)
    torch.save({**state, "stem.extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")  # not a head: refused
    with pytest.raises(OsteoError, match=r"unexpected stem.extra.weight \(1\)"):
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "extra.pth"))
    torch.save(_timm_state("test_convnext", 1), tmp_path / "other.pth")
    with pytest.raises(OsteoError, match=r"does not match backbone tiny: missing .*unexpected .*WEIGHTS=none"):
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "other.pth"))
    torch.save(timm.create_model("test_resnet"), tmp_path / "pickled_module.pth")  # code, not weights
    with pytest.raises(OsteoError, match=r"cannot read weights file .*Python objects besides tensors.*state_dict"):
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "pickled_module.pth"))
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))  # not torch.save's at all
    with pytest.raises(OsteoError, match=r"cannot read weights file .*not a PyTorch file") as e:
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "random.pth"))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def _drawn(model: keras.Model, seed: int) -> keras.Model:
    """``model`` with every weight drawn at random around its own, BatchNorm's statistics too."""
    from osteo.backbones.keras_apps import all_layers

    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        values = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):  # gamma, beta, moving mean, moving variance
            values = [rng.uniform(0.5, 1.5, v.shape) if i in (0, 3) else 0.1 * rng.standard_normal(v.shape)
                      for i, v in enumerate(values)]
        else:
            values = [v + 0.02 * rng.standard_normal(v.shape) for v in values]
        if values:
            layer.set_weights([v.astype("float32") for v in values])
    return model


@pytest.mark.parametrize(("name", "layout"), [("vgg16", "legacy"), ("vgg19", "keras"), ("densenet169", "legacy"),
                                              ("convnext_tiny", "keras")])
def test_a_keras_weights_file_loads_into_timms_module_and_computes_what_keras_layers_did(name, layout, tmp_path):
    """A Keras weights file of a study backbone (keras.applications' download layout, or a
    .weights.h5 Keras saved) trains on the timm engine: `auto` picks it and scales the input as
    Keras' layers were trained, and the timm layer gives the feature map Keras' layers give, every
    weight drawn at random (BatchNorm's statistics too). A kernel transposed the wrong way, a
    norm's statistics swapped, VGG's caffe scaling, or a tensor left at its first value would not."""
    from osteo.backbones.base import create
    from osteo.backbones.keras_apps import _before_top_norm
    from osteo.classifier import Preprocess
    from osteo.recipe import Recipe, resolve
    from osteo.registry import get_backbone

    spec, size = get_backbone(name), 64
    keras_engine = create(spec, "keras", image_size=size, weights="none")
    keras_layers = _drawn(keras_engine.build(), 3)
    path = tmp_path / (f"{name}_notop.h5" if layout == "legacy" else f"{name}.weights.h5")
    save_legacy_h5(keras_layers, path) if layout == "legacy" else keras_layers.save_weights(path)
    r = Recipe()
    r.model.backbone, r.model.weights = name, str(path)
    resolved = resolve(r).model
    assert resolved.impl == "timm"
    assert resolved.preprocessing == {"none": "timm"}.get(spec.preprocessing, spec.preprocessing)
    timm_engine = create(spec, "timm", image_size=size, weights=str(path), preprocessing=resolved.preprocessing)
    layer = timm_engine.build()
    x = np.random.default_rng(4).uniform(0, 255, (3, size, size, 3)).astype("float32")

    def scaled(engine):
        return x if engine.scales_own_input else Preprocess(engine.preprocessing)(x)

    want = keras.ops.convert_to_numpy(keras.Model(keras_layers.input, _before_top_norm(keras_layers))(
        scaled(keras_engine), training=False))
    got = keras.ops.convert_to_numpy(layer(scaled(timm_engine), training=False))
    assert got.shape == want.shape == (3, 2, 2, layer.num_features)
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()
    assert np.abs(np.diff(want, axis=0)).max() > 1e-2 * np.abs(want).max()  # the images give different maps


def test_a_weights_file_osteo_wrote_starts_a_new_run_scaled_as_its_weights_were_trained(tmp_path):
    """A run's checkpoint (or export) says the input scaling its backbone was trained under, and a
    new run started from it scales its input alike: a VGG16 run started from a Keras file trained
    under caffe on the timm engine, so a run started from its checkpoint does too (it was given
    timm's own scaling, about 1/60 of caffe's range). A run's best.weights.h5 from before the
    checkpoints said it is read from its run's recipe.json; a file osteo did not write keeps
    the engine's own scaling."""
    from osteo.backbones.base import create
    from osteo.files import save_weights
    from osteo.h5files import input_scaling, recorded_scaling, scaling_attrs
    from osteo.recipe import Recipe, resolve
    from osteo.registry import get_backbone

    def resolved(weights) -> tuple[str, str]:
        r = Recipe()
        r.model.backbone, r.model.weights = name, str(weights)
        m = resolve(r).model
        return m.impl, m.preprocessing

    name = "vgg16"
    keras_file = tmp_path / "vgg16.weights.h5"
    create(get_backbone(name), "keras", image_size=32, weights="none").build().save_weights(keras_file)
    assert resolved(keras_file) == ("timm", "caffe")
    first = Classifier(name, image_size=32, weights=str(keras_file), preprocessing="caffe").build()
    (tmp_path / "run").mkdir()
    save_weights(first, tmp_path / "run" / "best.weights.h5", scaling_attrs(first))
    assert recorded_scaling(tmp_path / "run" / "best.weights.h5") == "caffe"
    assert resolved(tmp_path / "run" / "best.weights.h5") == ("timm", "caffe")
    first.save(tmp_path / "model.keras")  # an export's .keras: its model config says it
    assert resolved(tmp_path / "model.keras") == ("timm", "caffe")
    # each mode the timm engine takes, the tiny backbone's own included; a file from before: its recipe.json
    name = "tiny"
    for mode in ("timm", "caffe", "torch"):
        model = Classifier(name, image_size=32, weights="none", impl="timm", preprocessing=mode).build()
        assert input_scaling(model) == mode
        save_weights(model, tmp_path / f"{mode}.weights.h5", scaling_attrs(model))
        assert resolved(tmp_path / f"{mode}.weights.h5") == ("timm", mode)
        old = tmp_path / f"old-{mode}" / "best.weights.h5"
        old.parent.mkdir()
        model.save_weights(old)  # no attribute: as checkpoints were written before
        assert recorded_scaling(old) is None and resolved(old) == ("timm", "timm")
        (old.parent / "recipe.json").write_text(json.dumps({"model": {"backbone": name, "preprocessing": mode}}))
        assert resolved(old) == ("timm", mode)


def test_a_keras_weights_file_of_another_backbone_is_one_line_on_the_timm_engine(tmp_path):
    """The file is read as Keras' layers read it: another architecture's is refused, before any
    timm tensor is touched; a backbone whose timm module is another architecture (ResNet50: timm's
    is torchvision's v1.5) leaves a Keras file to Keras' layers."""
    from osteo.backbones.base import create
    from osteo.recipe import Recipe, resolve
    from osteo.registry import get_backbone

    path = tmp_path / "vgg16.weights.h5"
    create(get_backbone("vgg16"), "keras", image_size=32, weights="none").build().save_weights(path)
    with pytest.raises(OsteoError, match=r"weights file .*vgg16\.weights\.h5 does not match backbone vgg19.*"
                                         r"WEIGHTS=none") as e:
        create(get_backbone("vgg19"), "timm", image_size=32, weights=str(path)).build()
    assert "\n" not in str(e.value)
    r = Recipe()
    r.model.backbone, r.model.weights = "resnet50", str(path)
    assert resolve(r).model.impl == "keras"
    # asked for the timm engine, whatever the backend: the file is named first (the backend was, and
    # --backend torch then met this refusal)
    from osteo.device import choose_impl

    for backend in ("tensorflow", "torch"):
        with pytest.raises(OsteoError, match=r"is a Keras weights file of Keras' layers, which timm's resnet50 cannot "
                                             r"read \(another architecture's layout\): use model.impl=keras, or auto"):
            choose_impl("timm", get_backbone("resnet50"), backend, str(path))


def test_a_timm_runs_checkpoint_loads_on_the_timm_engine_as_a_keras_runs_does_on_keras(tmp_path, monkeypatch):
    """An osteo run's best.weights.h5 starts a new run on either engine: a timm run's holds its
    module's state dict (Keras' TorchModuleWrapper stores it under its own names), which the timm
    engine reads, and `auto` sends it there; Keras' layers refuse it, naming the engine that reads it."""
    import h5py

    from osteo.backbones.base import create
    from osteo.device import keras_weights_file
    from osteo.registry import get_backbone

    torch.manual_seed(1)
    trained = TimmLayer("tiny", "test_resnet", image_size=32, weights="none")
    run = keras.Sequential([keras.Input((32, 32, 3)), trained, keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(3)])
    run.save_weights(tmp_path / "best.weights.h5")
    torch.manual_seed(2)
    loaded = TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "best.weights.h5"))
    want, got = trained.module.state_dict(), loaded.module.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    keras_layers = create(get_backbone("tiny"), "keras", image_size=32, weights="none").build()
    keras_layers.save_weights(tmp_path / "keras.weights.h5")
    assert not keras_weights_file(str(tmp_path / "best.weights.h5")) and keras_weights_file(str(tmp_path / "keras.weights.h5"))
    # and so does the run's model.keras (osteo export --format keras): a new user's trial was sent to Keras' layers,
    # which sent it back to the timm engine, which could not read a .keras archive
    run.save(tmp_path / "model.keras")
    torch.manual_seed(3)
    import osteo.h5files

    opened, opens = osteo.h5files.weights_of, []
    monkeypatch.setattr(osteo.h5files, "weights_of", lambda *a: opens.append(a) or opened(*a))
    from_archive = TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "model.keras")).module.state_dict()
    assert all(torch.equal(want[k], from_archive[k]) for k in want)
    assert len(opens) == 1  # its shapes and its tensors from one extraction of the archive
    assert not keras_weights_file(str(tmp_path / "model.keras"))
    # backend auto sends it to PyTorch even for a backbone whose CPU choice is TensorFlow (tiny's)
    from osteo.device import Device, plan

    cpu = Device(kind="cpu", name="cpu", cpu_class="avx512_bf16")
    chosen = plan(get_backbone("tiny"), cpu, available=("tensorflow", "torch"), weights=str(tmp_path / "best.weights.h5"))
    assert (chosen.backend, chosen.impl) == ("torch", "timm")
    with pytest.raises(OsteoError, match=r"holds a PyTorch module's state dict \(a timm run's checkpoint\), which the "
                                         r"timm engine reads"):
        create(get_backbone("tiny"), "keras", image_size=32, weights=str(tmp_path / "best.weights.h5")).build()
    with pytest.raises(OsteoError, match=r"cannot read weights file .*keras\.weights\.h5: it is a Keras weights file "
                                         r"of Keras' layers, which model.impl=keras reads"):
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "keras.weights.h5"))
    with pytest.raises(OsteoError, match=r"does not match backbone tiny: missing .*unexpected bn1\."):
        TimmLayer("tiny", "test_convnext", image_size=32, weights=str(tmp_path / "best.weights.h5"))
    # a classifier's key, which is ignored, declaring 1 GiB compressed: refused, not inflated
    with h5py.File(tmp_path / "best.weights.h5", "a") as f:
        group = next(f[f"layers/{k}/vars"] for k in f["layers"] if "bn1.weight" in f[f"layers/{k}/vars"])
        group.create_dataset("fc.weight", shape=(2**28,), dtype="float32", compression="gzip", chunks=(2**20,))
    with pytest.raises(OsteoError, match=r"declares 1\.0 GiB of tensors in a file of \d+ MiB: compressed data"):
        TimmLayer("tiny", "test_resnet", image_size=32, weights=str(tmp_path / "best.weights.h5"))


def test_a_torchvision_convnext_state_dict_loads_under_timms_names(tmp_path):
    """torchvision names ConvNeXt's layers otherwise than timm (features.N.M.block.K, a layer scale
    of (C, 1, 1)): its state dict is read under timm's names, and the timm engine's features are
    torchvision's own on the same weights."""
    import torchvision

    tv = torchvision.models.convnext_tiny().eval()
    torch.save(tv.state_dict(), tmp_path / "tv_convnext_tiny.pth")
    x = np.random.default_rng(3).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    layer = TimmLayer("convnext_tiny", "convnext_tiny.fb_in1k", image_size=64,
                      weights=str(tmp_path / "tv_convnext_tiny.pth"))
    cfg = layer.module.pretrained_cfg
    with torch.no_grad():
        want = tv.features((torch.as_tensor(x).permute(0, 3, 1, 2) / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
                           / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
    got = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # a torchvision ConvNeXt of another size is still refused, by its shapes
    torch.save(torchvision.models.convnext_small().state_dict(), tmp_path / "tv_convnext_small.pth")
    with pytest.raises(OsteoError, match=r"does not match backbone convnext_tiny: unexpected stages\.2\.blocks\.10\."):
        TimmLayer("convnext_tiny", "convnext_tiny.fb_in1k", image_size=64,
                  weights=str(tmp_path / "tv_convnext_small.pth"))


def test_torchvisions_published_densenet_names_load_under_timms(tmp_path):
    """torchvision's published DenseNet checkpoints name a layer's parts norm.1, conv.2 (torchvision
    renames them as it loads them); the timm engine reads them as timm's norm1, conv2."""
    import re

    import torchvision

    tv = torchvision.models.densenet169().eval()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in tv.state_dict().items()
           if not k.endswith("num_batches_tracked")}  # those files predate the BatchNorm step counter
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet169-published.pth")
    x = np.random.default_rng(5).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    layer = TimmLayer("densenet169", "densenet169.tv_in1k", image_size=64,
                      weights=str(tmp_path / "densenet169-published.pth"))
    cfg = layer.module.pretrained_cfg
    with torch.no_grad():
        want = torch.relu(tv.features((torch.as_tensor(x).permute(0, 3, 1, 2) / 255
                                       - torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
                                      / torch.tensor(cfg["std"]).view(1, 3, 1, 1)))
    got = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_offline_imagenet_fails_fast_and_names_the_fix(tmp_path, monkeypatch, fails_fast_offline):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    fails_fast_offline("huggingface.co", lambda: TimmLayer("convnext_tiny", "convnext_tiny.fb_in1k", image_size=32,
                                                             weights="imagenet"))


def test_imagenet_weights_load_from_the_hub_cache_without_the_network(tmp_path, monkeypatch):
    """weights=imagenet takes timm's pretrained file from the Hugging Face cache when it is there
    (no connection is attempted): here a cache holding a file this test wrote."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    state = _timm_state("test_resnet", 5)
    snapshot = tmp_path / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no connection was needed"))
    layer = TimmLayer("tiny", "test_resnet", image_size=32, weights="imagenet")
    for name, value in layer.module.state_dict().items():
        torch.testing.assert_close(value, state[name])


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    import torch._dynamo.exc

    def broken(fn):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm", compile_backbone=True)
    model = clf.build()
    assert clf.backbone.compiled
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = model.predict(x, verbose=0)
        b = model.predict(x, verbose=0)
    assert [str(w.message) for w in caught if "torch.compile" in str(w.message)] == [
        "torch.compile failed for test_resnet (inductor: no C++ compiler); running it eagerly"]
    assert not clf.backbone.compiled
    np.testing.assert_allclose(a, b)


def test_the_modules_own_errors_are_not_taken_for_a_compile_failure(monkeypatch):
    def shape_error(fn):
        def run(*args, **kwargs):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return run

    monkeypatch.setattr(torch, "compile", shape_error)
    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm", compile_backbone=True)
    model = clf.build()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0)
    assert clf.backbone.compiled  # not switched to eager behind the user's back


@pytest.fixture(scope="module")
def timm_run(phantom_dir, tmp_path_factory, tiny_recipe):
    """A finished two-phase run of the tiny backbone on the timm engine."""
    from osteo.runs import RunDir
    from osteo.trainer import Trainer

    runs = tmp_path_factory.mktemp("runs")
    return RunDir(Trainer(tiny_recipe(phantom_dir, runs, epochs=2, fine_tune_epochs=1, bootstrap=20)).run())


def test_a_run_on_the_timm_engine_checkpoints_weights_and_reloads_without_unpickling(
        timm_run, phantom_dir, monkeypatch):
    from osteo.predict import Predictor

    run = timm_run
    recipe = json.loads(run.recipe_path.read_text())
    assert (recipe["model"]["impl"], recipe["model"]["preprocessing"]) == ("timm", "timm")
    env = run.read_env()
    assert env["impl"] == "timm" and env["device"]["why"]["impl"] and env["peak_rss_mb"] > 0
    assert all(float(h["peak_rss_mb"]) > 0 for h in run.read_history())
    assert run.best_path.name == "best.weights.h5"
    import h5py

    from osteo.h5files import SCALING_ATTR

    with h5py.File(run.best_path, "r") as f:  # the scaling it trained under, for a run started from it
        assert f.attrs[SCALING_ATTR] == "timm"
    config = Classifier("tiny", image_size=32, weights="none", impl="timm").build().get_config()
    timm_layers = [layer["config"] for layer in config["layers"] if layer["class_name"] == "TimmLayer"]
    assert len(timm_layers) == 1 and "module" not in timm_layers[0]  # rebuilt from its name, never pickled

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a run's files must never be unpickled or deserialized as a model")

    import pickle

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (keras.saving, "load_model"),
                        (keras.layers.TorchModuleWrapper, "from_config")):
        monkeypatch.setattr(owner, name, no_unpickling)
    predictor = Predictor(run.path, calibrated=False)  # rebuilt from recipe.json, weights loaded
    _, probs, rows = run.read_predictions("val")
    _, raw, _ = predictor.predict_paths([Path(phantom_dir) / r["path"] for r in rows])
    np.testing.assert_allclose(raw, probs, atol=1e-5)  # the same probabilities as when the run made them


def test_gradcam_on_every_backbone_on_the_pytorch_backend():
    """Every registered backbone as timm's module (auto's engine on PyTorch), and tiny on Keras'
    layers: maps in [0, 1] of the input's size, and the probabilities the model predicts (the
    study's backbones on Keras' layers on PyTorch are tests/test_export_timm.py's, against these)."""
    from osteo.explain import gradcam
    from osteo.registry import get_backbone, list_backbones

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    for name, impl in [(n, "timm") for n in list_backbones(include_test=True)] + [("tiny", "keras")]:
        model = Classifier(name, image_size=32, weights="none", impl=impl).build()
        maps, probs = gradcam(model, get_backbone(name), x)
        # scaled to [0, 1]; an untrained net's map may be all zero (no positive evidence)
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all(), (name, impl)
        assert maps.min() >= 0 and maps.max() in (0.0, 1.0), (name, impl, maps.max())
        np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-5)


def test_gradcam_on_the_timm_engine_looks_at_the_deepest_feature_map_of_7x7():
    from osteo.backbones.timm_torch import LAST_STAGE
    from osteo.explain import gradcam, gradcam_target
    from osteo.registry import get_backbone

    clf = Classifier("tiny", image_size=32, weights="none", augment=NO_AUG, impl="timm")
    model = clf.build()
    images = np.random.default_rng(4).uniform(0, 255, (3, 32, 32, 1)).astype("float32")
    target = gradcam_target(model, get_backbone("tiny"))
    # timm's test_resnet ends 1x1 at 32 px: the maps come from a submodule of 8x8, read by a hook
    assert (target.last, target.last_cells) == (LAST_STAGE, (1, 1))
    assert target.layer in dict(model.osteo_backbone.layer.module.named_modules()) and min(target.cells) >= 7
    maps, probs = gradcam(model, get_backbone("tiny"), images)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1
    np.testing.assert_allclose(probs, model.predict(images, verbose=0), atol=1e-5)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "densenet169", "convnext_tiny"])
def test_gradcam_looks_at_the_same_feature_map_on_both_engines(name):
    """The default Grad-CAM layer is the last stage's output on both engines, at the same grid:
    timm's VGG features end in a max-pool that Keras' block5 has not (7x7 against 14x14 at 224 px)."""
    from osteo.explain import gradcam_target
    from osteo.registry import get_backbone

    spec = get_backbone(name)
    found = {}
    for engine in ("keras", "timm"):
        model = Classifier(name, image_size=224, weights="none", augment=NO_AUG, impl=engine).build()
        target = gradcam_target(model, spec)
        assert target.layer == target.last  # 224 px: the last stage's map has cells enough
        found[engine] = target.cells
    assert found["keras"] == found["timm"] == ((14, 14) if name.startswith("vgg") else (7, 7)), found


def test_auto_picks_timm_on_torch_and_keras_where_timm_lacks_the_backbone(tmp_path):
    from osteo.recipe import Recipe, resolve

    keras_file = tmp_path / "vgg16_notop.weights.h5"
    keras_file.write_bytes(b"")
    r = Recipe()
    r.model.backbone, r.model.weights = "resnet50", str(keras_file)
    assert resolve(r).model.impl == "keras"  # only Keras' layers load a Keras weights file of another architecture
    r.model.backbone = "vgg16"  # the study's four port it into timm's module, scaled as Keras' layers were trained
    assert (resolve(r).model.impl, resolve(r).model.preprocessing) == ("timm", "caffe")

    r = Recipe()
    r.model.backbone, r.model.weights = "vgg16", "none"
    assert resolve(r).model.impl == "timm" and resolve(r).model.preprocessing == "timm"
    r.model.impl = "keras"
    assert resolve(r).model.preprocessing == "caffe"
    r.model.impl, r.model.preprocessing = "keras", "timm"
    with pytest.raises(OsteoError, match=r"model\.preprocessing=timm"):
        resolve(r)
    assert resolve(Recipe(), backend="tensorflow").model.impl == "keras"
    r.model.impl, r.model.preprocessing = "timm", "auto"
    with pytest.raises(OsteoError, match="use --backend torch"):
        resolve(r, backend="tensorflow")


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_optimizers_update_exactly_as_keras_does(kind):
    """PyTorch's fused kernel in Keras' optimizer: the same weights as Keras' own after
    several steps (epsilon, bias corrections, decoupled decay), the same state variables."""
    from osteo.optim import FusedAdam, FusedAdamW

    shapes = [(64, 32), (8, 8, 3, 3), (1000,), (7,)]
    grads = [[torch.as_tensor(np.random.default_rng(10 * k + i).normal(size=s).astype("float32") * 10.0 ** -i)
              for i, s in enumerate(shapes)] for k in range(4)]
    grads_cl = [[g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g for g in step] for step in grads]
    kw = {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.5)}
    if kind == "adamw":
        kw["weight_decay"] = 0.1
    results = []
    for cls in ((keras.optimizers.Adam, FusedAdam) if kind == "adam" else (keras.optimizers.AdamW, FusedAdamW)):
        variables = [keras.Variable(np.random.default_rng(i).normal(size=s).astype("float32"))
                     for i, s in enumerate(shapes)]
        if cls in (FusedAdam, FusedAdamW):  # the timm engine's convolution weights are channels-last
            variables[1].value.data = variables[1].value.data.contiguous(memory_format=torch.channels_last)
        opt = cls(**kw)
        opt.build(variables)
        for g in grads_cl if cls in (FusedAdam, FusedAdamW) else grads:
            opt.apply(g, variables)
        if cls in (FusedAdam, FusedAdamW):  # the moments took the weights' layout
            assert all(m.value.stride() == variables[1].value.stride() for m in opt.variables
                       if tuple(m.shape) == shapes[1])
        results.append(([v.numpy() for v in variables], [v.numpy() for v in opt.variables]))
    (w_keras, s_keras), (w_fused, s_fused) = results
    for a, b in zip(w_keras, w_fused):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert len(s_keras) == len(s_fused)  # iterations, the moments: what a resume restores
    for a, b in zip(s_keras, s_fused):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_the_cli_loads_a_timm_run_on_pytorch_without_being_asked(timm_run, phantom_dir, tmp_path):
    """No KERAS_BACKEND: predict, eval and report pick PyTorch from the run's recipe; a format the
    engine cannot write is one line naming the ones it can."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["OSTEO_CACHE"] = str(tmp_path / "cache")
    osteo = lambda *args: subprocess.run([sys.executable, "-m", "osteo.cli", *args], capture_output=True, text=True,
                                         env=env, cwd=tmp_path, timeout=300)
    out = tmp_path / "p.csv"
    proc = osteo("predict", str(timm_run.path), str(phantom_dir / "normal"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(out.read_text().splitlines()) > 10
    proc = osteo("report", str(timm_run.path), "--out", str(tmp_path / "report"), "--bootstrap", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report" / "index.html").exists()
    with open(tmp_path / "report" / "comparison.csv", newline="") as f:
        assert {r["engine"] for r in csv.DictReader(f) if r["model"] != "oracle"} == {"timm"}  # the phantom's ceiling
    assert "tiny on the timm engine (timm's PyTorch module inside the Keras model)" in timm_run.model_card_path.read_text()
    proc = osteo("export", str(timm_run.path), "--format", "savedmodel")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "timm engine" in proc.stderr and "exports onnx, keras (and savedmodel for convnext_tiny, densenet169, vgg16, " \
        "vgg19, whose weights port to Keras' layers), not savedmodel" in proc.stderr
    # refused from the run's files, before Keras and PyTorch are imported (which took about 6 s)
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom osteo.cli import main\n"
                            f"rc = main(['export', {str(timm_run.path)!r}, '--format', 'savedmodel'])\n"
                            "print(rc, 'keras' in sys.modules, 'torch' in sys.modules)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert probe.stdout.split() == ["2", "False", "False"], probe.stdout + probe.stderr[-2000:]


def test_fused_adam_takes_up_restored_iterations():
    """A restore after the first step (as a resume does) sets the bias correction's step again."""
    from osteo.optim import FusedAdam

    v = keras.Variable(np.ones((5,), "float32"))
    grads = [torch.as_tensor(np.full((5,), 0.1 * (k + 1), "float32")) for k in range(2)]
    opt = FusedAdam(learning_rate=1e-2)
    opt.build([v])
    opt.apply([grads[0]], [v])
    weights, store = v.numpy().copy(), {}
    opt.save_own_variables(store)
    opt.apply([grads[1]], [v])
    after_two = v.numpy().copy()
    opt.apply([grads[1]], [v])  # a third step, then back to the state after the first
    v.assign(weights)
    opt.load_own_variables(store)
    opt.apply([grads[1]], [v])
    np.testing.assert_allclose(v.numpy(), after_two, rtol=1e-6)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "densenet169", "convnext_tiny", "resnet50",
                                  "efficientnetv2_b0", "mobilenetv3_large", "tiny"])
def test_both_engines_have_the_same_stages(name):
    """train.fine_tune_blocks counts the same architectural stages on both engines: the spec's
    number of stages on each, and for the architectures both engines build alike (the study's
    four), the same trainable parameters in every stage and after unfreezing the top 2. (Keras'
    ResNet50 has convolution biases torchvision's has not; the tf_ ports differ in details.)"""
    from osteo.backbones.base import create
    from osteo.registry import get_backbone

    spec = get_backbone(name)
    counts, top2 = {}, {}
    for engine in ("keras", "timm"):
        backbone = create(spec, engine, image_size=32, weights="none")
        backbone.build()
        stages = backbone.stages()
        assert len(stages) == spec.n_stages == backbone.stage_count()
        counts[engine] = [sum(int(np.prod(v.shape)) for v in s) for s in stages]
        assert all(counts[engine]) and sum(counts[engine]) == sum(int(np.prod(v.shape)) for v in
                                                                  backbone.layer.trainable_weights)
        backbone.unfreeze(top_stages=2, freeze_bn=False)
        top2[engine] = sum(int(np.prod(v.shape)) for v in backbone.layer.trainable_weights)
        assert top2[engine] == sum(counts[engine][-2:])
    if name in ("vgg16", "vgg19", "densenet169", "convnext_tiny"):
        assert counts["keras"][:-1] == counts["timm"][:-1]
        # keras.applications' ConvNeXt ends in the LayerNorm (scale and shift) timm keeps in its head
        assert counts["keras"][-1] - counts["timm"][-1] == (2 * spec.feature_size if spec.pooled_norm else 0)


def _levels(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 65536, (n, size, size, 1)).astype(np.uint16)


def test_the_feed_serves_tf_datas_values_and_positions_a_resumed_stream():
    """On PyTorch the batches come from osteo.data.feed: level / 257 in float32 (tf.data's
    arithmetic), evaluation in order, training a fresh permutation per pass, and a stream
    started k batches in is the uninterrupted stream's tail."""
    from osteo.data.feed import TorchFeed

    levels, labels = _levels(10), np.arange(10) % 3
    ev = TorchFeed(levels, labels, 4)
    assert ev.num_batches == 3
    got = np.concatenate([keras.ops.convert_to_numpy(ev[i][0]) for i in range(3)])
    np.testing.assert_array_equal(got, levels.astype(np.float32) / np.float32(257.0))
    train = TorchFeed(levels, labels, 4, training=True, seed=3)
    assert train.num_batches is None
    stream = [train.indices(i) for i in range(9)]  # three passes of 3 batches
    for p in range(3):
        assert sorted(np.concatenate(stream[3 * p : 3 * p + 3]).tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(stream[:3]), np.concatenate(stream[3:6]))
    resumed = TorchFeed(levels, labels, 4, training=True, seed=3, start_batch=4)
    for i in range(5):
        assert np.array_equal(resumed.indices(i), stream[4 + i])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(resumed[i][0]),
                                      levels[stream[4 + i]].astype(np.float32) / np.float32(257.0))
        np.testing.assert_array_equal(resumed[i][1], labels[stream[4 + i]])


def test_the_feed_makes_the_next_batch_on_its_worker_and_the_same_batch_out_of_order():
    """The main thread (which launches the model's work) gets batch i while the feed's worker
    thread makes batch i + 1; a batch asked out of order is made on the spot and is the
    batch the worker would have made; the worker's error reaches the batch that needed it."""
    import threading

    from osteo.data.feed import TorchFeed

    levels, labels = _levels(12), np.arange(12) % 3
    feed = TorchFeed(levels, labels, 4, training=True, seed=2)
    made_on, make = {}, feed._make

    def watched(i):
        made_on[i] = threading.current_thread()
        return make(i)

    feed._make = watched
    stream = [feed[i] for i in range(6)]
    assert made_on[0] is threading.main_thread()  # the first has no batch before it
    assert all(made_on[i] is not threading.main_thread() for i in range(1, 6)), made_on
    for i, (x, y) in enumerate(stream):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x),
                                      levels[feed.indices(i)].astype(np.float32) / np.float32(257.0))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), labels[feed.indices(i)])
    jumbled = TorchFeed(levels, labels, 4, training=True, seed=2)
    for i in (5, 2, 3, 0, 4, 1):  # all but 3 out of order
        x, y = jumbled[i]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(stream[i][0]))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(stream[i][1]))

    broken = TorchFeed(levels, labels, 4)
    make_broken = broken._make

    def fails_at_2(i):
        if i == 2:
            raise OSError("gather failed")
        return make_broken(i)

    broken._make = fails_at_2
    broken[0], broken[1]  # batch 2 is made (and fails) on the worker meanwhile
    with pytest.raises(OSError, match="gather failed"):
        broken[2]


def test_a_process_with_a_feeds_worker_exits():
    """The feed's worker thread, busy with the next batch when training ends, does not keep
    the process from exiting."""
    code = """
        import numpy as np
        from osteo.data.feed import TorchFeed
        feed = TorchFeed(np.zeros((10, 8, 8, 1), np.uint16), np.arange(10) % 3, 4, training=True)
        for i in range(5):
            feed[i]
        print("trained", flush=True)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KERAS_BACKEND": "torch"})  # a hang guard
    assert proc.returncode == 0 and proc.stdout.strip() == "trained", proc.stderr[-2000:]


def test_mixup_and_cutmix_in_the_feed_are_seeded_by_step():
    from osteo.data.feed import TorchFeed

    levels, labels = _levels(8), np.arange(8) % 3
    for kind in ({"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}):
        a = TorchFeed(levels, labels, 4, training=True, seed=1, **kind)
        b = TorchFeed(levels, labels, 4, training=True, seed=1, start_batch=1, **kind)
        xa, ya = (keras.ops.convert_to_numpy(t) for t in a[1])
        xb, yb = (keras.ops.convert_to_numpy(t) for t in b[0])
        np.testing.assert_array_equal(xa, xb)  # the same global step mixes the same way
        np.testing.assert_array_equal(ya, yb)
        assert ya.shape == (4, 3) and np.allclose(ya.sum(1), 1.0) and (ya.max(1) < 1).any()
        plain = levels[a.indices(1)].astype(np.float32) / np.float32(257.0)
        assert not np.array_equal(xa, plain)


def test_a_pytorch_run_keeps_tensorflow_out_of_the_process(phantom_dir, tmp_path):
    """TensorFlow's runtime costs ~730 MB in a process that has no use for it: a whole run on
    PyTorch (audit, cache, training, TensorBoard files, predictions, metrics) never imports it."""
    import subprocess
    import sys

    script = f"""
import sys
from osteo.recipe import study_protocol
from osteo.trainer import Trainer
r = study_protocol("tiny")
r.model.weights, r.data.dir, r.data.image_size, r.data.batch_size = "none", {str(phantom_dir)!r}, 32, 16
r.runs_dir, r.train.epochs, r.train.bootstrap, r.train.tensorboard = {str(tmp_path / "runs")!r}, 2, 20, True
run = Trainer(r).run()
print(run)
print("tensorflow" in sys.modules)
"""
    env = {**os.environ, "KERAS_BACKEND": "torch", "OSTEO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run, imported = proc.stdout.split()[-2:]
    assert imported == "False"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    for sub in ("train", "validation"):  # Keras' layout and tags, steps from 0
        events = EventAccumulator(str(Path(run) / "tensorboard" / sub))
        events.Reload()
        steps = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors("epoch_loss")]
        assert [s for s, _ in steps] == [0, 1] and all(np.isfinite(v) for _, v in steps)
