"""`rgemma perplexity` and `perplexity.perplexity`: the chunked, state-carrying NLL equals a direct
full-sequence computation, does not depend on the chunk size, and bad input is one error line."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rgemma_cli import cli
from rgemma_cli.errors import RgemmaError
from rgemma_cli.perplexity import perplexity

runner = CliRunner()
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. ") * 3


def direct_nll(model, ids):
    """Mean -log p(ids[t+1] | ids[:t+1]) from ONE forward pass over the whole sequence (the
    model chunks internally only past 1024 tokens), log-softmax written out in float64."""
    logits = model.forward(ids[:-1])[0].astype(np.float64)
    logz = np.logaddexp.reduce(logits, axis=1)
    return float(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]]))


def test_matches_a_direct_full_sequence_nll(tiny):
    model, tok = tiny
    ids = tok.raw_prompt(TEXT)
    assert len(ids) > 40  # several chunks, and past the tiny model's attention window (8)
    want = direct_nll(model, np.array(ids))
    r = perplexity(model, ids, chunk_size=7)
    assert r.tokens == len(ids) - 1 and r.chunks == -(-(len(ids) - 1) // 7)
    assert r.nll == pytest.approx(want, rel=1e-5)
    assert r.perplexity == pytest.approx(np.exp(want), rel=1e-5)
    assert r.tokens_per_second > 0


@pytest.mark.parametrize("chunk", [1, 2, 5, 8, 9, 4096])
def test_chunk_size_does_not_change_the_result(tiny, chunk):
    # 1..4 rows run the decode matvec, more rows the prefill path: only float rounding differs
    model, tok = tiny
    ids = tok.raw_prompt(TEXT)
    assert perplexity(model, ids, chunk_size=chunk).nll == pytest.approx(
        perplexity(model, ids, chunk_size=16).nll, rel=1e-5)


def test_max_tokens_scores_a_prefix(tiny):
    model, tok = tiny
    ids = tok.raw_prompt(TEXT)
    r = perplexity(model, ids, chunk_size=4, max_tokens=10)
    assert r.tokens == 10
    assert r.nll == pytest.approx(direct_nll(model, np.array(ids[:11])), rel=1e-5)


def test_bad_arguments(tiny):
    model, tok = tiny
    for kw, ids in [({"chunk_size": 0}, [2, 5, 6]), ({"max_tokens": 0}, [2, 5, 6]), ({}, [2]),
                    ({}, [])]:
        with pytest.raises(RgemmaError):
            perplexity(model, ids, **kw)


def test_cli_prints_perplexity_and_rate(tiny_base_dir, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = runner.invoke(cli.app, ["perplexity", "-m", str(tiny_base_dir), str(f), "-c", "16"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("perplexity ") and "tok/s" in r.stderr
    j = json.loads(runner.invoke(cli.app, ["perplexity", "-m", str(tiny_base_dir), str(f),
                                           "--json", "-n", "20", "-c", "3"]).stdout)
    assert j["tokens"] == 20 and j["chunks"] == 7 and j["perplexity"] == pytest.approx(np.exp(j["nll"]))
    # the CLI and the library agree
    from rgemma_cli import load
    model, tok = load(str(tiny_base_dir))
    lib = perplexity(model, tok.raw_prompt(TEXT), max_tokens=20)
    assert j["nll"] == pytest.approx(lib.nll, rel=1e-5)


def test_progress_on_a_terminal_and_singular_counts(tiny_base_dir, tmp_path, monkeypatch):
    """With stderr a terminal the progress line runs (it died on a missing `np` import: an
    internal error on every interactive run); one token / one chunk are singular."""
    import typer.testing
    monkeypatch.setattr(typer.testing._NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = runner.invoke(cli.app, ["perplexity", "-m", str(tiny_base_dir), str(f), "-n", "1"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "perplexity so far" in r.stderr and "over 1 token)" in r.stdout
    assert "1 token in" in r.stderr and "1 chunk of" in r.stderr


@pytest.mark.parametrize("content, args, what", [
    (None, [], "no such file"),
    (b"", [], "empty"),
    (b"  \n\t\n", [], "empty"),
    (b"\xff\xfe bad bytes", [], "not UTF-8"),
    (b"text\x00with nul", [], "NUL"),
    (TEXT.encode(), ["-c", "0"], "--chunk-size"),
    (TEXT.encode(), ["-n", "0"], "--max-tokens"),
])
def test_bad_input_is_one_error_line(tiny_base_dir, tmp_path, content, args, what):
    f = tmp_path / "in.txt"
    if content is not None:
        f.write_bytes(content)
    r = runner.invoke(cli.app, ["perplexity", "-m", str(tiny_base_dir), str(f), *args])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_directory_is_an_error(tiny_base_dir, tmp_path):
    r = runner.invoke(cli.app, ["perplexity", "-m", str(tiny_base_dir), str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "directory" in r.stderr


def test_malformed_option_is_one_line(tiny_base_dir, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text(TEXT)
    assert cli.main(["perplexity", "-m", str(tiny_base_dir), str(f), "-c", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "chunk-size" in err[0]
