"""What an engine provides: the one Backbone interface both engines implement.

osteo builds the study's backbones with one of two engines (keras-hub's Backbone/Task
split: the classifier around them is the same Keras code on both):

=========  ===================================================  ==================  =========================
engine     what the backbone is                                 Keras backends      export formats
=========  ===================================================  ==================  =========================
``keras``  ``keras.applications`` layers (:mod:`.keras_apps`)  tensorflow, torch   onnx, savedmodel, keras
``timm``   timm's PyTorch module as a Keras layer (:mod:`.timm_torch`)  torch       onnx, keras, savedmodel (*)
=========  ===================================================  ==================  =========================

(*) ported: the module's weights copied into the ``keras.applications`` model of the same
architecture (:mod:`.port`; the spec's ``keras_port``: VGG16, VGG19, DenseNet169,
ConvNeXtTiny), which TensorFlow writes as a SavedModel.

A :class:`Backbone` is made once per model, from the device plan and the resolved
recipe (:func:`create`), and everything that differs between the engines goes through
it: building the layer with its weights (ImageNet, none, or a local file checked
against the architecture before it is read), its *stages* (the same architectural
stages on both engines, so ``train.fine_tune_blocks`` means the same thing on either:
the table is in ``docs/ARCHITECTURE.md``), freezing and unfreezing the top N stages,
BatchNorm momentum (in Keras' terms on both), the Grad-CAM target and the export
formats. Outside ``osteo/backbones/`` and :mod:`osteo.device` (which chooses the engine)
no code compares engine names.

This module is Keras-free, and the engines' facts (:data:`osteo.device.ENGINES`: backends,
export formats, input scaling) are read before the Keras backend is chosen; an engine's
implementation is imported only when a model is built.
"""

from __future__ import annotations

import abc
import contextlib
import re
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from osteo.device import EngineInfo, get_engine
from osteo.errors import OsteoError

if TYPE_CHECKING:
    from osteo.registry import BackboneSpec

# Seconds a download of ImageNet weights may wait on the network before osteo gives up.
DOWNLOAD_TIMEOUT = 10.0


def create(spec: BackboneSpec, engine: str, *, image_size: int, weights: str | None = "none",
           preprocessing: str | None = None, compile: bool = False, channels_last: bool = True) -> Backbone:
    """The backbone of ``spec`` on ``engine`` (not built yet: :meth:`Backbone.build` makes the layer)."""
    info = get_engine(engine)
    mode = info.preprocessing(spec, weights) if preprocessing in (None, "auto") else preprocessing
    info.check_preprocessing(mode)
    return info.load()(spec, image_size=image_size, weights=weights, preprocessing=mode, compile=compile,
                       channels_last=channels_last)


