"""The backbone registry: model name = registry key = recipe name. No Keras import.

    >>> from osteo.registry import get_backbone, list_backbones
    >>> "convnext_tiny" in list_backbones()
    True
    >>> get_backbone("vgg16").preprocessing
    'caffe'

A :class:`BackboneSpec` is data: how to build the backbone (its constructor named by
string, imported only at build time by :mod:`osteo.backbones`), how to feed it
(preprocessing, sizes), how it is split into blocks, and what was measured fastest
for it on each CPU class (:class:`CpuDecision`). The CLI reads this table before Keras
is imported, because the Keras backend has to be chosen first.

The CPU decisions come from ``benchmarks/models.py`` (tables in ``benchmarks/README.md``).
On PyTorch the backbone is timm's module inside the Keras model (the timm engine,
:mod:`osteo.backbones.timm_torch`), which changed them: training images/sec at 224 px,
batch 16, full fine-tuning, 2026-11-28:

``avx512_bf16`` (2-core AMD EPYC with AVX-512 BF16), TensorFlow (Keras' layers) /
PyTorch (timm engine), both bfloat16; timm's own loop, best of channels-first/-last:

    vgg16           4.17 / 4.27   timm 4.11   (timm engine float32: 2.08)
    vgg19           3.46 / 3.42   timm 3.43
    densenet169     6.89 / 12.15  timm 11.44  (float32: 6.48; TF first step 64 s / 2.2 s)
    convnext_tiny   1.24 / 8.10   timm 7.97   (float32: 4.92)

so PyTorch with bfloat16 everywhere (VGG is a tie; PyTorch starts 1-2 s sooner).

``avx2`` (2-core AMD EPYC, AVX2, no AVX-512), measured before the timm engine with Keras'
layers on both backends, batch 32, 32 px (48 px for ConvNeXt), TensorFlow / PyTorch:

    vgg16           15.0 / 25.8; first step 8.5 s / 1.6 s
    densenet169     44.5 / 27.3; first step 153 s / 3.2 s
    convnext_tiny   PyTorch 23 at 48 px (TensorFlow was 3x slower on the other class)

and timm's own loop ran 1.6-1.8x Keras' layers on PyTorch there (VGG16 13.9 vs 8.6,
DenseNet169 18.6 vs 10.1, ConvNeXtTiny 21.9 vs 12.0 img/s at 64 px), which puts the timm
engine above TensorFlow for DenseNet169 too: PyTorch for all four, inferred from those
ratios rather than measured with the engine on that class (no AVX2 machine since).

:class:`CpuDecision` keeps a short-run rule (a backend with a slow first step loses
short runs) for entries that need one; none of the study's backbones does now.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from osteo.errors import OsteoError

PREPROCESSING_MODES = ("caffe", "torch", "tf", "none")
CPU_CLASSES = ("avx512_bf16", "avx2")


@dataclass(frozen=True)
class CpuDecision:
    """What was measured fastest for one backbone on one CPU class."""

    backend: str = "tensorflow"  # the faster backend for long runs
    short_run_backend: str | None = None  # faster below ``short_run_images``
    short_run_images: int = 0
    bf16: tuple[str, ...] = ()  # backends on which mixed_bfloat16 was measured faster
    xla: bool = False  # jit_compile measured faster on TensorFlow CPU


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one backbone.

    ``constructor`` is ``"module:attribute"``, imported at build time: a
    ``keras.applications`` builder or any function with the same interface
    (``include_top``, ``weights``, ``input_shape``). ``preprocessing`` is exactly what
    the reference module's ``preprocess_input`` does (``caffe``: RGB->BGR and ImageNet
    mean subtraction; ``torch``: [0, 1] then ImageNet mean/std; ``tf``: [-1, 1];
    ``none``: the model has its own preprocessing layers and takes [0, 255]).
    """

    name: str
    constructor: str
    preprocessing: str
    feature_size: int
    block_pattern: str  # regex whose group 1 names a layer's block (for "unfreeze the top N")
    reference_module: str | None = None  # keras.applications.<module>, for preprocess_input
    timm_name: str | None = None  # the same architecture in timm (the PyTorch engine)
    default_size: int = 224
    min_size: int = 32
    constructor_kwargs: dict = field(default_factory=dict)
    test_only: bool = False
    # The backbone's own top normalises the pooled features (ConvNeXt: LayerNorm);
    # without it, features from scratch grow large and saturate the softmax.
    pooled_norm: bool = False
    cpu: dict[str, CpuDecision] = field(default_factory=dict)  # per CPU class
    gradcam_layer: str = ""  # the last convolutional stage's output layer, where Grad-CAM looks
    # timm engine: training images after which torch.compile of the backbone pays for its
    # compile time, per device kind ("gpu" or a CPU class); absent: never measured faster
    compile_pays_after: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"{self.name}: unknown preprocessing {self.preprocessing!r}")
        unknown = set(self.cpu) - set(CPU_CLASSES)
        if unknown:
            raise ValueError(f"{self.name}: unknown CPU classes {sorted(unknown)}")

    def cpu_decision(self, cpu_class: str) -> CpuDecision:
        return self.cpu.get(cpu_class, CpuDecision())

    def check_size(self, size: int) -> None:
        if size < self.min_size:
            raise OsteoError(
                f"image size {size} is below {self.name}'s minimum of {self.min_size}; "
                f"use IMAGE_SIZE={self.min_size} or more (default {self.default_size})"
            )

    def build(self, *, image_size: int, weights="imagenet"):
        """The Keras backbone without its top (see :func:`osteo.backbones.build_backbone`)."""
        from osteo.backbones import build_backbone

        return build_backbone(self, image_size=image_size, weights=weights)

    def blocks(self, model) -> list[list]:
        """The backbone's layers grouped into blocks, input to output."""
        from osteo.backbones import split_blocks

        return split_blocks(model, self.block_pattern)


