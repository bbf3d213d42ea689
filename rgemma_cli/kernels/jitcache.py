"""Where Numba caches the compiled kernels, for any user and any install.

Numba writes its cache beside the kernels' source (`rgemma_cli/kernels/__pycache__`) or, when
that is not writable (a system-wide install run by another user), under the user's cache
directory (`$XDG_CACHE_HOME/numba`, else `~/.cache/numba`; `NUMBA_CACHE_DIR` overrides both).
When none of these can be written (a service user without a home, a read-only container),
Numba refuses every cached kernel at import ("cannot cache function ...: no locator
available"). `choose()` runs before any kernel is defined (`rgemma_cli.kernels` calls it)
and, in that case only, points Numba at a directory of this process (compiled kernels are not
kept between runs), with one line of warning on stderr.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parent


def _writable(directory: str | os.PathLike) -> bool:
    """What Numba checks itself: the directory can be made and a file created in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
        return True
    except OSError:
        return False


def user_cache_dir() -> Path:
    """Numba's user-wide cache directory on Linux and macOS (appdirs' rule)."""
    if sys.platform == "darwin":
        return Path("~/Library/Caches/numba").expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "numba"


def choose() -> str:
    """Make sure Numba has a cache it can write; returns where it will cache (a description)."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given and _writable(given):
        return given
    for candidate in (KERNELS / "__pycache__", user_cache_dir()):
        if _writable(candidate):
            if given:  # Numba would still try the unwritable one first and fail over quietly
                _use(str(candidate))
            return str(candidate)
    try:
        private = tempfile.mkdtemp(prefix="rgemma-numba-")
    except OSError:
        private = None
    tried = ", ".join(str(p) for p in ([given] if given else []) + [KERNELS / "__pycache__",
                                                                   user_cache_dir()])
    print(f"warning: no writable cache for compiled kernels ({tried}): they are compiled again "
          f"on every run; set NUMBA_CACHE_DIR to a writable directory", file=sys.stderr)
    if private is None:
        _disable()
        return "none"
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    _use(private)
    return private


def _use(directory: str) -> None:
    os.environ["NUMBA_CACHE_DIR"] = directory
    if "numba" in sys.modules:  # already imported (read its config at import): tell it too
        from numba.core import config
        config.CACHE_DIR = directory


def _disable() -> None:
    # no directory at all can be written: compile in memory, as if cache=False
    from numba.core.dispatcher import Dispatcher
    Dispatcher.enable_caching = lambda self: None
