"""linear() and the Numba kernels against plain NumPy, for every weight format."""

import numpy as np
import pytest

from rgemma_cli import linear as L
from rgemma_cli import formats as F
from rgemma_cli import quantize as Q
from rgemma_cli.kernels import matvec as mv
from rgemma_cli.safetensors import bf16_to_f32, f32_to_bf16

rng = np.random.default_rng(0)


def _x(t, n):
    return rng.standard_normal((t, n)).astype(np.float32)


def _w(out, n):
    return (rng.standard_normal((out, n)) * 0.05).astype(np.float32)


def _ref_int4(packed, scale):
    """Dequantize 4-bit weights with NumPy alone (the documented layout)."""
    out, half = packed.shape
    g = scale.shape[1]
    scale = bf16_to_f32(scale) if scale.dtype == np.uint16 else scale
    p = packed.reshape(out, g, F.Q4_GROUP // 2).astype(np.int32)
    nib = np.concatenate([p & 15, p >> 4], axis=2) - 8
    return (nib * scale[..., None]).reshape(out, 2 * half).astype(np.float32)


@pytest.mark.parametrize("t", [1, 3, 7])
@pytest.mark.parametrize("shape", [(5, 100), (67, 256), (300, 1000), (13, 4160)])
def test_float_formats_match_numpy(t, shape):
    w = _w(*shape)
    x = _x(t, shape[1])
    b = rng.standard_normal(shape[0]).astype(np.float32)
    bits = f32_to_bf16(w)
    for stored, dense in ((w, w), (bits, bf16_to_f32(bits)), (w.astype(np.float16), w.astype(np.float16).astype(np.float32))):
        ref = x.astype(np.float64) @ dense.T.astype(np.float64) + b
        y = L.linear(x, stored, b)
        assert y.dtype == np.float32 and y.shape == (t, shape[0])
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 4, 6])
def test_int8_matches_numpy(t):
    w = _w(130, 320)
    q, s = Q.quantize_int8(w)
    x = _x(t, 320)
    b = rng.standard_normal(130).astype(np.float32)
    ref = x.astype(np.float64) @ (q.astype(np.float64) * s[:, None]).T
    np.testing.assert_allclose(L.linear(x, F.Int8Weight(q, s)), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(L.linear(x, F.Int8Weight(q, s), b), ref + b, rtol=1e-4, atol=1e-4)
    assert np.abs(q.astype(np.float32) * s[:, None] - w).max() <= s.max() / 2 + 1e-7


def test_int4_prefill_matches_numpy():
    w = _w(70, 256)
    p, s = Q.quantize_int4(w)
    assert s.dtype == np.uint16  # bf16 scales
    dense = _ref_int4(p, s)
    x = _x(5, 256)
    np.testing.assert_allclose(L.linear(x, F.Int4Weight(p, s)), x @ dense.T, rtol=1e-4, atol=1e-4)


def test_int4_scales_beat_the_plain_peak_rule():
    """Each group's w^2-weighted error is at most that of Q4_0's rule (peak -> level -8,
    nothing clipped), and over a Gaussian matrix clearly less."""
    w = _w(64, 512)
    g = w.reshape(64, -1, F.Q4_GROUP)
    peak = np.take_along_axis(g, np.abs(g).argmax(2)[..., None], 2)
    plain = bf16_to_f32(f32_to_bf16(peak / -8.0))
    plain_err = (g * g * np.square(np.clip(np.rint(g / plain), -8, 7) * plain - g)).sum(2)
    p, s = Q.quantize_int4(w)
    err = (g * g * np.square(_ref_int4(p, s).reshape(g.shape) - g)).sum(2)
    assert (err <= plain_err * (1 + 1e-6)).all()
    assert err.sum() < 0.97 * plain_err.sum()
    worst = np.abs(_ref_int4(p, s).reshape(g.shape) - g).max(2)
    # the peak may sit at level -9.5, so a value of the other sign may be clipped from 9.5 to 7
    assert (worst <= 2.5 * np.abs(bf16_to_f32(s)) * (1 + 1e-5)).all()


def test_int4_f32_scales_of_older_files_give_the_same_products():
    """The same scales stored as f32 (older files) or bf16 give the same products up to the
    order of the float additions. Not bit for bit: they are two fastmath kernels, and the
    compiler may contract and reassociate each differently (x86 happens to give identical bits,
    64-bit ARM does not; issue 10 item 11)."""
    w = _w(40, 256)
    p, s = Q.quantize_int4(w)
    wide = bf16_to_f32(s)
    for t in (1, 5):
        x = _x(t, 256)
        got, want = L.linear(x, F.Int4Weight(p, wide)), L.linear(x, F.Int4Weight(p, s))
        # a handful of groups per row: float32 rounding of the sum, relative to its magnitude
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_int4_decode_matches_numpy_with_quantized_activations():
    w = _w(90, 384)
    p, s = Q.quantize_int4(w)
    dense = _ref_int4(p, s)
    x = _x(1, 384)
    # the kernel quantizes x to int8 per group of 64: same arithmetic in NumPy
    xg = x.reshape(-1, F.Q4_GROUP)
    xs = np.where(np.abs(xg).max(1) > 0, np.abs(xg).max(1) / 127, 1).astype(np.float32)
    xq = np.rint(xg * (np.float32(1) / xs)[:, None]).reshape(1, -1)
    ref = (xq * np.repeat(xs, F.Q4_GROUP)).astype(np.float64) @ dense.T.astype(np.float64)
    y = L.linear(x, F.Int4Weight(p, s))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    b = rng.standard_normal(90).astype(np.float32)
    np.testing.assert_allclose(L.linear(x, F.Int4Weight(p, s), b), ref + b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, x @ dense.T, rtol=0.03, atol=0.03 * np.abs(ref).max())


@pytest.mark.parametrize("rows, n", [(3, 64), (13, 192), (30, 7680)])
def test_int4_portable_kernel_agrees_with_the_host_kernel(rows, n):
    # on x86 `matvec_q4` is the tile kernel (the zero point subtracted in integers); both
    # compute the same integer dots, and differ only in how the f32 terms are summed
    p, s = Q.quantize_int4(_w(rows, n))
    x = _x(1, n)[0]
    b = rng.standard_normal(rows).astype(np.float32)
    a, c = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    mv.matvec_q4(p, s, x, b, a)
    mv._matvec_q4_portable(p, s, x, b, c)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_embed_every_format():
    w = _w(50, 128)
    ids = [3, 0, 49, 3]
    np.testing.assert_array_equal(L.embed(w, ids), w[ids])
    bits = f32_to_bf16(w)
    np.testing.assert_array_equal(L.embed(bits, ids), bf16_to_f32(bits)[ids])
    q, s = Q.quantize_int8(w)
    np.testing.assert_allclose(L.embed(F.Int8Weight(q, s), ids), q[ids] * s[ids, None], rtol=1e-6)
    p, s4 = Q.quantize_int4(w)
    np.testing.assert_allclose(L.embed(F.Int4Weight(p, s4), ids), _ref_int4(p, s4)[ids], rtol=1e-6)


def test_prefill_blocks_cover_all_rows(monkeypatch):
    monkeypatch.setattr(L, "_BLOCK_BYTES", 4 * 64 * 7)  # 7 rows per block: a ragged last block
    w = _w(30, 64)
    bits = f32_to_bf16(w)
    x = _x(L._STREAM_ROWS + 2, 64)
    np.testing.assert_allclose(L.linear(x, bits), x @ bf16_to_f32(bits).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5, 7, 16, 17])
