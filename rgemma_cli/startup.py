"""Ctrl-C in the `rgemma` command, from the first instruction on.

Python's own handler raises KeyboardInterrupt wherever the program is. While NumPy, Numba, the
command line and its parser load (~0.5 s), nothing of ours can catch it yet: Python printed a
traceback, the parser exited 130 without a word, and an interrupted C-extension import became
"ImportError: initialization failed". So the command runs in two phases:

- starting (`begin`, the console script's first call): Ctrl-C prints `interrupted` and exits 130
  at once; nothing has been read or written yet, so there is nothing to save.
- running (`started`, the first thing every command does once its arguments are parsed): Ctrl-C
  raises KeyboardInterrupt as usual, so generation can stop and save its state, and records
  that it happened (`interrupted`), so that an exception a library made of it still ends as an
  interrupt (exit 130), not as an internal error, and one a library swallowed is raised again
  at the next point that checks (`raise_if_swallowed`).
- finishing (`finishing`, once the command has returned): another Ctrl-C exits 130 at once.

Importing `rgemma_cli.cli` alone (the tests, a library user) changes no signal handler.
"""

from __future__ import annotations

import os
import signal

interrupted = False  # a Ctrl-C reached the running command and no handler of ours has seen it


def _exit_while_starting(signum, frame):
    os.write(2, b"interrupted\n")
    os._exit(130)


def _exit_while_finishing(signum, frame):
    os._exit(130)  # the command has returned and said what it did; only exiting is left


def _interrupt(signum, frame):
    global interrupted
    interrupted = True
    raise KeyboardInterrupt


def handled() -> None:
    """A handler of ours has caught the KeyboardInterrupt and the command goes on (the reply
    stopped, the stats and the save still to come): the Ctrl-C is spent. (Handlers that end
    the command need not say so.)"""
    global interrupted
    interrupted = False


def raise_if_swallowed() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that a library swallowed (one raised inside a
    ctypes callback, such as Numba's object cache, is printed as "Exception ignored" and
    dropped), so that the command stops at this point as if it had arrived here."""
    if interrupted:
        raise KeyboardInterrupt


def begin() -> None:
    """The starting phase: Ctrl-C exits 130 with one line."""
    signal.signal(signal.SIGINT, _exit_while_starting)


def started() -> None:
    """The running phase, if `begin` was called (else nothing changes)."""
    if signal.getsignal(signal.SIGINT) is _exit_while_starting:
        signal.signal(signal.SIGINT, _interrupt)


def finishing() -> None:
    """The command has returned: another Ctrl-C (while Python shuts down) exits 130 at once,
    not with a traceback from the interpreter's shutdown."""
    if signal.getsignal(signal.SIGINT) in (_exit_while_starting, _interrupt):
        signal.signal(signal.SIGINT, _exit_while_finishing)
