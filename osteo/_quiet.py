"""Keep TensorFlow's C++ start-up chatter off the user's terminal.

While TensorFlow's shared libraries load, absl has not been initialised yet, so its
messages ("oneDNN custom operations are on ...", "All log messages before
absl::InitializeLog() ...", CPU-feature and CUDA-factory notices) go straight to file
descriptor 2 whatever ``TF_CPP_MIN_LOG_LEVEL`` says. On some CPUs (AVX-512 with
bfloat16) every ``osteo`` command printed three such lines before its one-line error.

:func:`install`, which :func:`osteo.cli.main` calls (so every osteo command, a study's
trials included, but not a program that imports osteo), adds an import hook: the first
``import tensorflow`` (by osteo, by Keras, by anything) runs with descriptor 2 captured
to a temporary file; afterwards the known start-up notices are dropped and every other
line is written back, so a real error printed during the import is never lost. After
the import ``TF_CPP_MIN_LOG_LEVEL`` (default 2 here) governs, as TensorFlow documents.

Logs come back with ``osteo --debug``, ``OSTEO_TF_LOGS=1``, or an explicit
``TF_CPP_MIN_LOG_LEVEL`` of 0 or 1 (the user asked for TensorFlow's info or warnings).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

# absl/glog lines: severity letter, MMDD, time, thread, file:line]; info and warnings only
_NOTICE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\s+\d+ \S+:\d+\] .*"
    r"|E\d{4} [\d:. ]+\s+\d+ \S+:\d+\] Unable to register cu\w+ factory.*)$"
)


def wanted() -> bool:
    """True when the user asked to see TensorFlow's own logs."""
    if os.environ.get("OSTEO_TF_LOGS", "").lower() in ("1", "true", "yes", "on"):
        return True
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() in ("0", "1")


@contextlib.contextmanager
def filtered_stderr():
    """Capture descriptor 2; on exit write back every line that is not a start-up notice."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (a detached process): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not _NOTICE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if wanted():
            return self.loader.exec_module(module)
        with filtered_stderr():
            self.loader.exec_module(module)
        import logging

        # its Python logger's warnings too (tf.function retracing notices): for developers, not users
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``tensorflow`` package; finds nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Hook the first TensorFlow import (idempotent; a no-op once TensorFlow is loaded)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())
