"""Classify new images with a finished run: ``osteo predict RUN_DIR IMAGES... [--out CSV]``.

The run's ``best.keras`` is loaded with ``safe_mode=True`` (no Python lambdas or
pickles are executed); images are decoded and resized exactly as in training
(:mod:`osteo.data.decode`, :func:`osteo.data.pipeline.resize_image`). Files that
cannot be decoded get ``status=unreadable`` and a reason instead of probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.files import write_csv
from osteo.runs import RunDir

COLUMNS = ("path", "status", "pred", *(f"p_{c}" for c in CLASSES), "reason")


def load_best(run_dir: str | os.PathLike):
    import keras

    run = RunDir(run_dir).check(need=(RunDir.BEST,))
    import osteo.classifier  # noqa: F401  (registers osteo's serializable layers, losses, metrics)

    try:
        return keras.saving.load_model(run.best_path, safe_mode=True)
    except Exception as e:
        raise OsteoError(f"cannot load {run.best_path}: {type(e).__name__}: {str(e)[:200]}; "
                         "the file is damaged or from another osteo version: retrain the run") from None


def _expand(paths: list[str]) -> list[Path]:
    """Every file named, and every file below every folder named (hidden and system files aside).

    Nothing is filtered by its name's extension: the decoder decides by content, and a
    file it cannot read gets a row saying why.
    """
    from osteo.data.scan import SYSTEM_FILES

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if not f.is_dir() and not f.name.startswith(".")
                          and f.name.lower() not in SYSTEM_FILES)
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise OsteoError(f"{p} does not exist; pass image files or folders")
    return out


def _refuse_run_files(out: Path) -> None:
    """``--out`` must never replace a file of a run directory (its predictions above all)."""
    target = out.resolve()
    if RunDir(target.parent).is_run() and target.name in {v for k, v in vars(RunDir).items() if k.isupper()
                                                          and isinstance(v, str)}:
        raise OsteoError(f"--out {out} would overwrite the run's own {target.name}; write the predictions "
                         "elsewhere, e.g. --out predictions-new.csv")


def predict_files(run_dir: str | os.PathLike, images: list[str], out: str | os.PathLike, batch: int = 32) -> Path:
    import tensorflow as tf

    from osteo.data.decode import DecodeError, decode_file
    from osteo.data.pipeline import box_factor, resize_image

    _refuse_run_files(Path(out))
    model = load_best(run_dir)
    data = RunDir(run_dir).read_recipe().data  # resolved: the size and resize mode it trained with
    size, mode = data.image_size, data.resize
    rows, ready, arrays = [], [], []
    for f in _expand(images):
        try:
            arr, info = decode_file(f)
        except DecodeError as e:
            rows.append({"path": str(f), "status": "unreadable", "reason": str(e)})
            continue
        box = box_factor(info.width, info.height, size, mode)
        arrays.append(resize_image(tf.constant(arr), size, mode, box).numpy())
        row = {"path": str(f), "status": "ok"}
        rows.append(row)
        ready.append(row)
    if arrays:
        probs = model.predict(np.stack(arrays), batch_size=batch, verbose=0)
        for row, p in zip(ready, probs):
            row["pred"] = CLASSES[int(np.argmax(p))]
            row.update({f"p_{c}": f"{float(v):.6f}" for c, v in zip(CLASSES, p)})
    write_csv(out, rows, COLUMNS)
    return Path(out)
