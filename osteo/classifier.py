"""The classifier module (the "LightningModule"): the model, its loss and metrics.

    image (H, W, 1) float32 in [0, 255]
      -> augmentation (Keras preprocessing layers; active in training only, so it runs
         on the accelerator and never touches validation images)
      -> gray to RGB -> the backbone's own preprocessing (timm's engine: inside its layer)
      -> backbone (called with training=False while BatchNorm is frozen, the default for
         pretrained weights, so its statistics stay; in training mode with freeze_bn off)
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
from osteo.backbones.base import create
from osteo.recipe import AugmentConfig, HeadConfig, Recipe
from osteo.registry import (
    IMAGENET_MEAN_RGB,
    IMAGENET_MEAN_TORCH,
    IMAGENET_STD_TORCH,
    PREPROCESSING_MODES,
    get_backbone,
)

NUM_CLASSES = len(CLASSES)
# The model's layers that augment (identities at inference): export leaves them out by these names,
# so a new augmentation is a recipe field and a layer in augmentation_layers, nothing else.
AUGMENTATION = ("augment", "randaugment")


@keras.saving.register_keras_serializable(package="osteo")
class GrayToRGB(keras.layers.Layer):
    """Tile a 1-channel image to 3 channels (ImageNet backbones expect RGB)."""

    def call(self, x):
        if x.shape[-1] == 1:
            return keras.ops.concatenate([x, x, x], axis=-1)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="osteo")
class Preprocess(keras.layers.Layer):
    """A backbone's input preprocessing on [0, 255] RGB, with ``keras.ops`` only."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing {mode!r}; choose one of: {', '.join(PREPROCESSING_MODES)}")
        self.mode = mode

    def call(self, x):
        ops = keras.ops
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(IMAGENET_MEAN_RGB[::-1], dtype=x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN_TORCH, dtype=x.dtype)
            std = ops.convert_to_tensor(IMAGENET_STD_TORCH, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


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


def xla_blockers(model: keras.Model) -> list[str]:
    """The kinds of ``model``'s layers that XLA cannot compile (Keras' random zoom, shear,
    rotation, translation, RandAugment: ``supports_jit`` False). With one of them inside,
    Keras trains the whole step without XLA whatever ``jit_compile`` says (with a warning of
    its own), so the run's plan must say so."""
    from osteo.backbones.keras_apps import all_layers

    return sorted({type(layer).__name__ for layer in all_layers(model) if not getattr(layer, "supports_jit", True)})




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
        t = one_hot(y_true, self.num_classes)
        p = one_hot(ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), axis=-1), self.num_classes)
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


def one_hot(labels, num_classes: int):
    """float32 (B, num_classes) from integer labels of any shape with B entries; by comparison
    with ``arange``, as ``ops.one_hot`` turns its Python numbers into device tensors (see Model)."""
    labels = ops.cast(ops.reshape(labels, (-1, 1)), "int32")
    return ops.cast(ops.equal(labels, ops.arange(num_classes, dtype="int32")), "float32")


def _safe_div(a, b):
    """``a / b`` where ``b > 0``, else 0; tensors only (see :class:`Model`)."""
    positive = b > 0
    return ops.where(positive, a / ops.where(positive, b, ops.ones_like(b)), ops.zeros_like(a))


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
        if len(y_true.shape) != len(y_pred.shape):
            if not self.label_smoothing:
                return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
            y_true = one_hot(y_true, y_pred.shape[-1])
        if self.label_smoothing:  # Keras' smoothing, with the class count a Python number (see Model)
            smoothing = self.label_smoothing
            y_true = ops.cast(y_true, y_pred.dtype) * (1.0 - smoothing) + smoothing / y_pred.shape[-1]
        return keras.losses.categorical_crossentropy(y_true, y_pred)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if self.reduction != "sum_over_batch_size" or keras.backend.backend() != "torch":
            return super().__call__(y_true, y_pred, sample_weight)
        # Keras' mean divides by the batch's shape made a device tensor (see Model); the same
        # mean as the sum over the batch divided by a Python number
        self.reduction = "sum"
        try:
            total = super().__call__(y_true, y_pred, sample_weight)
        finally:
            self.reduction = "sum_over_batch_size"
        return total / y_pred.shape[0]

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="osteo")
class Model(keras.Model):
    """osteo's models: Keras' functional model, whose training step on PyTorch never waits
    for the device.

    On PyTorch, every Python number a step hands ``keras.ops`` (the batch size for the
    running loss, ``ops.one_hot``'s class count, the optimizer's step + 1, the learning
    rate schedule's constants) becomes a host-to-device copy, and PyTorch waits for each
    such copy: the host stops until every queued kernel has run, and the GPU then idles
    while the host prepares what comes next. About 20 such waits a step held osteo's fit
    at 0.62-0.75x timm's own loop on an H200, with the model itself as fast as timm's
    (``benchmarks/gpu_profile.py``, ``benchmarks/README.md``). This step is Keras' own with
    the batch size made on the device; the loss, the metrics (:class:`_ConfusionMetric`),
    the optimizer (:mod:`osteo.optim`) and the feed (:class:`osteo.data.feed.TorchFeed`)
    keep theirs there too. On TensorFlow, Keras' steps (a compiled graph has no such waits).
    """

    def train_step(self, data):
        if keras.backend.backend() != "torch":
            return super().train_step(data)
        import torch

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        self._loss_tracker.update_state(loss, sample_weight=_batch_size(loss, x))
        if self.trainable_weights:
            self.optimizer.scale_loss(loss).backward()
            variables = self.trainable_weights[:]
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in variables], variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        if keras.backend.backend() != "torch":
            return super().test_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        self._loss_tracker.update_state(loss, sample_weight=_batch_size(loss, x))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _batch_size(like, x):
    """The batch's size as a tensor shaped like ``like``, made on its device (no copy)."""
    return ops.ones_like(like) * next(i for i in keras.tree.flatten(x) if i is not None).shape[0]


