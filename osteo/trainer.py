"""The Trainer: a run directory, seeds, precision, callbacks, two phases, evaluation.

    phase 1: backbone frozen, head trained (the study)             train.epochs
    phase 2: backbone unfrozen (all or the top N blocks), BatchNorm  train.fine_tune_epochs
             frozen, lower learning rate, recompiled

Every run gets its own directory ``runs/<model>/<run-id>/`` with ``recipe.json``,
``env.json``, ``audit.json``, ``split.csv``, ``history.csv``, ``best.keras``,
``predictions.csv`` and ``metrics.json``: two runs never share a checkpoint. The best
weights (by ``train.monitor``, macro F1 by default, not plain accuracy, which rewards
majority-class guessing) are restored before the predictions are made.

Example:
    >>> from osteo.recipe import load_recipe
    >>> run_dir = Trainer(load_recipe("demo")).run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from osteo import speed
from osteo.callbacks import (
    BestCheckpoint,
    HistoryCSV,
    NonFiniteLoss,
    RichProgress,
    SeedState,
    monitor_mode,
)
from osteo.classifier import Classifier, SparseCrossEntropy, default_metrics
from osteo.errors import OsteoError
from osteo.files import read_json, write_json
from osteo.recipe import Recipe, recipe_from_dict
from osteo.runs import find_run, new_run_dir

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
MONITORS = ("val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss")


# --------------------------------------------------------------------------- device


def detect_device() -> dict:
    """What Keras will run on: kind (cpu/gpu), name, and bfloat16 support."""
    backend = keras.backend.backend()
    info = {"backend": backend, "kind": "cpu", "name": platform.processor() or platform.machine(),
            "cpu_bf16": speed.cpu_class() == "avx512_bf16", "gpu_bf16": False}
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            info.update(kind="gpu", name=details.get("device_name", "gpu"),
                        gpu_bf16=tuple(details.get("compute_capability", (0, 0))) >= (8, 0))
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            info.update(kind="gpu", name=torch.cuda.get_device_name(0),
                        gpu_bf16=torch.cuda.get_device_capability(0) >= (8, 0))
    return info


def choose_precision(requested: str, backbone: str, device: dict) -> str:
    """``auto``: mixed precision where it pays, never where it hurts.

    GPU: bfloat16 where the card has it (Ampere and later), else float16. CPU:
    bfloat16 only where the CPU has bfloat16 instructions *and* this backbone was
    measured faster with it on this backend (:mod:`osteo.speed`); float16 on CPU made
    every model slower, so never.
    """
    if requested not in PRECISIONS:
        raise OsteoError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device["kind"] == "gpu":
        return "mixed_bfloat16" if device["gpu_bf16"] else "mixed_float16"
    gains = device["backend"] in speed.decision(backbone, _cpu_class(device)).bf16
    return "mixed_bfloat16" if device["cpu_bf16"] and gains else "float32"


def choose_jit(requested: str, backbone: str, device: dict) -> bool:
    """``auto``: XLA on TensorFlow GPUs, and on CPU only where it was measured faster."""
    requested = str(requested).lower()
    if requested in ("on", "true", "1"):
        return True
    if requested in ("off", "false", "0"):
        return False
    if requested != "auto":
        raise OsteoError(f"unknown jit_compile {requested!r}; choose one of: auto, on, off")
    if device["backend"] != "tensorflow":
        return False
    return device["kind"] == "gpu" or speed.decision(backbone, _cpu_class(device)).xla


def use_feature_cache(requested: str, augment) -> bool:
    """``auto``: train phase 1 on cached features only when no augmentation is active."""
    requested = str(requested).lower()
    if requested not in ("auto", "on", "off"):
        raise OsteoError(f"unknown feature_cache {requested!r}; choose one of: auto, on, off")
    if requested != "auto":
        return requested == "on"
    active = (augment.flip or augment.randaugment or any(
        getattr(augment, k) > 0 for k in ("rotation", "zoom", "translation", "shear", "contrast", "brightness",
                                           "mixup", "cutmix")))
    return not active


def _cpu_class(device: dict) -> str:
    return "avx512_bf16" if device.get("cpu_bf16") else "avx2"


def set_determinism(seed: int, deterministic: bool) -> None:
    keras.utils.set_random_seed(seed)
    if not deterministic:
        return
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- runs


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__}
    for pkg in ("tensorflow", "tensorflow-cpu", "torch"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one recipe end to end and returns the run directory.

    Args:
        recipe: what to train.
        console: a rich Console for progress; None trains silently.
        resume: a run directory (or ``"latest"``) to continue from its last
            completed epoch; its own ``recipe.json`` and ``split.csv`` are used.
        command: the command line, recorded in ``env.json``.
    """

    def __init__(self, recipe: Recipe, *, console=None, resume: str | None = None, command: str = ""):
        self.recipe = recipe
        self.console = console
        self.resume = resume
        self.command = command or " ".join(sys.argv)

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    def run(self) -> Path:
        r = self.recipe
        split = None
        if self.resume:
            run_dir = find_run(self.resume, r.runs_dir, r.model.backbone)
            saved = read_json(run_dir / "recipe.json")
            saved.pop("resolved_image_size", None)  # written beside the recipe, not part of it
            r = self.recipe = recipe_from_dict(saved)
            from osteo.data.split import read_split

            split = read_split(run_dir / "split.csv")
            self._say(f"resuming {run_dir}")
        t = r.train
        if t.monitor not in MONITORS:
            raise OsteoError(f"unknown monitor {t.monitor!r}; choose one of: {', '.join(MONITORS)}")
        clf = Classifier(r.model.backbone, image_size=r.data.image_size or None, weights=r.model.weights,
                         head=r.model.head, augment=r.model.augment, seed=t.seed, freeze_bn=r.model.freeze_bn,
                         bn_momentum=r.model.bn_momentum)
        spec, size = clf.spec, clf.image_size
        device = detect_device()
        precision = choose_precision(t.precision, spec.name, device)
        jit = choose_jit(t.jit_compile, spec.name, device)
        from osteo.data.module import DataModule
        from osteo.data.split import write_split

        # data and model first: bad data or a wrong weights file fail before any file is written
        set_determinism(t.seed, t.deterministic)
        dm = DataModule(r.data, image_size=size, seed=t.seed, mixup=r.model.augment.mixup,
                        cutmix=r.model.augment.cutmix)
        dm.setup(split=split, progress=self._data_progress())
        keras.mixed_precision.set_dtype_policy(precision)
        try:
            model = clf.build()
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        if not self.resume:
            run_dir = new_run_dir(r.runs_dir, spec.name)
            self._say(f"run directory {run_dir}")

        if not self.resume:
            write_json(run_dir / "recipe.json", {**r.to_dict(), "resolved_image_size": size})
            write_split(run_dir / "split.csv", dm.split)
        write_json(run_dir / "audit.json", dm.audit.to_json())
        env = {
            **_versions(), "backend": device["backend"], "device": device, "precision": precision,
            "jit_compile": jit, "git_commit": _git_commit(), "seed": t.seed,
            "deterministic": t.deterministic, "command": self.command, "host": platform.node(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "skipped_files": len(dm.skipped), "skipped": dm.skipped[:100],
            "excluded_conflicts": len(dm.excluded),
            "n_train": dm.count("train"), "n_val": dm.count("val"), "n_test": dm.count("test"),
        }
        write_json(run_dir / "env.json", env)
        bs = r.data.batch_size
        steps = t.steps_per_epoch or dm.steps_per_epoch(bs)
        images_per_epoch = min(steps * bs, dm.count("train")) if not t.steps_per_epoch else steps * bs
        history_path = run_dir / "history.csv"
        old_rows = HistoryCSV.read(history_path) if self.resume and history_path.exists() else []
        history = HistoryCSV(history_path, images_per_epoch=images_per_epoch, rows=old_rows)
        best = BestCheckpoint(run_dir / "best.keras", monitor=t.monitor)
        self._restore_best(best, old_rows)
        nonfinite = NonFiniteLoss()
        class_weight = dm.class_weights() if t.class_weight == "balanced" else None
        if t.class_weight not in ("none", "balanced"):
            raise OsteoError(f"unknown class_weight {t.class_weight!r}; choose none or balanced")
        val_ds = dm.eval_dataset("val", bs)
        total_epochs = t.epochs + t.fine_tune_epochs
        backup_root = run_dir / ".backup"
        t0 = time.perf_counter()
        trained_seconds = 0.0

        backup_root.mkdir(parents=True, exist_ok=True)
        phases = [(1, 0, t.epochs, t.lr)] if t.epochs else []
        if t.fine_tune_epochs:
            phases.append((2, t.epochs, total_epochs, t.fine_tune_lr))
        for phase, first, last, lr in phases:
            done_marker = backup_root / f"phase{phase}.done"
            if done_marker.exists():
                continue
            if phase == 1:
                clf.freeze_backbone()
            else:
                clf.unfreeze_backbone(t.fine_tune_blocks)
                phase1_weights = backup_root / "phase1.weights.h5"
                if phase1_weights.exists() and not (backup_root / "phase2" / "latest.weights.h5").exists():
                    model.load_weights(phase1_weights)
            backup_dir = backup_root / f"phase{phase}"
            start = _backup_epoch(backup_dir, default=first)
            fit_model = model
            fit_kw = {"x": dm.train_dataset(bs, start_epoch=start, steps_per_epoch=steps), "steps_per_epoch": steps,
                      "validation_data": val_ds, "shuffle": False}
            if phase == 1 and use_feature_cache(t.feature_cache, r.model.augment):
                # the frozen backbone gives the same features every epoch: compute them once
                self._say("phase 1 on cached backbone features")
                fit_model, fit_kw = self._feature_fit(model, clf, dm, bs)
            fit_model.compile(
                optimizer=self._optimizer(lr, steps, last - first),
                loss=SparseCrossEntropy(t.label_smoothing),
                metrics=default_metrics(),
                jit_compile=jit,
            )
            best.target = model
            history.phase = phase
            # history and checkpoint before the backup: a kill between them re-runs the epoch
            # (its history row is replaced), never loses its row
            callbacks = [
                nonfinite, history, best,
                keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
                SeedState(backup_dir / "seed_state.npz", resume_epoch=start),
            ]
            if t.early_stopping:
                callbacks.append(keras.callbacks.EarlyStopping(monitor=t.monitor, mode=monitor_mode(t.monitor),
                                                               patience=t.early_stopping))
            if t.tensorboard and _has_tensorboard():
                callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                                             profile_batch=0))
            if self.console is not None:
                callbacks.append(RichProgress(self.console, total_epochs=total_epochs, steps_per_epoch=steps,
                                              batch_size=bs, title=spec.name))
            if start < last:
                ts = time.perf_counter()
                fit_model.fit(epochs=last, initial_epoch=first, class_weight=class_weight,
                              callbacks=callbacks, verbose=0, **fit_kw)
                trained_seconds += time.perf_counter() - ts
            if nonfinite.stopped_at:
                epoch, batch = nonfinite.stopped_at
                kept = f"best checkpoint kept at {best.path}" if best.path.exists() else "no checkpoint was saved"
                raise OsteoError(
                    f"training stopped at epoch {epoch}, batch {batch}: the loss is not finite (NaN or inf); "
                    f"{kept}; lower train.lr or use train.precision=float32"
                )
            if phase == 1 and t.fine_tune_epochs:
                # phase 2 starts from here if it is killed before its first backup
                model.save_weights(backup_root / "phase1.weights.h5")
            done_marker.parent.mkdir(parents=True, exist_ok=True)
            done_marker.touch()

        if not best.path.exists():
            raise OsteoError(f"no checkpoint was written for {run_dir}; train for at least one epoch")
        with warnings.catch_warnings():  # the best checkpoint carries no optimizer state, on purpose
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best.path)
        self._predict(model, dm, run_dir, bs, best, env, trained_seconds, clf,
                      time.perf_counter() - t0)
        shutil.rmtree(backup_root, ignore_errors=True)
        return run_dir

    # ------------------------------------------------------------------ helpers

    def _feature_fit(self, model, clf, dm, bs):
        """A head-only model on the backbone's pooled features, computed once.

        The head layers are the full model's own (shared), so training this model
        trains the full model's head; the best checkpoint still saves the full model.
        """
        name = "pool_norm" if clf.spec.pooled_norm else "pool"
        feature_layer = model.get_layer(name)
        extractor = keras.Model(model.inputs, feature_layer.output)
        inputs = keras.Input(tuple(feature_layer.output.shape[1:]), name="features")
        x = inputs
        for layer in model.layers[model.layers.index(feature_layer) + 1 :]:
            x = layer(x)
        head = keras.Model(inputs, x, name=f"{model.name}_head")
        feats = {s: np.asarray(extractor.predict(dm.eval_dataset(s, bs), verbose=0), dtype="float32")
                 for s in ("train", "val")}
        return head, {"x": feats["train"], "y": dm.labels("train"), "batch_size": bs,
                      "validation_data": (feats["val"], dm.labels("val")), "shuffle": True}

    def _data_progress(self):
        if self.console is None:
            return None
        t0 = time.perf_counter()

        def report(stage, k, n):
            if k == n:
                self._say(f"{stage}: {n} files ({time.perf_counter() - t0:.1f}s)")

        return report

    def _optimizer(self, lr: float, steps: int, epochs: int):
        t = self.recipe.train
        if t.schedule == "cosine":
            warmup = t.warmup_epochs * steps
            decay = max(1, epochs * steps - warmup)
            lr = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=0.0 if warmup else lr, decay_steps=decay,
                warmup_target=lr if warmup else None, warmup_steps=warmup,
            )
        elif t.schedule != "constant":
            raise OsteoError(f"unknown schedule {t.schedule!r}; choose constant or cosine")
        if t.optimizer == "adam":
            return keras.optimizers.Adam(learning_rate=lr)
        if t.optimizer == "adamw":
            return keras.optimizers.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
        raise OsteoError(f"unknown optimizer {t.optimizer!r}; choose adam or adamw")

    def _restore_best(self, best: BestCheckpoint, rows: list[dict]) -> None:
        for row in rows:
            value = row.get(best.monitor)
            if value not in (None, "") and best.improved(float(value)):
                best.best, best.best_epoch = float(value), int(row["epoch"]) - 1

    def _predict(self, model, dm, run_dir, bs, best, env, trained_seconds, clf, wall):
        from osteo.evaluate import evaluate_run, write_predictions

        rows = None
        for name in ("val", "test"):
            if dm.count(name):
                probs = model.predict(dm.eval_dataset(name, bs), verbose=0)
                rows = write_predictions(run_dir / "predictions.csv", dm.rows(name), probs, name, append_to=rows)
        write_json(run_dir / "metrics.json", {
            "model": clf.spec.name, "best_epoch": (best.best_epoch or 0) + 1, "monitor": best.monitor,
            "best_value": best.best,
        })
        history = HistoryCSV.read(run_dir / "history.csv")
        rates = [float(h["images_per_sec"]) for h in history if h.get("images_per_sec")]
        counts = clf.trainable_counts()
        env.update({
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "train_seconds": round(trained_seconds, 2), "wall_seconds": round(wall, 2),
            "train_images_per_sec": round(float(np.median(rates)), 2) if rates else None,
            "params": counts["total"], "epochs_run": len(history),
        })
        write_json(run_dir / "env.json", env)
        evaluate_run(run_dir, n_boot=self.recipe.train.bootstrap, seed=self.recipe.train.seed)


def _backup_epoch(backup_dir: Path, default: int) -> int:
    """The epoch BackupAndRestore will resume from (it stores the next epoch to run)."""
    meta = backup_dir / "training_metadata.json"
    if meta.exists():
        try:
            return int(json.loads(meta.read_text())["epoch"])
        except (ValueError, KeyError, OSError):
            return default
    return default


def _has_tensorboard() -> bool:
    """TensorBoard logs need the ``tensorboard`` package (not a dependency of TF 2.21)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
