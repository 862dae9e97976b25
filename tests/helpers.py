"""Small helpers the test modules share (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator

from osteo.runs import RunDir


def one_line(capsys) -> str:
    """The one line a refused command wrote to stderr, checked to be osteo's error line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("osteo: error: ")
    return err[0]


def copy_run(run: RunDir, dest) -> RunDir:
    """A copy of ``run`` under ``dest`` (as ``<model>/<name>``), for a test to damage."""
    return RunDir(shutil.copytree(run.path, dest / run.model / run.name))


@contextlib.contextmanager
def osteo_warnings() -> Iterator[list[str]]:
    """The messages osteo's logger warns with meanwhile. In-process, the CLI's stderr handler
    stays bound to the first test's captured stream, so capsys cannot be relied on for them."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("osteo").addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger("osteo").removeHandler(handler)
