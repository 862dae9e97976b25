"""A timm run's weights in Keras' layers: what ``osteo export --format savedmodel`` writes for it.

A SavedModel is a TensorFlow graph, and the timm engine's backbone is a PyTorch module. For
the backbones whose timm module and ``keras.applications`` model are the same architecture
(the spec's ``keras_port``: VGG16, VGG19, DenseNet169, ConvNeXtTiny), the run's model is
rebuilt with Keras' layers (:func:`osteo.export._twin`) and the module's state dict is copied
into them (:func:`port_backbone`): each Keras weight receives exactly one tensor of the state dict,
transposed to Keras' layout, and each tensor goes to exactly one weight, or nothing is
ported. Where the two differ outside the weights, the twin follows timm:

* its input is scaled as the timm layer scaled it (timm's mean and std, Keras'
  ``torch`` mode, instead of ConvNeXt's own Normalization layer);
* ConvNeXt's ``keras.applications`` model ends in a LayerNormalization of every position
  that timm's ``forward_features`` has not (timm normalises after pooling, as osteo's
  ``pool_norm`` does on both engines): the twin's backbone ends before it;
* DenseNet's BatchNormalization uses PyTorch's epsilon (1e-5, against Keras' 1.001e-5).

The head (pooling, its norm, dense layers) is osteo's own Keras code on both engines and
its weights are copied by layer name. :mod:`osteo.export` checks the result: the
SavedModel's probabilities must be ``osteo predict``'s within its parity tolerance, or
nothing is written.

The rebuild runs in a child process on TensorFlow (:func:`osteo.export.write_ported_savedmodel`),
since the run's model loads on PyTorch only; :func:`port_backbone` itself is backend-free (the
tests run it on PyTorch against the timm module).

The same port runs the other way (:func:`timm_state`): a Keras weights file of Keras' layers
(keras.applications' downloads, a ``.weights.h5``, a Keras run's checkpoint) becomes the timm
module's state dict, so the timm engine trains from it. Each tensor is the one Keras weight the
port would have filled from it, transposed back; DenseNet's BatchNormalization keeps what it
computed, its epsilon moved into the moving variance; ConvNeXt's trailing LayerNormalization,
which neither engine's backbone uses, is left out. The input is scaled as Keras' layers were
trained (:meth:`osteo.device.EngineInfo.preprocessing`: VGG's ``caffe``; ConvNeXt's own
Normalization, ImageNet's mean and std, is the timm layer's scaling, checked here).

And a timm weights file trains on the keras engine (:func:`port_into_keras_layers`): timm's
module reads it (:func:`osteo.backbones.keras_apps.timm_module_state`) and its state dict goes
into Keras' layers as the keras engine builds them, scaled as timm's module was (``torch``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import keras
import numpy as np

from osteo.backbones.base import import_target
from osteo.errors import OsteoError

# the state dict's entries a Keras layer has no weight for: BatchNorm's step counter
_NOT_WEIGHTS = (".num_batches_tracked",)
# PyTorch's BatchNorm2d default epsilon, timm's too (Keras' DenseNet uses 1.001e-5)
TORCH_BN_EPSILON = 1e-5


def _conv(w: np.ndarray) -> np.ndarray:
    """PyTorch's (out, in, h, w) kernel as Keras' (h, w, in, out)."""
    return np.transpose(w, (2, 3, 1, 0))


def _dense(w: np.ndarray) -> np.ndarray:
    """PyTorch's (out, in) matrix as Keras' (in, out)."""
    return np.transpose(w)


def _bn(state: _Taken, prefix: str) -> list[np.ndarray]:
    """A BatchNormalization's weights in Keras' order (gamma, beta, moving mean, moving variance)."""
    return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]


def _affine(state: _Taken, prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.weight"], state[f"{prefix}.bias"]]


class _Taken(dict):
    """A state dict that remembers which of its tensors were read."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self:
            raise OsteoError(f"the timm state dict has no {key!r}: not the architecture this port expects")
        self.read.add(key)
        return np.asarray(super().__getitem__(key))


