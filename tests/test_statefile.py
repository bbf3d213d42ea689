"""State files: exact round trip, bounded size, resume equivalence, and every way a file can be bad."""

import errno
import json
import re
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


# -- the header schema (docs/state-format.md): valid CRC, bad fields (issue 11, item 1) ----------

import zlib  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mutations import FUZZ, HUGE, attempt, dumps, mutated  # noqa: E402


def split(path):
    """(header dict, data bytes) of a state file."""
    raw = path.read_bytes()
    _, version, _, hlen = statefile._PREFIX.unpack_from(raw)
    return json.loads(raw[24:24 + hlen]), raw[24 + hlen:]


def rewrite(path, header_bytes: bytes, data: bytes, version=1):
    """A state file with this header and a valid CRC (and a valid data checksum unless the
    header says otherwise): only the fields are wrong."""
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(statefile._PREFIX.pack(statefile.MAGIC, version, zlib.crc32(header_bytes),
                                            len(header_bytes)) + header_bytes + data)


def with_field(h, dotted, value):
    h = json.loads(json.dumps(h))
    *parents, last = dotted.split("/" if "/" in dotted else ".")  # tensor names hold dots
    d = h
    for k in parents:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[int(last) if isinstance(d, list) else last] = value
    return h


@pytest.fixture(scope="module")
def saved_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("sf") / "s.rgs"
    s = Session(tiny[0], tiny[1], SAMPLED, mode="chat")
    list(s.generate(s.user_turn("It is a truth"), 6))
    s.transcript[-1]["content"] = "x"
    statefile.save(path, s, name="tiny-it")
    return path


@pytest.mark.parametrize("field, value, words", [
    ("pos", HUGE, "pos is not an integer"),
    ("pos", 10**30, "pos is not an integer"),
    ("pos", -1, "pos is not an integer"),
    ("pos", 5.0, "pos is not an integer"),
    ("pos", 9, "does not match the"),  # shapes allow any pos >= W: resumed at the wrong place
    ("pending.0", HUGE, "pending is not a list"),
    ("pending.0", 10**9, "pending is not a list"),
    ("recent.0", -3, "recent is not a list"),
    ("recent.0", True, "recent is not a list"),
    ("rng", {"bit_generator": "MT19937", "state": {}}, "rng is not a NumPy PCG64 state"),
    ("rng.state.state", -1, "rng is not"),
    ("rng.state.inc", 2, "rng is not"),
    ("rng.state", "x", "rng is not"),
    ("transcript.0", {"role": "user", "content": 5}, "transcript"),
    ("transcript.0", {"role": "wizard", "content": "x"}, "transcript"),
    ("transcript.0", "hello", "transcript"),
    ("transcript", {"role": "user"}, "transcript"),
    ("model.digest", 5, "model.digest"),
    ("model.digest", None, "model.digest"),
    ("model.name", ["a"], "model.name"),
    ("model.config.hidden_size", 10**12, "hidden_size"),
    ("model.config.lru_width", 10**12, "lru_width"),
    ("model.config.attention_window_size", 10**9, "attention_window_size"),
    ("model.config.num_hidden_layers", 4, "tensor table does not match"),
    ("sampler.temperature", "hot", "temperature"),
    ("sampler.top_p", HUGE, "top-p"),
    ("sampler", [1], "sampler is not an object"),
    ("mode", "poetry", "mode"),
    ("tensors/layers.0.h/offsets", [0, -128], "offsets"),
    ("tensors/layers.0.h/offsets", [0.0, 128], "offsets"),
    ("tensors/layers.0.h/shape", [32.0], "not F32 of shape"),
    ("tensors/layers.0.h/dtype", "F16", "not F32"),
    ("data_sha256", 7, "data_sha256"),
    ("version", True, "format/version"),
])
def test_valid_crc_bad_field_is_refused_in_one_line(saved_file, tmp_path, field, value, words):
    h, data = split(saved_file)
    p = tmp_path / "bad.rgs"
    rewrite(p, dumps(with_field(h, field, value)), data)
    with pytest.raises(RgemmaError) as e:
        statefile.load(p)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and str(p) in msg


@pytest.mark.parametrize("field, value, where", [
    ("transcript.0.content", "hi \ud800", "transcript[0].content"),
    ("model.name", "\udfff", "model.name"),
    ("created", "2026-\udc80", "created"),
])
def test_lone_surrogate_escapes_are_refused(saved_file, tmp_path, field, value, where):
    """A JSON "\\ud800" escape parses to a lone surrogate, which printing the transcript or
    encoding it fails on later (an internal error that ended the chat on /load): refused on
    load, naming the field."""
    h, data = split(saved_file)
    p = tmp_path / "s.rgs"
    rewrite(p, json.dumps(with_field(h, field, value)).encode("ascii"), data)  # the \\u escape
    with pytest.raises(RgemmaError, match=f"{re.escape(where)} holds a lone surrogate"):
        statefile.load(p)


