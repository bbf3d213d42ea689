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


def not_utf8(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (one phrase), or None if it can.

    Two kinds of lone surrogate reach us: U+DC80..U+DCFF stand for a byte 0x80..0xFF that was
    not UTF-8 (Python's surrogateescape for argv and stdin, PEP 383); any other (from a JSON
    escape such as "\\ud800", or half of a pair) is a code point that is not a character."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        if 0xDC80 <= c <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{c & 0xFF:02x} at character {e.start})"
        return f"holds a lone surrogate U+{c:04X} at character {e.start}, which is not a character"