# --------------------------------------------------------------------------- module


@dataclass
class Classifier:
    """Builds the model for one backbone and changes what is trainable.

    ``image_size`` is the resolved one (:func:`osteo.recipe.resolve` checks it against
    the backbone); ``preprocessing`` defaults to the engine's own for the backbone.
    ``impl`` names the engine (``auto``: :func:`osteo.device.choose_impl`); the engine's
    :class:`osteo.backbones.base.Backbone` is made once, here, and everything that
    differs between the engines goes through it (``self.engine``). Attributes set by
    :meth:`build`: ``model`` (the whole classifier), ``backbone`` (the backbone's
    Keras layer inside it) and ``batchnorms`` (its BatchNorm layers, where it was built here).
    """

    backbone_name: str
    image_size: int
    weights: str | None = "imagenet"
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int | None = None
    freeze_bn: bool = True  # False only for training from scratch (weights none)
    bn_momentum: float = 0.0  # Keras' terms, on both engines; 0: the architecture's own (spec.bn_momentum)
    preprocessing: str | None = None  # None or "auto": the engine's own
    impl: str = "auto"  # keras | timm | auto (see osteo.device.choose_impl)
    compile_backbone: bool = False  # engines that compile their backbone module (timm: torch.compile)
    channels_last: bool = True  # the timm engine's memory format (osteo.device.choose_layout)

    def __post_init__(self):
        from osteo.device import choose_impl

        self.spec = get_backbone(self.backbone_name)
        self.bn_momentum = self.bn_momentum or self.spec.bn_momentum
        self.impl, _ = choose_impl(self.impl, self.spec, keras.backend.backend(), self.weights)
        self.engine = create(self.spec, self.impl, image_size=self.image_size, weights=self.weights,
                             preprocessing=self.preprocessing, compile=self.compile_backbone,
                             channels_last=self.channels_last)
        self.preprocessing = self.engine.preprocessing
        self.model: keras.Model | None = None
        self.backbone: keras.Model | keras.layers.Layer | None = None
        self.batchnorms = 0  # the backbone's BatchNorm layers, counted by build()

    @classmethod
    def from_recipe(cls, recipe: Recipe, *, weights: str | None = None, compile_backbone: bool = False,
                    channels_last: bool = True) -> Classifier:
        """The classifier a resolved recipe describes (``weights`` replaces the recipe's: a
        run rebuilt to load its checkpoint needs none)."""
        m = recipe.model
        return cls(m.backbone, image_size=recipe.data.image_size, weights=m.weights if weights is None else weights,
                   head=m.head, augment=m.augment, seed=recipe.train.seed, freeze_bn=m.freeze_bn,
                   bn_momentum=m.bn_momentum, preprocessing=m.preprocessing, impl=m.impl,
                   compile_backbone=compile_backbone, channels_last=channels_last)

    def build(self, backbone: keras.layers.Layer | None = None) -> keras.Model:
        """The classifier around the engine's backbone, or around ``backbone`` where one is given
        (a built Keras model on (size, size, 3) inputs, its weights and BatchNorm momentum its
        own: :func:`osteo.backbones.port.keras_backbone`'s, for a timm run's SavedModel)."""
        size = self.image_size
        inputs = keras.Input((size, size, 1), name="image")
        x = inputs
        aug = augmentation_layers(self.augment, self.seed)
        if aug:
            x = keras.Sequential(aug, name=AUGMENTATION[0])(x)
        x = GrayToRGB(name="gray_to_rgb")(x)
        if self.augment.randaugment:
            x = keras.layers.RandAugment(value_range=(0, 255), seed=self.seed, name=AUGMENTATION[1])(x)
        if not self.engine.scales_own_input:
            x = Preprocess(self.preprocessing, name="preprocess")(x)
        if backbone is None:
            self.backbone = self.engine.build()
            # the same momentum on both engines (timm's modules would otherwise use PyTorch's 0.1);
            # 0.99 needs hundreds of steps before the moving statistics match the batches, so
            # short runs from scratch set less
            self.batchnorms = self.engine.set_bn_momentum(self.bn_momentum)
        else:
            self.backbone = backbone
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
        self.model = Model(inputs, outputs, name=f"osteo_{self.spec.name}")
        self.model.osteo_backbone = self.engine  # Grad-CAM and export ask the engine (osteo.explain)
        return self.model

    def freeze_backbone(self) -> None:
        """Phase 1: only the head learns."""
        self.engine.freeze()

    def unfreeze_backbone(self, top_stages: int = 0) -> None:
        """Phase 2: unfreeze all stages (``top_stages=0``) or the top N; BatchNorm stays frozen
        with ``freeze_bn``."""
        self.engine.unfreeze(top_stages, freeze_bn=self.freeze_bn)

    def trainable_counts(self) -> dict[str, int]:
        def count(weights):
            return int(sum(int(ops.size(w)) for w in weights))

        return {
            "trainable": count(self.model.trainable_weights),
            "backbone_trainable": count(self.backbone.trainable_weights),
            "total": count(self.model.weights),
        }
