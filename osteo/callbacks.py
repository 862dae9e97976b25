"""Callbacks, one job each: best checkpoint, CSV history, non-finite loss, progress, resumable state.

Each one checks its preconditions when training begins and writes its files
atomically (temporary file, then rename), so a killed run leaves complete files.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from osteo import killpoints
from osteo.device import peak_memory_mb
from osteo.files import atomic_path, csv_float, save_weights, sha256_file, write_bytes, write_csv
from osteo.h5files import scaling_attrs
from osteo.runs import STATE_FILE

HISTORY_METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1")


def monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


def as_kept(value) -> float:
    """A monitored value as history.csv keeps it (8 decimals), where a resumed run takes it up: a
    tie within them is no improvement, killed and resumed or not."""
    value = float(value)
    return csv_float(value) if math.isfinite(value) else value


class Monitored(keras.callbacks.Callback):
    """A callback that follows the best value of ``monitor`` (lower is better for a loss)."""

    def __init__(self, monitor: str):
        super().__init__()
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.best = math.inf if self.mode == "min" else -math.inf

    def improved(self, value: float) -> bool:
        return math.isfinite(value) and (value < self.best if self.mode == "min" else value > self.best)


class EarlyStop(Monitored):
    """Stop a phase when ``monitor`` has not improved for ``patience`` epochs, and resumably:
    :meth:`restore` replays the phase's history rows, so a resumed run stops at the epoch an
    uninterrupted one stops at, and a run killed after it stopped does not train on. Values are
    compared as history.csv keeps them (:func:`as_kept`). Keras' EarlyStopping counts the same
    way, except that a NaN or infinite value is no improvement here (Keras takes its first value,
    whatever it is, as the best) and a phase may stop after its first epoch where patience is 1
    and that epoch's value is not finite (Keras never stops at epoch 0)."""

    def __init__(self, monitor: str, patience: int):
        super().__init__(monitor)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def see(self, epoch: int, value) -> None:
        value = as_kept(value)
        if self.improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch

    def restore(self, history: list[dict], phase: int) -> None:
        """Replay the monitored values of ``phase``'s rows in ``history`` (a resumed run's)."""
        for row in history:
            if int(row["phase"]) == phase:
                value = row.get(self.monitor)
                self.see(int(row["epoch"]) - 1, math.nan if value in (None, "") else value)

    def on_epoch_end(self, epoch, logs=None):
        self.see(epoch, (logs or {}).get(self.monitor, math.nan))
        if self.stopped_epoch is not None:
            self.model.stop_training = True


class BestCheckpoint(Monitored):
    """Save the model's weights to ``path`` whenever ``monitor`` improves.

    Weights only: a run's model is rebuilt from its ``recipe.json`` to load them
    (:func:`osteo.predict.load_best`), so no file of a run is ever deserialized as code,
    and the timm engine's torch modules never go through pickle.

    One instance serves both phases, so phase 2 only overwrites phase 1's best when
    it beats it. ``best`` and ``best_epoch`` can be set before training (resume).
    """

    def __init__(self, path: str | Path, monitor: str = "val_macro_f1"):
        super().__init__(monitor)
        self.path = Path(path)
        self.best_epoch: int | None = None
        self.target: keras.Model | None = None  # the model to save, if not the one being fitted

    def restore(self, history: list[dict]) -> None:
        """Take up the best value and epoch from the history rows of a resumed run."""
        for row in history:
            value = row.get(self.monitor)
            if value not in (None, "") and self.improved(float(value)):
                self.best, self.best_epoch = float(value), int(row["epoch"]) - 1

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise ValueError(
                f"checkpoint monitor {self.monitor!r} is not among the logged metrics "
                f"({', '.join(sorted(logs))}); set train.monitor to one of them"
            )
        # as history.csv keeps it, where a resumed run takes up the best value (BestCheckpoint.restore):
        # a tie within its 8 decimals is no improvement, killed and resumed or not
        value = as_kept(logs[self.monitor])
        if self.improved(value):
            self.best, self.best_epoch = value, epoch
            model = self.target or self.model
            optimizer = getattr(model, "optimizer", None)
            try:
                # the best model, not the training state (that is TrainingState's):
                # without Adam's two moments the file is a third of the size
                if optimizer is not None:
                    model.optimizer = None
                with atomic_path(self.path, suffix=".weights.h5") as tmp:
                    save_weights(model, tmp, scaling_attrs(model))  # a run started from it scales alike
            finally:
                if optimizer is not None:
                    model.optimizer = optimizer