def _vgg(layer: str, state: _Taken, order: dict[str, int]) -> list[np.ndarray]:
    """``blockB_convC``: the N-th convolution of timm's ``features``, N its place among Keras' convolutions."""
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.")})
    i = convs[order[layer]]
    return [_conv(state[f"features.{i}.weight"]), state[f"features.{i}.bias"]]


_DENSE_LAYER = {"0_bn": "norm1", "1_conv": "conv1", "1_bn": "norm2", "2_conv": "conv2"}


def _densenet(layer: str, state: _Taken, order: dict[str, int]) -> list[np.ndarray]:
    """Keras' ``convS_blockL_{0_bn,1_conv,1_bn,2_conv}`` are timm's ``denseblock{S-1}.denselayerL``'s
    ``norm1, conv1, norm2, conv2``; ``poolS_{bn,conv}`` its ``transition{S-1}``; the stem and the
    final norm by name."""
    del order
    fixed = {"conv1_conv": "features.conv0", "conv1_bn": "features.norm0", "bn": "features.norm5"}
    if layer in fixed:
        prefix = fixed[layer]
    elif m := re.fullmatch(r"conv(\d)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)", layer):
        prefix = f"features.denseblock{int(m[1]) - 1}.denselayer{m[2]}.{_DENSE_LAYER[m[3]]}"
    elif m := re.fullmatch(r"pool(\d)_(bn|conv)", layer):
        prefix = f"features.transition{int(m[1]) - 1}.{'norm' if m[2] == 'bn' else 'conv'}"
    else:
        raise OsteoError(f"no timm DenseNet weight for Keras layer {layer!r}")
    return [_conv(state[f"{prefix}.weight"])] if prefix.rsplit(".", 1)[1].startswith("conv") else _bn(state, prefix)


_CONVNEXT_BLOCK = {"depthwise_conv": "conv_dw", "layernorm": "norm", "pointwise_conv_1": "mlp.fc1",
                   "pointwise_conv_2": "mlp.fc2", "layer_scale": "gamma"}


def _convnext(layer: str, state: _Taken, order: dict[str, int]) -> list[np.ndarray]:
    """Keras' ``<model>_stage_S_block_B_<part>`` are timm's ``stages.S.blocks.B.<part>``; the stem
    and ``downsampling_{layernorm,conv}_I`` (timm's ``stages.{I+1}.downsample.{0,1}``) by name."""
    del order
    name = layer.split("_", 2)[-1]  # without "convnext_tiny_"
    if m := re.fullmatch(r"stage_(\d)_block_(\d+)_(\w+)", name):
        part = _CONVNEXT_BLOCK.get(m[3])
        if part is None:
            raise OsteoError(f"no timm ConvNeXt weight for Keras layer {layer!r}")
        prefix = f"stages.{m[1]}.blocks.{m[2]}.{part}"
        if part == "gamma":
            return [state[prefix]]
        if part.startswith("mlp."):
            return [_dense(state[f"{prefix}.weight"]), state[f"{prefix}.bias"]]
        return [_conv(state[f"{prefix}.weight"]), state[f"{prefix}.bias"]] if part == "conv_dw" else _affine(state, prefix)
    if m := re.fullmatch(r"downsampling_(layernorm|conv)_(\d)", name):  # timm: the norm, then the conv
        prefix, conv = f"stages.{int(m[2]) + 1}.downsample.{0 if m[1] == 'layernorm' else 1}", m[1] == "conv"
    elif name in ("stem_conv", "stem_layernorm"):  # timm: the conv, then the norm
        prefix, conv = f"stem.{0 if name == 'stem_conv' else 1}", name == "stem_conv"
    else:
        raise OsteoError(f"no timm ConvNeXt weight for Keras layer {layer!r}")
    return [_conv(state[f"{prefix}.weight"]), state[f"{prefix}.bias"]] if conv else _affine(state, prefix)


