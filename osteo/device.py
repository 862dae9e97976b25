"""What runs where: the device, and the backend, engine, precision and compile choices for it.

Keras-free on purpose (Lightning's accelerator connector plays this part there): the
Keras backend must be chosen before Keras is imported, so the CLI probes the device
and plans the run first. Every choice comes with the reason it was made, and the
Trainer writes both to ``env.json``.

Device classes: ``gpu`` (an NVIDIA GPU that an installed backend was built to use),
and the two CPU classes this project meets, ``avx512_bf16`` and ``avx2``. The CPU
decisions are measurements, kept per backbone in :mod:`osteo.registry`.

    >>> from osteo.device import Device, plan
    >>> from osteo.registry import get_backbone
    >>> cpu = Device(kind="cpu", name="test", cpu_class="avx2")
    >>> plan(get_backbone("vgg16"), cpu, backend="auto", available=("tensorflow", "torch")).backend
    'torch'
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from osteo.errors import OsteoError
from osteo.registry import BackboneSpec, get_backbone, list_backbones, names_a_file

BACKENDS = ("auto", "tensorflow", "torch")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
JIT_CHOICES = ("auto", "on", "off")
IMPLS = ("auto", "keras", "timm")
# On a GPU, the first installed backend in this order that was built to use it.
GPU_BACKEND_ORDER = ("torch", "tensorflow")


@dataclass(frozen=True)
class Device:
    """The machine, as far as the choices need it."""

    kind: str  # "cpu" or "gpu"
    name: str
    cpu_class: str  # "avx512_bf16" or "avx2"
    gpu_bf16: bool = False  # compute capability 8.0 or newer
    gpu_backends: tuple[str, ...] = ()  # installed backends built to use the GPU

    def on(self, backend: str) -> str:
        """The device kind that ``backend`` will actually run on here."""
        return "gpu" if self.kind == "gpu" and backend in self.gpu_backends else "cpu"


@dataclass
class Plan:
    """The choices for one run, and why each was made."""

    backend: str
    precision: str
    jit_compile: bool  # keras impl: Keras' jit_compile; timm impl: torch.compile of the backbone
    device: Device
    why: dict[str, str] = field(default_factory=dict)
    impl: str = "keras"
    # requested choices measured far slower than auto's here: one line each, with the measurement
    warnings: list[str] = field(default_factory=list)
    channels_last: bool = True  # the timm engine's memory format (choose_layout)

    def made_for(self, engine: str) -> bool:
        """Whether this plan's choices were made for ``engine`` (a resolved ``model.impl``)."""
        return self.impl == engine

    @property
    def runs_on(self) -> str:
        return self.device.on(self.backend)

    def to_json(self) -> dict:
        return {"backend": self.backend, "impl": self.impl, "precision": self.precision,
                "jit_compile": self.jit_compile, "channels_last": self.channels_last, "runs_on": self.runs_on,
                "device": asdict(self.device),
                "why": dict(self.why), "warnings": list(self.warnings)}


