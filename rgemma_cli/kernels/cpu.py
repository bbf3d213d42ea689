"""CPU feature detection, and the hand-written LLVM IR of the 4-bit integer dot product that
uses what it finds (AVX-VNNI / AVX-512 VNNI `vpdpbusd`, else AVX2 `pmaddubsw` + `pmaddwd`).

`ISA` is decided once at import from the host's features as LLVM reports them: "" on non-x86
hosts, or when NUMBA_CPU_NAME asks for a generic target; then `matvec` uses its portable loop.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


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
