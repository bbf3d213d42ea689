"""`rgemma batch` (issue 14 item 3): every answer equals `rgemma generate` on that request
alone; bad lines get an error object; an interrupted run keeps its finished lines and a rerun
skips them."""

import json
import os
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rgemma_cli import batchrun, cli, engine

runner = CliRunner()

REQUESTS = [
    ({"id": "greedy-chat", "prompt": "Hello there", "max_tokens": 9, "temperature": 0},
     ["-n", 9, "-t", 0, "Hello there"]),
    ({"id": "seeded-chat", "prompt": "Tell me", "max_tokens": 12, "seed": 5, "temperature": 1.1,
      "top_k": 20, "top_p": 0.9, "min_p": 0.02, "repeat_penalty": 1.2},
     ["-n", 12, "-s", 5, "-t", 1.1, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.02,
      "--repeat-penalty", 1.2, "Tell me"]),
    ({"prompt": "Once upon", "raw": True, "max_tokens": 10, "temperature": 0, "stop": ["e"]},
     ["--raw", "-n", 10, "-t", 0, "--stop", "e", "Once upon"]),
    ({"id": 7, "prompt": "Once upon", "raw": True, "max_tokens": 11, "seed": 3},
     ["--raw", "-n", 11, "-s", 3, "Once upon"]),
    ({"id": "msg", "messages": [{"role": "system", "content": "Be short"},
                                {"role": "user", "content": "Hi"}], "max_tokens": 8, "seed": 1},
     ["-n", 8, "-s", 1, "--system", "Be short", "Hi"]),
]


def rg(*args, input=None, code=0):
    r = runner.invoke(cli.app, [str(a) for a in args], input=input)
    assert r.exit_code == code, (r.stdout, r.stderr, r.exception)
    return r


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_equals_generate_alone(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r, _ in REQUESTS) + "\n\n")
    out = rg("batch", "-m", tiny_model_dir, "-b", 2, "-q", src).stdout.splitlines()
    assert len(out) == len(REQUESTS)
    for line, (req, flags) in zip(out, REQUESTS):
        got = json.loads(line)
        want = json.loads(rg("generate", "-m", tiny_model_dir, "--json", "-q", *flags).stdout)
        assert got["id"] == req.get("id", REQUESTS.index((req, flags)) + 1)
        assert (got["text"], got["finish_reason"], got["prompt_tokens"], got["completion_tokens"]) == \
            (want["text"], want["finish_reason"], want["prompt_tokens"], want["generated_tokens"])
        if "seed" in req:
            assert got["seed"] == req["seed"]


