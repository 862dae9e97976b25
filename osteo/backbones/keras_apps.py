"""The ``keras`` engine: ``keras.applications`` backbones, on TensorFlow or PyTorch.

The backbone is the Keras model ``spec.constructor`` builds without its top; its stages
are groups of its layers, by the spec's ``stages["keras"]`` name patterns. Weights:
``imagenet`` (the Keras cache, or a download that fails fast offline), ``none``, or a
local Keras weights file (``.weights.h5``, or the ``.h5`` files Keras downloads, with or
without the top), whose every dataset that is read is checked against the model's weights
before anything is read. For the backbones whose timm module is the same architecture (the
spec's ``keras_port``), also timm's weights (``.safetensors``, ``.pth``, a timm run's
checkpoint): timm's module reads them, with the timm engine's checks, in a PyTorch process of
its own (:func:`timm_module_state`), and :mod:`osteo.backbones.port` puts them into these layers.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import keras

from osteo.backbones.base import (
    OFFLINE_FIX,
    Backbone,
    download_timeout,
    group_by_stage,
    import_target,
    looks_like_network_error,
)
from osteo.backbones.port import port_into_keras_layers, timm_file_fix
from osteo.device import ENGINES, ported_to_keras_layers, torch_weights_file
from osteo.errors import OsteoError, short
from osteo.h5files import datasets, scratch, torch_state_group, weights_of
from osteo.registry import parse_weights

log = logging.getLogger("osteo")


class KerasAppsBackbone(Backbone):
    """A ``keras.applications`` backbone (a functional Keras model nested in the classifier)."""

    info = ENGINES["keras"]

    def build(self) -> keras.Model:
        spec, shape = self.spec, (self.image_size, self.image_size, 3)
        constructor = import_target(spec.constructor)
        kind, path = parse_weights(self.weights)
        if kind == "imagenet":
            if spec.test_only:
                raise OsteoError(f"{spec.name} has no ImageNet weights; use --weights none (make: WEIGHTS=none)")
            with download_timeout():
                try:
                    self.layer = constructor(include_top=False, weights="imagenet", input_shape=shape,
                                             **spec.constructor_kwargs)
                except Exception as e:  # urllib, socket and Keras' own wrapper all differ
                    if not looks_like_network_error(e):
                        raise
                    raise OsteoError(f"cannot download ImageNet weights for {spec.name} (no network?): "
                                     f"{short(e)}; {OFFLINE_FIX}") from None
        else:
            self.layer = constructor(include_top=False, weights=None, input_shape=shape, **spec.constructor_kwargs)
        groups = group_by_stage([layer.name for layer in self.layer.layers], self.spec.stages[self.info.name])
        self._stage_layers = [[self.layer.layers[i] for i in g] for g in groups]
        # what each stage can train, read while everything is trainable (nested layers included)
        self._stages = [[v for layer in group for v in layer.trainable_weights] for group in self._stage_layers]
        if kind == "file":
            self.load_weights_file(path)
        return self.layer

    def stages(self) -> list[list]:
        return [list(group) for group in self._stages]

    def unfreeze(self, top_stages: int = 0, freeze_bn: bool = True) -> None:
        self.layer.trainable = True
        for layer in all_layers(self.layer):  # a functional model's trainable does not reach back into
            layer.trainable = True  # layers an earlier unfreeze (fewer stages, BatchNorm) set apart
        n = len(self._stage_layers)
        for group in self._stage_layers[: n - top_stages] if 0 < top_stages < n else []:
            for layer in group:
                layer.trainable = False
        if freeze_bn:
            for layer in all_layers(self.layer):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False

    def set_bn_momentum(self, momentum: float) -> int:
        layers = [layer for layer in all_layers(self.layer) if isinstance(layer, keras.layers.BatchNormalization)]
        for layer in layers:
            layer.momentum = momentum
        return len(layers)

    def gradcam_parts(self, model: keras.Model, target: str | None = None) -> tuple[list, keras.Model, list]:
        return keras_gradcam_parts(model, self.spec, target)

    def feature_maps(self, model: keras.Model) -> list[tuple[str, tuple[int, int]]]:
        return keras_feature_maps(model, self.spec)

    def load_weights_file(self, path: Path) -> None:
        spec = self.spec
        if ported_to_keras_layers(str(path), spec):
            port_into_keras_layers(self.layer, timm_module_state(path, spec), spec.keras_port)
            return
        load_weights_file(self.layer, path, spec.name)


def keras_gradcam_parts(model: keras.Model, spec, target: str | None = None) -> tuple[list, keras.Model, list]:
    """Grad-CAM's parts of a classifier whose backbone is a nested Keras model holding the
    spec's ``gradcam_layer`` (also a run saved whole before weights-only checkpoints); the
    target is its layer ``target`` (default: the spec's), or a residual sum by the name
    :func:`keras_feature_maps` gives it."""
    i, backbone = _keras_backbone(model, spec)
    target = target or spec.gradcam_layer
    if spec.gradcam_before_last and target == spec.gradcam_layer:
        activations = _before_top_norm(backbone)  # the tensor the spec's name stands for
    else:
        sums = dict(_residual_sums(backbone))
        activations = (sums[target] if target in sums else backbone.get_layer(target)).output
    feature = keras.Model(backbone.inputs, [activations, backbone.output])
    return model.layers[1:i], feature, model.layers[i + 1 :]


# Not Grad-CAM targets below the last stage: a normalization's output is its input rescaled per
# position (ConvNeXt's LayerNormalization), which changes where the map puts its weight
NORMALIZATIONS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization)


def keras_feature_maps(model: keras.Model, spec) -> list[tuple[str, tuple[int, int]]]:
    """The backbone's layers with a spatial output, input to output, up to the spec's ``gradcam_layer``
    (with ``gradcam_before_last``: every layer before the top norm, then its input, by that name);
    normalizations left out, residual sums that are no layer (ConvNeXt's blocks) put in, by the
    names :func:`_residual_sums` gives them: the activations timm's engine lists for the same model."""
    _, backbone = _keras_backbone(model, spec)
    out = []
    spatial = lambda shape: (int(shape[1]), int(shape[2]))
    sums = {id(op): name for name, op in _residual_sums(backbone)}
    last = _before_top_norm(backbone) if spec.gradcam_before_last else None
    top_norm = isinstance(backbone.layers[-1], keras.layers.LayerNormalization)
    for op in backbone.operations[:-1] if spec.gradcam_before_last and top_norm else backbone.operations:
        if id(op) in sums and op.output is not last:
            out.append((sums[id(op)], spatial(op.output.shape)))
        if not isinstance(op, keras.layers.Layer) or isinstance(op, keras.layers.InputLayer):
            continue
        if len(op.output.shape) == 4 and (op.name == spec.gradcam_layer or not isinstance(op, NORMALIZATIONS)):
            out.append((op.name, spatial(op.output.shape)))
        if op.name == spec.gradcam_layer:
            return out
    if spec.gradcam_before_last:
        return [*out, (spec.gradcam_layer, spatial(last.shape))]
    raise OsteoError(f"the model has no backbone with a layer {spec.gradcam_layer!r}; is this a {spec.name} run?")


def _residual_sums(backbone: keras.Model) -> list[tuple[str, object]]:
    """The sums of ``backbone`` that are operations, not layers (keras.applications' ConvNeXt adds
    each block's input to its branch with ``+``), named ``<block>_output`` after the branch's last
    layer (``convnext_tiny_stage_1_block_2_identity``: ``convnext_tiny_stage_1_block_2_output``),
    with the operations."""
    found, names = [], set()
    for op in backbone.operations:
        if isinstance(op, keras.layers.Layer) or type(op).__name__ != "Add":
            continue
        inputs = op._inbound_nodes[0].input_tensors
        if len(inputs) != 2:  # x + 3.0 (MobileNetV3's hard sigmoid): a shift, not a residual sum
            continue
        branch = inputs[-1]._keras_history.operation
        name = f"{branch.name.rsplit('_', 1)[0]}_output" if isinstance(branch, keras.layers.Layer) else op.name
        name = op.name if name in names else name  # two branches of one name: the op's own, unique
        names.add(name)
        found.append((name, op))
    return found


def _before_top_norm(backbone: keras.Model):
    """The input of the LayerNormalization ``backbone`` ends in (keras.applications' ConvNeXt), or its
    output where it ends in none (the timm run's twin of :mod:`osteo.backbones.port`)."""
    last = backbone.layers[-1]
    return last.input if isinstance(last, keras.layers.LayerNormalization) else backbone.output


def _keras_backbone(model: keras.Model, spec) -> tuple[int, keras.Model]:
    """(index in ``model.layers``, the nested backbone model: the one holding the spec's
    ``gradcam_layer``, or, with ``gradcam_before_last``, which names no layer, the nested model
    that is not the augmentation's Sequential)."""
    target = spec.gradcam_layer
    if not target:
        raise OsteoError(f"{spec.name} names no Grad-CAM layer in its spec; add gradcam_layer to osteo.registry")
    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model) and (any(x.name == target for x in layer.layers) or (
                spec.gradcam_before_last and not isinstance(layer, keras.Sequential))):
            return i, layer
    raise OsteoError(f"the model has no backbone with a layer {target!r}; is this a {spec.name} run?")


def all_layers(model):
    """Every layer of ``model``, those of the models inside it too."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def _check_tensors(stored, model: keras.Model, what: str, bad, every: bool) -> None:
    """Every dataset must have the shape of one of the model's weights, and all of them together
    fit in the model's size; with ``every``, there must be one per weight of the model."""
    import numpy as np

    shapes = {tuple(int(d) for d in w.shape) for w in model.weights} | {()}
    budget = 2 * sum(int(np.prod(w.shape)) * 8 for w in model.weights) + 2**20
    declared = tensors = 0
    for _, obj in stored:
        if obj.shape is None or tuple(obj.shape) not in shapes:
            raise bad(f"does not match {what}: it holds a tensor of shape {obj.shape} that no weight of the model has")
        if obj.dtype.kind not in "fiub":
            raise bad(f"does not match {what}: it holds a tensor of type {obj.dtype} where weights are numbers")
        declared += int(np.prod(obj.shape)) * obj.dtype.itemsize
        tensors += 1
        if declared > budget:
            raise bad("declares more data than the model holds")
    if every and tensors != len(model.weights):
        raise bad(f"does not match {what}: it holds {tensors} weight tensors where {what} has "
                  f"{len(model.weights)} (another depth or architecture's, or one saved with other layers)")


def check_h5_weights(path: Path, model: keras.Model, what: str, fix: str, every: bool = False) -> None:
    """Refuse a Keras weights file that cannot be ``model``'s before Keras reads a tensor of it.

    Only the file's metadata is read (h5py reads a dataset's declared shape and type, never
    its data, here): links to other files are refused, and every dataset must have the
    shape of one of the model's weights and fit in the model's size; with ``every``, there must
    be one dataset per weight of the model (a kin architecture's file, VGG19's for VGG16, has
    only shapes VGG16 has, and Keras' own refusal names a nested container). A crafted file that
    declares a huge (compressed) tensor is refused in milliseconds instead of being inflated.
    """
    import h5py

    def bad(reason: str) -> OsteoError:
        return OsteoError(f"weights file {path} {reason}; {fix}")

    try:
        with h5py.File(path, "r") as f:
            _check_tensors(datasets(f, bad), model, what, bad, every)
    except OsteoError:
        raise
    except Exception as e:  # not HDF5, truncated, unreadable
        raise _unreadable(path, bad, e) from None


# seconds the child that reads a timm weights file may take (ConvNeXtTiny: about 10 s on 2 cores)
TIMM_STATE_TIMEOUT = 600


# Run by timm_module_state on PyTorch, after DIE_WITH_PARENT: this process's osteo first on the path;
# what ends it is the last line on stdout, as JSON
_STATE_CHILD = """
import json, sys
osteo_root, name, path, out = sys.argv[1:]
sys.path.insert(0, osteo_root)
from osteo.errors import OsteoError
from osteo.backbones.timm_torch import write_backbone_state
try:
    write_backbone_state(name, path, out)
except OsteoError as e:
    print(json.dumps({"refusal": str(e)}))
    sys.exit(1)
except OSError as e:  # the machine's (a full TMPDIR), said by the parent
    print(json.dumps({"os_error": [e.errno, e.strerror or str(e)]}))
    sys.exit(1)
print(json.dumps({"written": out}))
"""


def timm_module_state(path: Path, spec) -> dict:
    """The state dict of ``spec``'s timm module with the weights file ``path`` loaded as the timm
    engine loads it, with every check it makes (:func:`osteo.backbones.timm_torch.write_backbone_state`):
    name -> float32 array. Read in a child process on PyTorch (:data:`_STATE_CHILD`): this one may
    run on TensorFlow, beside which torch's imports can crash. What the child wrote is remembered
    by the file's content (:class:`PortedStates`): a cross-validation's next fold, a resume or a
    new run from the same file reads it there, without the child's 9-15 s."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("torch", "timm")):  # which also made what is remembered
        raise OsteoError(f"weights file {path} is a PyTorch state dict, which Keras' layers read through timm's "
                         "module: that needs torch and timm; run `make install` (or pip install 'osteo[torch]')")
    remembered = PortedStates(spec)
    record = remembered.record(path)  # before the child reads the file
    state = remembered.recall(record)
    if state is None:
        state = _read_in_a_child(path, spec, lambda written: remembered.remember(path, record, written))
    return state


def _read_in_a_child(path: Path, spec, remember) -> dict:
    """:func:`timm_module_state`'s child; ``remember(state.npz)`` is given what it wrote."""
    import contextlib
    import errno
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    import osteo
    from osteo.child import DIE_WITH_PARENT, signal_name

    def bad(reason: str) -> OsteoError:
        return OsteoError(f"weights file {path} {reason}; {timm_file_fix(spec)}")

    root = Path(osteo.__file__).resolve().parent.parent  # this process's osteo, whatever PYTHONPATH says
    with scratch(bad) as tmp:
        # no GPU (the module is read on the CPU); run in the scratch folder, so that neither the user's
        # folder (first on a -c child's path) nor what torch caches there is in the way or left behind
        env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": "",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
        try:
            done = subprocess.run([sys.executable, "-c", DIE_WITH_PARENT + _STATE_CHILD, str(root), spec.name,
                                   str(Path(path).resolve()), str(tmp), str(os.getpid())], capture_output=True,
                                  text=True, env=env, cwd=tmp, timeout=TIMM_STATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise bad(f"took over {TIMM_STATE_TIMEOUT} s to read in timm's module") from None
        if done.returncode < 0:  # a signal: the out-of-memory killer, a crash
            raise bad(f"was being read into timm's module on PyTorch when that process was killed by "
                      f"{signal_name(done.returncode)} (out of memory?)")
        said: dict = {}
        for line in reversed(done.stdout.strip().splitlines()):  # the child's answer: its last dict
            with contextlib.suppress(json.JSONDecodeError):
                said = json.loads(line)
            if isinstance(said, dict) and said:
                break
            said = {}
        if "refusal" in said:
            raise OsteoError(said["refusal"])  # the timm engine's own, with the keras engine's fix
        if "os_error" in said:
            number, reason = said["os_error"]
            if number in (errno.ENOSPC, errno.EDQUOT):
                raise OsteoError(f"weights file {path} is read through timm's module into a temporary folder in "
                                 f"{tmp.parent}, which failed ({reason}); set TMPDIR to a folder with room")
            raise bad(f"could not be read into timm's module on PyTorch ({reason})")
        if done.returncode != 0 or "written" not in said:
            why = ([line for line in done.stderr.strip().splitlines() if line.strip()]
                   or [f"exit status {done.returncode}"])[-1][:300]
            raise bad(f"could not be read into timm's module on PyTorch ({why})")
        with np.load(tmp / "state.npz") as f:
            state = {k: f[k] for k in f.files}
        remember(tmp / "state.npz")
        return state


# the version of PortedStates' folder: a new one where what it holds changes its form
PORTED_VERSION = 1
# osteo's modules outside osteo.backbones that the child runs (what reads the file and checks it)
_CHILD_READS = ("device.py", "errors.py", "export_predict.py", "files.py", "h5files.py", "registry.py")
# entries kept per backbone: the most recently used (a folder of timm files holds one each, ~ the file's size)
KEEP_PER_BACKBONE = 3


class PortedStates:
    """timm module states that :func:`timm_module_state`'s child read from weights files, kept in
    ``$OSTEO_CACHE/ported-v1/<backbone>/`` (:meth:`entry`: one per file and reader, the child's
    ``state.npz`` with a ``__osteo__`` record of what it was made from, about the file's size; the
    :data:`KEEP_PER_BACKBONE` used last are kept). Keyed by content, so a file renamed, copied or
    moved is still known and one changed is not; an entry is used only where its record names this
    backbone, file and reader (:meth:`reader`: osteo's code that read it, the packages' versions)
    and its every array passes the zip's CRC-32 check, else it is read again and written over.
    Only successes are kept: a refusal is the child's every time. A cache that cannot be read or
    written costs the child's time and one warning, nothing else."""

    def __init__(self, spec):
        from osteo.files import default_cache_root

        self.spec = spec
        self.folder = default_cache_root() / f"ported-v{PORTED_VERSION}" / spec.name

    def reader(self) -> str:
        """What a state depends on besides the file: the child's code (its script, the backbones
        package and the modules of osteo it reads the file with), the spec's timm model and the
        versions of the packages that read it."""
        from osteo.files import code_version

        here = Path(__file__).parent
        return code_version(f"{PORTED_VERSION} {self.spec.timm_name} {_STATE_CHILD}",
                            (*sorted(here.glob("*.py")), *(here.parent / m for m in _CHILD_READS)),
                            ("timm", "torch", "safetensors", "numpy", "keras", "h5py"))

    def record(self, path: Path) -> dict | None:
        """What an entry for ``path``'s content must say it was made from (None: unreadable, which
        the child then says)."""
        from osteo.files import file_sha256

        try:  # read_as: the reader is chosen by the name's suffix (safetensors') or the file's first bytes
            return {"backbone": self.spec.name, "file_sha256": file_sha256(path), "reader": self.reader(),
                    "read_as": "safetensors" if Path(path).suffix.lower() == ".safetensors" else "its bytes"}
        except OSError:
            return None

    def entry(self, record: dict) -> Path:
        """``<the file's sha256>-<how it is read>.npz`` (a hash of the reader and ``read_as``, cut): two
        osteo versions sharing one cache keep an entry each, and do not write over each other's in turn."""
        import hashlib

        how = hashlib.sha256(f"{record['reader']} {record['read_as']}".encode()).hexdigest()[:16]
        return self.folder / f"{record['file_sha256']}-{how}.npz"

    def recall(self, record: dict | None) -> dict | None:
        """The state read before from a file of ``record``'s content, or None; one warning where
        an entry is there but cannot be used (damaged: the child's state is then kept anew)."""
        import contextlib
        import json
        import os

        import numpy as np

        if record is None:
            return None
        entry = self.entry(record)
        try:
            if not os.path.lexists(entry):
                return None
            with np.load(entry) as f:
                if json.loads(f["__osteo__"].tobytes().decode()) != record:
                    raise ValueError("its record is another file's")
                state = {k: f[k] for k in f.files if k != "__osteo__"}  # each read whole: its CRC-32 checked
        except Exception as e:  # damaged, cut, not a file, out of reach: read the file again
            log.warning("ported weights %s cannot be used (%s); reading the weights file again", entry, short(e))
            return None
        with contextlib.suppress(OSError):  # used: the last to be pruned (not where the cache is read-only)
            os.utime(entry)
        return state

    def remember(self, path: Path, record: dict | None, written: Path) -> None:
        """Keep the child's ``written`` state.npz as the entry of ``record``, taken before the child
        read ``path``, where the file is that one still (atomically: a reader sees the old entry or
        the new one); the :data:`KEEP_PER_BACKBONE` entries used last are kept, and temporaries of
        writers that died are removed. One warning where it cannot be kept."""
        import json
        import shutil
        import zipfile

        from osteo.files import atomic_path, sweep_temporaries

        if record is None or self.record(path) != record:  # replaced while the child read it
            return
        entry = self.entry(record)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(entry) as tmp:
                shutil.move(written, tmp)  # the child's scratch folder is removed after: no copy on one disk
                with zipfile.ZipFile(tmp, "a") as z:  # np.savez's form: one more .npy member
                    z.writestr("__osteo__.npy", _npy_bytes(json.dumps(record).encode()))
        except Exception as e:  # a full or read-only cache folder: the next run reads the file again
            # the reason alone: osteo's own errors (atomic_path's) end in a fix for another kind of file
            why = e.strerror if isinstance(e, OSError) and e.strerror else short(e).split("; ")[0]
            log.warning("cannot keep ported weights in %s (%s): each run reads %s through timm's module "
                        "again; set OSTEO_CACHE to a writable folder with room", self.folder, why, Path(path).name)
            return
        sweep_temporaries(self.folder)
        self.prune(keep=entry)

    def prune(self, keep: Path) -> None:
        """Remove all but the :data:`KEEP_PER_BACKBONE` entries used last (``keep`` among them)."""
        import os

        def used(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except OSError:
                return 0.0

        others = sorted((p for p in self.folder.glob("*.npz") if p != keep and not p.name.startswith(".")),
                        key=used, reverse=True)
        for old in others[KEEP_PER_BACKBONE - 1 :]:
            try:
                os.unlink(old)
            except OSError as e:  # another process's prune, or not ours to remove
                log.debug("ported weights %s not pruned: %s", old, e)


def _npy_bytes(data: bytes) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(data, np.uint8))
    return buffer.getvalue()


def _unreadable(path: Path, bad, e: Exception) -> OsteoError:
    if torch_weights_file(str(path)):  # by its name or its bytes, as the plan told it
        return OsteoError(f"weights file {path} is a PyTorch state dict, which the timm engine reads: train on "
                          "PyTorch (--backend torch, or KERAS_BACKEND=torch) with model.impl=timm or auto, "
                          "or pass a Keras .h5 weights file")
    return bad(f"cannot be read as a Keras weights file ({short(e)})")


def _snake(name: str) -> str:
    """A class name as Keras' weights format names its groups (keras' ``naming.to_snake_case``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_layer_groups(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The groups of Keras' own weights format (``.weights.h5``) that hold ``model``'s layers:
    ``layers/<class name in snake case>``, then ``_1``, ``_2`` ... for the next layers of that
    class, in layer order (keras.saving's naming; tests/test_backbones.py checks it against
    the files Keras writes). A file of the model with its top has the same groups for the
    backbone's layers, the top's after them."""
    used: dict[str, int] = {}
    groups = {}
    for layer in model.layers:
        base = _snake(type(layer).__name__)
        used[base] = used.get(base, -1) + 1
        groups[f"layers/{base}" + (f"_{used[base]}" if used[base] else "")] = layer
    return groups


def _named_by_keras(layer) -> bool:
    """Whether Keras named ``layer`` itself (``layer_normalization_3``): such a name says nothing
    about where the layer sits, and another process numbers it otherwise."""
    return re.fullmatch(rf"{_snake(type(layer).__name__)}(_\d+)?", layer.name) is not None


def _text(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _legacy_layers(group, model: keras.Model, what: str, bad) -> list[tuple[list, list]]:
    """(the model's variables, the file's datasets) of each backbone layer with weights, from a file
    in the legacy layout (keras.applications' downloads; a model saved whole to .h5): matched by
    position, as Keras matches them, the file's first layers with weights against the backbone's,
    and every tensor of the same shape. Layers after them are the top, and are not read. Names
    are not compared: the published files of 2017 name DenseNet's layers ``conv1/conv``."""
    import h5py

    saved = [(name, _text(group[name].attrs.get("weight_names", []))) for name in _text(group.attrs["layer_names"])]
    saved = [(name, weights) for name, weights in saved if weights]
    nested = _legacy_nested(group, saved, model, bad)
    if nested:
        _check_tensors(((None, d) for _, (d,) in nested), model, what, bad, every=False)
        return nested
    layers = [(layer, layer.trainable_weights + layer.non_trainable_weights) for layer in model.layers]
    layers = [(layer, variables) for layer, variables in layers if variables]
    if len(saved) < len(layers):
        raise bad(f"does not match {what}: it holds {len(saved)} layers with weights where {what} has "
                  f"{len(layers)} (another depth or architecture's)")
    pairs = []
    for k, ((layer, variables), (name, weights)) in enumerate(zip(layers, saved), 1):
        stored = [group[name][w] for w in weights]
        theirs = [tuple(d.shape) if isinstance(d, h5py.Dataset) else None for d in stored]
        ours = [tuple(int(d) for d in v.shape) for v in variables]
        if theirs != ours:
            raise bad(f"does not match {what}: its layer {name} (layer {k} with weights) holds tensors of shapes "
                      f"{theirs} where {layer.name} has {ours} (another depth or architecture's)")
        pairs.append((variables, stored))
    _check_tensors(((None, d) for _, stored in pairs for d in stored), model, what, bad, every=False)
    return pairs


def _legacy_nested(group, saved: list[tuple[str, list[str]]], model: keras.Model, bad) -> list[tuple[list, list]]:
    """([variable], [dataset]) pairs where one layer of a legacy file is the whole backbone, nested
    in a larger model (``model.save("m.h5")`` of ``Sequential([VGG16(...), Flatten(), Dense(3)])``):
    the layer whose weight names are the backbone's variables' paths, matched by name (their order
    follows which weights were trainable when it was saved), names Keras numbers per process
    (ConvNeXt's ``layer_scale/variable_18``, its last ``layer_normalization_3``) without their
    number; [] where no layer is, and an error where two are, or a tensor's shape differs."""
    auto = {"variable"} | {_snake(type(layer).__name__) for layer in model.layers if _named_by_keras(layer)}

    def unnumbered(path: str) -> str:
        parts = re.sub(r":\d+$", "", path).removeprefix(f"{model.name}/").split("/")
        return "/".join(m[1] if (m := re.fullmatch(r"(.+?)_\d+", p)) and m[1] in auto else p for p in parts)

    ours = {unnumbered(v.path): v for v in model.weights}
    if len(ours) != len(model.weights):  # two weights one name without their numbers: no match by name
        return []
    found = []
    for name, weights in saved:
        keys = [unnumbered(w) for w in weights]
        if len(keys) == len(ours) and set(keys) == set(ours):
            found.append([([ours[k]], [group[name][w]]) for k, w in zip(keys, weights)])
    if len(found) > 1:
        raise bad(f"holds {len(found)} models like {model.name}; save the one to start from alone "
                  f"(model.get_layer(...).save_weights('{model.name}.weights.h5'))")
    for (variable,), (dataset,) in found[0] if found else []:
        if getattr(dataset, "shape", None) != tuple(variable.shape):
            raise bad(f"does not match backbone {model.name}: its tensor {dataset.name} has the shape "
                      f"{getattr(dataset, 'shape', None)} where {variable.path} has {tuple(variable.shape)}")
    return found[0] if found else []


def _backbone_group(f, model: keras.Model, bad):
    """The group of a file in Keras' own layout that holds the backbone's ``layers`` and ``vars``:
    the file's root, or, in a file of a larger model that nests it (an osteo run's checkpoint,
    ``Sequential([VGG16(...), Flatten(), Dense(3)])``), the one group named as the backbone."""
    import h5py

    def named(g) -> bool:
        saved = g.get("vars")
        return isinstance(saved, h5py.Group) and _text([saved.attrs.get("name", "")])[0] == model.name

    if named(f) or not isinstance(f.get("layers"), h5py.Group):
        return f
    found, stack, seen = [], [f["layers"]], {f["layers"].id}
    while stack:
        for child in stack.pop().values():
            if isinstance(child, h5py.Group) and child.id not in seen:
                seen.add(child.id)
                if named(child) and isinstance(child.get("layers"), h5py.Group):
                    found.append(child)
                elif isinstance(child.get("layers"), h5py.Group):
                    stack.append(child["layers"])
    if len(found) > 1:
        raise bad(f"holds {len(found)} models named {model.name}; save the one to start from alone "
                  f"(model.get_layer(...).save_weights('{model.name}.weights.h5'))")
    return found[0] if found else f


def _check_keras_groups(f, model: keras.Model, what: str, bad) -> None:
    """A file in Keras' own layout: Keras reads the model's groups (:func:`keras_layer_groups`)
    and leaves any other (the top) alone. The tensors of the groups it reads are checked from
    their metadata, and each group must be the same layer: named as the model's, unless
    Keras named the model's layer itself (ConvNeXt's last LayerNormalization, whose place the
    top's ``head_layernorm`` takes). Links to other files, anywhere in the file, the caller has
    refused (its walk for a PyTorch module's state dict, :func:`osteo.h5files.torch_state_group`)."""
    import h5py

    groups = keras_layer_groups(model)
    for key, layer in groups.items():
        saved = f.get(f"{key}/vars")
        name = saved.attrs.get("name") if saved is not None else None
        name = _text([name])[0] if name is not None else None
        if name is not None and name != layer.name and not _named_by_keras(layer):
            raise bad(f"does not match {what}: its layer {name} is where {what} has {layer.name} "
                      "(another depth or architecture's)")
    # each group Keras reads, walked from its own path: a group linked under two names is checked
    # under the one Keras reads it by, not only under the first the walk of the file met
    read = (item for key in ("vars", *groups) if isinstance(f.get(key), h5py.Group) for item in datasets(f[key], bad))
    _check_tensors(read, model, what, bad, every=True)
    for key, layer in groups.items():
        saved = f.get(f"{key}/vars")
        if isinstance(saved, h5py.Group) and not getattr(layer, "_layers", None):
            # each layer's own tensors, as shapes (a layer may store them in an order of its own):
            # Keras' refusal names a container, not the tensor
            stored = sorted(tuple(d.shape) for d in saved.values() if isinstance(d, h5py.Dataset))
            own = sorted(tuple(int(n) for n in w.shape) for w in layer.weights)
            if stored != own:
                raise bad(f"does not match {what}: its layer {layer.name} ({key}) holds tensors of shapes "
                          f"{stored} where {what}'s has {own}")


def load_weights_file(model: keras.Model, path: Path, name: str) -> None:
    """Load a Keras weights file of the backbone, with or without its top (keras.applications'
    ``_notop.h5`` and full ``.h5`` files, a ``.weights.h5`` Keras saved), or of a larger model that
    nests it (a ``.keras`` archive, an osteo run's checkpoint); every tensor that is read is
    checked against the model's from the file's metadata first, a tensor that is not (the top's)
    is never inflated, and any skipped or mismatched backbone layer is an error, not a warning.
    The timm engine ignores a state dict's classifier the same way."""
    fix = (f"pass a Keras weights file of {name} (keras.applications', with or without its top) "
           "or --weights none (make: WEIGHTS=none)")

    def bad(reason: str) -> OsteoError:
        return OsteoError(f"weights file {path} {reason}; {fix}")

    # the whole model's weights, its top too (VGG16's is 8 times its backbone): at most 16 times the backbone
    with weights_of(path, max(2**30, 16 * 4 * model.count_params()), bad) as inner:
        _load_h5(model, inner, f"backbone {name}", bad)


def _load_h5(model: keras.Model, path: Path, what: str, bad) -> None:
    """:func:`load_weights_file` of an HDF5 file, in either layout."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            if "layer_names" in group.attrs:
                for _ in datasets(f, bad):  # links refused before anything is read
                    pass
                for variables, stored in _legacy_layers(group, model, what, bad):
                    for variable, dataset in zip(variables, stored):
                        variable.assign(np.asarray(dataset))
                return
            if torch_state_group(f, bad) is not None:  # its walk refuses links to other files, anywhere
                raise bad("holds a PyTorch module's state dict (a timm run's checkpoint), which the timm engine "
                          "reads: train on PyTorch (--backend torch) with model.impl=timm or auto")
            root = _backbone_group(f, model, bad)
            _check_keras_groups(root, model, what, bad)
            if root is not f:  # the backbone's groups alone, in a file of their own, for Keras to read
                with scratch(bad) as tmp:
                    alone = tmp / f"{model.name}.weights.h5"
                    try:
                        with h5py.File(alone, "w") as out:
                            for key in ("vars", *keras_layer_groups(model)):
                                if key in root:
                                    root.copy(root[key], out, name=key)
                    except (OSError, RuntimeError) as e:  # h5py's failed flush on a full disk is a RuntimeError
                        raise bad(f"has its backbone copied to {tmp} to be read, which failed ({short(e)}); set "
                                  "TMPDIR to a folder with room") from None
                    _keras_load(model, alone, what, bad)
                return
    except OsteoError:
        raise
    except Exception as e:  # not HDF5, truncated, unreadable
        raise _unreadable(path, bad, e) from None
    if not str(path).endswith(".weights.h5"):
        raise bad("is in Keras 3's own layout, which Keras reads only from a name ending in .weights.h5: "
                  "rename it so")
    _keras_load(model, path, what, bad)


def _keras_load(model: keras.Model, path: Path, what: str, bad) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            model.load_weights(str(path))
        return
    except Exception as e:
        error = bad(f"does not match {what}: {short(e)}")
    raise error  # outside the handler: Keras' traceback, which holds its HDF5 file open, is let go


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