# --------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineInfo:
    """Keras-free facts about one engine, read before Keras is imported."""

    name: str
    describes: str  # for people: what the backbone is
    backends: tuple[str, ...]  # the Keras backends it runs on
    export_formats: tuple[str, ...]
    # its jit_compile is torch.compile of the backbone module, not Keras' jit_compile
    compiles_backbone: bool
    # it scales its own input (timm: the module's pretrained_cfg mean and std): preprocessing "timm"
    own_preprocessing: str | None
    implementation: str  # "module:Class" of its Backbone, imported at build time
    # formats only Keras' layers write, written by porting the weights into them
    # (osteo.backbones.port) for backbones whose spec names a keras_port
    ported_formats: tuple[str, ...] = ()
    ports_to: str | None = None  # the engine whose layers receive the weights for those formats

    def preprocessing(self, spec: BackboneSpec, weights: str | None = None) -> str:
        """The input scaling this engine gives ``spec``'s backbone when the recipe says ``auto``.

        Weights are scaled as they were trained. A weights file osteo wrote (a run's checkpoint,
        an export's ``.keras``) says how (:func:`osteo.h5files.recorded_scaling`): a run started
        from a run that was itself started from a Keras file (VGG's ``caffe`` on the timm engine)
        keeps ``caffe``. A Keras weights file of Keras' layers ported into timm's module (the
        spec's ``keras_port``) is otherwise scaled as those layers were trained,
        ``spec.preprocessing``, unless the layers scale their own input (``none``: ConvNeXt's
        ImageNet mean and std, which the timm layer's own scaling is; checked when the file is
        read). A PyTorch state dict ported into Keras' layers (the keras engine; timm's module read
        it first) is scaled as that module was trained: ``torch``, the ImageNet mean and std of the
        four's timm data configs, or ConvNeXt's own Normalization, the same. Anything else: the
        engine's own scaling, or the spec's."""
        from osteo.h5files import recorded_scaling

        recorded = recorded_scaling(weights) if weights else None
        if self.own_preprocessing and spec.keras_port and keras_weights_file(weights):  # ported into timm's module
            return self.own_preprocessing if spec.preprocessing == "none" else recorded or spec.preprocessing
        if recorded and not any(e is not self and e.own_preprocessing == recorded for e in ENGINES.values()):
            return recorded
        if not self.own_preprocessing and ported_to_keras_layers(weights, spec):
            return spec.preprocessing if spec.preprocessing == "none" else "torch"  # timm's module, into Keras' layers
        return self.own_preprocessing or spec.preprocessing

    def check_preprocessing(self, mode: str) -> None:
        """A mode another engine owns (``timm``: the module's own scaling) is refused in one line."""
        for other in ENGINES.values():
            if other is not self and other.own_preprocessing == mode:
                raise OsteoError(f"model.preprocessing={mode} is the {other.name} engine's own scaling; with "
                                 f"model.impl={self.name} use auto or one of caffe, torch, tf, none")

    def check_backend(self, backend: str, what: str) -> None:
        """Refuse to build ``what`` (a run, a model) on a Keras backend this engine does not run on."""
        if backend not in self.backends:
            raise OsteoError(f"{what} uses the {self.name} engine ({self.describes}), which runs on "
                             f"{' or '.join(self.backends)}: set KERAS_BACKEND={self.backends[0]}")

    @property
    def required_backend(self) -> str | None:
        """The one Keras backend this engine runs on, or None if it runs on several."""
        return self.backends[0] if len(self.backends) == 1 else None

    def jit(self, jit_compile: bool) -> tuple[bool, bool]:
        """(compile the backbone module, Keras' jit_compile) for the plan's ``jit_compile``."""
        return (jit_compile, False) if self.compiles_backbone else (False, jit_compile)

    def check_export(self, fmt: str, what: str, spec: BackboneSpec | None = None) -> None:
        """Refuse a format this engine cannot write for ``spec``'s backbone, naming those it can."""
        if fmt in self.export_formats or (fmt in self.ported_formats and spec is not None and spec.keras_port):
            return
        ported = ""
        if fmt in self.ported_formats:
            names = [n for n in list_backbones() if get_backbone(n).keras_port]
            ported = f" (and {fmt} for {', '.join(names)}, whose weights port to Keras' layers)"
        raise OsteoError(f"{what} was trained on the {self.name} engine ({self.describes}), which exports "
                         f"{', '.join(self.export_formats)}{ported}, not {fmt}; use --format "
                         f"{self.export_formats[0]}")

    def writes(self, fmt: str) -> bool:
        """This engine's own model writes ``fmt`` (False: the format is written by a port)."""
        return fmt in self.export_formats

    def load(self) -> type:
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)


