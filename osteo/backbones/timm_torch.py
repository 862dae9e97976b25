"""The ``timm`` engine: timm's PyTorch module inside the Keras model (PyTorch backend only).

On the PyTorch backend the study's backbones run as timm modules: the same
architectures, measured faster than ``keras.applications`` layers there (the ratios per
backbone and device are in :mod:`osteo.registry` and ``benchmarks/README.md``). Keras
keeps everything around the backbone (gray to RGB, augmentation, pooling, head, loss,
the loop); :class:`TimmLayer` is a ``keras.layers.TorchModuleWrapper`` that

* takes NHWC images (Keras' layout) and hands them to the module as NCHW *views* of the
  same memory, i.e. in PyTorch's channels-last memory format, without a copy, and gives
  the feature map back as NHWC the same way;
* scales its input itself from the module's ``pretrained_cfg`` (its mean and std on
  [0, 1] pixels) when the recipe's preprocessing is ``timm``;
* runs the module under ``torch.autocast`` when the Keras dtype policy is mixed
  (bfloat16 or float16), so the module's float32 weights are cast once per step;
* optionally compiles the module with ``torch.compile``; a compile that fails falls
  back to the eager module with one warning.

Weights: ``imagenet`` (timm's pretrained weights, from the Hugging Face hub or its
cache), ``none``, or a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict, loaded
without unpickling (``weights_only=True``), or the one a timm run's Keras checkpoint holds,
checked key by key against the module; for the backbones whose Keras layers are the same
architecture (the spec's ``keras_port``), also a Keras weights file of those layers, read as
the keras engine reads it and ported into the module (:func:`osteo.backbones.port.timm_state`).

The module keeps only what ``forward_features`` uses: parts of timm's head that would
hold unused parameters (VGG's 120M-parameter ``pre_logits``, ConvNeXt's head norm) are
replaced by identities at build time, so they are neither trained, saved, nor held in
memory.

Serialization: ``TorchModuleWrapper.get_config`` pickles the whole module, which only
``safe_mode=False`` loads. :class:`TimmLayer`'s config is instead what rebuilds the module
(timm's model name, the input size, the scaling and memory format, never weights or code),
and the weights travel as the state dict ``TorchModuleWrapper.save_own_variables`` stores
(BatchNorm's running statistics included). So a ``.keras`` file of a timm run (``osteo
export --format keras``) loads with ``safe_mode=True`` on the PyTorch backend, with osteo
and timm installed. osteo's own runs are still rebuilt from ``recipe.json`` and their
weights file (:func:`osteo.predict.load_best`).

:class:`TimmBackbone` is the engine (:class:`osteo.backbones.base.Backbone`): stages are
groups of the module's parameters by the spec's ``stages["timm"]`` patterns.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

import keras

from osteo.backbones.base import (
    DOWNLOAD_TIMEOUT,
    OFFLINE_FIX,
    Backbone,
    create,
    download_timeout,
    group_by_stage,
    looks_like_network_error,
)
from osteo.device import ENGINES, keras_weights_file
from osteo.errors import OsteoError
from osteo.errors import short as _short
from osteo.files import unreachable
from osteo.registry import IMAGENET_MEAN_TORCH, IMAGENET_STD_TORCH, get_backbone, parse_weights

# Keras dtype policy -> the autocast dtype inside the module
_AUTOCAST = {"bfloat16": "bfloat16", "float16": "float16"}


def create_module(timm_name: str, *, pretrained: bool = False, **kwargs):
    """timm's module without its classifier and pooling: ``forward_features`` gives (B, C, H, W).

    A residual block's last BatchNorm starts at scale 1, as Keras' do, not at timm's 0
    (``zero_init_last``, where a model has it): frozen for fine-tuning (``model.freeze_bn``) on
    weights that do not set it (``none``), a 0 stayed 0, and its block never learned (48 of
    ResNet50's 53 convolutions)."""
    import timm

    def made(**more):
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=0, global_pool="", **kwargs, **more)

    try:
        return made(zero_init_last=False)
    except TypeError as e:  # VGG, DenseNet, ConvNeXt ...: no such option (their norms start at 1)
        if "zero_init_last" not in str(e):
            raise
    return made()