@pytest.mark.parametrize("field, value", [("model.config.rope_theta", 1234.0),
                                          ("model.config.rms_norm_eps", 0.5),
                                          ("model.config.logits_soft_cap", 3.0)])
def test_a_config_edited_with_the_digest_kept_is_refused(saved_file, tiny, tmp_path, field, value):
    """The file's config shapes and means its tensors; the digest names the model. Edited
    apart (valid CRC, tensor shapes unchanged) the resume ran silently wrong, or failed inside
    the model when the window changed: refused before resuming."""
    h, data = split(saved_file)
    p = tmp_path / "c.rgs"
    rewrite(p, dumps(with_field(h, field, value)), data)
    saved = statefile.load(p)
    with pytest.raises(RgemmaError, match="model config does not match"):
        statefile.check_model(saved, tiny[0], tiny[1], p)


def test_overlapping_tensor_offsets_are_refused(saved_file, tmp_path):
    """Two tensors on the same bytes would resume with the wrong recurrent state."""
    h, data = split(saved_file)
    h["tensors"]["layers.1.h"]["offsets"] = h["tensors"]["layers.0.h"]["offsets"]
    rewrite(tmp_path / "o.rgs", dumps(h), data)
    with pytest.raises(RgemmaError, match="overlaps another or leaves a gap"):
        statefile.load(tmp_path / "o.rgs")


def test_deeply_nested_header_is_refused(tmp_path):
    rewrite(tmp_path / "d.rgs", b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(RgemmaError, match="nested too deeply"):
        statefile.load(tmp_path / "d.rgs")


def test_non_finite_state_values_are_refused(saved_file, tmp_path):
    h, data = split(saved_file)
    data = bytearray(data)
    b = h["tensors"]["layers.0.h"]["offsets"][0]
    data[b:b + 4] = np.float32(np.nan).tobytes()
    h["data_sha256"] = __import__("hashlib").sha256(bytes(data)).hexdigest()
    rewrite(tmp_path / "n.rgs", dumps(h), bytes(data))
    with pytest.raises(RgemmaError, match="layers.0.h holds NaN or Inf"):
        statefile.load(tmp_path / "n.rgs")


@FUZZ
@given(data=st.data())
def test_property_mutated_headers_are_refused_or_resume_exactly(saved_file, tiny, tmp_path_factory, data):
    h, blob = split(saved_file)
    p = tmp_path_factory.mktemp("m") / "m.rgs"
    rewrite(p, dumps(data.draw(mutated(h))), blob)
    def load():
        s = statefile.load(p)
        statefile.check_model(s, tiny[0], tiny[1], p)
        return s

    def check(s):
        # accepted (a field that does not matter: created, name, an extra key, transcript
        # text...): the resumed session continues exactly like the original file's
        ref = statefile.load(saved_file)
        assert s.ctx.state == ref.ctx.state
        a, b = statefile.restore(s, *tiny), statefile.restore(ref, *tiny)
        if a.settings == b.settings and a.ctx.pending == b.ctx.pending and a.ctx.recent == b.ctx.recent:
            ga, gb = a.generate((), 4), b.generate((), 4)
            list(ga), list(gb)
            assert ga.tokens == gb.tokens or a.ctx.rng != b.ctx.rng
    attempt("state file header", load, check)


# -- identity (issue 11, item 5) --------------------------------------------------------------

def test_fine_tune_with_the_same_norms_is_refused(tiny, tmp_path):
    """Same config, headers, norms and biases; only the matrices differ (a fine-tune)."""
    from rgemma_cli import load
    from rgemma_cli.checkpoint import open_tensors
    from rgemma_cli.safetensors import write_safetensors
    model, tok = tiny
    import conftest
    d = conftest.write_tiny_model(tmp_path / "ft")
    tensors = {n: np.array(f.tensor(n)) for n, f in open_tensors(d).items()}
    for n in tensors:
        if tensors[n].ndim == 2:
            tensors[n] = tensors[n] + np.float32(1e-3)
    write_safetensors(d / "model.safetensors", tensors)
    tuned, tuned_tok = load(str(d))
    base, _ = load(str(conftest.write_tiny_model(tmp_path / "base")))
    statefile.save(tmp_path / "s.rgs", session((base, tok)), name="base")
    with pytest.raises(RgemmaError, match="different model"):
        statefile.check_model(statefile.load(tmp_path / "s.rgs"), tuned, tuned_tok, tmp_path / "s.rgs")
    statefile.check_model(statefile.load(tmp_path / "s.rgs"), base, tuned_tok, tmp_path / "s.rgs")


def test_old_identity_is_refused_with_a_clear_rule(saved_file, tiny, tmp_path):
    h, data = split(saved_file)
    del h["model"]["identity"]  # a file from before the v2 fingerprint
    rewrite(tmp_path / "old.rgs", dumps(h), data)
    old = statefile.load(tmp_path / "old.rgs")  # still readable: `rgemma state` shows it
    with pytest.raises(RgemmaError, match=r"older rgemma whose model identity \(v1\)"):
        statefile.check_model(old, *tiny, tmp_path / "old.rgs")
