"""Linear layers over weights kept in their stored format (f32, f16, bf16 bits as uint16).

Weights are never widened to a full f32 copy: decode (one row) and prefill (many rows) widen
blocks of rows into a reused buffer.
"""

from __future__ import annotations

import numpy as np

from .safetensors import bf16_to_f32

_BLOCK_ROWS = 1024


def widen(w: np.ndarray) -> np.ndarray:
    """A float32 view or copy of (part of) a weight matrix."""
    if w.dtype == np.float32:
        return w
    if w.dtype == np.uint16:
        return bf16_to_f32(w)
    return w.astype(np.float32)


def linear(x: np.ndarray, w, b: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T + b for x (T, in) float32 and w (out, in) in any stored format."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if w.dtype == np.float32:
        y = x @ w.T
    else:
        out = w.shape[0]
        y = np.empty((x.shape[0], out), np.float32)
        for r in range(0, out, _BLOCK_ROWS):
            y[:, r:r + _BLOCK_ROWS] = x @ widen(w[r:r + _BLOCK_ROWS]).T
    if b is not None:
        y += b
    return y


def embed(w, ids) -> np.ndarray:
    """Rows `ids` of the embedding matrix as float32, shape (T, D)."""
    return np.ascontiguousarray(widen(w[np.asarray(ids, dtype=np.int64)]), dtype=np.float32)
