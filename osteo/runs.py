"""Run directories: ``runs/<model>/<run-id>/``. :class:`RunDir` owns every run file (no Keras import).

A run directory holds ``recipe.json`` (the resolved recipe) and ``split.csv`` from its
start; a finished run adds ``env.json``, ``audit.json``, ``history.csv``,
``best.weights.h5``, ``predictions.csv`` and ``metrics.json``. Two runs never share a
directory. Every module that reads or writes a run file goes through :class:`RunDir`,
so each file has one name, one reader and one writer.

    >>> run = RunDir("runs/vgg16/20261128-101500")
    >>> run.metrics_path.name
    'metrics.json'
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from osteo import CLASSES
from osteo.device import get_engine
from osteo.errors import OsteoError
from osteo.files import read_csv, read_json, write_csv, write_json

if TYPE_CHECKING:
    from osteo.recipe import Recipe

STATE_FILE = "state.json"  # osteo.callbacks.TrainingState's commit file, one per phase
PROB_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
PREDICTION_COLUMNS = ("path", "label", "pred", *PROB_COLUMNS, "split")


class _Folder:
    """A folder under ``runs/<model>/``, usable wherever a path is."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        """The backbone, from the folder layout ``runs/<model>/<id>``."""
        return self.path.parent.name


class RunDir(_Folder):
    """One run directory: its files' names, readers and writers."""

    RECIPE = "recipe.json"
    ENV = "env.json"
    AUDIT = "audit.json"
    SPLIT = "split.csv"
    HISTORY = "history.csv"
    BEST = "best.weights.h5"  # weights only: the model is rebuilt from recipe.json (no pickles, ever)
    LEGACY_BEST = "best.keras"  # runs made before: the whole model, loaded with Keras' safe_mode
    PREDICTIONS = "predictions.csv"
    METRICS = "metrics.json"
    MANIFEST = "manifest.csv"  # the audit's manifest: every file's content hashes (external overlap)
    CALIBRATION = "calibration.json"  # temperature and operating points (osteo.calibrate)
    MODEL_CARD = "MODEL_CARD.md"
    EVAL = "eval"  # external validations: eval/<folder-name>/
    EXPORT = "export"  # osteo export's default outputs
    EXPORT_RECORD = "export.json"  # beside an ONNX export: what it is and the parity measured
    BACKUP = ".backup"  # the resumable training state (TrainingState); removed when the run ends
    TENSORBOARD = "tensorboard"
    REQUIRED = (RECIPE, SPLIT)  # what makes a folder a run directory
    FINISHED = (PREDICTIONS, METRICS)

    # ------------------------------------------------------------------ paths

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    recipe_path = property(lambda self: self.path / self.RECIPE)
    env_path = property(lambda self: self.path / self.ENV)
    audit_path = property(lambda self: self.path / self.AUDIT)
    split_path = property(lambda self: self.path / self.SPLIT)
    history_path = property(lambda self: self.path / self.HISTORY)
    best_path = property(lambda self: self.path / self.BEST)
    legacy_best_path = property(lambda self: self.path / self.LEGACY_BEST)
    predictions_path = property(lambda self: self.path / self.PREDICTIONS)
    metrics_path = property(lambda self: self.path / self.METRICS)
    calibration_path = property(lambda self: self.path / self.CALIBRATION)
    manifest_path = property(lambda self: self.path / self.MANIFEST)
    model_card_path = property(lambda self: self.path / self.MODEL_CARD)
    eval_path = property(lambda self: self.path / self.EVAL)
    export_path = property(lambda self: self.path / self.EXPORT)
    backup_path = property(lambda self: self.path / self.BACKUP)
    tensorboard_path = property(lambda self: self.path / self.TENSORBOARD)
    # the Trainer's resume files inside BACKUP: named here, not as run files (owner_of lists those)
    phase1_weights_path = property(lambda self: self.backup_path / "phase1.weights.h5")  # where phase 2 starts

    def phase_path(self, phase: int) -> Path:
        """Phase ``phase``'s TrainingState folder (its two slots and ``state.json``)."""
        return self.backup_path / f"phase{phase}"

    def phase_done_path(self, phase: int) -> Path:
        """The marker of a finished phase; it holds the epoch the phase ran to."""
        return self.backup_path / f"phase{phase}.done"

    # ------------------------------------------------------------------ state

    @classmethod
    def owner_of(cls, path: str | os.PathLike) -> RunDir | None:
        """The run whose own file ``path`` is (by name, in a run directory), else None: the
        check every ``--out`` makes before writing, so no command replaces a run's files."""
        target = Path(path).resolve()
        names = {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}
        run = cls(target.parent)
        return run if target.name in names and run.is_run() else None

    def is_run(self) -> bool:
        return self.path.is_dir() and all((self.path / f).is_file() for f in self.REQUIRED)

    def is_finished(self) -> bool:
        return self.is_run() and all((self.path / f).is_file() for f in self.FINISHED)

    def is_resumable(self) -> bool:
        """Unfinished, with at least one completed epoch or phase saved to resume from."""
        if not self.is_run() or self.is_finished() or not self.backup_path.is_dir():
            return False
        return (any(self.phase_done_path(p).is_file() for p in (1, 2))
                or any((self.phase_path(p) / STATE_FILE).is_file() for p in (1, 2)))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock while training in it; a second process gets a one-line error."""
        import fcntl

        path = self.path / ".lock"
        f = open(path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise OsteoError(f"run {self.path} is being trained by {holder}; wait for it to finish "
                                 "(or stop it) before resuming") from None
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()} since "
                    f"{datetime.datetime.now().isoformat(timespec='seconds')}")
            f.flush()
            yield
        finally:
            f.close()  # closing releases the lock

    def check(self, need: Sequence[str] = ()) -> RunDir:
        """This run if it is a run directory with the files ``need``, else a one-line error."""
        if not self.is_run():
            raise OsteoError(f"{self.path} is not an osteo run directory (no {' and '.join(self.REQUIRED)}); "
                             "pass a folder under runs/<model>/")
        missing = [f for f in need if not (self.path / f).is_file()
                   and not (f == self.BEST and (self.path / self.LEGACY_BEST).is_file())]
        if missing:
            raise OsteoError(f"run {self.path} is unfinished (no {', '.join(missing)}); "
                             f"finish it with: osteo train --resume {self.path}")
        return self

    def split_id(self) -> str:
        """A short hash of ``split.csv``: runs with the same id scored the same images."""
        return hashlib.sha256(self.split_path.read_bytes()).hexdigest()[:12]

    # ------------------------------------------------------------------ JSON files

    def _read(self, path: Path, default: Any = None) -> Any:
        if default is not None and not path.exists():
            return default
        try:
            return read_json(path)
        except OSError as e:
            raise OsteoError(f"cannot read {path}: {e.strerror}; is this a finished run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OsteoError(f"{path} is damaged ({type(e).__name__}); re-run the step that writes it "
                             "(osteo eval, or train again)") from None

    def read_recipe(self) -> Recipe:
        """The resolved recipe the run was trained with."""
        from osteo.recipe import recipe_from_dict

        d = self.read_recipe_dict()
        if isinstance(d.get("model"), dict) and "impl" not in d["model"]:
            d["model"] = {**d["model"], "impl": "keras"}  # trained before the timm engine existed
        return recipe_from_dict(d)

    def read_recipe_dict(self) -> dict:
        return self._read(self.recipe_path)

    def write_recipe(self, recipe: Recipe) -> None:
        write_json(self.recipe_path, recipe.to_dict())

    def read_env(self) -> dict:
        return self._read(self.env_path, default={})

    def write_env(self, env: dict) -> None:
        write_json(self.env_path, env)

    def read_audit(self) -> dict:
        return self._read(self.audit_path, default={})

    def write_audit(self, audit: dict) -> None:
        write_json(self.audit_path, audit)

    def read_metrics(self) -> dict:
        return self._read(self.metrics_path, default={})

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_path, metrics)

    def write_manifest(self, rows: list[dict]) -> None:
        from osteo.data.scan import MANIFEST_COLUMNS

        write_csv(self.manifest_path, rows, MANIFEST_COLUMNS)

    def training_hashes(self) -> set[str] | None:
        """Content hashes (bytes and pixels) of the run's training images; None for a run without them."""
        if not self.manifest_path.exists():
            return None
        train = {r["path"] for r in self.read_split() if r["split"] == "train"}
        rows = read_csv(self.manifest_path, "train the run again to record its images' hashes")
        return {h for r in rows if r.get("path") in train for h in (r.get("sha256"), r.get("pixel_sha256")) if h}

    def read_calibration(self) -> dict:
        """``{"temperature": T, "operating_points": [...]}``; {} for a run not calibrated."""
        return self._read(self.calibration_path, default={})

    def write_calibration(self, calibration: dict) -> None:
        write_json(self.calibration_path, calibration)

    # ------------------------------------------------------------------ CSV files

    def read_split(self) -> list[dict]:
        from osteo.data.split import read_split

        return read_split(self.split_path)

    def write_split(self, split: list[dict]) -> None:
        from osteo.data.split import write_split

        write_split(self.split_path, split)

    def read_history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        return read_csv(self.history_path, "move it aside to continue without the curves")

    def read_predictions(self, split: str | None = None):
        """(labels, probabilities, rows) of one split of ``predictions.csv`` (all splits: None)."""
        path = self.predictions_path
        rows = read_csv(path, "is this a finished run directory? If it is, train the run again")
        if rows and not set(PREDICTION_COLUMNS) <= set(rows[0]):
            raise OsteoError(f"{path} is not an osteo predictions.csv (columns {', '.join(rows[0])})")
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        try:
            y = np.array([CLASSES.index(r["label"]) for r in rows], dtype=int)
            p = np.array([[float(r[c]) for c in PROB_COLUMNS] for r in rows], dtype=float).reshape(-1, len(CLASSES))
        except ValueError as e:
            raise OsteoError(f"{path} has a bad row ({e}); re-run `osteo eval` on a finished run") from None
        return y, p, rows

    def write_predictions(self, rows: Sequence[dict], probs: np.ndarray, split: str,
                          append_to: list[dict] | None = None) -> list[dict]:
        """Write (or extend) ``predictions.csv``; probabilities with 6 decimals, stable bytes."""
        out = list(append_to or [])
        for r, p in zip(rows, probs):
            out.append({
                "path": r["path"], "label": r["label"], "pred": CLASSES[int(np.argmax(p))],
                **{c: f"{float(v):.6f}" for c, v in zip(PROB_COLUMNS, p)}, "split": split,
            })
        write_csv(self.predictions_path, out, PREDICTION_COLUMNS)
        return out


