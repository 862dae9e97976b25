import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import keras
import numpy as np
import pytest

from osteo import CLASSES
from osteo.device import Device
from osteo.device import plan as device_plan
from osteo.errors import OsteoError
from osteo.predict import load_best
from osteo.registry import CpuDecision, get_backbone, list_backbones
from osteo.runs import PREDICTION_COLUMNS, RunDir
from osteo.trainer import Trainer

RUN_FILES = {"recipe.json", "env.json", "audit.json", "split.csv", "history.csv", "best.weights.h5",
             "predictions.csv", "metrics.json"}


def _history(run):
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_phase_run_writes_a_complete_run_directory(phantom_dir, tmp_path, tiny_recipe):
    run = Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=2, fine_tune_epochs=1)).run()
    assert run.parent == tmp_path / "tiny"
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    assert not (run / ".backup").exists()
    history = _history(run)
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert [int(h["phase"]) for h in history] == [1, 1, 2]
    assert all(float(h["images_per_sec"]) > 0 for h in history)
    with open(run / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert tuple(preds[0]) == (*PREDICTION_COLUMNS, "probabilities")
    assert {p["probabilities"] for p in preds} == {"uncalibrated"}  # as trained: the temperature is not applied
    # a run written before the column existed is read as it was: the same labels and probabilities
    y, p, _ = RunDir(run).read_predictions()
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, PREDICTION_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(preds)
    y_old, p_old, rows_old = RunDir(run).read_predictions()
    assert np.array_equal(y_old, y) and np.array_equal(p_old, p) and "probabilities" not in rows_old[0]
    with open(run / "split.csv", newline="") as f:
        val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    assert [p["path"] for p in preds] == [r["path"] for r in val]
    env = json.loads((run / "env.json").read_text())
    for key in ("python", "keras", "numpy", "backend", "device", "precision", "git_commit", "seed", "command"):
        assert key in env
    assert env["precision"] == "float32"  # tiny is not measured faster in bfloat16
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(metrics["val"])
    # the checkpoint says the input scaling it was trained under: a run started from it scales alike
    import h5py

    from osteo.h5files import SCALING_ATTR

    with h5py.File(run / "best.weights.h5", "r") as f:
        assert f.attrs[SCALING_ATTR] == json.loads((run / "recipe.json").read_text())["model"]["preprocessing"] == "tf"
    # a second run never shares the first one's directory or checkpoint
    run2 = Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=1)).run()
    assert run2 != run and (run2 / "best.weights.h5").exists()


def test_restored_weights_are_the_best_epochs(phantom_dir, tmp_path, tiny_recipe):
    run = Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=4, lr=3e-3)).run()
    history = _history(run)
    scores = [float(h["val_macro_f1"]) for h in history]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == int(np.argmax(scores)) + 1
    assert metrics["best_value"] == pytest.approx(max(scores))
    precision = json.loads((run / "env.json").read_text())["precision"]  # and says what it was measured on
    assert metrics["best_value_measured"] == (f"during training, in {precision}; the splits' numbers below are of "
                                              "the checkpoint's float32 outputs")
    # the predictions were made with the checkpoint's weights
    model = load_best(run)
    from osteo.data.module import DataModule
    from osteo.data.split import read_split
    from osteo.recipe import DataConfig

    dm = DataModule(DataConfig(dir=str(phantom_dir), image_size=32)).setup(split=read_split(run / "split.csv"))
    images, labels = dm.eval_arrays("val")
    y, probs, _ = RunDir(run).read_predictions("val")
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(model.predict(images, verbose=0), probs, atol=2e-6)


CPU = {c: Device(kind="cpu", name="test", cpu_class=c) for c in ("avx512_bf16", "avx2")}
BOTH = ("tensorflow", "torch")


