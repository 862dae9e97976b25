"""The one exception type that means "the user can fix this".

The CLI turns an :class:`OsteoError` into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class OsteoError(Exception):
    """A problem with the user's input, stated with the fix in the message."""
