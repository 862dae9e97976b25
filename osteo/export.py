"""Export a run's best model for other systems: ``osteo export RUN_DIR [--format onnx|savedmodel|keras]``.

The exported model is the whole inference path, so a consumer needs neither osteo nor
its preprocessing code:

    image (batch, size, size, 1), pixel values in [0, 255]    ("image")
      -> gray to RGB -> the backbone's preprocessing -> backbone -> head (softmax)
      -> temperature scaling: softmax(log(clip(p, 1e-7, 1)) / T)
      -> three calibrated probabilities, in osteo.CLASSES order  ("probabilities")

``size`` is the run's input size; the image is what ``osteo predict`` feeds the model
(a file decoded, box-filtered and resized into the image cache's 16-bit levels by
:func:`osteo.data.pipeline.load_levels`, divided by 257). T comes
from the run's ``calibration.json`` (``osteo calibrate``); T = 1 for a run not
calibrated, which leaves the probabilities as trained. The operating points' thresholds
stay in ``calibration.json``: they apply to these probabilities. The training-time
augmentation layers are left out of the export (they are identities at inference, and
ONNX has no kernels for their random ops). The model is built in float32 whatever the
process's dtype policy (a run trained in mixed precision keeps float32 weights).

Input dtype: every format takes **float32** pixel values in [0, 255]; a uint8 image
only needs a cast (``x.astype(np.float32)``), which is exact. In detail:

* ``onnx`` (the default; ``model.onnx``, opset :data:`ONNX_OPSET`): one input, ``image``,
  float32 — an ONNX graph has one input type, and float32 carries both uint8 and
  non-integer pixels without loss, whereas a uint8 input would round float images.
  Output ``probabilities``; the batch dimension is free (``batch``). Every run exports
  to ONNX: on TensorFlow through tf2onnx (runs of Keras' layers), on PyTorch through
  PyTorch's exporter (the timm engine's runs, which load on PyTorch only; the CLI picks
  that backend for them, :func:`osteo.runs.use_backend_of`; runs of Keras' layers too
  when ``KERAS_BACKEND=torch``). Before the file is put in place, onnxruntime runs it in
  an interpreter that cannot import osteo, Keras, TensorFlow or PyTorch (:func:`isolated`)
  on up to :data:`PARITY_IMAGES` of the run's validation images (seeded noise when its
  data is gone), all at once and one alone: its probabilities must be ``osteo predict``'s
  within :data:`PARITY_TOLERANCE`, or nothing is written. Beside it go ``export.json``
  (:func:`onnx_record`: what was written and the parity measured; the model card reads
  it) and ``predict.py`` (:mod:`osteo.export_predict`: image files to the calibrated
  probabilities with numpy, Pillow and onnxruntime only). Needs the ``export`` extra
  (``pip install 'osteo[export]'``).
* ``savedmodel`` (a folder; runs of Keras' layers, on TensorFlow, and timm runs of the
  backbones whose weights port to Keras' layers, :mod:`osteo.backbones.port`): the signature
  ``serving_default`` (also ``serve``) takes ``image`` as float32, and ``serve_uint8``
  takes it as uint8 and casts inside; both return ``{"probabilities": ...}``. Load it
  with ``tf.saved_model.load`` or serve it with TF Serving. It is put in place only if, loaded
  back, it gives ``osteo predict``'s probabilities within :data:`PARITY_TOLERANCE`, and its
  ``osteo_export.json`` records the parity measured. The SavedModel holds each
  weight twice (Keras' ExportArchive, keras-team/keras#23553): about twice the weights
  on disk.
* ``keras`` (``model.keras``; runs of both engines): accepts uint8 or float arrays (Keras
  casts to float32); loading it needs osteo imported (``import osteo.export``: its
  layers are osteo's registered layers, loadable with ``safe_mode=True``, no Lambda
  layers). A timm run's file loads on the PyTorch backend with timm installed: its
  :class:`~osteo.backbones.timm_torch.TimmLayer` is rebuilt from timm's model name and the
  input size, and its state dict read from the file (nothing unpickled). It is put in place
  only if, loaded back so (safe mode, on this backend), it gives ``osteo predict``'s
  probabilities within :data:`PARITY_TOLERANCE`; ``model.keras.json`` beside it records the
  parity measured (:func:`keras_record`).

A timm run's SavedModel (its backbone is a PyTorch module, which a TensorFlow graph cannot
hold) is its model rebuilt with Keras' layers, the module's weights ported into them, written by
a child process on TensorFlow (:func:`write_ported_savedmodel`), and put in place only if the
SavedModel, loaded back, gives ``osteo predict``'s probabilities within
:data:`PARITY_TOLERANCE` on the parity images, in batches of all and of one; the folder's
``osteo_export.json`` records the parity measured (every SavedModel's folder holds one: a run of
Keras' layers is checked the same way, loaded back). A format the run's engine cannot write
(SavedModel for a timm run of a backbone without a port) is refused in one line naming the
ones it can. Keras' own
``model.export(format="onnx")`` is not used: on TensorFlow the ONNX files it writes for
ConvNeXt and EfficientNetV2 cannot be run by onnxruntime (see :func:`_onnx_from_tensorflow`),
and on PyTorch it traces ConvNeXt's LayerNormalization into a graph PyTorch's exporter
refuses (see :func:`_onnx_from_torch`).

Every file is written atomically: to a temporary sibling, renamed over the target when
complete (for the SavedModel folder, the old folder is moved aside, the new one renamed
in, and the old one removed), so a reader never sees a half-written export.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np

import osteo
import osteo.backbones.timm_torch  # registers TimmLayer, for loading a timm run's .keras export
from osteo import CLASSES, killpoints
from osteo.calibrate import EPS, apply_temperature
from osteo.child import DIE_WITH_PARENT, signal_name
from osteo.classifier import AUGMENTATION
from osteo.device import get_engine
from osteo.errors import OsteoError
from osteo.export_request import (  # noqa: F401 (FORMATS, DEFAULT_NAMES, EXPORT_DIR: this module's API too)
    DEFAULT_NAMES,
    EXPORT_DIR,
    FORMATS,
    RECORD,
    SCRIPT,
    SCRIPT_SOURCE,
    check_request,
)
from osteo.files import (
    all_or_none,
    atomic_path,
    cannot_write,
    folder_lock,
    owned_prefix,
    sha256_file,
    sweep_temporaries,
    temporaries_of,
    write_json,
    write_text,
)
from osteo.model_card import write_model_card
from osteo.predict import load_best, load_images, say_if_decoded_otherwise, say_if_uncalibrated
from osteo.registry import get_backbone
from osteo.runs import RunDir

# Opset 17 (ONNX 1.12, 2022): read by every onnxruntime from 1.12 on and by most other runtimes.
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
PORT_RECORD = RunDir.PORT_RECORD  # inside a SavedModel's folder: what it is, and the parity measured
PARITY_TOLERANCE = 1e-4  # the most an ONNX probability may differ from osteo predict's
PARITY_IMAGES = 16  # the run's first validation images (or seeded noise when its data is gone)
# PyTorch's exporter traces the model on a batch of this size; the parity check runs
# other batch sizes (all the images, then one), so a traced-in batch size cannot pass.
TRACE_BATCH = 2
# What a consumer of an export does not have: the parity check and the tests run the
# ONNX model and predict.py in interpreters where importing these fails.
NOT_IMPORTABLE = ("osteo", "keras", "tensorflow", "torch", "jax")

# The augmentation osteo.classifier puts in the model: all identities at inference.


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


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
    """Export the run's best model, preprocessing and calibration inside, as ``fmt``.

    An ONNX export is checked before it is put in place: run by onnxruntime in an
    interpreter that cannot import osteo, Keras, TensorFlow or PyTorch, its probabilities
    must be ``osteo predict``'s within :data:`PARITY_TOLERANCE`. Beside it go
    ``export.json`` (:func:`onnx_record`) and ``predict.py`` (:mod:`osteo.export_predict`).
    A SavedModel is checked the same way, loaded back by TensorFlow (a timm run's, its weights
    ported into Keras' layers, also before calibration), and holds its record (:data:`PORT_RECORD`);
    a ``.keras`` file too, loaded back by Keras in safe mode, its record beside it (:func:`keras_record`).

    Args:
        run_dir: a finished run directory (one with ``best.weights.h5``).
        fmt: ``onnx``, ``savedmodel`` or ``keras``.
        out: the file (the folder, for ``savedmodel``) to write; None: under
            ``RUN_DIR/export/`` (``model.onnx``, ``savedmodel/``, ``model.keras``).

    Returns:
        The path written.

    Raises:
        OsteoError: not a run, no ``best.weights.h5``, an unknown format or one the run's
            engine cannot write, an ``--out`` that would replace one of the run's own files
            or is a file where a folder is needed (or the reverse), a missing exporter, an
            export that does not give ``osteo predict``'s probabilities, or a port that failed.
    """
    request = check_request(run_dir, fmt, out)
    run, engine, target, ported = request.run, request.engine, request.target, request.ported
    if fmt != "keras":
        _require_exporter(fmt, ported)
    temperature = _temperature(run)
    # float32 whatever the process's policy: a run trained in mixed precision keeps
    # float32 weights, and its export computes in float32 as osteo predict does
    with _float32_policy():
        best = load_best(run)
        model = calibrated_model(best, temperature)
    with folder_lock(target.parent, str(target)):  # another export there waits: a record named the other's model
        _write_export(run, engine, fmt, ported, best, model, temperature, target)
    return target


def _write_export(run: RunDir, engine, fmt: str, ported: bool, best: keras.Model, model: keras.Model,
                  temperature: float, target: Path) -> None:
    """:func:`export_run`'s writing, its checks passed and its folder locked."""
    records = [target.parent / RECORD, target.parent / SCRIPT, *([keras_record(target)] if fmt == "keras" else [])]
    for written in (target, *records):  # a killed export's temporaries (and the copies all_or_none kept)
        sweep_temporaries(target.parent, pattern=temporaries_of(written))
    if fmt == "onnx":
        if keras.backend.backend() == "tensorflow":
            fix = "export --format savedmodel instead"
        elif "tensorflow" in engine.backends:
            fix = f"export it on TensorFlow: KERAS_BACKEND=tensorflow osteo export {run.path}"
        else:  # the timm engine: PyTorch's exporter is the only one
            fix = "please report it with the run's recipe.json"
        _export_onnx(run, best, model, temperature, target, fix)
    elif fmt == "savedmodel":
        (_export_ported_savedmodel if ported else _export_savedmodel)(run, best, model, temperature, target)
        if target == run.export_path / RunDir.SAVEDMODEL:  # the run's own export: its model card says so
            _write_card(run)
    else:
        _export_keras(run, best, model, temperature, target)
        if target == run.export_path / RunDir.KERAS_EXPORT:
            _write_card(run)


def _write_card(run: RunDir) -> None:
    """The run's model card, listing its own exports, under the run's lock: ``osteo calibrate``
    and ``osteo eval`` write it there too, and a calibrate that fails puts its previous card back."""
    with folder_lock(run.path, f"the model card in {run.model_card_path}"):
        write_model_card(run)


def keras_record(target: Path) -> Path:
    """Where a ``.keras`` export's record goes: beside it (``model.keras.json``)."""
    return target.with_name(target.name + RunDir.KERAS_RECORD_SUFFIX)


def parity_of(path: Path, fmt: str) -> dict | None:
    """The parity an export at ``path`` recorded (``export.json`` beside an ONNX model,
    :data:`PORT_RECORD` in a SavedModel's folder, :func:`keras_record` beside a ``.keras`` file)."""
    record = {"onnx": path.parent / RECORD, "savedmodel": path / PORT_RECORD, "keras": keras_record(path)}.get(fmt)
    if record is None or not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8")).get("parity")


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
    return layer.name in AUGMENTATION  # osteo.classifier names the layers that augment


def _temperature(run: RunDir) -> float:
    say_if_decoded_otherwise(run)  # the exported predict.py decodes as osteo does now
    say_if_uncalibrated(run)
    t = run.read_calibration().get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise OsteoError(f"{run.calibration_path} has temperature {t!r}, not a positive number; "
                         f"calibrate again with: osteo calibrate {run.path}")
    return float(t)


def _require_exporter(fmt: str, ported: bool = False) -> None:
    """SavedModels are TensorFlow's (a ported one is written by a child process on TensorFlow);
    ONNX is written by the backend's exporter (tf2onnx on TensorFlow, PyTorch's own on PyTorch)
    and checked with onnxruntime."""
    backend = keras.backend.backend()
    if fmt == "savedmodel" and ported:
        if importlib.util.find_spec("tensorflow") is None:
            raise OsteoError("export to savedmodel writes the model with Keras' layers on TensorFlow, which is not "
                             "installed: pip install tensorflow, or export --format onnx")
        return
    if fmt == "savedmodel" and backend != "tensorflow":
        raise OsteoError(f"export to savedmodel runs on the TensorFlow backend, not {backend}; "
                         f"run it with KERAS_BACKEND=tensorflow")
    if fmt != "onnx":
        return
    if backend not in ("tensorflow", "torch"):
        raise OsteoError(f"export to onnx runs on the TensorFlow or PyTorch backend, not {backend}; "
                         f"run it with KERAS_BACKEND=tensorflow")
    needed = ("tf2onnx", "onnx", "onnxruntime") if backend == "tensorflow" else ("onnx", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise OsteoError(f"export to onnx needs {' and '.join(missing)}: pip install 'osteo[export]'")


@contextlib.contextmanager
def _float32_policy() -> Iterator[None]:
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(policy)


# --------------------------------------------------------------------------- writers


def _export_keras(run: RunDir, best: keras.Model, model: keras.Model, temperature: float, target: Path) -> None:
    """``model`` as a ``.keras`` archive, put in place only if, loaded back by Keras (safe mode, on
    this backend), it gives ``osteo predict``'s probabilities within :data:`PARITY_TOLERANCE`; its
    record (:func:`keras_record`) beside it, the two written together."""
    images, source, want, _ = _parity_reference(run, best, temperature)
    record = keras_record(target)
    with all_or_none([target, record]):
        with atomic_path(target) as tmp:
            model.save(tmp)
            loaded = keras.saving.load_model(tmp, safe_mode=True)
            with _ieee_float32():
                got = np.concatenate([keras.ops.convert_to_numpy(loaded(x, training=False)) for x in (images, images[:1])])
            diff = _max_diff(got, np.concatenate([want, want[:1]]))
            _check_parity(diff, len(images), "the .keras model", "export --format onnx instead")
        recipe = run.read_recipe()
        write_json(record, {
            "format": "keras", "file": target.name, "engine": recipe.model.impl, "backbone": recipe.model.backbone,
            "backend": keras.backend.backend(), "temperature": temperature,
            "load": "import osteo.export, then keras.saving.load_model(path, safe_mode=True)",
            "parity": {"reference": "osteo predict, float32 arithmetic", "max_abs_diff": diff, "images": len(images),
                       "source": source, "runtime": f"Keras {keras.__version__} on {keras.backend.backend()}",
                       "tolerance": PARITY_TOLERANCE},
            "osteo_version": osteo.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })


def _input_signature(model: keras.Model, dtype: str = "float32") -> list:
    import tensorflow as tf

    return [tf.TensorSpec((None, *model.input_shape[1:]), dtype, name=INPUT_NAME)]


def _export_savedmodel(run: RunDir, best: keras.Model, model: keras.Model, temperature: float, target: Path) -> None:
    """A run of Keras' layers as a SavedModel, put in place only if, loaded back, it gives ``osteo
    predict``'s probabilities within :data:`PARITY_TOLERANCE` (all the parity images at once, then
    one); its record (:data:`PORT_RECORD`) goes inside the folder."""
    images, source, want, _ = _parity_reference(run, best, temperature)
    with _atomic_dir(target) as tmp:
        _write_savedmodel(model, tmp, target)
        diff = _served_diff(tmp, images, want)
        _check_parity(diff, len(images), "the SavedModel", "export --format onnx instead")
        _write_savedmodel_record(run, tmp, temperature, {"max_abs_diff": diff, "images": len(images),
                                                         "source": source, "runtime": _tf_runtime()})


def _parity_reference(run: RunDir, best: keras.Model, temperature: float) -> tuple:
    """(the parity images, where they come from, ``osteo predict``'s calibrated and uncalibrated
    probabilities on them): what osteo predict reports (:class:`osteo.predict.Predictor`: the
    model's probabilities, then the temperature in NumPy), in the float32 arithmetic an export is
    run in."""
    images, source = _parity_images(run)
    with _ieee_float32():
        raw = best.predict(images, batch_size=len(images), verbose=0)
    return images, source, apply_temperature(raw, temperature) if temperature != 1.0 else raw, raw


def _served_diff(folder: Path, images: np.ndarray, want: np.ndarray) -> float:
    """The largest difference from ``want`` of the SavedModel in ``folder``, loaded back by TensorFlow,
    on ``images`` all at once and then the first alone."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    with _ieee_float32():
        got = np.concatenate([serve(image=tf.constant(x))[OUTPUT_NAME].numpy() for x in (images, images[:1])])
    return _max_diff(got, np.concatenate([want, want[:1]]))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.shape == b.shape else math.inf


def _tf_runtime() -> str:
    import tensorflow as tf

    return f"tensorflow {tf.__version__}, keras {keras.__version__}"


def _check_parity(diff: float, n: int, what: str, fix: str) -> None:
    """Refuse an export (``what``: "the ONNX model", "the SavedModel") whose probabilities differ
    from ``osteo predict``'s by more than :data:`PARITY_TOLERANCE` on ``n`` images."""
    if not diff <= PARITY_TOLERANCE:
        raise OsteoError(f"{what}'s probabilities differ from osteo predict's by {diff:.2g} (over "
                         f"{PARITY_TOLERANCE:g}) on {n} images; nothing written; {fix}")


def _write_savedmodel_record(run: RunDir, folder: Path, temperature: float, parity: dict,
                             ported_to: str | None = None, preprocessing: str | None = None) -> None:
    """:data:`PORT_RECORD` in a SavedModel's ``folder``: what it is and the parity measured;
    ``preprocessing``: the input scaling of a ported model (None: the run's own)."""
    recipe = run.read_recipe()
    write_json(folder / PORT_RECORD, {
        "format": "savedmodel", "engine": recipe.model.impl, "backbone": recipe.model.backbone,
        "ported_to": ported_to, "preprocessing": preprocessing or recipe.model.preprocessing,
        "temperature": temperature,
        "signatures": ["serving_default", "serve", "serve_uint8"],
        "parity": {"reference": "osteo predict, float32 arithmetic", **parity, "tolerance": PARITY_TOLERANCE},
        "osteo_version": osteo.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _write_savedmodel(model: keras.Model, folder: Path, target: Path) -> None:
    """Write ``model`` as a SavedModel to ``folder`` (the staging folder of ``target``). TensorFlow
    reports a full disk, a file size limit or a refused write as its own errors
    (``ResourceExhaustedError: ... No space left on device [Op:SaveV2]``), with a traceback; they
    are raised as the :class:`OSError` they are, naming ``target``, so each is one line."""
    import tensorflow as tf

    try:
        _savedmodel_archive(model).write_out(str(folder), verbose=False)
    except tf.errors.OpError as e:
        code = next((c for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
                     if os.strerror(c) in str(e.message)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(target)) from None


def _savedmodel_archive(model: keras.Model):
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint is also the SavedModel's "serving_default".
    archive.add_endpoint("serve", lambda image: {OUTPUT_NAME: model(image, training=False)},
                         input_signature=_input_signature(model))
    archive.add_endpoint("serve_uint8", lambda image: {OUTPUT_NAME: model(tf.cast(image, tf.float32),
                                                                          training=False)},
                         input_signature=_input_signature(model, "uint8"))
    return archive


# ------------------------------------------------------------------ a timm run's SavedModel


def _export_ported_savedmodel(run: RunDir, best: keras.Model, model: keras.Model, temperature: float,
                              target: Path) -> None:
    """A timm run's SavedModel: its weights in Keras' layers (:mod:`osteo.backbones.port`), written
    by a child process on TensorFlow (this one runs the run's PyTorch module), put in place only if
    its probabilities are ``osteo predict``'s within :data:`PARITY_TOLERANCE`: the calibrated ones
    of the SavedModel as loaded back, in batches of all the parity images and of one, and the
    uncalibrated ones of the Keras model it was written from (a large temperature flattens the
    calibrated ones); its record (:data:`PORT_RECORD`) goes inside the folder.

    The child runs this process's osteo (not one in its working folder), in a working folder
    named as the target's temporaries, so a killed export's is swept by the next one."""
    del model  # the run's own (PyTorch) model: the child builds Keras' layers
    engine = best.osteo_backbone
    state, preprocessing = engine.keras_port()
    head = _head_weights(best, engine.layer)
    images, source, want, raw = _parity_reference(run, best, temperature)
    work = None
    try:
        with _atomic_dir(target) as tmp:
            work = _fresh_dir(target)
            np.savez(work / "weights.npz", **{f"backbone:{k}": v for k, v in state.items()},
                     **{f"head:{name}:{i}": w for name, ws in head.items() for i, w in enumerate(ws)})
            for name, array in (("images", images), ("want", want), ("raw", raw)):
                np.save(work / f"{name}.npy", array)
            result = _port_child(run, work, tmp, temperature, preprocessing, target)
            _check_parity(max(result["max_abs_diff"], result["max_abs_diff_uncalibrated"]), len(images),
                          "the SavedModel", "export --format onnx instead")
            _write_savedmodel_record(run, tmp, temperature, {
                "max_abs_diff": result["max_abs_diff"], "max_abs_diff_uncalibrated": result["max_abs_diff_uncalibrated"],
                "images": len(images), "source": source, "runtime": result["runtime"]},
                ported_to=result["ported_to"], preprocessing=preprocessing)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


# Run by _port_child on TensorFlow: this process's osteo first on the path, then the twin, its
# weights, the SavedModel, and the SavedModel's probabilities as loaded back.
_PORT_CHILD = """
import json, sys
osteo_root, run, work, out, temperature, preprocessing = sys.argv[1:]
sys.path.insert(0, osteo_root)
from pathlib import Path
from osteo.errors import OsteoError
from osteo.export import write_ported_savedmodel
try:
    result = write_ported_savedmodel(Path(run), Path(work), Path(out), float(temperature), preprocessing)
except OsteoError as e:
    sys.exit(str(e))
except OSError as e:  # the machine's (a full disk): the export raises it as its own, one line
    print(json.dumps({"os_error": [e.errno, e.strerror or str(e)]}))
    sys.exit(3)
print(json.dumps(result))
"""
PORT_TIMEOUT = 3600  # seconds the child may take (DenseNet169 at 32 px: 35-60 s on 2 cores)
# TensorFlow's own log lines on stderr (absl's "I0000 00:00:..." and its preamble): never the reason
_TF_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d|WARNING: All log messages before absl|To enable the following)")


def _port_child(run: RunDir, work: Path, out: Path, temperature: float, preprocessing: str, target: Path) -> dict:
    """:func:`write_ported_savedmodel`'s result, from a child process on TensorFlow; every way it
    can fail is one line (the machine's errors, a full disk, as the OSError naming ``target``)."""
    fix = "nothing written; export --format onnx instead"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    root = Path(osteo.__file__).resolve().parent.parent  # this process's osteo, whatever PYTHONPATH says
    with subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT + _PORT_CHILD, str(root), str(run.path.resolve()),
                           str(work.resolve()), str(out.resolve()), repr(temperature), preprocessing,
                           str(os.getpid())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=work) as proc:
        killpoints.reached("export.child_started")
        try:
            stdout, stderr = proc.communicate(timeout=PORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise OsteoError(f"writing the SavedModel with Keras' layers on TensorFlow took over {PORT_TIMEOUT} s; "
                             f"{fix}") from None
    if proc.returncode < 0:  # a signal: the out-of-memory killer, a crash; TensorFlow's log is not why
        raise OsteoError(f"writing the SavedModel with Keras' layers on TensorFlow was killed by "
                         f"{signal_name(proc.returncode)} (out of memory?); {fix}")
    if proc.returncode == 3:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code, reason = json.loads((stdout.strip().splitlines() or [""])[-1])["os_error"]
            raise OSError(code, reason, str(target))
    if proc.returncode != 0:
        said = [line for line in stderr.strip().splitlines() if not _TF_LOG.match(line)]
        raise OsteoError(f"writing the SavedModel with Keras' layers on TensorFlow failed "
                         f"({(said or ['no message'])[-1][:300]}); {fix}")
    try:
        return json.loads((stdout.strip().splitlines() or [""])[-1])
    except json.JSONDecodeError:
        raise OsteoError(f"writing the SavedModel with Keras' layers on TensorFlow gave no result "
                         f"({stdout.strip()[-200:]!r}); {fix}") from None


def _twin(recipe, preprocessing: str) -> tuple[keras.Model, keras.Model]:
    """(A timm run's classifier (``recipe``, resolved) built with Keras' layers, random weights;
    its backbone): the same head and layer names, the backbone
    :func:`osteo.backbones.port.keras_backbone`'s, its input scaled by ``preprocessing``
    (:meth:`osteo.backbones.timm_torch.TimmBackbone.keras_port`'s)."""
    from osteo.backbones.port import keras_backbone
    from osteo.classifier import Classifier

    m = recipe.model
    clf = Classifier(m.backbone, image_size=recipe.data.image_size, weights="none", head=m.head, augment=m.augment,
                     seed=recipe.train.seed, freeze_bn=m.freeze_bn, preprocessing=preprocessing,
                     impl=get_engine(m.impl).ports_to)
    backbone = keras_backbone(get_backbone(m.backbone), recipe.data.image_size)
    return clf.build(backbone=backbone), backbone


def _head_weights(model: keras.Model, backbone) -> dict[str, list]:
    """Each layer of ``model`` that holds weights, but its backbone and augmentation: name -> arrays."""
    return {layer.name: layer.get_weights() for layer in model.layers
            if layer is not backbone and layer.weights and not _is_augmentation(layer)}


def write_ported_savedmodel(run_dir: Path, work: Path, out: Path, temperature: float, preprocessing: str) -> dict:
    """On TensorFlow: write to ``out`` the SavedModel of the timm run ``run_dir`` whose weights
    and parity images are in ``work`` (:func:`_export_ported_savedmodel`'s), then run it as
    loaded back; returns its largest difference from ``work/want.npy``, and the Keras model's
    from ``work/raw.npy`` (before the temperature)."""
    from osteo.backbones.port import port_backbone

    recipe = RunDir(run_dir).read_recipe()
    spec = get_backbone(recipe.model.backbone)
    with np.load(work / "weights.npz") as f:
        arrays = {k: f[k] for k in f.files}
    state = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("backbone:")}
    head: dict[str, list] = {}
    for k in sorted((k for k in arrays if k.startswith("head:")), key=lambda k: int(k.rsplit(":", 1)[1])):
        head.setdefault(k.split(":")[1], []).append(arrays[k])
    with _float32_policy():
        model, backbone = _twin(recipe, preprocessing)
        port_backbone(backbone, state, spec.keras_port)
        own = _head_weights(model, backbone)
        if set(own) != set(head) or any(len(own[k]) != len(head[k]) for k in own):
            raise OsteoError(f"the Keras-layers model's head {sorted(own)} is not the run's {sorted(head)}")
        for name, weights in head.items():
            model.get_layer(name).set_weights(weights)
        calibrated = calibrated_model(model, temperature)
    _write_savedmodel(calibrated, out, out)
    images, want, raw = (np.load(work / f"{name}.npy") for name in ("images", "want", "raw"))
    with _ieee_float32():
        got_raw = model.predict(images, batch_size=len(images), verbose=0)
    return {"max_abs_diff": _served_diff(out, images, want), "max_abs_diff_uncalibrated": _max_diff(got_raw, raw),
            "ported_to": f"keras.applications {spec.constructor.split(':')[1]}", "runtime": _tf_runtime()}


# --------------------------------------------------------------------------- ONNX


def _export_onnx(run: RunDir, best: keras.Model, model: keras.Model, temperature: float, target: Path,
                 fix: str) -> None:
    """Write ``model`` as ONNX to ``target`` if onnxruntime, without osteo, gives ``osteo predict``'s
    probabilities; then its record and the standalone script beside it. ``fix``: what to do
    when the exporter cannot translate the model."""
    images, source, want, _ = _parity_reference(run, best, temperature)
    with _ieee_float32():
        if keras.backend.backend() == "tensorflow":
            proto, exporter = _onnx_from_tensorflow(model), f"tf2onnx {importlib.metadata.version('tf2onnx')}"
        else:
            proto, exporter = _onnx_from_torch(model, fix), f"torch.onnx {_torch_version()} (TorchScript exporter)"
    _check_onnx(proto, exporter, fix)
    import onnx

    with atomic_path(target) as tmp:
        onnx.save(proto, tmp)
        diff, runtime = _parity(tmp, images, want)
        _check_parity(diff, len(images), "the ONNX model", fix)
        sha256 = sha256_file(tmp)
    record = onnx_record(run, target.name, temperature, exporter=exporter, sha256=sha256,
                         parity={"max_abs_diff": diff, "images": len(images), "source": source,
                                 "tolerance": PARITY_TOLERANCE, "runtime": runtime})
    write_json(target.parent / RECORD, record)
    write_text(target.parent / SCRIPT, SCRIPT_SOURCE.read_text(encoding="utf-8"))
    if target.parent == run.export_path:  # the run's own export: its model card says what was exported
        _write_card(run)


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """float32 arithmetic with float32's 23-bit mantissa, as onnxruntime computes it: on a GPU,
    PyTorch and TensorFlow allow TF32 (a 10-bit mantissa) by default, PyTorch in
    convolutions, which moved densenet169's and convnext_tiny's probabilities by up to
    3.6e-4 on an H200 (over the parity tolerance; under 8e-7 with it off)."""
    if keras.backend.backend() == "torch":
        import torch

        flags = (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")
        saved = [getattr(owner, name) for owner, name in flags]
        for owner, name in flags:
            setattr(owner, name, False)
        try:
            yield
        finally:
            for (owner, name), value in zip(flags, saved):
                setattr(owner, name, value)
    else:
        import tensorflow as tf

        saved = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(saved)


def onnx_record(run: RunDir, file: str, temperature: float, *, exporter: str, sha256: str, parity: dict) -> dict:
    """``export.json``: what an ONNX export is, for ``predict.py`` and the model card.

    ``input``/``output``: the graph's names, shapes (``batch`` is free) and dtypes;
    ``preprocessing``: what turns an image file into the input (``osteo predict``'s decode,
    resize mode and 16-bit levels); ``parity``: the largest difference from ``osteo
    predict``'s probabilities measured at export (its model computing in float32, TF32
    off on a GPU), on how many images and which.
    """
    recipe = run.read_recipe()
    size = recipe.data.image_size
    return {
        "file": file, "format": "onnx", "opset": ONNX_OPSET, "sha256": sha256, "exporter": exporter,
        "engine": recipe.model.impl, "backbone": recipe.model.backbone, "backend": keras.backend.backend(),
        "input": {"name": INPUT_NAME, "shape": ["batch", size, size, 1], "dtype": "float32", "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(CLASSES)], "dtype": "float32",
                   "classes": list(CLASSES)},
        "temperature": temperature, "calibrated": run.calibration_path.is_file(),
        "preprocessing": {"decode": "osteo.data.decode", "resize": recipe.data.resize, "box_filter": True,
                          "levels": 65535},
        "parity": {"reference": "osteo predict, float32 arithmetic", **parity},
        "script": SCRIPT, "osteo_version": osteo.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _parity_images(run: RunDir) -> tuple[np.ndarray, str]:
    """Up to :data:`PARITY_IMAGES` of the run's validation images as ``osteo predict`` reads
    them, and ``"validation"``; seeded noise images and ``"synthetic"`` when none is readable."""
    data = run.read_recipe().data
    rows = [r for r in run.read_split() if r["split"] == "val"][:PARITY_IMAGES] if data.dir else []
    images, _ = load_images([Path(data.dir) / r["path"] for r in rows], data.image_size, data.resize)
    ready = [img for img in images if img is not None]
    if ready:
        return np.stack(ready).astype(np.float32), "validation"
    noise = np.random.default_rng(0).uniform(0, 255, (PARITY_IMAGES, data.image_size, data.image_size, 1))
    return noise.astype(np.float32), "synthetic"


def _check_onnx(proto, exporter: str, fix: str) -> None:
    """The graph is valid ONNX with one input, ``image``, and one output, ``probabilities``;
    their first dimension is named ``batch`` (it is free)."""
    import onnx

    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    try:
        onnx.checker.check_model(proto, full_check=True)
        names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise onnx.checker.ValidationError(f"inputs {names[0]} and outputs {names[1]}, not one image")
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise OsteoError(f"{exporter} could not translate this model to ONNX ({first}); {fix}") from None


# Run by isolated(): the ONNX model on the images through predict.py's own functions, all at
# once and then the first alone.
_PARITY_CHILD = """
import json, runpy, numpy as np, onnxruntime
script, model, images, out = sys.argv[1:]
ns = runpy.run_path(script)
sess, x = ns["session"](model), np.load(images)
np.save(out, np.concatenate([ns["probabilities"](sess, x), ns["probabilities"](sess, x[:1])]))
print(json.dumps({"runtime": "onnxruntime " + onnxruntime.__version__}))
"""


def isolated(code: str, *args: str | os.PathLike) -> list[str]:
    """The command line that runs ``code`` in a fresh interpreter where osteo, Keras,
    TensorFlow, PyTorch and JAX cannot be imported: what a consumer of an export has.

    ``-I`` (isolated mode) keeps the current folder, ``PYTHONPATH`` and the user's site
    off ``sys.path``; :data:`NOT_IMPORTABLE` are then entered in ``sys.modules`` as None,
    which is how Python marks a module unavailable: importing one raises
    ModuleNotFoundError, and ``importlib.util.find_spec`` (a package probing for an
    optional one) says it is not there, although it is installed.
    """
    return [sys.executable, "-I", "-c", f"import sys\nsys.modules.update(dict.fromkeys({NOT_IMPORTABLE!r}))\n{code}",
            *map(str, args)]


def _parity(model: Path, images: np.ndarray, want: np.ndarray) -> tuple[float, str]:
    """(max |difference| from ``want``, the runtime) of the ONNX ``model`` on ``images``, in
    batches of all and of one, run by :data:`SCRIPT_SOURCE`'s functions without osteo."""
    with tempfile.TemporaryDirectory(prefix="osteo-export-") as tmp:
        x, out = Path(tmp) / "images.npy", Path(tmp) / "probabilities.npy"
        np.save(x, images)
        proc = subprocess.run(isolated(_PARITY_CHILD, SCRIPT_SOURCE, model, x, out), capture_output=True,
                              text=True, cwd=tmp, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise OsteoError(f"onnxruntime could not run the exported model ({last}); "
                             "check that onnxruntime imports: python -c 'import onnxruntime'")
        got = np.load(out)
    runtime = json.loads(proc.stdout.strip().splitlines()[-1])["runtime"]
    return _max_diff(got, np.concatenate([want, want[:1]])), runtime


def _torch_version() -> str:
    import torch

    return torch.__version__


def _onnx_from_torch(model: keras.Model, fix: str):
    """ONNX through PyTorch's TorchScript exporter: on the PyTorch backend the Keras model is
    a ``torch.nn.Module`` (the timm engine's module inside it), traced on
    :data:`TRACE_BATCH` images with a free batch dimension.

    PyTorch's dynamo exporter is not used: it needs onnxscript, and Keras' own
    ``model.export(format="onnx")`` falls back to the TorchScript exporter for a free batch
    dimension too. Keras' LayerNormalization reads its normalized shape from the traced
    input, which the exporter refuses as not constant: :class:`_TorchLayerNormView`.
    """
    import io

    import onnx
    import torch

    traceable = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=_torch_onnx_call,
                                         recursive=True)

    class Inference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = traceable

        def forward(self, image):
            return self.model(image, training=False)

    sample = keras.ops.zeros((TRACE_BATCH, *model.input_shape[1:]), dtype="float32")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the exporter's deprecation notice, and the tracer's notes on Python values it
        # records as constants (shapes other than the batch's; the parity check runs
        # other batch sizes)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(Inference().eval(), (sample,), buffer, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False)
        except Exception as e:  # the exporter raises many types, with pages of graph
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OsteoError(f"PyTorch's ONNX exporter could not translate this model ({first}); {fix}") from None
    return onnx.load_from_string(buffer.getvalue())


def _torch_onnx_call(layer: keras.layers.Layer, *args, **kwargs):
    """Call ``layer`` as PyTorch's exporter can trace it: LayerNormalization with a constant shape.

    ``clone_model`` hands nested Sequential models (ConvNeXt's stem and downsampling layers
    in ``keras.applications``) over whole, so their layers are called one by one here.
    """
    if isinstance(layer, keras.Sequential):
        x = args[0]
        for inner in layer.layers:
            x = _torch_onnx_call(inner, x)
        return x
    if isinstance(layer, keras.layers.LayerNormalization) and not layer.rms_scaling and (
            layer.gamma is not None or layer.beta is not None):
        rank = len(args[0].shape)
        if [a % rank for a in layer.axis] == [rank - 1]:
            return _TorchLayerNormView(layer)(args[0])
    return layer(*args, **kwargs)


class _TorchLayerNormView(keras.layers.Layer):
    """A last-axis LayerNormalization as ``torch.nn.functional.layer_norm`` with the shape of its
    weights, which is what Keras computes on PyTorch (from the input's shape). Used for
    tracing the ONNX graph only, never saved."""

    def __init__(self, norm: keras.layers.LayerNormalization, **kwargs):
        super().__init__(name=f"{norm.name}_constant_shape", **kwargs)
        self.norm = norm

    def call(self, x):
        import torch.nn.functional as F

        norm = self.norm
        shape = tuple(int(d) for d in (norm.gamma if norm.gamma is not None else norm.beta).shape)
        gamma = None if norm.gamma is None else norm.gamma.value
        beta = None if norm.beta is None else norm.beta.value
        return F.layer_norm(x, shape, gamma, beta, norm.epsilon)


def _onnx_from_tensorflow(model: keras.Model):
    """ONNX through tf2onnx, from a graph of ``model`` traced for it and frozen here.

    Keras' ``model.export(format="onnx")`` (``tf2onnx.convert.from_function``) fails on
    osteo's backbones three ways, each fixed here: tensors the graph captures (the
    Normalization constants of EfficientNetV2) become extra graph inputs, as tf2onnx
    lists captures among the inputs (freezing first makes them constants); ConvNeXt's
    grouped convolutions run in an XLA-compiled call that tf2onnx leaves as an invalid
    ``StatefulPartitionedCall`` (traced as depthwise convolutions: :class:`_DepthwiseView`);
    and exact GELU's ``Erfc`` has no tf2onnx handler (:func:`_erfc`).
    """
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
    return proto


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
        raise cannot_write(path.parent, e) from None
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
    """A new empty folder ``.<name>.<pid>@<host>-<random>.tmp`` next to ``path`` (mode as the umask says),
    which :func:`osteo.files.sweep_temporaries` keeps while this process runs."""
    tmp = path.parent / f"{owned_prefix(f'.{path.name}.')}{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    return tmp