def test_precision_and_jit_choices():
    from osteo.device import choose_jit, choose_precision

    intel = CPU["avx512_bf16"]
    prec = lambda name, dev, backend, req="auto": choose_precision(req, get_backbone(name), dev, backend)[0]
    assert prec("vgg16", intel, "tensorflow") == "mixed_bfloat16"
    assert prec("vgg16", intel, "torch") == "mixed_bfloat16"
    assert prec("densenet169", intel, "tensorflow") == "mixed_bfloat16"  # Keras' layers: 6.89 vs 5.10 img/s, 224 px
    assert prec("densenet169", intel, "torch") == "mixed_bfloat16"  # the timm engine: 12.2 vs 6.5 img/s
    assert prec("convnext_tiny", intel, "tensorflow") == "float32"  # no gain on TF
    assert prec("convnext_tiny", intel, "torch") == "mixed_bfloat16"
    assert prec("vgg16", CPU["avx2"], "tensorflow") == "float32"  # no bfloat16 instructions
    gpu = Device(kind="gpu", name="H200", cpu_class="avx2", gpu_bf16=True, gpu_backends=("torch",))
    assert prec("densenet169", gpu, "torch") == "mixed_bfloat16"
    assert prec("densenet169", replace(gpu, gpu_bf16=False), "torch") == "mixed_float16"
    assert prec("vgg16", gpu, "torch", "float32") == "float32"
    # TensorFlow here cannot see that GPU: the CPU's rules apply to it
    assert prec("vgg16", gpu, "tensorflow") == "float32"
    jit = lambda name, dev, backend: choose_jit("auto", get_backbone(name), dev, backend)[0]
    assert jit("convnext_tiny", intel, "tensorflow") is True
    assert jit("densenet169", intel, "tensorflow") is False
    assert jit("convnext_tiny", gpu, "torch") is False  # torch: no torch.compile by default
    # the timm engine compiles where the run pays for the compile time
    tjit = lambda name, dev, n: choose_jit("auto", get_backbone(name), dev, "torch", "timm", n)[0]
    assert tjit("convnext_tiny", gpu, 1_000_000) is True and tjit("convnext_tiny", gpu, 50_000) is False
    assert tjit("convnext_tiny", intel, 10**9) is False and tjit("densenet169", gpu, 10**9) is False
    assert jit("vgg16", replace(gpu, gpu_backends=BOTH), "tensorflow") is True  # XLA on a TF GPU
    with pytest.raises(OsteoError, match="auto, on, off"):
        choose_jit("sometimes", get_backbone("vgg16"), intel, "tensorflow")


def test_backend_auto_follows_the_measurements_and_never_idles_a_gpu():
    from osteo.device import choose_backend, cpu_class

    intel, amd = CPU["avx512_bf16"], CPU["avx2"]
    assert cpu_class("fpu avx2 avx512f avx512_bf16") == "avx512_bf16" and cpu_class("fpu avx2") == "avx2"
    pick = lambda name, dev, avail=BOTH, req="auto": choose_backend(req, get_backbone(name), dev, avail)[0]
    for name in ("vgg16", "vgg19", "densenet169", "convnext_tiny"):  # the timm engine, on both classes
        assert pick(name, intel) == pick(name, amd) == "torch"
        # the reason quotes the measurement for that backbone and class, not a range
        assert get_backbone(name).cpu["avx2"].why in choose_backend("auto", get_backbone(name), amd, BOTH)[1]
    spec = replace(get_backbone("densenet169"), cpu={"avx2": CpuDecision("tensorflow", why="measured")})
    assert choose_backend("auto", spec, amd, BOTH) == ("tensorflow", "tensorflow for densenet169 on avx2 CPUs: measured")
    assert pick("tiny", intel) == "tensorflow"  # no decision recorded: TensorFlow
    assert pick("convnext_tiny", intel, req="tensorflow") == "tensorflow"
    assert pick("convnext_tiny", intel, avail=("tensorflow",)) == "tensorflow"  # torch not installed
    # a GPU: the backend that was built to use it, whatever the CPU tables say
    gpu = Device(kind="gpu", name="H200", cpu_class="avx512_bf16", gpu_bf16=True, gpu_backends=("torch",))
    assert pick("vgg16", gpu) == "torch"
    tf_gpu = replace(gpu, gpu_backends=("tensorflow",))
    assert pick("convnext_tiny", tf_gpu) == "tensorflow"
    backend, why = choose_backend("auto", get_backbone("convnext_tiny"), replace(gpu, gpu_backends=()), BOTH)
    assert backend == "torch" and "no installed backend was built for it" in why  # the CPU table, said so
    plan = device_plan(get_backbone("vgg16"), gpu, available=BOTH)
    assert (plan.backend, plan.runs_on, plan.precision) == ("torch", "gpu", "mixed_bfloat16")
    assert set(plan.to_json()["why"]) == {"backend", "impl", "precision", "jit_compile", "layout"}
    if importlib.util.find_spec("timm"):  # the engine: timm's module on PyTorch, Keras' layers on TensorFlow
        assert plan.impl == "timm" and plan.why["impl"] == get_backbone("vgg16").engine_why["gpu"]
    assert device_plan(get_backbone("vgg16"), tf_gpu, available=BOTH).impl == "keras"


