"""Widening stored weight elements to float32: the bf16 / f16 conversions every kernel inlines,
and the serial row-block widening (and int8 / 4-bit dequantization) that feeds sgemm in prefill.

Serial on purpose: during prefill OpenBLAS owns the cores
(docs/kernels.md#one-thread-pool-at-a-time). The formats are listed in `formats`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_opts = dict(cache=True, fastmath=True, nogil=True)

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


def _host_has_f16c() -> bool:
    from numba.core import config
    from .cpu import features
    return config.CPU_NAME in (None, "host") and features().get("f16c", False)


_F16C = _host_has_f16c()


def _f16_to_f32_ir(builder, h):
    """IEEE half bits (i16) -> float, in integer and float ops every target has (F. Giesen's
    half_to_float): LLVM lowers `fpext half` without F16C to a runtime-library call that Numba's
    JIT does not link (a segfault under NUMBA_CPU_NAME=generic). Exact for every half value."""
    i32 = ir.IntType(32)
    c = lambda v: ir.Constant(i32, v)  # noqa: E731
    h = builder.zext(h, i32)
    o = builder.shl(builder.and_(h, c(0x7FFF)), c(13))  # exponent and mantissa, in place
    e = builder.and_(o, c(0x0F800000))
    o = builder.add(o, c(0x38000000))  # exponent bias 15 -> 127
    o = builder.select(builder.icmp_unsigned("==", e, c(0x0F800000)), builder.add(o, c(0x38000000)), o)  # inf / nan
    # zero / subnormal: value = mantissa * 2^-24, made by a float subtraction
    sub = builder.fsub(builder.bitcast(builder.add(o, c(0x00800000)), ir.FloatType()),
                       builder.bitcast(c(0x38800000), ir.FloatType()))
    f = builder.select(builder.icmp_unsigned("==", e, c(0)), sub, builder.bitcast(o, ir.FloatType()))
    sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
    return builder.bitcast(builder.or_(builder.bitcast(f, i32), sign), ir.FloatType())


@intrinsic
def f16_bits_to_f32(typingctx, u):
    """IEEE half bits (uint16) -> float32: vcvtph2ps where the host has F16C, else integer ops."""
    if u != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        if _F16C:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return _f16_to_f32_ir(builder, args[0])

    return types.float32(types.uint16), codegen


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
