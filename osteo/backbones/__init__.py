"""The Keras side of the backbones: building them, feeding them, loading their weights.

The specs themselves are data in :mod:`osteo.registry` (Keras-free); this module is
imported only when a model is built. What differs between backbones is read off the
spec, so no code here or elsewhere branches on a model's name:

* :class:`Preprocess` applies the spec's ``preprocessing`` mode on [0, 255] RGB
  (``caffe`` for VGG and ResNet, ``torch`` for DenseNet, ``tf``, or ``none`` for the
  models with their own preprocessing layers: ConvNeXt, EfficientNetV2, MobileNetV3).
  The study fed ConvNeXt [0, 1] pixels and VGG/DenseNet raw pixels; here inputs are
  always [0, 255] and the spec decides.
* :func:`build_backbone` imports the spec's constructor and loads its weights;
  :func:`split_blocks` groups its layers by the spec's block pattern.

Weights: ``"imagenet"`` (the Keras cache, or a download), ``"none"``, or a path to a
weights file of the backbone (``.weights.h5`` or the Keras ``_notop.h5`` files).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from osteo.errors import OsteoError
from osteo.registry import PREPROCESSING_MODES, parse_weights

if TYPE_CHECKING:
    from osteo.registry import BackboneSpec

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
IMAGENET_MEAN_TORCH = (0.485, 0.456, 0.406)
IMAGENET_STD_TORCH = (0.229, 0.224, 0.225)
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


def build_backbone(spec: BackboneSpec, *, image_size: int, weights: str | os.PathLike | None = "imagenet"
                   ) -> keras.Model:
    """``spec``'s backbone without its top, on (size, size, 3) inputs, weights loaded.

    The image size was checked when the recipe was resolved. Offline,
    ``weights="imagenet"`` fails within ``DOWNLOAD_TIMEOUT`` seconds with an
    :class:`OsteoError` that names the alternatives.
    """
    shape = (image_size, image_size, 3)
    constructor = _import(spec.constructor)
    kind, path = parse_weights(weights)
    if kind == "imagenet":
        if spec.test_only:
            raise OsteoError(f"{spec.name} has no ImageNet weights; use WEIGHTS=none")
        with _download_timeout():
            try:
                return constructor(include_top=False, weights="imagenet", input_shape=shape,
                                   **spec.constructor_kwargs)
            except Exception as e:  # urllib, socket and Keras' own wrapper all differ
                if not _looks_like_network_error(e):
                    raise
                raise OsteoError(
                    f"cannot download ImageNet weights for {spec.name} (no network?): {_short(e)}; "
                    "train from scratch with WEIGHTS=none, or pass a local file with WEIGHTS=/path/to/file"
                ) from None
    model = constructor(include_top=False, weights=None, input_shape=shape, **spec.constructor_kwargs)
    if kind == "file":
        load_weights_file(model, path, spec.name)
    return model


def split_blocks(model: keras.Model, block_pattern: str) -> list[list[keras.layers.Layer]]:
    """The layers grouped into blocks, input to output.

    A layer whose name does not match ``block_pattern`` joins the block before it
    (stems and final norms join their neighbours).
    """
    pattern = re.compile(block_pattern)
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


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


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


def tiny_backbone(include_top=False, weights=None, input_shape=(64, 64, 3), name="tiny"):
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