def test_the_timm_engine_runs_channels_first_only_where_that_was_measured_faster():
    """VGG on the AVX2 class: timm's channels-first loop beat its channels-last one from 128 px up, so
    the timm engine runs channels-first there and says why; channels-last on smaller images (no faster
    channels-first at 64 px), everywhere else, and on GPUs."""
    from osteo.device import choose_layout

    intel, amd = CPU["avx512_bf16"], CPU["avx2"]
    gpu = Device(kind="gpu", name="H200", cpu_class="avx2", gpu_bf16=True, gpu_backends=("torch",))
    for name in ("vgg16", "vgg19"):
        spec = get_backbone(name)
        first, why = choose_layout(spec, amd, "torch", "timm")
        assert first is False and why == f"channels-first for {name} on avx2 CPUs: {spec.cpu['avx2'].layout_why}"
        assert spec.cpu["avx2"].layout_why and not spec.cpu["avx512_bf16"].layout_why
        assert choose_layout(spec, intel, "torch", "timm")[0] is True
        assert choose_layout(spec, gpu, "torch", "timm")[0] is True
        assert choose_layout(spec, amd, "tensorflow", "keras")[0] is True  # Keras' layers: NHWC
        small = spec.cpu["avx2"].channels_first_from
        assert small == 128 and spec.cpu["avx2"].small_layout_why and not spec.cpu["avx512_bf16"].channels_first_from
        for size, want in ((224, False), (small, False), (small - 1, True), (64, True), (None, False)):
            assert choose_layout(spec, amd, "torch", "timm", size)[0] is want, (name, size)
        assert choose_layout(spec, amd, "torch", "timm", 64)[1] == (
            f"channels-last for {name} at 64 px on avx2 CPUs (channels-first from 128 px): "
            f"{spec.cpu['avx2'].small_layout_why}")
        assert choose_layout(spec, intel, "torch", "timm", 224)[0] is True
    for size in (32, 64, 224):
        assert choose_layout(get_backbone("densenet169"), amd, "torch", "timm", size)[0] is True
    plan = device_plan(get_backbone("vgg16"), amd, available=BOTH, image_size=224)
    small = device_plan(get_backbone("vgg16"), amd, available=BOTH, image_size=64)
    if plan.impl == "timm":
        assert plan.channels_last is False and plan.to_json()["channels_last"] is False
        assert plan.why["layout"].startswith("channels-first for vgg16")
        assert small.channels_last is True and small.why["layout"].startswith("channels-last for vgg16 at 64 px")


