"""Register-blocked f32 dot tiles, hand-written in LLVM IR: R weight rows against J activation
rows at once, each (row, activation) pair with its own fixed sequence of operations.

`tile(R, J)` returns a Numba intrinsic `t(w, X, Y, r0, j0)` that stores Y[j0 + j, r0 + r] =
w[r0 + r] . X[j0 + j] for r < R, j < J, with w (rows, n) float32 or bf16 (uint16 bits) and X
(B, n), Y (B, rows) float32, all C-contiguous. One step of the loop loads J activation vectors
and R weight vectors (bf16 widened by a shift) and issues R * J fused multiply-adds, so the
weight bytes are read once for J rows and the activation bytes once for R rows: the batched
step's linear layers get the FMA throughput a dot-per-pair loop (two loads per FMA) cannot.

Batch invariance by construction: every pair accumulates in one 8-lane vector with `llvm.fma`
over i = 0, 8, 16, ... (no fast-math flags, so LLVM may not reorder anything), then sums the
lanes in order 0..7 and adds the n % 8 tail in order. That sequence does not depend on R, J or
the other pairs, so a row's result is bit for bit the same in a tile of any shape: the
one-sequence decode (`matvec`, J = 1) and the batched step (`matmat`, J = 2) agree exactly.
x86 only (`cpu.ISA`); elsewhere the kernels keep their compiler-vectorised loops.
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8  # f32 lanes of a 256-bit register


def _lane_sum(builder, v):
    """v[0] + v[1] + ... + v[7], added in that order (the fixed end of every pair's dot)."""
    i32 = ir.IntType(32)
    total = builder.extract_element(v, ir.Constant(i32, 0))
    for k in range(1, LANES):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(i32, k)))
    return total


def _signature(arrays, r0, j0):
    """The tiles' signature (arrays..., int64 r0, int64 j0) -> none, or None (no match) unless
    every array is a C-contiguous 2-d array of one of its dtypes: `arrays` = ((type, dtypes),
    ...). Read-only arrays (memory-mapped weights) match too."""
    for a, dtypes in arrays:
        if not (isinstance(a, types.Array) and a.dtype in dtypes and a.ndim == 2 and a.layout == "C"):
            return None
    if not (isinstance(r0, types.Integer) and isinstance(j0, types.Integer)):
        return None
    return types.none(*(a for a, _ in arrays), types.int64, types.int64)


def _prefetch_ahead(builder, data, at, span):
    """Software prefetches (into all cache levels) of the `span` bytes from byte offset `at`
    of `data`, one per 64-byte line: the next tile's weights, which follow this tile's in
    memory. A prefetch never faults, so the last tile may point past the array."""
    mod = builder.module
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    pf = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    base = builder.bitcast(data, i8p)
    for k in range(0, span, 64):
        p = builder.gep(base, [builder.add(at, ir.Constant(at.type, k))])
        builder.call(pf, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _unpack(context, builder, signature, args):
    """The array arguments as Numba array structs, then the tile's origin (r0, j0)."""
    k = len(args) - 2
    return ([context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:k], args[:k])],
            args[k], args[k + 1])


