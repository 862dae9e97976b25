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
import math
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
PREDICTION_COLUMNS = ("path", "label", "pred", *PROB_COLUMNS, "split")  # what every reader needs
# what each row's probabilities are (as trained, calibrated, an ensemble's mean ...): written since
# 2026-12-06, so not required of a run's file
PROBABILITIES_COLUMN = "probabilities"
UNCALIBRATED = "uncalibrated"  # a model's own probabilities, as trained


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
    BEST_SHA256 = "best_weights_sha256"  # env.json's record of BEST's content, written when the run finishes
    LEGACY_BEST = "best.keras"  # runs made before: the whole model, loaded with Keras' safe_mode
    PREDICTIONS = "predictions.csv"
    METRICS = "metrics.json"
    MANIFEST = "manifest.csv"  # the audit's manifest: every file's content hashes (external overlap)
    CALIBRATION = "calibration.json"  # temperature and operating points (osteo.calibrate)
    MODEL_CARD = "MODEL_CARD.md"
    EVAL = "eval"  # external validations: eval/<folder-name>/
    EXPORT = "export"  # osteo export's default outputs
    EXPORT_RECORD = "export.json"  # beside an ONNX export: what it is and the parity measured
    SAVEDMODEL = "savedmodel"  # osteo export --format savedmodel's default folder, under EXPORT
    PORT_RECORD = "osteo_export.json"  # inside a SavedModel's folder: what it is and the parity measured
    KERAS_EXPORT = "model.keras"  # osteo export --format keras's default file, under EXPORT
    KERAS_RECORD_SUFFIX = ".json"  # beside a .keras export (model.keras.json): the parity measured
    BACKUP = ".backup"  # the resumable training state (TrainingState); removed when the run ends
    TENSORBOARD = "tensorboard"
    REQUIRED = (RECIPE, SPLIT)  # what makes a folder a run directory
    # A finished run has these, and no BACKUP: the Trainer removes it (one rename) after the
    # last file of the run is written, so a run killed while finishing is unfinished
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
    phase1_seeds_path = property(lambda self: self.backup_path / "phase1.seeds.npz")  # with these random states

    def phase_path(self, phase: int) -> Path:
        """Phase ``phase``'s TrainingState folder (its two slots and ``state.json``)."""
        return self.backup_path / f"phase{phase}"

    def phase_done_path(self, phase: int) -> Path:
        """The marker of a finished phase; it holds the epoch the phase ran to."""
        return self.backup_path / f"phase{phase}.done"

    # ------------------------------------------------------------------ state

    @staticmethod
    def owner_of(path: str | os.PathLike) -> RunDir | CvDir | None:
        """The run (or cross-validation) whose folder holds ``path``, at any depth, else None:
        the check every output makes before writing (:func:`check_output_place`), so no
        command writes into a run but in its own documented place (``eval/<folder>/`` holds
        an external validation, ``.backup/`` a killed run's resume state)."""
        target = Path(path).resolve()
        for folder in (target, *target.parents):
            if RunDir(folder).is_run():
                return RunDir(folder)
            if CvDir(folder).is_cv():
                return CvDir(folder)
        return None

    def is_run(self) -> bool:
        return self.path.is_dir() and all((self.path / f).is_file() for f in self.REQUIRED)

    def is_finished(self) -> bool:
        return (self.is_run() and all((self.path / f).is_file() for f in self.FINISHED)
                and not os.path.lexists(self.backup_path))

    def is_resumable(self) -> bool:
        """Unfinished: training resumes from the last committed epoch (or from its start, for a run
        killed in its first epoch) and a run killed while finishing finishes."""
        return self.is_run() and not self.is_finished()

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

    def check(self, need: Sequence[str] = (), finished: bool = False) -> RunDir:
        """This run if it is a run directory with the files ``need`` (and, if ``finished``, its
        training over: no resume state left), else a one-line error."""
        if not self.is_run():
            if CvDir(self.path).is_cv():
                raise OsteoError(f"{self.path} is a cross-validation, not one run: give one of its folds, e.g. "
                                 f"{self.path / CvDir.fold_name(1)} (osteo report and osteo eval --data take the "
                                 "cross-validation itself)")
            if not os.path.lexists(self.path):
                raise OsteoError(f"{self.path} does not exist; pass a run's folder, runs/<model>/<run-id>/")
            held = [RunDir(p) for p in sorted(self.path.glob("*"))] if self.path.is_dir() else []
            held = [r for r in held if r.is_run()] or list_runs(self.path)  # runs/<model>/, or runs/
            if held:  # runs/<model>/ (or runs/) given for one of the runs it holds
                raise OsteoError(f"{self.path} holds {len(held)} run(s), and is not one: pass one of them, e.g. "
                                 f"{held[-1].path}")
            raise OsteoError(f"{self.path} is not an osteo run directory (no {' and '.join(self.REQUIRED)}); "
                             "pass a folder under runs/<model>/")
        missing = [f for f in need if not (self.path / f).is_file()
                   and not (f == self.BEST and (self.path / self.LEGACY_BEST).is_file())]
        if missing or (finished and os.path.lexists(self.backup_path)):
            # a checkpoint of the middle of training, its calibration missing or stale
            raise OsteoError(f"run {self.path} is unfinished (" + (f"no {', '.join(missing)}: " if missing else "")
                             + "its training is going on, or was stopped before it ended); wait for it, or finish a "
                             f"stopped one with: osteo train --resume {self.path}")
        return self

    def split_id(self) -> str:
        """A short hash of ``split.csv``: runs with the same id scored the same images."""
        return hashlib.sha256(self.split_path.read_bytes()).hexdigest()[:12]

    # ------------------------------------------------------------------ JSON files

    def _read(self, path: Path, default: Any = None, fix: str = "re-run the step that writes it (osteo eval, "
              "or train again)") -> dict:
        """A JSON object of the run, checked against what its readers use (:data:`SHAPES`)."""
        if default is not None and not path.exists():
            return default
        try:
            value = read_json(path)
        except OSError as e:
            raise OsteoError(f"cannot read {path}: {e.strerror}; is this a finished run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OsteoError(f"{path} is damaged ({type(e).__name__}); {fix}") from None
        problem = _shape_problem(value, SHAPES.get(path.name, dict))
        if problem:
            raise OsteoError(f"{path} is damaged ({problem}); {fix}")
        return value

    def read_recipe(self) -> Recipe:
        """The resolved recipe the run was trained with, checked as it was when written
        (:func:`osteo.recipe.resolve` with ``saved``): a damaged or crafted value is a one-line error."""
        from osteo.recipe import recipe_from_dict, resolve

        d = self.read_recipe_dict()
        if isinstance(d.get("model"), dict) and "impl" not in d["model"]:
            d["model"] = {**d["model"], "impl": "keras"}  # trained before the timm engine existed
        try:
            return resolve(recipe_from_dict(d), saved=True)
        except OsteoError as e:
            raise OsteoError(f"{self.recipe_path} does not hold a valid recipe ({e}); train the run again") from None

    def read_recipe_dict(self) -> dict:
        return self._read(self.recipe_path)

    def write_recipe(self, recipe: Recipe) -> None:
        write_json(self.recipe_path, recipe.to_dict())

    def read_env(self) -> dict:
        # training writes it, and only training: a damaged one is not eval's to write again
        return self._read(self.env_path, default={}, fix="it is written by training: train the run again, or "
                          f"restore {self.env_path.name} from a copy of the run")

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

    def data_hashes(self) -> set[str] | None:
        """Content hashes (bytes and pixels) of every image of the run's split, whatever its side:
        training images trained the model, validation images chose its checkpoint, temperature
        and thresholds, and test images are the run's own; none is another hospital's. None for a
        run without them."""
        if not self.manifest_path.exists():
            return None
        used = {r["path"] for r in self.read_split()}
        rows = read_csv(self.manifest_path, "train the run again to record its images' hashes")
        return {h for r in rows if r.get("path") in used for h in (r.get("sha256"), r.get("pixel_sha256")) if h}

    def image_groups(self, rows: Sequence[dict]) -> list[str] | None:
        """The split's group (duplicates, patient: kept together by the split) of each of
        ``rows``' images, for a bootstrap that draws groups whole; None for a run whose split
        records none (or a row it does not hold)."""
        groups = {r["path"]: r.get("group") for r in self.read_split()}
        found = [groups.get(r["path"]) for r in rows]
        return None if not all(found) else found

    def image_decoding(self) -> str | None:
        """How the run's files became pixels (``env.json``'s ``image_decoding``, the image cache's
        version); a run from before it was recorded decoded as v3. None where ``env.json`` cannot
        be read (unknown: its readers say so themselves)."""
        try:
            return str(self.read_env().get("image_decoding") or "v3")
        except OsteoError:
            return None

    def read_manifest(self) -> dict[str, dict]:
        """The manifest of the audit that made the run (or of an external folder scored under
        ``eval/``), by path ({} where there is none)."""
        if not self.manifest_path.exists():
            return {}
        rows = read_csv(self.manifest_path, "train a new run: this one's record of its images is damaged")
        return {r["path"]: r for r in rows if r.get("path")}

    def content_sha256(self) -> dict[str, str]:
        """Each image its audit read: the sha256 of its bytes, by path (:meth:`read_manifest`)."""
        return {p: r["sha256"] for p, r in self.read_manifest().items() if r.get("sha256")}

    def read_calibration(self) -> dict:
        """``{"temperature": T, "operating_points": [...]}``; {} for a run not calibrated. Checked
        as :mod:`osteo.calibrate` writes it: T finite and above 0 (0 or NaN made every probability
        NaN, -1 inverted the ranking), each operating point's threshold in [0, 1] and its classes
        the ones its name says."""
        fix = f"calibrate the run again with: osteo calibrate {self.path}"
        cal = self._read(self.calibration_path, default={}, fix=fix)
        problem = _calibration_problem(cal)
        if problem:
            raise OsteoError(f"{self.calibration_path} is damaged ({problem}); {fix}")
        return cal

    def write_calibration(self, calibration: dict) -> None:
        write_json(self.calibration_path, calibration)

    # ------------------------------------------------------------------ CSV files

    def read_split(self) -> list[dict]:
        from osteo.data.split import read_split

        rows = read_split(self.split_path)
        _check_rows(self.split_path, rows, ("train", "val", "test"), "a run's split cannot be repaired: train a new run")
        return rows

    def write_split(self, split: list[dict]) -> None:
        from osteo.data.split import write_split

        write_split(self.split_path, split)

    def read_history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        fix = "move it aside to continue without the curves"
        rows = read_csv(self.history_path, fix)
        for i, row in enumerate(rows, start=2):  # resume counts epochs by it
            if not (row.get("epoch") or "").isdigit():
                raise OsteoError(f"{self.history_path} line {i}: epoch {row.get('epoch')!r} is not a number; {fix}")
        return rows

    def read_predictions(self, split: str | None = None):
        """(labels, probabilities, rows) of one split of ``predictions.csv`` (all splits: None)."""
        path = self.predictions_path
        rows = read_csv(path, "is this a finished run directory? If it is, train the run again")
        if rows and not set(PREDICTION_COLUMNS) <= set(rows[0]):
            raise OsteoError(f"{path} is not an osteo predictions.csv (columns {', '.join(rows[0])})")
        _check_rows(path, rows, ("val", "test", "external"), "re-run `osteo eval` on a finished run")
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        try:
            y = np.array([CLASSES.index(r["label"]) for r in rows], dtype=int)
            p = np.array([[float(r[c]) for c in PROB_COLUMNS] for r in rows], dtype=float).reshape(-1, len(CLASSES))
        except ValueError as e:
            raise OsteoError(f"{path} has a bad row ({e}); re-run `osteo eval` on a finished run") from None
        return y, p, rows

    def write_predictions(self, rows: Sequence[dict], probs: np.ndarray, split: str, probabilities: str,
                          append_to: list[dict] | None = None) -> list[dict]:
        """Write (or extend) ``predictions.csv``; probabilities with 6 decimals, stable bytes; each
        row says what its probabilities are (``probabilities``: "uncalibrated", ...)."""
        out = list(append_to or [])
        for r, p in zip(rows, probs):
            out.append({
                "path": r["path"], "label": r["label"], "pred": CLASSES[int(np.argmax(p))],
                **{c: f"{float(v):.6f}" for c, v in zip(PROB_COLUMNS, p)}, "split": split,
                PROBABILITIES_COLUMN: probabilities,
            })
        write_csv(self.predictions_path, out, (*PREDICTION_COLUMNS, PROBABILITIES_COLUMN))
        return out


# What the readers of a run's JSON files use, by file: a type (or types), {key: shape} for an
# object (keys optional, except in list items) or [shape] for a list. A file that differs (a
# list where an object is, a number where a folder name is) is damaged: one line, no traceback.
_NUMBER = (int, float)
_MAYBE_NUMBER = (int, float, type(None))
SHAPES: dict[str, Any] = {
    RunDir.RECIPE: dict,  # and resolve()'s checks
    RunDir.ENV: {"backend": str, "precision": str, "device": dict, "git_commit": str, "command": str,
                 "excluded_conflicts": int, "n_train": int, "n_val": int, "n_test": int, "params": int,
                 "train_seconds": _MAYBE_NUMBER, "train_images_per_sec": _MAYBE_NUMBER, RunDir.BEST_SHA256: str},
    RunDir.AUDIT: {"data_dir": str, "n_files": int, "n_ok": int, "classes": dict, "ignored": [str],
                   "unreadable": [{"path": str, "reason": str}],
                   "duplicate_groups": [{"kind": str, "conflict": bool, "paths": [str], "labels": [str]}]},
    RunDir.METRICS: {"model": str, "monitor": str, "best_epoch": (int, type(None)), "val": dict, "test": dict,
                     "external": dict, "operating_points": [{"name": str, "threshold": _NUMBER}]},
    RunDir.CALIBRATION: {"temperature": _NUMBER, "operating_points": [dict]},
}


def _shape_problem(value: Any, shape: Any, where: str = "", required: bool = False) -> str | None:
    """Why ``value`` does not have ``shape`` (see :data:`SHAPES`), else None."""
    name = where or "the file"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{name} is {_kind(type(value))}, not an object"
        for key, sub in shape.items():
            if key not in value:
                if required:
                    return f"{name} has no {key!r}"
                continue
            problem = _shape_problem(value[key], sub, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{name} is {_kind(type(value))}, not a list"
        for i, item in enumerate(value):
            problem = _shape_problem(item, shape[0], f"{where}[{i}]", required=True)
            if problem:
                return problem
        return None
    types = shape if isinstance(shape, tuple) else (shape,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        return f"{name} is {_kind(type(value))}, not {' or '.join(_kind(t) for t in types)}"
    return None


def _kind(kind: type) -> str:
    """A JSON type as the messages name it."""
    return {dict: "an object", list: "a list", str: "text", bool: "true or false", type(None): "null",
            int: "an integer"}.get(kind, "a number")


def _calibration_problem(cal: dict) -> str | None:
    """What :func:`osteo.calibrate.calibrate_run` would never have written into ``cal``, else None."""
    from osteo.recipe import parse_operating_point

    t = cal.get("temperature", 1.0)
    if not math.isfinite(t) or t <= 0:
        return f"temperature {t!r}, which is not a positive number (finite, above 0)"
    for point in cal.get("operating_points", []):
        if "threshold" not in point:  # one that could not be chosen: its error is recorded instead
            continue
        name, threshold = point.get("name"), point["threshold"]
        try:
            spec = parse_operating_point(f"{name}:{point.get('target')}={point.get('value')}")
        except OsteoError:
            return f"operating point {name!r} is not CLASS[+] with a sensitivity or specificity in (0, 1)"
        if point.get("positive") != spec["positive"]:
            return f"operating point {name}: its classes {point.get('positive')!r} are not the ones its name says"
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1 + 1e-6:
            return f"operating point {name}: threshold {threshold!r} is not a probability"
    return None


def _check_rows(path: Path, rows: list[dict], splits: Sequence[str], fix: str) -> None:
    """Each row of a run's CSV names an image under its data folder (relative, no ``..``), one
    of the classes and one of ``splits``: a crafted path would make the report read, and
    embed in its page, any image on the machine."""
    from pathlib import PurePosixPath

    for i, row in enumerate(rows, start=2):  # line 1 is the header
        name = PurePosixPath(row.get("path") or "")
        if not name.parts or name.is_absolute() or ".." in name.parts:
            raise OsteoError(f"{path} line {i}: {str(name)!r} is not a path inside the data folder; {fix}")
        if row.get("label") not in CLASSES or row.get("split") not in splits:
            raise OsteoError(f"{path} line {i}: label {row.get('label')!r} or split {row.get('split')!r} is not "
                             f"one of {', '.join(CLASSES)} / {', '.join(splits)}; {fix}")


def check_output_place(path: str | os.PathLike, option: str, fix: str, own: str | os.PathLike | None = None,
                       data: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None,
                       folder: bool = False) -> None:
    """A command's output ``path`` lies outside every run and cross-validation folder, or inside
    ``own``, the command's documented place in its run (``RUN/eval/<folder>/``, ``RUN/export/``);
    outside every class folder of a dataset and outside ``data``, the command's input folder;
    outside the folders that class folders of ``dataset`` (default ``data``; the audit's and the
    split's input, which may hold their outputs) link to; else a one-line error: no command
    writes into a run, nor where osteo's next audit would meet what it wrote (the class
    folder's, or ``data``'s, one names a place outside). An output ``folder`` is not a file."""
    if folder and os.path.lexists(path) and not os.path.isdir(path):
        raise OsteoError(f"{option} {path} is a file, not a folder; give the name of a folder (new, or one osteo "
                         "wrote)")
    target = Path(path).resolve()
    if data is not None and Path(data).is_dir() and target.is_relative_to(Path(data).resolve()):
        inside = Path(data).resolve()
        outside = inside.parent / (target.name if target != inside else f"{target.name}-{option.strip('-')}")
        raise OsteoError(f"{option} {path} is inside {data}, the folder the command reads images from, where osteo "
                         f"would meet what it writes at every audit; write outside it, e.g. {option} {outside}")
    dataset = data if dataset is None else dataset
    linked = _linked_class_folder(target, dataset)
    if linked is not None:
        raise OsteoError(f"{option} {path} is inside {linked.resolve()}, where {linked}, a class folder of "
                         f"{dataset}, links: osteo would audit what it writes there as {linked.name} files; {fix}")
    folder = class_folder_above(target)
    if folder is not None:
        raise OsteoError(f"{option} {path} is inside {folder}, a class folder of the dataset {folder.parent}: "
                         f"osteo would audit what it writes there as {folder.name} files (images, plots too); {fix}")
    owner = RunDir.owner_of(path)
    if owner is None or (own is not None and target.is_relative_to(Path(own).resolve())):
        return
    if isinstance(owner, RunDir) and target.parent == owner.path and \
            target.name in {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str)}:
        raise OsteoError(f"{option} {path} would overwrite the run's own {target.name}; {fix}")
    what = "cross-validation" if isinstance(owner, CvDir) else "run"
    raise OsteoError(f"{option} {path} is inside the {what} {owner.path}, where osteo writes only that {what}'s own "
                     f"files; {fix}")


def _linked_class_folder(target: Path, data: str | os.PathLike | None) -> Path | None:
    """The class folder of ``data`` that is a link to a folder ``target`` (resolved) lies in, if any:
    the audit follows such links, and the folder they reach is named as anything."""
    if data is None:
        return None
    try:
        folders = [p for p in Path(data).iterdir() if p.name.lower() in CLASSES and p.is_symlink() and p.is_dir()]
    except OSError:
        return None
    return next((p for p in folders if target.is_relative_to(p.resolve())), None)


def class_folder_above(path: Path) -> Path | None:
    """The class folder of a dataset that ``path`` (resolved) is or lies in: a folder named as a
    class (any case) beside at least one other class folder; None if there is none."""
    for folder in (path, *path.parents):
        if folder.name.lower() in CLASSES and folder.parent != folder:
            try:
                others = [p for p in folder.parent.iterdir() if p.name.lower() in CLASSES and p.name != folder.name]
            except OSError:
                continue
            if any(p.is_dir() for p in others):
                return folder
    return None


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
        from osteo.recipe import MAX_FOLDS

        try:
            cv = read_json(self.manifest_path)
            folds = cv.get("folds") if isinstance(cv, dict) else None
            if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
                raise ValueError(f"fold count {folds!r}, not from 2 to {MAX_FOLDS}")
            return cv
        except OSError as e:
            raise OsteoError(f"cannot read {self.manifest_path}: {e.strerror}") from None
        except ValueError as e:
            raise OsteoError(f"{self.manifest_path} is damaged ({e}); start the cross-validation again") from None

    def start(self, folds: int, seed: int, recipe: str, model: str, settings: str = "",
              data: str | os.PathLike | None = None) -> CvDir:
        """Write ``cv.json`` for a new cross-validation, or check it matches an existing one.
        ``settings`` (a hash of the recipe, :func:`osteo.session.cv_settings`) lets the same
        ``osteo train --folds`` command find and continue it after a kill; ``data``, the folder its
        folds read, is a place it is never made in."""
        want = {"folds": folds, "split_seed": seed, "recipe": recipe, "model": model, "settings": settings,
                "members": [self.fold_name(i) for i in range(1, folds + 1)]}
        if self.is_cv():
            have = self.read()
            for key in ("folds", "split_seed", "model"):
                if have.get(key) != want[key]:
                    raise OsteoError(f"{self.path} is a cross-validation with {key} {have.get(key)}, not "
                                     f"{want[key]}; use another --cv folder")
            return self
        self.check_place(data)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OsteoError(f"cannot create {self.path}: {e.strerror}; set RUNS= (--runs) to a writable "
                             "folder") from None
        write_json(self.manifest_path, want)
        return self

    def check_place(self, data: str | os.PathLike | None = None) -> None:
        """A new cross-validation's folder is outside every run and ``data`` (the folder its folds read)."""
        check_output_place(self.path, "--cv", "choose a folder outside it", data=data, folder=True)

    @staticmethod
    def fold_name(i: int) -> str:
        return f"fold-{i}"

    def fold(self, i: int) -> RunDir:
        return RunDir(self.path / self.fold_name(i))

    def _on_disk(self) -> int:
        """How many fold folders exist: what bounds the folds a reader builds (a cv.json naming
        3 million folds made the report build them all before checking one)."""
        try:
            return sum(1 for e in os.scandir(self.path) if e.name.startswith("fold-") and e.is_dir())
        except OSError:
            return 0

    def folds(self) -> list[RunDir]:
        k, found = self.read()["folds"], self._on_disk()
        if k > found:
            raise OsteoError(f"{self.manifest_path} names {k} folds, {found} of them on disk; finish the "
                             "cross-validation: run the osteo train command that started it again (with "
                             f"--cv {self.path})")
        return [self.fold(i) for i in range(1, k + 1)]

    def is_finished(self) -> bool:
        """Every fold finished (False for a damaged ``cv.json``: the report names it as unfinished)."""
        try:
            k = self.read()["folds"] if self.is_cv() else 0
        except OsteoError:
            return False
        return 0 < k <= self._on_disk() and all(self.fold(i).is_finished() for i in range(1, k + 1))

    def data_hashes(self) -> set[str] | None:
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
    check_output_place(base, "--runs", "choose a runs folder outside it", folder=True)
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
    """``latest`` (the newest unfinished run, of ``model`` or of any) or a path -> a run to resume.

    A finished run is refused. A run killed before its first epoch was committed starts
    again from its first epoch (its split kept); one killed while finishing finishes.
    """
    if spec == "latest":
        runs = [r for r in list_runs(runs_dir, model) if r.is_resumable()]
        if not runs:
            where = Path(runs_dir) / model if model else Path(runs_dir)
            raise OsteoError(f"no unfinished run to resume under {where}; start one without --resume")
        return max(runs, key=lambda r: (r.path.stat().st_mtime, r.name))
    run = RunDir(spec).check()
    if run.is_finished():
        raise OsteoError(f"run {run.path} is finished (its {RunDir.METRICS} is written): there is nothing to "
                         f"resume; start a new run, or re-score it with: osteo eval {run.path}")
    return run


def use_backend_of(runs, set_aside: bool = False) -> str | None:
    """Before Keras is imported: the one backend an engine of ``runs`` needs, if any (timm's
    PyTorch module loads only on PyTorch; runs of Keras' layers load on either backend).

    An explicit ``KERAS_BACKEND`` is left as it is, unless ``set_aside`` (a command that cannot
    do without the run's model: eval, predict, export), as ``osteo train --resume`` sets it aside
    for the run's own; returns the line that says so (None where nothing was set aside). Once
    Keras is imported nothing changes (loading then says what to do).
    """
    explicit = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules or (explicit and not set_aside):
        return None
    for run in runs:
        path = Path(getattr(run, "path", run))
        if (path / CvDir.MANIFEST).is_file():  # a cross-validation: its folds were trained alike
            path = CvDir(path).fold(1).path
        try:
            engine = get_engine(RunDir(path).read_recipe().model.impl)
        except (OsteoError, OSError, ValueError, AttributeError, TypeError):
            continue  # not a run, or a damaged one: the command itself says so
        required = engine.required_backend
        if required:
            os.environ["KERAS_BACKEND"] = required
            if explicit and explicit != required:
                return (f"KERAS_BACKEND={explicit} is set, but {path.name} was trained on the {engine.name} engine, "
                        f"which runs on {required} only: using {required}")
            return None
    return None
