"""The phantom's ceiling: a classifier that sees the true latents instead of the image.

The phantom draws each image's class signal from three latents (mineral density,
trabecular bone fraction, cortical thickness; ``osteo.data.phantom``), and writes them
to ``latents.csv``. Within a class they are independent normals, so quadratic
discriminant analysis is the Bayes classifier for them: fitted on a run's training
split and scored on the images the run's row is on (its test split, its validation split, or a
cross-validation's held-out folds, each fold's oracle fitted on that fold's training images),
it gives the best balanced accuracy any model of those images could reach. A model near it has learned the task; the gap
to it is what the images' nuisance (exposure, noise, blur, pose) and the model cost.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.data.phantom import LATENTS_FILE
from osteo.files import read_csv

LATENTS = ("mineral_density", "trabecular_fraction", "cortical_thickness")


def read_latents(data_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """{relative path: the three latents} from ``data_dir/latents.csv``; None without one."""
    path = Path(data_dir) / LATENTS_FILE
    if not path.is_file():
        return None
    rows = read_csv(path, "write the phantom again (osteo data phantom)")
    try:
        return {r["path"]: np.array([float(r[k]) for k in LATENTS]) for r in rows}
    except (KeyError, ValueError):
        return None  # not a phantom's latents: no ceiling to draw


def oracle_probs(latents: dict[str, np.ndarray], train: list[dict], evaluate: list[dict]) -> np.ndarray | None:
    """Class probabilities for ``evaluate`` rows from a QDA fitted on the ``train`` rows' latents.

    Rows are split rows (``path``, ``label``); None when a row has no latents or a
    class has too few training rows to fit.
    """
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if any(r["path"] not in latents for r in (*train, *evaluate)):
        return None
    y = np.array([CLASSES.index(r["label"]) for r in train])
    if any(np.sum(y == c) < len(LATENTS) + 1 for c in range(len(CLASSES))):
        return None
    # standardised first: cortical thickness varies by 0.01, density by 0.1 (QDA's rank test is absolute)
    qda = make_pipeline(StandardScaler(), QuadraticDiscriminantAnalysis(reg_param=1e-6))
    qda.fit(np.stack([latents[r["path"]] for r in train]), y)
    return qda.predict_proba(np.stack([latents[r["path"]] for r in evaluate]))
