"""The terminal chat: a print loop over `Session.send`, slash commands, multi-line input, line
editing, Ctrl-C that only stops the reply (or clears the line), and one in-memory state snapshot
per turn so /regen and /undo never re-read the conversation."""

from __future__ import annotations

import dataclasses
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from . import startup
from .errors import RgemmaError
from .decode import Context
from .generation import Session
from .schema import plural
from .sampling import SamplerSettings, new_rng_state

HELP = """\
/help                 this list
/save [PATH]          save the conversation (default: the --save-state path)
/load PATH            continue a saved conversation (options given on the command line win)
/reset                start over (same model and settings)
/regen                answer the last message again
/undo                 forget the last message and its answer
/set [NAME VALUE]     change a setting (temperature, top-k, top-p, min-p, repeat-penalty,
                      repeat-last-n, seed, max-tokens); without arguments, show them
/stats                speed of the last reply, tokens seen, state size
/exit, /bye, Ctrl-D   leave
\"\"\"                   start (and end) a multi-line message
Ctrl-C stops a reply and keeps the conversation; at the prompt it clears the line, and on
an empty line it exits."""


MAX_SNAPSHOTS = 16  # a 2B state is 34 MB: /undo reaches back this many turns


@dataclass
class Turn:
    """What /undo and /regen go back to: the context and transcript length before a message."""

    ctx: Context
    transcript_len: int
    text: str


