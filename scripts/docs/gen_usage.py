"""Write docs/usage.md from the CLI's own `--help` texts (`make docs`); tests/test_cli.py fails
when the file is stale, so the documentation cannot drift from the flags."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "usage.md"
COMMANDS = [[], ["generate"], ["batch"], ["chat"], ["serve"], ["download"], ["info"], ["quantize"], ["state"]]


def help_text(args: list[str]) -> str:
    """`rgemma ARGS --help` at a fixed width, whatever the terminal and environment."""
    from typer.testing import CliRunner

    from rgemma_cli.cli import app
    r = CliRunner().invoke(app, [*args, "--help"], prog_name="rgemma", terminal_width=100,
                           max_content_width=100, env={"RGEMMA_MODEL": None, "COLUMNS": "100"})
    if r.exit_code != 0:
        raise SystemExit(f"rgemma {' '.join(args)} --help failed: {r.output}")
    return r.stdout.rstrip() + "\n"


def render() -> str:
    """The whole of docs/usage.md."""
    from rgemma_cli.chat import HELP
    parts = ["# rgemma usage\n",
             "Generated from `--help` by `scripts/docs/gen_usage.py` (`make docs`); do not edit by hand.\n"]
    for args in COMMANDS:
        parts += [f"## `rgemma{''.join(' ' + a for a in args)}`\n", "```", help_text(args) + "```\n"]
        if args == ["chat"]:
            parts += ["Inside the chat:\n", "```", HELP + "\n```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
