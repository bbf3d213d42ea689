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
def local_attention_kernel(q, q_pos, ck, cv, c_pos, k, v, window, scale):
    """Sliding-window multi-query attention over the ring buffer and the chunk's own keys.

    q (T, H, hd) at positions q_pos (T,); ck, cv (W, KVH, hd) the cached ring slots holding
    positions c_pos (W,) (-1 for an empty slot); k, v (T, KVH, hd) the chunk's keys and values.
    A query at p sees keys at p-window..p; head h reads key/value head h // (H / KVH), as HF's
    repeat_kv does. Reading the ring in place spares copying it into position order.
    """
    T, H, hd = q.shape
    W = ck.shape[0]
    group = H // k.shape[1]
    out = np.zeros((T, H, hd), np.float32)
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        g = h // group
        first = q_pos[t] - window
        scores = np.empty(W + t + 1, np.float32)
        m = np.float32(-np.inf)
        for s in range(W + t + 1):
            if s < W:
                visible = c_pos[s] >= 0 and c_pos[s] >= first
            else:
                visible = q_pos[s - W] >= first
            x = np.float32(-np.inf)
            if visible:
                x = _dot(q[t, h], ck[s, g] if s < W else k[s - W, g]) * np.float32(scale)
            scores[s] = x
            m = max(m, x)
        total = np.float32(0.0)
        for s in range(W + t + 1):
            e = np.float32(np.exp(scores[s] - m)) if scores[s] > -np.inf else np.float32(0.0)
            scores[s] = e
            total += e
        for s in range(W + t + 1):
            if scores[s] > 0:
                _axpy(scores[s] / total, cv[s, g] if s < W else v[s - W, g], out[t, h])
    return out
