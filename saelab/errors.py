"""The one exception type that users see: a single line saying what is wrong and how to fix it."""


class SaelabError(Exception):
    """A user-facing error. Its message is one line that names the problem and, where possible, the fix.

    The CLI prints it as `saelab: error: <message>` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class DivergedError(SaelabError):
    """Training stopped because the loss or the weights stopped being finite; nothing of the run is kept."""
