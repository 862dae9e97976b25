"""Callbacks, one job each: best checkpoint, CSV history, non-finite loss, progress.

Each one checks its preconditions when training begins and writes its files
atomically (temporary file, then rename), so a killed run leaves complete files.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import keras
import numpy as np

from osteo.files import atomic_path, write_bytes, write_csv

HISTORY_METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1")


def monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


class BestCheckpoint(keras.callbacks.Callback):
    """Save the whole model to ``path`` whenever ``monitor`` improves.

    One instance serves both phases, so phase 2 only overwrites phase 1's best when
    it beats it. ``best`` and ``best_epoch`` can be set before training (resume).
    """

    def __init__(self, path: str | Path, monitor: str = "val_macro_f1"):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.target: keras.Model | None = None  # the model to save, if not the one being fitted

    def improved(self, value: float) -> bool:
        return value < self.best if self.mode == "min" else value > self.best

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
        value = float(logs[self.monitor])
        if math.isfinite(value) and self.improved(value):
            self.best, self.best_epoch = value, epoch
            model = self.target or self.model
            optimizer = getattr(model, "optimizer", None)
            try:
                # the best model, not the training state (that is BackupAndRestore's):
                # without Adam's two moments the file is a third of the size
                if optimizer is not None:
                    model.optimizer = None
                with atomic_path(self.path) as tmp:
                    model.save(tmp)
            finally:
                if optimizer is not None:
                    model.optimizer = optimizer


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
        return ["epoch", "phase", *metrics, "lr", "seconds", "train_seconds", "images_per_sec"]

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._t_train = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._t_train = time.perf_counter() - self._t0

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
        }
        self.rows = [r for r in self.rows if int(r["epoch"]) != epoch + 1] + [row]
        write_csv(self.path, self.rows, self.columns)


class NonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first NaN or infinite loss and remember where (the trainer reports it)."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.stopped_at: tuple[int, int] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_at = (self.epoch + 1, batch + 1)
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
        self._t0 = 0.0

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
        logs = logs or {}
        rate = (batch + 1) * self.batch_size / max(time.perf_counter() - self._t0, 1e-9)
        stats = " ".join(f"{k} {float(v):.3f}" for k, v in logs.items() if k in HISTORY_METRICS)
        self.progress.update(self._task, completed=batch + 1, stats=f"{stats} {rate:.1f} img/s")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = " ".join(f"{k} {float(v):.3f}" for k, v in logs.items()
                         if k in HISTORY_METRICS or k[4:] in HISTORY_METRICS)
        self.console.print(f"{self.title} epoch {epoch + 1}/{self.total_epochs}: {parts} "
                           f"({time.perf_counter() - self._t0:.1f}s)", highlight=False)


class SeedState(keras.callbacks.Callback):
    """Save and restore the random state of every layer (augmentation, dropout).

    ``BackupAndRestore`` restores weights and optimizer but not the seed generators'
    states, so a resumed run would draw other augmentations and dropout masks than
    an uninterrupted one. This callback keeps them beside the backup, tagged with the
    epoch they belong to, and restores them only when that epoch is the one resumed.
    """

    def __init__(self, path: str | Path, resume_epoch: int):
        super().__init__()
        self.path = Path(path)
        self.resume_epoch = resume_epoch

    def _generators(self) -> list:
        seen, out = set(), []
        for layer in self.model._flatten_layers(include_self=True, recursive=True):
            for sg in getattr(layer, "_seed_generators", []):
                if id(sg) not in seen:
                    seen.add(id(sg))
                    out.append(sg)
        return out

    def on_train_begin(self, logs=None):
        if not self.path.exists():
            return
        with np.load(self.path, allow_pickle=False) as data:
            generators = self._generators()
            if int(data["epoch"]) != self.resume_epoch or len(data.files) - 1 != len(generators):
                return
            for i, sg in enumerate(generators):
                sg.state.assign(data[f"s{i}"])

    def on_epoch_end(self, epoch, logs=None):
        states = {f"s{i}": keras.ops.convert_to_numpy(sg.state.value) for i, sg in enumerate(self._generators())}
        buf = io.BytesIO()
        np.savez(buf, epoch=np.int64(epoch + 1), **states)
        write_bytes(self.path, buf.getvalue())