def test_osteo_train_plans_the_memory_format_for_the_size_it_trains_at(monkeypatch):
    """osteo train's plan (session.plan_device, which the Trainer then uses) is asked with the image
    size the run will train at: the recipe's, or the backbone's default where the recipe leaves it 0."""
    from osteo import device, session
    from osteo.recipe import study_protocol

    asked, real = [], device.plan
    monkeypatch.setattr(device, "plan", lambda *a, **k: asked.append(k.get("image_size")) or real(*a, **k))
    for backbone, size, want in (("vgg16", 64, 64), ("vgg16", 0, 224), ("tiny", 0, 64)):
        recipe = study_protocol(backbone)
        recipe.data.image_size = size
        session.plan_device(None, recipe, say=lambda *a, **k: None)
        assert asked[-1] == want, (backbone, size)


def test_backend_auto_for_keras_layers_follows_their_own_measurements():
    """model.impl=keras (or a Keras weights file of a backbone whose weights do not port into timm's
    module) means Keras' layers: backend auto picks the backend those were measured faster on, and
    says so; before, it picked PyTorch for the timm engine's measurement and ran Keras' layers there
    (DenseNet169: 2.2x slower at 64 px). A Keras weights file of the study's four trains on the timm
    engine, as auto does without one."""
    intel, amd = CPU["avx512_bf16"], CPU["avx2"]
    for name, dev, weights, impl, want in (("densenet169", intel, "w.weights.h5", "keras", "tensorflow"),
                                           ("vgg16", intel, "w.h5", "keras", "tensorflow"),
                                           ("densenet169", amd, "w.h5", "keras", "torch"),
                                           ("convnext_tiny", intel, "none", "keras", "torch"),
                                           ("convnext_tiny", amd, "w.h5", "keras", "torch"),
                                           ("vgg16", amd, "w.weights.h5", "keras", "torch")):
        plan = device_plan(get_backbone(name), dev, available=BOTH, weights=weights, impl=impl)
        assert (plan.backend, plan.impl) == (want, "keras"), (name, dev.cpu_class)
        assert "Keras layers" in plan.why["backend"]
        assert get_backbone(name).cpu_decision(dev.cpu_class).keras_why in plan.why["backend"]
        if (name, dev) == ("densenet169", amd) and importlib.util.find_spec("timm"):  # a slow path, asked for
            (said,) = plan.warnings
            assert "2.4x slower" in said and "model.impl=timm" in said
        else:
            assert not plan.warnings
        # and in the precision they were measured in: bfloat16 on AVX-512 (DenseNet169 on TensorFlow: 6.89
        # img/s against 5.10 in float32 at 224 px), float32 where the CPU has no bfloat16
        assert plan.precision == ("mixed_bfloat16" if dev is intel else "float32"), (name, plan.why["precision"])
    if importlib.util.find_spec("timm"):
        for name in ("vgg16", "vgg19", "densenet169", "convnext_tiny"):
            for dev in (intel, amd):
                own = device_plan(get_backbone(name), dev, available=BOTH)
                plan = device_plan(get_backbone(name), dev, available=BOTH, weights="w.weights.h5")
                assert (plan.backend, plan.impl, plan.precision) == (own.backend, "timm", own.precision)
                assert plan.why["impl"].endswith("the Keras weights file is ported into timm's module "
                                                 "(osteo.backbones.port)") and not plan.warnings
    # a timm weights file, or none: the timm engine's backend as before
    assert device_plan(get_backbone("densenet169"), intel, available=BOTH, weights="w.safetensors").backend == "torch"
    # where TensorFlow is the CPU's choice (tiny: not measured), a PyTorch state dict still goes to PyTorch, the only
    # backend whose engine reads it (it picked TensorFlow, then refused the file)
    plan = device_plan(get_backbone("tiny"), intel, available=BOTH, weights="w.pth")
    assert plan.backend == "torch" and "the weights file is a PyTorch state dict" in plan.why["backend"]
    if importlib.util.find_spec("timm"):
        assert plan.impl == "timm"
    assert device_plan(get_backbone("tiny"), intel, available=BOTH).backend == "tensorflow"
    # a GPU only TensorFlow was built for: the file still goes to PyTorch, on the CPU, and says so
    tf_only = Device(kind="gpu", name="H200", cpu_class="avx512_bf16", gpu_bf16=True, gpu_backends=("tensorflow",))
    plan = device_plan(get_backbone("vgg16"), tf_only, available=BOTH, weights="w.safetensors")
    assert plan.backend == "torch" and plan.why["backend"].startswith("torch, on the CPU: the weights file is a PyTorch")
    # the backend named by the user stands; where it is far slower for these layers, one warning says so
    no_port = replace(get_backbone("densenet169"), keras_port="")  # as if its weights did not port
    plan = device_plan(no_port, intel, backend="torch", available=BOTH, weights="w.h5")
    assert (plan.backend, plan.impl) == ("torch", "keras")
    assert len(plan.warnings) == 1 and "backend=tensorflow, model.impl=keras" in plan.warnings[0]
    # a GPU, where Keras' layers were measured far slower than the timm engine: said, with the way out
    gpu = Device(kind="gpu", name="H200", cpu_class="avx512_bf16", gpu_bf16=True, gpu_backends=("torch",))
    plan = device_plan(no_port, gpu, available=BOTH, weights="w.weights.h5")
    assert (plan.backend, plan.impl) == ("torch", "keras") and len(plan.warnings) == 1
    assert "5.0x slower" in plan.warnings[0] and "timm's weights of densenet169" in plan.warnings[0]
    if importlib.util.find_spec("timm"):  # DenseNet169's own Keras file: the timm engine, nothing to say
        plan = device_plan(get_backbone("densenet169"), gpu, available=BOTH, weights="w.weights.h5")
        assert (plan.backend, plan.impl, plan.warnings) == ("torch", "timm", [])


