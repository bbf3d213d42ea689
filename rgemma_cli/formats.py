"""Runtime weight formats: how a linear layer's matrix (out, in) is held in memory, and which
kernel reads it. Every matrix stays in its stored format; nothing is widened to a full f32 copy.

    format  held as                                            w[r, i] =
    f32     float32 (out, in)                                  w[r, i]
    bf16    uint16 bfloat16 bits (out, in)                     bits << 16 as float32
    f16     float16 (out, in)                                  float(w[r, i])
    int8    int8 q (out, in), float32 scale (out,)             q[r, i] * scale[r]
    4-bit   uint8 packed (out, in/2), scale (out, in/G) as     (nibble - 8) * scale[r, g]
            bf16 bits (uint16) or float32
                in each group of G = Q4_GROUP weights, byte j holds weight j in its low
                nibble and weight j + G/2 in its high nibble

Each format answers the same three questions, so `linear` never asks which format it holds:
`matvec(x, b, y)` (decode: y = W x + b streaming W once; `matmat` for B rows of a batched step,
each row as `matvec` computes it), `widen(lo, hi, out)` (prefill: rows
lo:hi as float32 for sgemm) and `describe()` (for people: `rgemma info`). How an int8 / 4-bit
checkpoint stores them on disk: `quantize`. The kernels: `kernels.matvec`, `kernels.widen`.
"""

from __future__ import annotations

import numpy as np

from .errors import RgemmaError
from .kernels import matvec as mv
from .kernels import widen as wd
from .kernels.matvec import Q4_GROUP  # the 4-bit kernels' group: 32 bytes, one 256-bit register

SCALE_SUFFIX = "_scale"  # `X.weight_scale` holds the scales of a quantized `X.weight`
_NO_BIAS = np.zeros(0, np.float32)

__all__ = ["Q4_GROUP", "SCALE_SUFFIX", "Weight", "F32Weight", "BF16Weight", "F16Weight",
           "Int8Weight", "Int4Weight", "as_weight", "describe", "from_stored"]


class Weight:
    """A matrix (out, in) in one stored format. `shape` (out, in), `nbytes` bytes held."""

    shape: tuple[int, int]
    nbytes: int
    f32: np.ndarray | None = None  # the matrix itself when it is held as float32 (sgemm reads it)

    def matvec(self, x: np.ndarray, b: np.ndarray | None, y: np.ndarray) -> None:
        """y (out,) float32 = W x + b for x (in,) float32 and b (out,) float32 or None."""
        raise NotImplementedError

    def matmat(self, x: np.ndarray, b: np.ndarray | None, y: np.ndarray) -> None:
        """y (B, out) float32 = x W^T + b for x (B, in) float32, one row per sequence of a
        batched decode step: W is streamed once for all rows, and y[i] equals `matvec(x[i], b,
        .)` bit for bit (the same per-row kernel code; batch invariance)."""
        raise NotImplementedError

    def widen(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows lo:hi as float32 (hi - lo, in), into `out` if given; serial (no thread pool)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The format for people: "bf16", "int8 (per-row scales)", ..."""
        raise NotImplementedError

    # (the old name; dequantizing is widening a quantized matrix)
    def dequantize(self, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None):
        return self.widen(lo, hi, out)


class _Dense(Weight):
    """An array held as loaded (memory-mapped or not)."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.shape, self.nbytes, self.dtype = a.shape, a.nbytes, a.dtype

    def __getitem__(self, rows):  # the rows of the stored array (tests, embedding lookups)
        return self.a[rows]


class F32Weight(_Dense):
    def __init__(self, a: np.ndarray):
        super().__init__(np.ascontiguousarray(a, np.float32))
        self.f32 = self.a

    def matvec(self, x, b, y):
        mv.matvec(self.a, x, _NO_BIAS if b is None else b, y)

    def matmat(self, x, b, y):
        mv.matmat(self.a, x, _NO_BIAS if b is None else b, y)

    def widen(self, lo=0, hi=None, out=None):
        if out is None:
            return self.a[lo:hi]
        out[...] = self.a[lo:hi]
        return out

    def describe(self):
        return "f32"


class BF16Weight(_Dense):
    def matvec(self, x, b, y):
        mv.matvec(self.a, x, _NO_BIAS if b is None else b, y)

    def matmat(self, x, b, y):
        mv.matmat(self.a, x, _NO_BIAS if b is None else b, y)

    def widen(self, lo=0, hi=None, out=None):
        block = self.a[lo:hi]
        out = np.empty(block.shape, np.float32) if out is None else out
        wd.widen_bf16(block, out)
        return out

    def describe(self):
        return "bf16"


class F16Weight(_Dense):
    def matvec(self, x, b, y):
        mv.matvec_f16(self.a.view(np.uint16), x, _NO_BIAS if b is None else b, y)

    def matmat(self, x, b, y):
        mv.matmat_f16(self.a.view(np.uint16), x, _NO_BIAS if b is None else b, y)

    def widen(self, lo=0, hi=None, out=None):
        block = self.a[lo:hi]
        out = np.empty(block.shape, np.float32) if out is None else out
        wd.widen_f16(block.view(np.uint16), out)
        return out

    def describe(self):
        return "f16"


class Int8Weight(Weight):
    """int8 weight (out, in) with one float32 scale per output row: w = q * scale[r]."""

    bits = 8

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[0],):
            raise RgemmaError(f"bad int8 weight: {q.dtype} {q.shape} with scales {scale.shape}")
        self.q, self.scale = q, np.asarray(scale, np.float32)
        self.shape = q.shape
        self.nbytes = q.nbytes + self.scale.nbytes

    def matvec(self, x, b, y):
        mv.matvec_i8(self.q, self.scale, x, _NO_BIAS if b is None else b, y)

    def matmat(self, x, b, y):
        mv.matmat_i8(self.q, self.scale, x, _NO_BIAS if b is None else b, y)

    def widen(self, lo=0, hi=None, out=None):
        q, s = self.q[lo:hi], self.scale[lo:hi]
        out = np.empty(q.shape, np.float32) if out is None else out
        wd.dequant_i8(q, s, out)
        return out

    def describe(self):
        return "int8 (per-row scales)"


