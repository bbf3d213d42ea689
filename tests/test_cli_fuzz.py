"""No traceback on any input (issue 10 item 4), as a property: the console script, run in-process
on random command lines (commands, flags, values, random bytes as the OS would pass them) and
random stdin (text, bytes, slash commands), exits 0, 1, 2, 130 or 141, never prints a
traceback, and reports a failure as exactly one `error:` line — never as the last-resort
"internal error" line, which would mean an exception rgemma did not expect.

Paths are drawn from a private directory only (never /dev/null: a regression that replaced
device nodes must not replace the system's), and the Hub is offline."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_cli import run_main

COMMANDS = ["generate", "chat", "state", "info", "quantize", "download", "perplexity", "nosuch",
            "--version", "-h", "--help", ""]  # (not `bench`: it measures for seconds by design)
FLAGS = ["-m", "--model", "-n", "--max-tokens", "-t", "--temperature", "--top-k", "--top-p",
         "--min-p", "--repeat-penalty", "--repeat-last-n", "-s", "--seed", "--system",
         "--save-state", "--resume", "--stop", "--chat", "--raw", "--json", "-q", "--quiet",
         "--bits", "--embedding-bits", "-c", "--chunk-size", "-h", "--version", "-", "--",
         "--no-such-flag"]
NUMBERS = ["0", "1", "2", "3", "-1", "-0.0", "0.5", "1.5", "1e-45", "1e-38", "1e400", "-1e400",
           "inf", "-inf", "nan", "4096", "4097", str(2**64), str(-2**63), "0x10", "1_0", "", " ",
           "abc", "½", "٣"]
# bounded lengths: a fuzzed -n is at most 3 so every run stays short
LENGTHS = ["0", "1", "3", "-1", "abc", "", "1.5", "1e3x", "½"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_base_dir):
    """Paths the command lines may name: models, a state file, junk, a missing directory..."""
    d = tmp_path_factory.mktemp("fuzz")
    code, out, err = run_main("generate", "-m", tiny_model_dir, "-n", "2", "-q", "--save-state",
                              d / "s.rgs", "Hi")
    assert code == 0, err
    (d / "junk.rgs").write_bytes(os.urandom(300))
    (d / "empty.rgs").write_bytes(b"")
    (d / "text.txt").write_text("not a state file")
    (d / "dir").mkdir()
    paths = [str(tiny_model_dir), str(tiny_base_dir), str(d / "s.rgs"), str(d / "junk.rgs"),
             str(d / "empty.rgs"), str(d / "text.txt"), str(d / "dir"), str(d / "none" / "x.rgs"),
             str(d / "new.rgs"), str(d / ("a" * 300)), "s.rgs", "out", "google/recurrentgemma-2b",
             "no/such-model", "demo/", "~nobody/x", "-"]
    return d, paths


def texts():
    # argv: any bytes but NUL (exec cannot pass it), decoded as Python decodes argv (PEP 383)
    raw = st.binary(max_size=24).map(lambda b: os.fsdecode(b.replace(b"\0", b"")))
    return st.one_of(st.text(max_size=24).map(lambda s: s.replace("\0", "")), raw,
                     st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<eos>", "\n", "\x1b[2J",
                                      "-n", "--", "'", '"""']))


def argv(paths):
    value = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(paths), texts())
    flag_and_value = st.one_of(
        st.tuples(st.sampled_from(["-n", "--max-tokens"]), st.sampled_from(LENGTHS)),
        st.tuples(st.sampled_from(["-m", "--model", "--resume", "--save-state"]),
                  st.sampled_from(paths)),
        st.tuples(st.sampled_from(FLAGS), value),
        st.tuples(st.sampled_from(FLAGS)),
        st.tuples(value))
    return st.tuples(st.sampled_from(COMMANDS), st.lists(flag_and_value, max_size=6)).map(
        lambda t: ([t[0]] if t[0] else []) + [x for group in t[1] for x in group])


def stdin(paths):
    line = st.one_of(
        texts(), st.binary(max_size=40),
        st.sampled_from(["/save", "/load", "/undo", "/regen", "/reset", "/stats", "/help", "/set",
                         "/set temperature 1e-45", "/set repeat-penalty 1e-38", "/set seed -1",
                         "/set top-p nan", "/set max-tokens 99999999999999999999", "/exit", '"""',
                         "/nosuch"]),
        st.sampled_from(paths).map(lambda p: f"/{'load' if len(p) % 2 else 'save'} {p}"))
    return st.lists(line, max_size=4).map(
        lambda lines: b"\n".join(x if isinstance(x, bytes) else os.fsencode(x) for x in lines))


def check(status, out, err, args):
    assert status in (0, 1, 2, 130, 141), (status, args, err)
    assert "Traceback" not in out + err, (args, err)
    assert "internal error" not in out + err, (args, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if status in (1, 2):
        assert len(errors) == 1, (args, err)
        assert "\n" not in errors[0]
    elif status == 0:
        assert not errors, (args, err)


def test_random_command_lines_and_stdin(world, monkeypatch):
    d, paths = world
    monkeypatch.chdir(d)  # relative paths (quantize's OUT, "s.rgs") land in the private directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a repo id must not wait on the network
    monkeypatch.delenv("RGEMMA_MODEL", raising=False)
    monkeypatch.delenv("RGEMMA_DEBUG", raising=False)
    args_st, stdin_st = argv(paths), stdin(paths)

    @settings(max_examples=int(os.environ.get("RGEMMA_FUZZ_EXAMPLES", "40")), deadline=None,
              database=None, suppress_health_check=list(HealthCheck))
    @given(args=args_st, data=stdin_st)
    def run(args, data):
        if args[:1] in (["generate"], ["chat"]):
            args = args + ["-m", paths[0]] if "-m" not in args and "--model" not in args else args
        check(*run_main(*args, input=data), args)

    run()


@pytest.mark.parametrize("args,data", [
    (["generate", "-m", "{tiny}", "-n", "2", os.fsdecode(b"caf\xe9 \xff")], b""),
    (["generate", "-m", "{tiny}", "-n", "2", "--system", os.fsdecode(b"\xfe\xff"), "hi"], b""),
    (["generate", "-m", "{tiny}", "-n", "2"], b"\xff\xfe\xfd"),
    (["chat", "-m", "{tiny}", "-n", "2"], b"caf\xe9\n\xff\n/save\n/load\n/set temperature x\nok\n"),
    (["generate", "-m", "{tiny}", "-n", "0", "--save-state", "{d}/zero.rgs", "hi"], b""),
    (["chat", "-m", "{tiny}", "-n", "2"], b"/save {d}/first.rgs\n"),
    (["quantize", "{tiny}", "{d}/text.txt", "-q"], b""),
    (["state", "{d}/junk.rgs"], b""),
    (["generate", "-m", "{tiny}", "-n", "2", "--save-state", "{d}/" + "a" * 300, "hi"], b""),
])
def test_known_cases(world, args, data):
    d, paths = world
    args = [a.format(tiny=paths[0], d=d) for a in args]
    data = data.replace(b"{d}", os.fsencode(str(d)))
    check(*run_main(*args, input=data), args)