ENGINES: dict[str, EngineInfo] = {
    "keras": EngineInfo("keras", "keras.applications layers", ("tensorflow", "torch"), ("onnx", "savedmodel", "keras"),
                        compiles_backbone=False, own_preprocessing=None,
                        implementation="osteo.backbones.keras_apps:KerasAppsBackbone"),
    "timm": EngineInfo("timm", "timm's PyTorch module inside the Keras model", ("torch",), ("onnx", "keras"),
                       compiles_backbone=True, own_preprocessing="timm",
                       implementation="osteo.backbones.timm_torch:TimmBackbone", ported_formats=("savedmodel",),
                       ports_to="keras"),
}


def get_engine(name: str) -> EngineInfo:
    """The engine called ``name`` (a resolved recipe's ``model.impl``)."""
    try:
        return ENGINES[name]
    except KeyError:
        raise OsteoError(f"unknown engine {name!r} (model.impl of a resolved recipe); choose one of: "
                         f"{', '.join(ENGINES)}") from None


# --------------------------------------------------------------------------- probing


def cpu_class(flags: str | None = None) -> str:
    """``avx512_bf16`` where the CPU has bfloat16 instructions, else ``avx2``."""
    if flags is None:
        try:
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            flags = ""
    return "avx512_bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "avx2"


def _nvidia_gpus() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of each NVIDIA GPU, from nvidia-smi; [] without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, cap = line.rpartition(",")
        m = re.match(r"\s*(\d+)\.(\d+)", cap)
        if name.strip() and m:
            gpus.append((name.strip(), (int(m.group(1)), int(m.group(2)))))
    return gpus


def _package_file(package: str, relative: str) -> str:
    """A file of an installed package, read without importing the package ("" if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.submodule_search_locations:
        return ""
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    return ""


def installed_backends() -> tuple[str, ...]:
    return tuple(b for b in BACKENDS[1:] if importlib.util.find_spec(b) is not None)


def gpu_builds() -> tuple[str, ...]:
    """Installed backends built with CUDA (read from their version files, not imported)."""
    out = []
    if re.search(r"^cuda\b.*=\s*['\"]\d", _package_file("torch", "version.py"), re.M):
        out.append("torch")
    if re.search(r"['\"]is_cuda_build['\"]\s*:\s*True", _package_file("tensorflow", "python/platform/build_info.py")):
        out.append("tensorflow")
    return tuple(out)


def probe() -> Device:
    """This machine: its GPU (if an NVIDIA one is visible), and its CPU class."""
    gpus = _nvidia_gpus()
    cpu = cpu_class()
    if gpus:
        name, cap = gpus[0]
        return Device(kind="gpu", name=name, cpu_class=cpu, gpu_bf16=cap >= (8, 0), gpu_backends=gpu_builds())
    return Device(kind="cpu", name=platform.processor() or platform.machine(), cpu_class=cpu)


# --------------------------------------------------------------------------- choices


def choose_backend(requested: str, spec: BackboneSpec, device: Device,
                   available: tuple[str, ...] | None = None, keras_layers: str = "",
                   timm_module: str = "") -> tuple[str, str]:
    """(backend, why). ``auto``: a backend that sees the GPU, else the measured-faster one on this
    CPU: for the engine ``auto`` picks there, or, where ``keras_layers`` says why the run will
    have Keras' layers (a Keras weights file, model.impl=keras), for those where measured; where
    ``timm_module`` says why it needs timm's module (a PyTorch state dict), PyTorch."""
    if requested not in BACKENDS:
        raise OsteoError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "requested"
    available = installed_backends() if available is None else available
    if not available:
        raise OsteoError("neither TensorFlow nor PyTorch is installed; run `make install`")
    if timm_module and spec.timm_name and "torch" in available:  # the GPU's backend or not: only PyTorch reads it
        where = "its GPU" if device.kind == "gpu" and "torch" in device.gpu_backends else "the CPU"
        return "torch", f"torch, on {where}: {timm_module}, which only timm's module reads (the timm engine)"
    if device.kind == "gpu":
        for b in GPU_BACKEND_ORDER:
            if b in available and b in device.gpu_backends:
                return b, f"GPU {device.name}: {b} is installed with CUDA support"
        note = (f"GPU {device.name} found, but no installed backend was built for it "
                "(install torch with CUDA, or tensorflow[and-cuda]); ")
    else:
        note = ""
    d = spec.cpu_decision(device.cpu_class)
    best = d.backend
    why = f"{best} for {spec.name} on {device.cpu_class} CPUs: {d.why or 'the default (not measured)'}"
    if keras_layers and d.keras_backend:
        best = d.keras_backend
        why = f"{best} for {spec.name}'s Keras layers ({keras_layers}) on {device.cpu_class} CPUs: {d.keras_why}"
    if best not in available:
        fallback = next(b for b in ("tensorflow", "torch") if b in available)
        return fallback, f"{note}{best} is not installed ({why}); using {fallback}"
    return best, note + why


