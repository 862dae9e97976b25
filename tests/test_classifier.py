import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from osteo.classifier import (
    Accuracy,
    AugmentConfig,
    BalancedAccuracy,
    Classifier,
    HeadConfig,
    MacroF1,
    SparseCrossEntropy,
    default_metrics,
)


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def test_model_structure_and_head():
    clf = Classifier("tiny", image_size=32, weights="none", head=HeadConfig(dropout=0.5, units=(8,)))
    model = clf.build()
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, 3)
    names = [layer.name for layer in model.layers]
    assert names.index("augment") < names.index("gray_to_rgb") < names.index("preprocess") < names.index("pool")
    assert names[-1] == "head" and "head_dense0" in names
    probs = keras.ops.convert_to_numpy(model(np.zeros((2, 32, 32, 1), "float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_augmentation_runs_in_training_only():
    clf = Classifier("tiny", image_size=32, weights="none",
                     augment=AugmentConfig(flip=True, rotation=0.1, zoom=0.2, shear=0.2, contrast=0.2, brightness=0.2),
                     seed=0)
    model = clf.build()
    aug = model.get_layer("augment")
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(aug(x, training=False)), x)
    assert np.abs(keras.ops.convert_to_numpy(aug(x, training=True)) - x).mean() > 1.0
    # whole model at inference: deterministic (no augmentation, no dropout)
    a, b = (keras.ops.convert_to_numpy(model(x, training=False)) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_phase_trainable_counts_and_batchnorm_frozen():
    clf = Classifier("tiny", image_size=32, weights="none")
    model = clf.build()
    head = _count(model.get_layer("head").trainable_weights)
    clf.freeze_backbone()
    assert clf.trainable_counts()["trainable"] == head
    clf.unfreeze_backbone()
    bb = clf.backbone
    conv = sum(_count(layer.weights) for layer in bb.layers if isinstance(layer, keras.layers.Conv2D))
    bn = [layer for layer in bb.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and all(not layer.trainable for layer in bn)
    assert clf.trainable_counts()["trainable"] == head + conv
    clf.unfreeze_backbone(top_stages=1)  # only tiny_block2 learns
    top = _count(bb.get_layer("tiny_block2_conv").weights)
    assert clf.trainable_counts()["trainable"] == head + top


def test_top_stages_on_a_real_backbone():
    clf = Classifier("vgg16", image_size=32, weights="none")
    clf.build()
    clf.unfreeze_backbone(top_stages=1)
    trainable = {layer.name for layer in clf.backbone.layers if layer.trainable and layer.weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}


def test_head_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = Classifier("tiny", image_size=32, weights="none").build()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("head").compute_dtype == "float32"
    assert clf_compute_dtypes(model) >= {"bfloat16"}
    out = model(np.zeros((1, 32, 32, 1), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def clf_compute_dtypes(model):
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name == "tiny")
    return {layer.compute_dtype for layer in backbone.layers if layer.weights}


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    y[:5] = 2
    probs = rng.dirichlet((1, 1, 1), 200).astype("float32")
    pred = probs.argmax(1)
    for metric, ref in [
        (Accuracy(), skm.accuracy_score(y, pred)),
        (BalancedAccuracy(), skm.balanced_accuracy_score(y, pred)),
        (MacroF1(), skm.f1_score(y, pred, average="macro")),
    ]:
        metric.update_state(y[:120], probs[:120])
        metric.update_state(y[120:], probs[120:])
        assert float(metric.result()) == pytest.approx(ref, abs=1e-6)
    # a majority-class guesser: accuracy high, balanced accuracy 1/3, macro F1 low
    always = np.tile([[0.1, 0.8, 0.1]], (200, 1)).astype("float32")
    ba, f1 = BalancedAccuracy(), MacroF1()
    ba.update_state(y, always)
    f1.update_state(y, always)
    assert float(ba.result()) == pytest.approx(1 / 3)
    assert float(f1.result()) == pytest.approx(skm.f1_score(y, always.argmax(1), average="macro"))


def test_loss_smoothing_and_soft_labels():
    y = np.array([0, 1, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], "float32")
    plain = float(SparseCrossEntropy()(y, p))
    assert plain == pytest.approx(float(np.mean(-np.log([0.7, 0.8, 0.6]))), rel=1e-5)
    smooth = float(SparseCrossEntropy(label_smoothing=0.1)(y, p))
    assert smooth != pytest.approx(plain)
    soft = float(SparseCrossEntropy()(np.eye(3, dtype="float32")[y], p))
    assert soft == pytest.approx(plain, rel=1e-5)


def test_class_weights_change_the_loss():
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 1)).astype("float32")
    y = np.array([0] * 8 + [1] * 2 + [2] * 2, "int32")
    losses = []
    for cw in (None, {0: 0.5, 1: 2.0, 2: 2.0}):
        keras.utils.set_random_seed(0)
        model = Classifier("tiny", image_size=32, weights="none", augment=AugmentConfig(flip=False, zoom=0, shear=0),
                           head=HeadConfig(dropout=0.0)).build()
        model.compile(keras.optimizers.Adam(0.0), SparseCrossEntropy(), metrics=default_metrics())
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
        losses.append(model.fit(ds, epochs=1, class_weight=cw, verbose=0).history["loss"][0])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_bn_momentum_override_reaches_every_batchnorm():
    import keras

    from osteo.classifier import Classifier

    for momentum, expected in ((0.0, 0.99), (0.9, 0.9)):  # 0: the architecture's own (Keras' 0.99 here)
        clf = Classifier("tiny", image_size=32, weights="none", freeze_bn=False, bn_momentum=momentum)
        clf.build()
        bns = [layer for layer in clf.backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert len(bns) == 2 and {layer.momentum for layer in bns} == {expected}