class CvDir(_Folder):
    """A cross-validation: ``runs/<model>/<cv-id>/`` with ``cv.json`` and one run per fold.

    ``cv.json`` holds the number of folds, the split seed, the recipe's name and the
    members (``fold-1`` ... ``fold-K``), each a complete :class:`RunDir`. The folds
    come from the data layer (stratified, group-aware, duplicate-safe), so every
    non-excluded image is in exactly one fold's validation split.
    """

    MANIFEST = "cv.json"

    manifest_path = property(lambda self: self.path / self.MANIFEST)
    eval_path = property(lambda self: self.path / RunDir.EVAL)  # its folds' ensemble on other folders

    def is_cv(self) -> bool:
        return self.manifest_path.is_file()

    def read(self) -> dict:
        try:
            cv = read_json(self.manifest_path)
            if not (isinstance(cv, dict) and isinstance(cv.get("folds"), int) and cv["folds"] >= 2):
                raise ValueError("no fold count")
            return cv
        except OSError as e:
            raise OsteoError(f"cannot read {self.manifest_path}: {e.strerror}") from None
        except ValueError as e:
            raise OsteoError(f"{self.manifest_path} is damaged ({e}); start the cross-validation again") from None

    def start(self, folds: int, seed: int, recipe: str, model: str) -> CvDir:
        """Write ``cv.json`` for a new cross-validation, or check it matches an existing one."""
        want = {"folds": folds, "split_seed": seed, "recipe": recipe, "model": model,
                "members": [self.fold_name(i) for i in range(1, folds + 1)]}
        if self.is_cv():
            have = self.read()
            for key in ("folds", "split_seed", "model"):
                if have.get(key) != want[key]:
                    raise OsteoError(f"{self.path} is a cross-validation with {key} {have.get(key)}, not "
                                     f"{want[key]}; use another --cv folder")
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OsteoError(f"cannot create {self.path}: {e.strerror}; set RUNS= (--runs) to a writable "
                             "folder") from None
        write_json(self.manifest_path, want)
        return self

    @staticmethod
    def fold_name(i: int) -> str:
        return f"fold-{i}"

    def fold(self, i: int) -> RunDir:
        return RunDir(self.path / self.fold_name(i))

    def folds(self) -> list[RunDir]:
        return [self.fold(i) for i in range(1, self.read()["folds"] + 1)]

    def is_finished(self) -> bool:
        return self.is_cv() and all(f.is_finished() for f in self.folds())

    def training_hashes(self) -> set[str] | None:
        """Content hashes (bytes and pixels) of every image of the data its folds were made from,
        whatever its split: each one trained, or chose for, some fold model. None if a fold has
        no record of them."""
        hashes = set()
        for fold in self.folds():
            if not fold.manifest_path.exists():
                return None
            rows = read_csv(fold.manifest_path, "train the fold again to record its images' hashes")
            hashes |= {h for r in rows for h in (r.get("sha256"), r.get("pixel_sha256")) if h}
        return hashes


