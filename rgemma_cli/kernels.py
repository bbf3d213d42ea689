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


@njit(cache=True)
def _attend_one(q, k, v, lo, hi, scale, out, scores):
    # One query head over its visible keys k[lo:hi]: float32 softmax, two passes.
    m = -np.inf
    for s in range(lo, hi):
        acc = np.float32(0.0)
        for d in range(q.shape[0]):
            acc += q[d] * k[s, d]
        acc *= scale
        scores[s - lo] = acc
        if acc > m:
            m = acc
    total = np.float32(0.0)
    for s in range(hi - lo):
        e = np.float32(np.exp(scores[s] - m))
        scores[s] = e
        total += e
    out[:] = 0.0
    for s in range(lo, hi):
        p = scores[s - lo] / total
        for d in range(out.shape[0]):
            out[d] += p * v[s, d]


@njit(cache=True, parallel=True)
def local_attention_kernel(q, k, v, lo, hi, scale):
    """Multi-query attention of q (T, H, hd) over k, v (S, KVH, hd) sorted by position.

    Query t sees keys lo[t]..hi[t]-1 (the caller computed the window); head h reads key/value
    head h // (H / KVH), as HF's repeat_kv does.
    """
    T, H, hd = q.shape
    group = H // k.shape[1]
    out = np.empty((T, H, hd), np.float32)
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        scores = np.empty(hi[t] - lo[t], np.float32)
        kv = h // group
        _attend_one(q[t, h], k[:, kv], v[:, kv], lo[t], hi[t], np.float32(scale), out[t, h], scores)
    return out
