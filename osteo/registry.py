"""The backbone registry: model name = registry key = recipe name. No Keras import.

    >>> from osteo.registry import get_backbone, list_backbones
    >>> "convnext_tiny" in list_backbones()
    True
    >>> get_backbone("vgg16").preprocessing
    'caffe'

A :class:`BackboneSpec` is data: how to build the backbone on each engine (its
``keras.applications`` constructor named by string, its timm name), how to feed it
(preprocessing, sizes), its architectural stages on each engine, and what was measured
fastest for it on each CPU class (:class:`CpuDecision`). The CLI reads this table before
Keras is imported, because the Keras backend has to be chosen first; the engines
(:mod:`osteo.backbones`) read it at build time.

The CPU decisions follow from the measurements in ``benchmarks/README.md`` (results in
``benchmarks/results/``); each decision's ``why`` quotes the measured ratio it rests on,
and that sentence is what a run's ``env.json`` records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from osteo.errors import OsteoError

PREPROCESSING_MODES = ("caffe", "torch", "tf", "none")
# the ImageNet statistics the modes use: ``caffe`` subtracts the mean (RGB, 0-255 pixels); ``torch``
# scales to [0, 1], then subtracts the mean and divides by the std
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
IMAGENET_MEAN_TORCH = (0.485, 0.456, 0.406)
IMAGENET_STD_TORCH = (0.229, 0.224, 0.225)
CPU_CLASSES = ("avx512_bf16", "avx2")


@dataclass(frozen=True)
class CpuDecision:
    """What was measured fastest for one backbone on one CPU class, and the measurement."""

    backend: str = "tensorflow"  # the faster backend
    bf16: tuple[str, ...] = ()  # backends on which mixed_bfloat16 was measured faster
    xla: bool = False  # jit_compile measured faster on TensorFlow CPU
    why: str = ""  # the measured ratio behind ``backend`` (quoted in env.json)
    # the faster backend for Keras' layers (model.impl=keras, or a Keras weights file that does not port), where measured
    keras_backend: str = ""
    keras_why: str = ""
    # the timm engine's memory format on this class: channels-last, or channels-first where that was
    # measured faster (layout_why, quoted in env.json)
    channels_last: bool = True
    layout_why: str = ""
    # channels-first only for images of this size (px) and larger, where smaller ones were measured no
    # faster channels-first (small_layout_why, quoted in env.json); 0: at every size
    channels_first_from: int = 0
    small_layout_why: str = ""


@dataclass(frozen=True)
class SlowPath:
    """A combination a user can ask for that was measured far slower than ``auto`` on one device
    class: ``osteo train`` warns with the measurement (``"*"`` matches any value). Far: 2.3x or
    more (2.4-26x so far); VGG's Keras layers (1.1-1.7x on either backend and CPU class) and
    DenseNet169's on TensorFlow on AVX-512 (the timm engine 2.05x) are not."""

    device_class: str  # "gpu" or a CPU class
    backend: str
    impl: str
    precision: str
    measured: str  # the measurement, for the warning: "... img/s vs ... for auto (... px): Nx slower"

    def matches(self, device_class: str, backend: str, impl: str, precision: str) -> bool:
        return all(want in ("*", got) for want, got in ((self.device_class, device_class), (self.backend, backend),
                                                         (self.impl, impl), (self.precision, precision)))


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
    # Architectural stages, input to output, per engine: one regex per stage over Keras layer
    # names (``keras``) or timm parameter names (``timm``); see osteo.backbones.base.group_by_stage.
    # Both engines have the same stages, so train.fine_tune_blocks means the same on either.
    stages: dict[str, tuple[str, ...]]
    stages_doc: str  # what a stage is, for people ("5 conv blocks")
    reference_module: str | None = None  # keras.applications.<module>, for preprocess_input
    timm_name: str | None = None  # the same architecture in timm (the PyTorch engine)
    bn_momentum: float = 0.99  # the reference implementation's BatchNorm momentum, Keras' terms
    default_size: int = 224
    min_size: int = 32
    constructor_kwargs: dict = field(default_factory=dict)
    test_only: bool = False
    # The backbone's own top normalises the pooled features (ConvNeXt: LayerNorm);
    # without it, features from scratch grow large and saturate the softmax.
    pooled_norm: bool = False
    cpu: dict[str, CpuDecision] = field(default_factory=dict)  # per CPU class
    slow_paths: tuple[SlowPath, ...] = ()
    # why the timm engine is chosen on PyTorch, per device class ("gpu" or a CPU class): the
    # measured ratio to Keras' layers on PyTorch (quoted in env.json)
    engine_why: dict[str, str] = field(default_factory=dict)
    gradcam_layer: str = ""  # the last convolutional stage's output layer, where Grad-CAM looks
    # the same layer in timm's module (by its name in named_modules()) where it is not the module's
    # output: VGG's last ReLU, before the max-pool that ends timm's features as it ends no Keras block5
    timm_gradcam_layer: str = ""
    # the Grad-CAM layer of Keras' layers is the input of the keras.applications model's last layer,
    # which gradcam_layer then only names: ConvNeXt's last block's sum (timm's forward_features), before
    # the LayerNormalization of every position keras.applications ends in; its last named layer
    # before the sum is the block's residual branch alone
    gradcam_before_last: bool = False
    # timm engine: training images after which torch.compile of the backbone pays for its
    # compile time, per device kind ("gpu" or a CPU class); absent: never measured faster
    compile_pays_after: dict[str, int] = field(default_factory=dict)
    # the timm module's weights go into the keras.applications model (osteo.backbones.port.PORTS):
    # how a timm run is exported as a SavedModel; "": no port (the two architectures differ)
    keras_port: str = ""

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"{self.name}: unknown preprocessing {self.preprocessing!r}")
        unknown = set(self.cpu) - set(CPU_CLASSES)
        if unknown:
            raise ValueError(f"{self.name}: unknown CPU classes {sorted(unknown)}")
        counts = {engine: len(patterns) for engine, patterns in self.stages.items()}
        if len(set(counts.values())) != 1 or ("timm" in counts) != bool(self.timm_name):
            raise ValueError(f"{self.name}: every engine needs the same number of stages, got {counts}")

    def cpu_decision(self, cpu_class: str) -> CpuDecision:
        return self.cpu.get(cpu_class, CpuDecision())

    def check_size(self, size: int) -> None:
        if size < self.min_size:
            raise OsteoError(
                f"image size {size} is below {self.name}'s minimum of {self.min_size}; "
                f"use --image-size {self.min_size} or more (make: IMAGE_SIZE=)"
            )

    @property
    def n_stages(self) -> int:
        return len(self.stages["keras"])