class Int4Weight(Weight):
    """4-bit weight (out, in): packed nibbles (out, in/2) uint8, scales (out, in/Q4_GROUP) as
    bf16 bits (uint16) or float32: w = (nibble - 8) * scale[r, g]."""

    bits = 4

    def __init__(self, packed: np.ndarray, scale: np.ndarray):
        if (packed.dtype != np.uint8 or packed.ndim != 2 or scale.ndim != 2
                or scale.shape[0] != packed.shape[0]
                or packed.shape[1] * 2 != scale.shape[1] * Q4_GROUP):
            raise RgemmaError(f"bad 4-bit weight: packed {packed.shape} with scales "
                              f"{scale.shape} (group size must be {Q4_GROUP})")
        self.packed = packed
        self.scale = scale if scale.dtype == np.uint16 else np.asarray(scale, np.float32)
        self.group = Q4_GROUP
        self.shape = (packed.shape[0], packed.shape[1] * 2)
        self.nbytes = packed.nbytes + self.scale.nbytes

    def matvec(self, x, b, y):
        mv.matvec_q4(self.packed, self.scale, x, _NO_BIAS if b is None else b, y)

    def matmat(self, x, b, y):
        mv.matmat_q4(self.packed, self.scale, x, _NO_BIAS if b is None else b, y)

    def widen(self, lo=0, hi=None, out=None):
        p, s = self.packed[lo:hi], self.scale[lo:hi]
        out = np.empty((p.shape[0], self.shape[1]), np.float32) if out is None else out
        wd.dequant_q4(p, s, self.group, out)
        return out

    def describe(self):
        return f"4-bit (groups of {self.group}, {'bf16' if self.scale.dtype == np.uint16 else 'f32'} scales)"


# A plain array's format, by its dtype (bf16 arrives as uint16 bits: safetensors.py).
_DENSE = {np.dtype(np.float32): F32Weight, np.dtype(np.uint16): BF16Weight,
          np.dtype(np.float16): F16Weight}


def as_weight(w) -> Weight:
    """`w` as a Weight: itself, or a plain 2-D array (float32, bf16 bits, float16, or any float
    dtype, taken as float32) in the format its dtype says."""
    if isinstance(w, Weight):
        return w
    return _DENSE.get(w.dtype, F32Weight)(w)


def describe(w) -> str:
    """How a weight (a Weight or a plain array) is stored, for people: "bf16", "f16", "f32",
    "int8 (per-row scales)", "4-bit (groups of 64, bf16 scales)"."""
    if isinstance(w, Weight) or w.dtype in _DENSE:
        return as_weight(w).describe()
    return str(w.dtype).replace("float", "f")


def from_stored(tensors: dict, config: dict | None = None) -> dict:
    """Turn the raw tensors of a checkpoint into runtime weights.

    Every `X.weight` with a companion `X.weight_scale` becomes an Int8Weight (I8 data) or an
    Int4Weight (U8 packed data) and the `_scale` entries are dropped; everything else passes
    through unchanged (memory-mapped arrays stay memory-mapped). `config` (the config.json dict)
    is only checked for a quantization this module does not read.

    Raises RgemmaError for a foreign quantization method or scales beside a non-integer tensor.
    """
    quant = (config or {}).get("quantization")
    if quant is not None and quant.get("method") != "rgemma":
        raise RgemmaError(f"unsupported quantization {quant!r} (rgemma reads its own int8/4-bit "
                          "checkpoints, written by `rgemma quantize`)")
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in tensors:
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None:
            out[name] = t
        elif t.dtype == np.int8:
            out[name] = Int8Weight(t, scale)
        elif t.dtype == np.uint8:
            out[name] = Int4Weight(t, scale)
        else:
            raise RgemmaError(f"tensor {name!r} has scales but dtype {t.dtype}")
    return out