class DeviceLogs(keras.callbacks.CallbackList):
    """Keras' CallbackList, except that a batch's logs reach the callbacks as they are.

    Keras turns every batch's logs into Python numbers before a callback sees them: on a
    GPU a copy to the host and a wait for the device after every step (see
    :class:`osteo.classifier.Model`), and moving that to a worker thread does not help (a
    copy to pageable host memory holds up the main thread's kernel launches too). osteo's
    per-batch callbacks read the logs themselves when they need them: NonFiniteLoss every
    ``every`` batches (32), RichProgress once a second, the others never.
    """

    def on_train_batch_end(self, batch, logs=None):
        for callback in self.callbacks:
            callback.on_train_batch_end(batch, logs=logs)

    def on_test_batch_end(self, batch, logs=None):
        for callback in self.callbacks:
            callback.on_test_batch_end(batch, logs=logs)


def callback_list(callbacks: list, model, *, epochs: int, steps: int | None) -> DeviceLogs:
    """``callbacks`` as ``fit`` would list them (with Keras' History, without its progress bar)."""
    return DeviceLogs(callbacks, add_history=True, add_progbar=False, model=model, verbose=0, epochs=epochs,
                      steps=steps)


class HistoryCSV(keras.callbacks.Callback):
    """One row per epoch of both phases, with training throughput; rewritten atomically."""

    def __init__(self, path: str | Path, *, images_per_epoch: int, rows: list[dict] | None = None):
        super().__init__()
        self.path = Path(path)
        self.images_per_epoch = images_per_epoch
        self.rows: list[dict] = list(rows or [])
        self.phase = 1
        self._t0 = self._t_train = 0.0

    @property
    def columns(self) -> list[str]:
        metrics = [*HISTORY_METRICS, *(f"val_{m}" for m in HISTORY_METRICS)]
        return ["epoch", "phase", *metrics, "lr", "seconds", "train_seconds", "images_per_sec", "peak_rss_mb",
                "peak_gpu_mb"]

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._t_train = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._t_train = time.perf_counter() - self._t0
        killpoints.reached("train.batch")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": epoch + 1,
            "phase": self.phase,
            **{k: float(logs[k]) for k in self.columns if k in logs},
            "lr": float(keras.ops.convert_to_numpy(lr)),
            "seconds": round(time.perf_counter() - self._t0, 3),
            "train_seconds": round(self._t_train, 3),
            "images_per_sec": round(self.images_per_epoch / self._t_train, 2) if self._t_train else "",
            **{k: "" if v is None else v for k, v in peak_memory_mb().items()},
        }
        self.rows = [r for r in self.rows if int(r["epoch"]) != epoch + 1] + [row]
        write_csv(self.path, self.rows, self.columns)
        killpoints.reached("train.history_written")


class NonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss and remember where (the trainer reports it).

    Reading a loss that lives on a GPU makes the host wait for the device, so the losses
    are collected and read every ``every`` batches (and at the epoch's end): one wait
    instead of ``every`` (the same on a CPU, where training goes on at most that many
    batches past a bad one; the first bad batch is the one named).
    """

    def __init__(self, every: int = 32):
        super().__init__()
        self.epoch = 0
        self.every = every
        self.stopped_at: tuple[int, int] | None = None
        self._pending: list = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._pending = []

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        self._pending.append((batch, loss))
        if len(self._pending) >= self.every:
            self._check()

    def on_epoch_end(self, epoch, logs=None):
        self._check()

    def _check(self):
        pending, self._pending = self._pending, []
        if not pending or self.stopped_at:
            return
        values = keras.ops.convert_to_numpy(keras.ops.stack([keras.ops.cast(v, "float32") for _, v in pending]))
        bad = [b for (b, _), v in zip(pending, values) if not math.isfinite(float(v))]
        if bad:
            self.stopped_at = (self.epoch + 1, bad[0] + 1)
            self.model.stop_training = True


class RichProgress(keras.callbacks.Callback):
    """Epoch bar with loss, metrics, images/sec and ETA; a summary line per epoch."""

    def __init__(self, console, *, total_epochs: int, steps_per_epoch: int, batch_size: int, title: str = ""):
        super().__init__()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.steps = steps_per_epoch
        self.batch_size = batch_size
        self.total_epochs = total_epochs
        self.title = title
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console, transient=True,
        )
        self._task = None
        self._t0 = self._shown = 0.0

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_train_end(self, logs=None):
        self.progress.stop()

    def on_epoch_begin(self, epoch, logs=None):
        if self._task is not None:
            self.progress.remove_task(self._task)
        desc = f"{self.title} epoch {epoch + 1}/{self.total_epochs}"
        self._task = self.progress.add_task(desc, total=self.steps, stats="")
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if now - self._shown < 1.0 and batch + 1 < self.steps:
            # reading the metrics waits for the device: at most once a second
            self.progress.update(self._task, completed=batch + 1)
            return
        self._shown = now
        logs = logs or {}
        rate = (batch + 1) * self.batch_size / max(now - self._t0, 1e-9)
        stats = " ".join(f"{k} {float(v):.3f}" for k, v in logs.items() if k in HISTORY_METRICS)
        self.progress.update(self._task, completed=batch + 1, stats=f"{stats} {rate:.1f} img/s")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = " ".join(f"{k} {float(v):.3f}" for k, v in logs.items()
                         if k in HISTORY_METRICS or k[4:] in HISTORY_METRICS)
        self.console.print(f"{self.title} epoch {epoch + 1}/{self.total_epochs}: {parts} "
                           f"({time.perf_counter() - self._t0:.1f}s)", highlight=False)


class TrainingState(keras.callbacks.Callback):
    """Crash-safe resume: weights, optimizer and every layer's random state, per epoch.

    Keras' ``BackupAndRestore`` writes ``latest.weights.h5`` in place, so a kill during
    the write left a truncated file that every later resume failed on; and it keeps no
    seed-generator states, so a resumed run would draw other augmentations and
    dropout masks than an uninterrupted one. Here each epoch's state goes into the slot
    (``a`` or ``b``) other than the one it resumed from or last committed, complete and
    synced, and only then is ``state.json`` replaced (atomically) to point at it, with
    the epoch and checksums of both slots. A kill at any moment leaves ``state.json``
    naming a complete slot, or no ``state.json`` at all; a slot damaged later (the disk,
    a person) fails its checksums and :meth:`verified` falls back to the other slot or
    to the phase's start, with one warning.

    ``resume`` is the state to continue from (:meth:`verified`'s), None to start the phase.
    """

    STATE = STATE_FILE
    FILES = ("weights.weights.h5", "seeds.npz")  # one slot's files

    def __init__(self, backup_dir: str | Path, resume: dict | None = None):
        super().__init__()
        self.dir = Path(backup_dir)
        self.resume = resume
        self.slot = resume["slot"] if resume else None  # the slot the model's state last came from
        self.slots = {self.slot: resume["slots"][self.slot]} if resume else {}  # the good slots' records

    @classmethod
    def saved(cls, backup_dir: str | Path) -> dict | None:
        """The committed state (``{"epoch": next epoch to run, "slot": ..., "slots": ...}``), or None."""
        path = Path(backup_dir) / cls.STATE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and isinstance(state.get("epoch"), int) and state.get("slot") in ("a", "b"):
                slots = state.get("slots")
                if not isinstance(slots, dict):  # written before slots had checksums
                    slots = {state["slot"]: {"epoch": state["epoch"]}}
                return {**state, "slots": {k: v for k, v in slots.items()
                                           if k in ("a", "b") and isinstance(v, dict)
                                           and isinstance(v.get("epoch"), int)}}
        except (OSError, ValueError):
            pass
        return None

    @classmethod
    def verified(cls, backup_dir: str | Path, warn) -> dict | None:
        """The state to resume from: the committed slot if it is intact, else the other slot if
        it is (one epoch earlier), else None (the phase starts again); ``warn`` says which."""
        state = cls.saved(backup_dir)
        if state is None:
            return None
        folder = Path(backup_dir)
        committed = state["slot"]
        for name in (committed, "b" if committed == "a" else "a"):
            info = state["slots"].get(name)
            if info is None or not _slot_intact(folder / name, info.get("sha256")):
                continue
            if name != committed:
                warn(f"the training state of epoch {state['epoch']} in {folder / committed} is damaged; resuming "
                     f"from the one of epoch {info['epoch']} in {folder / name}")
            return {"epoch": info["epoch"], "slot": name, "slots": {name: info}}
        warn(f"the training state in {folder} is damaged; this phase starts again from its first epoch")
        return None

    def on_train_begin(self, logs=None):
        if self.resume is None:
            return
        slot = self.dir / self.resume["slot"]
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its variables must exist to load
        self.model.load_weights(slot / "weights.weights.h5")
        load_random_states(self.model, slot / "seeds.npz")
        self.model._initial_epoch = self.resume["epoch"]  # what BackupAndRestore does to resume fit()

    def on_train_end(self, logs=None):
        # Keras keeps _initial_epoch on the model and prefers it to fit()'s own argument: the next
        # fit() of this model (phase 2 after a phase 1 resumed at epoch k) would start at k too
        self.model._initial_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        name = "b" if self.slot == "a" else "a"  # never the slot holding the last good state
        slot = self.dir / name
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir(parents=True)
        save_weights(self.model, slot / "weights.weights.h5")
        write_bytes(slot / "seeds.npz", random_states(self.model))
        _fsync(slot / "weights.weights.h5")
        sums = {f: sha256_file(slot / f) for f in self.FILES}
        killpoints.reached("train.state_written")
        self.slots = {**{k: v for k, v in self.slots.items() if k != name}, name: {"epoch": epoch + 1, "sha256": sums}}
        write_bytes(self.dir / self.STATE, json.dumps({"epoch": epoch + 1, "slot": name, "slots": self.slots}).encode())
        self.slot = name
        killpoints.reached("train.epoch_committed")


def _seed_generators(model) -> list:
    """Every layer's random-state holder (Keras' SeedGenerator: augmentation, dropout), in layer order."""
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for sg in getattr(layer, "_seed_generators", []):
            if id(sg) not in seen:
                seen.add(id(sg))
                out.append(sg)
    return out


def random_states(model) -> bytes:
    """``model``'s random states as an ``.npz`` file's bytes (:func:`load_random_states` reads them)."""
    buf = io.BytesIO()
    np.savez(buf, **{f"s{i}": keras.ops.convert_to_numpy(sg.state.value)
                     for i, sg in enumerate(_seed_generators(model))})
    return buf.getvalue()


def load_random_states(model, path: Path) -> None:
    """Give ``model``'s layers the random states :func:`random_states` saved to ``path``, so the
    augmentations and dropout masks drawn next are those the saving run drew next."""
    with np.load(path, allow_pickle=False) as data:
        generators = _seed_generators(model)
        if len(data.files) != len(generators):
            raise ValueError(f"{path} holds {len(data.files)} random states, the model has {len(generators)}")
        for i, sg in enumerate(generators):
            sg.state.assign(data[f"s{i}"])


def _slot_intact(slot: Path, sums: dict | None) -> bool:
    """A slot's files are there and match their checksums (a slot written before checksums:
    they open)."""
    files = [slot / f for f in TrainingState.FILES]
    if not all(f.is_file() for f in files):
        return False
    if isinstance(sums, dict):
        return all(sums.get(f.name) == sha256_file(f) for f in files)
    import h5py

    try:
        with h5py.File(files[0], "r"), np.load(files[1], allow_pickle=False) as seeds:
            seeds.files  # noqa: B018  (reads the archive's directory)
        return True
    except Exception:  # any failure to open is a damaged file, whatever the library raises
        return False


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