def test_flags_are_the_defaults(tiny_base_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt": "Hello", "max_tokens": 3}))
    a, b = [json.loads(l) for l in rg("batch", "-m", tiny_base_dir, "-n", 6, "-s", 11, "-q", src).stdout.splitlines()]
    want = json.loads(rg("generate", "-m", tiny_base_dir, "--json", "-q", "-n", 6, "-s", 11, "Hello").stdout)
    assert a["text"] == want["text"] and a["seed"] == 11 and a["completion_tokens"] == 6
    assert b["completion_tokens"] == 3


def test_seed_minus_one_is_a_random_seed_reported_in_the_answer(tiny_base_dir, tmp_path):
    # as the server and llama.cpp take it; the answer names the seed it drew, so it reproduces
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello", "seed": -1, "max_tokens": 4}) + "\n")
    got = json.loads(rg("batch", "-m", tiny_base_dir, "-q", src).stdout)
    assert "error" not in got and got["seed"] >= 0
    src.write_text(json.dumps({"prompt": "Hello", "seed": got["seed"], "max_tokens": 4}) + "\n")
    assert json.loads(rg("batch", "-m", tiny_base_dir, "-q", src).stdout)["text"] == got["text"]


def test_bad_lines_get_errors_and_the_rest_proceed(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hi", "max_tokens": 2}\nnot json\n{"id": "t", "prompt": "Hi", '
                   '"temperature": -1}\n[1, 2]\n{"id": "ok", "prompt": "Hi", "max_tokens": 2}\n'
                   '{"id": "ok", "prompt": "again"}\n')
    out = [json.loads(l) for l in rg("batch", "-m", tiny_model_dir, "-q", src).stdout.splitlines()]
    assert [o["id"] for o in out] == [1, 2, "t", 4, "ok", "ok"]
    assert ["error" in o for o in out] == [False, True, True, True, False, True]
    assert "temperature" in out[2]["error"]["message"] and "duplicate" in out[5]["error"]["message"]
    # a line that is not JSON is labelled with its line number: an explicit id equal to it
    # would give two answers one id, so it is a duplicate too
    src.write_text('bad\n{"id": 1, "prompt": "Hi", "max_tokens": 2}\n')
    out = [json.loads(l) for l in rg("batch", "-m", tiny_model_dir, "-q", src).stdout.splitlines()]
    assert [o["id"] for o in out] == [1, 1] and "duplicate" in out[1]["error"]["message"]


def test_max_tokens_0_is_answered_in_its_place(tiny_model_dir, tmp_path):
    """A request that runs nothing (max_tokens 0) still gets its line, to stdout and to -o."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2}\n{"id": "z", "prompt": "Hi", '
                   '"max_tokens": 0}\n{"id": "b", "prompt": "Hi", "max_tokens": 1}\n')
    for args in ([], ["-o", dst]):
        out = rg("batch", "-m", tiny_model_dir, "-q", src, *args).stdout
        lines = [json.loads(l) for l in (dst.read_text() if args else out).splitlines()]
        assert [o["id"] for o in lines] == ["a", "z", "b"]
        assert (lines[1]["text"], lines[1]["finish_reason"], lines[1]["completion_tokens"]) == ("", "length", 0)


@pytest.mark.parametrize("args, message", [
    (["/nonexistent.jsonl"], "no such file"),
    (["IN", "-b", "0"], "--batch-size"),
    (["IN", "-t", "-1"], "--temperature"),
    (["IN", "-o", "/nonexistent/dir/out.jsonl"], "does not exist"),
])
def test_refusals(tiny_model_dir, tmp_path, args, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hi"}\n')
    r = rg("batch", "-m", tiny_model_dir, *[src if a == "IN" else a for a in args], code=1)
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr


def test_interrupt_keeps_finished_lines_and_rerun_skips_them(tiny_model_dir, tmp_path, monkeypatch):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    reqs = [{"id": f"r{i}", "prompt": f"Hello {i}", "max_tokens": 2 + 3 * i, "seed": i} for i in range(5)]
    src.write_text("\n".join(json.dumps(r) for r in reqs))
    full = [json.loads(l) for l in rg("batch", "-m", tiny_model_dir, "-q", "-b", 5, src).stdout.splitlines()]

    real_step, calls = engine.Engine.step, []

    def step(self):  # Ctrl-C after the 6th step: the short requests are done, the long are not
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(engine.Engine, "step", step)
    r = rg("batch", "-m", tiny_model_dir, "-q", "-b", 5, "-o", dst, src, code=130)
    assert r.stderr.strip().splitlines() == ["interrupted"]  # one line, not silence
    kept = _lines(dst)
    assert 0 < len(kept) < len(reqs)
    assert all(k in full for k in kept)

    monkeypatch.setattr(engine.Engine, "step", real_step)
    submitted = []
    real_submit = engine.Engine.submit
    monkeypatch.setattr(engine.Engine, "submit",
                        lambda self, r: submitted.append(r.id) or real_submit(self, r))
    rg("batch", "-m", tiny_model_dir, "-q", "-b", 5, "-o", dst, src)
    assert _lines(dst) == full  # complete, in input order
    assert sorted(submitted) == sorted(set(r["id"] for r in reqs) - {k["id"] for k in kept})


# -- QA F8-F10: the requests and the output are untrusted files --------------------------------

def _rgemma_subprocess(*args, input=None):
    """A subprocess, so a FIFO that blocks (the bug) fails the test instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "rgemma_cli.cli", *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=60)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_output_that_is_not_a_regular_file_is_refused_before_any_work(tiny_model_dir, tmp_path,
                                                                       kind):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "Hi", "max_tokens": 2}\n')
    if kind == "fifo":
        os.mkfifo(dst)
    elif kind == "directory":
        dst.mkdir()
    else:
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        os.mknod(dst, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    r = _rgemma_subprocess("batch", "-m", tiny_model_dir, "-q", "-o", dst, src)
    msg = _one_error_line(r.stderr)
    assert r.returncode == 1 and ("it is a directory" if kind == "directory" else
                                  "rgemma writes only regular files") in msg, msg
    mode = os.lstat(dst).st_mode  # the node itself is untouched
    assert {"fifo": stat.S_ISFIFO, "device": stat.S_ISCHR, "directory": stat.S_ISDIR}[kind](mode)


@pytest.mark.parametrize("content", [b"my notes\n", b"my notes", b'{"a": 1}\n',
                                     b'{"id": 1, "text": "x", "finish_reason": "stop"}\nmore\n',
                                     b"[" * 100000 + b"\n", b"\xff\xfe\n"])
def test_an_output_file_that_is_not_a_batch_output_is_refused_not_wiped(tiny_model_dir, tmp_path,
                                                                         content):
    src, dst = tmp_path / "in.jsonl", tmp_path / "notes.md"
    src.write_text('{"prompt": "Hi", "max_tokens": 2}\n')
    dst.write_bytes(content)
    r = rg("batch", "-m", tiny_model_dir, "-q", "-o", dst, src, code=1)
    assert "not an output of rgemma batch" in _one_error_line(r.stderr)
    assert dst.read_bytes() == content


def test_output_symlink_target_is_written_new_files_are_0644(tiny_model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2, "seed": 1}\n')
    old = os.umask(0o022)
    try:
        rg("batch", "-m", tiny_model_dir, "-q", "-o", tmp_path / "new.jsonl", src)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.jsonl").st_mode) == 0o644
    first = _lines(tmp_path / "new.jsonl")
    link = tmp_path / "link.jsonl"
    os.symlink("new.jsonl", link)
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2, "seed": 1}\n'
                   '{"id": "b", "prompt": "Yo", "max_tokens": 2, "seed": 1}\n')
    rg("batch", "-m", tiny_model_dir, "-q", "-o", link, src)
    assert link.is_symlink() and os.readlink(link) == "new.jsonl"
    got = _lines(tmp_path / "new.jsonl")
    assert [g["id"] for g in got] == ["a", "b"] and got[0] == first[0]