def parse_weights(weights: str | os.PathLike | None) -> tuple[str, Path | None]:
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


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones(*, include_test: bool = False) -> list[str]:
    """Registered names, sorted; the tiny test backbone only on request."""
    return sorted(n for n, s in _REGISTRY.items() if include_test or not s.test_only)


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OsteoError(
            f"unknown model {name!r}; choose one of: {', '.join(list_backbones(include_test=True))}"
        ) from None


_APPS = "keras.applications"
# PyTorch (the timm engine) on both CPU classes; bfloat16 where the CPU has it
_TORCH_FIRST = {"avx512_bf16": CpuDecision(backend="torch", bf16=("tensorflow", "torch")),
                "avx2": CpuDecision(backend="torch")}

register(BackboneSpec(
    "vgg16", f"{_APPS}:VGG16", "caffe", 512, r"^(block\d+)_", "vgg16", timm_name="vgg16.tv_in1k",
    gradcam_layer="block5_conv3",
    cpu=_TORCH_FIRST,
))
register(BackboneSpec(
    "vgg19", f"{_APPS}:VGG19", "caffe", 512, r"^(block\d+)_", "vgg19", timm_name="vgg19.tv_in1k",
    gradcam_layer="block5_conv4",
    cpu=_TORCH_FIRST,
))
register(BackboneSpec(
    "densenet169", f"{_APPS}:DenseNet169", "torch", 1664, r"^(conv\d+_block\d+|pool\d+)_", "densenet",
    timm_name="densenet169.tv_in1k", gradcam_layer="relu",
    cpu={**_TORCH_FIRST, "avx512_bf16": CpuDecision(backend="torch", bf16=("torch",))},
))
register(BackboneSpec(
    "convnext_tiny", f"{_APPS}:ConvNeXtTiny", "none", 768, r"(stage_\d+_block_\d+|downsampling_block_\d+)",
    "convnext", timm_name="convnext_tiny.fb_in1k", constructor_kwargs={"include_preprocessing": True},
    gradcam_layer="convnext_tiny_stage_3_block_2_identity",
    pooled_norm=True,
    # H200, bf16, batch 128 (issue 10): 2,814 img/s eager -> 4,195 compiled, i.e. 1.17e-4 s
    # saved per image; an assumed ~60 s compile pays after ~500,000 images (not yet timed here)
    compile_pays_after={"gpu": 500_000},
    cpu={**_TORCH_FIRST, "avx512_bf16": CpuDecision(backend="torch", bf16=("torch",), xla=True)},
))
register(BackboneSpec(
    "resnet50", f"{_APPS}:ResNet50", "caffe", 2048, r"^(conv\d+_block\d+)_", "resnet50",
    timm_name="resnet50.tv_in1k", gradcam_layer="conv5_block3_out",
))
register(BackboneSpec(
    "efficientnetv2_b0", f"{_APPS}:EfficientNetV2B0", "none", 1280, r"^(block\d+[a-z])_", "efficientnet_v2",
    timm_name="tf_efficientnetv2_b0.in1k", constructor_kwargs={"include_preprocessing": True},
    gradcam_layer="top_activation",
))
register(BackboneSpec(
    "mobilenetv3_large", f"{_APPS}:MobileNetV3Large", "none", 960, r"^(expanded_conv(?:_\d+)?)_",
    "mobilenet_v3", timm_name="tf_mobilenetv3_large_100.in1k", constructor_kwargs={"include_preprocessing": True},
    gradcam_layer="conv_1",
))
register(BackboneSpec(
    "tiny", "osteo.backbones:tiny_backbone", "tf", 16, r"^(tiny_block\d+)_", None, default_size=64, min_size=16,
    test_only=True, timm_name="test_resnet", gradcam_layer="tiny_block2_relu",
))