def data_config(module) -> dict:
    """timm's own input configuration for ``module`` (mean, std, interpolation, size)."""
    import timm.data

    return timm.data.resolve_data_config({}, model=module)


def _load_pretrained(name: str, timm_name: str):
    """timm's pretrained module: from the Hugging Face cache when it is there, else downloaded.

    Offline, the hub client retries each file for ~25 s; a 10 s connection check first
    makes that one fast, clear error.
    """
    import timm.models
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    for filename in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
        cached = try_to_load_from_cache(hub_id, filename)
        if isinstance(cached, str):
            return create_module(timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached})
    fail = OFFLINE_FIX
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub_id else (getattr(cfg, "url", "") or "")
    host = urllib.parse.urlparse(url).hostname
    why = unreachable(host, 443, timeout=DOWNLOAD_TIMEOUT)
    if why:
        raise OsteoError(f"cannot download ImageNet weights for {name} from {host} (no network?): {why}; {fail}")
    with download_timeout():
        try:
            return create_module(timm_name, pretrained=True)
        except Exception as e:  # huggingface_hub, urllib and socket errors all differ
            if not looks_like_network_error(e):
                raise
            raise OsteoError(f"cannot download ImageNet weights for {name} (no network?): {_short(e)}; {fail}") from None


def read_state_dict(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[], dict]]:
    """(each tensor's declared shape, a function that reads the tensors) of a ``.safetensors``
    file or a PyTorch file, never unpickling code.

    The shapes come without reading any tensor's data (the safetensors header; PyTorch's
    zip format memory-mapped), so a file can be refused before it costs memory or time.
    """
    import torch

    from osteo.h5files import HDF5_SIGNATURE, first_bytes, keras_archive

    archive = keras_archive(path)  # a timm run's model.keras (osteo export --format keras)
    if archive is not None:
        archive.close()
        return _state_in_keras_file(path)
    if first_bytes(path) == HDF5_SIGNATURE:
        return _state_in_keras_file(path)
    if path.suffix.lower() == ".safetensors":  # by its name, as osteo.device.torch_weights_file tells it
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return shapes, lambda: load_file(str(path))
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or the pre-1.6 pickle
        raise ValueError("it is not a PyTorch file (torch.save's format) nor .safetensors")
    import pickle

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # the pre-1.6 format
    except pickle.UnpicklingError:  # weights_only refused it: objects besides tensors, never unpickled here
        raise ValueError("it holds Python objects besides tensors, which osteo does not unpickle; save the "
                         "module's state_dict() instead") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # training checkpoints wrap it
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}, lambda: state


# the most of a .keras archive's weights the timm engine extracts to read a state dict from (ConvNeXt-Base's
# model with Adam's moments is about 1 GiB)
ARCHIVE_LIMIT = 8 * 2**30


def _state_in_keras_file(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[], dict]]:
    """:func:`read_state_dict` of a Keras weights file that holds a PyTorch module's state dict (a
    timm run's checkpoint, ``best.weights.h5``, where Keras' ``TorchModuleWrapper`` stored it), or of
    a ``.keras`` archive holding such a file (a timm run's ``osteo export --format keras``); its
    other tensors (the run's head) are not read."""
    import h5py
    import numpy as np
    import torch

    from osteo.h5files import torch_state_group, weights_of

    with weights_of(path, ARCHIVE_LIMIT, ValueError) as inner, h5py.File(inner, "r") as f:
        group = torch_state_group(f, ValueError)
        if group is None:
            raise ValueError("it is a Keras weights file of Keras' layers, which model.impl=keras reads")
        stored = {k: v for k, v in f[group].items() if isinstance(v, h5py.Dataset)}
        odd = sorted(k for k, v in stored.items() if v.dtype.kind not in "fiub")
        if odd:
            raise ValueError(f"its tensor {odd[0]} is of type {stored[odd[0]].dtype}, not numbers")
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in stored.items()}
        declared = sum(v.size * v.dtype.itemsize for v in stored.values())
        size = os.path.getsize(inner)
        if declared > 2 * size + 2**20:  # Keras writes its tensors uncompressed
            raise ValueError(f"it declares {declared / 2**30:.1f} GiB of tensors in a file of "
                             f"{size / 2**20:.0f} MiB: compressed data, not a checkpoint Keras wrote")
        # an archive's tensors are read from this extraction, not from a second one
        extracted = ({k: torch.from_numpy(np.asarray(v)) for k, v in stored.items()}
                     if Path(inner) != Path(path) else None)

    def read() -> dict:
        if extracted is not None:
            return extracted
        with weights_of(path, ARCHIVE_LIMIT, ValueError) as inner, h5py.File(inner, "r") as f:
            return {k: torch.from_numpy(np.asarray(v)) for k, v in f[group].items() if k in shapes}

    return shapes, read


