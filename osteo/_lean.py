"""Keep Keras' optional imports of scikit-learn, pandas and matplotlib out of osteo's processes.

``import keras`` imports three packages it only needs for features osteo does not use:
scikit-learn (with SciPy, for ``keras.wrappers``' scikit-learn estimators), pandas (so that
``fit`` accepts DataFrames) and ``matplotlib.pyplot`` (``keras.visualization``). Keras
imports each as optional, in ``try: import X / except ImportError: X = None``. Measured on
the 2-core AMD EPYC with PyTorch 2.9 and Keras 3.15 (benchmarks/README.md, "Keras' optional
imports"): without them a whole ``osteo train`` peaks 145-155 MB lower at 224 px, and
Keras with osteo's trainer imports in 4.3 s instead of 5.9.

:func:`install`, which :func:`osteo.cli.main` calls (every osteo command, a study's trials
included, but not a program that imports osteo), adds an import hook. While ``keras`` is
being imported, it answers "not installed" when one of the Keras modules in :data:`SITES`
imports one of those three packages inside a block of imports that opens with ``try:`` and
is caught by ``except ImportError`` (or ``ModuleNotFoundError``). Keras then takes its
own not-installed path, for good: in that process ``keras.wrappers``' estimators say that
scikit-learn is not installed. osteo's own imports of the same packages (metrics, plots,
tables) are untouched and load them when they are needed. Anything else, such as another
Keras module, an unguarded import or a renamed site in a later Keras, gets what it asks
for, so the worst a Keras upgrade can do is give osteo this memory back less.

The hook stays in place for the rest of the process and does nothing once Keras is
loaded; a program that calls ``cli.main`` itself before it imports Keras gets the same
Keras. Nothing changes where Keras is already imported when :func:`install` runs, or with
``OSTEO_KERAS_OPTIONAL=1`` in the environment (for Keras' scikit-learn wrappers in an
osteo process).
"""

from __future__ import annotations

import importlib.abc
import linecache
import os
import sys

OPTIONAL = ("sklearn", "pandas", "matplotlib")  # top-level packages Keras imports as optional
# The Keras modules whose guarded imports of OPTIONAL are refused (as found in Keras 3.15)
SITES = frozenset({
    "keras.src.wrappers.fixes", "keras.src.wrappers.utils", "keras.src.wrappers.sklearn_wrapper",
    "keras.src.trainers.data_adapters.array_slicing",
    "keras.src.visualization.plot_image_gallery", "keras.src.visualization.plot_bounding_box_gallery",
})
ENV = "OSTEO_KERAS_OPTIONAL"
_IMPORT_MACHINERY = ("importlib._bootstrap", "importlib._bootstrap_external", "_frozen_importlib",
                     "_frozen_importlib_external", __name__)


def _keras_initializing() -> bool:
    keras = sys.modules.get("keras")
    spec = getattr(keras, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _importer():
    """The frame whose code runs the import being looked up (None: none found). It starts two
    frames up (this function's caller is find_spec) and skips the import machinery; a wrapper
    of find_spec in between would hide the importer, and the hook would then refuse nothing."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") in _IMPORT_MACHINERY:
        frame = frame.f_back
    return frame


def _optional_import(frame) -> bool:
    """True when the frame is one of SITES importing inside a block of imports that opens
    with ``try:`` and is caught by ``except ImportError`` (or ``ModuleNotFoundError``): Keras'
    own way of writing an optional import."""
    if frame.f_globals.get("__name__") not in SITES:
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