@functools.cache
def tile(R: int, J: int, prefetch: bool = False):
    """The R x J dot tile intrinsic (see the module docstring); built once per shape.
    `prefetch`: per 8 weights of each row, a software prefetch of the next R rows' matching
    bytes (the next tile's, contiguous after this one's; docs/kernels.md#decode-prefetch)."""

    @intrinsic
    def _tile(typingctx, w, X, Y, r0, j0):
        def codegen(context, builder, signature, args):
            mod = builder.module
            (wa, xa, ya), r0v, j0v = _unpack(context, builder, signature, args)
            i64, i32 = ir.IntType(64), ir.IntType(32)
            f32 = ir.FloatType()
            f32x8 = ir.VectorType(f32, LANES)
            bf16 = signature.args[0].dtype == types.uint16
            n = builder.extract_value(xa.shape, 1)
            wrow = builder.extract_value(wa.shape, 1)
            yrow = builder.extract_value(ya.shape, 1)
            fma8 = cgutils.get_or_insert_function(mod, ir.FunctionType(f32x8, [f32x8] * 3),
                                                  "llvm.fma.v8f32")
            wbase = [builder.mul(builder.add(r0v, ir.Constant(i64, r)), wrow) for r in range(R)]
            xbase = [builder.mul(builder.add(j0v, ir.Constant(i64, j)), n) for j in range(J)]
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
                     for _ in range(J)] for _ in range(R)]

            def load_w(r, i):  # 8 weights of row r from i, as f32
                p = builder.gep(wa.data, [builder.add(wbase[r], i)])
                if not bf16:
                    return builder.load(builder.bitcast(p, f32x8.as_pointer()), align=4)
                i16x8 = ir.VectorType(ir.IntType(16), LANES)
                v = builder.zext(builder.load(builder.bitcast(p, i16x8.as_pointer()), align=2),
                                 ir.VectorType(i32, LANES))
                v = builder.shl(v, ir.Constant(ir.VectorType(i32, LANES), [16] * LANES))
                return builder.bitcast(v, f32x8)

            def load_x(j, i):
                p = builder.gep(xa.data, [builder.add(xbase[j], i)])
                return builder.load(builder.bitcast(p, f32x8.as_pointer()), align=4)

            esize = 2 if bf16 else 4
            trips = builder.udiv(n, ir.Constant(i64, LANES))
            with cgutils.for_range(builder, trips) as loop:
                i = builder.mul(loop.index, ir.Constant(i64, LANES))
                if prefetch:
                    ahead = builder.add(builder.mul(builder.add(r0v, ir.Constant(i64, R)), wrow),
                                        builder.mul(i, ir.Constant(i64, R)))
                    _prefetch_ahead(builder, wa.data, builder.mul(ahead, ir.Constant(i64, esize)),
                                    max(64, R * LANES * esize))
                xs = [load_x(j, i) for j in range(J)]
                for r in range(R):
                    wv = load_w(r, i)
                    for j in range(J):
                        acc = accs[r][j]
                        builder.store(builder.call(fma8, [wv, xs[j], builder.load(acc)]), acc)
            done = builder.mul(trips, ir.Constant(i64, LANES))
            for r in range(R):
                for j in range(J):
                    total = cgutils.alloca_once_value(builder, _lane_sum(builder, builder.load(accs[r][j])))
                    with cgutils.for_range(builder, builder.sub(n, done)) as tail:
                        i = builder.add(done, tail.index)
                        wp = builder.gep(wa.data, [builder.add(wbase[r], i)])
                        if bf16:
                            wi = builder.bitcast(builder.shl(builder.zext(builder.load(wp), i32),
                                                             ir.Constant(i32, 16)), f32)
                        else:
                            wi = builder.load(wp)
                        xi = builder.load(builder.gep(xa.data, [builder.add(xbase[j], i)]))
                        builder.store(builder.fadd(builder.load(total), builder.fmul(wi, xi)), total)
                    yi = builder.add(builder.mul(builder.add(j0v, ir.Constant(i64, j)), yrow),
                                     builder.add(r0v, ir.Constant(i64, r)))
                    builder.store(builder.load(total), builder.gep(ya.data, [yi]))
            return context.get_dummy_value()

        sig = _signature(((w, (types.float32, types.uint16)), (X, (types.float32,)),
                          (Y, (types.float32,))), r0, j0)
        return None if sig is None else (sig, codegen)

    return _tile


I8_BLOCK = 256  # weights whose int32 partial sums are exact before going to float