def test_xla_is_off_where_the_augmentation_cannot_be_compiled_and_env_json_says_so(phantom_dir, tmp_path,
                                                                                     tiny_recipe, caplog):
    """Keras' random zoom and shear (the default augmentation) cannot be compiled by XLA: Keras
    then trains without it, and env.json said jit_compile true. The plan now says what runs."""
    from osteo.classifier import Classifier, xla_blockers
    from osteo.recipe import AugmentConfig

    # osteo's list agrees with what Keras decides at compile
    for augment, blocked in ((AugmentConfig(zoom=0.2, shear=0.2), ["RandomShear", "RandomZoom"]),
                             (AugmentConfig(zoom=0.0, shear=0.0), [])):
        model = Classifier("tiny", image_size=32, weights="none", augment=augment).build()
        assert xla_blockers(model) == blocked
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
        assert model.jit_compile is not bool(blocked)
    r = tiny_recipe(phantom_dir, tmp_path, epochs=1, steps_per_epoch=1)
    r.model.augment.zoom, r.model.augment.shear, r.train.jit_compile = 0.2, 0.2, "on"
    with caplog.at_level("WARNING", logger="osteo"):
        trainer = Trainer(r).setup()
    env = trainer.run_dir.read_env()
    assert env["jit_compile"] is False and env["device"]["jit_compile"] is False and trainer.keras_jit is False
    assert env["device"]["why"]["jit_compile"] == ("XLA cannot compile RandomShear, RandomZoom (the augmentation "
                                                   "inside the model), so training runs without it")
    assert [m for m in caplog.messages if "XLA" in m] == [
        "train.jit_compile=on: XLA cannot compile RandomShear, RandomZoom (the augmentation inside the model); "
        "training runs without it (set the model.augment factors of those layers to 0 to compile)"]


