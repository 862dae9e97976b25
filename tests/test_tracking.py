"""Tracking: TensorBoard event files per run, MLflow's file store, and their failures."""

import json
import sys

import pytest

from osteo import tracking
from osteo.errors import OsteoError
from osteo.runs import RunDir
from osteo.trainer import Trainer


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """No tracking settings from the developer's shell; the tests' own are undone after each."""
    for name in ("MLFLOW_TRACKING_URI", "OSTEO_MLFLOW_EXPERIMENT", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")  # recorded first, so that a value set by the code is removed too
        monkeypatch.delenv(name)


def _env(run) -> dict:
    return json.loads((run / "env.json").read_text())


def test_tensorboard_scalars_per_epoch(phantom_dir, tmp_path, tiny_recipe):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    run = Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=2, bootstrap=0, tensorboard=True)).run()
    history = RunDir(run).read_history()
    curves = {}
    for sub in ("train", "validation"):  # `tensorboard --logdir` shows them as two runs
        events = EventAccumulator(str(run / "tensorboard" / sub))
        events.Reload()
        curves[sub] = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors("epoch_loss")]
    assert [s for s, _ in curves["train"]] == [0, 1]
    assert [s for s, _ in curves["validation"]] == [0, 1]
    for (_, v), row in zip(curves["validation"], history):
        assert v == pytest.approx(float(row["val_loss"]), rel=1e-5)
    assert _env(run)["tracking"]["tensorboard"] == str(run / "tensorboard")


def test_tensorboard_off_says_why(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    run = RunDir(tmp_path)
    assert tracking.callbacks(tiny_recipe(tmp_path, tmp_path, tensorboard=True), run) == []
    why = run.read_env()["tracking"]["tensorboard"]
    assert why.startswith("off:") and "pip install tensorboard" in why
    assert tracking.tensorboard_off(tiny_recipe(tmp_path, tmp_path)) == "off: train.tensorboard is false"


def test_mlflow_file_store_holds_params_curves_metrics_and_artifacts(phantom_dir, tmp_path, tiny_recipe,
                                                                     monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # asks for MLflow without train.mlflow
    monkeypatch.setenv("OSTEO_MLFLOW_EXPERIMENT", "study-1")
    # two phases: one MLflow run across both, its steps the epochs of history.csv
    run = Trainer(tiny_recipe(phantom_dir, tmp_path / "runs", epochs=1, fine_tune_epochs=1, bootstrap=20)).run()

    client = MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("study-1").experiment_id])
    assert _env(run)["tracking"]["mlflow"] == {"tracking_uri": store, "experiment": "study-1",
                                               "run_id": logged.info.run_id}
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["osteo.run"] == str(run.resolve())
    params = logged.data.params
    assert params["train.epochs"] == "1" and params["model.backbone"] == "tiny" and params["data.image_size"] == "32"

    history = RunDir(run).read_history()
    for key in ("loss", "val_loss", "val_macro_f1"):
        curve = client.get_metric_history(logged.info.run_id, key)
        assert [m.step for m in curve] == [1, 2]  # one value per epoch
        assert [m.value for m in curve] == pytest.approx([float(r[key]) for r in history], rel=1e-5)

    val = json.loads((run / "metrics.json").read_text())["val"]
    final = logged.data.metrics
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
        assert final[f"final_val_{key}"] == pytest.approx(val[key])
    assert [final["final_val_macro_f1_ci_low"], final["final_val_macro_f1_ci_high"]] == pytest.approx(val["macro_f1_ci"])
    # and what those images chose: this run's validation chose its checkpoint, so its numbers are optimistic
    assert logged.data.tags["osteo.final_val"] == ("validation, which chose the checkpoint, temperature and "
                                                   "thresholds: optimistic")
    assert logged.data.tags["osteo.headline"] == "final_val_*" and "osteo.final_test" not in logged.data.tags

    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"recipe.json", "env.json", "metrics.json", "history.csv"} <= artifacts


def test_mlflow_asked_for_but_missing_fails_before_training(phantom_dir, tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(OsteoError) as e:
        Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=1, mlflow=True)).run()
    assert "\n" not in str(e.value) and "pip install 'osteo[track]'" in str(e.value)
    assert not list(tmp_path.glob("*/*/history.csv"))  # no epoch ran
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///nowhere")
    with pytest.raises(OsteoError, match=r"MLFLOW_TRACKING_URI is set"):
        tracking.check(tiny_recipe(phantom_dir, tmp_path))


def test_a_tracking_server_nothing_answers_at_fails_in_seconds_before_training(phantom_dir, tmp_path, tiny_recipe,
                                                                               monkeypatch):
    """MLflow's client retried http://127.0.0.1:1 for over 4 minutes, silently, before its error."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with pytest.raises(OsteoError, match=r"^MLflow at http://127\.0\.0\.1:1: cannot connect \(Connection refused\); "
                                         r"fix \$MLFLOW_TRACKING_URI"):
        Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=1)).run()
    assert not list(tmp_path.glob("*/*/history.csv"))


def test_mlflow_resumed_run_continues_its_mlflow_run(tmp_path, tiny_recipe, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    run = RunDir(tmp_path / "runs" / "tiny" / "it's-1")  # a quote in the path: found by its hash
    recipe = tiny_recipe(tmp_path, tmp_path / "runs", epochs=2)
    first = tracking._MlflowRun.open(recipe, run)
    recipe.train.epochs = 4  # resumed with more epochs
    again = tracking._MlflowRun.open(recipe, run)
    assert again.run_id == first.run_id
    logged = again.client.get_run(again.run_id).data
    assert logged.params["train.epochs"] == "2" and logged.tags["osteo.resumed.train.epochs"] == "4"
    # a store that cannot be written is one line
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "file").as_uri())
    with pytest.raises(OsteoError, match=r"^MLflow at file:") as e:
        tracking._MlflowRun.open(recipe, run)
    assert "\n" not in str(e.value)


def test_a_server_behind_the_environments_proxy_is_not_probed(monkeypatch):
    """MLflow's client reaches an http(s) server through $HTTP(S)_PROXY; a direct probe would refuse
    a server that only the proxy reaches."""
    from osteo.files import unreachable

    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert unreachable("127.0.0.1", 1, timeout=2, proxied="http")  # nothing listens on port 1
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert unreachable("127.0.0.1", 1, timeout=2, proxied="http") is None
    assert unreachable("127.0.0.1", 1, timeout=2)  # a Ray cluster: no proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert unreachable("127.0.0.1", 1, timeout=2, proxied="http")  # bypassed: probed