KERAS_WEIGHT_FILES = (".h5", ".keras")


TORCH_WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")


def torch_weights_file(weights: str | None) -> bool:
    """Whether ``weights`` names a PyTorch state dict (a timm or torchvision file, or a timm run's
    checkpoint), which timm's module reads (the timm engine; for the spec's ``keras_port``, the
    keras engine through it): a Keras file (by its name, or HDF5 by its bytes) by what it holds;
    any other by its name (``.safetensors``, ``.pth`` ...: a damaged one is then the PyTorch
    reader's to refuse) or by its first bytes (torch.save's format as ``model_best.pth.tar``)."""
    from osteo.h5files import HDF5_SIGNATURE, first_bytes, holds_torch_state, pytorch_file

    if not names_a_file(weights):
        return False
    name = str(weights).lower()
    if name.endswith(KERAS_WEIGHT_FILES) or first_bytes(weights) == HDF5_SIGNATURE:  # HDF5 under any name: Keras'
        return holds_torch_state(weights)
    return name.endswith(TORCH_WEIGHT_FILES) or pytorch_file(weights)


def keras_weights_file(weights: str | None) -> bool:
    """Whether ``weights`` names a Keras weights file of Keras' layers (which the timm engine loads
    too where the spec names a ``keras_port``: :func:`keras_layers_only`); one that holds a PyTorch
    module's state dict (a timm run's checkpoint) is the timm engine's."""
    from osteo.h5files import holds_torch_state

    return str(weights or "").lower().endswith(KERAS_WEIGHT_FILES) and not holds_torch_state(weights)


def keras_layers_only(weights: str | None, spec: BackboneSpec) -> bool:
    """Whether ``weights`` is a Keras weights file that only Keras' layers load: ``spec``'s timm
    module is another architecture (no ``keras_port``), or timm has none."""
    return keras_weights_file(weights) and not (spec.keras_port and spec.timm_name)


def ported_to_keras_layers(weights: str | None, spec: BackboneSpec) -> bool:
    """Whether ``weights`` is a PyTorch state dict that Keras' layers of ``spec`` read through timm's
    module (the spec's ``keras_port``: :func:`osteo.backbones.port.port_into_keras_layers`)."""
    return bool(spec.keras_port and spec.timm_name) and torch_weights_file(weights)


