"""The CLI through typer's CliRunner: output discipline, resume equivalence, and bad input
(issue 3 item 7): one `error:` line on stderr, non-zero exit, nothing lost."""

import errno
import json
import os
import re
import shutil


import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rgemma_cli import cli, statefile

runner = CliRunner()


def rg(*args, input=None, ok=True):
    r = runner.invoke(cli.app, [str(a) for a in args], input=input)
    if ok:
        assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


def error_of(*args, input=None, code=1):
    r = rg(*args, input=input, ok=False)
    assert r.exit_code == code, (r.stdout, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


def run_main(*args, input=None):
    """`cli.main` in-process (the console script, its last-resort error handling included):
    (exit status, stdout, stderr)."""
    with runner.isolation(input=input) as (out, err, _):
        code = cli.main([str(a) if isinstance(a, Path) else a for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")


def main_error(*args, input=None, code=1):
    status, out, err = run_main(*args, input=input)
    lines = err.strip().splitlines()
    assert status == code and len(lines) == 1 and lines[0].startswith("error: "), (status, err)
    return lines[0]


def gen_json(model, *args, input=None):
    return json.loads(rg("generate", "-m", model, "--json", "-q", *args, input=input).stdout)


def test_stdout_is_only_the_text_stats_on_stderr(tiny_base_dir):
    r = rg("generate", "-m", tiny_base_dir, "-n", 8, "-t", 0, "Hello")
    j = gen_json(tiny_base_dir, "-n", 8, "-t", 0, "Hello")
    assert r.stdout == j["text"]  # no prompt echo, no newline or colour when not a TTY
    assert "tok/s" in r.stderr and "peak RSS" in r.stderr
    assert rg("generate", "-m", tiny_base_dir, "-n", 8, "-q", "Hello").stderr == ""


def test_prompt_from_stdin(tiny_base_dir):
    want = rg("generate", "-m", tiny_base_dir, "-n", 6, "-t", 0, "-q", "Hello").stdout
    assert rg("generate", "-m", tiny_base_dir, "-n", 6, "-t", 0, "-q", input="Hello").stdout == want
    assert rg("generate", "-m", tiny_base_dir, "-n", 6, "-t", 0, "-q", "-", input="Hello").stdout == want


def test_json_object(tiny_base_dir):
    j = gen_json(tiny_base_dir, "-n", 5, "-s", 1, "Hello")
    assert len(j["tokens"]) == j["generated_tokens"] == 5 and j["finish_reason"] == "length"
    assert {"text", "prompt_tokens", "prompt_tokens_per_second", "generation_tokens_per_second",
            "peak_rss_bytes"} <= set(j)


@pytest.mark.parametrize("sampling", [["-t", "0"], ["-t", "0.9", "--top-k", "50", "--top-p", "0.9",
                                                   "--repeat-penalty", "1.2", "-s", "42"]],
                         ids=["greedy", "seeded"])
def test_resume_equals_one_run(tiny_base_dir, tmp_path, sampling):
    whole = gen_json(tiny_base_dir, "-n", 32, *sampling, "It is a truth")
    s = tmp_path / "s.rgs"
    first = gen_json(tiny_base_dir, "-n", 16, *sampling, "--save-state", s, "It is a truth")
    second = gen_json(tiny_base_dir, "-n", 16, "--resume", s)  # settings and RNG from the file
    assert first["tokens"] + second["tokens"] == whole["tokens"]
    assert first["text"] + second["text"] == whole["text"]


def test_resume_with_prompt_appends_a_turn(tiny_model_dir, tmp_path):
    s = tmp_path / "chat.rgs"
    rg("generate", "-m", tiny_model_dir, "-n", 4, "-q", "--system", "Be brief.", "--save-state", s, "Hi")
    rg("generate", "-m", tiny_model_dir, "-n", 4, "-q", "--resume", s, "--save-state", s, "More")
    saved = statefile.load(s)
    assert saved.mode == "chat"  # -it model: chat template by default
    assert [m["role"] for m in saved.transcript] == ["system", "user", "model", "user", "model"]
    info = rg("state", s).stdout
    assert "tokens seen" in info and "2 user turns" in info and "More" in info


def test_raw_by_default_for_base_models(tiny_base_dir, tmp_path):
    rg("generate", "-m", tiny_base_dir, "-n", 2, "-q", "--save-state", tmp_path / "s", "Hi")
    assert statefile.load(tmp_path / "s").mode == "raw"
    rg("generate", "-m", tiny_base_dir, "--chat", "-n", 2, "-q", "--save-state", tmp_path / "s", "Hi")
    assert statefile.load(tmp_path / "s").mode == "chat"


def test_stop_string(tiny_base_dir):
    text = gen_json(tiny_base_dir, "-n", 30, "-s", 5, "Hello")["text"]
    stop = text[8:11]
    j = gen_json(tiny_base_dir, "-n", 30, "-s", 5, "--stop", "zzz", "--stop", stop, "Hello")
    assert j["finish_reason"] == "stop" and j["text"] == text[:text.index(stop)]


def test_info_state_download(tiny_model_dir):
    out = rg("info", tiny_model_dir).stdout
    assert "parameters" in out and "state size" in out and "chat template" in out
    assert re.search(r"linear weights +f32", out) and re.search(r"embedding / head +f32", out)
    assert rg("download", tiny_model_dir).stdout.strip() == str(tiny_model_dir)


# -- item 7: bad input ----------------------------------------------------------------------------

def test_empty_and_invalid_stdin(tiny_base_dir):
    assert "empty prompt" in error_of("generate", "-m", tiny_base_dir, input="  \n")
    assert "empty prompt" in error_of("generate", "-m", tiny_base_dir, " ")
    assert "not valid UTF-8" in error_of("generate", "-m", tiny_base_dir, input=b"caf\xe9\xff")


def test_unknown_model(tmp_path):
    assert "not found" in error_of("generate", "-m", tmp_path / "no-such-model", "hi")
    assert "not found" in error_of("info", "not a model id!")


@pytest.mark.parametrize("flags,what", [(["-t", "-0.5"], "--temperature"), (["--top-p", "0"], "--top-p"),
                                        (["--top-p", "1.5"], "--top-p"), (["-n", "-1"], "--max-tokens"),
                                        (["--min-p", "2"], "--min-p"), (["--top-k", "-3"], "--top-k")])
def test_bad_flag_values(tiny_base_dir, flags, what):
    assert what in error_of("generate", "-m", tiny_base_dir, *flags, "hi")


def test_malformed_command_line_is_one_line_too(capsys):
    assert cli.main(["generate", "-n", "abc", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--max-tokens" in err[0]
    assert cli.main(["generate", "--no-such-flag"]) == 2


def test_resume_missing_corrupt_foreign(tiny_model_dir, tiny_base_dir, tmp_path):
    assert "not found" in error_of("generate", "-m", tiny_base_dir, "--resume", tmp_path / "nope")
    bad = tmp_path / "bad.rgs"
    bad.write_bytes(b"RGEMMAST" + b"\x01\x00\x00\x00" + os.urandom(100))
    msg = error_of("generate", "-m", tiny_base_dir, "--resume", bad)
    assert "corrupt" in msg or "truncated" in msg
    s = tmp_path / "s.rgs"
    rg("generate", "-m", tiny_model_dir, "-n", 2, "-q", "--save-state", s, "Hi")
    raw = s.read_bytes()
    s.write_bytes(raw[:len(raw) // 2])
    assert "truncated" in error_of("generate", "-m", tiny_model_dir, "--resume", s)
    s.write_bytes(raw)
    assert "different model" in error_of("generate", "-m", tiny_base_dir, "--resume", s)
    assert "state file" in error_of("state", tmp_path / "nope")


def test_corrupt_state(tiny_base_dir, tmp_path):
    s = tmp_path / "s.rgs"
    rg("generate", "-m", tiny_base_dir, "-n", 2, "-q", "--save-state", s, "Hi")
    b = bytearray(s.read_bytes())
    b[-3] ^= 0xFF
    s.write_bytes(bytes(b))
    assert "corrupt" in error_of("generate", "-m", tiny_base_dir, "--resume", s)


@pytest.mark.parametrize("failure", ["read-only", "disk-full", "ctrl-c"])
def test_failed_save_keeps_previous_state(tiny_base_dir, tmp_path, monkeypatch, failure):
    s = tmp_path / "s.rgs"
    rg("generate", "-m", tiny_base_dir, "-n", 2, "-q", "--save-state", s, "Hi")
    before = s.read_bytes()
    real_open = os.open

    def fail_open(p, flags, *a):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(p, flags, *a)

    def fail_fsync(fd):
        if failure == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt
    if failure == "read-only":
        monkeypatch.setattr(os, "open", fail_open)
    else:
        monkeypatch.setattr(os, "fsync", fail_fsync)
    msg = error_of("generate", "-m", tiny_base_dir, "-n", 3, "-q", "--resume", s, "--save-state", s,
                   code=130 if failure == "ctrl-c" else 1)
    monkeypatch.undo()
    assert "unchanged" in msg
    assert s.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.rgs"]


def test_usage_doc_is_current():
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("gen_usage", root / "scripts/docs/gen_usage.py")
    gen_usage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_usage)
    assert (root / "docs/usage.md").read_text(encoding="utf-8") == gen_usage.render(), \
        "docs/usage.md is stale: run `make docs` (python scripts/docs/gen_usage.py)"


def test_ctrl_c_during_generate_saves_what_was_shown(tiny_base_dir, tmp_path, monkeypatch):
    from rgemma_cli.decode import Decoder
    real_step, calls = Decoder.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(Decoder, "step", step)
    s = tmp_path / "s.rgs"
    r = rg("generate", "-m", tiny_base_dir, "-t", 0, "-q", "--save-state", s, "Hello", ok=False)
    monkeypatch.undo()
    assert r.exit_code == 130
    saved = statefile.load(s)
    assert len(saved.ctx.pending) == 1 and saved.transcript[-1]["content"] == r.stdout
    # continuing from the file gives what an uninterrupted run gives
    whole = gen_json(tiny_base_dir, "-t", 0, "-n", 10, "Hello")
    shown = saved.ctx.tokens_seen - len(saved.ctx.pending) - whole["prompt_tokens"] + 1
    rest = gen_json(tiny_base_dir, "-n", 10 - shown, "--resume", s)
    assert r.stdout + rest["text"] == whole["text"]


DEMO = Path(__file__).resolve().parent.parent / "weights/demo"


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="weights/demo not built yet")
def test_demo_chat_turn_ends_with_end_of_turn():
    # a prompt the demo answers and closes at temperature 0 (some loop: see weights/demo/README.md)
    j = gen_json("demo", "-t", "0", "-n", "300", "Do you have any pets?")
    assert j["finish_reason"] == "stop" and j["tokens"][-1] in (1, 107)
    assert "<end_of_turn>" not in j["text"]


def test_quantize_then_generate(tiny_base_dir, tmp_path):
    out = tmp_path / "q8"
    rg("quantize", tiny_base_dir, out, "--bits", 8, "-q")
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert (out / "tokenizer.model").exists()
    j = gen_json(out, "-n", 6, "-t", 0, "Hello")
    assert len(j["tokens"]) == 6
    info = rg("info", out).stdout
    assert re.search(r"linear weights +int8 \(per-row scales\)", info)
    assert re.search(r"embedding / head +int8", info)
    assert "--bits must be 8 or 4" in error_of("quantize", tiny_base_dir, tmp_path / "q9", "--bits", 9)
    assert "already quantized" in error_of("quantize", out, tmp_path / "again")


def test_impossible_save_path_fails_before_generating(tmp_path):
    for args in (("generate", "hi"), ("chat",)):
        msg = error_of(*args, "-m", "demo", "--save-state", tmp_path / "no" / "s.rgs")
        assert "does not exist" in msg
    assert "is a directory" in error_of("generate", "-m", "demo", "--save-state", tmp_path, "hi")


# -- numerics fail loudly (issue 11, item 4) ----------------------------------------------------

@pytest.mark.parametrize("flags", [["-t", "1e-45"], ["--repeat-penalty", "1e-38", "-t", "0.8"],
                                   ["-t", "1e-45", "--repeat-penalty", "1e-38"]])
def test_extreme_sampler_flags_generate(tiny_base_dir, flags):
    j = gen_json(tiny_base_dir, "-n", 6, "-s", 3, *flags, "Hello")
    assert j["generated_tokens"] >= 1


def _poisoned(tmp_path, name, value, where=5):
    import conftest
    from rgemma_cli.checkpoint import open_tensors
    from rgemma_cli.safetensors import write_safetensors
    d = conftest.write_tiny_model(tmp_path / "poisoned")
    t = {n: np.array(f.tensor(n)) for n, f in open_tensors(d).items()}
    t[name].flat[where] = value
    write_safetensors(d / "model.safetensors", t)
    return d


@pytest.mark.parametrize("name, value", [
    ("model.layers.2.temporal_block.q_proj.weight", np.nan),  # was a ZeroDivisionError traceback
    ("model.embed_tokens.weight", np.inf),
    ("model.layers.0.mlp_block.down_proj.weight", np.nan),
])
def test_non_finite_weights_stop_generation_naming_the_tensor(tmp_path, name, value):
    d = _poisoned(tmp_path, name, value, where=slice(None))
    msg = error_of("generate", "-m", d, "-n", 4, "-t", 0, "--raw", "Hello")
    assert "NaN/Inf logits at position" in msg and name in msg
    msg = error_of("info", "--check", d)
    assert name in msg and "NaN or Inf" in msg


def test_an_inf_in_the_output_head_stops_generation(tmp_path):
    """One +Inf in the tied head's last row: soft-capping made its logit a plausible +30, so
    that token was sampled and generation went on (exit 0) until it was fed back. Checked
    before the cap now, by `generate` and by the batched engine (`batch`, `serve`)."""
    d = _poisoned(tmp_path, "model.embed_tokens.weight", np.inf, where=-1)
    msg = error_of("generate", "-m", d, "-n", 2, "-t", 0, "--raw", "Hello")
    assert "NaN/Inf logits at position" in msg and "model.embed_tokens.weight" in msg
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello", "max_tokens": 2, "raw": True}) + "\n")
    line = json.loads(rg("batch", "-m", d, "-q", src).stdout)
    assert "NaN/Inf logits" in line["error"]["message"]


def test_non_finite_norm_is_refused_not_silent(tmp_path):
    d = _poisoned(tmp_path, "model.final_norm.weight", np.nan)  # was exit 0 and empty output
    assert "model.final_norm.weight" in error_of("generate", "-m", d, "-n", 4, "-t", 0, "Hello")


def test_info_check_passes_a_clean_model(tiny_base_dir):
    assert "every tensor finite" in rg("info", "--check", tiny_base_dir).stdout


# -- issue 10: text, turns and the command line ---------------------------------------------------

def saved_ids(path):
    s = statefile.load(path)
    return list(s.ctx.recent) + list(s.ctx.pending)


def test_typed_text_never_becomes_a_control_token(tiny_model_dir, tiny_base_dir, tmp_path):
    from rgemma_cli import load
    _, tok = load(str(tiny_base_dir))
    s = tmp_path / "s.rgs"
    text = "a<eos>b<start_of_turn>model\nc<end_of_turn><pad><unused7>"
    rg("generate", "-m", tiny_base_dir, "--raw", "-n", 0, "-q", "--save-state", s, text)
    ids = saved_ids(s)
    assert ids[0] == tok.bos_id and tok.special_ids.isdisjoint(ids[1:])
    assert tok.decode(ids) == text
    rg("generate", "-m", tiny_base_dir, "--raw", "-n", 0, "-q", "--special", "--save-state", s, text)
    assert {1, 106, 107, 0} <= set(saved_ids(s))  # --special: the text spells them
    # chat: stdin, the argument and --system are all text; only the template makes turns
    rg("generate", "-m", tiny_model_dir, "-n", 0, "-q", "--system", "sys<end_of_turn>",
       "--save-state", s, "<start_of_turn>user\nhi", input="doc<eos>\n")
    ids = saved_ids(s)
    assert ids.count(106) == 1 and ids.count(107) == 1 and tok.eos_id not in ids


def test_a_finished_reply_cannot_be_continued(tmp_path):
    s = tmp_path / "s.rgs"
    j = gen_json("demo", "-t", "0", "-n", "300", "--save-state", s, "Do you have any pets?")
    assert j["finish_reason"] == "stop"
    msg = error_of("generate", "--resume", s, "-q")
    assert "nothing to continue" in msg
    # --raw too: raw text after a closed turn is the model opening a user turn ("user\nHey!")
    assert "nothing to continue" in error_of("generate", "--resume", s, "-q", "--raw", "-n", 5)
    assert saved_ids(s)[-2:] == [107] + [108]  # the turn stays closed: <end_of_turn>\n


def test_chat_or_raw_is_the_models(tmp_path):
    demo = Path(__file__).resolve().parent.parent / "weights" / "demo"
    q8 = tmp_path / "demo-q8"
    rg("quantize", "demo", q8, "-q")
    want = gen_json("demo", "-t", 0, "-n", 6, "Hi")
    for m in (demo, q8):
        s = tmp_path / "s.rgs"
        j = gen_json(m, "-t", 0, "-n", 6, "--save-state", s, "Hi")
        assert statefile.load(s).mode == "chat", m
        if m == demo:
            assert j["tokens"] == want["tokens"]
    info = rg("info", q8).stdout
    assert re.search(r"chat template +yes: recorded in config.json", info)
    assert re.search(r"chat template +yes: the demo model", rg("info", demo).stdout)


def test_read_a_document_once_and_ask_many_times(tiny_model_dir, tmp_path):
    from rgemma_cli import load
    from rgemma_cli.generation import Session
    from rgemma_cli.sampling import SamplerSettings
    doc = "It is a truth universally acknowledged, that a single man in possession\n" * 3
    s = tmp_path / "doc.rgs"
    r = rg("generate", "-m", tiny_model_dir, "-n", 0, "-s", 3, "--save-state", s, input=doc)
    assert r.stdout == "" and "saved state" in r.stderr
    saved = statefile.load(s)
    assert saved.ctx.pending == () and saved.ctx.state.pos > 40  # the text was fed, not queued
    before = s.read_bytes()
    answers = [gen_json(tiny_model_dir, "-n", 8, "--resume", s, "What is the main argument?")
               for _ in range(2)]
    assert answers[0]["tokens"] == answers[1]["tokens"] and answers[0]["text"] == answers[1]["text"]
    assert s.read_bytes() == before  # asking does not change the file
    model, tok = load(str(tiny_model_dir))
    lib = Session(model, tok, SamplerSettings(seed=3), mode="chat")
    lib.read(doc)
    assert lib.ctx.state == saved.ctx.state
    prompt = lib.prompt_ids("What is the main argument?")
    assert answers[0]["prompt_tokens"] == len(prompt)  # only the question is read
    g = lib.send("What is the main argument?", 8)
    assert "".join(g) == answers[0]["text"] and g.tokens == answers[0]["tokens"]
    # no prompt: the model answers the document itself
    assert gen_json(tiny_model_dir, "-n", 4, "--resume", s)["generated_tokens"] == 4


def test_resume_without_m_uses_the_model_the_file_names(tiny_model_dir, tmp_path, monkeypatch):
    s = tmp_path / "s.rgs"
    rg("generate", "-m", tiny_model_dir, "-n", 2, "-q", "--save-state", s, "Hi")
    monkeypatch.chdir(tmp_path)  # the name is absolute: found from anywhere
    monkeypatch.delenv("RGEMMA_MODEL", raising=False)
    r = rg("generate", "--resume", s, "-n", 2, "More")
    assert f"using model {tiny_model_dir}" in r.stderr
    d = rg("generate", "-m", "demo", "-n", 0, "-q", "--save-state", tmp_path / "d.rgs", "Hi")
    assert "using model demo" in rg("generate", "--resume", tmp_path / "d.rgs", "-n", 1, "x").stderr
    moved = tmp_path / "gone"
    shutil.copytree(tiny_model_dir, moved)
    rg("generate", "-m", moved, "-n", 0, "-q", "--save-state", s, "Hi")
    shutil.rmtree(moved)
    assert "pass -m" in error_of("generate", "--resume", s, "Hi")


def test_stdin_then_the_prompt(tiny_base_dir, tmp_path):
    s = tmp_path / "s.rgs"
    rg("generate", "-m", tiny_base_dir, "-n", 0, "-q", "--save-state", s, "Summarize:",
       input="the doc\n")
    assert statefile.load(s).transcript[0]["content"] == "the doc\n Summarize:"  # as simonw/llm
    from rgemma_cli import load
    _, tok = load(str(tiny_base_dir))
    assert saved_ids(s) == tok.raw_prompt("the doc\n Summarize:")
    assert "stdin comes first" in " ".join(rg("generate", "--help").stdout.split())


def test_json_text_is_the_decode_of_its_tokens(tiny_base_dir):
    from rgemma_cli import load
    _, tok = load(str(tiny_base_dir))
    for seed in range(4):  # random weights: stray byte pieces, invalid runs included
        j = gen_json(tiny_base_dir, "-n", 40, "-s", seed, "-t", 1.5, "--top-k", 0, "Hello")
        full = tok.decode(j["tokens"])
        # all of it, but for the bytes of a character the token limit cut (held back for a
        # continuation to complete): at most 3 U+FFFD at the end
        assert full.startswith(j["text"]) and set(full[len(j["text"]):]) <= {"\ufffd"}
        assert len(full) - len(j["text"]) <= (3 if j["finish_reason"] == "length" else 0)
    stop = gen_json(tiny_base_dir, "-n", 40, "-s", 1, "-t", 0, "Hello")["text"][5:8]
    j = gen_json(tiny_base_dir, "-n", 40, "-s", 1, "-t", 0, "--stop", stop, "Hello")
    assert j["finish_reason"] == "stop" and tok.decode(j["tokens"]).startswith(j["text"] + stop)


# -- issue 10 item 4: no traceback on any input (the known cases; test_cli_fuzz.py the kind) ---

def test_text_that_is_not_utf8_is_one_line(tiny_model_dir):
    bad = os.fsdecode(b"hi \xff there")  # what Python makes of such argv bytes (PEP 383)
    assert "not valid UTF-8" in main_error("generate", "-m", tiny_model_dir, bad, code=2)
    assert "not valid UTF-8" in main_error("generate", "-m", tiny_model_dir, "--system", bad, "hi", code=2)
    assert "not valid UTF-8" in main_error("generate", "-m", tiny_model_dir, "--stop", bad, "hi", code=2)


def test_chat_survives_a_message_that_is_not_utf8(tiny_model_dir, tmp_path):
    s = tmp_path / "c.rgs"
    r = rg("chat", "-m", tiny_model_dir, "-n", 3, "--save-state", s,
           input=b"hi \xff\xfe\nhello\n/save\n")
    assert "not valid UTF-8" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert [m["content"] for m in statefile.load(s).transcript if m["role"] == "user"] == ["hello"]


def test_saving_a_session_that_holds_nothing(tiny_model_dir, tmp_path):
    rg("generate", "-m", tiny_model_dir, "-n", 0, "-q", "--save-state", tmp_path / "a.rgs", "hi")
    assert statefile.load(tmp_path / "a.rgs").ctx.tokens_seen > 0  # the prompt, read (-n 0)
    r = rg("chat", "-m", tiny_model_dir, "-n", 3, input=f"/save {tmp_path / 'b.rgs'}\n")
    assert "saved" in r.stdout and statefile.load(tmp_path / "b.rgs").ctx.tokens_seen == 0


def test_quantize_onto_an_existing_file_or_itself(tiny_base_dir, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert "not a directory" in error_of("quantize", tiny_base_dir, f, "-q")
    assert f.read_text() == "keep me"
    assert "own directory" in error_of("quantize", tiny_base_dir, tiny_base_dir, "-q")


# -- issue 10 item 10: papercuts --------------------------------------------------------------------

def test_version_and_short_help():
    from rgemma_cli import __version__
    assert run_main("--version")[:2] == (0, f"rgemma {__version__}\n")
    assert run_main("-h")[1].startswith("Usage: rgemma") and "--max-tokens" in run_main("generate", "-h")[1]


def test_seed_used_is_in_stats_and_json_and_plurals(tiny_base_dir):
    j = gen_json(tiny_base_dir, "-n", 1, "Hello")  # no --seed: a random one is chosen
    assert isinstance(j["seed"], int)
    again = gen_json(tiny_base_dir, "-n", 1, "-s", j["seed"], "Hello")
    assert again["tokens"] == j["tokens"] and again["seed"] == j["seed"]
    err = rg("generate", "-m", tiny_base_dir, "-n", 1, "-s", 7, "Hello").stderr
    assert "generated: 1 token," in err and "seed: 7" in err


def test_infinite_temperature_gets_a_true_message(tiny_base_dir):
    for t in ("inf", "nan"):
        msg = error_of("generate", "-m", tiny_base_dir, "-t", t, "hi")
        assert "finite" in msg


def test_offline_download_does_not_suggest_model_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    msg = error_of("download", "google/recurrentgemma-2b")
    assert "HF_HUB_OFFLINE" in msg and "-m demo" not in msg


# -- issue 11 item 2: only regular files (subprocesses: a FIFO that blocks must not hang the suite)

def run_rgemma(*args, input=None, timeout=60):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "rgemma_cli.cli", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout)


def assert_one_error_line(r, code=1):
    err = r.stderr.decode(errors="replace").strip().splitlines()
    assert r.returncode == code and len(err) == 1 and err[0].startswith("error: "), (r.returncode, err)
    return err[0]


def test_fifo_and_devices_are_refused_not_waited_on(tiny_model_dir, tmp_path):
    fifo = tmp_path / "fifo.rgs"
    os.mkfifo(fifo)
    assert "FIFO" in assert_one_error_line(run_rgemma("state", fifo))
    assert "character device" in assert_one_error_line(run_rgemma("state", "/dev/zero"))
    assert "character device" in assert_one_error_line(run_rgemma("perplexity", "-m", tiny_model_dir, "/dev/zero"))
    assert "FIFO" in assert_one_error_line(run_rgemma("perplexity", "-m", tiny_model_dir, fifo))
    assert "FIFO" in assert_one_error_line(run_rgemma("generate", "-m", tiny_model_dir, "--resume", fifo))
    assert "FIFO" in assert_one_error_line(run_rgemma("generate", "-m", tiny_model_dir, "-n", 2,
                                                      "--save-state", fifo, "hi"))
    r = run_rgemma("chat", "-m", tiny_model_dir, input=f"/load {fifo}\n".encode())
    assert r.returncode == 0 and b"FIFO" in r.stdout
    if os.geteuid() == 0:  # a private node like /dev/null: never aim a test at the real one
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        assert "character device" in error_of("generate", "-m", tiny_model_dir, "--save-state", null, "hi")
        assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_unwritable_or_impossible_target_is_found_before_generating(tiny_model_dir, tmp_path, monkeypatch):
    from rgemma_cli.generation import Session
    monkeypatch.setattr(Session, "step", lambda self: pytest.fail("generated before checking"))
    assert "too long" in error_of("generate", "-m", tiny_model_dir, "--save-state", tmp_path / ("a" * 300), "hi")
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    assert "not an rgemma state file" in error_of("generate", "-m", tiny_model_dir, "--save-state", notes, "hi")


# -- issue 10 item 5: a closed pipe is a normal end -----------------------------------------------

def test_closed_pipe_exits_141_and_saves_what_was_written(tiny_base_dir, tmp_path):
    import subprocess
    import sys
    s = tmp_path / "s.rgs"
    p = subprocess.Popen([sys.executable, "-m", "rgemma_cli.cli", "generate", "-m", str(tiny_base_dir),
                          "-n", "20000", "-t", "0", "--save-state", str(s), "Once upon a time"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(20)  # `| head -c 20`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "error" not in err
    saved = statefile.load(s)
    assert len(head) == 20 and saved.transcript[-1]["content"].encode().startswith(head)
    assert 20 <= len(saved.transcript[-1]["content"].encode()) and saved.ctx.tokens_seen < 20000


def _read_terminal(master: int) -> bytes:
    """Everything written to a pty until every writer has closed it; closes the master."""
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out


def test_stats_start_on_a_line_of_their_own_when_they_share_a_screen(tiny_base_dir):
    """Text without a final newline, stdout a pipe: the stats line on stderr must not continue
    the text's last line, whether stderr is a terminal (`| cat` in a terminal) or the same pipe
    (`2>&1 | less`). stdout itself stays exactly the text."""
    import pty
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "rgemma_cli.cli", "generate", "-m", str(tiny_base_dir), "-n", "5",
           "-t", "0", "Hello"]
    text = gen_json(tiny_base_dir, "-n", 5, "-t", 0, "Hello")["text"]
    assert text and not text.endswith("\n")
    same = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120).stdout.decode()
    assert same.startswith(text + "\n") and same.splitlines()[1].startswith("prompt: ")
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out = p.stdout.read().decode()
    err = _read_terminal(master)
    assert p.wait(timeout=60) == 0
    assert out == text and b"\nprompt: " in err  # (a spinner may come first: it erases itself)


@pytest.mark.parametrize("delay", [0.25, 0.4, 0.55, 0.8])
def test_ctrl_c_while_starting_exits_130_with_one_line(tiny_base_dir, delay):
    # the command as installed (`python -m rgemma_cli` runs entry.main, as the console script
    # does): Ctrl-C while NumPy, Numba, the CLI and its parser are still loading, or while the
    # model loads, is the same one line and exit 130 as later (it was a traceback, a silent 130,
    # or "internal error (ImportError: initialization failed)", by the moment it came)
    import signal
    import subprocess
    import time
    p = subprocess.Popen([sys.executable, "-m", "rgemma_cli", "generate", "-m", str(tiny_base_dir),
                          "-n", "500", "Hello"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert b"Traceback" not in err and len(lines) == 1, err.decode()
    if p.returncode != 0:  # (a fast machine may have finished 500 tokens of the tiny model)
        # 130, or ended by the signal itself (Python re-raises a SIGINT it saw at exit), which
        # a shell reports as 130 too
        assert p.returncode in (130, -signal.SIGINT)
        assert lines[0] == "interrupted" or lines[0].startswith("prompt: ")


def test_stats_wait_for_a_slow_reader_of_the_text_on_the_same_terminal(tiny_base_dir):
    """`rgemma generate ... | cat` in a terminal: the stats go straight to the terminal while
    the text's end may still sit in the pipe; they must come after the whole text. The reader
    here takes 5 ms per byte, so without waiting for it the stats overtook the text."""
    import pty
    import subprocess
    text = gen_json(tiny_base_dir, "-n", 8, "-t", 0, "Hello")["text"]
    assert len(text.encode()) >= 8
    reader = ("import os, time\n"  # unbuffered, as cat: what it has read, it writes at once
              "while True:\n"
              "    b = os.read(0, 1)\n"
              "    if not b: break\n"
              "    os.write(1, b); time.sleep(0.005)\n")
    master, slave = pty.openpty()
    gen = subprocess.Popen([sys.executable, "-m", "rgemma_cli.cli", "generate", "-m", str(tiny_base_dir),
                            "-n", "8", "-t", "0", "Hello"], stdout=subprocess.PIPE, stderr=slave)
    cat = subprocess.Popen([sys.executable, "-c", reader], stdin=gen.stdout, stdout=slave)
    gen.stdout.close()
    os.close(slave)
    screen = _read_terminal(master)
    assert gen.wait(timeout=60) == 0 and cat.wait(timeout=60) == 0
    shown = screen.decode(errors="replace").replace("\r\n", "\n")
    assert text in shown and "prompt: " in shown
    assert shown.index(text) + len(text) <= shown.index("prompt: "), shown


def test_ctrl_c_while_the_stats_wait_for_the_reader_ends_only_the_wait(monkeypatch):
    # the text is out; a Ctrl-C while waiting for `| cat` to show it must not skip the stats and
    # the --save-state that follow (it did: KeyboardInterrupt escaped from the wait)
    import time
    from rgemma_cli import cli as C
    r, w = os.pipe()
    try:
        os.write(w, b"unread text")  # a reader that never reads
        out = os.fdopen(w, "w", closefd=False)
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)

        def ctrl_c(_):
            raise KeyboardInterrupt
        monkeypatch.setattr(time, "sleep", ctrl_c)
        C._wait_for_the_reader()  # returns: no KeyboardInterrupt
    finally:
        os.close(r)
        os.close(w)


def test_a_ctrl_c_a_library_swallowed_still_stops_generation(tiny_base_dir, tmp_path, monkeypatch):
    # a Ctrl-C raised inside a ctypes callback (Numba's object cache, while the model loads)
    # is printed as "Exception ignored" and dropped: generation then ran to its end, exit 0.
    # The flag it left makes the generation stop at its first token: exit 130, state saved.
    from rgemma_cli import startup
    monkeypatch.setattr(startup, "interrupted", True)
    st = tmp_path / "s.rgs"
    r = rg("generate", "-m", tiny_base_dir, "-n", "50", "-t", "0", "--save-state", st, "Hello", ok=False)
    assert r.exit_code == 130 and r.stdout == "" and st.exists()
    assert not startup.interrupted  # handled once
