"""Numba kernels for the two sequential parts of Griffin: the RG-LRU scan and local attention.

Everything else is batched matrix products (see `linear`) and NumPy elementwise ufuncs, which
are faster than Numba for transcendentals here (the PyPI llvmlite has no SVML; perf-notes §7).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=False)
def rg_lru_scan(a, x, h0):
    """h_t = a_t * h_{t-1} + x_t over t; a, x (T, R) float32, h0 (R,) float32 -> all h (T, R)."""
    T, R = x.shape
    out = np.empty((T, R), np.float32)
    h = h0.copy()
    for t in range(T):
        for j in range(R):
            h[j] = a[t, j] * h[j] + x[t, j]
        out[t] = h
    return out


@njit(cache=True, fastmath=True)
def _dot(a, b):
    # A reduction in its own small function vectorises; inline in a prange body it does not.
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, fastmath=True)
def _axpy(alpha, x, y):
    for i in range(x.shape[0]):
        y[i] += alpha * x[i]


@njit(cache=True, parallel=True)
def local_attention_kernel(q, k, v, lo, hi, scale):
    """Multi-query attention of q (T, H, hd) over k, v (KVH, S, hd) sorted by position.

    Query t sees keys lo[t]..hi[t]-1 (the caller computed the window); head h reads key/value
    head h // (H / KVH), as HF's repeat_kv does. Softmax in float32.
    """
    T, H, hd = q.shape
    group = H // k.shape[0]
    out = np.zeros((T, H, hd), np.float32)
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        g = h // group
        n = hi[t] - lo[t]
        scores = np.empty(n, np.float32)
        m = np.float32(-np.inf)
        for s in range(n):
            x = _dot(q[t, h], k[g, lo[t] + s]) * np.float32(scale)
            scores[s] = x
            m = max(m, x)
        total = np.float32(0.0)
        for s in range(n):
            e = np.float32(np.exp(scores[s] - m))
            scores[s] = e
            total += e
        for s in range(n):
            _axpy(scores[s] / total, v[g, lo[t] + s], out[t, h])
    return out
