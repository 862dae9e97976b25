"""Small helpers the test modules share (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

from osteo.runs import RunDir


@contextlib.contextmanager
def immutable(path) -> Iterator[None]:
    """``path`` as ``chattr +i`` makes it (which tests cannot rely on: root and ext4 only): a file
    nothing may replace or link to, though its folder is writable."""
    import errno

    import pytest

    link, replace = os.link, os.replace

    def refuse(what, *paths):
        if any(os.fspath(p) == os.fspath(path) for p in paths):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(path))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "link", lambda src, dst, **kw: refuse("link", src) or link(src, dst, **kw))
        m.setattr(os, "replace", lambda src, dst: refuse("replace", dst) or replace(src, dst))
        yield


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


# osteo's command line as a terminal starts it, Ctrl-C at its default: a shell without job control (make run
# in the background, nohup) starts its jobs with SIGINT ignored, which Python keeps, and a Ctrl-C test then
# saw its run finish
_AS_FROM_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "sys.argv[0] = 'osteo'; runpy.run_module('osteo.cli', run_name='__main__')")


def osteo_process(args, cwd, kill_at=None, **env) -> subprocess.CompletedProcess:
    """``osteo ARGS`` in a process of its own on TensorFlow (``kill_at``: an osteo.killpoints point it
    kills itself at), its output captured, lines unwrapped."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "COLUMNS": "1000", **env}  # no wrapped lines
    if kill_at:
        env["OSTEO_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", _AS_FROM_A_TERMINAL, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def exited_ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]


def save_legacy_h5(model, path):
    """``model``'s weights in the layout of keras.applications' downloads (layer_names, weight_names)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def cannot_list(monkeypatch, name: str) -> None:
    """Listing a folder called ``name`` fails as without permission (root ignores modes, and the
    suite runs as root in CI: the listing is made to fail here, as the system fails it)."""
    scandir = os.scandir

    def refuse(path="."):
        if os.fspath(path).endswith(name):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
