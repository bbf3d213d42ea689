"""The one exception type the library raises for a user's mistake or bad input.

The CLI prints its message as a single line and exits non-zero; anything else that escapes
is a bug in rgemma.
"""


class RgemmaError(Exception):
    """A failure the user can act on; the message is one line and says what to do.

    `exit_code` is the CLI's exit status for it: 1, or 130 when it reports a Ctrl-C."""

    def __init__(self, message: str = "", *, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
