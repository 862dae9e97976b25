"""Grad-CAM: every backbone on TensorFlow (PyTorch: tests/test_timm_engine.py), and a trained model looks
at the bone."""

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from osteo.classifier import Classifier
from osteo.data.phantom import make_sample, write_phantom
from osteo.explain import gradcam
from osteo.registry import get_backbone, list_backbones
from osteo.runs import RunDir
from osteo.trainer import Trainer


@pytest.mark.parametrize("name", list_backbones(include_test=True))
def test_every_backbone_has_a_gradcam_layer_that_works(name):
    spec = get_backbone(name)
    size = max(32, spec.min_size)
    model = Classifier(name, image_size=size, weights="none").build()
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 1)).astype("float32")
    maps, probs = gradcam(model, spec, x)
    assert maps.shape == (2, size, size) and maps.min() >= 0 and maps.max() <= 1
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-5)
    # each layer it may fall back to by one name; ConvNeXt's residual sums among them, not MobileNetV3's x + 3
    from osteo.explain import _engine_call

    names = [n for n, _ in _engine_call(model, spec, "feature_maps")]
    assert len(names) == len(set(names))
    assert not any("squeeze_excite" in n and n.endswith("_output") for n in names)
    assert ("convnext_tiny_stage_0_block_0_output" in names) == (name == "convnext_tiny")


@pytest.mark.heavy
def test_a_trained_model_looks_inside_the_bone(tmp_path, tiny_recipe):
    """The phantom's class signal is only in the bone (density, trabeculae, cortex). Grad-CAM's
    resolution is one feature-map cell (4 px here), so the bone is its mask grown by one cell."""
    data = tmp_path / "ph"
    write_phantom(data, n=480, size=64, seed=5)
    r = tiny_recipe(data, tmp_path / "runs", epochs=20, lr=3e-3, bootstrap=0)
    r.data.image_size, r.model.freeze_bn = 64, False
    run = RunDir(Trainer(r).run())
    assert run.read_metrics()["val"]["balanced_accuracy"] > 0.42  # it learned something to explain
    from osteo.predict import load_best, load_images

    val = [x for x in run.read_split() if x["split"] == "val"]
    images, _ = load_images([data / x["path"] for x in val], 64, "pad")
    maps, _ = gradcam(load_best(run), get_backbone("tiny"), np.stack(images))
    inside = outside = 0.0
    per_pixel = []
    for row, heat in zip(val, maps):
        index = int(Path(row["path"]).stem.split("_")[-1])
        strict = make_sample(row["label"], size=64, seed=5, index=index)[2]
        bone = binary_dilation(strict, iterations=4)
        inside += heat[bone].sum()
        outside += heat[~bone].sum()
        per_pixel.append((heat[strict].mean(), heat[~strict].mean()))
    assert inside > outside, (inside, outside)
    # and on the exact mask (26% of the frame), the heat per pixel is well above the rest's
    mean_in, mean_out = np.mean(per_pixel, axis=0)
    assert mean_in > 1.5 * mean_out, (mean_in, mean_out)
