"""Small helpers the test modules share (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import shutil

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
