"""Speed decisions per backbone: backend, bfloat16 and XLA on CPU, from measurements.

Keras-free on purpose: the backend must be chosen before Keras is imported, so the
CLI reads this table first. The numbers behind it are in ``benchmarks/README.md``;
the ones that decided each entry are quoted here.

Measured on a 2-core AVX-512-BF16 CPU, training images/sec (batch 32, from scratch):

==============  =======================  =======================  ===================
backbone        64 px TF / torch (fp32)  time to first step TF/torch  bfloat16 pays on
==============  =======================  =======================  ===================
convnext_tiny   16.7 / 48.6 (torch bf16 81.8)   15 s / 1.0 s        torch (TF: 8.0 -> 7.7 at 96 px)
vgg16           51.9 / 41.5               1.9 s / 1.4 s           TF (25.1 -> 45.9 at 96 px)
densenet169     85.7 / 51.3               43 s / 1.7 s            neither (43.9 -> 42.0 at 96 px)
==============  =======================  =======================  ===================

DenseNet169 is faster per step on TensorFlow, but its first step costs 41 s more, so
runs shorter than ~5,000 training images (41 s / (1/51.3 - 1/85.7 s per image)) finish
sooner on PyTorch.
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


CPU: dict[str, CpuDecision] = {
    "vgg16": CpuDecision(bf16=("tensorflow",)),
    "vgg19": CpuDecision(bf16=("tensorflow",)),
    "densenet169": CpuDecision(short_run_backend="torch", short_run_images=5000),
    "convnext_tiny": CpuDecision(backend="torch", bf16=("torch",), xla=True),
}


def decision(backbone: str) -> CpuDecision:
    return CPU.get(backbone, CpuDecision())


def available(backend: str) -> bool:
    module = {"tensorflow": "tensorflow", "torch": "torch"}[backend]
    return importlib.util.find_spec(module) is not None


def choose_backend(requested: str, backbone: str, planned_images: int = 0) -> str:
    """``auto``: the measured-faster backend for this backbone and run length, if installed."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    d = decision(backbone)
    best = d.backend
    if d.short_run_backend and planned_images and planned_images < d.short_run_images:
        best = d.short_run_backend
    if available(best):
        return best
    return "tensorflow" if available("tensorflow") else "torch"
