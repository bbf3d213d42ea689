"""Small checks for untrusted files: JSON parsing and JSON value types.

Every file rgemma reads (state files, safetensors headers, shard indexes, config.json) is
parsed with `parse_json` and its values checked with these predicates before anything is
allocated from them; the rules per file type are in docs/file-formats.md.
"""

from __future__ import annotations

import json
import math

from .errors import RgemmaError


def parse_json(raw: bytes | str, what: str):
    """Parse untrusted UTF-8 JSON. Bad UTF-8, bad syntax, NaN/Infinity literals and nesting deep
    enough to exhaust the parser's recursion all raise RgemmaError(f"{what} (reason)")."""
    def no_constants(c):
        raise ValueError(f"{c} is not JSON")
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw,
                          parse_constant=no_constants)
    except UnicodeDecodeError:
        raise RgemmaError(f"{what} (not UTF-8)") from None
    except RecursionError:
        raise RgemmaError(f"{what} (JSON nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise RgemmaError(f"{what} (not JSON: {' '.join(str(e).split())[:80]})") from None


def is_int(v, lo: int = 0, hi: int | None = None) -> bool:
    """A JSON integer (not a float, not a bool) in [lo, hi]."""
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def is_number(v) -> bool:
    """A finite JSON number (int or float, not a bool). 1e400 parses as inf: refused."""
    return type(v) in (int, float) and math.isfinite(v)


def is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def plural(n: int, word: str) -> str:
    """"1 token", "2 tokens", "1,024 tokens": counts in messages."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def short(v, n: int = 40) -> str:
    """repr(v) cut to n characters, for one-line error messages about hostile values."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."
