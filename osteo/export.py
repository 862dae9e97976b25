"""Export a run's best model for other systems: ``osteo export RUN_DIR --format onnx|savedmodel|keras``.

The exported model is the whole inference path, so a consumer needs neither osteo nor
its preprocessing code:

    image (batch, size, size, 1), pixel values in [0, 255]    ("image")
      -> gray to RGB -> the backbone's preprocessing -> backbone -> head (softmax)
      -> temperature scaling: softmax(log(clip(p, 1e-7, 1)) / T)
      -> three calibrated probabilities, in osteo.CLASSES order  ("probabilities")

``size`` is the run's input size. T comes from the run's ``calibration.json``
(``osteo calibrate``); T = 1 for a run not calibrated, which leaves the probabilities
as trained. The operating points' thresholds stay in ``calibration.json``: they apply
to these probabilities. The training-time augmentation layers are left out of the
export (they are identities at inference, and ONNX has no kernels for their random ops).

Input dtype: every format takes **float32** pixel values in [0, 255]; a uint8 image
only needs a cast (``x.astype(np.float32)``), which is exact. In detail:

* ``onnx`` (``model.onnx``, opset :data:`ONNX_OPSET`): one input, ``image``, float32 —
  an ONNX graph has one input type, and float32 carries both uint8 and non-integer
  pixels without loss, whereas a uint8 input would round float images. Output
  ``probabilities``; the batch dimension is free (``batch``).
* ``savedmodel`` (a folder): the signature ``serving_default`` (also ``serve``) takes
  ``image`` as float32, and ``serve_uint8`` takes it as uint8 and casts inside; both
  return ``{"probabilities": ...}``. Load it with ``tf.saved_model.load`` or serve it
  with TF Serving.
* ``keras`` (``model.keras``): accepts uint8 or float arrays (Keras casts to float32);
  loading it needs osteo imported (``import osteo.export``: its layers are osteo's
  registered layers, loadable with ``safe_mode=True``, no Lambda layers).

The ONNX and SavedModel exports run on the TensorFlow backend (``KERAS_BACKEND=tensorflow``;
a run of Keras' layers loads on either backend; runs of timm's PyTorch module
cannot be exported yet). ONNX needs the ``export`` extra
(``pip install 'osteo[export]'``): tf2onnx converts a frozen graph of the model. Keras'
own ``model.export(format="onnx")`` is not used: the ONNX files it writes for ConvNeXt
and EfficientNetV2 cannot be run by onnxruntime (see :func:`_write_onnx`). The SavedModel holds each weight twice (Keras' ExportArchive,
keras-team/keras#23553): about twice the weights on disk.

Every file is written atomically: to a temporary sibling, renamed over the target when
complete (for the SavedModel folder, the old folder is moved aside, the new one renamed
in, and the old one removed), so a reader never sees a half-written export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import keras

from osteo.calibrate import EPS
from osteo.device import get_engine
from osteo.errors import OsteoError
from osteo.files import atomic_path
from osteo.predict import load_best
from osteo.runs import RunDir

FORMATS = ("onnx", "savedmodel", "keras")
DEFAULT_NAMES = {"onnx": "model.onnx", "savedmodel": "savedmodel", "keras": "model.keras"}
EXPORT_DIR = "export"  # RUN_DIR/export/ holds the default outputs
# Opset 17 (ONNX 1.12, 2022): read by every onnxruntime from 1.12 on and by most other runtimes.
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"

# The augmentation osteo.classifier puts in the model: all identities at inference.
AUGMENTATION_LAYERS = (
    keras.layers.RandomFlip, keras.layers.RandomRotation, keras.layers.RandomZoom,
    keras.layers.RandomTranslation, keras.layers.RandomShear, keras.layers.RandomContrast,
    keras.layers.RandomBrightness, keras.layers.RandAugment,
)


@keras.saving.register_keras_serializable(package="osteo")
class TemperatureScaling(keras.layers.Layer):
    """Calibrated probabilities from probabilities: softmax(log(clip(p, EPS, 1)) / T).

    The same formula as :func:`osteo.calibrate.apply_temperature` (log-probabilities
    stand for the logits: softmax ignores the constant lost), in ``keras.ops`` so it is
    part of the exported graph.
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probs):
        ops = keras.ops
        return ops.softmax(ops.log(ops.clip(probs, EPS, 1.0)) / self.temperature, axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Export the run's best model, preprocessing and calibration inside, as ``fmt``.

    Args:
        run_dir: a finished run directory (one with ``best.weights.h5``).
        fmt: ``onnx``, ``savedmodel`` or ``keras``.
        out: the file (the folder, for ``savedmodel``) to write; None: under
            ``RUN_DIR/export/`` (``model.onnx``, ``savedmodel/``, ``model.keras``).

    Returns:
        The path written.

    Raises:
        OsteoError: not a run, no ``best.weights.h5``, an unknown format, an ``--out`` that
            would replace one of the run's own files or is a file where a folder is
            needed (or the reverse), or a missing exporter.
    """
    if fmt not in FORMATS:
        raise OsteoError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    run = RunDir(run_dir).check(need=(RunDir.BEST,))
    get_engine(run.read_recipe().model.impl).check_export(fmt, f"run {run.path}")
    target = Path(out) if out is not None else run.path / EXPORT_DIR / DEFAULT_NAMES[fmt]
    _refuse_run_files(target)
    if fmt == "savedmodel" and target.exists() and not target.is_dir():
        raise OsteoError(f"--out {target} is a file; a SavedModel is a folder: choose another path")
    if fmt != "savedmodel" and target.is_dir():
        raise OsteoError(f"--out {target} is a folder; give a file, e.g. {target / DEFAULT_NAMES[fmt]}")
    if fmt == "keras" and target.suffix != ".keras":
        raise OsteoError(f"--out {target} must end in .keras (Keras loads .keras files only)")
    if fmt != "keras":
        _require_exporter(fmt)
    model = calibrated_model(load_best(run), _temperature(run))
    {"onnx": _write_onnx, "savedmodel": _write_savedmodel, "keras": _write_keras}[fmt](model, target)
    return target


def calibrated_model(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` without its augmentation, with temperature scaling on its output.

    The layers are shared with ``model``, not copied: the weights are the trained ones.
    """

    def call(layer, *args, **kwargs):
        return args[0] if _is_augmentation(layer) else layer(*args, **kwargs)

    core = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    probs = TemperatureScaling(temperature, name="temperature_scaling")(core.output)
    return keras.Model(core.input, probs, name=f"{model.name}_export")


def _is_augmentation(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.Sequential):  # osteo.classifier's "augment" block
        return bool(layer.layers) and all(_is_augmentation(inner) for inner in layer.layers)
    return isinstance(layer, AUGMENTATION_LAYERS)


def _temperature(run: RunDir) -> float:
    t = run.read_calibration().get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise OsteoError(f"{run.calibration_path} has temperature {t!r}, not a positive number; "
                         f"calibrate again with: osteo calibrate {run.path}")
    return float(t)


def _refuse_run_files(target: Path) -> None:
    """An export must never replace a run's own file (``--out RUN_DIR/best.weights.h5`` above all)."""
    resolved = target.resolve()
    if RunDir.owner_of(target):
        raise OsteoError(f"--out {target} would overwrite the run's own {resolved.name}; export elsewhere, "
                         f"e.g. the default {resolved.parent / EXPORT_DIR}/")


def _require_exporter(fmt: str) -> None:
    if keras.backend.backend() != "tensorflow":
        raise OsteoError(f"export to {fmt} runs on the TensorFlow backend, not {keras.backend.backend()}; "
                         f"run it with KERAS_BACKEND=tensorflow")
    missing = [m for m in ("tf2onnx", "onnx") if importlib.util.find_spec(m) is None] if fmt == "onnx" else []
    if missing:
        raise OsteoError(f"export to onnx needs {' and '.join(missing)}: pip install 'osteo[export]'")


# --------------------------------------------------------------------------- writers


def _write_keras(model: keras.Model, target: Path) -> None:
    with atomic_path(target) as tmp:
        model.save(tmp)


def _input_signature(model: keras.Model, dtype: str = "float32") -> list:
    import tensorflow as tf

    return [tf.TensorSpec((None, *model.input_shape[1:]), dtype, name=INPUT_NAME)]


def _write_savedmodel(model: keras.Model, target: Path) -> None:
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint is also the SavedModel's "serving_default".
    archive.add_endpoint("serve", lambda image: {OUTPUT_NAME: model(image, training=False)},
                         input_signature=_input_signature(model))
    archive.add_endpoint("serve_uint8", lambda image: {OUTPUT_NAME: model(tf.cast(image, tf.float32),
                                                                          training=False)},
                         input_signature=_input_signature(model, "uint8"))
    with _atomic_dir(target) as tmp:
        archive.write_out(tmp, verbose=False)


def _write_onnx(model: keras.Model, target: Path) -> None:
    """ONNX through tf2onnx, from a graph of ``model`` traced for it and frozen here.

    Keras' ``model.export(format="onnx")`` (``tf2onnx.convert.from_function``) fails on
    osteo's backbones three ways, each fixed here: tensors the graph captures (the
    Normalization constants of EfficientNetV2) become extra graph inputs, as tf2onnx
    lists captures among the inputs (freezing first makes them constants); ConvNeXt's
    grouped convolutions run in an XLA-compiled call that tf2onnx leaves as an invalid
    ``StatefulPartitionedCall`` (traced as depthwise convolutions: :class:`_DepthwiseView`);
    and exact GELU's ``Erfc`` has no tf2onnx handler (:func:`_erfc`).
    """
    import onnx
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    traceable = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=_onnx_call,
                                         recursive=True)
    fn = tf.function(lambda image: traceable(image, training=False))
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function(*_input_signature(model)),
                                               lower_control_flow=False, aggressive_inlining=True)
    (image,), (probs,) = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    with _quiet_tf2onnx():
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(add_shapes=True), name=model.name, input_names=[image], output_names=[probs],
            opset=ONNX_OPSET, custom_op_handlers={"Erfc": (_erfc, [])},
            tensors_to_rename={image: INPUT_NAME, probs: OUTPUT_NAME})
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    try:
        onnx.checker.check_model(proto, full_check=True)
        if len(proto.graph.input) != 1:
            raise onnx.checker.ValidationError(f"inputs {[i.name for i in proto.graph.input]}, not one image")
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise OsteoError(f"tf2onnx could not translate this model to ONNX ({first}); "
                         "export --format savedmodel instead") from None
    with atomic_path(target) as tmp:
        onnx.save(proto, tmp)


