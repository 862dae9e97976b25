"""Experiment tracking: TensorBoard event files per run, and MLflow when asked.

The Trainer asks this module for its callbacks and calls :func:`finish` once the run's
metrics are written; nothing else in osteo knows a tracker exists.

TensorBoard (``train.tensorboard``, on by default) writes ``<run>/tensorboard/train`` and
``<run>/tensorboard/validation``, one scalar per metric per epoch (step = Keras' epoch,
from 0); ``tensorboard --logdir runs`` shows every run. On TensorFlow Keras' own callback
writes them (``tf.summary``); on PyTorch, where TensorFlow is kept out of the process
(:mod:`osteo.data.feed`), PyTorch's writer writes the same tags as tensor summaries, which
needs only the ``tensorboard`` package. Without it the run trains without event files and
``env.json``'s ``tracking.tensorboard`` says why.

MLflow (``train.mlflow``, ``osteo train --mlflow``, or ``$MLFLOW_TRACKING_URI`` set; the
``osteo[track]`` extra) logs one MLflow run per osteo run:

- store: ``$MLFLOW_TRACKING_URI``, else the file store ``./mlruns`` of the current folder
  (MLflow's own default before 3.x; view it with ``mlflow ui --backend-store-uri ./mlruns``,
  which needs the full ``mlflow`` package);
- experiment: ``$OSTEO_MLFLOW_EXPERIMENT`` (a study sets it), else ``osteo``;
- params: the resolved recipe, flattened (``train.lr``, ``model.head.dropout`` ...);
- per-epoch metrics: Keras' logs, step = the epoch as ``history.csv`` numbers it (from 1);
- final metrics: ``final_<split>_<metric>`` (and ``..._ci_low`` / ``..._ci_high``) from
  ``metrics.json`` for every metric of :data:`osteo.evaluate.METRICS`, and ``best_epoch``;
- artifacts: recipe.json, env.json, metrics.json, history.csv, and MODEL_CARD.md and
  calibration.json when the run has them.

The MLflow run is tagged ``osteo.run`` with the run directory's absolute path (and
``osteo.run_key``, its hash, by which it is found again): a resumed run continues its
MLflow run, and ``env.json``'s ``tracking.mlflow`` names it. An MLflow error (a server
that cannot be reached) stops training with one line; ``osteo train --resume`` goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osteo.errors import OsteoError
from osteo.evaluate import CHOSE, METRICS, SPLIT_NAMES, headline_split, provenance
from osteo.recipe import Recipe, dotted
from osteo.runs import RunDir

if TYPE_CHECKING:
    import keras
    from mlflow import MlflowClient

INSTALL = "pip install 'osteo[track]'"
DEFAULT_EXPERIMENT = "osteo"
DEFAULT_STORE = "mlruns"  # under the current folder
RUN_TAG = "osteo.run"  # the run directory's absolute path
KEY_TAG = "osteo.run_key"  # its hash, to find the MLflow run again


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- the hooks


def check(recipe: Recipe) -> None:
    """A one-line error when MLflow is asked for and not installed, or its tracking server does not
    answer; call it before any work."""
    if not mlflow_wanted(recipe):
        return
    if not _installed("mlflow"):
        why = "train.mlflow is on" if recipe.train.mlflow else "$MLFLOW_TRACKING_URI is set"
        raise OsteoError(f"{why} but MLflow is not installed; install it with: {INSTALL}")
    _check_server(tracking_uri())


def _check_server(uri: str) -> None:
    """An ``http(s)://`` tracking server accepts a connection (or is behind the environment's
    proxy), or a one-line error in seconds: MLflow's client retried one that nothing answers on
    for minutes before it said so."""
    import urllib.parse

    from osteo.files import unreachable

    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as e:  # a port out of range
        why = str(e)
    else:
        why = unreachable(parsed.hostname, port, proxied=parsed.scheme)
    if why:
        raise OsteoError(f"MLflow at {uri}: cannot connect ({why}); fix $MLFLOW_TRACKING_URI (unset: ./mlruns), "
                         "or train without train.mlflow")


def callbacks(recipe: Recipe, run: RunDir) -> list[keras.callbacks.Callback]:
    """The tracking callbacks for one run (called once per training phase, before its first epoch)."""
    import keras

    check(recipe)
    out: list[keras.callbacks.Callback] = []
    off = tensorboard_off(recipe)
    if off is None and keras.backend.backend() == "torch":
        out.append(_torch_tensorboard(run.tensorboard_path))
    elif off is None:
        # the epoch curves only: no graph, no profiler (the profiler is TensorFlow/JAX only)
        out.append(keras.callbacks.TensorBoard(str(run.tensorboard_path), write_graph=False, profile_batch=0))
    mlflow_run = None
    if mlflow_wanted(recipe):
        mlflow_run = _MlflowRun.open(recipe, run)
        out.append(keras.callbacks.LambdaCallback(on_epoch_end=mlflow_run.log_epoch))
    _record(run, off, mlflow_run)
    return out


def finish(recipe: Recipe, run: RunDir) -> None:
    """After the run's metrics are written: MLflow's final metrics and artifacts, and env.json's note."""
    mlflow_run = None
    if mlflow_wanted(recipe):
        check(recipe)  # a resumed run whose epochs were all done called no callbacks()
        mlflow_run = _MlflowRun.open(recipe, run)
    # the Trainer has just rewritten env.json from its own copy: record the trackers again,
    # before env.json goes to MLflow
    _record(run, tensorboard_off(recipe), mlflow_run)
    if mlflow_run is not None:
        mlflow_run.close(run)


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_off(recipe: Recipe) -> str | None:
    """Why the run gets no TensorBoard files (None: it gets them)."""
    if not recipe.train.tensorboard:
        return "off: train.tensorboard is false"
    # Keras' callback writes with tf.summary (TensorFlow and tensorboard); PyTorch's writer needs tensorboard
    keras = sys.modules.get("keras")
    needs = ("tensorboard",) if keras is not None and keras.backend.backend() == "torch" else ("tensorflow", "tensorboard")
    for module in needs:
        if not _installed(module):
            package = {"tensorflow": "tensorflow-cpu"}.get(module, module)
            return (f"off: TensorBoard files need the {package} package here; install it with: "
                    f"pip install {package}")
    return None