# a torchvision classifier's parameters (VGG, DenseNet, ConvNeXt: classifier; ResNet: fc); osteo's head is its own
TORCHVISION_HEADS = ("classifier.", "fc.")


# torchvision's ConvNeXt names (features.N: the stem, then stages and downsamplings by turns)
# -> timm's; a block's layer scale is (C, 1, 1) there and (C,) in timm
_TV_CONVNEXT_BLOCK = (("block.0.", "conv_dw."), ("block.2.", "norm."), ("block.3.", "mlp.fc1."),
                      ("block.5.", "mlp.fc2."), ("layer_scale", "gamma"))


def _convnext_from_torchvision(key: str) -> str:
    """timm's name of a torchvision ConvNeXt state dict's key (its classifier's kept as they are)."""
    m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if not m:
        return key
    i, rest = int(m[1]), m[2]
    if i == 0:
        return f"stem.{rest}"
    if i % 2 == 0:
        return f"stages.{i // 2}.downsample.{rest}"
    block, tail = rest.split(".", 1)
    for theirs, ours in _TV_CONVNEXT_BLOCK:
        if tail.startswith(theirs):
            tail = ours + tail[len(theirs):]
            break
    return f"stages.{(i - 1) // 2}.blocks.{block}.{tail}"


# the names of torchvision's published DenseNet checkpoints (denselayerN.norm.1.weight), which
# torchvision renames as it loads them (denselayerN.norm1.weight, timm's names too)
_TV_DENSENET_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _from_torchvision(module, declared: dict, read: Callable[[], dict]) -> tuple[dict, Callable[[], dict]]:
    """A torchvision state dict of an architecture whose names timm changed (ConvNeXt; DenseNet's
    published files), under timm's names; any other file as it is. (torchvision's VGG and ResNet
    names, and DenseNet's of a model instance, are timm's.)"""
    arch = type(module).__name__
    if arch == "DenseNet" and any(_TV_DENSENET_OLD.match(k) for k in declared):
        names = {k: _TV_DENSENET_OLD.sub(lambda m: m[1] + m[2], k) for k in declared}
        return ({names[k]: v for k, v in declared.items()},
                lambda: {names.get(k, k): v for k, v in read().items()})
    if arch != "ConvNeXt" or "features.1.0.block.0.weight" not in declared:
        return declared, read

    def shape(key: str, dims: tuple[int, ...]) -> tuple[int, ...]:
        return dims[:1] if key.endswith("layer_scale") else dims

    names = {k: _convnext_from_torchvision(k) for k in declared}
    return ({names[k]: shape(k, v) for k, v in declared.items()},
            lambda: {names.get(k, k): v.reshape(-1) if k.endswith("layer_scale") else v for k, v in read().items()})


