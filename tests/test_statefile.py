"""State files: exact round trip, bounded size, resume equivalence, and every way a file can be bad."""

import errno
import json
import os
import struct

import pytest

from rgemma_cli import statefile
from rgemma_cli.errors import RgemmaError
from rgemma_cli.generation import Session
from rgemma_cli.sampling import SamplerSettings

SAMPLED = SamplerSettings(temperature=0.9, top_k=20, top_p=0.95, min_p=0.02,
                          repeat_penalty=1.1, repeat_last_n=16, seed=7)


def session(tiny, n=10, settings=SAMPLED, mode="raw"):
    model, tok = tiny
    s = Session(model, tok, settings, mode=mode)
    list(s.generate(s.prompt_ids("It is a truth"), n))
    return s


def test_round_trip_is_exact(tiny, tmp_path):
    s = session(tiny, n=20)  # pos > W = 8: the ring buffers have wrapped
    s.transcript = [{"role": "user", "content": "héllo"}, {"role": "model", "content": "hi 🙂"}]
    path = tmp_path / "s.rgs"
    size = statefile.save(path, s, name="tiny")
    assert size == path.stat().st_size
    saved = statefile.load(path)
    assert saved.ctx.state == s.ctx.state
    assert (saved.ctx.recent, saved.ctx.pending, saved.ctx.rng) == (s.ctx.recent, s.ctx.pending, s.ctx.rng)
    assert saved.settings == s.settings and saved.mode == "raw"
    assert saved.transcript == s.transcript and saved.model["name"] == "tiny"
    statefile.check_model(saved, *tiny, path)


def test_only_written_ring_slots_are_stored(tiny, tmp_path):
    sizes = {}
    for n in (1, 3, 20, 30):
        s = session(tiny, n=n)
        sizes[n] = statefile.save(tmp_path / f"{n}.rgs", s)
        assert statefile.load(tmp_path / f"{n}.rgs").ctx.state == s.ctx.state
    assert sizes[1] < sizes[3] < sizes[20]
    assert abs(sizes[20] - sizes[30]) < 200  # bounded once pos >= W (only the JSON grows a bit)


@pytest.mark.parametrize("settings", [SamplerSettings(temperature=0), SAMPLED], ids=["greedy", "sampled"])
def test_resume_from_file_equals_uninterrupted(tiny, tmp_path, settings):
    model, tok = tiny
    whole = Session(model, tok, settings)
    want = whole.generate(tok.raw_prompt("Hello there"), 32)
    want = (list(want), want.tokens)[1]
    s = Session(model, tok, settings)
    first = s.generate(tok.raw_prompt("Hello there"), 16)
    list(first)
    statefile.save(tmp_path / "s.rgs", s)
    resumed = statefile.restore(statefile.load(tmp_path / "s.rgs"), model, tok)
    second = resumed.generate((), 16)
    list(second)
    assert first.tokens + second.tokens == want


def test_foreign_model_is_refused(tiny, tiny_base_dir, tmp_path):
    from rgemma_cli import load
    statefile.save(tmp_path / "s.rgs", session(tiny), name="tiny-it")
    other, tok = load(str(tiny_base_dir))
    with pytest.raises(RgemmaError, match="different model .*-m tiny-it"):
        statefile.check_model(statefile.load(tmp_path / "s.rgs"), other, tok, tmp_path / "s.rgs")


def good_file(tiny, tmp_path):
    path = tmp_path / "s.rgs"
    statefile.save(path, session(tiny))
    return path, path.read_bytes()


def load_error(path):
    with pytest.raises(RgemmaError) as e:
        statefile.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_and_foreign_files(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.rgs")
    assert "directory" in load_error(tmp_path)
    (tmp_path / "x.txt").write_text("hello, I am not a state file at all")
    assert "not an rgemma state file" in load_error(tmp_path / "x.txt")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.01, 0.3, 0.9, 0.999])
def test_truncated(tiny, tmp_path, keep):
    path, raw = good_file(tiny, tmp_path)
    path.write_bytes(raw[:int(len(raw) * keep) or 3])
    assert "truncated" in load_error(path) or "not an rgemma state file" in load_error(path)


@pytest.mark.parametrize("where", [-5, -1000, 40, 200])
def test_corrupt_byte(tiny, tmp_path, where):
    path, raw = good_file(tiny, tmp_path)
    b = bytearray(raw)
    b[where] ^= 0x5A
    path.write_bytes(bytes(b))
    assert "corrupt" in load_error(path)


def test_trailing_garbage(tiny, tmp_path):
    path, raw = good_file(tiny, tmp_path)
    path.write_bytes(raw + b"x")
    assert "corrupt" in load_error(path)


def test_newer_version(tiny, tmp_path):
    path, raw = good_file(tiny, tmp_path)
    path.write_bytes(raw[:8] + struct.pack("<I", statefile.FORMAT_VERSION + 1) + raw[12:])
    assert "newer rgemma" in load_error(path)


def test_header_is_json_not_pickle(tiny, tmp_path):
    path, raw = good_file(tiny, tmp_path)
    (hlen,) = struct.unpack_from("<Q", raw, 16)
    header = json.loads(raw[24:24 + hlen])
    assert header["format"] == "rgemma-state" and header["model"]["digest"]
    assert b"pickle" not in raw and raw[:8] == b"RGEMMAST"


# -- saving never loses the previous file ---------------------------------------------------------

def assert_previous_survives(path, raw):
    assert path.read_bytes() == raw
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("fail", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_failed_save_keeps_previous_file(tiny, tmp_path, monkeypatch, fail):
    path, raw = good_file(tiny, tmp_path)
    s = session(tiny, n=25)

    def boom(fd):
        raise fail
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RgemmaError, match="unchanged"):
        statefile.save(path, s)
    monkeypatch.undo()
    assert_previous_survives(path, raw)


def test_read_only_directory(tiny, tmp_path, monkeypatch):
    path, raw = good_file(tiny, tmp_path)
    if os.geteuid() == 0:  # root ignores permission bits: fail like a read-only filesystem
        real_open = os.open

        def ro_open(p, flags, *a):
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(p, flags, *a)
        monkeypatch.setattr(os, "open", ro_open)
    else:
        tmp_path.chmod(0o555)
    try:
        with pytest.raises(RgemmaError, match="cannot save state"):
            statefile.save(path, session(tiny, n=3))
    finally:
        monkeypatch.undo()
        tmp_path.chmod(0o755)
    assert_previous_survives(path, raw)


def test_refuses_to_overwrite_other_files(tiny, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    with pytest.raises(RgemmaError, match="refusing to overwrite"):
        statefile.save(notes, session(tiny))
    assert notes.read_text() == "my notes"
