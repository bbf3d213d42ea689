"""The safetensors reader/writer and bf16 conversions."""

import json
import struct

import numpy as np
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
    with pytest.raises(RgemmaError, match="unsupported or corrupt"):
        SafetensorsFile(p)
    p.write_bytes(struct.pack("<Q", 10 ** 12))
    with pytest.raises(RgemmaError, match="corrupt or truncated"):
        SafetensorsFile(p)