def names_a_file(weights: str | os.PathLike | None) -> bool:
    """Whether a ``--weights`` value is a path, not ``imagenet``, ``none`` or empty (whether or not
    a file is there: :func:`parse_weights` checks that)."""
    return str(weights or "").lower() not in ("", "none", "imagenet")


def parse_weights(weights: str | os.PathLike | None) -> tuple[str, Path | None]:
    """``imagenet`` | ``none`` | a path -> (kind, path)."""
    if not names_a_file(weights):
        return ("imagenet" if str(weights).lower() == "imagenet" else "none"), None
    path = Path(weights)
    if path.is_dir():
        raise OsteoError(f"weights {path} is a folder; give the weights file in it, or --weights imagenet or none")
    if not path.is_file():
        raise OsteoError(
            f"weights file {path} not found; use --weights imagenet, none or the path of an existing file "
            "(make: WEIGHTS=)"
        )
    try:  # before any reader's own words for it (h5py's errno text, "not a weights file of ...")
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        raise OsteoError(f"weights file {path} cannot be read ({e.strerror or e}); make it readable (e.g. chmod a+r "
                         "FILE), or use --weights imagenet or none") from None
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
# PyTorch (the timm engine) on both CPU classes; bfloat16 where the CPU has it. Each ``why``
# is the measurement behind the choice (benchmarks/README.md, "CPU decisions").
# the timm engine against timm's own loop on AVX2 (benchmarks/README.md: the unflagged readings of the twenty-third
# to thirtieth sessions across processes, the thirtieth's in one process); against Keras' layers on both backends in
# the twenty-fourth session (64 px), which the AVX2 reasons quote
_AVX2_NOTE = ("; the timm engine itself trained 0.91-1.03x timm's own loop on this class across processes, "
              "1.00-1.11x in one process (64 px, float32)")
