"""`rgemma chat` in a real pseudo-terminal: streaming, slash commands, Ctrl-C mid-reply (the
session survives and its state matches what was shown), save after every turn, and resume."""

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from rgemma_cli import load, statefile
from rgemma_cli.generation import Session
from rgemma_cli.sampling import SamplerSettings

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[=>])")
# waits are multiplied by this: scripts/check_arm64.sh runs the suite under qemu-user emulation,
# where a chat's start-up and every reply take ~10-30x longer than natively
SLOW = float(os.environ.get("RGEMMA_TEST_TIMEOUT_SCALE", "1"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")


class Terminal:
    """A child process on a pty; `expect` waits for a regex in the ANSI-stripped output."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal, so ^C sends SIGINT
            env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "xterm"}
            os.chdir(ROOT)
            # a user's shell starts the chat with Ctrl-C deliverable: undo any signal mask or
            # ignored SIGINT this test process may have inherited or picked up from earlier tests
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-c",
                      "import sys; from rgemma_cli.cli import main; sys.exit(main())", *args], env)
        self.raw = ""
        self.seen = 0  # output consumed by expect so far

    def read(self, timeout=0.1) -> None:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if r:
            try:
                self.raw += os.read(self.fd, 65536).decode("utf-8", "replace")
            except OSError:  # EIO: the child closed the pty
                pass

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r\n", "\n").replace("\r", "")

    def expect(self, pattern, timeout=60.0) -> str:
        """Wait for `pattern` after what earlier expects consumed; return the text before it."""
        end = time.time() + timeout * SLOW
        while True:
            m = re.compile(pattern).search(self.text, self.seen)
            if m:
                before, self.seen = self.text[self.seen:m.start()], m.end()
                return before
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {pattern!r}; output:\n{self.text}")
            self.read()

    def settle(self) -> None:
        """Give readline time to put the terminal in its mode after the prompt is drawn; a
        control key sent earlier can be flushed by that switch."""
        time.sleep(0.5 * SLOW)
        self.read()

    def send(self, s: str) -> None:
        os.write(self.fd, s.encode())

    def wait(self, timeout=30.0) -> int:
        end = time.time() + timeout * SLOW
        while time.time() < end:
            self.read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"chat did not exit; output:\n{self.text}")


def test_chat_session(tiny_model_dir, tmp_path):
    save = tmp_path / "chat.rgs"
    t = Terminal("chat", "-m", str(tiny_model_dir), "-t", "0", "--save-state", str(save))
    t.expect(r">>> ")
    t.send("/set max-tokens 8\n")
    t.expect(r"max-tokens = 8")
    t.expect(r">>> ")
    t.send("Hello\n")
    t.expect(r"Hello\n")  # the terminal's echo
    reply = t.expect(r">>> ")
    assert reply.strip()  # a streamed reply
    t.send("/set max-tokens 1000000\n")
    t.expect(r">>> ")
    t.send('"""\nTell me\nmore"""\n')  # multi-line message
    end = time.time() + 30
    while time.time() < end:  # wait until the reply streams (after the last echo of the input)
        t.read()
        if re.search(r'\.\.\. more"""\r?\n[^\n]{20}', t.text[t.seen:]):
            break
    t.send("\x03")  # Ctrl-C mid-reply
    shown = t.expect(r"\(interrupted\)")
    t.expect(r">>> ")  # the session goes on
    t.send("/stats\n")
    t.expect(r"tokens seen: \d+")
    t.send("/exit\n")
    assert t.wait() == 0

    # the saved state is exactly the state of a run that stopped where the reply was cut
    saved = statefile.load(save)
    assert [m["role"] for m in saved.transcript] == ["user", "model", "user", "model"]
    assert saved.transcript[2]["content"] == "Tell me\nmore"
    cut = saved.transcript[3]["content"]
    assert cut and cut.strip() in shown.replace("\n", "") + cut.strip()
    model, tok = load(str(tiny_model_dir))
    for k in range(1, 200):  # the reply cut after k tokens, as a plain library session
        s = Session(model, tok, SamplerSettings(temperature=0), mode="chat")
        list(s.send("Hello", 8))
        if "".join(s.send("Tell me\nmore", k)) == cut:
            break
    assert s.transcript == saved.transcript
    assert s.ctx.state == saved.ctx.state and s.ctx.pending == saved.ctx.pending

    # resume: the transcript is shown again and the chat continues
    t = Terminal("chat", "-m", str(tiny_model_dir), "--resume", str(save), "-n", "4")
    t.expect(r">>> Hello")
    t.expect(r">>> Tell me")
    t.expect(r">>> $")
    t.send("/undo\n")  # snapshots live in memory: a resumed chat has none to go back to
    t.expect(r"nothing to undo")
    t.send("Hi\n")
    t.expect(r">>> ")
    t.send("/undo\n")
    t.expect(r"forgot: Hi")
    t.expect(r">>> ")
    t.settle()
    t.send("\x04")  # Ctrl-D exits
    assert t.wait() == 0


def test_ctrl_c_at_the_prompt_exits(tiny_model_dir):
    t = Terminal("chat", "-m", str(tiny_model_dir))
    t.expect(r">>> ")
    t.send("/help\n")
    t.expect(r"/regen")
    t.expect(r">>> ")
    t.settle()
    t.send("\x03")
    assert t.wait() == 0


def test_line_editing_and_ctrl_c_on_a_half_typed_line(tiny_model_dir, tmp_path):
    save = tmp_path / "c.rgs"
    t = Terminal("chat", "-m", str(tiny_model_dir), "-t", "0", "-n", "4", "--save-state", str(save))
    t.expect(r">>> ")
    t.settle()
    t.send("forget this")
    t.settle()
    t.send("\x03")  # Ctrl-C with a half-typed line: the line goes, the chat stays
    t.expect(r">>> ")
    t.settle()
    t.send("xyz\x15Hello\x01Say \n")  # Ctrl-U kills the line, Ctrl-A goes to its start
    t.expect(r">>> ")
    t.settle()
    t.send("\x03")  # Ctrl-C on an empty line exits
    assert t.wait() == 0
    saved = statefile.load(save)
    assert [m["content"] for m in saved.transcript if m["role"] == "user"] == ["Say Hello"]
