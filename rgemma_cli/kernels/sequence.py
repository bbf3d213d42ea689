"""Numba kernels for the two sequential parts of Griffin: the RG-LRU scan and local attention.

Everything else is batched matrix products (see `linear`) and NumPy elementwise ufuncs, which
are faster than Numba for transcendentals here (the PyPI llvmlite has no SVML;
docs/kernels.md#transcendentals).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange


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


@njit(cache=True, fastmath=True)
def _attend(job, blocks, q, q_pos, ck, cv, c_pos, filled, k, v, window, scale, m, l, o):
    """One (query t, key/value head g, block b) job: the softmax of the query heads that read
    head g over the block's keys (ring slots 0..filled-1, then the chunk's keys), unnormalised:
    the block's max m[t, b, h], sum l[t, b, h] and weighted values o[t, b, h]. Each key and
    value row is read once for all the heads that share it (multi-query attention), not once
    per head."""
    KVH = k.shape[1]
    G = q.shape[1] // KVH
    t, g, b = job // (KVH * blocks), (job // blocks) % KVH, job % blocks
    n = filled + t + 1  # keys this query may see: the ring, then the chunk up to itself
    lo, hi = b * n // blocks, (b + 1) * n // blocks
    h0, first, qt = g * G, q_pos[t] - window, q[t]
    m, l, o = m[t, b], l[t, b], o[t, b]
    scores = np.full((G, hi - lo), -np.inf, np.float32)
    visible = np.zeros(hi - lo, np.bool_)
    for s in range(lo, hi):
        if s < filled:
            if c_pos[s] < 0 or c_pos[s] < first:
                continue
            key = ck[s, g]
        else:
            if q_pos[s - filled] < first:
                continue
            key = k[s - filled, g]
        visible[s - lo] = True
        for i in range(G):
            scores[i, s - lo] = _dot(qt[h0 + i], key) * np.float32(scale)
    for i in range(G):
        m[h0 + i] = scores[i].max()
        if m[h0 + i] > -np.inf:
            for j in range(hi - lo):
                scores[i, j] = np.exp(scores[i, j] - m[h0 + i])
            l[h0 + i] = scores[i].sum()
    for s in range(lo, hi):
        if not visible[s - lo]:
            continue
        value = cv[s, g] if s < filled else v[s - filled, g]
        for i in range(G):
            _axpy(scores[i, s - lo], value, o[h0 + i])


@njit(cache=True, fastmath=True)
def _merge(m, l, o, h, out):
    """out = head h's softmax-weighted values from the blocks' partial results m, l (blocks, H)
    and o (blocks, H, hd)."""
    top = np.float32(-np.inf)
    for b in range(m.shape[0]):
        top = max(top, m[b, h])  # finite: a query always sees its own key
    total = np.float32(0.0)
    out[:] = 0.0
    for b in range(m.shape[0]):
        if l[b, h] > 0:
            c = np.float32(np.exp(m[b, h] - top))
            total += c * l[b, h]
            _axpy(c, o[b, h], out)
    _scale(np.float32(1.0) / total, out)


@njit(cache=True, fastmath=True)
def _scale(c, y):
    for i in range(y.shape[0]):
        y[i] *= c


def local_attention_kernel(q, q_pos, ck, cv, c_pos, k, v, window, scale):
    """Sliding-window multi-query attention over the ring buffer and the chunk's own keys.

    q (T, H, hd) at positions q_pos (T,); ck, cv (W, KVH, hd) the cached ring slots holding
    positions c_pos (W,) (-1 for an empty slot); k, v (T, KVH, hd) the chunk's keys and values.
    A query at p sees keys at p-window..p; head h reads key/value head h // (H / KVH), as HF's
    repeat_kv does. Reading the ring in place spares copying it into position order.

    Work is split over (query, key/value head, block of keys); with few queries (decoding) the
    keys are cut into blocks so both cores work, and the blocks' partial softmaxes are merged
    at the end (as flash-decoding does).
    """
    return _local_attention(q, q_pos, ck, cv, c_pos, k, v, window, scale, get_num_threads())


# Only the explicit prange loop runs in parallel: Numba would otherwise turn each np.full /
# np.zeros here into a parallel loop of its own, each compiled separately (~1 s apiece).
@njit(cache=True, parallel={"prange": True, "numpy": False, "setitem": False,
                            "comprehension": False, "reduction": False, "inplace_binop": False,
                            "stencil": False, "fusion": False})
def _local_attention(q, q_pos, ck, cv, c_pos, k, v, window, scale, threads):
    # (the parallel loop only calls a helper: a big prange body made the first compile ~2x slower)
    T, H, hd = q.shape
    KVH = k.shape[1]
    filled = c_pos.size  # ring slots fill in order, so the used ones are a prefix
    while filled > 0 and c_pos[filled - 1] < 0:
        filled -= 1
    blocks = max(1, min(4 * threads // (T * KVH), (filled + T) // 256))
    m = np.full((T, blocks, H), -np.inf, np.float32)
    l = np.zeros((T, blocks, H), np.float32)
    o = np.zeros((T, blocks, H, hd), np.float32)
    for job in prange(T * KVH * blocks):
        _attend(job, blocks, q, q_pos, ck, cv, c_pos, filled, k, v, window, scale, m, l, o)
    out = np.empty((T, H, hd), np.float32)
    for t in range(T):  # serial: a second parallel loop cost more to compile than it saved
        for h in range(H):
            _merge(m[t], l[t], o[t], h, out[t, h])
    return out
