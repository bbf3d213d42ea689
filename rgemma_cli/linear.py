"""Linear layers over weights kept in their stored format (`formats`: f32, f16, bf16, int8,
4-bit). Weights are never widened to a full f32 copy.

- One row (decode): a Numba kernel streams the weight once, widening in registers, parallel
  over output rows (`kernels/matvec.py`). Reading the weights is the whole cost of a decoded token.
  int8 and 4-bit weights meet quantized activations (int16 per vector, int8 per group of 64) in
  integer dot products. A few rows (up to `_STREAM_ROWS`) are streamed row by row too: widening
  a whole model serially costs more than reading it a few times.
- Many rows (prefill): blocks of weight rows are widened (or dequantized) by a serial Numba
  function into a reused f32 buffer, then OpenBLAS sgemm multiplies the block on both cores.

Numba's and OpenBLAS's thread pools must not run at the same time: the idle workers of one
spin on the cores the other needs (a small attention gemm before a matvec made it ~5x slower
here; docs/kernels.md#one-thread-pool-at-a-time). So decode switches OpenBLAS to one thread (the model's other
small BLAS calls then run on the caller's thread) and prefill gives it all cores back.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import numpy as np

from .formats import as_weight
from .kernels import matvec as kernels
from .safetensors import bf16_to_f32

_BLOCK_BYTES = 32 << 20  # f32 bytes of weight rows per sgemm call (8 MB blocks ran at half speed)
_STREAM_ROWS = 4  # up to this many rows: one matvec per row instead of widen + sgemm
_local = threading.local()  # .buffer: the reused widening buffer, one per thread


# -- one thread pool at a time ---------------------------------------------------------------


def _openblas():
    """NumPy's bundled OpenBLAS `set_num_threads` (None if not found: then nothing is switched)."""
    libs = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*")
    for path in glob.glob(libs) + glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs",
                                                          "*openblas*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, sym):
                return getattr(lib, sym)
    return None


_set_blas_threads = _openblas()
_blas_mode = None


def blas_threads(n: int | None) -> None:
    """Set OpenBLAS's thread count (None: all cores), only when it changes."""
    global _blas_mode
    if n != _blas_mode and _set_blas_threads is not None:
        _set_blas_threads(ctypes.c_int(n or os.cpu_count() or 1))
    _blas_mode = n


# -- the layer -------------------------------------------------------------------------------


def matvec(w, x: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """y = w @ x + b for one float32 vector x (in,), streaming w once. Returns (out,) float32.

    b is float32 (out,) or None (biases are float32 from load: no conversion per token)."""
    blas_threads(1)
    y = np.empty(w.shape[0], np.float32)
    as_weight(w).matvec(x, b, y)
    return y


def batched_linear(x: np.ndarray, w, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T + b for x (B, in) float32: one row per sequence of a batched decode step.

    Streams w once for all B rows, and row i equals `matvec(w, x[i], b)` bit for bit whatever
    the other rows are (batch invariance: `kernels.matvec.matmat`). Returns (B, out) float32."""
    blas_threads(1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    as_weight(w).matmat(x, b, y)
    return y


def widen_rows(w, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows lo:hi of w as float32 (into `out` if given), serially: no thread pool is woken."""
    return as_weight(w).widen(lo, hi, out)


def _matmul(x: np.ndarray, w) -> np.ndarray:
    """x (T, in) @ w.T by row blocks of w widened into the reused buffer, then sgemm."""
    blas_threads(None)
    w = as_weight(w)
    if w.f32 is not None:  # already float32: sgemm reads it as it is
        return x @ w.f32.T
    out_rows, n = w.shape
    rows = max(1, min(out_rows, _BLOCK_BYTES // (4 * n)))
    rows = -(-out_rows // -(-out_rows // rows))  # equal blocks: no small last sgemm
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < rows * n:
        buffer = _local.buffer = np.empty(rows * n, np.float32)
    y = np.empty((x.shape[0], out_rows), np.float32)
    for lo in range(0, out_rows, rows):
        hi = min(lo + rows, out_rows)
        block = widen_rows(w, lo, hi, buffer[:(hi - lo) * n].reshape(hi - lo, n))
        y[:, lo:hi] = x @ block.T  # (a strided `out=` would make NumPy skip BLAS)
    return y


def linear(x: np.ndarray, w, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T + b for x (T, in) float32 and w (out, in) in any stored format."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[0] == 1:
        return matvec(w, x[0], b)[None]
    if x.shape[0] <= _STREAM_ROWS:
        return np.stack([matvec(w, row, b) for row in x]) if len(x) else np.empty((0, w.shape[0]), np.float32)
    y = _matmul(x, w)
    if b is not None:
        y += b
    return y


def embed(w, ids) -> np.ndarray:
    """Rows `ids` of the embedding matrix as float32, shape (T, D)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((ids.size, w.shape[1]), np.float32)
    for i, t in enumerate(ids):
        widen_rows(w, int(t), int(t) + 1, out[i:i + 1])
    return out


def block_diagonal(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (T, H*bw) through H independent blocks w (H, bw_in, bw_out) ([block, in, out]; f32, or
    bf16 bits as stored) plus b (H, bw_out): the RG-LRU gates. One row streams w once in a
    parallel Numba kernel (NumPy's batched matmul ran at ~9 GB/s there); more rows widen w and
    use the batched matmul."""
    H, n, m = w.shape
    if x.shape[0] == 1 and w.dtype in (np.float32, np.uint16) and w.flags.c_contiguous:
        blas_threads(1)
        y = np.empty((1, H * m), np.float32)
        kernels.block_diagonal_vec(np.ascontiguousarray(x[0], np.float32), w,
                                   np.ascontiguousarray(b, np.float32).reshape(H, m), y[0])
        return y
    w = bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, np.float32)
    # (H, T, bw) copied, not a strided view: BLAS gets every operand contiguous. OpenBLAS
    # 0.3.31's SME kernel (arm64) returns wrong products for a left operand whose rows are
    # padded (16 rows of 4 x 4 blocks, docs/arm64.md); contiguous operands were right in every
    # shape tried. Its right results can still come with overflow / invalid flags raised in
    # lanes it computes and discards (NumPy turned them into RuntimeWarnings on every prefill):
    # ignored here; a non-finite value that reaches the logits is still caught there.
    xb = np.ascontiguousarray(x.reshape(x.shape[0], H, n).transpose(1, 0, 2))
    with np.errstate(all="ignore"):
        y = np.matmul(xb, w)
    return (y.transpose(1, 0, 2) + b.reshape(H, m)).reshape(x.shape[0], H * m)


def batched_block_diagonal(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`block_diagonal` for x (B, H*bw) holding one row per sequence of a batched decode step:
    row i equals `block_diagonal(x[i:i+1], w, b)` bit for bit. Returns (B, H*bw_out) float32."""
    H, n, m = w.shape
    if w.dtype not in (np.float32, np.uint16) or not w.flags.c_contiguous:
        return np.concatenate([block_diagonal(row[None], w, b) for row in x])
    blas_threads(1)
    y = np.empty((x.shape[0], H * m), np.float32)
    kernels.block_diagonal_rows(np.ascontiguousarray(x, np.float32), w,
                                np.ascontiguousarray(b, np.float32).reshape(H, m), y)
    return y
