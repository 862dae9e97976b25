"""One :class:`BackboneSpec` per backbone: how to build it, how to feed it.

A spec carries everything that differs between backbones, so that no code outside
this file branches on a model's name:

* ``preprocessing``: exactly what the ``keras.applications`` module's
  ``preprocess_input`` does, as a mode of :class:`Preprocess` (``caffe``: RGB->BGR and
  ImageNet mean subtraction, for VGG and ResNet; ``torch``: [0, 1] then ImageNet
  mean/std, for DenseNet; ``tf``: [-1, 1]; ``none``: the model has its own
  preprocessing layers and expects [0, 255], as ConvNeXt, EfficientNetV2 and
  MobileNetV3 do). The study fed ConvNeXt [0, 1] pixels and VGG/DenseNet raw pixels;
  here inputs are always [0, 255] and the spec decides.
* default and minimum input size, feature size, and the regex that names the blocks
  (for "unfreeze the top N blocks").
* what is fastest for it on a CPU (backend, bfloat16, XLA) lives in
  :mod:`osteo.speed`, which must be readable before Keras is imported.

Weights: ``"imagenet"`` (the Keras cache, or a download), ``"none"``, or a path to a
weights file of the backbone (``.weights.h5`` or the Keras ``_notop.h5`` files).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from osteo.errors import OsteoError
from osteo.registry import register

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
IMAGENET_MEAN_TORCH = (0.485, 0.456, 0.406)
IMAGENET_STD_TORCH = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("caffe", "torch", "tf", "none")
# Seconds a download of ImageNet weights may wait on the network before osteo gives up.
DOWNLOAD_TIMEOUT = 10.0


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


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one backbone."""

    name: str
    constructor: Callable[..., keras.Model]
    preprocessing: str
    feature_size: int
    block_pattern: str
    reference_module: str | None = None  # keras.applications.<module>, for preprocess_input
    default_size: int = 224
    min_size: int = 32
    constructor_kwargs: dict = field(default_factory=dict)
    test_only: bool = False
    # The backbone's own top normalises the pooled features (ConvNeXt: LayerNorm);
    # without it, features from scratch grow large and saturate the softmax.
    pooled_norm: bool = False

    def check_size(self, size: int) -> None:
        if size < self.min_size:
            raise OsteoError(
                f"image size {size} is below {self.name}'s minimum of {self.min_size}; "
                f"use IMAGE_SIZE={self.min_size} or more (default {self.default_size})"
            )

    def build(self, *, image_size: int, weights: str | os.PathLike | None = "imagenet") -> keras.Model:
        """The backbone without its top, on (size, size, 3) inputs, weights loaded.

        Offline, ``weights="imagenet"`` fails within ``DOWNLOAD_TIMEOUT`` seconds with
        an :class:`OsteoError` that names the alternatives.
        """
        self.check_size(image_size)
        shape = (image_size, image_size, 3)
        kind, path = parse_weights(weights)
        if kind == "imagenet":
            if self.test_only:
                raise OsteoError(f"{self.name} has no ImageNet weights; use WEIGHTS=none")
            with _download_timeout():
                try:
                    return self.constructor(include_top=False, weights="imagenet", input_shape=shape,
                                            **self.constructor_kwargs)
                except Exception as e:  # urllib, socket and Keras' own wrapper all differ
                    if not _looks_like_network_error(e):
                        raise
                    raise OsteoError(
                        f"cannot download ImageNet weights for {self.name} (no network?): {_short(e)}; "
                        "train from scratch with WEIGHTS=none, or pass a local file with WEIGHTS=/path/to/file"
                    ) from None
        model = self.constructor(include_top=False, weights=None, input_shape=shape, **self.constructor_kwargs)
        if kind == "file":
            load_weights_file(model, path, self.name)
        return model

    def blocks(self, model: keras.Model) -> list[list[keras.layers.Layer]]:
        """The backbone's layers grouped into blocks, input to output.

        A layer whose name does not match ``block_pattern`` joins the block before it
        (stems and final norms join their neighbours).
        """
        pattern = re.compile(self.block_pattern)
        blocks: list[list] = []
        current = None
        for layer in model.layers:
            m = pattern.search(layer.name)
            if m and m.group(1) != current:
                current = m.group(1)
                blocks.append([])
            if not blocks:
                blocks.append([])
            blocks[-1].append(layer)
        return blocks


def parse_weights(weights) -> tuple[str, Path | None]:
    """``imagenet`` | ``none`` | a path -> (kind, path)."""
    if weights is None or str(weights).lower() in ("none", ""):
        return "none", None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    path = Path(weights)
    if not path.is_file():
        raise OsteoError(
            f"weights file {path} not found; use WEIGHTS=imagenet, WEIGHTS=none or the path of an existing file"
        )
    return "file", path


def load_weights_file(model: keras.Model, path: Path, name: str) -> None:
    """Load a weights file; any skipped or mismatched layer is an error, not a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(str(path))
    except Exception as e:
        raise OsteoError(
            f"weights file {path} does not match backbone {name}: {_short(e)}; "
            f"pass a weights file saved from {name} (without its top) or WEIGHTS=none"
        ) from None


@contextlib.contextmanager
def _download_timeout():
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _looks_like_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, OSError) or any(
        w in text for w in ("url fetch failure", "urlopen", "timed out", "name resolution", "network", "http")
    )


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _tiny(include_top=False, weights=None, input_shape=(64, 64, 3), name="tiny"):
    """A two-block CNN for tests: same interface as keras.applications builders."""
    del include_top
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate((8, 16), start=1):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"tiny_block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"tiny_block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"tiny_block{i}_relu")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


A = keras.applications
register(BackboneSpec("vgg16", A.VGG16, "caffe", 512, r"^(block\d+)_", "vgg16"))
register(BackboneSpec("vgg19", A.VGG19, "caffe", 512, r"^(block\d+)_", "vgg19"))
register(BackboneSpec("densenet169", A.DenseNet169, "torch", 1664, r"^(conv\d+_block\d+|pool\d+)_", "densenet"))
register(BackboneSpec("convnext_tiny", A.ConvNeXtTiny, "none", 768,
                      r"(stage_\d+_block_\d+|downsampling_block_\d+)", "convnext",
                      constructor_kwargs={"include_preprocessing": True}, pooled_norm=True))
register(BackboneSpec("resnet50", A.ResNet50, "caffe", 2048, r"^(conv\d+_block\d+)_", "resnet50"))
register(BackboneSpec("efficientnetv2_b0", A.EfficientNetV2B0, "none", 1280, r"^(block\d+[a-z])_", "efficientnet_v2",
                      constructor_kwargs={"include_preprocessing": True}))
register(BackboneSpec("mobilenetv3_large", A.MobileNetV3Large, "none", 960, r"^(expanded_conv(?:_\d+)?)_",
                      "mobilenet_v3", constructor_kwargs={"include_preprocessing": True}))
register(BackboneSpec("tiny", _tiny, "tf", 16, r"^(tiny_block\d+)_", None, default_size=64, min_size=16,
                      test_only=True))