_AVX2_64 = "64 px, float32, medians of 3 interleaved rounds"


def _avx2_bf16(name: str, bf16: str, fp32: str, times: str) -> SlowPath:
    """bfloat16 asked for on a CPU without its instructions (AVX2): the timm engine's measurement
    against float32, which ``auto`` picks there (benchmarks/README.md, twenty-fourth session)."""
    return SlowPath("avx2", "torch", "timm", "mixed_bfloat16",
                    f"the timm engine trained {name} in bfloat16 at {bf16} img/s vs {fp32} in float32 on a CPU "
                    f"without bfloat16 instructions (64 px, medians of 3 interleaved rounds): {times} slower")


def _cpu(avx512: str, avx2: str, *, bf16: tuple[str, ...] = ("torch",), xla: bool = False,
         keras: dict[str, tuple[str, str]] | None = None, channels_first: dict[str, str] | None = None,
         channels_first_from: dict[str, tuple[int, str]] | None = None) -> dict:
    """The CPU decisions of one backbone; ``keras``: per class, (backend, measurement) for Keras'
    layers, which model.impl=keras (or a Keras weights file that does not port) asks for; ``channels_first``: per class,
    the measurement by which the timm engine runs channels-first there; ``channels_first_from``: per class, (the
    smallest image size it does so at, the measurement by which smaller images run channels-last)."""
    k, cf, small = keras or {}, channels_first or {}, channels_first_from or {}
    layout = {c: {"channels_last": c not in cf, "layout_why": cf.get(c, ""),
                  "channels_first_from": small.get(c, (0, ""))[0], "small_layout_why": small.get(c, (0, ""))[1]}
              for c in CPU_CLASSES}
    return {"avx512_bf16": CpuDecision("torch", bf16, xla, avx512, *k.get("avx512_bf16", ("", "")),
                                       **layout["avx512_bf16"]),
            "avx2": CpuDecision("torch", why=avx2 + _AVX2_NOTE, keras_backend=k.get("avx2", ("", ""))[0],
                                keras_why=k.get("avx2", ("", ""))[1], **layout["avx2"])}


def _seq(prefix: str, *ranges: tuple[int, int]) -> tuple[str, ...]:
    """One stage pattern per index range of an ``nn.Sequential`` (VGG's ``features.N``)."""
    return tuple(rf"^{prefix}\.({'|'.join(str(i) for i in range(lo, hi + 1))})\." for lo, hi in ranges)


_VGG_KERAS = tuple(rf"^block{i}_" for i in range(1, 6))
# timm's own loop on the AVX2 class, float32 (benchmarks/README.md): channels-first ran VGG faster than
# channels-last at 224 px (twenty-third session, medians of 5 interleaved rounds) and at 128 px, and no faster at
# 64 px (thirtieth session, both loops in one process, benchmarks/layout.py; the twenty-third session's 64 px
# reading across processes, channels-first 1.12x for VGG19, was not found again in one process)
_VGG_AVX2_CF = ("timm's own channels-first loop trained VGG16 1.09x its channels-last one (1.29 vs 1.18 img/s) and "
                "VGG19 1.19x (0.945 vs 0.796) at 224 px, and VGG16 1.09x and VGG19 1.12x at 128 px (medians of 6 "
                "alternating windows in one process), float32")