# --------------------------------------------------------------------------- finding runs


def new_run_dir(runs_dir: str | os.PathLike, model: str) -> RunDir:
    """A new, empty run directory ``runs_dir/model/<timestamp>[-N]`` (never an existing one)."""
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
            return RunDir(path)
        except FileExistsError:
            continue
        except OSError as e:
            raise OsteoError(f"cannot create run directory {path}: {e.strerror}; "
                             "set RUNS= (--runs) to a writable folder") from None
    raise OsteoError(f"too many runs started this second under {base}")


def create_run_dir(path: str | os.PathLike) -> RunDir:
    """A new run directory at exactly ``path`` (a cross-validation's fold); never an existing run."""
    run = RunDir(path)
    if run.is_run():
        raise OsteoError(f"{run.path} holds a run already; resume it with --resume {run.path}, or remove it")
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OsteoError(f"cannot create run directory {run.path}: {e.strerror}; "
                         "set RUNS= (--runs) to a writable folder") from None
    return run


def list_cvs(runs_dir: str | os.PathLike = "runs", finished: bool = False) -> list[CvDir]:
    """Cross-validations under ``runs_dir`` (``<model>/<cv-id>/cv.json``), oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    cvs = [CvDir(p.parent) for p in root.glob(f"*/*/{CvDir.MANIFEST}")]
    cvs = [c for c in cvs if c.is_finished()] if finished else cvs
    return sorted(cvs, key=lambda c: (c.name, c.model))


def list_runs(runs_dir: str | os.PathLike = "runs", model: str | None = None,
              finished: bool = False) -> list[RunDir]:
    """Run directories under ``runs_dir`` (of ``model``), oldest first."""
    root = Path(runs_dir) / model if model else Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [RunDir(p) for p in root.glob("*" if model else "*/*")]
    runs = [r for r in runs if (r.is_finished() if finished else r.is_run())]
    return sorted(runs, key=lambda r: (r.name, r.model))


def find_run(spec: str, runs_dir: str | os.PathLike = "runs", model: str | None = None) -> RunDir:
    """``latest`` (the newest resumable run, of ``model`` or of any) or a path -> a run to resume.

    A finished run is refused, and so is a run that failed before completing an epoch
    when it is asked for as ``latest``: nothing in it can be resumed.
    """
    if spec == "latest":
        runs = [r for r in list_runs(runs_dir, model) if r.is_resumable()]
        if not runs:
            where = Path(runs_dir) / model if model else Path(runs_dir)
            raise OsteoError(f"no unfinished run to resume under {where}; start one without --resume")
        return max(runs, key=lambda r: (r.path.stat().st_mtime, r.name))
    run = RunDir(spec).check()
    if run.is_finished() and not run.backup_path.exists():
        raise OsteoError(f"run {run.path} is finished (its {RunDir.METRICS} is written): there is nothing to "
                         f"resume; start a new run, or re-score it with: osteo eval {run.path}")
    return run


def use_backend_of(runs) -> None:
    """Before Keras is imported: the one backend an engine of ``runs`` needs, if any (timm's
    PyTorch module loads only on PyTorch; runs of Keras' layers load on either backend).

    An explicit ``KERAS_BACKEND`` is left as it is (loading then says what to do).
    """
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return
    for run in runs:
        path = Path(getattr(run, "path", run))
        if (path / CvDir.MANIFEST).is_file():  # a cross-validation: its folds were trained alike
            path = CvDir(path).fold(1).path
        try:
            required = get_engine(RunDir(path).read_recipe().model.impl).required_backend
        except (OsteoError, OSError, ValueError, AttributeError, TypeError):
            continue  # not a run, or a damaged one: the command itself says so
        if required:
            os.environ["KERAS_BACKEND"] = required
            return