def test_env_json_records_each_choice_and_why(phantom_dir, tmp_path, tiny_recipe, monkeypatch):
    from osteo import device
    from osteo.classifier import Classifier
    from osteo.data.module import DataModule

    # the order of the memory handling, recorded through the real functions
    calls = []
    keep, release, setup, build = (device.keep_freed_memory, device.release_freed_memory, DataModule.setup,
                                   Classifier.build)
    monkeypatch.setattr(device, "keep_freed_memory", lambda: calls.append("keep") or keep())
    monkeypatch.setattr(device, "release_freed_memory", lambda kept: calls.append(("release", kept)) or release(kept))
    monkeypatch.setattr(DataModule, "setup", lambda self, **kw: calls.append("audit") or setup(self, **kw))
    monkeypatch.setattr(Classifier, "build", lambda self: calls.append("model") or build(self))
    run = Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=1, steps_per_epoch=1)).setup().run_dir
    env = run.read_env()
    assert env["backend"] == keras.backend.backend()
    assert env["device"]["runs_on"] in ("cpu", "gpu")
    assert all(env["device"]["why"][k] for k in ("backend", "precision", "jit_compile"))
    # glibc's malloc keeps what a step frees, unless the user chose malloc's settings (the CI's are glibc's)
    assert env["allocator"].startswith(("freed memory kept", "left as it was")), env["allocator"]
    # kept from the audit on (its buffers are not faulted in again), what it left free handed back before the model
    assert calls == ["keep", "audit", ("release", env["allocator"]), "model"], calls


def test_what_training_left_free_goes_back_before_the_predictions_and_reports(phantom_dir, tmp_path, tiny_recipe,
                                                                            monkeypatch):
    """The process's peak is the training's: the reports' imports do not come on top of the
    memory the steps freed (benchmarks/README.md, "Keras' optional imports")."""
    from osteo import device, evaluate

    calls = []
    release, fit, predict, report = (device.release_freed_memory, keras.Model.fit, keras.Model.predict,
                                     evaluate.evaluate_run)
    monkeypatch.setattr(device, "release_freed_memory", lambda kept: calls.append("release") or release(kept))
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **kw: calls.append("fit") or fit(self, *a, **kw))
    monkeypatch.setattr(keras.Model, "predict",
                        lambda self, *a, **kw: calls.append("predict") or predict(self, *a, **kw))
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **kw: calls.append("report") or report(*a, **kw))
    Trainer(tiny_recipe(phantom_dir, tmp_path, epochs=2, steps_per_epoch=1)).run()
    last_fit = max(i for i, c in enumerate(calls) if c == "fit")
    assert calls[:1] == ["release"] and "release" in calls[last_fit:], calls  # after the audit; after training
    assert calls[last_fit:].index("release") < calls[last_fit:].index("predict") < calls[last_fit:].index("report")


@pytest.mark.parametrize("backbone", [pytest.param(n, marks=pytest.mark.slow)
                                      if n in ("densenet169", "efficientnetv2_b0", "resnet50", "mobilenetv3_large")
                                      else pytest.param(n, marks=pytest.mark.heavy) if n == "convnext_tiny"
                                      else n
                                      for n in list_backbones()])
