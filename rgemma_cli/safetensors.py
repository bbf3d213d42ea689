"""Read and write the safetensors format with NumPy alone, memory-mapped.

File layout: an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then raw
little-endian data with offsets relative to the end of the header.

BF16 has no NumPy dtype: BF16 tensors are returned as `uint16` arrays holding the bfloat16
bits (the top half of a float32). `bf16_to_f32` / `f32_to_bf16` convert.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RgemmaError
from .files import open_regular, write_atomic  # (write_atomic: writers import it from here)
from .schema import is_int, parse_json

DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "U16": np.dtype("<u2"),
}
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS, MAX_DIM = 8, 2**31 - 1  # far beyond any checkpoint (the 2B's largest dimension: 256000)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), round-to-nearest-even as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def _check_metadata(path, meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise RgemmaError(f"{path}: corrupt safetensors header (__metadata__ must map strings "
                          f"to strings)")
    return meta


class SafetensorsFile:
    """One memory-mapped safetensors file; `tensor(name)` returns a read-only array view.

    The header is validated by the rules of the `safetensors` library (`Metadata::validate` in
    its Rust crate; docs/file-formats.md) before any tensor is touched: a JSON object of
    `{"dtype": str, "shape": [int >= 0], "data_offsets": [int, int]}` entries (no floats,
    strings or booleans as numbers), which sorted by offset tile the data section exactly, from
    0 to its end, with end - begin = prod(shape) x itemsize; `__metadata__` maps str to str.
    Anything else raises RgemmaError naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open_regular(self.path, "safetensors file",
                              missing=f"missing checkpoint file {self.path}") as (f, size):
                head = f.read(8)
                if len(head) < 8:
                    raise RgemmaError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise RgemmaError(f"{self.path}: corrupt or truncated safetensors header")
                header = parse_json(f.read(n), f"{self.path}: corrupt safetensors header")
                if not isinstance(header, dict):
                    raise RgemmaError(f"{self.path}: corrupt safetensors header (not a JSON object)")
                self.metadata = _check_metadata(self.path, header.pop("__metadata__", None))
                self.data_start = 8 + n
                self.header = header
                self._check(size)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
                if self._map is not None and hasattr(mmap, "MADV_HUGEPAGE"):
                    # decode streams every weight once per token: huge pages spare TLB misses
                    self._map.madvise(mmap.MADV_HUGEPAGE)
        except FileNotFoundError:
            raise RgemmaError(f"missing checkpoint file {self.path}") from None
        except IsADirectoryError:
            raise RgemmaError(f"{self.path} is a directory, not a safetensors file") from None
        except PermissionError:
            raise RgemmaError(f"cannot read {self.path}: permission denied") from None

    def _check(self, size: int) -> None:
        """The safetensors library's header rules; see the class docstring."""
        spans = []
        for name, info in self.header.items():
            def bad(why):
                return RgemmaError(f"{self.path}: tensor {name!r} has a corrupt header entry ({why})")
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                raise bad("needs dtype, shape and data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise RgemmaError(f"{self.path}: tensor {name!r} has an unsupported dtype "
                                  f"{str(dtype)[:20]!r} (rgemma reads {', '.join(DTYPES)})")
            if not isinstance(shape, list) or not all(is_int(d) for d in shape):
                raise bad("shape must be a list of non-negative integers")
            # an empty tensor (a 0 in its shape) matches an empty byte range whatever its other
            # dimensions, and [0, 2^62, 2^62] then failed inside NumPy: bound them as well
            if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape):
                raise bad(f"shape must have at most {MAX_DIMS} dimensions of at most 2^31 - 1")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(is_int(o) for o in offsets) or offsets[1] < offsets[0]):
                raise bad("data_offsets must be two non-negative integers [begin, end], begin <= end")
            count = 1
            for d in shape:
                count *= d  # Python ints: a product that overflows 64 bits cannot match below
            if offsets[1] - offsets[0] != count * DTYPES[dtype].itemsize:
                raise RgemmaError(f"{self.path}: tensor {name!r} byte range does not match its "
                                  f"shape and dtype")
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):  # the tensors must tile the data: no overlap, no gap
            if begin != end:
                raise RgemmaError(f"{self.path}: tensor {name!r} "
                                  f"{'overlaps another' if begin < end else 'leaves a gap before it'} "
                                  f"(data_offsets must tile the data section)")
            end = stop
        if self.data_start + end > size:
            raise RgemmaError(f"{self.path}: truncated (the tensors end past the end of the file)")
        if self.data_start + end < size:
            raise RgemmaError(f"{self.path}: corrupt ({size - self.data_start - end} bytes after "
                              f"the last tensor)")

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of a tensor ("F32", "BF16", ...)."""
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def raw_bytes(self, name: str) -> memoryview:
        """The tensor's stored bytes (a read-only view of the mapped file; nothing is copied)."""
        begin, end = self.header[name]["data_offsets"]
        if self._map is None or begin == end:
            return memoryview(b"")
        return memoryview(self._map)[self.data_start + begin:self.data_start + end]

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of the tensor's bytes in the mapped file."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return np.zeros(info["shape"], dtype)
        a = np.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + begin)
        return a.reshape(info["shape"])


@dataclass
class Streamed:
    """A tensor to write chunk by chunk, never whole in memory: its safetensors dtype ("BF16",
    "F32", ...), its shape, and `chunks`, an iterable of arrays whose bytes, in order, are its
    data (row-major)."""

    dtype: str
    shape: tuple
    chunks: Iterable

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def _stream(t: Streamed, name: str):
    done = 0
    for c in t.chunks:
        c = np.ascontiguousarray(c)
        done += c.nbytes
        yield c
    if done != t.nbytes:
        raise ValueError(f"tensor {name!r}: {done} bytes streamed, {t.nbytes} declared")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None,
                      dtypes: dict | None = None) -> None:
    """Write tensors (NumPy arrays, or `Streamed`) to a safetensors file, atomically.

    `dtypes` maps a name to a safetensors dtype string where the NumPy dtype is ambiguous; a
    uint16 array is written as BF16 unless said otherwise.
    """
    inverse = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<u2"): "BF16",
               np.dtype("<f8"): "F64", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
               np.dtype("<i4"): "I32", np.dtype("<i8"): "I64"}
    dtypes = dtypes or {}
    header, offset, parts = {}, 0, []
    for name in sorted(tensors):
        a = tensors[name]
        if isinstance(a, Streamed):
            dtype, shape, nbytes = a.dtype, a.shape, a.nbytes
            parts.append(_stream(a, name))
        else:
            a = np.ascontiguousarray(a)
            a = a.astype(a.dtype.newbyteorder("<"), copy=False)
            dtype, shape, nbytes = dtypes.get(name) or inverse[a.dtype], a.shape, a.nbytes
            parts.append((a,))
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    write_atomic(Path(path), itertools.chain([struct.pack("<Q", len(blob)), blob], *parts))
