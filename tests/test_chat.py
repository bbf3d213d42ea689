"""The chat REPL without a terminal (issue 10 item 9): the prompt readline measures, /load's
option rule, /undo and /regen rewriting the --save-state file."""

import io

import pytest
from rich.console import Console

from rgemma_cli import statefile
from rgemma_cli.chat import ChatUI
from rgemma_cli.errors import RgemmaError
from rgemma_cli.generation import Session
from rgemma_cli.sampling import SamplerSettings


def ui(tiny, tmp_path, **kw):
    model, tok = tiny
    s = Session(model, tok, SamplerSettings(temperature=0.8, seed=1), mode="chat")
    console = Console(file=io.StringIO(), width=100)
    return ChatUI(s, model_name="tiny", max_tokens=4, console=console, **kw)


def test_the_prompt_goes_to_input_where_readline_can_measure_it(tiny, tmp_path, monkeypatch):
    c = ui(tiny, tmp_path)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "hi")
    assert c.read_message() == "hi"
    assert asked == [">>> "]  # no readline: the plain prompt, no escape codes
    import readline
    c.readline = readline
    c.read_message()
    shown = asked[-1]
    # colour codes are wrapped in \001 ... \002, so readline counts the prompt as 4 columns
    visible = "".join(shown.split("\001")[i].split("\002")[-1] for i in range(len(shown.split("\001"))))
    assert visible == ">>> " and "\x1b[" in shown and shown.count("\001") == shown.count("\002") == 2


def test_load_keeps_the_options_given_on_the_command_line(tiny, tmp_path):
    model, tok = tiny
    other = Session(model, tok, SamplerSettings(temperature=0.9, top_k=7, seed=5), mode="chat")
    list(other.send("Hello", 3))
    path = tmp_path / "other.rgs"
    statefile.save(path, other)
    c = ui(tiny, tmp_path, overrides={"temperature": 0.0})
    c.command(f"/load {path}")
    assert c.session.settings.temperature == 0.0  # from the command line
    assert c.session.settings.top_k == 7 and c.session.settings.seed == 5  # from the file
    assert c.session.transcript == other.transcript


@pytest.mark.parametrize("command", ["/undo", "/regen"])
def test_undo_and_regen_rewrite_the_save_file(tiny, tmp_path, command, monkeypatch):
    save = tmp_path / "chat.rgs"
    c = ui(tiny, tmp_path, save_path=save)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    c.turn("first")
    c.turn("second message")
    assert [m["content"] for m in statefile.load(save).transcript][2] == "second message"
    c.command(command)
    saved = statefile.load(save)
    if command == "/undo":  # the undone message does not come back on resume
        assert [m["role"] for m in saved.transcript] == ["user", "model"]
    else:
        assert [m["role"] for m in saved.transcript] == ["user", "model", "user", "model"]
        assert saved.transcript[3]["content"] == c.session.transcript[3]["content"]
    assert saved.ctx.tokens_seen == c.session.ctx.tokens_seen


def test_set_seed_minus_one_draws_a_seed_and_shows_it(tiny, tmp_path):
    c = ui(tiny, tmp_path)
    c.command("/set seed -1")
    seed = c.session.settings.seed
    assert seed is not None and seed >= 0
    assert f"seed = {seed}" in c.console.file.getvalue()


def test_an_error_is_one_line_however_long(tiny, tmp_path):
    """Rich wrapped chat errors at the console width (80 columns when not a terminal)."""
    c = ui(tiny, tmp_path)
    c.console.width = 40
    with pytest.raises(RgemmaError) as e:
        c.command("/undo")  # nothing to undo: a message longer than 40 columns
    c.error(e.value)
    out = c.console.file.getvalue().strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error:") and len(out[0]) > 40
