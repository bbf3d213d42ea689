"""The `rgemma` console script (and `python -m rgemma_cli`): Ctrl-C is handled from the first
instruction (`startup`), then `cli.main` runs."""

from __future__ import annotations

from . import startup


def main() -> int:
    startup.begin()
    from .cli import main as cli_main
    try:
        return cli_main()
    finally:
        startup.finishing()