class ChatUI:
    """Reads messages, streams replies, keeps per-turn snapshots."""

    def __init__(self, session: Session, *, model_name: str, max_tokens: int = 1024,
                 system: str | None = None, save_path: Path | None = None,
                 console: Console | None = None, overrides: dict | None = None):
        self.session, self.model_name, self.max_tokens = session, model_name, max_tokens
        self.system, self.save_path = system, save_path
        self.overrides = dict(overrides or {})  # sampling options given on the command line
        self.console = console or Console(highlight=False)
        self.turns: list[Turn] = []
        self.last = None  # the last Generation, for /stats
        self.readline = None  # the readline module when line editing is on

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Until /exit, Ctrl-D or Ctrl-C at the prompt."""
        if sys.stdin.isatty() and sys.stdout.isatty():
            try:
                import readline  # line editing and history for input()
                self.readline = readline
            except ImportError:
                pass
        try:  # bytes that are not UTF-8 become lone surrogates, refused per message, not fatal
            sys.stdin.reconfigure(errors="surrogateescape")
        except (AttributeError, ValueError, OSError):
            pass
        self.console.print(f"[bold]rgemma chat[/] · {escape(self.model_name)} · /help for "
                           f"commands, Ctrl-D to exit")
        self.replay()
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt as e:
                self.console.print()
                if getattr(e, "line", ""):  # a half-typed line: drop it, keep the chat
                    continue
                return
            except UnicodeDecodeError:  # a byte that is not UTF-8: the line is lost, not the chat
                self.console.print("[red]error:[/] that line was not valid UTF-8; type it again")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                try:
                    if self.command(text) == "exit":
                        return
                except RgemmaError as e:
                    self.error(e)
                continue
            try:
                self.turn(text)
            except RgemmaError as e:  # e.g. a message that is not UTF-8: not sent, chat goes on
                self.error(e)

    def error(self, e: RgemmaError) -> None:
        """Report a failure in one line, as the CLI does (not wrapped at the console width);
        the chat goes on."""
        self.console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)

    def prompt(self, text: str) -> str:
        """input() with a prompt readline can measure: colour codes are wrapped in \\001 and
        \\002 (readline's invisible-text markers), so Ctrl-A, Ctrl-U and long lines redraw
        right. A Ctrl-C raises KeyboardInterrupt with `.line`, what was typed so far."""
        if self.readline is None:
            shown = text
        else:
            colour = "\x1b[1;32m" if text.startswith(">") else "\x1b[2m"
            shown = f"\001{colour}\002{text}\001\x1b[0m\002"
        typed = []

        def on_sigint(signum, frame):  # runs inside readline, before it drops the line
            typed.append(self.readline.get_line_buffer() if self.readline else "")
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            return input(shown)
        except KeyboardInterrupt as e:
            e.line = typed[0] if typed else ""
            raise
        finally:
            signal.signal(signal.SIGINT, old)

    def read_message(self) -> str:
        """One message; `\"\"\"` opens and closes a multi-line one."""
        line = self.prompt(">>> ")
        if not line.lstrip().startswith('"""'):
            return line.strip()
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""') and len(body.rstrip()) >= 3:
            return body.rstrip()[:-3].strip()
        lines = [body] if body.strip() else []
        while True:
            try:
                line = self.prompt("... ")
            except KeyboardInterrupt as e:
                e.line = "\n".join(lines + [getattr(e, "line", "")]) or '"""'
                raise
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip()
            lines.append(line)

    def turn(self, text: str) -> None:
        """Send one message and print the reply as it streams (the session records it); Ctrl-C
        stops the reply, not the chat."""
        s = self.session
        before = Turn(s.ctx, len(s.transcript), text)
        g = s.send(text, self.max_tokens, system=self.system)  # raises first if text is bad
        self.turns.append(before)
        del self.turns[:-MAX_SNAPSHOTS]
        out = sys.stdout
        try:
            for piece in g:
                out.write(piece)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            startup.handled()  # the chat goes on: this Ctrl-C is spent
            s.interrupt(g)
            out.write("\n")
            if g.cancelled:  # still reading the message: forgotten, as if never sent
                self.turns.pop()
                self.console.print("[dim](cancelled)[/]")
            else:
                self.console.print("[dim](interrupted)[/]")
        finally:
            out.flush()
        self.last = g
        if self.save_path:
            self.save(self.save_path, quiet=True)

    def restore(self, t: Turn) -> None:
        """Go back to before turn `t`, keeping the random stream where it is (so /regen samples
        a new answer rather than repeating the last one)."""
        self.session.restore(t.ctx, t.transcript_len)

    def replay(self) -> None:
        """Show a resumed transcript again."""
        for m in self.session.transcript:
            if m["role"] == "user":
                self.console.print(f"[bold green]>>> [/]{escape(m['content'])}")
            elif m["role"] == "system":
                self.console.print(f"[dim]system: {escape(m['content'])}[/]")
            else:
                self.console.print(m["content"], markup=False)

    # -- slash commands -------------------------------------------------------------------------

    def command(self, line: str):
        """Run a slash command; returns "exit" to leave."""
        name, *args = line.split(maxsplit=2)
        name = name.lower()
        s = self.session
        if name in ("/exit", "/bye", "/quit"):
            return "exit"
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/save":
            path = Path(" ".join(args)) if args else self.save_path
            if path is None:
                raise RgemmaError("usage: /save PATH (or start the chat with --save-state PATH)")
            self.save(path)
        elif name == "/load":
            if not args:
                raise RgemmaError("usage: /load PATH")
            self.load(Path(" ".join(args)))
        elif name == "/reset":
            s.restore(Context(s.model.initial_state(), (), (), s.ctx.rng), 0)
            s.transcript.clear()
            self.turns.clear()
            self.console.print("[dim](new conversation)[/]")
        elif name in ("/regen", "/undo"):
            if not self.turns:
                raise RgemmaError(f"nothing to {name[1:]}: no message in this session yet "
                                  f"(or the last {MAX_SNAPSHOTS} were already undone)")
            t = self.turns.pop()
            self.restore(t)
            if name == "/regen":
                self.console.print(f"[bold green]>>> [/]{escape(t.text)}")
                self.turn(t.text)
            else:
                self.console.print(f"[dim](forgot: {escape(t.text[:60])})[/]")
                if self.save_path:  # so an undone message does not come back on resume
                    self.save(self.save_path, quiet=True)
        elif name == "/set":
            self.set(args)
        elif name == "/stats":
            self.stats()
        else:
            raise RgemmaError(f"unknown command {name}; /help lists them")

    def set(self, args) -> None:
        """/set NAME VALUE for a sampling setting or max-tokens; /set alone shows them."""
        s = self.session
        if not args:
            shown = {**s.settings.to_dict(), "max_tokens": self.max_tokens}
            self.console.print(", ".join(f"{k.replace('_', '-')}={v}" for k, v in shown.items()))
            return
        if len(args) != 2:
            raise RgemmaError("usage: /set NAME VALUE")
        name, value = args[0].lstrip("-").replace("-", "_").lower(), args[1]
        fields = {f.name: f for f in dataclasses.fields(SamplerSettings)}
        if name == "max_tokens":
            n = _number(value, int, "max-tokens")
            if n < 0:
                raise RgemmaError(f"max-tokens must be >= 0, got {n}")
            self.max_tokens = n
        elif name in fields:
            kind = float if "float" in str(fields[name].type) else int
            s.settings = s.settings.replace(**{name: _number(value, kind, name)})
            if name == "seed":  # a new seed restarts the random stream (-1: a random one)
                s.settings = s.settings.with_seed()
                s.ctx = replace(s.ctx, rng=new_rng_state(s.settings.seed))
        else:
            raise RgemmaError(f"unknown setting {args[0]}; /set lists them")
        shown = str(s.settings.seed) if name == "seed" else value  # -1: the seed drawn
        self.console.print(f"[dim]{name.replace('_', '-')} = {escape(shown)}[/]")

    def stats(self) -> None:
        """/stats: where the conversation stands and how fast the last reply was."""
        s = self.session
        lines = [f"tokens seen: {s.ctx.tokens_seen}, state: {s.ctx.state.nbytes / 2**20:.2f} MiB "
                 f"in memory, turns: {sum(m['role'] == 'user' for m in s.transcript)}"]
        g = self.last
        if g is not None:
            lines.append(f"last reply: {plural(g.generated, 'token')}, {g.gen_tps:.1f} tok/s; prompt "
                         f"{g.prompt_tokens} tokens, {g.prompt_tps:.1f} tok/s; "
                         f"stopped: {g.finish_reason}")
        self.console.print("\n".join(lines), markup=False)

    def save(self, path: Path, quiet: bool = False) -> None:
        """Save the session; a failure is reported and the chat goes on."""
        from . import statefile
        try:
            size = statefile.save(path, self.session, name=self.model_name)
        except RgemmaError as e:
            self.error(e)
            return
        if not quiet:
            self.console.print(f"[dim](saved {escape(str(path))}, {size / 2**20:.2f} MiB)[/]")

    def load(self, path: Path) -> None:
        """/load: switch to a saved conversation of the same model and show it. As with
        --resume, sampling options given on the command line win over the file's."""
        from . import statefile
        saved = statefile.load(path)
        statefile.check_model(saved, self.session.model, self.session.tokenizer, path)
        special = self.session.special
        self.session = statefile.restore(saved, self.session.model, self.session.tokenizer)
        self.session.settings = self.session.settings.replace(**self.overrides)
        self.session.mode, self.session.special = "chat", special
        self.turns.clear()
        self.console.print(f"[dim](loaded {escape(str(path))})[/]")
        self.replay()


def _number(value: str, kind, name: str):
    try:
        return kind(value)
    except ValueError:
        raise RgemmaError(f"{name} must be {'a number' if kind is float else 'an integer'}, "
                          f"got {value!r}") from None
