"""The classifier module (the "LightningModule"): the model, its loss and metrics.

    image (H, W, 1) float32 in [0, 255]
      -> augmentation (Keras preprocessing layers; active in training only, so it runs
         on the accelerator and never touches validation images)
      -> gray to RGB -> the backbone's own preprocessing
      -> backbone (called with training=False: BatchNorm statistics stay frozen)
      -> global average pooling -> dropout -> [dense -> dropout]* -> dense softmax
         (float32 even under mixed precision)

Everything here uses ``keras`` and ``keras.ops`` only, so it runs on the TensorFlow
and the PyTorch backends.

Example:
    >>> from osteo.recipe import Recipe, resolve
    >>> clf = Classifier.from_recipe(resolve(recipe))  # doctest: +SKIP
    >>> model = clf.build()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
from keras import ops

from osteo import CLASSES
from osteo.backbones import GrayToRGB, Preprocess
from osteo.recipe import AugmentConfig, HeadConfig, Recipe
from osteo.registry import get_backbone

NUM_CLASSES = len(CLASSES)


@keras.saving.register_keras_serializable(package="osteo")
class RandomShear(keras.layers.RandomShear):
    """``keras.layers.RandomShear`` whose config loads back.

    Keras 3.15 saves the factors as ``[-f, f]`` and then refuses a negative factor when
    loading the model; this keeps the factors as they were given.
    """

    def __init__(self, x_factor=0.0, y_factor=0.0, **kwargs):
        super().__init__(x_factor=x_factor, y_factor=y_factor, **kwargs)
        self._factors = (x_factor, y_factor)

    def get_config(self):
        return {**super().get_config(), "x_factor": self._factors[0], "y_factor": self._factors[1]}


def augmentation_layers(cfg: AugmentConfig, seed: int | None = None) -> list[keras.layers.Layer]:
    """The in-model augmentation layers (MixUp/CutMix need labels: see the data module)."""
    out: list[keras.layers.Layer] = []
    geo = {"fill_mode": "constant", "fill_value": 0.0, "seed": seed}
    if cfg.flip:
        out.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation:
        out.append(keras.layers.RandomRotation(cfg.rotation, **geo))
    if cfg.zoom:
        out.append(keras.layers.RandomZoom(cfg.zoom, **geo))
    if cfg.translation:
        out.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, **geo))
    if cfg.shear:
        out.append(RandomShear(x_factor=cfg.shear, y_factor=0.0, **geo))
    if cfg.contrast:
        out.append(keras.layers.RandomContrast(cfg.contrast, value_range=(0, 255), seed=seed))
    if cfg.brightness:
        out.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed))
    return out




# --------------------------------------------------------------------------- metrics


class _ConfusionMetric(keras.metrics.Metric):
    """A running confusion matrix; subclasses read a summary off it.

    Accepts sparse labels (B,) or soft labels (B, C) from MixUp/CutMix (argmax).
    Unweighted on purpose: class weights change the loss, not what a metric reports.
    """

    def __init__(self, name: str, num_classes: int = NUM_CLASSES, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.matrix = self.add_variable(shape=(num_classes, num_classes), initializer="zeros",
                                        name="matrix", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.argmax(y_true, axis=-1)
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        y_pred = ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), axis=-1)
        t = ops.one_hot(y_true, self.num_classes, dtype="float32")
        p = ops.one_hot(y_pred, self.num_classes, dtype="float32")
        self.matrix.assign_add(ops.matmul(ops.transpose(t), p))

    def reset_state(self):
        self.matrix.assign(ops.zeros_like(self.matrix))

    def _parts(self):
        tp = ops.diagonal(self.matrix)
        support = ops.sum(self.matrix, axis=1)
        predicted = ops.sum(self.matrix, axis=0)
        return tp, support, predicted

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def _safe_div(a, b):
    return ops.where(b > 0, a / ops.maximum(b, 1e-12), ops.zeros_like(a))


@keras.saving.register_keras_serializable(package="osteo")
class Accuracy(_ConfusionMetric):
    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def result(self):
        tp, support, _ = self._parts()
        return _safe_div(ops.sum(tp), ops.sum(support))


@keras.saving.register_keras_serializable(package="osteo")
class BalancedAccuracy(_ConfusionMetric):
    """Mean recall over the classes present (scikit-learn's balanced_accuracy_score)."""

    def __init__(self, name="balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)

    def result(self):
        tp, support, _ = self._parts()
        present = ops.cast(support > 0, "float32")
        return _safe_div(ops.sum(_safe_div(tp, support) * present), ops.sum(present))


@keras.saving.register_keras_serializable(package="osteo")
class MacroF1(_ConfusionMetric):
    """Unweighted mean F1 over all classes, 0 where undefined (scikit-learn's macro F1)."""

    def __init__(self, name="macro_f1", **kwargs):
        super().__init__(name=name, **kwargs)

    def result(self):
        tp, support, predicted = self._parts()
        return ops.mean(_safe_div(2.0 * tp, support + predicted))


def default_metrics() -> list[keras.metrics.Metric]:
    return [Accuracy(), BalancedAccuracy(), MacroF1()]


@keras.saving.register_keras_serializable(package="osteo")
class SparseCrossEntropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with optional label smoothing.

    Also takes soft (B, C) targets, which MixUp and CutMix produce.
    """

    def __init__(self, label_smoothing: float = 0.0, name="sparse_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        if len(y_true.shape) == len(y_pred.shape):
            return keras.losses.categorical_crossentropy(y_true, y_pred, label_smoothing=self.label_smoothing)
        if not self.label_smoothing:
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        y_true = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), y_pred.shape[-1])
        return keras.losses.categorical_crossentropy(y_true, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


# --------------------------------------------------------------------------- module


@dataclass
class Classifier:
    """Builds the model for one backbone and changes what is trainable.

    ``image_size`` is the resolved one (:func:`osteo.recipe.resolve` checks it against
    the backbone); ``preprocessing`` defaults to the backbone's own. Attributes set by
    :meth:`build`: ``model`` (the whole classifier) and ``backbone`` (the Keras model
    inside it).
    """

    backbone_name: str
    image_size: int
    weights: str | None = "imagenet"
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int | None = None
    freeze_bn: bool = True  # False only for training from scratch (weights none)
    bn_momentum: float = 0.0  # 0: the backbone's own (Keras: 0.99)
    preprocessing: str | None = None  # None or "auto": the implementation's own
    impl: str = "auto"  # keras | timm | auto (see osteo.device.choose_impl)
    compile_backbone: bool = False  # timm only: torch.compile the module

    def __post_init__(self):
        from osteo.device import choose_impl

        self.spec = get_backbone(self.backbone_name)
        self.impl, _ = choose_impl(self.impl, self.spec, keras.backend.backend(), self.weights)
        if self.preprocessing in (None, "auto"):
            self.preprocessing = "timm" if self.impl == "timm" else self.spec.preprocessing
        self.model: keras.Model | None = None
        self.backbone: keras.Model | keras.layers.Layer | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, weights: str | None = None, compile_backbone: bool = False
                    ) -> Classifier:
        """The classifier a resolved recipe describes (``weights`` replaces the recipe's: a
        run rebuilt to load its checkpoint needs none)."""
        m = recipe.model
        return cls(m.backbone, image_size=recipe.data.image_size, weights=m.weights if weights is None else weights,
                   head=m.head, augment=m.augment, seed=recipe.train.seed, freeze_bn=m.freeze_bn,
                   bn_momentum=m.bn_momentum, preprocessing=m.preprocessing, impl=m.impl,
                   compile_backbone=compile_backbone)

    def build(self) -> keras.Model:
        size = self.image_size
        inputs = keras.Input((size, size, 1), name="image")
        x = inputs
        aug = augmentation_layers(self.augment, self.seed)
        if aug:
            x = keras.Sequential(aug, name="augment")(x)
        x = GrayToRGB(name="gray_to_rgb")(x)
        if self.augment.randaugment:
            x = keras.layers.RandAugment(value_range=(0, 255), seed=self.seed, name="randaugment")(x)
        if self.preprocessing != "timm":  # timm: the module scales its own input (TimmBackbone)
            x = Preprocess(self.preprocessing, name="preprocess")(x)
        self.backbone = self._build_backbone()
        if self.bn_momentum:
            # Keras' 0.99 needs hundreds of steps before the moving statistics that
            # evaluation uses match the batches; short runs from scratch need less
            self._set_bn_momentum()
        # training=False keeps BatchNorm in inference mode (its ImageNet statistics)
        # in both phases; from scratch there are no statistics worth keeping.
        x = self.backbone(x, training=False) if self.freeze_bn else self.backbone(x)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        if self.spec.pooled_norm:
            x = keras.layers.LayerNormalization(epsilon=1e-6, name="pool_norm")(x)
        x = keras.layers.Dropout(self.head.dropout, seed=self.seed, name="dropout")(x)
        for i, units in enumerate(self.head.units):
            x = keras.layers.Dense(units, activation="relu", name=f"head_dense{i}")(x)
            x = keras.layers.Dropout(self.head.dropout, seed=self.seed, name=f"head_dropout{i}")(x)
        outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="head")(x)
        self.model = keras.Model(inputs, outputs, name=f"osteo_{self.spec.name}")
        return self.model

    def _build_backbone(self):
        if self.impl != "timm":
            return self.spec.build(image_size=self.image_size, weights=self.weights)
        from osteo.backbones.timm_torch import TimmBackbone

        return TimmBackbone(self.spec.name, self.spec.timm_name, image_size=self.image_size, weights=self.weights,
                            normalize=self.preprocessing == "timm", compile=self.compile_backbone,
                            name=self.spec.name)

    def _set_bn_momentum(self) -> None:
        if self.impl == "timm":
            self.backbone.set_bn_momentum(self.bn_momentum)
            return
        for layer in _all_layers(self.backbone):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = self.bn_momentum

    def freeze_backbone(self) -> None:
        """Phase 1: only the head learns."""
        self.backbone.trainable = False

    def unfreeze_backbone(self, top_blocks: int = 0) -> None:
        """Phase 2: unfreeze all blocks (``top_blocks=0``) or the top N; BatchNorm stays frozen."""
        self.backbone.trainable = True
        if self.impl == "timm":
            n = len(self.backbone.blocks())
            self.backbone.freeze(frozen_blocks=n - top_blocks if 0 < top_blocks < n else 0, freeze_bn=self.freeze_bn)
            return
        blocks = self.spec.blocks(self.backbone)
        frozen = blocks[: len(blocks) - top_blocks] if 0 < top_blocks < len(blocks) else []
        for block in frozen:
            for layer in block:
                layer.trainable = False
        if self.freeze_bn:
            for layer in _all_layers(self.backbone):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

    def trainable_counts(self) -> dict[str, int]:
        def count(weights):
            return int(sum(int(ops.size(w)) for w in weights))

        return {
            "trainable": count(self.model.trainable_weights),
            "backbone_trainable": count(self.backbone.trainable_weights),
            "total": count(self.model.weights),
        }


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
