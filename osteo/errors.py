"""The one exception type that means "the user can fix this".

The CLI turns an :class:`OsteoError` into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class OsteoError(Exception):
    """A problem with the user's input, stated with the fix in the message."""


class Stopped(BaseException):
    """SIGTERM reached the process (a scheduler, a person stopping it): raised where the process
    is, it unwinds like Ctrl-C, so every ``finally`` runs (locks released, temporaries
    removed, a study's trials stopped) and the CLI says so in one line, exit code 143."""
