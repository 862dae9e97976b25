"""Keep Keras' optional imports of scikit-learn, pandas and matplotlib out of osteo's processes.

``import keras`` imports three packages it only needs for features osteo does not use:
scikit-learn (with SciPy, for ``keras.wrappers``' scikit-learn estimators), pandas (so that
``fit`` accepts DataFrames) and ``matplotlib.pyplot`` (``keras.visualization``). Keras
imports each in ``try: import X / except ImportError: X = None``, as optional. Measured on
the 2-core AMD EPYC with PyTorch 2.9 and Keras 3 (benchmarks/README.md, "Keras' optional
imports"): they hold 200-230 MB of resident memory in every training process, about half
of what the timm engine holds above timm's own loop, and take about 1.5 s to import.

:func:`install`, which :func:`osteo.cli.main` calls (every osteo command, a study's trials
included, but not a program that imports osteo), adds an import hook that answers "not
installed" to those three top-level imports when, and only when, a module of the
``keras`` package asks for them while ``keras`` itself is being imported. Keras then
takes its own "not installed" path for them. osteo's own imports of the same packages
(metrics, plots, tables) are untouched and load them as usual, when they are needed. Only
an import written as Keras writes an optional one is refused: in a block of imports that
opens with ``try:`` and is caught by ``except ImportError`` (or ``ModuleNotFoundError``).
A later Keras that imports one of them without that guard simply gets it, and osteo its
memory back less.

Nothing changes where Keras is already imported when :func:`install` runs, or with
``OSTEO_KERAS_OPTIONAL=1`` in the environment (for a user who wants Keras' scikit-learn
wrappers in an osteo process).
"""

from __future__ import annotations

import importlib.abc
import linecache
import os
import sys

OPTIONAL = ("sklearn", "pandas", "matplotlib")  # top-level packages Keras imports as optional
ENV = "OSTEO_KERAS_OPTIONAL"
_IMPORT_MACHINERY = ("importlib._bootstrap", "importlib._bootstrap_external", "_frozen_importlib",
                     "_frozen_importlib_external", __name__)


def _keras_initializing() -> bool:
    keras = sys.modules.get("keras")
    spec = getattr(keras, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _importer():
    """The frame whose code runs the import being looked up (None: none found)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in _IMPORT_MACHINERY:
        frame = frame.f_back
    return frame


def _optional_import(frame) -> bool:
    """True when the frame is a keras module importing inside a block of imports that opens
    with ``try:`` and is caught by ``except ImportError`` (or ``ModuleNotFoundError``): Keras'
    own way of writing an optional import."""
    name = str(frame.f_globals.get("__name__", ""))
    if name != "keras" and not name.startswith("keras."):
        return False
    path, line = frame.f_code.co_filename, frame.f_lineno
    text = linecache.getline(path, line)
    indent = len(text) - len(text.lstrip())
    opens, opened_at = _past_the_imports(path, line, -1, indent)
    closes, closed_at = _past_the_imports(path, line, 1, indent)
    return opens == "try:" and closes.startswith(_CAUGHT) and opened_at == closed_at < indent


_CAUGHT = ("except ImportError", "except ModuleNotFoundError", "except (ImportError", "except (ModuleNotFoundError")


def _past_the_imports(path: str, line: int, step: int, indent: int) -> tuple[str, int]:
    """The first line from ``line`` on (in direction ``step``) that is not blank, a comment, or
    an import at ``indent``: its text, stripped, and its indent ("", -1 at the file's end)."""
    while True:
        line += step
        text = linecache.getline(path, line) if line > 0 else ""
        if not text:
            return "", -1
        stripped = text.strip()
        at = len(text) - len(text.lstrip())
        if not stripped or stripped.startswith("#") or (at == indent and stripped.startswith(("import ", "from "))):
            continue
        return stripped, at


class _OptionalFinder(importlib.abc.MetaPathFinder):
    """Refuses OPTIONAL's top-level packages to Keras' optional imports while keras initialises."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OPTIONAL or not _keras_initializing():
            return None
        frame = _importer()
        if frame is not None and _optional_import(frame):
            raise ModuleNotFoundError(f"osteo: {fullname} not loaded for keras (osteo._lean)", name=fullname)
        return None


def install(environ=None) -> bool:
    """Add the hook (idempotent). False where it would change nothing: Keras is loaded
    already, or the user set OSTEO_KERAS_OPTIONAL=1."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").lower() in ("1", "true", "yes", "on") or "keras" in sys.modules:
        return False
    if not any(isinstance(f, _OptionalFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OptionalFinder())
    return True