def test_every_registered_backbone_writes_a_run(backbone, phantom_dir, tmp_path, tiny_recipe):
    r = tiny_recipe(phantom_dir, tmp_path, backbone=backbone, epochs=1, steps_per_epoch=1)
    run = Trainer(r).run()
    assert {p.name for p in run.iterdir()} >= RUN_FILES
    y, probs, _ = RunDir(run).read_predictions("val")
    assert probs.shape == (len(y), len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_tiny_model_trains_on_the_pytorch_backend(phantom_dir, tmp_path):
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import keras, numpy as np
        assert keras.backend.backend() == "torch"
        from osteo.classifier import Classifier, SparseCrossEntropy, default_metrics
        from osteo.data.module import DataModule
        from osteo.recipe import DataConfig
        model = Classifier("tiny", image_size=32, weights="none", seed=0, impl="keras").build()  # Keras layers on torch
        model.compile(keras.optimizers.Adam(1e-3), SparseCrossEntropy(), metrics=default_metrics())
        dm = DataModule(DataConfig(dir={str(phantom_dir)!r}, image_size=32)).setup()
        before = [np.array(w) for w in model.trainable_weights]
        h = model.fit(dm.train_dataset(16), steps_per_epoch=1, epochs=1, verbose=0)
        after = [np.array(w) for w in model.trainable_weights]
        assert np.isfinite(h.history["loss"][0])
        assert any(np.abs(a - b).max() > 0 for a, b in zip(before, after))
        probs = model.predict(dm.eval_dataset("val", 16), verbose=0)
        assert probs.shape == (dm.count("val"), 3)
        print("torch ok", type(model.trainable_weights[0].value).__module__)
    """)
    env = {**os.environ, "KERAS_BACKEND": "torch", "OSTEO_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch ok torch" in proc.stdout


def test_phase_one_on_cached_features_trains_the_full_models_head(phantom_dir, tmp_path, tiny_recipe):
    from osteo.data.module import DataModule
    from osteo.data.split import read_split
    from osteo.recipe import AugmentConfig, DataConfig
    from osteo.trainer import use_feature_cache

    assert not use_feature_cache("auto", AugmentConfig())  # the study's augmentation: images every epoch
    off = AugmentConfig(flip=False, zoom=0.0, shear=0.0)
    assert use_feature_cache("auto", off) and not use_feature_cache("off", off)
    r = tiny_recipe(phantom_dir, tmp_path, epochs=3, lr=3e-3)
    r.model.augment = off
    run = Trainer(r).run()
    history = _history(run)
    assert [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert len({h["val_loss"] for h in history}) == 3  # the head learned from epoch to epoch
    # the checkpoint holds the whole image model's weights, and it made the predictions
    model = load_best(run)
    assert model.input_shape == (None, 32, 32, 1)
    dm = DataModule(DataConfig(dir=str(phantom_dir), image_size=32)).setup(
        split=read_split(run / "split.csv"))
    images, _ = dm.eval_arrays("val")
    _, probs, _ = RunDir(run).read_predictions("val")
    np.testing.assert_allclose(model.predict(images, verbose=0), probs, atol=2e-6)


def test_probe_reads_nvidia_smi_and_the_backends_cuda_builds(tmp_path, monkeypatch):
    from osteo import device

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0'\n")
    smi.chmod(0o755)
    builds = {"torch": "cuda: Optional[str] = '12.8'\n", "tensorflow": "build_info = {'is_cuda_build': False}\n"}
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
        m.setattr(device, "_package_file", lambda package, relative: builds[package])
        d = device.probe()
        assert (d.kind, d.name, d.gpu_bf16, d.gpu_backends) == ("gpu", "NVIDIA H200", True, ("torch",))
        assert d.on("torch") == "gpu" and d.on("tensorflow") == "cpu"
        smi.write_text("#!/bin/sh\necho 'Tesla V100-SXM2-16GB, 7.0'\n")
        assert device.probe().gpu_bf16 is False  # before Ampere: float16
        m.setenv("PATH", str(tmp_path / "nowhere"))
        assert device.probe().kind == "cpu"
    # this machine's own packages: TensorFlow's CPU build, and the torch build make install chose
    import importlib.metadata as md

    torch_cuda = importlib.util.find_spec("torch") is not None and "+cpu" not in md.version("torch")
    assert device.gpu_builds() == (("torch",) if torch_cuda else ())


def test_a_requested_slow_path_is_one_warning_with_its_measurement():
    """TensorFlow's ConvNeXtTiny on the AVX-512 class was measured 6.5x slower than auto: asking for
    it warns with that measurement and the faster choice; auto and other requests do not."""
    cpu = CPU["avx512_bf16"]
    spec = get_backbone("convnext_tiny")
    slow = device_plan(spec, cpu, backend="tensorflow", available=BOTH)
    assert len(slow.warnings) == 1 and "6.5x slower" in slow.warnings[0] and "backend=torch" in slow.warnings[0]
    assert slow.to_json()["warnings"] == slow.warnings  # env.json records it
    assert device_plan(spec, cpu, available=BOTH).warnings == []
    # on AVX2, measured 6.4x slower at 64 px: its own measurement
    (said,) = device_plan(spec, CPU["avx2"], backend="tensorflow", available=BOTH).warnings
    assert "6.4x slower" in said and "(64 px, float32" in said and "on avx2" in said and "backend=torch" in said
    # VGG's Keras layers on TensorFlow: 1.1-1.7x slower on either class, not a slow path
    for cls in ("avx512_bf16", "avx2"):
        assert device_plan(get_backbone("vgg16"), CPU[cls], backend="tensorflow", available=BOTH).warnings == []


def test_keras_layers_for_densenet_on_avx2_warn_with_that_class_measurement():
    """DenseNet169's Keras layers on the AVX2 class: 2.4x slower than the timm engine on PyTorch
    and 3.5x on TensorFlow (64 px); asked for, each warns with its own measurement."""
    amd, spec = CPU["avx2"], get_backbone("densenet169")
    (said,) = device_plan(spec, amd, impl="keras", available=BOTH).warnings
    assert "on PyTorch" in said and "2.4x slower" in said and "model.impl=timm" in said
    (said,) = device_plan(spec, amd, impl="keras", backend="tensorflow", available=BOTH).warnings
    assert "on TensorFlow" in said and "3.5x slower" in said
    # a Keras weights file only Keras' layers load (as if DenseNet169's did not port): the warning says which
    # weights would not be
    no_port = replace(spec, keras_port="")
    (said,) = device_plan(no_port, amd, available=BOTH, weights="w.weights.h5").warnings
    assert "2.4x slower" in said and "timm's weights of densenet169" in said
    assert device_plan(spec, amd, available=BOTH, weights="w.weights.h5").warnings == []
    assert device_plan(spec, amd, available=BOTH).warnings == []


def test_bfloat16_on_a_cpu_without_its_instructions_warns_where_it_was_measured():
    """bfloat16 on the AVX2 class: the timm engine trained VGG16 26x, VGG19 27x, DenseNet169 6.8x
    and ConvNeXtTiny 19x slower than in float32 (64 px). Asked for, it warns; auto does not ask."""
    amd = CPU["avx2"]
    plan = device_plan(get_backbone("vgg16"), amd, precision="mixed_bfloat16", available=BOTH)
    if plan.impl != "timm":
        pytest.skip("timm is not installed: the measurement is the timm engine's")
    (said,) = plan.warnings
    assert "26x slower" in said and "without bfloat16 instructions" in said and "train.precision=float32" in said
    for name, times in (("vgg19", "27x"), ("densenet169", "6.8x"), ("convnext_tiny", "19x")):
        (said,) = device_plan(get_backbone(name), amd, precision="mixed_bfloat16", available=BOTH).warnings
        assert f"{times} slower" in said
    assert device_plan(get_backbone("vgg16"), amd, available=BOTH).warnings == []  # auto: float32
    assert device_plan(get_backbone("vgg16"), CPU["avx512_bf16"], precision="mixed_bfloat16",
                       available=BOTH).warnings == []  # with the instructions: auto's own choice


def test_keras_layers_for_densenet_on_a_gpu_warn_with_the_h200_measurement():
    gpu = Device(kind="gpu", name="H200", cpu_class="avx512_bf16", gpu_bf16=True, gpu_backends=("torch",))
    slow = device_plan(get_backbone("densenet169"), gpu, impl="keras", available=BOTH)
    assert slow.runs_on == "gpu" and len(slow.warnings) == 1 and "5.0x slower" in slow.warnings[0]
    assert "model.impl=timm" in slow.warnings[0]
    assert device_plan(get_backbone("densenet169"), gpu, available=BOTH).warnings == []