_VGG_AVX2_SMALL = (128, "at 64 px timm's own channels-last loop trained VGG16 1.006x and 1.03x its channels-first one, "
                        "VGG19 1.005x and 1.046x (two runs, medians of 8 alternating 12 s windows in one process), "
                        "float32")

register(BackboneSpec(
    "vgg16", f"{_APPS}:VGG16", "caffe", 512, reference_module="vgg16", timm_name="vgg16.tv_in1k",
    stages={"keras": _VGG_KERAS, "timm": _seq("features", (0, 4), (5, 9), (10, 16), (17, 23), (24, 30))},
    stages_doc="5 conv blocks (each ends in a max-pool)",
    keras_port="vgg",
    gradcam_layer="block5_conv3",
    timm_gradcam_layer="features.29",
    slow_paths=(_avx2_bf16("VGG16", "0.535", "13.9", "26x"),),
    cpu=_cpu("the timm engine trained 1.14x TensorFlow's rate (9.95 vs 8.71 img/s, 224 px, bf16, medians of 5 "
             "interleaved rounds, freed memory kept; an earlier single-window measurement gave 1.02x, 4.27 vs 4.17)",
             f"the timm engine trained 1.58x Keras' layers on TensorFlow (12.5 vs 7.82 img/s, {_AVX2_64})",
             bf16=("tensorflow", "torch"),
             channels_first={"avx2": _VGG_AVX2_CF}, channels_first_from={"avx2": _VGG_AVX2_SMALL},
             keras={"avx512_bf16": ("tensorflow", "Keras' layers trained 1.10x on TensorFlow what they did on PyTorch "
                                                  "at 64 px (36.7 vs 33.3 img/s) and 1.08x at 224 px (3.62 vs 3.36), bf16; single "
                                                  "windows, each off by up to 10%: a narrow margin"),
                    "avx2": ("torch", f"Keras' layers trained 1.45x on PyTorch what they did on TensorFlow (11.0 vs "
                                      f"7.82 img/s, {_AVX2_64}; 1.72x at 32 px, once)")}),
    engine_why={"avx512_bf16": "the timm engine trained 1.40x Keras' layers on PyTorch (4.27 vs 3.04 img/s, 224 px, bf16)",
                "avx2": f"the timm engine trained 1.12x Keras' layers on PyTorch (12.5 vs 11.0 img/s, {_AVX2_64})"
                        + _AVX2_NOTE,
                "gpu": "the timm engine trained 1.53x Keras' layers on PyTorch on an H200 (2,494 vs 1,629 img/s, "
                       "224 px, batch 128, bf16)"},
))
register(BackboneSpec(
    "vgg19", f"{_APPS}:VGG19", "caffe", 512, reference_module="vgg19", timm_name="vgg19.tv_in1k",
    stages={"keras": _VGG_KERAS, "timm": _seq("features", (0, 4), (5, 9), (10, 18), (19, 27), (28, 36))},
    stages_doc="5 conv blocks (each ends in a max-pool)",
    keras_port="vgg",
    gradcam_layer="block5_conv4",
    timm_gradcam_layer="features.35",
    slow_paths=(_avx2_bf16("VGG19", "0.423", "12.0", "27x"),),
    cpu=_cpu("the timm engine trained 1.13x TensorFlow's rate (7.94 vs 7.01 img/s, 224 px, bf16, medians of 5 "
             "interleaved rounds, freed memory kept; an earlier single-window measurement gave a tie, 3.42 vs 3.46); it starts sooner",
             f"the timm engine trained 1.68x Keras' layers on TensorFlow (10.2 vs 6.10 img/s, {_AVX2_64})",
             bf16=("tensorflow", "torch"),
             channels_first={"avx2": _VGG_AVX2_CF}, channels_first_from={"avx2": _VGG_AVX2_SMALL},
             keras={"avx512_bf16": ("tensorflow", "Keras' layers trained 1.37x on TensorFlow what they did on PyTorch "
                                                  "at 64 px (34.3 vs 25.0 img/s) and 1.26x at 224 px (3.43 vs 2.72), bf16"),
                    "avx2": ("torch", f"Keras' layers trained 1.39x on PyTorch what they did on TensorFlow (8.89 vs "
                                      f"6.10 img/s, {_AVX2_64})")}),
    engine_why={"avx512_bf16": "the timm engine trained 1.30x Keras' layers on PyTorch (3.40 vs 2.62 img/s, 224 px, bf16)",
                "avx2": f"the timm engine trained 1.15x Keras' layers on PyTorch (10.2 vs 8.89 img/s, {_AVX2_64})"
                        + _AVX2_NOTE,
                "gpu": "the timm engine trained 1.46x Keras' layers on PyTorch on an H200 (2,305 vs 1,579 img/s, "
                       "224 px, batch 128, bf16)"},
))
register(BackboneSpec(
    "densenet169", f"{_APPS}:DenseNet169", "torch", 1664, reference_module="densenet",
    timm_name="densenet169.tv_in1k",
    stages={"keras": (r"^conv2_block", r"^(pool2_|conv3_block)", r"^(pool3_|conv4_block)", r"^(pool4_|conv5_block)"),
            "timm": (r"^features\.denseblock1\.", r"^features\.(transition1|denseblock2)\.",
                     r"^features\.(transition2|denseblock3)\.", r"^features\.(transition3|denseblock4)\.")},
    stages_doc="4 dense blocks (the stem with the first, each transition with the block after it)",
    keras_port="densenet",
    gradcam_layer="relu",
    slow_paths=(SlowPath("avx512_bf16", "torch", "keras", "*",
                         "Keras' layers on PyTorch trained DenseNet169 at 4.33 img/s vs 12.40 for the timm engine "
                         "(224 px, bf16): 2.9x slower, 2.3x the memory"),
                SlowPath("gpu", "torch", "keras", "*",
                         "Keras' layers on PyTorch trained DenseNet169 at 203 img/s vs 1,014 for the timm engine on "
                         "an H200 (224 px, batch 128, bf16): 5.0x slower, 3.8x the GPU memory"),
                SlowPath("avx2", "torch", "keras", "*",
                         "Keras' layers on PyTorch trained DenseNet169 at 11.5 img/s vs 27.4 for the timm engine "
                         f"({_AVX2_64}): 2.4x slower, 1.3x the memory"),
                SlowPath("avx2", "tensorflow", "keras", "*",
                         "Keras' layers on TensorFlow trained DenseNet169 at 8.75 img/s vs 27.4 for the timm engine "
                         f"({_AVX2_64}): 3.5x slower, 1.7x the memory"),
                _avx2_bf16("DenseNet169", "3.65", "24.7", "6.8x")),
    cpu=_cpu("the timm engine trained 2.05x TensorFlow's rate (22.6 vs 11.0 img/s, 224 px, bf16, medians of 5 "
             "interleaved rounds, freed memory kept; an earlier single-window measurement gave 1.76x, 12.15 vs 6.89)",
             f"the timm engine trained 3.47x Keras' layers on TensorFlow (27.4 vs 8.75 img/s, {_AVX2_64})",
             bf16=("tensorflow", "torch"),  # Keras' layers on TensorFlow: 6.89 img/s bf16 vs 5.10 float32, 224 px
             keras={"avx512_bf16": ("tensorflow", "Keras' layers trained 2.16x on TensorFlow what they did on PyTorch "
                                                  "at 64 px (53.2 vs 24.6 img/s) and 1.56x at 224 px (6.89 vs 4.41), bf16"),
                    "avx2": ("torch", f"Keras' layers trained 1.47x on PyTorch what they did on TensorFlow (11.5 vs "
                                      f"8.75 img/s, {_AVX2_64}; rounds 1.24-1.57x); an earlier single measurement at 32 "
                                      "px had TensorFlow 1.63x ahead")}),
    engine_why={"avx512_bf16": "the timm engine trained 2.86x Keras' layers on PyTorch (12.40 vs 4.33 img/s, 224 px, "
                                "bf16), in 0.43x the memory",
                "avx2": f"the timm engine trained 2.37x Keras' layers on PyTorch (27.4 vs 11.5 img/s, {_AVX2_64})"
                        + _AVX2_NOTE,
                "gpu": "the timm engine trained 5.0x Keras' layers on PyTorch on an H200 (1,014 vs 203 img/s, "
                       "224 px, batch 128, bf16), in 0.26x the GPU memory"},
))
register(BackboneSpec(
    "convnext_tiny", f"{_APPS}:ConvNeXtTiny", "none", 768, reference_module="convnext",
    timm_name="convnext_tiny.fb_in1k", constructor_kwargs={"include_preprocessing": True},
    stages={"keras": (r"_stage_0_", r"_(downsampling_block_0|stage_1_)", r"_(downsampling_block_1|stage_2_)",
                      r"_(downsampling_block_2|stage_3_)"),
            "timm": tuple(rf"^stages\.{i}\." for i in range(4))},
    stages_doc="4 stages (the stem with the first, each downsampling with the stage after it)",
    keras_port="convnext",
    gradcam_layer="convnext_tiny_stage_3_output",
    gradcam_before_last=True,
    pooled_norm=True,
    # H200, bf16, batch 128 (issue 10): 2,814 img/s eager -> 4,195 compiled, i.e. 1.17e-4 s
    # saved per image; an assumed ~60 s compile pays after ~500,000 images (not yet timed here)
    compile_pays_after={"gpu": 500_000},
    slow_paths=(SlowPath("avx512_bf16", "tensorflow", "keras", "*",
                         "TensorFlow's ConvNeXtTiny trained at 1.24 img/s vs 8.10 for the timm engine on PyTorch "
                         "(224 px, bf16): 6.5x slower"),
                SlowPath("avx2", "tensorflow", "keras", "*",
                         "TensorFlow's ConvNeXtTiny trained at 3.71 img/s vs 25.0 for the timm engine on PyTorch "
                         f"({_AVX2_64}): 6.4x slower"),
                _avx2_bf16("ConvNeXtTiny", "1.33", "26.5", "19x")),
    cpu=_cpu("the timm engine trained 6.53x TensorFlow's rate (8.10 vs 1.24 img/s, 224 px, bf16)",
             f"the timm engine trained 6.41x Keras' layers on TensorFlow (25.0 vs 3.71 img/s, {_AVX2_64})", xla=True,
             keras={"avx512_bf16": ("torch", "Keras' layers trained 3.30x on PyTorch what they did on TensorFlow at "
                                             "64 px (36.6 vs 11.1 img/s) and 6.21x at 224 px (7.70 vs 1.24), bf16"),
                    "avx2": ("torch", f"Keras' layers trained 5.82x on PyTorch what they did on TensorFlow (21.4 vs "
                                      f"3.71 img/s, {_AVX2_64})")}),
    engine_why={"avx512_bf16": "the timm engine trained 1.22x Keras' layers on PyTorch at 64 px (42.9 vs 35.1 img/s) "
                                "and as fast at 224 px (6.16 vs 6.13; rounds 0.95-1.13x), in 0.88x the memory, bf16, "
                                "both with the fused Adam, medians of 5 interleaved rounds",
                "avx2": f"the timm engine trained 1.17x Keras' layers on PyTorch (25.0 vs 21.4 img/s, {_AVX2_64})"
                        + _AVX2_NOTE,
                "gpu": "timm's own loop trained 2.65x Keras' layers on PyTorch on an H200 (2,057 vs 776 img/s, 224 px)"},
))
register(BackboneSpec(
    "resnet50", f"{_APPS}:ResNet50", "caffe", 2048, reference_module="resnet50", timm_name="resnet50.tv_in1k",
    stages={"keras": tuple(rf"^conv{i}_" for i in range(2, 6)), "timm": tuple(rf"^layer{i}\." for i in range(1, 5))},
    stages_doc="4 residual stages (the stem with the first)",
    gradcam_layer="conv5_block3_out",
))
register(BackboneSpec(
    "efficientnetv2_b0", f"{_APPS}:EfficientNetV2B0", "none", 1280, reference_module="efficientnet_v2",
    timm_name="tf_efficientnetv2_b0.in1k", constructor_kwargs={"include_preprocessing": True},
    stages={"keras": tuple(rf"^block{i}" for i in range(1, 7)), "timm": tuple(rf"^blocks\.{i}\." for i in range(6))},
    stages_doc="6 block stages (the stem with the first, the head conv with the last)",
    gradcam_layer="top_activation", bn_momentum=0.9,
))
register(BackboneSpec(
    "mobilenetv3_large", f"{_APPS}:MobileNetV3Large", "none", 960, reference_module="mobilenet_v3",
    timm_name="tf_mobilenetv3_large_100.in1k", constructor_kwargs={"include_preprocessing": True},
    stages={"keras": (r"^expanded_conv_(?!\d)", r"^expanded_conv_[12]_", r"^expanded_conv_[345]_",
                      r"^expanded_conv_[6-9]_", r"^expanded_conv_1[01]_", r"^expanded_conv_1[234]_", r"^conv_1"),
            "timm": tuple(rf"^blocks\.{i}\." for i in range(7))},
    stages_doc="7 stages: timm's block groups (1, 2, 3, 4, 2, 3 inverted residuals, then the 1x1 conv)",
    gradcam_layer="conv_1", bn_momentum=0.999,
))
register(BackboneSpec(
    "tiny", "osteo.backbones.keras_apps:tiny_backbone", "tf", 16, timm_name="test_resnet", default_size=64,
    min_size=16, test_only=True,
    stages={"keras": (r"^tiny_block1_", r"^tiny_block2_"), "timm": (r"^layer[12]\.", r"^layer[34]\.")},
    stages_doc="2 blocks",
    gradcam_layer="tiny_block2_relu",
))