@functools.cache
def tile_i8(R: int, J: int, vnni: bool, prefetch: bool = False):
    """The R x J tile of int8 weights against int16 activations: `t(w, X16, Y, r0, j0)` stores
    Y[j0 + j, r0 + r] = sum_i w[r0 + r, i] * X16[j0 + j, i] as float32, w (rows, n) int8, X16
    (B, n) int16, Y (B, rows) float32.

    Per 16 weights, one sign-extending load of each weight row and one load of each activation
    row, then R * J `vpmaddwd` (16 products summed in pairs into 8 int32 lanes; with VNNI one
    `vpdpwssd`, the add fused). Every pair sums each run of 256 weights exactly in int32 lanes
    (|sum| <= 256 * 127 * 32767 < 2**31), adds it to its f32 lanes, then sums the lanes in
    order and adds the n % 256 tail: a fixed sequence whatever R and J (integer sums are exact,
    so how the products are grouped cannot change them), hence batch invariance.

    `prefetch`: per 256 weights of each row, software prefetches of the next R rows' matching
    256 * R bytes (the next tile's, contiguous after this one's), so a tile whose rows are short
    (2560 bytes at the 2B width) still reads one stream well ahead of use (docs/kernels.md#decode-prefetch)."""

    @intrinsic
    def _tile(typingctx, w, X, Y, r0, j0):
        def codegen(context, builder, signature, args):
            mod = builder.module
            (wa, xa, ya), r0v, j0v = _unpack(context, builder, signature, args)
            i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
            i8x16, i16x16, i32x8 = (ir.VectorType(ir.IntType(b), c)
                                    for b, c in ((8, 16), (16, 16), (32, 8)))
            f32x8 = ir.VectorType(f32, LANES)
            n = builder.extract_value(xa.shape, 1)
            wrow = builder.extract_value(wa.shape, 1)
            yrow = builder.extract_value(ya.shape, 1)
            if vnni:
                dp = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i32x8] * 3),
                                                    "llvm.x86.avx512.vpdpwssd.256")
            else:
                mwd = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i16x16] * 2),
                                                     "llvm.x86.avx2.pmadd.wd")
            wbase = [builder.mul(builder.add(r0v, ir.Constant(i64, r)), wrow) for r in range(R)]
            xbase = [builder.mul(builder.add(j0v, ir.Constant(i64, j)), n) for j in range(J)]
            faccs = [[cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
                      for _ in range(J)] for _ in range(R)]
            iaccs = [[cgutils.alloca_once(builder, i32x8) for _ in range(J)] for _ in range(R)]

            blocks = builder.udiv(n, ir.Constant(i64, I8_BLOCK))
            with cgutils.for_range(builder, blocks) as blk:
                for r in range(R):
                    for j in range(J):
                        builder.store(ir.Constant(i32x8, None), iaccs[r][j])
                base = builder.mul(blk.index, ir.Constant(i64, I8_BLOCK))
                if prefetch:
                    _prefetch_ahead(builder, wa.data,
                                    builder.add(builder.mul(builder.add(r0v, ir.Constant(i64, R)), wrow),
                                                builder.mul(base, ir.Constant(i64, R))), I8_BLOCK * R)
                with cgutils.for_range(builder, ir.Constant(i64, I8_BLOCK // 16)) as inner:
                    i = builder.add(base, builder.mul(inner.index, ir.Constant(i64, 16)))
                    xs = [builder.load(builder.bitcast(builder.gep(xa.data, [builder.add(xbase[j], i)]),
                                                       i16x16.as_pointer()), align=2) for j in range(J)]
                    for r in range(R):
                        wv = builder.load(builder.bitcast(builder.gep(wa.data, [builder.add(wbase[r], i)]),
                                                          i8x16.as_pointer()), align=1)
                        wv = builder.sext(wv, i16x16)
                        for j in range(J):
                            a = builder.load(iaccs[r][j])
                            if vnni:
                                a = builder.call(dp, [a, builder.bitcast(wv, i32x8),
                                                      builder.bitcast(xs[j], i32x8)])
                            else:
                                a = builder.add(a, builder.call(mwd, [wv, xs[j]]))
                            builder.store(a, iaccs[r][j])
                for r in range(R):
                    for j in range(J):
                        builder.store(builder.fadd(builder.load(faccs[r][j]),
                                                   builder.sitofp(builder.load(iaccs[r][j]), f32x8)),
                                      faccs[r][j])
            done = builder.mul(blocks, ir.Constant(i64, I8_BLOCK))
            for r in range(R):
                for j in range(J):
                    total = _lane_sum(builder, builder.load(faccs[r][j]))
                    tail = cgutils.alloca_once_value(builder, ir.Constant(i32, 0))
                    with cgutils.for_range(builder, builder.sub(n, done)) as loop:
                        i = builder.add(done, loop.index)
                        p = builder.mul(
                            builder.sext(builder.load(builder.gep(wa.data, [builder.add(wbase[r], i)])), i32),
                            builder.sext(builder.load(builder.gep(xa.data, [builder.add(xbase[j], i)])), i32))
                        builder.store(builder.add(builder.load(tail), p), tail)
                    total = builder.fadd(total, builder.sitofp(builder.load(tail), f32))
                    yi = builder.add(builder.mul(builder.add(j0v, ir.Constant(i64, j)), yrow),
                                     builder.add(r0v, ir.Constant(i64, r)))
                    builder.store(total, builder.gep(ya.data, [yi]))
            return context.get_dummy_value()

        sig = _signature(((w, (types.int8,)), (X, (types.int16,)), (Y, (types.float32,))), r0, j0)
        return None if sig is None else (sig, codegen)

    return _tile


Q4_GROUP = 64  # 4-bit weights per group: 32 packed bytes, one 256-bit register


@functools.cache
def tile_q4(R: int, J: int, vnni: bool, prefetch: bool = False):
    """The R x J tile of 4-bit weights against int8 activations quantized per group:
    `t(packed, CS, XQ, XT, Y, r0, j0)` stores Y[j0 + j, r0 + r] = W[r0 + r] . x_j, with packed
    (rows, n/2) uint8 (in each group of 64, byte k holds weight k in its low nibble and weight
    k + 32 in its high one), w = (nibble - 8) * scale; CS (R * J, n/64) float32, row r * J + j
    = the weight row's group scales times x_j's (one product each, made by the caller); XQ (B,
    n) int8 (x = XQ * its group scale); XT (B, n/64) int32 = 8 * the sum of XQ over each group
    (the zero point, subtracted exactly in integers).

    Per group and pair: the integer dot of nibbles and XQ (AVX2 `vpmaddubsw` + `vpmaddwd`;
    VNNI `vpdpbusd`), minus XT in lane 0, converted to f32 and multiplied into one 8-lane
    accumulator by the broadcast scale (one `llvm.fma`); the lanes are summed in order at the
    end. The nibbles of a weight row are unpacked once for all J activation rows. As `tile`,
    the sequence per pair does not depend on R or J: batch invariance by construction.
    `prefetch`: as `tile_i8`'s, per group (the next R rows' 32 * R bytes)."""

    @intrinsic
    def _tile(typingctx, packed, CS, XQ, XT, Y, r0, j0):
        def codegen(context, builder, signature, args):
            mod = builder.module
            (pa, ca, qa, xta, ya), r0v, j0v = _unpack(context, builder, signature, args)
            i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
            i8x32, i16x16, i32x8 = (ir.VectorType(ir.IntType(b), c)
                                    for b, c in ((8, 32), (16, 16), (32, 8)))
            f32x8 = ir.VectorType(f32, LANES)
            prow = builder.extract_value(pa.shape, 1)
            ngroups = builder.extract_value(ca.shape, 1)
            n = builder.extract_value(qa.shape, 1)
            yrow = builder.extract_value(ya.shape, 1)
            fma8 = cgutils.get_or_insert_function(mod, ir.FunctionType(f32x8, [f32x8] * 3),
                                                  "llvm.fma.v8f32")
            if vnni:
                dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i32x8] * 3),
                                                        "llvm.x86.avx512.vpdpbusd.256")
            else:
                mub = cgutils.get_or_insert_function(mod, ir.FunctionType(i16x16, [i8x32, i8x32]),
                                                     "llvm.x86.avx2.pmadd.ub.sw")
                mwd = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i16x16, i16x16]),
                                                     "llvm.x86.avx2.pmadd.wd")
            rows_ = [builder.add(r0v, ir.Constant(i64, r)) for r in range(R)]
            cols_ = [builder.add(j0v, ir.Constant(i64, j)) for j in range(J)]
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
                     for _ in range(J)] for _ in range(R)]

            def at(arr, row, width, col):
                return builder.gep(arr.data, [builder.add(builder.mul(row, width), col)])

            def load32(ptr):
                return builder.load(builder.bitcast(ptr, i8x32.as_pointer()), align=1)

            with cgutils.for_range(builder, ngroups) as loop:
                g = loop.index
                if prefetch:
                    _prefetch_ahead(builder, pa.data,
                                    builder.add(builder.mul(builder.add(r0v, ir.Constant(i64, R)), prow),
                                                builder.mul(g, ir.Constant(i64, R * Q4_GROUP // 2))),
                                    R * Q4_GROUP // 2)
                xo = builder.mul(g, ir.Constant(i64, Q4_GROUP))
                xs = [(load32(at(qa, c, n, xo)),
                       load32(at(qa, c, n, builder.add(xo, ir.Constant(i64, Q4_GROUP // 2)))),
                       builder.insert_element(ir.Constant(i32x8, None),
                                              builder.load(at(xta, c, ngroups, g)),
                                              ir.Constant(i32, 0))) for c in cols_]
                for r in range(R):
                    b = load32(at(pa, rows_[r], prow, builder.mul(g, ir.Constant(i64, Q4_GROUP // 2))))
                    lo = builder.and_(b, ir.Constant(i8x32, [15] * 32))
                    hi = builder.lshr(b, ir.Constant(i8x32, [4] * 32))
                    for j in range(J):
                        x0, x1, xt = xs[j]
                        if vnni:
                            d = builder.call(dpbusd, [ir.Constant(i32x8, None), builder.bitcast(lo, i32x8),
                                                      builder.bitcast(x0, i32x8)])
                            d = builder.call(dpbusd, [d, builder.bitcast(hi, i32x8), builder.bitcast(x1, i32x8)])
                        else:
                            s16 = builder.add(builder.call(mub, [lo, x0]), builder.call(mub, [hi, x1]))
                            d = builder.call(mwd, [s16, ir.Constant(i16x16, [1] * 16)])
                        d = builder.sub(d, xt)
                        cs = builder.load(at(ca, ir.Constant(i64, r * J + j), ngroups, g))
                        csv = builder.insert_element(ir.Constant(f32x8, None), cs, ir.Constant(i32, 0))
                        csv = builder.shuffle_vector(csv, csv, ir.Constant(ir.VectorType(i32, 8), [0] * 8))
                        acc = accs[r][j]
                        builder.store(builder.call(fma8, [builder.sitofp(d, f32x8), csv,
                                                          builder.load(acc)]), acc)
            for r in range(R):
                for j in range(J):
                    builder.store(_lane_sum(builder, builder.load(accs[r][j])),
                                  at(ya, cols_[j], yrow, rows_[r]))
            return context.get_dummy_value()

        sig = _signature(((packed, (types.uint8,)), (CS, (types.float32,)), (XQ, (types.int8,)),
                          (XT, (types.int32,)), (Y, (types.float32,))), r0, j0)
        return None if sig is None else (sig, codegen)

    return _tile
