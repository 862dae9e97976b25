"""The Trainer: orchestration only, in three stages (Lightning's habit).

    setup()          resolve the recipe, plan the device, audit + split + cache the data,
                     build the model, then (and only then) the run directory and its files
    fit_phase(p)     phase 1: backbone frozen, head trained (the study)     train.epochs
                     phase 2: backbone unfrozen (all or the top N blocks),  train.fine_tune_epochs
                              BatchNorm frozen, lower learning rate, recompiled
    finish()         restore the best checkpoint, predict, write metrics.json once

``run()`` does all three. Every run gets its own directory ``runs/<model>/<run-id>/``
(:class:`osteo.runs.RunDir` names its files): two runs never share a checkpoint. The
best weights (by ``train.monitor``, macro F1 by default, not plain accuracy, which
rewards majority-class guessing) are restored before the predictions are made.
Device, precision and compile choices come from :mod:`osteo.device`.

Example:
    >>> from osteo.recipe import load_recipe
    >>> run_dir = Trainer(load_recipe("demo")).run()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from osteo import device as devices
from osteo import killpoints, tracking
from osteo.callbacks import (
    BestCheckpoint,
    EarlyStop,
    HistoryCSV,
    NonFiniteLoss,
    RichProgress,
    TrainingState,
    callback_list,
    load_random_states,
    random_states,
)
from osteo.classifier import Classifier, Model, SparseCrossEntropy, default_metrics
from osteo.data.pipeline import CACHE_VERSION, decodes_otherwise, decoding_changes
from osteo.device import get_engine
from osteo.errors import OsteoError
from osteo.files import (
    atomic_path,
    file_sha256,
    save_weights,
    sha256_file,
    sweep_temporaries,
    write_bytes,
)
from osteo.h5files import scaling_attrs
from osteo.optim import make_optimizer
from osteo.recipe import BOOTSTRAP_SEED, AugmentConfig, Recipe, resolve
from osteo.registry import get_backbone, names_a_file
from osteo.runs import UNCALIBRATED, RunDir, create_run_dir, find_run, new_run_dir


def use_feature_cache(requested: str, augment: AugmentConfig) -> bool:
    """``auto``: train phase 1 on cached features only when no augmentation is active
    (``requested`` was checked by :func:`osteo.recipe.resolve`)."""
    return (requested == "on") if requested != "auto" else not augment.active()


@dataclass(frozen=True)
class Phase:
    number: int  # 1: backbone frozen; 2: fine-tuning
    first_epoch: int  # Keras' initial_epoch
    last_epoch: int  # Keras' epochs (exclusive end)
    lr: float


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
    for pkg in ("tensorflow", "tensorflow-cpu", "torch", "timm"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


class Trainer:
    """Runs one recipe end to end and returns the run directory.

    Args:
        recipe: what to train (resolved here if it is not yet).
        console: a rich Console for progress; None trains silently.
        resume: a run directory (or ``"latest"``) to continue from its last
            completed epoch; its own ``recipe.json`` and ``split.csv`` are used. A
            :class:`RunDir` (the CLI's, checked) trains with ``recipe`` as given, which
            the CLI took from the run (with more epochs, if asked).
        command: the command line, recorded in ``env.json``.
        plan: the device plan made before Keras was imported (the CLI's); by default
            it is made here for the backend Keras has loaded.
        at: the exact path of the new run directory (a cross-validation's fold);
            by default a new ``runs_dir/<model>/<timestamp>``.
    """

    def __init__(self, recipe: Recipe, *, console=None, resume: str | RunDir | None = None, command: str = "",
                 plan: devices.Plan | None = None, at: str | Path | None = None):
        self.recipe = recipe
        self.console = console
        self.resume = resume
        self.command = command or shlex.join(sys.argv)  # each word quoted: the card can name paths by name
        self.plan = plan
        self.at = at
        self.run_dir: RunDir | None = None
        self.phases: list[Phase] = []
        self._manifest: dict[str, dict] = {}  # a resumed run's images, as its audit read them
        self._decoded_as: str | None = CACHE_VERSION  # how a resumed run's images became pixels
        self._held = contextlib.ExitStack()  # the run directory's lock, from setup() to finish()

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    def run(self) -> Path:
        try:
            self.setup()
            for phase in self.phases:
                self.fit_phase(phase)
            return self.finish()
        except BaseException:
            self._discard_if_empty()
            raise
        finally:
            self._held.close()

    def _discard_if_empty(self) -> None:
        """A new run that failed before its first epoch ended holds nothing worth keeping."""
        run = self.run_dir
        if run is not None and not self.resume and run.path.exists() and not run.read_history():
            shutil.rmtree(run.path, ignore_errors=True)

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        """Everything before the first epoch; bad data or weights fail before any file is written."""
        split = self._open_run_for_resume()
        self._resolve_recipe()
        self._plan_and_build()
        self._setup_data(split)
        self._build_model()
        self._create_run_files()
        self._setup_callbacks_state()
        return self

    def _open_run_for_resume(self) -> list[dict] | None:
        """A resumed run: its directory (locked), its recipe and its split; None for a new run."""
        if not self.resume:
            return None
        if isinstance(self.resume, RunDir):
            self.run_dir = self.resume
        else:
            self.run_dir = find_run(self.resume, self.recipe.runs_dir, self.recipe.model.backbone)
            self.recipe = self.run_dir.read_recipe()
        self._held.enter_context(self.run_dir.locked())
        sweep_temporaries(self.run_dir.path)  # left by the killed process
        split = self.run_dir.read_split()
        self._manifest = self.run_dir.read_manifest()  # what its images were: checked after the audit
        self._decoded_as = self.run_dir.image_decoding()
        self._say(f"resuming {self.run_dir}")
        return split

    def _resolve_recipe(self) -> None:
        # fills model.impl; a resumed run is held to what it was trained under
        self.recipe = resolve(self.recipe, backend=keras.backend.backend(), trained=bool(self.resume))
        if self.resume and names_a_file(self.recipe.model.weights):  # the file it started from, not another of that name
            started = None
            with contextlib.suppress(OsteoError, OSError, ValueError, AttributeError):
                started = self.run_dir.read_env().get("weights_sha256")
            if started and file_sha256(self.recipe.model.weights) != started:
                raise OsteoError(f"weights file {self.recipe.model.weights} is not the one {self.run_dir} started from "
                                 "(its sha256 differs: replaced since?); put that file back, or start a new run")
        tracking.check(self.recipe)  # a tracker asked for but not installed fails before any work

    def _plan_and_build(self) -> None:
        """The device plan for the loaded backend and the recipe's engine, and the Classifier."""
        r, t = self.recipe, self.recipe.train
        if self.plan is None or not self.plan.made_for(r.model.impl):
            why = self.plan.why["backend"] if self.plan else "the backend Keras had loaded"
            self.plan = devices.plan(get_backbone(r.model.backbone), devices.probe(),
                                     backend=keras.backend.backend(), precision=t.precision,
                                     jit_compile=t.jit_compile, impl=r.model.impl, weights=r.model.weights,
                                     planned_images=devices.planned_images(r), image_size=r.data.image_size)
            self.plan.why["backend"] = why
        if self.resume:
            self._keep_the_runs_layout()
        # an engine may compile its backbone itself (timm: torch.compile); Keras' jit_compile is then off
        self.compile_backbone, self.keras_jit = get_engine(r.model.impl).jit(self.plan.jit_compile)
        self.clf = Classifier.from_recipe(r, compile_backbone=self.compile_backbone,
                                          channels_last=self.plan.channels_last)

    def _keep_the_runs_layout(self) -> None:
        """A resumed run trains in the memory format it started in (:func:`osteo.device.resumed_layout`)."""
        try:
            before = self.run_dir.read_env().get("device") or {}
        except (OsteoError, OSError, ValueError):
            return
        self.plan = devices.resumed_layout(self.plan, before)

    def _setup_data(self, split: list[dict] | None) -> None:
        """Seeds, then the DataModule: audit, split (a resumed run's own), cache."""
        from osteo.data.module import DataModule

        r, t = self.recipe, self.recipe.train
        devices.set_determinism(t.seed, t.deterministic)
        # freed memory kept from the audit on (its buffers, about 1 MB an image, are not
        # faulted in again), then what the audit left free handed back once, before the model
        self.allocator = devices.keep_freed_memory()
        self.dm = DataModule(r.data, seed=t.seed, mixup=r.model.augment.mixup, cutmix=r.model.augment.cutmix)
        try:
            self.dm.setup(split=split, progress=self._data_progress())
            if split is not None:
                _check_resumed_images(self.run_dir, self._manifest, self.dm, self._decoded_as)
        finally:  # a failed audit's memory too: the process may go on (a notebook, a study's next model)
            devices.release_freed_memory(self.allocator)

    def _build_model(self) -> None:
        keras.mixed_precision.set_dtype_policy(self.plan.precision)
        try:
            self.model = self.clf.build()
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self._xla_or_not()
        frozen = frozen_statistics_warning(self.recipe, self.clf)
        if frozen:
            _warn(frozen)

    def _xla_or_not(self) -> None:
        """XLA off where the model holds a layer it cannot compile (the default augmentation's
        zoom and shear): Keras would turn it off at compile, and env.json said it was on."""
        from osteo.classifier import xla_blockers

        blocked = xla_blockers(self.model) if self.keras_jit else []
        if not blocked:
            return
        asked = str(self.recipe.train.jit_compile).lower() == "on"
        self.keras_jit = self.plan.jit_compile = False
        layers = ", ".join(blocked)
        # Keras' jit_compile is XLA on TensorFlow and torch.compile on PyTorch; both refuse these layers
        compiler = "XLA" if keras.backend.backend() == "tensorflow" else "torch.compile (Keras' jit_compile)"
        self.plan.why["jit_compile"] = (f"{compiler} cannot compile {layers} (the augmentation inside the model), so "
                                        "training runs without it" + ("" if asked else
                                                                      f" (auto: {self.plan.why['jit_compile']})"))
        if asked:
            _warn(f"train.jit_compile=on: {compiler} cannot compile {layers} (the augmentation inside the model); "
                  "training runs without it (set the model.augment factors of those layers to 0 to compile)")

    def _create_run_files(self) -> None:
        """The run directory (a new one is created and locked here) and its recipe, split, audit,
        manifest and env.json."""
        r, t = self.recipe, self.recipe.train
        if self.run_dir is None:
            self.run_dir = create_run_dir(self.at) if self.at else new_run_dir(r.runs_dir, self.clf.spec.name)
            self._held.enter_context(self.run_dir.locked())
            self._say(f"run directory {self.run_dir}")
            self.run_dir.write_split(self.dm.split)
        run = self.run_dir
        if self.resume and not run.best_path.exists() and run.legacy_best_path.is_file():
            # a run begun before checkpoints were weights only: its best model, as weights
            from osteo.predict import load_legacy_best

            with atomic_path(run.best_path, suffix=".weights.h5") as tmp:
                legacy = load_legacy_best(run)
                save_weights(legacy, tmp, scaling_attrs(legacy))
        if not self.resume or run.read_recipe_dict() != r.to_dict():
            run.write_recipe(r)  # what is trained: a resumed run may have been given more epochs
        run.write_audit(self.dm.audit.to_json())
        run.write_manifest(self.dm.audit.manifest_rows())
        left_out = self.dm.audit.left_out(run.audit_path)
        if left_out:
            self._say(left_out)
        self.env = {
            **_versions(), "backend": self.plan.backend, "impl": r.model.impl, "precision": self.plan.precision,
            "jit_compile": self.plan.jit_compile, "device": self.plan.to_json(), "allocator": self.allocator,
            # how files became pixels (osteo.data.pipeline.CACHE_VERSION): predict and eval say when it changed
            "image_decoding": CACHE_VERSION,
            # which weights file it started from, by content: its path may be reused
            "weights_sha256": file_sha256(r.model.weights) if names_a_file(r.model.weights) and not self.resume else None,
            "git_commit": _git_commit(), "seed": t.seed, "deterministic": t.deterministic,
            "command": self.command, "host": platform.node(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "skipped_files": len(self.dm.skipped), "skipped": self.dm.skipped[:100],
            "excluded_conflicts": len(self.dm.excluded),
            "n_train": self.dm.count("train"), "n_val": self.dm.count("val"), "n_test": self.dm.count("test"),
        }
        if self.resume:  # the command that started the run stays; each that resumed it is added
            with contextlib.suppress(OsteoError, OSError, ValueError):
                before = run.read_env()
                if before.get("command"):
                    self.env["command"] = before["command"]
                    self.env["resumed_by"] = [*before.get("resumed_by", []), self.command]
                self.env["weights_sha256"] = before.get("weights_sha256")
        run.write_env(self.env)

    def _setup_callbacks_state(self) -> None:
        """Steps, history (a resumed run's rows kept), best checkpoint, class weights and the phases."""
        t, run = self.recipe.train, self.run_dir
        bs = self.dm.batch_size
        self.steps = t.steps_per_epoch or self.dm.steps_per_epoch()
        images_per_epoch = self.steps * bs if t.steps_per_epoch else min(self.steps * bs, self.dm.count("train"))
        # each phase resumes from its last intact committed state (or from its start)
        self.resume_from = {p: TrainingState.verified(run.phase_path(p), _warn) for p in (1, 2)}
        committed = max([0, *(_done_until(run.phase_done_path(p)) for p in (1, 2)),
                         *(s["epoch"] for s in self.resume_from.values() if s)])
        # rows of epochs run after it (a kill between an epoch's history row and its commit) go:
        # those epochs run again, and their best checkpoint is chosen again
        old_rows = [r for r in run.read_history() if int(r["epoch"]) <= committed] if self.resume else []
        self.history = HistoryCSV(run.history_path, images_per_epoch=images_per_epoch, rows=old_rows)
        self.best = BestCheckpoint(run.best_path, monitor=t.monitor)
        self.best.restore(old_rows)
        self.nonfinite = NonFiniteLoss()
        self.class_weight = self.dm.class_weights() if t.class_weight == "balanced" else None
        self.val_ds = self.dm.eval_dataset("val")
        self.total_epochs = t.epochs + t.fine_tune_epochs
        self.trained_seconds = 0.0
        self._t0 = time.perf_counter()
        run.backup_path.mkdir(parents=True, exist_ok=True)
        self.phases = [Phase(1, 0, t.epochs, t.lr)] if t.epochs else []
        if t.fine_tune_epochs:
            self.phases.append(Phase(2, t.epochs, self.total_epochs, t.fine_tune_lr))

    # ------------------------------------------------------------------ one phase

    def fit_phase(self, phase: Phase) -> None:
        """Train one phase, resuming from its backup if it has one; a done phase is skipped."""
        r, t, run, model = self.recipe, self.recipe.train, self.run_dir, self.model
        done_marker = run.phase_done_path(phase.number)
        if _done_until(done_marker) >= phase.last_epoch:  # a resumed run may have been given more epochs
            return
        if phase.number == 1:
            self.clf.freeze_backbone()
            if _from_scratch(r.model):
                self._say("phase 1 trains the head alone, on a frozen backbone of random weights (weights none): "
                          "its features are not learned (train.epochs=0 trains the whole model from the start)")
        else:
            self.clf.unfreeze_backbone(t.fine_tune_blocks)
            if run.phase1_weights_path.exists() and self.resume_from[2] is None:
                # phase 1's end, as an uninterrupted run enters phase 2: its weights and random states
                # (a run from before the states were kept has its weights alone)
                model.load_weights(run.phase1_weights_path)
                if run.phase1_seeds_path.exists():
                    load_random_states(model, run.phase1_seeds_path)
        backup_dir = run.phase_path(phase.number)
        resume = self.resume_from[phase.number]
        start = resume["epoch"] if resume else phase.first_epoch
        fit_model = model
        # PyTorch's feed weighs its batches itself, on the device (Keras' class_weight reads the labels back)
        feed_weighs = self.dm.backend == "torch"
        fit_kw = {"x": self.dm.train_dataset(start_epoch=start, steps_per_epoch=self.steps,
                                             class_weight=self.class_weight if feed_weighs else None),
                  "steps_per_epoch": self.steps, "validation_data": self.val_ds, "shuffle": False,
                  "class_weight": None if feed_weighs else self.class_weight}
        stopper = None
        if t.early_stopping:
            # its count goes on from the epochs a resumed run committed in this phase
            stopper = EarlyStop(t.monitor, t.early_stopping)
            stopper.restore(self.history.rows, phase.number)
        trains = start < phase.last_epoch and (stopper is None or stopper.stopped_epoch is None)
        if phase.number == 1 and use_feature_cache(t.feature_cache, r.model.augment):
            # the frozen backbone gives the same features every epoch: compute them once (a phase
            # that has nothing left to train takes up its state in the head model, without them)
            fit_model, fit_kw = self._feature_fit(features=trains)
        fit_model.compile(
            optimizer=self._optimizer(phase.lr, phase.last_epoch - phase.first_epoch),
            loss=SparseCrossEntropy(t.label_smoothing),
            metrics=default_metrics(),
            jit_compile=self.keras_jit,
        )
        self.best.target = model
        self.history.phase = phase.number
        if trains:
            ts = time.perf_counter()
            callbacks = callback_list(self._callbacks(backup_dir, resume, stopper), fit_model,
                                      epochs=phase.last_epoch, steps=self.steps)
            fit_model.fit(epochs=phase.last_epoch, initial_epoch=phase.first_epoch, callbacks=callbacks, verbose=0,
                          **fit_kw)
            self.trained_seconds += time.perf_counter() - ts
        elif resume is not None:
            # killed after the phase's last epoch was committed (or the one it stopped early at) and
            # before its end was written: the model takes up that state (weights, random states), as
            # fit() would have on resuming, so what follows (phase 1's end, which phase 2 starts from)
            # is the uninterrupted run's
            state = TrainingState(backup_dir, resume)
            state.set_model(fit_model)
            state.on_train_begin()
            state.on_train_end()
        if self.nonfinite.stopped_at:
            epoch, batch = self.nonfinite.stopped_at
            kept = (f"best checkpoint kept at {self.best.path}" if self.best.path.exists()
                    else "no checkpoint was saved")
            raise OsteoError(
                f"training stopped at epoch {epoch}, batch {batch}: the loss is not finite (NaN or inf); "
                f"{kept}; lower train.lr or use train.precision=float32"
            )
        if stopper is not None and stopper.stopped_epoch is not None and stopper.stopped_epoch + 1 < phase.last_epoch:
            epochs = f"{t.early_stopping} epoch{'s' if t.early_stopping > 1 else ''}"
            self._say(f"phase {phase.number} stopped early after epoch {stopper.stopped_epoch + 1}: {t.monitor} did not "
                      f"improve for {epochs} (train.early_stopping)")
        if phase.number == 1 and t.fine_tune_epochs:
            # phase 2 starts from here if it is killed before its first backup
            write_bytes(run.phase1_seeds_path, random_states(model))
            with atomic_path(run.phase1_weights_path, suffix=".weights.h5") as tmp:
                save_weights(model, tmp)
        write_bytes(done_marker, str(phase.last_epoch).encode())
        killpoints.reached("train.phase_done")

    def _callbacks(self, backup_dir: Path, resume: dict | None, stopper: EarlyStop | None) -> list:
        # history and checkpoint before the backup: a kill between them re-runs the epoch
        # (its history row is replaced), never loses its row
        callbacks = [
            self.nonfinite, self.history, self.best,
            TrainingState(backup_dir, resume),
        ]
        if stopper is not None:
            callbacks.append(stopper)
        callbacks += tracking.callbacks(self.recipe, self.run_dir)
        if self.console is not None:
            callbacks.append(RichProgress(self.console, total_epochs=self.total_epochs, steps_per_epoch=self.steps,
                                          batch_size=self.dm.batch_size, title=self.clf.spec.name))
        return callbacks

    # ------------------------------------------------------------------ finish

    def finish(self) -> Path:
        """Restore the best checkpoint, predict every held-out split, write metrics.json once."""
        from osteo.calibrate import calibrate_run
        from osteo.evaluate import evaluate_run
        from osteo.model_card import write_model_card

        run, model = self.run_dir, self.model
        # what the training steps left free goes back before the predictions and the reports:
        # they need less, and their imports (scikit-learn, matplotlib) would otherwise come on top
        devices.release_freed_memory(self.allocator)
        if not self.best.path.exists():
            raise OsteoError(f"no checkpoint was written for {run}; train for at least one epoch")
        if self.plan.precision != "float32" or not self.plan.channels_last:
            # the run's probabilities as osteo predict, eval and export give them (float32; the timm
            # engine channels-last, measured faster for inference wherever channels-first trains
            # faster: benchmarks/README.md), so its temperature and thresholds are chosen on the
            # outputs they will be applied to
            model = Classifier.from_recipe(self.recipe, weights="none").build()
        with warnings.catch_warnings():  # the best checkpoint carries no optimizer state, on purpose
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(self.best.path)
        rows = None
        for name in ("val", "test"):
            if self.dm.count(name):
                probs = model.predict(self.dm.eval_dataset(name), verbose=0)
                rows = run.write_predictions(self.dm.rows(name), probs, name, UNCALIBRATED, append_to=rows)
        history = run.read_history()
        rates = [float(h["images_per_sec"]) for h in history if h.get("images_per_sec")]
        self.env.update({
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "train_seconds": round(self.trained_seconds, 2), "wall_seconds": round(time.perf_counter() - self._t0, 2),
            "train_images_per_sec": round(float(np.median(rates)), 2) if rates else None,
            "params": self.clf.trainable_counts()["total"], "epochs_run": len(history),
            # what every later load checks (osteo.predict.load_best): the checkpoint is the one trained
            RunDir.BEST_SHA256: sha256_file(self.best.path),
            **devices.peak_memory_mb(),
        })
        run.write_env(self.env)
        checkpoint = {"model": self.clf.spec.name, "best_epoch": (self.best.best_epoch or 0) + 1,
                      "monitor": self.best.monitor, "best_value": self.best.best,
                      # the monitor's value that chose the checkpoint was measured during training, in the
                      # training's precision; the splits' numbers are of its float32 outputs, as osteo predict
                      # gives them: under mixed precision the two may differ a little (near-ties flip); a run
                      # trained channels-first (predicted channels-last) in the last digits only
                      "best_value_measured": f"during training, in {self.plan.precision}; the splits' numbers "
                                             "below are of the checkpoint's float32 outputs"}
        t = self.recipe.train
        evaluate_run(run, n_boot=t.bootstrap, seed=BOOTSTRAP_SEED, checkpoint=checkpoint)
        killpoints.reached("train.metrics_written")
        note = calibrate_run(run, t.operating_points, n_boot=t.bootstrap, seed=BOOTSTRAP_SEED).get("temperature_note")
        if note:
            self._say(note)
        write_model_card(run)
        tracking.finish(self.recipe, run)
        # the run is finished when its resume state is gone (RunDir.is_finished): one rename, after
        # every other file; a kill before it leaves a run that --resume finishes
        done = run.path / f"{RunDir.BACKUP}.{os.getpid()}.tmp"
        os.replace(run.backup_path, done)
        shutil.rmtree(done, ignore_errors=True)
        self._held.close()
        return run.path

    # ------------------------------------------------------------------ helpers

    def _feature_fit(self, features: bool = True):
        """A head-only model on the backbone's pooled features, computed once (``features``
        false: the model alone, for a phase that only takes up its committed state).

        The head layers are the full model's own (shared), so training this model
        trains the full model's head; the best checkpoint still saves the full model.
        """
        model, dm = self.model, self.dm
        name = "pool_norm" if self.clf.spec.pooled_norm else "pool"
        feature_layer = model.get_layer(name)
        extractor = keras.Model(model.inputs, feature_layer.output)
        inputs = keras.Input(tuple(feature_layer.output.shape[1:]), name="features")
        x = inputs
        for layer in model.layers[model.layers.index(feature_layer) + 1 :]:
            x = layer(x)
        head = Model(inputs, x, name=f"{model.name}_head")
        if not features:
            return head, {}
        self._say("phase 1 on cached backbone features")
        feats = {s: np.asarray(extractor.predict(dm.eval_dataset(s), verbose=0), dtype="float32")
                 for s in ("train", "val")}
        return head, {"x": feats["train"], "y": dm.labels("train"), "batch_size": dm.batch_size,
                      "validation_data": (feats["val"], dm.labels("val")), "shuffle": True,
                      "class_weight": self.class_weight}

    def _data_progress(self):
        if self.console is None:
            return None
        t0 = time.perf_counter()

        def report(stage, k, n):
            if k == n:
                self._say(f"{stage}: {n} files ({time.perf_counter() - t0:.1f}s)")

        return report

    def _optimizer(self, lr: float, epochs: int):
        t = self.recipe.train
        if t.schedule == "cosine":
            warmup = t.warmup_epochs * self.steps
            decay = max(1, epochs * self.steps - warmup)
            lr = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=0.0 if warmup else lr, decay_steps=decay,
                warmup_target=lr if warmup else None, warmup_steps=warmup,
            )
        return make_optimizer(t.optimizer, lr, t.weight_decay)


def _from_scratch(model) -> bool:
    """Whether the backbone starts from random weights (``--weights none``, as registry.parse_weights reads it)."""
    return str(model.weights or "none").lower() == "none"


def frozen_statistics_warning(recipe: Recipe, clf: Classifier) -> str:
    """The warning for BatchNorm frozen (``model.freeze_bn``) in a backbone trained from scratch, on
    either engine: in inference mode from the start, a new BatchNorm divides by its initial variance,
    1, so it normalises nothing; '' where none is due (pretrained weights, freeze_bn off, no
    BatchNorm, or a backbone that never trains: no fine-tuning phase)."""
    m = recipe.model
    if not (m.freeze_bn and clf.batchnorms and recipe.train.fine_tune_epochs
            and _from_scratch(m)):
        return ""
    return (f"model.freeze_bn with --weights none: {clf.spec.name}'s {clf.batchnorms} BatchNorm layers keep their "
            "initial statistics (mean 0, variance 1) and normalise nothing while they fine-tune; to train from "
            "scratch set model.freeze_bn=false (the demo recipe does)")


def _warn(message: str) -> None:
    logging.getLogger("osteo").warning(message)


def _done_until(marker: Path) -> int:
    """The epoch a finished phase ran to, from its marker (-1: not finished)."""
    try:
        return int(marker.read_text() or 0)
    except (OSError, ValueError):
        return -1


def _check_resumed_images(run: RunDir, manifest: dict[str, dict], dm, was: str | None) -> None:
    """A resumed run trains and scores the images it began with, decoded as they were: a
    one-line error where an image of its split holds other bytes than its audit recorded
    (``manifest``: its validation images would choose, and its test images score, another
    image under the same name, a copy of a training image, say), or where osteo now decodes
    it otherwise than the run's decoding ``was`` (:func:`osteo.data.pipeline.decodes_otherwise`).
    A missing or unreadable image is skipped with a warning, as before."""
    ok = {r.path: r for r in dm.audit.ok()}
    pairs = [(r["path"], manifest[r["path"]], ok[r["path"]]) for r in dm.split
             if r["path"] in manifest and r["path"] in ok]
    changed = [(p, old, new) for p, old, new in pairs if old.get("sha256") and new.sha256 != old["sha256"]]
    if changed:
        path, old, new = changed[0]
        raise OsteoError(f"{len(changed)} image(s) of the run's split changed since it began (e.g. {Path(dm.cfg.dir) / path}: "
                         f"its sha256 was {old['sha256'][:12]}, now {new.sha256[:12]}); a resumed run "
                         f"trains and scores the images it began with: put them back, or train a new run")
    if was in (None, CACHE_VERSION):
        return
    otherwise = [p for p, old, new in pairs if decodes_otherwise(was, old, new)]
    # read when the run began, there still, and not read now: no longer an image osteo reads (a hidden file, a
    # 16-bit colour PNG), which the data module would leave out of the validation and test splits in silence
    otherwise += [r["path"] for r in dm.split if manifest.get(r["path"], {}).get("status") == "ok"
                  and r["path"] not in ok and os.path.lexists(Path(dm.cfg.dir) / r["path"])]
    if otherwise:
        raise OsteoError(f"{len(otherwise)} image(s) of {run.path}'s split decode otherwise than when it began "
                         f"(osteo's image decoding {was} -> {CACHE_VERSION}: {decoding_changes(was)}), e.g. "
                         f"{otherwise[0]}; train a new run")
