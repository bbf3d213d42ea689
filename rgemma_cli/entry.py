"""The `rgemma` console script (and `python -m rgemma_cli`): Ctrl-C is handled from the first
instruction (`startup`), then `cli.main` runs."""

from __future__ import annotations

from . import startup


def main() -> int:
    startup.begin()
    from .cli import main as cli_main
    code = 130
    try:
        code = cli_main()
    except KeyboardInterrupt:  # a second Ctrl-C just as the command returned
        code = 130
    finally:
        while True:  # (one may also land inside this switch)
            try:
                startup.finishing()
                break
            except KeyboardInterrupt:
                code = 130
    return code