def test_a_line_cut_short_by_a_crash_is_dropped_on_resume(tiny_model_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "Hi", "max_tokens": 2, "seed": 1}\n'
                   '{"id": "b", "prompt": "Yo", "max_tokens": 2, "seed": 2}\n')
    full = rg("batch", "-m", tiny_model_dir, "-q", "-o", dst, src) and _lines(dst)
    dst.write_text(json.dumps(full[0], ensure_ascii=False) + '\n{"id": "b", "te')
    rg("batch", "-m", tiny_model_dir, "-q", "-o", dst, src)
    assert _lines(dst) == full


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_requests_that_are_not_a_regular_file_are_refused(tiny_model_dir, tmp_path, kind):
    src = {"fifo": tmp_path / "in.jsonl", "dev-zero": "/dev/zero", "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(src)
    r = _rgemma_subprocess("batch", "-m", tiny_model_dir, "-q", src)
    assert r.returncode == 1
    assert {"fifo": "FIFO", "dev-zero": "character device", "directory": "directory"}[kind] \
        in _one_error_line(r.stderr)


def test_requests_from_stdin_are_bounded(tiny_model_dir, monkeypatch):
    line = '{"id": "a", "prompt": "Hi", "max_tokens": 1}\n'
    assert json.loads(rg("batch", "-m", tiny_model_dir, "-q", "-", input=line).stdout)["id"] == "a"
    monkeypatch.setattr(batchrun, "MAX_BATCH_BYTES", 100)
    r = rg("batch", "-m", tiny_model_dir, "-q", "-", input=line * 3, code=1)
    assert "stdin is too large" in _one_error_line(r.stderr)


def test_hostile_request_lines_get_error_lines_and_the_rest_proceed(tiny_model_dir, tmp_path):
    """Deep nesting was a RecursionError and a lone surrogate in an "id" (a JSON \\ud800
    escape) a UnicodeEncodeError, each killing the whole run as an internal error."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("[" * 100000 + "\n"
                   '{"id": "a\\ud800", "prompt": "Hi", "max_tokens": 1, "seed": 1}\n'
                   '{"id": "b", "prompt": "x\\udfff", "max_tokens": 1}\n'
                   '{"id": "c", "prompt": "Hi", "max_tokens": NaN}\n'
                   '{"id": "d", "prompt": "Hi", "max_tokens": 1, "seed": 1}\n')
    out = [json.loads(line) for line in rg("batch", "-m", tiny_model_dir, "-q", src).stdout.splitlines()]
    assert [o["id"] for o in out] == [1, "a\ud800", "b", 4, "d"]  # NaN is not JSON: line 4
    assert "nested too deeply" in out[0]["error"]["message"]
    assert "text" in out[1] and "text" in out[4]
    assert "U+DFFF" in out[2]["error"]["message"] and "error" in out[3]
    rg("batch", "-m", tiny_model_dir, "-q", "-o", dst, src)
    assert _lines(dst) == out
    rg("batch", "-m", tiny_model_dir, "-q", "-o", dst, src)  # resumes: the file reads back
    assert _lines(dst) == out


def test_the_summary_counts_in_the_singular(tiny_base_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello", "max_tokens": 1}) + "\n")
    r = rg("batch", "-m", tiny_base_dir, src)
    assert "1 request (0 already answered, 0 errors): 1 token in" in r.stderr, r.stderr