def _trim_convnext(model: keras.Model) -> keras.Model:
    """The model without its last layer, the LayerNormalization of every position that timm's
    ``forward_features`` has not: its output is that layer's input (the last block's sum)."""
    last = model.layers[-1]
    if not isinstance(last, keras.layers.LayerNormalization):
        raise OsteoError(f"{model.name} does not end in the LayerNormalization this port removes")
    return keras.Model(model.input, last.input, name=model.name)


def _epsilon(eps: float) -> Callable[[keras.Model], keras.Model]:
    def set_epsilon(model: keras.Model) -> keras.Model:
        for layer in _leaves(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.epsilon = eps
        return model

    return set_epsilon


# a spec's keras_port -> (the Keras layer's weights from the state dict, what adapts the model)
PORTS: dict[str, tuple[Callable, Callable[[keras.Model], keras.Model]]] = {
    "vgg": (_vgg, lambda model: model),
    "densenet": (_densenet, _epsilon(TORCH_BN_EPSILON)),
    "convnext": (_convnext, _trim_convnext),
}


def _leaves(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Layers of ``model`` that hold weights themselves, nested Sequentials opened (ConvNeXt's stem)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        elif layer.weights:
            yield layer


def keras_backbone(spec, image_size: int) -> keras.Model:
    """``spec``'s ``keras.applications`` model shaped like its timm module (see the module's notes),
    random weights; its input takes the twin's scaled RGB."""
    kwargs = {**spec.constructor_kwargs}
    if "include_preprocessing" in kwargs:  # the twin scales its input as the timm layer did
        kwargs["include_preprocessing"] = False
    model = import_target(spec.constructor)(include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                                      **kwargs)
    return PORTS[spec.keras_port][1](model)


def _ported(model: keras.Model, state: dict, port: str) -> Iterator[tuple[keras.layers.Layer, list[np.ndarray]]]:
    """Each weight-holding layer of ``model`` with the arrays of ``state`` its weights are, in Keras'
    layout: every weight of the model gets one, and every tensor of ``state`` (BatchNorm's step
    counters aside) is used, or :class:`~osteo.errors.OsteoError` says which is not."""
    weights_of = PORTS[port][0]
    taken = _Taken(state)
    leaves = list(_leaves(model))
    convs = [layer.name for layer in leaves if isinstance(layer, keras.layers.Conv2D)]
    order = {name: i for i, name in enumerate(convs)}
    for layer in leaves:
        arrays = weights_of(layer.name, taken, order)
        shapes = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != shapes:
            raise OsteoError(f"timm's weights for Keras layer {layer.name!r} have shapes "
                             f"{[a.shape for a in arrays]}, not {shapes}")
        yield layer, arrays
    unused = sorted(k for k in state if k not in taken.read and not k.endswith(_NOT_WEIGHTS))
    if unused:
        raise OsteoError(f"{len(unused)} tensors of the timm state dict have no Keras weight "
                         f"({', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''})")


def port_backbone(model: keras.Model, state: dict, port: str) -> None:
    """Copy the timm module's ``state`` (name -> array) into ``model`` (:func:`keras_backbone`'s).

    Every weight of the model is set, and every tensor of ``state`` (BatchNorm's step counters
    aside) is used, or :class:`~osteo.errors.OsteoError` says which is not.
    """
    for layer, arrays in _ported(model, state, port):
        layer.set_weights(arrays)


def timm_file_fix(spec) -> str:
    """What to do about a timm weights file the keras engine cannot read for ``spec``."""
    return (f"pass a weights file of timm's {spec.timm_name.split('.')[0]} or a Keras weights file of {spec.name}, "
            "or --weights none (make: WEIGHTS=none)")


def port_into_keras_layers(model: keras.Model, state: dict, port: str) -> None:
    """Copy the timm module's ``state`` into ``model``, Keras' layers as the keras engine builds
    them (their constructor's own input scaling, epsilon and trailing norm, not
    :func:`keras_backbone`'s twin): :func:`port_backbone`'s mapping, with

    * each BatchNormalization's epsilon left as Keras' constructor set it (DenseNet's 1.001e-5),
      PyTorch's 1e-5 moved into its moving variance, so that it computes what the module did;
    * ConvNeXt's trailing per-position LayerNormalization, which timm's module has not (its
      ``forward_features`` ends in the last block's sum): scale 1 and shift 0, the weights it is
      made with (:func:`timm_state` leaves it out going the other way; a timm file's ``head.norm``,
      which timm applies after pooling, is not read). It still normalizes each position: the keras
      engine's ConvNeXt, which has this layer whatever its weights, gives timm's features normalized
      per position, and its head pools those (the timm engine's pools timm's own).

    Every weight of the backbone but that norm is set, and every tensor of ``state`` used, or
    :class:`~osteo.errors.OsteoError` says which is not.
    """
    eps = {layer.name: layer.epsilon for layer in _leaves(model) if isinstance(layer, keras.layers.BatchNormalization)}
    view = _trim_convnext(model) if port == "convnext" else model  # the same layers, the trailing norm aside
    for layer, arrays in _ported(view, state, port):
        if layer.name in eps:  # PyTorch's (variance + 1e-5) as Keras' (variance' + its epsilon)
            arrays = [*arrays[:3], arrays[3] + np.float32(TORCH_BN_EPSILON - eps[layer.name])]
        layer.set_weights([np.asarray(a, np.float32) for a in arrays])
    if view is not model:
        norm = model.layers[-1]
        norm.set_weights([np.ones(w.shape, np.float32) if w.name == "gamma" else np.zeros(w.shape, np.float32)
                          for w in norm.weights])


def timm_state(model: keras.Model, shapes: dict[str, tuple[int, ...]], port: str) -> dict[str, np.ndarray]:
    """The timm module's state dict (float32 arrays, under the names of ``shapes``: the module's
    own tensors and their shapes) that :func:`port_backbone` would turn into ``model``'s weights.

    ``model`` is Keras' layers as the keras engine builds them (its constructor's own input
    scaling, epsilon and trailing norm). The inverse is read off the port itself: each tensor is
    filled with its elements' numbers, the port maps them into Keras' layout, and every Keras
    weight's values go back where its numbers came from; each element must be written exactly once.
    BatchNorm's step counters are not weights (the module keeps its own).
    """
    eps = {layer.name: layer.epsilon for layer in _leaves(model) if isinstance(layer, keras.layers.BatchNormalization)}
    model = PORTS[port][1](model)  # ConvNeXt without its trailing norm; DenseNet's epsilon is folded below
    keys = [k for k in shapes if not k.endswith(_NOT_WEIGHTS)]
    sizes = [int(np.prod(shapes[k], dtype=np.int64)) for k in keys]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    kind = np.int32 if starts[-1] < 2**31 else np.int64  # ConvNeXtTiny's 28M numbers: 112 MB, not 224
    numbers = {k: np.arange(starts[i], starts[i + 1], dtype=kind).reshape(shapes[k]) for i, k in enumerate(keys)}
    flat = np.zeros(int(starts[-1]), np.float32)
    written = np.zeros(int(starts[-1]), np.uint8)  # how often each number was written (1, or a port's fault)
    for layer, where in _ported(model, numbers, port):
        values = [np.asarray(v, np.float32) for v in layer.get_weights()]
        if layer.name in eps:  # Keras' (variance + its epsilon) as PyTorch's (variance' + 1e-5)
            values[3] = values[3] + np.float32(eps[layer.name] - TORCH_BN_EPSILON)
        for index, value in zip(where, values):  # one tensor's numbers, each once
            flat[index.ravel()] = value.ravel()
            written[index.ravel()] += 1
    if (written != 1).any():
        raise OsteoError(f"the port writes {int((written == 0).sum())} of the timm module's numbers never and "
                         f"{int((written > 1).sum())} more than once: not the architecture it expects")
    return {k: flat[starts[i]:starts[i + 1]].reshape(shapes[k]) for i, k in enumerate(keys)}
