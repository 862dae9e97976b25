"""Python child processes osteo starts (the export's port on TensorFlow, a timm weights file read
on PyTorch): what each runs first, so that it dies with the process that started it."""

from __future__ import annotations

# Run first in the child: it dies with the process that started it (Linux's PR_SET_PDEATHSIG), so a
# killed osteo leaves no child writing on into its temporaries. The parent's id is the child's last
# argument; a child whose parent died before the prctl stops itself.
DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent_pid = int(sys.argv.pop())
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:  # not Linux (no prctl, or no C library by that name): it may outlive a killed parent
    pass
if os.getppid() != parent_pid:
    sys.exit("the osteo process that started this was stopped")
"""


def signal_name(returncode: int) -> str:
    """The name of the signal that ended a child (``returncode`` < 0): ``SIGKILL``, or ``signal 34``."""
    import signal

    try:
        return signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"
