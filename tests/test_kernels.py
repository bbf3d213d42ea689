"""The Numba kernels against plain NumPy written from the definitions."""

import numpy as np
import pytest

from rgemma_cli.kernels.sequence import local_attention_kernel, rg_lru_scan
from rgemma_cli.model import slot_positions


def test_rg_lru_scan_is_the_recurrence():
    rng = np.random.default_rng(0)
    a, x = rng.random((9, 5), dtype=np.float32), rng.standard_normal((9, 5)).astype(np.float32)
    h0 = rng.standard_normal(5).astype(np.float32)
    h, want = h0.copy(), []
    for t in range(9):
        h = a[t] * h + x[t]
        want.append(h)
    assert np.allclose(rg_lru_scan(a, x, h0), np.array(want), atol=1e-6)


def naive_attention(q, qpos, keys, values, kpos, window, scale, heads_per_kv):
    out = np.zeros_like(q)
    for t in range(q.shape[0]):
        visible = (kpos >= 0) & (kpos <= qpos[t]) & (qpos[t] - kpos <= window)
        for h in range(q.shape[1]):
            g = h // heads_per_kv
            s = keys[visible, g] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ values[visible, g]
    return out


@pytest.mark.parametrize("n, T, W, H, KVH", [(0, 7, 4, 2, 1), (3, 2, 4, 4, 2), (13, 1, 5, 3, 1),
                                              (20, 9, 8, 4, 1), (6, 12, 4, 2, 2)])
def test_local_attention_matches_the_window_rule(n, T, W, H, KVH):
    """Queries at n..n+T-1 over a ring holding n's previous W positions plus the chunk."""
    rng = np.random.default_rng(n + T)
    hd = 6
    ck, cv = (rng.standard_normal((W, KVH, hd)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((T, KVH, hd)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    qpos, cpos = np.arange(n, n + T), slot_positions(n, W)
    got = local_attention_kernel(q, qpos, ck, cv, cpos, k, v, W, 0.5)
    want = naive_attention(q, qpos, np.concatenate([ck, k]), np.concatenate([cv, v]),
                           np.concatenate([cpos, qpos]), W, 0.5, H // KVH)
    assert np.allclose(got, want, atol=1e-5)
