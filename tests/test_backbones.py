import importlib

import keras
import numpy as np
import pytest

from osteo.backbones import GrayToRGB, Preprocess
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
    a = spec.build(image_size=32, weights="none")
    path = tmp_path / f"{name}.weights.h5"
    a.save_weights(path)
    keras.utils.set_random_seed(2)  # a different random init, then the file's weights
    b = spec.build(image_size=32, weights=str(path))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a(x)), keras.ops.convert_to_numpy(b(x)), atol=1e-6)
    assert b.output_shape[-1] == spec.feature_size


def test_weights_file_of_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    get_backbone("tiny").build(image_size=32, weights="none").save_weights(path)
    with pytest.raises(OsteoError, match="does not match backbone vgg16"):
        get_backbone("vgg16").build(image_size=32, weights=str(path))
    with pytest.raises(OsteoError, match="not found"):
        get_backbone("vgg16").build(image_size=32, weights=str(tmp_path / "missing.h5"))


def test_offline_imagenet_fails_fast_and_names_the_fix(tmp_path, monkeypatch, fails_fast_offline):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty weights cache
    fails_fast_offline("storage.googleapis.com", lambda: get_backbone("vgg16").build(image_size=32, weights="imagenet"))