def choose_impl(requested: str, spec: BackboneSpec, backend: str, weights: str | None = None,
                device_class: str | None = None) -> tuple[str, str]:
    """(engine, why): ``keras`` (``keras.applications`` layers) or ``timm`` (timm's module).

    ``auto``: timm's module on PyTorch wherever timm has the architecture (the measured
    ratio for ``spec`` on ``device_class``, "gpu" or a CPU class, is the reason given), also
    from a Keras weights file (``.h5``) where its weights port into the module (the spec's
    ``keras_port``: the study's four); Keras' layers on TensorFlow, and for a Keras weights file
    of any other backbone, which only they can load.
    """
    if requested not in IMPLS:
        raise OsteoError(f"unknown model.impl {requested!r}; choose one of: {', '.join(IMPLS)}")
    has_timm = importlib.util.find_spec("timm") is not None
    if requested == "timm":
        if keras_layers_only(weights, spec):  # named first: --backend torch would not make timm's module read it
            raise OsteoError(f"weights file {weights} is a Keras weights file of Keras' layers, which timm's {spec.name} "
                             "cannot read (another architecture's layout): use model.impl=keras, or auto")
        if backend != "torch":
            raise OsteoError("model.impl=timm runs timm's PyTorch module: use --backend torch (a run trained on "
                             "the timm engine also resumes there), or, for a new run, model.impl=keras on TensorFlow")
        if not spec.timm_name:
            raise OsteoError(f"{spec.name} has no timm implementation; use model.impl=keras")
        if not has_timm:
            raise OsteoError("model.impl=timm needs timm and torchvision; run `make install`")
        return "timm", "requested"
    ported = ("; the PyTorch state dict is read by timm's module and ported into Keras' layers (osteo.backbones.port)"
              if ported_to_keras_layers(weights, spec) else "")
    if requested == "keras":
        return "keras", f"requested{ported}"
    if keras_layers_only(weights, spec):
        return "keras", "the weights file is Keras' (keras.applications layers)"
    if backend != "torch":
        return "keras", f"keras.applications layers on {backend}{ported}"
    if not spec.timm_name:
        return "keras", f"timm has no {spec.name}"
    if not has_timm:
        return "keras", "timm is not installed"
    measured = spec.engine_why.get(device_class or "", "")
    why = measured or f"timm has {spec.name}; the engines were not compared on this device"
    if keras_weights_file(weights):
        why += "; the Keras weights file is ported into timm's module (osteo.backbones.port)"
    return "timm", why


def choose_precision(requested: str, spec: BackboneSpec, device: Device, backend: str) -> tuple[str, str]:
    """(policy, why). ``auto``: mixed precision where it pays, never where it hurts.

    GPU: bfloat16 where the card has it (compute capability 8.0+), else float16. CPU:
    bfloat16 only where the CPU has bfloat16 instructions *and* this backbone was
    measured faster with it on this backend; float16 on CPU made every model slower.
    """
    if requested not in PRECISIONS:
        raise OsteoError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, "requested"
    if device.on(backend) == "gpu":
        if device.gpu_bf16:
            return "mixed_bfloat16", "GPU with bfloat16 (compute capability 8.0+)"
        return "mixed_float16", "GPU without bfloat16"
    if device.cpu_class != "avx512_bf16":
        return "float32", "CPU without bfloat16 instructions"
    if backend in spec.cpu_decision(device.cpu_class).bf16:
        return "mixed_bfloat16", f"bfloat16 measured faster for {spec.name} on {backend} here"
    return "float32", f"bfloat16 not measured faster for {spec.name} on {backend} here"


def choose_jit(requested: str, spec: BackboneSpec, device: Device, backend: str, impl: str = "keras",
               planned_images: int = 0) -> tuple[bool, str]:
    """(on, why). ``auto``: XLA on TensorFlow GPUs, and on CPUs only where it was measured faster;
    on the timm engine, ``torch.compile`` of the backbone where the run is long enough to
    pay for the compile (``BackboneSpec.compile_pays_after``). The trainer turns XLA off again
    where the built model holds a layer XLA cannot compile (``Trainer._xla_or_not``: the
    default augmentation's zoom and shear)."""
    requested = str(requested).lower()
    if requested not in JIT_CHOICES:
        raise OsteoError(f"unknown jit_compile {requested!r}; choose one of: {', '.join(JIT_CHOICES)}")
    if requested != "auto":
        return requested == "on", "requested"
    if impl == "timm":
        after = spec.compile_pays_after.get(device.on(backend) if device.on(backend) == "gpu" else device.cpu_class)
        if not after:
            return False, f"torch.compile not measured faster for {spec.name} here"
        if planned_images < after:
            return False, f"{planned_images} training images < {after}: torch.compile would not pay for itself"
        return True, f"{planned_images} training images >= {after}: torch.compile pays for itself"
    if backend != "tensorflow":
        return False, f"no compilation by default on {backend}"
    if device.on(backend) == "gpu":
        return True, "XLA on a TensorFlow GPU"
    if spec.cpu_decision(device.cpu_class).xla:
        return True, f"XLA measured faster for {spec.name} on {device.cpu_class} CPUs"
    return False, f"XLA not measured faster for {spec.name} on {device.cpu_class} CPUs"