class Backbone(abc.ABC):
    """One backbone on one engine: what the classifier, trainer, Grad-CAM and export ask of it.

    Args:
        spec: the registry's spec (architecture, stages, Grad-CAM layer).
        image_size: the square input size.
        weights: ``imagenet``, ``none`` or the path of a local weights file.
        preprocessing: the input scaling (:meth:`EngineInfo.preprocessing` for ``auto``);
            a mode the layer does itself is not applied again by the classifier.
        compile: compile the backbone (engines whose ``compiles_backbone`` is set).
        channels_last: the memory format of an engine that has a choice (timm: PyTorch's
            channels-last or channels-first; Keras' layers take NHWC tensors either way).
    """

    info: ClassVar[EngineInfo]

    def __init__(self, spec: BackboneSpec, *, image_size: int, weights: str | None = "none",
                 preprocessing: str = "none", compile: bool = False, channels_last: bool = True):
        self.spec = spec
        self.channels_last = channels_last
        self.image_size = image_size
        self.weights = weights
        self.preprocessing = preprocessing
        self.compile = compile
        self.layer: Any = None  # the Keras layer, once built

    @property
    def scales_own_input(self) -> bool:
        """The layer applies :attr:`preprocessing` itself (the classifier adds no Preprocess layer)."""
        return self.preprocessing == self.info.own_preprocessing

    @abc.abstractmethod
    def build(self) -> Any:
        """Make the Keras layer on (size, size, 3) inputs with its weights; sets :attr:`layer`."""

    @abc.abstractmethod
    def stages(self) -> list[list[Any]]:
        """The trainable Keras variables grouped by architectural stage, input to output."""

    def freeze(self) -> None:
        """Phase 1: nothing in the backbone learns."""
        self.layer.trainable = False

    @abc.abstractmethod
    def unfreeze(self, top_stages: int = 0, freeze_bn: bool = True) -> None:
        """Phase 2: the top ``top_stages`` stages learn (0: all); BatchNorm's scale and shift stay
        frozen with ``freeze_bn``."""

    @abc.abstractmethod
    def set_bn_momentum(self, momentum: float) -> int:
        """Every BatchNorm's moving-average momentum, in Keras' terms (the weight of the old statistics);
        the number of BatchNorm layers set."""

    @abc.abstractmethod
    def gradcam_parts(self, model: Any, target: str | None = None) -> tuple[list, Any, list]:
        """(layers before the backbone, ``feature(x, training) -> (target activations, backbone
        output)``, layers after it) of the classifier ``model``, for Grad-CAM. The target is
        the layer named ``target`` (one of :meth:`feature_maps`), by default the last stage's."""

    @abc.abstractmethod
    def feature_maps(self, model: Any) -> list[tuple[str, tuple[int, int]]]:
        """The backbone's layers Grad-CAM can read, input to output, ending with the last stage's
        (its default target), each with its feature map's (height, width) at the input size."""

    @abc.abstractmethod
    def load_weights_file(self, path: Path) -> None:
        """Load a local weights file into the built layer; its declared shapes are checked
        against the architecture before any tensor is read, and a mismatch is one line."""

    def keras_port(self) -> tuple[dict, str]:
        """(the built layer's weights as a state dict of arrays, the input scaling of Keras' layers
        that computes as it does) for :mod:`osteo.backbones.port`: how an engine whose backbone is
        not Keras' layers exports formats only they can write (``EngineInfo.ported_formats``)."""
        raise OsteoError(f"{self.spec.name} on the {self.info.name} engine is Keras' layers already: nothing to port")

    @property
    def export_formats(self) -> tuple[str, ...]:
        return self.info.export_formats

    def stage_count(self) -> int:
        return len(self.spec.stages[self.info.name])


def group_by_stage(names: Sequence[str], patterns: Sequence[str]) -> list[list[int]]:
    """Indices of ``names`` (layer or parameter names, input to output) grouped by stage.

    ``names[i]`` is in the first stage whose pattern it matches; a name that matches none
    joins the stage of the name before it (a stem joins the first stage, a final norm the
    last). Every stage must receive something: an architecture whose names changed fails
    here, not silently later.
    """
    compiled = [re.compile(p) for p in patterns]
    groups: list[list[int]] = [[] for _ in patterns]
    current = 0
    for i, name in enumerate(names):
        current = next((k for k, c in enumerate(compiled) if c.search(name)), current)
        groups[current].append(i)
    empty = [patterns[k] for k, g in enumerate(groups) if not g]
    if empty:
        raise ValueError(f"no layer or parameter matches the stage patterns {empty}")
    return groups


@contextlib.contextmanager
def download_timeout() -> Iterator[None]:
    """Bound every socket opened inside (urllib, the hub client) by :data:`DOWNLOAD_TIMEOUT`."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def looks_like_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, OSError) or any(
        w in text for w in ("url fetch failure", "urlopen", "timed out", "name resolution", "network", "http")
    )


def import_target(target: str):
    """The object a spec names as ``module:attribute`` (``keras.applications.vgg16:VGG16``)."""
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


OFFLINE_FIX = ("train from scratch with --weights none (make: WEIGHTS=none), or pass a local file with --weights "
               "/path/to/file (make: WEIGHTS=/path/to/file)")