@pytest.mark.parametrize("H, bw", [(3, 40), (4, 4), (2, 8), (1, 16)])
@pytest.mark.parametrize("stored", ["f32", "bf16"])
def test_block_diagonal_matches_numpy(t, H, bw, stored):
    # 16 rows of 4 x 4 blocks: the shape OpenBLAS 0.3.31's SME kernel (arm64) multiplied wrongly
    # when handed the blocks as strided views (docs/arm64.md); the reference is a float64 sum,
    # no BLAS call
    w = _w(H * bw, bw).reshape(H, bw, bw)
    if stored == "bf16":  # gate blocks stay bf16 bits, as memory-mapped from the checkpoint
        w, bits = bf16_to_f32(f32_to_bf16(w)), f32_to_bf16(w)
    b = rng.standard_normal((H, bw)).astype(np.float32)
    x = _x(t, H * bw)
    xb = x.reshape(t, H, bw).astype(np.float64)
    ref = ((xb[:, :, :, None] * w[None].astype(np.float64)).sum(axis=2) + b).reshape(t, H * bw)
    got = L.block_diagonal(x, bits if stored == "bf16" else w, b)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 16, 255, 256, 257, 320, 2560, 7683])
def test_int8_row_dot_is_the_exact_integer_dot(n):
    # the host kernel (x86: `tile.tile_i8`) and the portable loop: int32 sums of 256 products
    # are exact; only their conversion to float32 rounds. x holds int16 values with |x| up to
    # 32767, so quantizing it to int16 (scale 1) keeps it exact
    w = rng.integers(-127, 128, (1, n), dtype=np.int8)
    x16 = rng.integers(-32767, 32768, n).astype(np.int16)
    x16[0] = 32767
    exact = float(np.dot(w[0].astype(np.int64), x16.astype(np.int64)))
    for kernel in (mv.matvec_i8, mv._matvec_i8_portable):
        y = np.zeros(1, np.float32)
        kernel(w, np.ones(1, np.float32), x16.astype(np.float32), np.zeros(0, np.float32), y)
        assert y[0] == pytest.approx(exact, rel=1e-6, abs=1.0)