def _onnx_call(layer: keras.layers.Layer, *args, **kwargs):
    """Call ``layer`` as tf2onnx can convert it: a depthwise Conv2D as a depthwise convolution."""
    if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1 and layer.kernel.shape[2] == 1:
        return _DepthwiseView(layer)(args[0])
    return layer(*args, **kwargs)


class _DepthwiseView(keras.layers.Layer):
    """A Conv2D with one input channel per group (ConvNeXt's), computed as a depthwise convolution.

    Keras runs grouped convolutions on TensorFlow through an XLA-compiled function, which
    tf2onnx cannot convert; the same weights as a depthwise convolution become an ONNX
    ``Conv`` with ``group``. Used for tracing the ONNX graph only, never saved.
    """

    def __init__(self, conv: keras.layers.Conv2D, **kwargs):
        super().__init__(name=f"{conv.name}_as_depthwise", **kwargs)
        self.conv = conv

    def call(self, x):
        conv, ops = self.conv, keras.ops
        height, width, _, filters = conv.kernel.shape
        kernel = ops.reshape(conv.kernel, (height, width, conv.groups, filters // conv.groups))
        y = ops.depthwise_conv(x, kernel, strides=conv.strides, padding=conv.padding,
                               data_format=conv.data_format, dilation_rate=conv.dilation_rate)
        if conv.use_bias:
            shape = (1, 1, 1, filters) if conv.data_format == "channels_last" else (1, filters, 1, 1)
            y = y + ops.reshape(conv.bias, shape)
        return conv.activation(y)


def _erfc(ctx, node, name, args) -> None:
    """tf2onnx handler for ``Erfc`` (exact GELU on TensorFlow), which it lacks: erfc(x) = 1 - erf(x)."""
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=name)
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


@contextlib.contextmanager
def _quiet_tf2onnx() -> Iterator[None]:
    """tf2onnx logs each rewrite it tries, and its TF1 freezing calls log deprecation notices:
    none is the user's to act on, and a failed conversion is reported by the checker."""
    import logging

    loggers = [logging.getLogger(name) for name in ("tf2onnx", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; put it in place of ``path`` on success.

    A folder cannot be renamed over a non-empty one, so an existing export is moved
    aside first and removed after; the temporaries are named like
    :func:`osteo.files.atomic_path`'s, so :func:`osteo.files.sweep_temporaries` finds
    those of a killed process.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fresh_dir(path)
    except OSError as e:
        raise OsteoError(f"cannot write to {path.parent}: {e.strerror}; choose a writable output directory") from None
    old = None
    try:
        yield tmp
        if path.exists():
            old = _fresh_dir(path)
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old / path.name, path)  # put the previous export back
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def _fresh_dir(path: Path) -> Path:
    """A new empty folder ``.<name>.<random>.tmp`` next to ``path`` (mode as the umask says)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    return tmp