# --------------------------------------------------------------------------- docs

DEVICE_CLASSES = (*CPU_CLASSES, "gpu")


def stages_markdown() -> str:
    """The stage table of the docs (``train.fine_tune_blocks`` counts these, on both engines)."""
    rows = ["| backbone | stages | what a stage is |", "| --- | ---: | --- |"]
    rows += [f"| {s.name} | {s.n_stages} | {s.stages_doc} |" for s in _REGISTRY.values() if not s.test_only]
    return "\n".join(rows)


def decisions_markdown() -> str:
    """What ``auto`` picks for each study backbone on each device class, and the measurement
    behind it: the README's table, checked against this registry by a test."""
    rows = ["| backbone | device | backend | engine (on PyTorch) | measured |", "| --- | --- | --- | --- | --- |"]
    for name in ("vgg16", "vgg19", "densenet169", "convnext_tiny"):
        s = _REGISTRY[name]
        for device in DEVICE_CLASSES:
            layout = ""
            if device == "gpu":
                backend, why = "PyTorch (built with CUDA)", "-"
            else:
                d = s.cpu_decision(device)
                bf16 = ", bfloat16" if d.backend in d.bf16 else ""
                backend, why = f"{'PyTorch' if d.backend == 'torch' else 'TensorFlow'}{bf16}", d.why
                layout = "" if d.channels_last else f"; channels-first: {d.layout_why}"
                if not d.channels_last and d.channels_first_from:
                    layout += (f"; channels-last below {d.channels_first_from} px: {d.small_layout_why}")
            engine_why = s.engine_why.get(device, "not compared on this device")
            rows.append(f"| {name} | {device} | {backend} | timm: {engine_why}{layout} | {why} |")
    return "\n".join(rows)