def load_weights_file(module, path: Path, name: str, dropped: tuple[str, ...], fix: str | None = None) -> None:
    """Load a local state dict into ``module``; every parameter must be in it with its shape.

    Keys of the classifier (timm's ``pretrained_cfg["classifier"]``) and of the parts
    dropped at build time may be in the file and are ignored, and so are a classifier's
    keys under torchvision's names (``classifier.``, ``fc.``: a torchvision VGG's three
    linear layers) where the module has no such parameters; a torchvision ConvNeXt's keys, and
    those of torchvision's published DenseNet files, are read under timm's names
    (:func:`_from_torchvision`); anything else that is missing,
    unexpected or of another shape is an error, found from the declared shapes before a
    tensor is read.
    """
    spec = get_backbone(name)  # the file's kind asked only where it matters: a .keras archive is extracted to tell
    if spec.keras_port and keras_weights_file(path):
        _load_keras_layers_file(module, path, spec)
        return
    classifier = module.pretrained_cfg.get("classifier") or ()
    ignored = tuple(f"{p}." for p in ((classifier,) if isinstance(classifier, str) else classifier) + dropped)
    fix = fix or (f"pass a weights file of timm's {module.pretrained_cfg.get('architecture', name)}, a Keras .h5 "
                  "file with model.impl=keras, or --weights none (make: WEIGHTS=none)")
    try:
        declared, read = read_state_dict(path)
    except Exception as e:
        raise OsteoError(f"cannot read weights file {path}: {_short(e)}; {fix}") from None
    declared = {k.removeprefix("module."): v for k, v in declared.items()}
    declared, read_all = _from_torchvision(module, declared, lambda: {k.removeprefix("module."): v
                                                                      for k, v in read().items()})
    declared = {k: v for k, v in declared.items() if not k.startswith(ignored)}
    own = module.state_dict()
    # a BatchNorm's step counter (num_batches_tracked) is not in files saved before PyTorch 0.4.1
    # (torchvision's published DenseNet ones): the module's own is kept
    missing = sorted(k for k in set(own) - set(declared) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(k for k in set(declared) - set(own) if not k.startswith(TORCHVISION_HEADS))
    wrong = sorted(k for k in set(own) & set(declared) if tuple(own[k].shape) != declared[k])
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise OsteoError(f"weights file {path} does not match backbone {name}: {'; '.join(parts)}; {fix}")
    try:
        state = read_all()
    except Exception as e:
        raise OsteoError(f"cannot read weights file {path}: {_short(e)}; {fix}") from None
    module.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}}, strict=True)


def write_backbone_state(name: str, path: str, out: str) -> None:
    """Write to ``out`` (``state.npz``) the state dict of backbone ``name``'s timm module, as the
    timm engine builds it (the parts ``forward_features`` never uses dropped) with the weights file
    ``path`` loaded by :func:`load_weights_file`, every check it makes; float32 arrays, BatchNorm's
    step counters left out. Run by the keras engine in a child process on PyTorch
    (:func:`osteo.backbones.keras_apps.timm_module_state`), whose weights go on into Keras' layers
    (:func:`osteo.backbones.port.port_into_keras_layers`)."""
    import numpy as np

    from osteo.backbones.port import timm_file_fix

    spec = get_backbone(name)
    module = create_module(spec.timm_name)
    dropped, _ = _prune_unused(module, 32)  # which children forward_features uses: the same at any size
    load_weights_file(module, Path(path), name, dropped, fix=timm_file_fix(spec))
    np.savez(Path(out) / "state.npz", **{k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()
                                         if not k.endswith(".num_batches_tracked")})


def _load_keras_layers_file(module, path: Path, spec) -> None:
    """Load a Keras weights file of ``spec``'s Keras layers into its timm ``module``: the keras engine
    builds its backbone from the file, with every check it makes, and the port takes that backbone's
    weights to the module's tensors (:func:`osteo.backbones.port.timm_state`)."""
    import numpy as np
    import torch

    from osteo.backbones.keras_apps import all_layers
    from osteo.backbones.port import timm_state

    model = create(spec, "keras", image_size=spec.default_size, weights=str(path)).build()
    cfg = data_config(module)
    for layer in all_layers(model):  # Keras' own input scaling (ConvNeXt's) must be the timm layer's
        if isinstance(layer, keras.layers.Normalization):
            mean = keras.ops.convert_to_numpy(layer.mean).ravel() / 255.0
            std = np.sqrt(keras.ops.convert_to_numpy(layer.variance).ravel()) / 255.0
            if not (np.allclose(mean, cfg["mean"], atol=1e-4) and np.allclose(std, cfg["std"], atol=1e-4)):
                raise OsteoError(f"weights file {path}: {spec.name}'s Keras layers scale their input by mean "
                                 f"{mean.round(4).tolist()} and std {std.round(4).tolist()}, timm's module by "
                                 f"{list(cfg['mean'])} and {list(cfg['std'])}; train it with model.impl=keras")
    own = module.state_dict()
    state = timm_state(model, {k: tuple(v.shape) for k, v in own.items()}, spec.keras_port)
    module.load_state_dict({**own, **{k: torch.from_numpy(v).to(own[k].dtype) for k, v in state.items()}},
                           strict=True)