def choose_layout(spec: BackboneSpec, device: Device, backend: str, impl: str,
                  image_size: int | None = None) -> tuple[bool, str]:
    """(channels_last, why): the timm engine's memory format. Channels-last, PyTorch's fast
    layout for convolutions on GPUs and on AVX-512 CPUs, unless channels-first was measured
    faster for ``spec`` on this CPU class (``CpuDecision.channels_last``) at ``image_size``
    (``CpuDecision.channels_first_from``: below it channels-last; None or 0, a size not known:
    the class's decision). Keras' layers take NHWC tensors whatever this says."""
    if impl != "timm":
        return True, "Keras' layers: NHWC tensors"
    if device.on(backend) == "gpu":
        return True, "channels-last on a GPU"
    d = spec.cpu_decision(device.cpu_class)
    if not d.channels_last and image_size and image_size < d.channels_first_from:
        return True, (f"channels-last for {spec.name} at {image_size} px on {device.cpu_class} CPUs "
                      f"(channels-first from {d.channels_first_from} px): {d.small_layout_why}")
    if not d.channels_last:
        return False, f"channels-first for {spec.name} on {device.cpu_class} CPUs: {d.layout_why}"
    return True, f"channels-last: channels-first not measured faster for {spec.name} on {device.cpu_class} CPUs"


def resumed_layout(plan: Plan, before: dict) -> Plan:
    """``plan`` with the memory format a resumed run started in (``before``: its ``env.json``'s
    ``device``), where it ran the same engine on the same kind of device: the decision may have
    changed since (:func:`choose_layout`), and one run's epochs keep one layout, as its ``env.json``
    keeps one record of it. A copy where that changes the plan (a cross-validation hands its folds
    one plan), else ``plan`` itself."""
    was = before.get("channels_last")
    same = (before.get("impl") == plan.impl and before.get("runs_on") == plan.runs_on
            and (before.get("device") or {}).get("cpu_class") == plan.device.cpu_class)
    if not same or not isinstance(was, bool) or was == plan.channels_last:
        return plan
    layout = "channels-last" if was else "channels-first"
    why = {**plan.why, "layout": f"{layout}, the run's own: a run resumes in the memory format it started in "
                                 f"(a new one would take {plan.why.get('layout', 'another')})"}
    return replace(plan, channels_last=was, why=why)


def plan(spec: BackboneSpec, device: Device, *, backend: str = "auto", precision: str = "auto",
         jit_compile: str = "auto", planned_images: int = 0, available: tuple[str, ...] | None = None,
         impl: str = "auto", weights: str | None = None, image_size: int | None = None) -> Plan:
    """Every device choice of one run, each with its reason (``image_size``: the run's, for the
    timm engine's memory format; None where not known)."""
    keras_file = impl == "auto" and keras_layers_only(weights, spec)  # Keras' layers, by the file
    keras_layers = "model.impl=keras" if impl == "keras" else "the weights file is Keras'" if keras_file else ""
    timm_module = ("the weights file is a PyTorch state dict" if impl in ("auto", "timm") and not keras_file
                   and torch_weights_file(weights) else "")
    b, why_b = choose_backend(backend, spec, device, available, keras_layers, timm_module)
    where = "gpu" if device.on(b) == "gpu" else device.cpu_class
    i, why_i = choose_impl(impl, spec, b, weights, where)
    p, why_p = choose_precision(precision, spec, device, b)
    j, why_j = choose_jit(jit_compile, spec, device, b, i, planned_images)
    layout, why_l = choose_layout(spec, device, b, i, image_size)
    out = Plan(b, p, j, device, {"backend": why_b, "impl": why_i, "precision": why_p, "jit_compile": why_j,
                                 "layout": why_l}, i, channels_last=layout)
    slow = [s for s in spec.slow_paths if s.matches(where, b, i, p)]
    if slow and (backend, impl, precision) != ("auto", "auto", "auto"):
        fast = plan(spec, device, planned_images=planned_images, available=available, weights=weights,
                    image_size=image_size)
        if (fast.backend, fast.impl, fast.precision) != (b, i, p):
            out.warnings = [f"{s.measured} on {where}; the faster choice here is backend={fast.backend}, "
                            f"model.impl={fast.impl}, train.precision={fast.precision} (leave them auto)"
                            for s in slow]
    if slow and not out.warnings and keras_file and spec.timm_name:
        out.warnings = [f"{s.measured} on {where}; a Keras weights file can only be trained with Keras' layers: "
                        f"timm's weights of {spec.name} (.safetensors or .pth) would train on the timm engine"
                        for s in slow]
    return out


