"""Use a finished run: ``osteo predict RUN_DIR IMAGES...`` and ``osteo eval RUN_DIR --data FOLDER``.

The run's model is rebuilt from its ``recipe.json`` and its ``best.weights.h5`` loaded
into it (weights only: nothing in a run's folder is executed or unpickled); images are decoded, resized and quantised by
the training cache's own function (:func:`osteo.data.pipeline.load_levels`), so a run's own validation images get back
its ``predictions.csv`` probabilities. The run's temperature (``calibration.json``) is applied unless
``calibrated=False``, and its operating points turn the calibrated probabilities into
screening decisions (none with ``calibrated=False``: a threshold holds for the probabilities it
was chosen on). ``tta`` averages the probabilities over the image, its mirror and small
shifts. Files that cannot be decoded get ``status=unreadable`` and a reason.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from osteo import CLASSES, killpoints
from osteo.data.scan import AUDIT_MARKS
from osteo.errors import OsteoError
from osteo.evaluate import chosen_points
from osteo.export_predict import NOT_UTF8
from osteo.export_predict import shown as _display
from osteo.files import (
    all_or_none,
    check_output,
    folder_lock,
    folder_locks,
    owned_prefix,
    refuse_foreign_files,
    sha256_file,
    some_of,
    sweep_temporaries,
    temporaries_of,
    umask,
    write_csv,
)
from osteo.model_card import write_model_card
from osteo.runs import PROB_COLUMNS, UNCALIBRATED, CvDir, RunDir, check_output_place

log = logging.getLogger("osteo")

COLUMNS = ("path", "status", "pred", *PROB_COLUMNS, "reason")
TTA_SHIFT = 1 / 16  # of the image side, both ways, on top of the mirror


def load_best(run_dir: str | os.PathLike):
    """The run's best model: rebuilt from its resolved recipe, its best weights loaded.

    A run's engine decides the Keras backends it loads on (the timm engine: PyTorch; the
    CLI picks it, :func:`osteo.runs.use_backend_of`); a Keras-layers run loads on either.
    """
    import keras

    from osteo.backbones.keras_apps import check_h5_weights
    from osteo.classifier import Classifier
    from osteo.device import get_engine

    # a run still training (or killed) has a mid-training checkpoint and no calibration yet
    run = RunDir(run_dir).check(need=(RunDir.BEST,), finished=True)
    if not run.best_path.is_file():  # a run made before checkpoints were weights only
        return load_legacy_best(run)
    recipe = run.read_recipe()  # checked as when it was written
    get_engine(recipe.model.impl).check_backend(keras.backend.backend(), f"run {run.path}")
    fix = "the file is damaged or from another osteo version: retrain the run"
    try:
        trained = run.read_env().get(RunDir.BEST_SHA256)  # None for runs finished before it was recorded
    except OsteoError as e:  # the record is unreadable, not the checkpoint: loaded, unchecked, and said
        log.warning("cannot check %s against the run's record: %s", run.best_path.name, e)
        trained = None
    if trained and sha256_file(run.best_path) != trained:
        raise OsteoError(f"{run.best_path} is not the checkpoint this run trained (its sha256 differs from the one "
                         f"{run.env_path.name} recorded): it was damaged or replaced since; restore it from a backup, "
                         "or retrain the run")
    # float32, and the timm engine channels-last whatever layout it trained in: the weights do not
    # depend on it, and channels-last predicts faster on every backbone measured, where channels-first
    # trains faster too (VGG on AVX2 CPUs: benchmarks/layout.py --infer, benchmarks/README.md)
    model = Classifier.from_recipe(recipe, weights="none").build()
    check_h5_weights(run.best_path, model, f"the model of {run.recipe_path}", fix)
    try:
        model.load_weights(run.best_path)
    except Exception as e:
        raise OsteoError(f"cannot load {run.best_path}: {type(e).__name__}: {str(e)[:200]}; {fix}") from None
    return model


def load_legacy_best(run: RunDir):
    """A ``best.keras`` of a run made before checkpoints were weights only (Keras' safe_mode)."""
    import keras

    import osteo.classifier  # noqa: F401  (registers osteo's serializable layers, losses, metrics)

    try:
        return keras.saving.load_model(run.legacy_best_path, safe_mode=True)
    except Exception as e:
        raise OsteoError(f"cannot load {run.legacy_best_path}: {type(e).__name__}: {str(e)[:200]}; "
                         "the file is damaged or from another osteo version: retrain the run") from None


def _expand(paths: list[str], not_utf8: set | None = None) -> tuple[list[Path], list[str]]:
    """Every file named, and every image below every folder named, as the audit chooses them
    (:func:`osteo.export_predict.image_file`: by its extension, or DICOM by its bytes; hidden and
    system files and folders aside); the other files found are left out, with one warning.
    Linked folders are followed, as the audit follows them, each real folder once (a link
    loop is not walked again), but not one that holds the folder named (a link to ``..`` or
    ``/``, which would walk far outside what was asked): skipped with a warning.

    A file named is read whatever its extension: the decoder decides by content, and a file it
    cannot read gets a row saying why (one whose name is not UTF-8 is not read: below). Returns (the files, the folders that could not be listed:
    each said in one warning, and the exit status is then 1, as for an unreadable file); each file
    whose name is not UTF-8 (:func:`osteo.export_predict.name_not_utf8`) also goes into ``not_utf8``.
    """
    from osteo.export_predict import name_not_utf8, walk_images

    out, unlisted = [], []

    def unlistable(e: OSError) -> None:  # os.walk skips a folder it cannot list, silently
        unlisted.append(_display(Path(e.filename)))
        log.warning("cannot list %s: %s; its files are not predicted", unlisted[-1], e.strerror)

    for p in map(Path, paths):
        if p.is_dir():
            images, left_out = walk_images(
                p, unlistable=unlistable,
                not_followed=lambda link, target, top=p: log.warning(
                    "not following %s: it links to %s, which holds %s", _display(link), _display(target), _display(top)))
            if left_out:
                log.warning("%d file(s) in %s are not images osteo reads (by their name, or DICOM by their bytes), "
                            "e.g. %s: left out", len(left_out), _display(p), _display(left_out[0]))
            out += images
            if not_utf8 is not None:
                not_utf8.update(f for f in images if name_not_utf8(f, p))
        elif p.exists() or p.is_symlink():
            out.append(p)
            if not_utf8 is not None and name_not_utf8(p):
                not_utf8.add(p)
        else:
            raise OsteoError(f"{p} does not exist; pass image files or folders")
    return out, unlisted


def _op_column(name: str) -> str:
    """``osteopenia+`` -> ``screen_osteopenia_or_worse``."""
    return "screen_" + name.replace("+", "_or_worse")


# the reason column of a row whose image is blank: predicted all the same, as the audit trains on such images
BLANK = "blank: every pixel one gray level, no picture of a knee (a failed export, a placeholder?)"
# ... and of a row whose image has transparent pixels: read by their colour, as training reads them
TRANSPARENT = "transparent: some pixels less than opaque, read by their colour with the transparency dropped"


def load_images(paths: list[Path], size: int, resize: str) -> tuple[list[np.ndarray | None], list[str]]:
    """Each file decoded and resized as training does it, or None with the reason why not; a blank
    image is decoded all the same, its reason :data:`BLANK` (one with transparent pixels:
    :data:`TRANSPARENT`)."""
    from osteo.data.decode import DecodeError, read_file, unexpected_failure
    from osteo.data.pipeline import SCALE, load_levels

    images, reasons = [], []
    for f in paths:
        try:
            levels, gray = load_levels(read_file(f), size, resize)  # what the training cache holds
        except OsteoError:
            raise
        except Exception as e:  # as in the audit, one file's failure is its row's reason, not the command's end
            images.append(None)
            reasons.append(str(e) if isinstance(e, DecodeError) else "out of memory while decoding it; downscale it"
                           if isinstance(e, MemoryError) else unexpected_failure(e))
            continue
        images.append(levels.astype(np.float32) / np.float32(SCALE))
        reasons.append(BLANK if gray.one_value() else TRANSPARENT if gray.info.transparent else "")
    return images, reasons


_SAID_DECODING: set[str] = set()


def say_if_decoded_otherwise(run: RunDir) -> None:
    """A run trained before osteo changed how files become pixels, on images of a kind a change
    touched (its manifest): one warning line, since its model and thresholds saw some images
    otherwise than they are read now."""
    from osteo.data.pipeline import CACHE_VERSION, decoding_changes, decoding_touches

    was = run.image_decoding()
    if was in (None, CACHE_VERSION) or was in _SAID_DECODING:  # once: an ensemble's folds share it
        return
    with contextlib.suppress(OsteoError):  # a damaged manifest: unknown, said as the change may touch them
        if not decoding_touches(was, run.read_manifest().values()):  # 8-bit PNGs since v4: nothing changed
            return
    _SAID_DECODING.add(was)
    log.warning("run %s was trained with osteo's image decoding %s, and images now decode as %s (%s), so its "
                "numbers on such images are not the ones it was trained and calibrated on; retrain it to match",
                run.path, was, CACHE_VERSION, decoding_changes(was))


def say_if_uncalibrated(run: RunDir) -> None:
    """A finished run without ``calibration.json`` (removed, or lost in a copy): one warning line,
    since its probabilities are then the raw ones (T = 1) and no operating point decides."""
    if not run.calibration_path.exists():
        log.warning("run %s has no %s: its probabilities are not calibrated (temperature 1) and no operating point "
                    "decides; calibrate it with: osteo calibrate %s", run.path, run.calibration_path.name, run.path)


class Predictor:
    """A run's best model with its input size, calibration and operating points."""

    def __init__(self, run_dir: str | os.PathLike, calibrated: bool = True, tta: bool = False):
        self.run = RunDir(run_dir).check(need=(RunDir.BEST,), finished=True)
        self.model = load_best(self.run)
        data = self.run.read_recipe().data  # resolved: the size and resize mode it trained with
        self.size, self.resize = data.image_size, data.resize
        say_if_decoded_otherwise(self.run)
        if calibrated:
            say_if_uncalibrated(self.run)
        calibration = self.run.read_calibration()
        self.calibration = calibration  # as read: eval measures again where a calibrate replaced it since
        self.temperature = float(calibration.get("temperature", 1.0)) if calibrated else 1.0
        self.points = chosen_points(calibration)
        if self.points and not calibrated:  # a threshold holds for the probabilities it was chosen on
            log.warning("the model's own probabilities (not calibrated) leave out the screening columns (%s): their "
                        "thresholds were chosen on calibrated probabilities; predict without --no-calibration for "
                        "them", ", ".join(_op_column(p["name"]) for p in self.points))
            self.points = []
        self.tta = tta
        # a calibration that failed (a diverged run) records temperature 1 beside its error: not calibrated
        self._calibrated = calibrated and "temperature" in calibration and "error" not in calibration

    def probabilities(self) -> str:
        """What the probabilities it gives are, as its predictions CSV says in each row."""
        return self._with_tta(self._made())

    def raw_probabilities(self) -> str:
        """What :meth:`raw`'s probabilities are (before :meth:`calibrate`), as eval's predictions.csv says."""
        return self._with_tta(UNCALIBRATED)

    def _with_tta(self, made: str) -> str:
        return made + (", averaged over test-time augmentation" if self.tta else "")

    def _made(self) -> str:
        return (f"calibrated (temperature {self.temperature:.4g}, fitted on validation)" if self._calibrated
                else UNCALIBRATED)

    def _views(self, x: np.ndarray) -> list[np.ndarray]:
        if not self.tta:
            return [x]
        shift = max(1, round(self.size * TTA_SHIFT))
        left, right = np.zeros_like(x), np.zeros_like(x)
        left[:, :, :-shift], right[:, :, shift:] = x[:, :, shift:], x[:, :, :-shift]
        return [x, x[:, :, ::-1], left, right]

    def raw(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        """The model's probabilities (averaged over the TTA views), before calibration."""
        views = self._views(np.asarray(images, dtype="float32"))
        return np.mean([self.model.predict(v, batch_size=batch, verbose=0) for v in views], axis=0)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        from osteo.calibrate import apply_temperature

        return apply_temperature(probs, self.temperature) if self.temperature != 1.0 else np.asarray(probs)

    def decisions(self, calibrated: np.ndarray) -> dict[str, list[str]]:
        """Per operating point: positive / negative for each image (thresholds on calibrated probabilities)."""
        from osteo.calibrate import positive_score

        return {_op_column(p["name"]): ["positive" if s >= p["threshold"] else "negative"
                                        for s in positive_score(calibrated, p["positive"])] for p in self.points}

    def predict_paths(self, paths: list[Path], batch: int = 32,
                      progress: Callable[[int, int], None] | None = None, not_utf8: frozenset | set = frozenset()):
        """(rows, raw probabilities of the readable ones, their images); rows keep the input order.
        The files of ``not_utf8`` (names that are not UTF-8: :func:`_expand`) are not read: their row
        says :data:`~osteo.export_predict.NOT_UTF8`, as the audit's list does."""
        rows, ready, arrays = [], [], []
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            read = [f for f in chunk if f not in not_utf8]
            loaded = dict(zip(read, zip(*load_images(read, self.size, self.resize), strict=True)))
            for f in chunk:
                img, reason = loaded.get(f, (None, NOT_UTF8))
                row = {"path": _display(f), "status": "ok" if img is not None else "unreadable", "reason": reason}
                rows.append(row)
                if img is not None:
                    ready.append(row)
                    arrays.append(img)
            if progress:
                progress(min(start + batch, len(paths)), len(paths))
        images = np.stack(arrays) if arrays else np.zeros((0, self.size, self.size, 1), "float32")
        raw = self.raw(images, batch) if len(images) else np.zeros((0, len(CLASSES)), "float32")
        probs = self.calibrate(raw)
        for row, p in zip(ready, probs):
            row["pred"] = CLASSES[int(np.argmax(p))]
            row.update({c: f"{float(v):.6f}" for c, v in zip(PROB_COLUMNS, p)})
        for column, values in self.decisions(probs).items():
            for row, v in zip(ready, values):
                row[column] = v
        return rows, raw, images


class Ensemble(Predictor):
    """A cross-validation's fold models as one model (``osteo eval CV --data FOLDER``; a study's
    final model of a backbone). An image's probabilities are the mean of the members' calibrated
    ones, each member at its own temperature, so the ensemble has no temperature of its own; an
    operating point decides at the mean of the members' thresholds (the mean score above the
    mean threshold: the members' margins, on average, positive). Each member chose its
    checkpoint, temperature and thresholds on its own validation split, so a folder it scores
    chooses nothing. Files are read and decided as :class:`Predictor` does."""

    def __init__(self, cv_dir: str | os.PathLike, tta: bool = False):
        self.run = CvDir(cv_dir)
        unfinished = [f.name for f in self.run.folds() if not f.is_finished()]
        if unfinished:
            raise OsteoError(f"cross-validation {self.run} is unfinished ({', '.join(unfinished)}); finish it with: "
                             f"osteo train ... --cv {self.run} --fold I")
        self.members = [Predictor(f, calibrated=True, tta=tta) for f in self.run.folds()]
        inputs = {(m.size, m.resize) for m in self.members}
        if len(inputs) > 1:  # a fold trained by hand with other --image-size
            raise OsteoError(f"the folds of {self.run} take different inputs ({sorted(inputs)}); score each fold "
                             "on its own: osteo eval FOLD --data FOLDER")
        (self.size, self.resize), = inputs
        self.temperature, self.tta = 1.0, tta
        self.points = _mean_points([m.points for m in self.members], f"the folds of {self.run}")

    def raw_probabilities(self) -> str:  # its raw probabilities are its members' calibrated ones
        return self.probabilities()

    def _made(self) -> str:
        calibrated = sum(m._calibrated for m in self.members)
        return ("the mean of the folds' calibrated probabilities" if calibrated == len(self.members) else
                f"the mean of the folds' probabilities ({calibrated} of {len(self.members)} calibrated)")

    def raw(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        return np.mean([m.calibrate(m.raw(images, batch)) for m in self.members], axis=0)


def _mean_points(members: list[list[dict]], where: str) -> list[dict]:
    """The operating points every member chose for one goal (:func:`osteo.calibrate.shared_points`),
    each at the mean of the members' thresholds."""
    from osteo.calibrate import MEAN_THRESHOLD, shared_points

    keep = ("name", "positive", "target", "value")
    return [{**{k: parts[0][k] for k in keep}, "threshold": float(np.mean([p["threshold"] for p in parts])),
             "chosen_on": MEAN_THRESHOLD}
            for parts in shared_points(members, where)]


class Predictions(NamedTuple):
    """What :func:`predict_files` wrote: the CSV, its rows, how many of them are unreadable, and
    how many folders below those named could not be listed (their files have no row)."""

    out: Path
    rows: int
    unreadable: int
    unlisted: int = 0


def predict_files(run_dir: str | os.PathLike, images: list[str], out: str | os.PathLike, batch: int = 32,
                  calibrated: bool = True, tta: bool = False, gradcam_dir: str | os.PathLike | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Predictions:
    """Classify files and folders (recursively, DICOM included) into ``out``; unreadable files get a row.

    Unreadable files are also counted in one warning (the CLI then exits 1, as an export's
    predict.py does); when no file could be read, the CSV (each file's reason) is written and
    then an OsteoError says so.

    Every output is checked before the first image is read: ``out`` must not be in a run's
    folder nor be anything but a file, and ``gradcam_dir`` must not hold files osteo did not
    write under an overlay's name (the input images, when it is their folder).
    """
    from osteo.data.decode import refuse_to_replace_an_image
    from osteo.explain import overlay_files

    out = Path(out)
    check_output_place(out, "--out", "write the predictions elsewhere, e.g. --out predictions-new.csv")
    check_output(out)
    refuse_to_replace_an_image(out, "--out", "write the predictions elsewhere, e.g. --out predictions.csv")
    not_utf8: set[Path] = set()
    paths, unlisted = _expand(images, not_utf8)
    if not paths and unlisted:
        raise OsteoError(f"no file could be found: {some_of(unlisted, 3)} cannot be listed (each said above); make "
                         "them readable (chmod), or pass other folders")
    if not paths:  # a header-only CSV and exit 0 said nothing of the empty folder
        raise OsteoError(f"no files in {', '.join(map(str, images))}; pass image files or folders that hold them")
    if gradcam_dir is not None:
        from osteo.files import OwnedFolder

        for given in [Path(i) for i in images if Path(i).is_dir()] or [None]:
            check_output_place(gradcam_dir, "--gradcam", "write the overlays elsewhere, e.g. --gradcam gradcam",
                               data=given)
        OwnedFolder(gradcam_dir, "--gradcam").check(overlay_files([_display(f) for f in paths]))
    predictor = Predictor(run_dir, calibrated=calibrated, tta=tta)
    if tta and predictor.points:  # kept, as the run's decisions, but their measured rates do not carry over
        log.warning("test-time augmentation: the screening columns' thresholds were chosen on validation without it, "
                    "so their sensitivity and specificity there do not carry over to these probabilities")
    sweep_temporaries(out.parent, pattern=temporaries_of(out))  # left by a killed predict
    rows, raw, arrays = predictor.predict_paths(paths, batch, progress, not_utf8)
    ok = [r for r in rows if r["status"] == "ok"]
    overlays = []
    if gradcam_dir is not None and len(arrays):
        from osteo.explain import gradcam, gradcam_target
        from osteo.registry import get_backbone

        spec = get_backbone(predictor.run.read_recipe().model.backbone)
        target = gradcam_target(predictor.model, spec)
        if target.layer != target.last:  # the maps are not of the last stage: said, as the report says it
            log.warning("Grad-CAM: %s", target.describe(arrays.shape[1]))
        maps, _ = gradcam(predictor.model, spec, arrays, target=target)
        overlays = [Path(gradcam_dir) / f for f in overlay_files([r["path"] for r in ok])]
    # every row says what its probabilities are: the model's own or calibrated, with test-time augmentation or not
    made = predictor.probabilities()
    rows = [{**r, "probabilities": made} if r["status"] == "ok" else r for r in rows]
    columns = [*COLUMNS[:-1], *(_op_column(p["name"]) for p in predictor.points), "probabilities", "reason"]
    if overlays:  # which overlay is each row's (two images of one name in two folders: name.png, name-2.png)
        names = iter(o.name for o in overlays)  # one for each readable image, in their order
        rows = [{**r, "gradcam": next(names) if r["status"] == "ok" else ""} for r in rows]
        columns.insert(-1, "gradcam")
    # the overlays and the CSV of one call, never some of another's (which waits: a failure puts back its own)
    with folder_locks([out.parent, *([gradcam_dir] if overlays else [])], str(out)), all_or_none([*overlays, out]):
        if overlays:
            from osteo.explain import write_overlays

            write_overlays(gradcam_dir, [r["path"] for r in ok], arrays, maps, predictor.calibrate(raw), target)
        write_csv(out, rows, columns)
    bad = sum(r["status"] != "ok" for r in rows)
    if rows and bad == len(rows):
        fix = ("rename them, e.g. convmv -f latin1 -t utf8" if all(r["reason"] == NOT_UTF8 for r in rows) else
               "give PNG, JPEG, TIFF or DICOM files")
        raise OsteoError(f"none of the {len(rows)} file(s) could be read as an image (each reason is in {out}); {fix}")
    if bad:
        log.warning("%d of %d files are unreadable and have no prediction (status=unreadable, with the reason, in %s)",
                    bad, len(rows), out)
    blank = [r["path"] for r in ok if r["reason"] == BLANK]
    if blank:
        log.warning("%d image(s) are blank, every pixel one gray level: %s; their predictions say nothing of a knee "
                    "(reason=blank in %s): check the files", len(blank), some_of(blank, 3), out)
    clear = [r["path"] for r in ok if r["reason"] == TRANSPARENT]
    if clear:
        log.warning("%d image(s) have transparent pixels: %s; each is read by its colours with the transparency "
                    "dropped, as training reads it, which may not be what a viewer shows (reason=transparent in %s)",
                    len(clear), some_of(clear, 3), out)
    return Predictions(Path(out), len(rows), bad, len(unlisted))


# --------------------------------------------------------------------------- external validation


def evaluate_folder(run_dir: str | os.PathLike, folder: str | os.PathLike, out: str | os.PathLike | None = None,
                    tta: bool = False, n_boot: int = 1000, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Score a run's best model on another labelled folder (class sub-folders): ``(out, metrics)``.

    The folder gets the same audit as training data (unreadable files listed and skipped,
    duplicates reported). Images that are, by content, in the run's split (training,
    validation or test: they trained the model, chose for it, or are its own) are left out of
    the score and counted. Writes ``predictions.csv`` and ``metrics.json``
    in the run's schemas and ``audit.json`` to ``out`` (default ``RUN/eval/<folder>/``).

    ``run_dir`` may be a cross-validation: its fold models are scored as one
    :class:`Ensemble`, and the images left out are those in any of its folds (its data).
    """
    from osteo.calibrate import apply_temperature, calibration_digest, external_calibration
    from osteo.data.scan import audit, write_audit
    from osteo.data.split import majority_label
    from osteo.evaluate import (
        CHOSE,
        compute_metrics,
        external_label,
        folder_groups,
        majority_baseline,
    )
    from osteo.files import default_cache_root, replace_folder, write_json

    if n_boot < 0:
        raise OsteoError(f"the number of bootstrap resamples must be 0 or more, got {n_boot}; e.g. --bootstrap 1000")
    ensemble, folder = CvDir(run_dir).is_cv(), Path(folder)
    # a TTA scoring is another method: beside the plain one, not in its place
    own = (CvDir(run_dir) if ensemble else RunDir(run_dir)).eval_path
    out = Path(out) if out else own / (folder.resolve().name + ("-tta" if tta else ""))
    in_run = out.resolve().parent == own.resolve()  # in the run's eval/, beside the run's own files
    if in_run and not ensemble:
        # the model card, which reads it, is written after the folder is scored: damaged, said before (an
        # unfinished run first: its resume writes it again)
        RunDir(run_dir).check(need=(RunDir.BEST,), finished=True).read_env()
    predictor = Ensemble(run_dir, tta=tta) if ensemble else Predictor(run_dir, calibrated=True, tta=tta)
    run = predictor.run
    seen_in = SEEN_IN["cv" if ensemble else "run"]
    _check_eval_out(run, out, folder, in_run)
    result = audit(folder, memo=default_cache_root(), keep_features=True)
    seen = run.data_hashes()
    if seen is None and warn:
        warn(f"{run} records no content hashes of {seen_in}: overlap with {folder} not checked")
    ok = result.ok()
    overlap = [r for r in ok if seen and (r.sha256 in seen or r.pixel_sha256 in seen)]
    scored = [r for r in ok if not (seen and (r.sha256 in seen or r.pixel_sha256 in seen))]
    # one image filed under two classes (a copy, or a class folder linked to another): its label is
    # unknown, so it scores nothing, as the split leaves it out of training
    conflicted = [r for r in scored if r.conflict]
    scored = [r for r in scored if not r.conflict]
    if conflicted and warn:
        warn(f"{len(conflicted)} image(s) of {folder} are filed under two classes (the same image in each, e.g. "
             f"{conflicted[0].path}): left out, as their label is unknown")
    near, near_checked = _near_copies_of_the_runs(run, scored, seen, seen_in, warn)
    scored = [r for r, copied in zip(scored, near) if not copied]
    for r in result.records:
        r.features = None
    if not scored:
        why = result.first_unreadable() if not ok else ""
        filed = f", {len(conflicted)} filed under two classes" if conflicted else ""
        raise OsteoError(f"no image of {folder} can be scored ({len(ok)} readable, {len(overlap) + sum(near)} also "
                         f"in {seen_in}{filed}{why}); give a folder of other images")
    rows, raw, _ = predictor.predict_paths([folder / r.path for r in scored], progress=progress)
    kept = [(rec, row) for rec, row in zip(scored, rows) if row["status"] == "ok"]
    y = np.array([CLASSES.index(rec.label) for rec, _ in kept], dtype=int)
    counts = np.bincount(y, minlength=len(CLASSES))  # scored images per class
    missing = [c for c, n in zip(CLASSES, counts) if not n]
    if missing and warn:
        one = " and balanced accuracy cannot tell a model from always answering one class" if len(missing) == 2 else ""
        warn(f"{folder} has no {' or '.join(missing)} images scored: ROC-AUC is left out{one}; balanced accuracy "
             f"averages the classes present, macro F1 all three (a class without images counts 0)")
    from osteo.data.split import MIN_TEST_PER_CLASS

    few = {c: int(n) for c, n in zip(CLASSES, counts) if 0 < n < MIN_TEST_PER_CLASS}
    if few and warn:  # as a run's own test split is refused: one image moves such a class's recall by 0.12+
        warn(f"{folder} has fewer than {MIN_TEST_PER_CLASS} scored images of "
             f"{', '.join(f'{c} ({n})' for c, n in few.items())}: one image moves that class's recall by "
             f"{1 / min(few.values()):.2f} or more, so its numbers are coarse and their intervals wide (or of "
             "zero width); add images of those classes")
    raw_rows = [{"path": rec.path, "label": rec.label} for rec, _ in kept]
    calibrated = predictor.calibrate(raw)
    # intervals that draw the folder's duplicates and patients whole: four copies of an image are one draw
    scored_groups = folder_groups(result.manifest_rows(), [rec.path for rec, _ in kept])
    metrics = compute_metrics(y, raw, n_boot=n_boot, seed=seed, groups=scored_groups,
                              probabilities="calibrated" if ensemble else "uncalibrated")
    metrics["majority_baseline"] = majority_baseline(y, majority_label(rec.label for rec, _ in kept))
    report = {
        "run": str(run.path), "data_dir": str(folder.resolve()), "tta": tta,
        # every number here: that folder's images, which chose nothing (the run's own are left out)
        "evaluated_on": external_label(out.name, {"tta": tta}), "chose": CHOSE["external"],
        "n_files": len(result.records),
        "unreadable": len(result.records) - len(ok) + len(scored) - len(kept),
        "excluded_training_overlap": len(overlap) + sum(near), "overlap_checked": seen is not None,
        "excluded_label_conflicts": len(conflicted),
        # of those, re-encoded or resized copies (the audit's near duplicates) of the run's images
        "excluded_near_copies": sum(near), "near_copies_checked": near_checked,
        "duplicate_groups": len(result.duplicate_groups),
        "ensemble_of": [str(m.run.path) for m in predictor.members] if ensemble else None,
        # what each member's calibration made of its probabilities, as applied (read when each was loaded): the
        # report knows these numbers stale once a fold is calibrated again, during this eval too
        "member_calibrations": {m.run.name: calibration_digest(m.calibration)
                                for m in predictor.members} if ensemble else None,
        "external": metrics,
        **external_calibration(y, calibrated, predictor.temperature, predictor.points, n_boot, seed, scored_groups),
    }
    # staged, then moved in whole: a kill leaves the previous validation, never new predictions
    # beside old metrics
    stage_in = run.path if in_run else out.parent
    # another eval of this run waits (their renames interleaved), and so does osteo calibrate of it, which
    # holds this lock while it replaces the calibration and measures the run's external validations again
    with folder_lock(stage_in, f"{out}"):
        _check_same_folder(run, out, folder, in_run)
        now = run.read_calibration() if in_run and not ensemble else None
        if now is not None and calibration_digest(now) != calibration_digest(predictor.calibration):
            # calibrated since this eval read the calibration: measured at the one in force, as that
            # calibrate measured the run's other external validations
            t = float(now.get("temperature", 1.0))
            report.update(external_calibration(y, apply_temperature(raw, t), t, chosen_points(now), n_boot, seed,
                                               scored_groups))
        for pattern in (f"{EVAL_STAGE}*", f".{glob.escape(out.name)}.old-*.tmp"):  # a killed eval's
            sweep_temporaries(stage_in, pattern=pattern)
        stage = Path(tempfile.mkdtemp(prefix=owned_prefix(f"{EVAL_STAGE}{out.name}."), suffix=".tmp", dir=stage_in))
        os.chmod(stage, 0o777 & ~umask())  # it becomes the folder: mkdtemp's 0700 is not what users expect
        try:
            RunDir(stage).write_predictions(raw_rows, raw, "external", predictor.raw_probabilities())
            write_json(stage / RunDir.METRICS, report)
            write_audit(result, stage)
            killpoints.reached("eval.staged")
            # the card lists the run's own eval/ (a cross-validation has no card): the folder and the
            # card are both new or, if the card cannot be written (one atomic write), both as they were
            card = in_run and not ensemble
            replace_folder(stage, out, aside=stage_in,  # not in eval/, where a report would find it
                           then=(lambda: write_model_card(run)) if card else None)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out, report


def _near_copies_of_the_runs(run, scored: list, seen: set[str] | None, seen_in: str,
                             warn: Callable[[str], None] | None) -> tuple[list[bool], bool]:
    """(for each of ``scored``: a near duplicate of an image of the run's data, and whether that
    was checked). A re-encoded or resized copy of a training image is no more another
    hospital's image than the file itself. The run's images are found again in its data folder
    (by their recorded sha256), whose audit records the cache remembers from training; where
    that folder is gone, only exact copies are left out, and a warning says so."""
    from osteo.data.scan import DETAIL_SIDE, audit, near_copies
    from osteo.files import default_cache_root

    if not seen or not scored:
        return [False] * len(scored), bool(seen)
    first = run.folds()[0] if isinstance(run, CvDir) else run
    data_dir = first.read_audit().get("data_dir") or first.read_recipe_dict().get("data", {}).get("dir", "")
    try:
        theirs = [r for r in audit(data_dir, memo=default_cache_root(), keep_features=True).ok() if r.sha256 in seen]
    except OsteoError:  # moved or deleted since training
        theirs = []
    if not theirs:
        if warn:
            warn(f"the run's data folder {data_dir} is not where it was trained: re-encoded or resized copies of its "
                 "images are not looked for (exact copies are); run osteo eval from where it was trained")
        return [False] * len(scored), False
    small = sum(1 for r in scored if 0 < min(r.width, r.height) < DETAIL_SIDE)
    if small and warn:  # osteo.data.scan: under 128 px the band-pass sees JPEG's noise more than the texture
        warn(f"{small} of the images to score are under {DETAIL_SIDE} px, where re-encoded or resized copies of "
             "the run's images are often not recognised (exact copies are): some such copies may be scored as new "
             "images; where the originals are larger, give those")
    return near_copies(scored, theirs), True

# what an external folder's images are checked against, and left out of its score when found there
SEEN_IN = {"run": "the run's data (its training, validation or test split)", "cv": "the cross-validation's data"}
EVAL_STAGE = ".eval-"  # an external validation being written, beside its folder (or in the run)
# what it writes, and what each holds (by which an earlier eval's, of any osteo, are told
# from a user's files: its metrics.json has named the folder it scored since eval --data began)
EVAL_FILES = {RunDir.PREDICTIONS: ("path", "label", "pred"), RunDir.METRICS: "data_dir", **AUDIT_MARKS}


def _check_eval_out(run: RunDir, out: Path, folder: Path, in_run: bool) -> None:
    """``--out`` of ``eval --data``: a folder of the run's ``eval/`` (``in_run``) or one outside every
    run and outside ``folder``, the images scored, and, if it exists, one an earlier ``eval --data``
    wrote (it is replaced whole)."""
    fix = "choose another --out, or leave it out (RUN_DIR/eval/<folder-name>/, with --tta <folder-name>-tta/)"
    check_output_place(out, "--out", fix, own=run.eval_path, data=folder, folder=True)
    if RunDir.owner_of(out) is not None and not in_run:
        raise OsteoError(f"--out {out} is not a folder of {run.eval_path}, where a run's external validations "
                         f"go; {fix}")
    for name in EVAL_FILES if out.is_dir() else ():  # a killed calibrate's or eval's, rewriting one of them
        sweep_temporaries(out, pattern=temporaries_of(out / name))
    foreign = sorted(e.name for e in out.iterdir() if e.name not in EVAL_FILES) if out.is_dir() else []
    if foreign:
        raise OsteoError(f"--out {out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                         f"osteo eval did not write and would remove; {fix}")
    refuse_foreign_files(out, EVAL_FILES, "--out", fix)
    _check_same_folder(run, out, folder, in_run)


def _check_same_folder(run: RunDir, out: Path, folder: Path, in_run: bool) -> None:
    """Another folder's validation under the same name (siteA/ext, then siteB/ext) is not replaced
    unasked. Checked before scoring, and again under the lock (another eval may have written it)."""
    try:
        earlier = Path(json.loads((out / RunDir.METRICS).read_text(encoding="utf-8"))["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not earlier.is_absolute() or not earlier.is_dir():  # recorded before paths were absolute, or moved since
        return
    with contextlib.suppress(OSError):
        if os.path.samefile(earlier, folder):  # also through another mount or link
            return
    where = f"--out {run.eval_path}/<another name>" if in_run else "another --out"
    raise OsteoError(f"--out {out} holds the external validation of {earlier.resolve()}, another folder than "
                     f"{folder.resolve()}, which this eval would replace; give {where}, or remove {out} first")