def _torch_tensorboard(log_dir):
    """Keras' TensorBoard layout and tags (``train/`` and ``validation/``, ``epoch_<metric>``,
    step = Keras' epoch, scalars as tensor summaries), written with tensorboard's own protos
    and record writer: PyTorch's SummaryWriter, and tensorboard's file writer, would import
    TensorFlow when it is installed."""
    import keras

    class Writer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.files = {sub: _EventFile(Path(log_dir) / sub) for sub in ("train", "validation")}

        def on_epoch_end(self, epoch, logs=None):
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            values = {"train": {"epoch_learning_rate": lr}, "validation": {}}
            for name, value in (logs or {}).items():
                sub, tag = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
                values[sub][f"epoch_{tag}"] = float(value)
            for sub, scalars in values.items():
                self.files[sub].write(epoch, scalars)

        def on_train_end(self, logs=None):
            for f in self.files.values():
                f.close()

    return Writer()


class _EventFile:
    """One TensorBoard event file: scalar tensor summaries, flushed after every write."""

    def __init__(self, folder: Path):
        import socket

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.{id(self)}.v2"
        self._file = open(folder / name, "wb")  # noqa: SIM115 (open for the run's length)
        self._writer = RecordWriter(self._file)
        self._writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._file.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.types_pb2 import DT_FLOAT

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
        summary = Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=TensorProto(dtype=DT_FLOAT,
                                                                                           float_val=[v]))
                                 for tag, v in scalars.items()])
        self._writer.write(Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- MLflow


def mlflow_wanted(recipe: Recipe) -> bool:
    return recipe.train.mlflow or bool(os.environ.get("MLFLOW_TRACKING_URI"))


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the file store ``./mlruns`` as an absolute ``file:`` URI.

    A study's trials may run in other folders: it should export this value first.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or Path(DEFAULT_STORE).resolve().as_uri()


def experiment_name() -> str:
    return os.environ.get("OSTEO_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow's errors (a store that cannot be reached or written) as one line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OsteoError(f"MLflow at {uri}: {first}; fix $MLFLOW_TRACKING_URI (unset: ./mlruns), "
                         "or train without train.mlflow") from None


def _number(v: Any) -> float | None:
    """A metric value MLflow can store (NaN included: a diverged epoch shows as one), else None."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def final_metrics(metrics: dict) -> dict[str, float]:
    """Every metric of ``metrics.json`` (:data:`osteo.evaluate.METRICS`), per held-out split, with
    the bounds of its 95% interval where it has one."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        m = metrics.get(split)
        if not isinstance(m, dict):
            continue
        for key in (metric.name for metric in METRICS):
            if m.get(key) is not None:
                out[f"final_{split}_{key}"] = float(m[key])
            ci = m.get(f"{key}_ci")
            if ci:
                out[f"final_{split}_{key}_ci_low"], out[f"final_{split}_{key}_ci_high"] = map(float, ci)
    if metrics.get("best_epoch") is not None:
        out["best_epoch"] = float(metrics["best_epoch"])
    return out


def final_tags(metrics: dict) -> dict[str, str]:
    """What the images behind each ``final_<split>_*`` metric chose, as MLflow tags: ``osteo.final_val``
    'validation, which chose the checkpoint, temperature and thresholds: optimistic', ``osteo.final_test``
    'test, which chose nothing', and ``osteo.headline``, the split whose numbers to quote."""
    splits = [s for s in ("val", "test") if isinstance(metrics.get(s), dict)]
    tags = {f"osteo.final_{s}": provenance(SPLIT_NAMES[s], metrics[s].get("chose", CHOSE[s])) for s in splits}
    if splits:
        tags["osteo.headline"] = f"final_{headline_split(splits)}_*"
    return tags


class _MlflowRun:
    """The MLflow run of one osteo run, through MlflowClient (no global active run)."""

    def __init__(self, client: MlflowClient, uri: str, run_id: str, experiment: str):
        self.client, self.uri, self.run_id, self.experiment = client, uri, run_id, experiment

    @classmethod
    def open(cls, recipe: Recipe, run: RunDir) -> _MlflowRun:
        """The run tagged with this run directory, or a new one with the recipe as params."""
        uri, name = tracking_uri(), experiment_name()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3.x refuses its file store unless opted in; it is the store osteo documents
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        with _mlflow_errors(uri):
            client = MlflowClient(uri)
            exp_id = _experiment_id(client, name)
            path = str(run.path.resolve())
            # looked up by a hash: MLflow's filter strings have no escapes for a path's quotes
            key = hashlib.sha256(path.encode()).hexdigest()[:32]
            found = client.search_runs([exp_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
            params = {k: str(v) for k, v in dotted(recipe.to_dict()).items()}
            if found:
                run_id = found[0].info.run_id
                # MLflow params are write-once: a resumed run given more epochs notes the new values as tags
                old = found[0].data.params
                new = {k: v for k, v in params.items() if k not in old}
                for k, v in params.items():
                    if k in old and old[k] != v:
                        client.set_tag(run_id, f"osteo.resumed.{k}", v)
            else:
                run_id = client.create_run(exp_id, run_name=f"{run.model}/{run.name}",
                                           tags={RUN_TAG: path, KEY_TAG: key,
                                                 # the backbone: a fold's folder is its cross-validation's
                                                 "osteo.model": recipe.model.backbone}).info.run_id
                new = params
            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params
                client.log_batch(run_id, params=items[i : i + 100])
        return cls(client, uri, run_id, name)

    def log_epoch(self, epoch: int, logs: dict | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: _number(v) for k, v in (logs or {}).items()}
        metrics = [Metric(k, v, now, epoch + 1) for k, v in values.items() if v is not None]
        with _mlflow_errors(self.uri):
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, run: RunDir) -> None:
        """Final metrics and artifacts; the MLflow run ends FINISHED."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        recorded = run.read_metrics()
        metrics = [Metric(k, v, now, 0) for k, v in final_metrics(recorded).items()]
        tags = [RunTag(k, v) for k, v in final_tags(recorded).items()]  # what the images behind them chose
        files = (run.recipe_path, run.env_path, run.metrics_path, run.history_path,
                 run.model_card_path, run.calibration_path)
        with _mlflow_errors(self.uri):
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, "FINISHED")

    def to_json(self) -> dict:
        return {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another trial of the study created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------- env.json


def _record(run: RunDir, tensorboard: str | None, mlflow_run: _MlflowRun | None) -> None:
    """env.json's ``tracking``: where the run's curves are, or why they are not."""
    env = run.read_env()
    env["tracking"] = {
        "tensorboard": tensorboard or str(run.tensorboard_path),
        "mlflow": mlflow_run.to_json() if mlflow_run else "off: train.mlflow is false and $MLFLOW_TRACKING_URI is unset",
    }
    run.write_env(env)


def log_report(folder: Path, run_name: str) -> str:
    """Log a report folder (a study's page, CSVs, plots, study.json) as the artifacts of one MLflow
    run named ``run_name`` in the current experiment; return its run id."""
    uri = tracking_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    with _mlflow_errors(uri):
        client = MlflowClient(uri)
        run = client.create_run(_experiment_id(client, experiment_name()), run_name=run_name)
        client.log_artifacts(run.info.run_id, str(folder), "report")
        client.set_terminated(run.info.run_id)
    return run.info.run_id