def peak_memory_mb() -> dict[str, float | None]:
    """This process's peak resident memory, and the peak GPU memory its backend allocated (MiB)."""
    import resource
    import sys

    out: dict[str, float | None] = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_gpu_mb": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    tf = sys.modules.get("tensorflow")
    if out["peak_gpu_mb"] is None and tf is not None and tf.config.list_logical_devices("GPU"):
        out["peak_gpu_mb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
    return out


# glibc's mallopt(3) parameters and what a training process sets them to: blocks up to
# 1 GiB come from the heap, not from mmap, and freed memory stays with the process (up to
# 2 GiB free at the heap's top) instead of going back to the kernel after every step.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = {"mmap_threshold": 1 << 30, "trim_threshold": (1 << 31) - 1}
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
KEPT = "freed memory kept"  # how keep_freed_memory's report begins when it set malloc


def _libc():
    """The process's own symbols, glibc's among them (ctypes.util.find_library runs ldconfig)."""
    import ctypes

    return ctypes.CDLL(None)


def keep_freed_memory(environ: dict | None = None) -> str:
    """Make glibc's malloc keep the memory a training step frees, for the next step; return
    what was done, for ``env.json``. ``osteo train`` sets it before its audit and hands what
    the audit left free back once it is done (:func:`release_freed_memory`).

    By default glibc hands blocks over 32 MiB (the activations of a step) back to the kernel
    when they are freed, and trims the heap; the next step then faults every page in again,
    zeroed by the kernel. On the 2-core VM the CPU decisions were measured on, that was
    30,000-50,000 page faults and 50-260 ms of kernel time a step for ConvNeXtTiny at 64 px
    (batch 16), the timm engine at 76-83 img/s against 100-106 with the memory kept, at the
    same peak resident memory (``benchmarks/README.md``). Left alone where the allocator is
    not glibc's, or where the user set malloc's environment variables or preloaded another
    allocator (jemalloc, tcmalloc): their choice stands.
    """
    env = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left as it was: not glibc's malloc"
    chosen = [k for k in _MALLOC_ENV if k in env]
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if any(a in env.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        chosen.append("LD_PRELOAD")
    if chosen:
        return f"left as it was: {', '.join(chosen)} set"
    try:
        libc = _libc()
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED["mmap_threshold"])
              and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED["trim_threshold"]))
    except (OSError, AttributeError) as e:
        return f"left as it was: mallopt unavailable ({e})"
    if not ok:
        return "left as it was: mallopt refused the settings"
    return (f"{KEPT}: glibc mallopt "
            + ", ".join(f"{k} {v / 2**30:.0f} GiB" for k, v in KEEP_FREED.items())
            + " (no page faults between steps)")


