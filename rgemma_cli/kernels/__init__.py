"""The Numba kernels, grouped by what they compute.

    sequence  the two sequential parts of Griffin: the RG-LRU scan and local attention
    matvec    decode: weight-streaming matrix-vector products, one per weight format
    widen     bf16 / f16 -> f32 conversions, and prefill's serial widening / dequantization
    cpu       CPU feature detection and the hand-written LLVM IR of the 4-bit integer dot

Kernels take and return plain NumPy arrays; which kernel serves which stored weight is decided
in `rgemma_cli.formats`. Notes on why they are written as they are: docs/kernels.md.
"""

from . import jitcache

jitcache.choose()  # before any kernel is defined: a writable cache, or none (one warning)
