"""Speed decisions per backbone and CPU class: backend, bfloat16 and XLA, from measurements.

Keras-free on purpose: the backend must be chosen before Keras is imported, so the
CLI reads this table first. The numbers behind it are in ``benchmarks/README.md``
(``python benchmarks/models.py``); the ones that decided each entry are quoted here.

Two CPU classes were measured, and they disagree, so the table is keyed by class:

``avx512_bf16`` (2-core Intel with AVX-512 BF16), training images/sec, batch 32, 64 px,
from scratch, TensorFlow / PyTorch, float32:

    convnext_tiny   16.7 / 48.6 (torch bf16 81.8); first step 15 s / 1.0 s
    vgg16           51.9 / 41.5; bfloat16 on TF 25.1 -> 45.9 at 96 px
    densenet169     85.7 / 51.3; first step 43 s / 1.7 s

``avx2`` (2-core AMD EPYC, AVX2, no AVX-512), batch 32, 32 px (48 px for ConvNeXt):

    vgg16           15.0 / 25.8; first step 8.5 s / 1.6 s
    densenet169     44.5 / 27.3; first step 153 s / 3.2 s
    convnext_tiny   PyTorch 23 at 48 px (TensorFlow was 3x slower on the other class)

DenseNet169 on the AVX-512 class is faster per step on TensorFlow, but its first step
costs 41 s more, so runs shorter than ~5,000 training images (41 s / (1/51.3 - 1/85.7 s
per image)) finish sooner on PyTorch; on the AVX2 class the break-even is ~10,600 images
(150 s / (1/27.3 - 1/44.5)).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

BACKENDS = ("auto", "tensorflow", "torch")


@dataclass(frozen=True)
class CpuDecision:
    backend: str = "tensorflow"  # the faster backend for long runs
    short_run_backend: str | None = None  # faster below ``short_run_images``
    short_run_images: int = 0
    bf16: tuple[str, ...] = ()  # backends on which mixed_bfloat16 was measured faster
    xla: bool = False  # jit_compile measured faster on TensorFlow CPU


CPU: dict[str, dict[str, CpuDecision]] = {
    "avx512_bf16": {
        "vgg16": CpuDecision(bf16=("tensorflow",)),
        "vgg19": CpuDecision(bf16=("tensorflow",)),
        "densenet169": CpuDecision(short_run_backend="torch", short_run_images=5000),
        "convnext_tiny": CpuDecision(backend="torch", bf16=("torch",), xla=True),
    },
    "avx2": {
        "vgg16": CpuDecision(backend="torch"),
        "vgg19": CpuDecision(backend="torch"),
        "densenet169": CpuDecision(short_run_backend="torch", short_run_images=10_000),
        "convnext_tiny": CpuDecision(backend="torch"),
    },
}


def cpu_class(flags: str | None = None) -> str:
    """``avx512_bf16`` where the CPU has bfloat16 instructions, else ``avx2``."""
    if flags is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = f.read()
        except OSError:
            flags = ""
    return "avx512_bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "avx2"


def decision(backbone: str, cpu: str | None = None) -> CpuDecision:
    return CPU[cpu or cpu_class()].get(backbone, CpuDecision())


def available(backend: str) -> bool:
    module = {"tensorflow": "tensorflow", "torch": "torch"}[backend]
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str, backbone: str, planned_images: int = 0, cpu: str | None = None) -> str:
    """``auto``: the measured-faster backend for this backbone, CPU class and run length, if installed."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    d = decision(backbone, cpu)
    best = d.backend
    if d.short_run_backend and planned_images and planned_images < d.short_run_images:
        best = d.short_run_backend
    if available(best):
        return best
    return "tensorflow" if available("tensorflow") else "torch"
