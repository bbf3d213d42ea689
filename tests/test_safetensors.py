"""The safetensors reader/writer and bf16 conversions."""

import json
import struct

import numpy as np
from hypothesis import strategies as st
import pytest

from rgemma_cli.errors import RgemmaError
from rgemma_cli.safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    t = {"f32": rng.standard_normal((3, 4)).astype(np.float32), "f16": np.arange(6, dtype=np.float16),
         "i8": np.array([-128, 0, 127], np.int8), "empty": np.zeros((0, 3), np.float32),
         "bf16": f32_to_bf16(rng.standard_normal(5).astype(np.float32))}
    write_safetensors(tmp_path / "a.safetensors", t, metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.keys()) == sorted(t) and f.metadata == {"format": "pt"} and f.dtype("bf16") == "BF16"
    for name, a in t.items():
        assert f.tensor(name).shape == a.shape and np.array_equal(f.tensor(name), a)
    assert not f.tensor("f32").flags.writeable  # a view of the mapped file


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3e38, np.inf], np.float32)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (1.0); 1 + 3*2^-8 rounds up
    assert bf16_to_f32(f32_to_bf16(x)).tolist()[:4] == [1.0, 1.0, 1.015625, -2.5]
    assert np.isinf(bf16_to_f32(f32_to_bf16(x))[-1])
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_header_problems_are_one_line_errors(tmp_path):
    p = tmp_path / "bad.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(RgemmaError, match="byte range does not match"):
        SafetensorsFile(p)
    header = json.dumps({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(RgemmaError, match="unsupported dtype"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 10 ** 12))
    with pytest.raises(RgemmaError, match="corrupt or truncated"):
        SafetensorsFile(p)


# -- the header schema (docs/file-formats.md): the safetensors library's rules -----------------

def _write_raw(p, header: bytes, data: bytes):
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _refused(p, match):
    with pytest.raises(RgemmaError, match=match) as e:
        SafetensorsFile(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "data_offsets"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "data_offsets"),
    ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
    ({"shape": [2], "data_offsets": [0, 8]}, "needs dtype"),
    ({"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 8]}, "at most"),
    # empty (a 0 dimension) with an empty byte range, but dimensions NumPy cannot allocate
    ({"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}, "at most"),
    ({"dtype": "F32", "shape": [1] * 9 + [2], "data_offsets": [0, 8]}, "at most 8 dimensions"),
    ([1, 2], "needs dtype"),
])
def test_header_entries_of_the_wrong_type_are_refused(tmp_path, entry, match):
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    _write_raw(tmp_path / "x.safetensors", json.dumps({"a": entry, "b": ok}).encode(), bytes(16))
    _refused(tmp_path / "x.safetensors", match)


@pytest.mark.parametrize("offsets, match", [
    ([[0, 8], [0, 8]], "overlaps"),  # two tensors on the same bytes
    ([[0, 8], [4, 12]], "byte range|overlaps"),
    ([[0, 8], [12, 20]], "gap"),
    ([[4, 12], [12, 20]], "gap"),  # the data must start at 0
])
def test_overlapping_or_gapped_tensors_are_refused(tmp_path, offsets, match):
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in zip("ab", offsets)}
    _write_raw(tmp_path / "x.safetensors", json.dumps(header).encode(), bytes(20))
    _refused(tmp_path / "x.safetensors", match)


def test_trailing_bytes_metadata_and_deep_json_are_refused(tmp_path):
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    p = tmp_path / "x.safetensors"
    _write_raw(p, json.dumps(ok).encode(), bytes(12))
    _refused(p, "after the last tensor")
    _write_raw(p, json.dumps(dict(ok, __metadata__={"format": 1})).encode(), bytes(8))
    _refused(p, "__metadata__")
    _write_raw(p, b"[" * 100_000 + b"]" * 100_000, b"")
    _refused(p, "nested too deeply")
    _write_raw(p, json.dumps(ok).replace("8]", "8e0]").encode(), bytes(8))
    _refused(p, "data_offsets")
    _write_raw(p, json.dumps(ok).replace("[0, 8]", "[0, 1e400]").encode(), bytes(8))
    _refused(p, "data_offsets")


from hypothesis import given  # noqa: E402

from mutations import FUZZ, attempt, dumps, mutated  # noqa: E402

_VALID = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int8),
          "c": np.zeros((0, 2), np.float32), "d": np.arange(3, dtype=np.float16)}


def _valid_header(tmp_path):
    write_safetensors(tmp_path / "v.safetensors", _VALID, metadata={"format": "pt"})
    raw = (tmp_path / "v.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@FUZZ
@given(data=st.data())
def test_property_mutated_headers_are_refused_or_read_correctly(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("st")
    header, blob = _valid_header(d)
    p = d / "m.safetensors"
    _write_raw(p, dumps(data.draw(mutated(header))), blob)
    def check(f):  # accepted: every tensor is a well-formed view inside the data section
        for name in f.keys():
            a = f.tensor(name)
            assert list(a.shape) == f.header[name]["shape"]
            if name in _VALID and f.header[name] == header[name]:  # untouched: the same values
                assert np.array_equal(a.view(_VALID[name].dtype), _VALID[name])
    attempt("safetensors header", lambda: SafetensorsFile(p), check)
