"""Numba kernels for decoding through the linear layers: weight-streaming matrix-vector products,
one per weight format, parallel over output rows (prefill widens rows instead: `widen`).

Decoding reads every weight once per token, so these kernels are bound by memory bandwidth.
What makes them fast (docs/kernels.md#vectorised-reductions): the per-row reduction lives in a
small @njit helper called on the row view (an inline reduction in a prange body is not
vectorised), bf16 and f16 are widened to f32 in registers by tiny LLVM intrinsics, and
accumulation is f32 with fastmath so LLVM keeps several vector accumulators.

Weight formats (all `(out, in)`, rows contiguous):
  f32            float32
  bf16 / f16     uint16 bits
  int8           int8 q, f32 scale (out,):             w = q * scale[r]
  4-bit          uint8 (out, in/2), bf16 (uint16 bits) or f32 scale (out, in/G):
                 w = (nibble - 8) * scale[r, g]; in each group of G weights, byte j holds weight j
                 (low nibble) and weight j + G/2 (high).
Quantized weights use integer dot products: the int8 kernel quantises x to int16 (one scale per
vector), the 4-bit kernel to int8 per group (see `matvec_i8`, `matvec_q4`).

On x86 (`cpu.ISA`) every format but f16 runs hand-written register tiles (`tile.py`): the same
per-row arithmetic for one row and for a batch, so the batched step is bit for bit the
one-sequence decode. Elsewhere the compiler-vectorised loops below run, with the same
guarantee by sharing one helper per row (`_dot`, `_dot4`, `_dot_i8`, `_q4_row_dot`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu import DECODE_TILES, ISA
from .tile import tile, tile_i8, tile_q4
from .widen import as_f32, f16_bits_to_f32

# -- one row: small helpers so that LLVM vectorises the reduction ----------------------------

_opts = dict(cache=True, fastmath=True, nogil=True)


@njit(**_opts)
def _dot(w, x):
    """w . x for a row of f32 or bf16 weights (compiled once per weight dtype)."""
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += as_f32(w[i]) * x[i]
    return acc


@njit(**_opts)
def _dot4(w0, w1, w2, w3, x):
    """The dots of four rows with x, reading x once for all four (see `matvec`)."""
    a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        a0 += as_f32(w0[i]) * xi
        a1 += as_f32(w1[i]) * xi
        a2 += as_f32(w2[i]) * xi
        a3 += as_f32(w3[i]) * xi
    return a0, a1, a2, a3


@njit(**_opts)
def _dot_f16(w, x):
    acc = np.float32(0.0)
    for i in range(x.size):
        acc += f16_bits_to_f32(w[i]) * x[i]
    return acc


@njit(**_opts)
def _dot_i8_portable(w, x16):
    """Integer dot of int8 weights with int16 activations: int32 sums over runs of 256 (cannot
    overflow: 256 * 127 * 32767 < 2**31), then float (the portable loop; x86 uses
    `cpu._i8_row_dot_x86`, the same sums in 256-bit registers)."""
    acc = np.float32(0.0)
    n = w.size
    full = n - n % 256  # (a `min()` in the inner bound made this loop 200x slower)
    for lo in range(0, full, 256):
        d = np.int32(0)
        for j in range(lo, lo + 256):
            d = np.int32(d + np.int32(w[j]) * np.int32(x16[j]))
        acc += np.float32(d)
    d = np.int32(0)
    for j in range(full, n):
        d = np.int32(d + np.int32(w[j]) * np.int32(x16[j]))
    return acc + np.float32(d)


_dot_i8 = _dot_i8_portable  # (x86 runs `tile.tile_i8` instead)


Q4_GROUP = 64  # weights per 4-bit group: 32 packed bytes, one 256-bit register

@njit(**_opts)
def _q4_row_dot_portable(row, xq, cs):
    half = Q4_GROUP // 2
    acc = np.float32(0.0)
    for g in range(cs.size):
        d = np.int32(0)
        for j in range(half):
            b = row[g * half + j]
            d = np.int32(d + np.int32(b & 15) * np.int32(xq[g * Q4_GROUP + j])
                         + np.int32(b >> 4) * np.int32(xq[g * Q4_GROUP + half + j]))
        acc += cs[g] * np.float32(d)
    return acc


_q4_row_dot = _q4_row_dot_portable  # (x86 runs `tile.tile_q4` instead)


@njit(**_opts)
def _combined_scales(srow, xscale, xcorr, cs):
    """cs[g] = srow[g] * xscale[g] (a vectorised pass per row, instead of a scalar bf16 widening
    and product inside every group step); returns the row's zero-point term sum_g srow[g] *
    xcorr[g]."""
    corr = np.float32(0.0)
    for g in range(cs.size):
        s = as_f32(srow[g])
        cs[g] = s * xscale[g]
        corr += s * xcorr[g]
    return corr


# -- decode: y = W x, parallel over output rows ----------------------------------------------


# Inputs beyond which x (f32) no longer stays in L1 beside the streamed rows: a 2B MLP's down
# projection (7680 inputs) ran at ~22 GB/s row by row, ~37 four rows at a time; at 2560 and
# 4096 inputs one row at a time is faster.
_WIDE_INPUT = 4096


@njit(**_opts)
def _bias(b, r):
    """b[r], or 0 for an empty b (no bias). Adding the bias row by row in the kernels spares a
    pass over y afterwards, when y and b are no longer in cache."""
    return b[r] if b.size else np.float32(0.0)


@njit(parallel=True, **_opts)
def _matvec_portable(w, x, b, y):
    """y = W x + b for f32 or bf16 (uint16 bits) W (b empty: no bias): compiler-vectorised
    dots (the kernel off x86; on x86 `matvec` is `_matvec_tiled`)."""
    rows = w.shape[0]
    if x.size <= _WIDE_INPUT:
        for r in prange(rows):
            y[r] = _dot(w[r], x) + _bias(b, r)
    else:  # four rows per pass, so x is read from L2 once per four rows instead of every row
        for t in prange(rows // 4):
            r = 4 * t
            d0, d1, d2, d3 = _dot4(w[r], w[r + 1], w[r + 2], w[r + 3], x)
            y[r], y[r + 1] = d0 + _bias(b, r), d1 + _bias(b, r + 1)
            y[r + 2], y[r + 3] = d2 + _bias(b, r + 2), d3 + _bias(b, r + 3)
        for r in range(rows - rows % 4, rows):
            y[r] = _dot(w[r], x) + _bias(b, r)


@njit(parallel=True, **_opts)
def matvec_f16(w, x, b, y):
    for r in prange(w.shape[0]):
        y[r] = _dot_f16(w[r], x) + _bias(b, r)


@njit(**_opts)
def quantize_i16(x):
    """x (in,) -> (int16 x16, scale): one scale for the whole vector (error <= max|x| / 65534)."""
    m = np.float32(0.0)
    for v in x:
        m = max(m, abs(v))
    s = m / np.float32(32767.0) if m > 0 else np.float32(1.0)
    inv = np.float32(1.0) / s
    x16 = np.empty(x.size, np.int16)
    for i in range(x.size):
        x16[i] = np.int16(np.rint(x[i] * inv))
    return x16, s


@njit(parallel=True, **_opts)
def _matvec_i8_portable(w, scale, x, b, y):
    """y = W x + b for int8 W (per-row scales); x is quantized to int16 first (`quantize_i16`)."""
    x16, xscale = quantize_i16(x)
    for r in prange(w.shape[0]):
        y[r] = _dot_i8(w[r], x16) * (scale[r] * xscale) + _bias(b, r)


@njit(**_opts)
def quantize_groups_i8(x, group):
    """x (in,) -> (int8 xq, f32 xscale per group of `group` values, xcorr) where the zero-point
    correction xcorr[g] = 8 * xscale[g] * sum(xq of group g) is for `matvec_q4`."""
    n = x.size // group
    xq, xscale, xcorr = np.empty(x.size, np.int8), np.empty(n, np.float32), np.empty(n, np.float32)
    for g in range(n):
        m = np.float32(0.0)
        for j in range(g * group, (g + 1) * group):
            m = max(m, abs(x[j]))
        s = m / np.float32(127.0) if m > 0 else np.float32(1.0)
        inv = np.float32(1.0) / s
        t = np.int32(0)
        for j in range(g * group, (g + 1) * group):
            q = np.int32(np.rint(x[j] * inv))
            xq[j] = q
            t += q
        xscale[g] = s
        xcorr[g] = np.float32(8.0) * s * np.float32(t)
    return xq, xscale, xcorr


_Q4_CHUNKS = 64  # rows are split into this many runs, each with one scratch row of scales


@njit(parallel=True, **_opts)
def _matvec_q4_portable(packed, scale, x, b, y):
    """y = W x + b for 4-bit W; x is quantised per group first (`quantize_groups_i8`), and
    xcorr removes the nibble zero point: w = (nibble - 8) * scale."""
    xq, xscale, xcorr = quantize_groups_i8(x, x.size // scale.shape[1])
    rows = packed.shape[0]
    for c in prange(_Q4_CHUNKS):
        cs = np.empty(scale.shape[1], np.float32)
        for r in range(c * rows // _Q4_CHUNKS, (c + 1) * rows // _Q4_CHUNKS):
            corr = _combined_scales(scale[r], xscale, xcorr, cs)
            y[r] = _q4_row_dot(packed[r], xq, cs) - corr + _bias(b, r)


@njit(**_opts)
def _vec_mat_acc(x, w, y):
    """y += x @ w for x (in,), w (in, out) f32 or bf16, row-major: axpy over contiguous rows."""
    for i in range(w.shape[0]):
        xi = x[i]
        row = w[i]
        for o in range(y.size):
            y[o] += xi * as_f32(row[o])


@njit(parallel=True, **_opts)
def block_diagonal_vec(x, w, b, y):
    """y = blockdiag(w) applied to one row: y[h] = x[h] @ w[h] + b[h] for w (H, bw_in, bw_out)
    ([block, in, out] as the RG-LRU gates are stored; f32 or bf16), x (H*bw_in,), b (H, bw_out)."""
    H, n, m = w.shape
    for h in prange(H):
        yh = y[h * m:(h + 1) * m]
        yh[:] = b[h]
        _vec_mat_acc(x[h * n:(h + 1) * n], w[h], yh)


# -- batched decode: Y = X W^T for B rows, each row exactly as `matvec` computes it -----------
#
# Each weight row is dotted with every row of X by the very helpers `matvec` uses (`_dot`,
# `_dot4`, `_dot_i8`, `_q4_row_dot`, compiled once per signature), so a row's result does not
# depend on B or on the other rows: bit for bit the same as `matvec` on that row alone (batch
# invariance, tested). A block of weight rows stays in L2 while every row of X passes over it,
# so the weights are streamed from memory once per call for all B rows.

_ROW_BLOCK_BYTES = 64 << 10  # weight bytes per block of rows (half of L2 on small cores)


@njit(**_opts)
def _block_rows(rows, row_bytes, multiple):
    """Rows per block: ~_ROW_BLOCK_BYTES of weights, a multiple of `multiple`, at least one."""
    n = max(1, _ROW_BLOCK_BYTES // max(1, row_bytes))
    return max(multiple, n - n % multiple)


@njit(parallel=True, **_opts)
def _matmat_portable(w, X, b, Y):
    """Y[j] = W X[j] + b for every row j of X (B, in); f32 or bf16 (uint16 bits) W (out, in).
    Each Y[j] equals `_matvec_portable(w, X[j], b, .)` bit for bit."""
    rows, B = w.shape[0], X.shape[0]
    if X.shape[1] <= _WIDE_INPUT:
        blk = _block_rows(rows, w.shape[1] * w.itemsize, 1)
        for t in prange((rows + blk - 1) // blk):
            for j in range(B):
                x, y = X[j], Y[j]
                for r in range(t * blk, min(rows, (t + 1) * blk)):
                    y[r] = _dot(w[r], x) + _bias(b, r)
    else:  # as `matvec`: four rows per pass, the last rows % 4 one at a time
        blk = _block_rows(rows, w.shape[1] * w.itemsize, 4)
        full = rows - rows % 4
        for t in prange((full + blk - 1) // blk):
            for j in range(B):
                x, y = X[j], Y[j]
                for r in range(t * blk, min(full, (t + 1) * blk), 4):
                    d0, d1, d2, d3 = _dot4(w[r], w[r + 1], w[r + 2], w[r + 3], x)
                    y[r], y[r + 1] = d0 + _bias(b, r), d1 + _bias(b, r + 1)
                    y[r + 2], y[r + 3] = d2 + _bias(b, r + 2), d3 + _bias(b, r + 3)
        for j in range(B):
            for r in range(full, rows):
                Y[j, r] = _dot(w[r], X[j]) + _bias(b, r)


# -- x86: register-blocked tiles (`tile.py`), the same per-row arithmetic at any batch size ----

if ISA:
    # (4 x 3 would keep 12 accumulators + 3 activation vectors + 1 weight vector in the 16
    # ymm registers, but LLVM unrolls the loop by two and spilled every accumulator to the
    # stack each step: 38 GFLOP/s in bf16 on Zen 3; 4 x 2 fits unrolled)
    _t4x1, _t1x1, _t4x2, _t1x2 = (tile(R, J) for R, J in ((4, 1), (1, 1), (4, 2), (1, 2)))
    # the decode tiles of this CPU (`cpu.DECODE_TILES`: rows per tile, prefetch or not).
    # (Numba's cache is keyed by this file: after changing them in cpu.py or tile.py, touch
    # this file or the cached kernels keep the old ones)
    _F32_ROWS, _BF16_ROWS = DECODE_TILES["f32"][0], DECODE_TILES["bf16"][0]
    _f32_decode, _bf16_decode = tile(_F32_ROWS, 1, DECODE_TILES["f32"][1]), tile(_BF16_ROWS, 1, DECODE_TILES["bf16"][1])
    # no fastmath where the tiles are inlined: Numba's fast-math pass flags every float op of
    # the function, the tiles' in-order lane sums included, and LLVM then reorders them
    # differently per tile shape (a row's bits changed with the batch size)
    _exact = dict(cache=True, nogil=True)

    @njit(parallel=True, **_exact)
    def _matvec_tiled(w, x, b, y):
        """y = W x + b, `cpu.DECODE_TILES` weight rows per tile (x is read once for them all)."""
        rows = w.shape[0]
        X, Y = x.reshape(1, x.size), y.reshape(1, rows)
        if w.itemsize == 2:
            R = _BF16_ROWS
            for t in prange(rows // R):
                _bf16_decode(w, X, Y, R * t, 0)
        else:
            R = _F32_ROWS
            for t in prange(rows // R):
                _f32_decode(w, X, Y, R * t, 0)
        for r in range(rows - rows % R, rows):
            _t1x1(w, X, Y, r, 0)
        if b.size:
            for r in range(rows):
                y[r] += b[r]

    @njit(**_exact)
    def _tiles(w, X, Y, lo, hi, j, J):
        """Rows lo..hi of W against rows j..j+J of X (J <= 2), four weight rows per tile."""
        full = hi - (hi - lo) % 4
        if J == 2:
            for r in range(lo, full, 4):
                _t4x2(w, X, Y, r, j)
            for r in range(full, hi):
                _t1x2(w, X, Y, r, j)
        else:
            for r in range(lo, full, 4):
                _t4x1(w, X, Y, r, j)
            for r in range(full, hi):
                _t1x1(w, X, Y, r, j)

    @njit(parallel=True, **_exact)
    def _matmat_tiled(w, X, b, Y):
        """Y[j] = W X[j] + b: a block of weight rows stays in L2 while 4 x 2 tiles pass over
        every two rows of X; each Y[j] equals `_matvec_tiled(w, X[j], b, .)` bit for bit."""
        rows, B = w.shape[0], X.shape[0]
        blk = _block_rows(rows, w.shape[1] * w.itemsize, 4)
        for t in prange((rows + blk - 1) // blk):
            lo, hi = t * blk, min(rows, (t + 1) * blk)
            for j in range(0, B, 2):
                _tiles(w, X, Y, lo, hi, j, min(2, B - j))
            if b.size:
                for j in range(B):
                    for r in range(lo, hi):
                        Y[j, r] += b[r]

    matvec, matmat = _matvec_tiled, _matmat_tiled
else:
    matvec, matmat = _matvec_portable, _matmat_portable
matvec.__doc__ = "y = W x + b for f32 or bf16 (uint16 bits) W (b empty: no bias)."
matmat.__doc__ = """Y[j] = W X[j] + b for every row j of X (B, in); f32 or bf16 (uint16 bits) W
(out, in). Each Y[j] equals `matvec(w, X[j], b, .)` bit for bit."""


@njit(parallel=True, **_opts)
def matmat_f16(w, X, b, Y):
    """`matmat` for f16 (uint16 bits) W; each row as `matvec_f16`."""
    rows, B = w.shape[0], X.shape[0]
    blk = _block_rows(rows, w.shape[1] * 2, 1)
    for t in prange((rows + blk - 1) // blk):
        for j in range(B):
            x, y = X[j], Y[j]
            for r in range(t * blk, min(rows, (t + 1) * blk)):
                y[r] = _dot_f16(w[r], x) + _bias(b, r)


@njit(**_opts)
def _quantize_rows_i16(X):
    """`quantize_i16` of every row of X (B, in): (int16 (B, in), scales (B,))."""
    B = X.shape[0]
    x16 = np.empty(X.shape, np.int16)
    xscale = np.empty(B, np.float32)
    for j in range(B):
        q, s = quantize_i16(X[j])
        x16[j] = q
        xscale[j] = s
    return x16, xscale


@njit(parallel=True, **_opts)
def _matmat_i8_portable(w, scale, X, b, Y):
    """`matmat` for int8 W (per-row scales); each row as `_matvec_i8_portable`."""
    x16, xscale = _quantize_rows_i16(X)
    rows, B = w.shape[0], X.shape[0]
    blk = _block_rows(rows, w.shape[1], 1)
    for t in prange((rows + blk - 1) // blk):
        for j in range(B):
            xj, y, sj = x16[j], Y[j], xscale[j]
            for r in range(t * blk, min(rows, (t + 1) * blk)):
                y[r] = _dot_i8(w[r], xj) * (scale[r] * sj) + _bias(b, r)


if ISA:
    _i4x1, _i1x1, _i4x2, _i1x2 = (tile_i8(R, J, ISA == "vnni") for R, J in
                                  ((4, 1), (1, 1), (4, 2), (1, 2)))
    _I8_ROWS = DECODE_TILES["int8"][0]
    _i8_decode = tile_i8(_I8_ROWS, 1, ISA == "vnni", DECODE_TILES["int8"][1])

    @njit(**_exact)
    def _scale_rows(Y, scale, xscale, b, lo, hi):
        """Y[j, r] = dot * (scale[r] * xscale[j]) + b[r] for rows lo..hi: the one float step
        after the integer dots, the same expression at every batch size."""
        for j in range(Y.shape[0]):
            sj = xscale[j]
            for r in range(lo, hi):
                Y[j, r] = Y[j, r] * (scale[r] * sj) + _bias(b, r)

    @njit(parallel=True, **_exact)
    def _matvec_i8_tiled(w, scale, x, b, y):
        """y = W x + b for int8 W: x quantized to int16 (`quantize_i16`), `cpu.DECODE_TILES`
        weight rows per integer tile (`tile.tile_i8`)."""
        x16, xscale = quantize_i16(x)
        rows = w.shape[0]
        X, Y = x16.reshape(1, x.size), y.reshape(1, rows)
        R = _I8_ROWS  # weight rows per tile (`cpu.DECODE_TILES`)
        for t in prange(rows // R):
            _i8_decode(w, X, Y, R * t, 0)
        for r in range(rows - rows % R, rows):
            _i1x1(w, X, Y, r, 0)
        _scale_rows(Y, scale, np.full(1, xscale, np.float32), b, 0, rows)

    @njit(parallel=True, **_exact)
    def _matmat_i8_tiled(w, scale, X, b, Y):
        """`matmat` for int8 W: a block of weight rows stays in L2 while 4 x 2 integer tiles
        pass over every two rows of X; each row equals `_matvec_i8_tiled` bit for bit."""
        x16, xscale = _quantize_rows_i16(X)
        rows, B = w.shape[0], X.shape[0]
        blk = _block_rows(rows, w.shape[1], 4)
        for t in prange((rows + blk - 1) // blk):
            lo, hi = t * blk, min(rows, (t + 1) * blk)
            full = hi - (hi - lo) % 4
            for j in range(0, B - B % 2, 2):
                for r in range(lo, full, 4):
                    _i4x2(w, x16, Y, r, j)
                for r in range(full, hi):
                    _i1x2(w, x16, Y, r, j)
            if B % 2:
                for r in range(lo, full, 4):
                    _i4x1(w, x16, Y, r, B - 1)
                for r in range(full, hi):
                    _i1x1(w, x16, Y, r, B - 1)
            _scale_rows(Y, scale, xscale, b, lo, hi)

    matvec_i8, matmat_i8 = _matvec_i8_tiled, _matmat_i8_tiled
else:
    matvec_i8, matmat_i8 = _matvec_i8_portable, _matmat_i8_portable


@njit(**_opts)
def _quantize_rows_groups_i8(X, group):
    """`quantize_groups_i8` of every row of X (B, in)."""
    B, n = X.shape[0], X.shape[1] // group
    xq = np.empty(X.shape, np.int8)
    xscale, xcorr = np.empty((B, n), np.float32), np.empty((B, n), np.float32)
    for j in range(B):
        q, s, c = quantize_groups_i8(X[j], group)
        xq[j], xscale[j], xcorr[j] = q, s, c
    return xq, xscale, xcorr


@njit(parallel=True, **_opts)
def _matmat_q4_portable(packed, scale, X, b, Y):
    """`matmat` for 4-bit W; each row as `_matvec_q4_portable`."""
    xq, xscale, xcorr = _quantize_rows_groups_i8(X, X.shape[1] // scale.shape[1])
    rows, B = packed.shape[0], X.shape[0]
    blk = _block_rows(rows, packed.shape[1] + 2 * scale.shape[1], 1)
    for t in prange((rows + blk - 1) // blk):
        cs = np.empty(scale.shape[1], np.float32)
        for j in range(B):
            xqj, xsj, xcj, y = xq[j], xscale[j], xcorr[j], Y[j]
            for r in range(t * blk, min(rows, (t + 1) * blk)):
                corr = _combined_scales(scale[r], xsj, xcj, cs)
                y[r] = _q4_row_dot(packed[r], xqj, cs) - corr + _bias(b, r)


@njit(**_opts)
def _quantize_groups_q4(X):
    """Every row of X (B, n) quantized per group of Q4_GROUP as `quantize_groups_i8` does:
    (int8 XQ (B, n), f32 XS (B, n/G), int32 XT (B, n/G) = 8 * the group's sum of XQ), the
    zero-point term kept in integers for `tile.tile_q4`."""
    B, n = X.shape
    ng = n // Q4_GROUP
    XQ = np.empty((B, n), np.int8)
    XS, XT = np.empty((B, ng), np.float32), np.empty((B, ng), np.int32)
    for j in range(B):
        for g in range(ng):
            m = np.float32(0.0)
            for k in range(g * Q4_GROUP, (g + 1) * Q4_GROUP):
                m = max(m, abs(X[j, k]))
            s = m / np.float32(127.0) if m > 0 else np.float32(1.0)
            inv = np.float32(1.0) / s
            t = np.int32(0)
            for k in range(g * Q4_GROUP, (g + 1) * Q4_GROUP):
                q = np.int32(np.rint(X[j, k] * inv))
                XQ[j, k] = q
                t += q
            XS[j, g], XT[j, g] = s, np.int32(8) * t
    return XQ, XS, XT


if ISA:
    _q4x1, _q1x1, _q4x2, _q1x2 = (tile_q4(R, J, ISA == "vnni") for R, J in
                                  ((4, 1), (1, 1), (4, 2), (1, 2)))
    _Q4_ROWS = DECODE_TILES["q4"][0]
    _q4_decode = tile_q4(_Q4_ROWS, 1, ISA == "vnni", DECODE_TILES["q4"][1])

    @njit(**_exact)
    def _tile_scales(scale, XS, r0, R, j0, J, CS):
        """CS[r * J + j, g] = scale[r0 + r, g] (bf16 bits or f32) * XS[j0 + j, g]: one product
        per (row, activation row, group), the same whichever tile uses it."""
        for r in range(R):
            for j in range(J):
                for g in range(scale.shape[1]):
                    CS[r * J + j, g] = as_f32(scale[r0 + r, g]) * XS[j0 + j, g]

    @njit(**_exact)
    def _q4_tiles(packed, scale, XQ, XS, XT, Y, lo, hi, j, J, CS):
        """Rows lo..hi of W against rows j..j+J of X (J <= 2), four weight rows per tile."""
        full = hi - (hi - lo) % 4
        for r in range(lo, full, 4):
            _tile_scales(scale, XS, r, 4, j, J, CS)
            if J == 2:
                _q4x2(packed, CS, XQ, XT, Y, r, j)
            else:
                _q4x1(packed, CS, XQ, XT, Y, r, j)
        for r in range(full, hi):
            _tile_scales(scale, XS, r, 1, j, J, CS)
            if J == 2:
                _q1x2(packed, CS, XQ, XT, Y, r, j)
            else:
                _q1x1(packed, CS, XQ, XT, Y, r, j)

    @njit(parallel=True, **_exact)
    def _matvec_q4_tiled(packed, scale, x, b, y):
        """y = W x + b for 4-bit W (groups of Q4_GROUP): x quantized per group,
        `cpu.DECODE_TILES` weight rows per integer tile (`tile.tile_q4`)."""
        XQ, XS, XT = _quantize_groups_q4(x.reshape(1, x.size))
        rows, ng = packed.shape[0], scale.shape[1]
        Y = y.reshape(1, rows)
        chunk = 64  # rows per parallel task (a multiple of 4), each with its scratch of scales
        for t in prange((rows + chunk - 1) // chunk):
            CS = np.empty((4, ng), np.float32)
            lo, hi = t * chunk, min(rows, (t + 1) * chunk)
            R = _Q4_ROWS  # weight rows per tile (`cpu.DECODE_TILES`)
            for r in range(lo, hi - (hi - lo) % R, R):
                _tile_scales(scale, XS, r, R, 0, 1, CS)
                _q4_decode(packed, CS, XQ, XT, Y, r, 0)
            for r in range(hi - (hi - lo) % R, hi):
                _tile_scales(scale, XS, r, 1, 0, 1, CS)
                _q1x1(packed, CS, XQ, XT, Y, r, 0)
        if b.size:
            for r in range(rows):
                y[r] += b[r]

    @njit(parallel=True, **_exact)
    def _matmat_q4_tiled(packed, scale, X, b, Y):
        """`matmat` for 4-bit W: 4 x 2 integer tiles over a block of weight rows kept in L2;
        each row equals `_matvec_q4_tiled` bit for bit."""
        XQ, XS, XT = _quantize_groups_q4(X)
        rows, B, ng = packed.shape[0], X.shape[0], scale.shape[1]
        blk = _block_rows(rows, packed.shape[1] + 2 * ng, 4)
        for t in prange((rows + blk - 1) // blk):
            lo, hi = t * blk, min(rows, (t + 1) * blk)
            CS = np.empty((8, ng), np.float32)
            for j in range(0, B, 2):
                _q4_tiles(packed, scale, XQ, XS, XT, Y, lo, hi, j, min(2, B - j), CS)
            if b.size:
                for j in range(B):
                    for r in range(lo, hi):
                        Y[j, r] += b[r]



def matvec_q4(packed, scale, x, b, y):
    """y = W x + b for 4-bit W (see the module docstring)."""
    if ISA and scale.shape[1] * Q4_GROUP == x.size:
        _matvec_q4_tiled(packed, scale, x, b, y)
    else:  # off x86, or another group size (not written by rgemma's quantizer)
        _matvec_q4_portable(packed, scale, x, b, y)


def matmat_q4(packed, scale, X, b, Y):
    """`matmat` for 4-bit W; each row as `matvec_q4`."""
    if ISA and scale.shape[1] * Q4_GROUP == X.shape[1]:
        _matmat_q4_tiled(packed, scale, X, b, Y)
    else:
        _matmat_q4_portable(packed, scale, X, b, Y)


@njit(parallel=True, **_opts)
def block_diagonal_rows(X, w, b, Y):
    """`block_diagonal_vec` for every row of X (B, H*bw_in) into Y (B, H*bw_out), each row bit
    for bit as `block_diagonal_vec` computes it alone."""
    H, n, m = w.shape
    for h in prange(H):
        for j in range(X.shape[0]):
            x, y = X[j], Y[j]  # 1-d views, sliced as `block_diagonal_vec` slices its arguments
            yh = y[h * m:(h + 1) * m]
            yh[:] = b[h]
            _vec_mat_acc(x[h * n:(h + 1) * n], w[h], yh)
