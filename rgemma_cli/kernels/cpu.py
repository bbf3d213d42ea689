"""CPU feature detection, and the hand-written LLVM IR of the integer dot products that use
what it finds: int8 x int16 (`vpdpwssd` with AVX-VNNI / AVX-512 VNNI, else AVX2 `vpmaddwd`) and
4-bit x int8 (`vpdpbusd`, else AVX2 `pmaddubsw` + `pmaddwd`). `describe()` and `variant()`
name what this CPU gets (`rgemma bench --quick`).

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

# The features the kernels care about, in LLVM's names (what `features()` reports)
KERNEL_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                   "avxvnni", "avx512bf16", "amx-tile", "amx-int8", "amx-bf16")


def features() -> dict:
    """{feature: bool} for KERNEL_FEATURES on this host as LLVM sees them ({} off x86 or when
    the query fails). What Numba compiles for, unless NUMBA_CPU_NAME overrides it."""
    try:
        from llvmlite import binding
        f = binding.get_host_cpu_features()
        return {k: bool(f.get(k, False)) for k in KERNEL_FEATURES}
    except Exception:
        return {}


def cpu_model() -> str:
    """The CPU's marketing name and, on x86 Linux, its family and model numbers (the AMD EPYC
    of the Zen 3 and Zen 5 generations share a name; family 25 is Zen 3/4, 26 is Zen 5)."""
    import platform
    name, fam, model = "", "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k in ("model name", "Model", "Hardware") and not name:
                    name = v
                elif k == "cpu family" and not fam:
                    fam = v
                elif k == "model" and not model:
                    model = v
                elif not line.strip() and name:
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    try:
        from llvmlite import binding
        llvm = binding.get_host_cpu_name()
    except Exception:
        llvm = ""
    detail = ", ".join(x for x in (f"family {fam} model {model}" if fam else "",
                                   f"LLVM: {llvm}" if llvm else "") if x)
    return f"{name} ({detail})" if detail else name


def describe() -> str:
    """One line for people: the CPU, the kernel-relevant features it has and lacks, the
    target Numba compiles for, and whether AMX could be used."""
    import os
    from numba.core import config
    f = features()
    have = [k for k, v in f.items() if v]
    lack = [k for k, v in f.items() if not v]
    target = config.CPU_NAME or "host"
    line = f"{cpu_model()}, {os.cpu_count()} CPUs; has: {' '.join(have) or 'none of the x86 ones'}"
    if lack and have:
        line += f"; lacks: {' '.join(lack)}"
    if target != "host":
        line += f"; NUMBA_CPU_NAME={target}: portable loops, no host-specific kernels"
    if f.get("amx-tile"):
        line += f"; AMX tile state {'granted' if amx_permitted() else 'refused'} by the OS (no AMX kernel yet)"
    return line


def variant(fmt: str) -> str:
    """The decode (matrix-vector) kernel this CPU runs for weight format `fmt` ("f32",
    "bf16", "f16", "int8", "q4"), for `rgemma bench --quick`."""
    f = features()
    simd = ("avx512" if f.get("avx512f") else "avx2") if ISA else "portable"
    if fmt in ("f32", "bf16", "f16"):
        widen = {"f32": "", "bf16": "bf16 -> f32 by shift, ", "f16": "f16 -> f32 (vcvtph2ps), "}[fmt]
        return f"{widen}f32 fma, compiler-vectorised ({simd})"
    if fmt == "int8":
        if ISA == "vnni":
            return "int8 x int16 vpdpwssd, 256-bit (vnni), f32 per 256"
        if ISA == "avx2":
            return "int8 x int16 vpmovsxbw + vpmaddwd, 256-bit (avx2)"
        return "int8 x int16 integer dot, portable loop"
    if fmt == "q4":
        if ISA == "vnni":
            return "4-bit x int8/group vpdpbusd, 256-bit (vnni)"
        if ISA == "avx2":
            return "4-bit x int8/group vpmaddubsw + vpmaddwd (avx2)"
        return "4-bit x int8/group integer dot, portable loop"
    raise ValueError(f"unknown weight format {fmt!r}")


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_arch_prctl = 0x1023, 18, 158
_amx = None


def amx_permitted() -> bool:
    """Ask Linux (once) for the AMX tile data state this process needs before any AMX
    instruction (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), Linux >= 5.16); False on
    CPUs without AMX, other systems, or a refusal, so a caller falls back to another kernel.
    rgemma has no AMX kernel yet (none could be tested on the machines at hand); this is what
    one must check first. Untested on AMX hardware."""
    global _amx
    if _amx is None:
        _amx = False
        import platform
        import sys
        if features().get("amx-tile") and sys.platform == "linux" and platform.machine() == "x86_64":
            try:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                _amx = libc.syscall(_SYS_arch_prctl, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
            except (OSError, AttributeError):
                _amx = False
    return _amx


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


_I8_BLOCK = 256  # weights whose int32 partial sums are summed exactly before going to float


@intrinsic
def _i8_row_dot_x86(typingctx, w, x16):
    """sum_i w[i] * x16[i] for int8 w and int16 x16 as float32, in 256-bit integer dots: per 16
    weights one sign-extending load (vpmovsxbw) and one vpmaddwd (with AVX-VNNI / AVX512-VNNI,
    one vpdpwssd, the add fused), four independent accumulators. Each run of 256 weights is
    summed exactly in int32 lanes (|sum| <= 256 * 127 * 32767 < 2**31) and then added into an
    f32 vector accumulator. LLVM's own vectorisation of the portable loop used 128-bit
    registers on Zen 3 (half the dots per instruction): ~20 -> ~40 GB/s per core in L2."""
    def codegen(context, builder, signature, args):
        mod = builder.module
        wp, xp = (context.make_array(t)(context, builder, a).data
                  for t, a in zip(signature.args, args))
        n = builder.extract_value(context.make_array(signature.args[0])(context, builder, args[0]).shape, 0)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        i8x16, i16x16, i32x8 = (ir.VectorType(ir.IntType(b), c) for b, c in ((8, 16), (16, 16), (32, 8)))
        f32x8 = ir.VectorType(ir.FloatType(), 8)
        if ISA == "vnni":
            dp = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i32x8] * 3),
                                                "llvm.x86.avx512.vpdpwssd.256")
        else:
            mwd = cgutils.get_or_insert_function(mod, ir.FunctionType(i32x8, [i16x16, i16x16]),
                                                 "llvm.x86.avx2.pmadd.wd")
        facc = cgutils.alloca_once_value(builder, ir.Constant(f32x8, None))
        iaccs = [cgutils.alloca_once(builder, i32x8) for _ in range(4)]

        def step(i, acc):  # acc += pairwise dots of w[i:i+16], x16[i:i+16]
            wv = builder.load(builder.bitcast(builder.gep(wp, [i]), i8x16.as_pointer()), align=1)
            xv = builder.load(builder.bitcast(builder.gep(xp, [i]), i16x16.as_pointer()), align=1)
            wv = builder.sext(wv, i16x16)
            a = builder.load(acc)
            if ISA == "vnni":
                a = builder.call(dp, [a, builder.bitcast(wv, i32x8), builder.bitcast(xv, i32x8)])
            else:
                a = builder.add(a, builder.call(mwd, [wv, xv]))
            builder.store(a, acc)

        blocks = builder.udiv(n, ir.Constant(i64, _I8_BLOCK))
        with cgutils.for_range(builder, blocks) as blk:
            for acc in iaccs:
                builder.store(ir.Constant(i32x8, None), acc)
            base = builder.mul(blk.index, ir.Constant(i64, _I8_BLOCK))
            with cgutils.for_range(builder, ir.Constant(i64, _I8_BLOCK // 64)) as inner:
                off = builder.add(base, builder.mul(inner.index, ir.Constant(i64, 64)))
                for u, acc in enumerate(iaccs):
                    step(builder.add(off, ir.Constant(i64, 16 * u)), acc)
            s = builder.add(builder.add(builder.load(iaccs[0]), builder.load(iaccs[1])),
                            builder.add(builder.load(iaccs[2]), builder.load(iaccs[3])))
            builder.store(builder.fadd(builder.load(facc), builder.sitofp(s, f32x8)), facc)
        v = builder.load(facc)
        total = builder.extract_element(v, ir.Constant(i32, 0))
        for k in range(1, 8):
            total = builder.fadd(total, builder.extract_element(v, ir.Constant(i32, k)))
        # the last n % 256 weights, one at a time (a 2B model's widths are multiples of 256)
        tail = cgutils.alloca_once_value(builder, ir.Constant(i32, 0))
        done = builder.mul(blocks, ir.Constant(i64, _I8_BLOCK))
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            i = builder.add(done, loop.index)
            p = builder.mul(builder.sext(builder.load(builder.gep(wp, [i])), i32),
                            builder.sext(builder.load(builder.gep(xp, [i])), i32))
            builder.store(builder.add(builder.load(tail), p), tail)
        return builder.fadd(total, builder.sitofp(builder.load(tail), ir.FloatType()))

    for a, dt in ((w, types.int8), (x16, types.int16)):  # (read-only memory maps are fine)
        if not (isinstance(a, types.Array) and a.dtype == dt and a.ndim == 1 and a.layout == "C"):
            return None  # contiguous rows only: the loads step through memory
    return types.float32(w, x16), codegen
