"""Numba kernels for the linear layers: weight-streaming matrix-vector products (decode) and
serial row-block widening into a reused f32 buffer (prefill, followed by sgemm).

Decoding reads every weight once per token, so these kernels are bound by memory bandwidth.
What makes them fast (see perf-notes): the per-row reduction lives in a small @njit helper called
on the row view (an inline reduction in a prange body is not vectorised), bf16 and f16 are widened
to f32 in registers by tiny LLVM intrinsics, and accumulation is f32 with fastmath so LLVM keeps
several vector accumulators.

Weight formats (all `(out, in)`, rows contiguous):
  f32            float32
  bf16 / f16     uint16 bits
  int8           int8 q, f32 scale (out,):             w = q * scale[r]
  4-bit          uint8 (out, in/2), bf16 (uint16 bits) or f32 scale (out, in/G):
                 w = (nibble - 8) * scale[r, g]; in each group of G weights, byte j holds weight j
                 (low nibble) and weight j + G/2 (high).
Quantized weights use integer dot products: the int8 kernel quantises x to int16 (one scale per
vector), the 4-bit kernel to int8 per group (see `matvec_i8`, `matvec_q4`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# -- scalar conversions, inlined into the vectorised loops -----------------------------------


@intrinsic
def bf16_bits_to_f32(typingctx, u):
    """bfloat16 bits (uint16) -> float32: zext, shift into the top half, bitcast."""
    if u != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        v = builder.zext(args[0], ir.IntType(32))
        v = builder.shl(v, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f16_bits_to_f32(typingctx, u):
    """IEEE half bits (uint16) -> float32 (vcvtph2ps)."""
    if u != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# -- one row: small helpers so that LLVM vectorises the reduction ----------------------------

_opts = dict(cache=True, fastmath=True, nogil=True)


def as_f32(v):
    """A stored weight element as float32: float32 as is, uint16 as bfloat16 bits."""
    return np.float32(v)


@overload(as_f32, inline="always")
def _as_f32(v):
    if v == types.uint16:
        return lambda v: bf16_bits_to_f32(v)
    if v == types.float32:
        return lambda v: v
    return None


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
def _dot_i8(w, x16):
    """Integer dot of int8 weights with int16 activations: int32 sums over runs of 256 (cannot
    overflow: 256 * 127 * 32767 < 2**31), which LLVM turns into vpmaddwd; ~1.4x the f32 path."""
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


def _isa() -> str:
    """Which integer-dot instructions the host has: "vnni", "avx2" or "" (portable loop)."""
    try:
        from llvmlite import binding
        from numba.core import config
        if config.CPU_NAME not in (None, "host"):  # NUMBA_CPU_NAME=generic etc.: no host ISA
            return ""
        f = binding.get_host_cpu_features()
        if f.get("avx512vnni") and f.get("avx512vl"):
            return "vnni"
        if f.get("avxvnni"):
            return "vnni"
        if f.get("avx2"):
            return "avx2"
    except Exception:  # non-x86 hosts or an llvmlite without feature queries
        pass
    return ""


ISA = _isa()
Q4_GROUP = 64  # weights per 4-bit group: 32 packed bytes, one 256-bit register


def _q4_group_dot_ir(builder, mod, b, x0, x1):
    """<8 x i32> partial sums of nibbles(b) . (x0, x1) for one group (x86 only)."""
    i8x32, i16x16, i32x8 = (ir.VectorType(ir.IntType(n), c) for n, c in ((8, 32), (16, 16), (32, 8)))
    lo = builder.and_(b, ir.Constant(i8x32, [15] * 32))
    hi = builder.lshr(b, ir.Constant(i8x32, [4] * 32))
    if ISA == "vnni":  # u8 x s8, four products summed into each i32 lane
        fn = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i32x8] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        d = builder.call(fn, [ir.Constant(i32x8, None), builder.bitcast(lo, i32x8),
                              builder.bitcast(x0, i32x8)])
        return builder.call(fn, [d, builder.bitcast(hi, i32x8), builder.bitcast(x1, i32x8)])
    # AVX2: u8 x s8 -> i16 pair sums (|15 * 127 * 2| cannot saturate), then i16 pairs -> i32
    mub = cgutils.get_or_insert_function(mod, ir.FunctionType(i16x16, [i8x32, i8x32]),
                                         "llvm.x86.avx2.pmadd.ub.sw")
    mwd = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i16x16, i16x16]),
                                         "llvm.x86.avx2.pmadd.wd")
    s16 = builder.add(builder.call(mub, [lo, x0]), builder.call(mub, [hi, x1]))
    return builder.call(mwd, [s16, ir.Constant(i16x16, [1] * 16)])


_Q4_UNROLL = 4  # groups per loop trip, each with its own accumulator: with one, every group
# waited on the previous group's add (~10% slower on one thread, cache-resident)


@intrinsic
def _q4_row_dot_x86(typingctx, row, xq, cs):
    """sum_g cs[g] * (nibbles of group g . xq of group g), x86 SIMD; cs[g] (f32) is the
    row's scale times x's scale for group g (`_combined_scales`), so each group costs one
    broadcast load besides its integer dot."""
    def codegen(context, builder, signature, args):
        mod = builder.module
        rowp, xqp, csp = (context.make_array(t)(context, builder, a).data
                          for t, a in zip(signature.args, args))
        nshape = context.make_array(signature.args[2])(context, builder, args[2]).shape
        ngroups = builder.extract_value(nshape, 0)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        i8x32 = ir.VectorType(ir.IntType(8), 32)
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        fma = ("contract",)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(f32x8, None)) for _ in range(_Q4_UNROLL)]

        def load32(p, g, stride, offset):
            q = builder.gep(p, [builder.add(builder.mul(g, ir.Constant(i64, stride)), ir.Constant(i64, offset))])
            return builder.load(builder.bitcast(q, i8x32.as_pointer()), align=1)

        def group(g, acc):  # acc += (group g's integer dot) * cs[g]
            d = _q4_group_dot_ir(builder, mod, load32(rowp, g, 32, 0), load32(xqp, g, 64, 0),
                                 load32(xqp, g, 64, 32))
            s = builder.load(builder.gep(csp, [g]))
            sv = builder.insert_element(ir.Constant(f32x8, None), s, ir.Constant(i32, 0))
            sv = builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(i32, 8), [0] * 8))
            prod = builder.fmul(builder.sitofp(d, f32x8), sv, flags=fma)
            builder.store(builder.fadd(builder.load(acc), prod, flags=fma), acc)

        trips = builder.udiv(ngroups, ir.Constant(i64, _Q4_UNROLL))
        with cgutils.for_range(builder, trips) as loop:
            base = builder.mul(loop.index, ir.Constant(i64, _Q4_UNROLL))
            for u, acc in enumerate(accs):
                group(builder.add(base, ir.Constant(i64, u)), acc)
        done = builder.mul(trips, ir.Constant(i64, _Q4_UNROLL))
        with cgutils.for_range(builder, builder.sub(ngroups, done)) as loop:
            group(builder.add(done, loop.index), accs[0])
        v = builder.load(accs[0])
        for acc in accs[1:]:
            v = builder.fadd(v, builder.load(acc))
        total = builder.extract_element(v, ir.Constant(i32, 0))
        for k in range(1, 8):
            total = builder.fadd(total, builder.extract_element(v, ir.Constant(i32, k)))
        return total

    return types.float32(row, xq, cs), codegen


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


if ISA:
    @njit(**_opts)
    def _q4_row_dot(row, xq, cs):
        return _q4_row_dot_x86(row, xq, cs)
else:
    _q4_row_dot = _q4_row_dot_portable


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
def matvec(w, x, b, y):
    """y = W x + b for f32 or bf16 (uint16 bits) W (b empty: no bias)."""
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
def matvec_i8(w, scale, x, b, y):
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
def matvec_q4(packed, scale, x, b, y):
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


# -- prefill: widen a block of rows into a reused f32 buffer (serial: BLAS owns the cores) ----


@njit(**_opts)
def widen_bf16(w, out):
    for r in range(w.shape[0]):
        src, dst = w[r], out[r]
        for i in range(src.size):
            dst[i] = bf16_bits_to_f32(src[i])


@njit(**_opts)
def widen_f16(w, out):
    for r in range(w.shape[0]):
        src, dst = w[r], out[r]
        for i in range(src.size):
            dst[i] = f16_bits_to_f32(src[i])


@njit(**_opts)
def dequant_i8(w, scale, out):
    for r in range(w.shape[0]):
        src, dst, s = w[r], out[r], scale[r]
        for i in range(src.size):
            dst[i] = np.float32(src[i]) * s


@njit(**_opts)
def dequant_q4(packed, scale, group, out):
    half = group // 2
    for r in range(packed.shape[0]):
        src, dst = packed[r], out[r]
        for g in range(scale.shape[1]):
            s = as_f32(scale[r, g])
            for j in range(half):
                b = src[g * half + j]
                dst[g * group + j] = np.float32(np.int32(b & 15) - 8) * s
                dst[g * group + half + j] = np.float32(np.int32(b >> 4) - 8) * s
