"""Run directories: ``runs/<model>/<run-id>/``, created, found and checked (no Keras import).

A run directory holds at least ``recipe.json`` and ``split.csv`` from its start;
a finished run adds ``history.csv``, ``best.keras``, ``predictions.csv``,
``metrics.json`` and ``env.json``. Two runs never share a directory.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from osteo.errors import OsteoError

RUN_FILES = ("recipe.json", "split.csv")


def new_run_dir(runs_dir: str | os.PathLike, model: str) -> Path:
    base = Path(runs_dir) / model
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OsteoError(f"cannot create run directory under {base}: {e.strerror}; "
                         "set RUNS= (--runs) to a writable folder") from None
    for i in range(1, 1000):
        path = base / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise OsteoError(f"cannot create run directory {path}: {e.strerror}; "
                             "set RUNS= (--runs) to a writable folder") from None
    raise OsteoError(f"too many runs started this second under {base}")


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in RUN_FILES)


def check_run_dir(path: str | os.PathLike, need: Sequence[str] = ()) -> Path:
    """``path`` if it is a run directory with the files ``need``, else a one-line error."""
    path = Path(path)
    if not is_run_dir(path):
        raise OsteoError(f"{path} is not an osteo run directory (no {' and '.join(RUN_FILES)}); "
                         "pass a folder under runs/<model>/")
    missing = [f for f in need if not (path / f).is_file()]
    if missing:
        raise OsteoError(f"run {path} is unfinished (no {', '.join(missing)}); "
                         f"finish it with: osteo train --resume {path}")
    return path


def list_runs(runs_dir: str | os.PathLike = "runs", model: str | None = None,
              finished: bool = False) -> list[Path]:
    """Run directories under ``runs_dir`` (of ``model``), oldest first."""
    root = Path(runs_dir) / model if model else Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [p for p in root.glob("*" if model else "*/*") if is_run_dir(p)]
    if finished:
        runs = [p for p in runs if (p / "metrics.json").is_file() and (p / "predictions.csv").is_file()]
    return sorted(runs, key=lambda p: (p.name, p.parent.name))


def find_run(spec: str, runs_dir: str | os.PathLike = "runs", model: str | None = None) -> Path:
    """``latest`` (of ``model``, or of any model) or a path -> a run directory."""
    if spec == "latest":
        runs = list_runs(runs_dir, model)
        if not runs:
            where = Path(runs_dir) / model if model else Path(runs_dir)
            raise OsteoError(f"no run to resume under {where}; start one without --resume")
        return max(runs, key=lambda p: (p.stat().st_mtime, p.name))
    return check_run_dir(spec)
