"""Named points at which a test can kill this process: fault injection without sleeps.

A test that must show "a kill at this instant costs at most the epoch in progress" sets

    OSTEO_KILL_AT=<point>[@<n>]

in the environment of the process it starts; that process sends itself SIGKILL the
``n``-th time (1 by default) it reaches ``<point>``. Two more variables narrow it down
when a test starts many processes (a study's trials inherit its environment):
``OSTEO_KILL_IF`` is a regular expression the process's command line must match, and
``OSTEO_KILL_ONCE`` a file path: only the process that creates that file dies, so a
retried process lives. ``OSTEO_KILL_SIGNAL`` (``TERM``, ``INT``; default ``KILL``) sends another
signal, for the handling a scheduler's SIGTERM or a Ctrl-C gets. Without ``OSTEO_KILL_AT``
:func:`reached` is one comparison. The points, each named where it is
reached (``osteo.killpoints.POINTS`` lists them, so a test cannot name one that does
not exist):
"""

from __future__ import annotations

import os
import re
import signal
import sys

ENV = "OSTEO_KILL_AT"

POINTS = {
    "train.batch": "a training batch has ended (counts across epochs and phases)",
    "train.history_written": "an epoch's history row is written, its state not yet committed",
    "train.state_written": "an epoch's backup slot is written, state.json not yet replaced",
    "train.epoch_committed": "an epoch's state is committed (state.json replaced)",
    "train.phase_done": "a training phase's end is written (phase 1's: the weights and random states phase 2 starts from)",
    "train.metrics_written": "a finishing run's metrics.json is written, its calibration not yet",
    "study.trial_ended": "a study's trial has ended and been reported (the study goes on)",
    "files.written": "an atomic write has its bytes in the temporary file, not yet synced or renamed",
    "files.before_replace": "an atomic write's temporary file is complete, not yet renamed over the target",
    "export.child_started": "a timm run's SavedModel export has started its child on TensorFlow, not yet waited on it",
    "eval.staged": "an external validation's files are complete in their staging folder, not yet moved in",
    "report.replacing": "a report's CSV files are in place, its plots and page not yet",
}
__doc__ += "".join(f"\n* ``{k}``: {v}" for k, v in POINTS.items())


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point; choose one of: {', '.join(POINTS)}")
    return name, int(count or 1)


_TARGET = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def reached(point: str) -> None:
    """Mark ``point``; the process dies here if ``OSTEO_KILL_AT`` names this visit."""
    if _TARGET is None or _TARGET[0] != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != _TARGET[1]:
        return
    pattern = os.environ.get("OSTEO_KILL_IF")
    if pattern and not re.search(pattern, " ".join(sys.argv)):
        return
    once = os.environ.get("OSTEO_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get('OSTEO_KILL_SIGNAL', 'KILL')}"))