def _prune_unused(module, image_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Replace top-level children that ``forward_features`` never uses by identities.

    One forward and backward pass on a single image finds them; returns their names and
    the feature map's (H, W, C).
    """
    import torch

    was_training = module.training
    module.eval()  # BatchNorm needs no batch statistics, gradients flow all the same
    x = torch.zeros(1, 3, image_size, image_size, device=next(module.parameters()).device)
    y = module.forward_features(x)
    y.float().sum().backward()
    dropped = []
    for child_name, child in list(module.named_children()):
        params = list(child.parameters())
        if params and all(p.grad is None for p in params):
            setattr(module, child_name, torch.nn.Identity())
            dropped.append(child_name)
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    return tuple(dropped), (int(y.shape[2]), int(y.shape[3]), int(y.shape[1]))


# Grad-CAM's name for the timm module's own output (forward_features), its last stage's feature map
LAST_STAGE = "forward_features"


@keras.saving.register_keras_serializable(package="osteo")
class TimmLayer(keras.layers.TorchModuleWrapper):
    """A timm backbone as a Keras layer: NHWC in (after gray to RGB), NHWC features out.

    Args:
        name_in_registry: osteo's name of the backbone (for messages).
        timm_name: timm's model name, e.g. ``convnext_tiny.fb_in1k``.
        image_size: the (square) input size.
        weights: ``imagenet``, ``none`` or a path (see :func:`osteo.registry.parse_weights`).
        normalize: scale [0, 255] inputs with the module's ``pretrained_cfg`` mean and std.
        channels_last: keep the module and its activations in channels-last memory format.
        compile: wrap the module in ``torch.compile`` (falls back to eager on failure).
    """

    def __init__(self, name_in_registry: str, timm_name: str, *, image_size: int, weights="none",
                 normalize: bool = True, channels_last: bool = True, compile: bool = False, **kwargs):
        import torch

        kind, path = parse_weights(weights)
        if kind == "imagenet":
            module = _load_pretrained(name_in_registry, timm_name)
        else:
            module = create_module(timm_name)
        module = module.to("cuda" if torch.cuda.is_available() else "cpu")
        dropped, (h, w, c) = _prune_unused(module, image_size)
        if kind == "file":
            load_weights_file(module, path, name_in_registry, dropped)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.config = data_config(module)
        super().__init__(module, output_shape=(None, h, w, c), **kwargs)
        self.name_in_registry = name_in_registry
        self.timm_name = timm_name
        self.image_size = image_size
        self.normalize = normalize
        self.channels_last = channels_last
        self.dropped = dropped
        self.num_features = c
        device = next(module.parameters()).device
        # (1, 3, 1, 1): broadcast over NCHW; plain tensors, not weights
        self._mean = torch.tensor(self.config["mean"], device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.config["std"], device=device).view(1, 3, 1, 1) * 255.0
        names = [n for n, _ in module.named_parameters()]
        assert len(names) == len(self.variables), "TorchModuleWrapper tracks every parameter once"
        self._variables = dict(zip(names, self.variables))
        self._forward = module.forward_features
        # a BatchNorm whose scale and shift do not train (freeze_bn, or a stage left frozen) keeps its
        # statistics, as a Keras BatchNormalization layer that is not trainable runs in inference mode
        self._batch_norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.frozen_batch_norms: list = []  # TimmBackbone.unfreeze sets them
        self.compiled = False
        if compile:
            self._forward = torch.compile(module.forward_features)
            self.compiled = True

    # ------------------------------------------------------------------ forward

    def call(self, x, training=None):
        import torch

        # like Keras' BatchNorm: batch statistics only when training a trainable backbone, and
        # never in a frozen BatchNorm (running statistics neither used nor updated)
        train = bool(training) and self.trainable
        self.module.train(train)
        if train:
            for m in self.frozen_batch_norms:
                m.training = False
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view: channels-last memory, no copy
        if not self.channels_last:
            x = x.contiguous()
        if self.normalize:
            x = (x.float() - self._mean) / self._std
        dtype = _AUTOCAST.get(self.dtype_policy.compute_dtype)
        with torch.autocast(x.device.type, dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None):
            y = self._run(x)
        return y.permute(0, 2, 3, 1)  # NCHW (channels-last memory) -> NHWC view

    def _run(self, x):
        if not self.compiled:
            return self._forward(x)
        try:
            return self._forward(x)
        except Exception as e:  # the compile happens on the first call, and fails there
            if not _from_compiler(e):  # the module's own errors (shapes, memory) are not the compiler's
                raise
            warnings.warn(f"torch.compile failed for {self.timm_name} ({_short(e)}); running it eagerly",
                          stacklevel=2)
            self._forward, self.compiled = self.module.forward_features, False
            return self._forward(x)

    def get_config(self):
        """What rebuilds the module, without its weights (they are the layer's saved variables)
        and without pickling it: random initial weights, no download, no compile."""
        config = keras.layers.Layer.get_config(self)  # name, trainable, dtype; not the pickled module
        config.update(name_in_registry=self.name_in_registry, timm_name=self.timm_name,
                      image_size=self.image_size, normalize=self.normalize, channels_last=self.channels_last)
        return config

    @classmethod
    def from_config(cls, config):
        if keras.backend.backend() != "torch":  # TorchModuleWrapper cannot run elsewhere
            raise ValueError(f"{config.get('name_in_registry')} is a timm (PyTorch) backbone: load this model "
                             f"with KERAS_BACKEND=torch, not {keras.backend.backend()}")
        # only what get_config writes: a crafted file cannot ask for a download, a weights file or a compile
        known = ("name", "trainable", "dtype", "name_in_registry", "timm_name", "image_size", "normalize",
                 "channels_last")
        return cls(**{k: config[k] for k in known if k in config}, weights="none", compile=False)


class TimmBackbone(Backbone):
    """The ``timm`` engine: a :class:`TimmLayer` and what osteo asks of it."""

    info = ENGINES["timm"]

    def build(self) -> TimmLayer:
        self.layer = TimmLayer(self.spec.name, self.spec.timm_name, image_size=self.image_size, weights=self.weights,
                               normalize=self.scales_own_input, compile=self.compile,
                               channels_last=self.channels_last, name=self.spec.name)
        names = list(self.layer._variables)
        groups = group_by_stage(names, self.spec.stages[self.info.name])
        self._stages = [[self.layer._variables[names[i]] for i in g] for g in groups]
        return self.layer

    def stages(self) -> list[list]:
        return [list(group) for group in self._stages]

    def unfreeze(self, top_stages: int = 0, freeze_bn: bool = True) -> None:
        import torch

        layer = self.layer
        layer.trainable = True
        n = len(self._stages)
        for group in self._stages[: n - top_stages] if 0 < top_stages < n else []:
            for v in group:
                v.trainable = False
        if freeze_bn:
            for prefix, m in layer.module.named_modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    for n_, _ in m.named_parameters(recurse=False):
                        layer._variables[f"{prefix}.{n_}" if prefix else n_].trainable = False
        # in inference mode: every BatchNorm whose scale and shift are frozen (one without them
        # follows the layer, as Keras' does)
        layer.frozen_batch_norms = [m for m in layer._batch_norms if list(m.parameters(recurse=False))
                                    and not any(p.requires_grad for p in m.parameters(recurse=False))]

    def set_bn_momentum(self, momentum: float) -> int:
        """Keras' momentum m is PyTorch's 1 - m (the weight of the old statistics vs the new batch)."""
        import torch

        norms = [m for m in self.layer.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.momentum = 1.0 - momentum
        return len(norms)

    def gradcam_parts(self, model, target: str | None = None) -> tuple[list, Callable, list]:
        """The default target is the last stage's feature map: the spec's ``timm_gradcam_layer``
        where it names one, else the layer's output; another is a submodule of the timm module, by
        its name in ``named_modules()``, read by a forward hook."""
        import torch

        i = model.layers.index(self.layer)
        target = target or self.spec.timm_gradcam_layer or LAST_STAGE
        if target == LAST_STAGE:
            def feature(x, training=False):
                y = self.layer(x, training=training)
                return y, y
        else:
            module = dict(self.layer.module.named_modules())[target]

            def feature(x, training=False):
                seen = []

                def hook(_module, _inputs, out):
                    # NHWC, as the layer's own output; the module passes on a copy, so an in-place
                    # op after it (timm's ReLU(inplace=True)) leaves the activations read here alone
                    seen.append(out.permute(0, 2, 3, 1))
                    return seen[-1].permute(0, 3, 1, 2).clone(memory_format=torch.preserve_format)

                handle = module.register_forward_hook(hook)
                try:
                    y = self.layer(x, training=training)
                finally:
                    handle.remove()
                return seen[-1], y

        return model.layers[1:i], feature, model.layers[i + 1 :]

    def feature_maps(self, model) -> list[tuple[str, tuple[int, int]]]:
        """The submodules with a spatial output in the order they finish on one blank image,
        then the layer's output (:data:`LAST_STAGE`); up to the spec's ``timm_gradcam_layer``
        where it names one (as Keras' end at its ``gradcam_layer``). Normalizations are left out
        below it, as Keras' engine leaves them out (:data:`osteo.backbones.keras_apps.NORMALIZATIONS`)."""
        import torch

        norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
        module, done = self.layer.module, []
        last = self.spec.timm_gradcam_layer
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: done.append((name, out)))
                 for name, m in module.named_modules() if name and (name == last or not isinstance(m, norms))]
        try:
            was_training = module.training
            module.eval()
            with torch.no_grad():
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=next(module.parameters()).device)
                y = module.forward_features(x)
            module.train(was_training)
        finally:
            for h in hooks:
                h.remove()
        seen = dict.fromkeys(name for name, out in done if isinstance(out, torch.Tensor) and out.dim() == 4)
        shapes = {name: (int(out.shape[2]), int(out.shape[3])) for name, out in done if name in seen}
        maps = [*((name, shapes[name]) for name in seen), (LAST_STAGE, (int(y.shape[2]), int(y.shape[3])))]
        if last:
            names = [name for name, _ in maps]
            if last not in names:
                raise OsteoError(f"{self.spec.name}'s timm module has no {last!r} (timm_gradcam_layer in osteo.registry)")
            maps = maps[: names.index(last) + 1]
        return maps

    def load_weights_file(self, path: Path) -> None:
        load_weights_file(self.layer.module, path, self.spec.name, self.layer.dropped)

    def keras_port(self) -> tuple[dict, str]:
        """The module's state dict as float32 arrays, and the scaling of Keras' layers that is the
        layer's own (timm's mean and std, which are ImageNet's for the ported backbones: Keras'
        ``torch`` mode), or the recipe's mode where the classifier scaled the input."""
        import numpy as np

        if not self.spec.keras_port:
            raise OsteoError(f"{self.spec.name}'s timm module and Keras' layers differ in architecture: its weights "
                             "do not port (osteo.registry names keras_port where they do)")
        mode = self.preprocessing
        if self.scales_own_input:
            if not (np.allclose(self.layer.config["mean"], IMAGENET_MEAN_TORCH, atol=1e-6)
                    and np.allclose(self.layer.config["std"], IMAGENET_STD_TORCH, atol=1e-6)):
                raise OsteoError(f"{self.layer.timm_name} scales its input by mean {self.layer.config['mean']} and "
                                 f"std {self.layer.config['std']}, which no Keras preprocessing mode does")
            mode = "torch"
        state = {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                 for k, v in self.layer.module.state_dict().items()}
        return state, mode


def _from_compiler(e: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo, inductor, or the C++ build it runs)."""
    while e is not None:
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        e = e.__cause__ or e.__context__
    return False
