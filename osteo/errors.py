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


SHORT = 200  # the most of a library's error message an osteo error line quotes


def short(e: BaseException) -> str:
    """``e``'s message on one line, at most about :data:`SHORT` characters: cut at the end of a
    sentence or a word (mid-word only where a word is most of it, a long path), the cut said
    (`` ...``)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) <= SHORT:
        return text
    cut = text[:SHORT]
    end = max(cut.rfind(". "), cut.rfind("; "))
    if end > SHORT // 2:
        return cut[: end + 1] + " ..."
    space = cut.rfind(" ")  # a word's end, unless that drops most of it (one long path): then mid-word
    return (cut[:space].rstrip(",;:") if space > SHORT // 2 else cut) + " ..."