def test_int8_kernel_takes_read_only_weights():
    # weights memory-mapped from a checkpoint are read-only arrays (a distinct Numba type)
    q, s = Q.quantize_int8(_w(40, 512))
    q.flags.writeable = False
    x = _x(1, 512)
    ref = x.astype(np.float64) @ (q.astype(np.float64) * s[:, None]).T
    np.testing.assert_allclose(L.linear(x, F.Int8Weight(q, s)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not __import__("rgemma_cli.kernels.cpu", fromlist=["ISA"]).ISA,
                    reason="the register tiles are x86 kernels")
@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8", "q4"])
def test_every_decode_tile_shape_gives_the_same_bits(fmt):
    # cpu.DECODE_TILES picks the rows per decode tile and whether it prefetches by CPU family:
    # whichever a machine gets, a row's bits are those of the 4 x 2 batched tiles, so
    # every shape is run here on this machine. 12 rows: the last tile's prefetch points past
    # the array (a prefetch must not fault).
    from numba import njit
    from rgemma_cli.kernels import cpu, tile as T
    rows, n = 12, 640
    x = _x(1, n)
    vnni = cpu.ISA == "vnni"
    if fmt in ("f32", "bf16"):
        w = _w(rows, n) if fmt == "f32" else f32_to_bf16(_w(rows, n))
        args, build = (w, x), (lambda R, pf: T.tile(R, 1, pf))
    elif fmt == "int8":
        w = rng.integers(-127, 128, (rows, n), dtype=np.int8)
        args, build = (w, rng.integers(-32767, 32768, (1, n)).astype(np.int16)), (lambda R, pf: T.tile_i8(R, 1, vnni, pf))
    else:
        packed = rng.integers(0, 256, (rows, n // 2), dtype=np.uint8)
        XQ = rng.integers(-127, 128, (1, n), dtype=np.int8)
        XT = (8 * XQ.reshape(1, -1, F.Q4_GROUP).astype(np.int32).sum(axis=2)).astype(np.int32)
        args, build = (packed, None, XQ, XT), (lambda R, pf: T.tile_q4(R, 1, vnni, pf))
    outs = []
    for R, pf in ((4, False), (4, True), (2, True), (2, False), (1, True), (1, False)):
        t = build(R, pf)
        if fmt == "q4":
            @njit
            def run(packed, XQ, XT, Y, t=t, R=R):
                for r in range(0, packed.shape[0], R):
                    CS = np.full((R, XT.shape[1]), np.float32(0.01))
                    t(packed, CS, XQ, XT, Y, r, 0)
            Y = np.zeros((1, rows), np.float32)
            run(args[0], args[2], args[3], Y)
        else:
            @njit
            def run(w, X, Y, t=t, R=R):
                for r in range(0, w.shape[0], R):
                    t(w, X, Y, r, 0)
            Y = np.zeros((1, rows), np.float32)
            run(*args, Y)
        outs.append(Y)
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])
    assert np.any(outs[0] != 0)