def release_freed_memory(kept: str) -> bool:
    """Hand what malloc holds free back to the kernel, once (glibc's ``malloc_trim``), when
    :func:`keep_freed_memory` kept it (``kept``: its report); True when glibc was asked to.

    ``osteo train`` keeps freed memory from before the audit: the audit's threads allocate
    and free about 1 MB of buffers an image (decode, resize, the cache entry), which glibc's
    defaults hand back to the kernel and fault in again, about 240 page faults an image.
    Kept, the audit with its cache fill ran faster (``benchmarks/audit_memory.py``,
    ``benchmarks/README.md``). Called once the audit is done, so the training that follows
    does not hold what the audit left free (1,000 PNGs: 192 MB resident after the audit,
    90-92 after the release).
    """
    if not kept.startswith(KEPT):
        return False
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


# How long PyTorch's OpenMP threads (libgomp) spin for work before they sleep: 3,000 polls
# instead of libgomp's default 300,000. See short_spin_waits.
SPIN_COUNT = 3000
_OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def short_spin_waits(environ: dict | None = None, loaded: bool | None = None) -> str:
    """Make PyTorch's OpenMP threads spin briefly (``GOMP_SPINCOUNT``) before they sleep,
    instead of libgomp's 100x longer default; return what was done, for ``env.json``.
    Must run before torch is imported: libgomp reads its environment once, when it loads
    (``loaded``: whether torch is imported already; default: ``sys.modules`` says).

    On a CPU shared with another training (a second ``osteo train``, a benchmark beside a
    run), the default spin of every thread at every barrier takes the cores the other
    process's threads wait for, and each waits in turn for its own threads to be scheduled.
    On the 2-core VM, timm's ConvNeXtTiny loop at 64 px beside a second training ran at
    4.2-10.7 img/s with the default against 16.6-17.9 with 3,000 polls (6 runs each); alone,
    at 86.2 and 87.3 img/s, medians of 5 (``benchmarks/spin_waits.py``, its README section).
    Measured on the CPU only; on a GPU it applies to the host's threads alike. Left alone
    where the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: their choice stands.
    """
    env = os.environ if environ is None else environ
    chosen = [k for k in _OPENMP_ENV if k in env]
    if chosen:
        return f"left as it was: {', '.join(chosen)} set"
    if ("torch" in sys.modules) if loaded is None else loaded:
        return "left as it was: torch (and its OpenMP) was loaded before the choice"
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return (f"short spin waits: GOMP_SPINCOUNT={SPIN_COUNT} (OpenMP threads sleep soon when idle, "
            "so a second process on the same cores is not starved)")


def planned_images(recipe) -> int:
    """Training images the run will see (files x train fraction x epochs), counted cheaply."""
    from osteo.data.scan import IMAGE_EXTENSIONS

    d = recipe.data
    if os.path.isdir(d.dir):
        names = [f for _, _, files in os.walk(d.dir) for f in files if not f.startswith(".")]
        n = sum(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in names)
        n = n or len(names)  # DICOM files named without an extension (IM0001, a UID): every file
    else:
        n = d.phantom_n
    return int(n * (1 - d.val - d.test) * (recipe.train.epochs + recipe.train.fine_tune_epochs))


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; with ``deterministic``, its deterministic ops too.

    Otherwise, on PyTorch, cuDNN picks its fastest convolution algorithms for the run's fixed
    input shapes (timm's training script does the same); that choice is not deterministic.
    """
    import sys

    import keras

    backend = keras.backend.backend()
    if backend == "torch" and "tensorflow" not in sys.modules:
        # Keras also seeds TensorFlow when it can import it, which would load TensorFlow's runtime
        # (~730 MB) into a PyTorch run that has no use for it (osteo.data.feed): not here
        from keras.src.utils import module_utils

        tf = module_utils.tensorflow
        was, tf._available = tf._available, False
        try:
            keras.utils.set_random_seed(seed)
        finally:
            tf._available = was
    else:
        keras.utils.set_random_seed(seed)
    if backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = not deterministic
    if not deterministic:
        return
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
