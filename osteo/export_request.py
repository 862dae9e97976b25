"""What ``osteo export`` is asked to do, checked before Keras is imported.

Every refusal that needs only the run's files and ``--out`` is made here: a format the
run's engine cannot write, an ``--out`` that would replace one of the run's own files or
an image, a file where a folder is needed (or the reverse), another export's ONNX folder.
The CLI asks :func:`check_request` before it imports :mod:`osteo.export` (and with it Keras
and the run's backend, several seconds), so a refused export is refused at once;
:func:`osteo.export.export_run` asks it again, for callers of the library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from osteo.data.decode import refuse_to_replace_an_image
from osteo.device import EngineInfo, get_engine
from osteo.errors import OsteoError
from osteo.registry import get_backbone
from osteo.runs import RunDir, check_output_place

FORMATS = ("onnx", "savedmodel", "keras")
DEFAULT_NAMES = {"onnx": "model.onnx", "savedmodel": RunDir.SAVEDMODEL, "keras": RunDir.KERAS_EXPORT}
EXPORT_DIR = RunDir.EXPORT  # RUN_DIR/export/ holds the default outputs
RECORD, SCRIPT = RunDir.EXPORT_RECORD, "predict.py"  # written beside an ONNX model
SCRIPT_SOURCE = Path(__file__).with_name("export_predict.py")  # osteo.export_predict, copied as predict.py


@dataclass(frozen=True)
class ExportRequest:
    run: RunDir
    engine: EngineInfo
    fmt: str
    target: Path  # the file (or, for a SavedModel, the folder) the export becomes
    ported: bool  # written by a port (a timm run's SavedModel: its weights in Keras' layers, on TensorFlow)


def check_request(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> ExportRequest:
    """The export of ``run_dir`` as ``fmt`` to ``out`` (default ``RUN_DIR/export/``), or an
    :class:`~osteo.errors.OsteoError` naming why it cannot be written there and what to do."""
    if fmt not in FORMATS:
        raise OsteoError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    run = RunDir(run_dir).check(need=(RunDir.BEST,), finished=True)  # before anything is said of its calibration
    recipe = run.read_recipe()
    engine = get_engine(recipe.model.impl)
    engine.check_export(fmt, f"run {run.path}", get_backbone(recipe.model.backbone))
    target = Path(out) if out is not None else run.path / EXPORT_DIR / DEFAULT_NAMES[fmt]
    _refuse_run_files(target, run)
    refuse_to_replace_an_image(target, "--out", f"export elsewhere, e.g. --out export/{DEFAULT_NAMES[fmt]}")
    if fmt == "savedmodel" and target.exists() and not target.is_dir():
        raise OsteoError(f"--out {target} is a file; a SavedModel is a folder: choose another path")
    if fmt == "savedmodel" and target.is_dir() and any(target.iterdir()) and not (target / "saved_model.pb").is_file():
        raise OsteoError(f"--out {target} is a folder that holds no SavedModel, and exporting replaces it whole: "
                         "choose another path")
    if fmt != "savedmodel" and target.is_dir():
        raise OsteoError(f"--out {target} is a folder; give a file, e.g. {target / DEFAULT_NAMES[fmt]}")
    if fmt == "keras" and target.suffix != ".keras":
        raise OsteoError(f"--out {target} must end in .keras (Keras loads .keras files only)")
    if fmt == "onnx":
        _check_onnx_place(target)
    return ExportRequest(run, engine, fmt, target, ported=not engine.writes(fmt))


def _check_onnx_place(target: Path) -> None:
    """An ONNX export is three files: ``target``, and beside it its record (:data:`RECORD`) and
    the script that runs it (:data:`SCRIPT`). Refused: a name without ``.onnx`` (ONNX bytes
    under ``x.keras``), a folder whose record is another model's (two exports in one folder:
    the first lost its record, and predict.py ran the second), and a ``predict.py`` osteo did
    not write (a user's own script, replaced without a word)."""
    fix = f"export into a folder of its own, e.g. --out {target.parent / target.stem / 'model.onnx'}"
    if target.suffix.lower() != ".onnx":
        raise OsteoError(f"--out {target} must end in .onnx (an ONNX model; --format keras writes .keras)")
    record, script = target.parent / RECORD, target.parent / SCRIPT
    first_line = SCRIPT_SOURCE.read_bytes().split(b"\n", 1)[0]
    try:  # no folder there yet (or a file in its place, which making it names) holds neither
        other = json.loads(record.read_text(encoding="utf-8"))["file"] if record.is_file() else None
        ours = not os.path.lexists(script) or (script.is_file() and script.read_bytes().startswith(first_line))
    except (ValueError, TypeError, KeyError):  # not JSON, or no record of an export (every one names its file)
        raise OsteoError(f"{record} is not an osteo export's record, and exporting would replace it; {fix}") from None
    except OSError as e:
        raise OsteoError(f"cannot read {e.filename or record} ({e.strerror}); {fix}") from None
    if other is not None and other != target.name:
        raise OsteoError(f"{target.parent} holds the ONNX export {other} ({RECORD} and {SCRIPT} are its own), "
                         f"which exporting {target.name} there would orphan; {fix}")
    if not ours:
        raise OsteoError(f"{script} is not the script osteo writes beside an ONNX export, and exporting would "
                         f"replace it; {fix}")


def _refuse_run_files(target: Path, run: RunDir) -> None:
    """An export writes into no run but its own ``export/`` (``--out RUN_DIR/best.weights.h5`` above all)."""
    check_output_place(target, "--out", f"export elsewhere, e.g. the default {run.path / EXPORT_DIR}/",
                       own=run.path / EXPORT_DIR)
