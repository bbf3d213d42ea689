"""CPU feature detection: which instructions the hand-written kernels (`tile.py`) may use on
this host: int8 x int16 `vpdpwssd` (AVX-VNNI / AVX-512 VNNI) or AVX2 `vpmaddwd`, 4-bit x int8
`vpdpbusd` or AVX2 `pmaddubsw` + `pmaddwd`. `describe()` and `variant()` name what this CPU
gets (`rgemma bench --quick`).

`ISA` is decided once at import from the host's features as LLVM reports them: "" on non-x86
hosts, or when NUMBA_CPU_NAME asks for a generic target; then `matvec` uses its portable loop.
"""

from __future__ import annotations



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

# The decode (B = 1) tiles per weight format: (weight rows per tile, whether each tile
# prefetches the next tile's rows). On AVX2 hosts: measured on the Zen 3 (2026-11-30,
# docs/kernels.md#decode-prefetch), where 4-row tiles without prefetch read four short streams
# at once (a 2B row is 5120 bf16 bytes, 2560 int8, 1280 packed 4-bit) that the hardware
# prefetcher followed poorly: int8 streamed 0.67 of the read probe, 4-bit 0.42, bf16 0.78;
# with these choices 0.77, 0.75 and 0.83 (medians, 2 threads, `bench/decode_tiles.py`). The AVX-512
# machines keep the 4-row tiles measured there (Zen 5: 0.88 of the ceiling in int8) until
# `bench/decode_tiles.py` has been run on them. Every choice gives the same bits.
DECODE_TILES = ({"f32": (4, False), "bf16": (2, True), "int8": (1, True), "q4": (2, True)}
                if ISA == "avx2" else
                {"f32": (4, False), "bf16": (4, False), "int8": (4, False), "q4": (4, False)})

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
    if fmt == "f16" or (fmt in ("f32", "bf16") and not ISA):
        widen = {"f32": "", "bf16": "bf16 -> f32 by shift, ", "f16": "f16 -> f32 (vcvtph2ps), "}[fmt]
        return f"{widen}f32 fma, compiler-vectorised ({simd})"
    rows, prefetch = DECODE_TILES.get(fmt, (4, False))
    tiles = (f"{rows}-row register tiles" + (", each prefetching the next" if prefetch else "")
             + " (batched: 4 x 2)")
    if fmt in ("f32", "bf16"):
        widen = {"f32": "", "bf16": "bf16 -> f32 by shift, "}[fmt]
        return f"{widen}256-bit llvm.fma, {tiles} ({simd})"
    if fmt == "int8":
        if ISA == "vnni":
            return f"int8 x int16 vpdpwssd, 256-bit, {tiles} (vnni)"
        if ISA == "avx2":
            return f"int8 x int16 vpmovsxbw + vpmaddwd, 256-bit, {tiles} (avx2)"
        return "int8 x int16 integer dot, portable loop"
    if fmt == "q4":
        if ISA == "vnni":
            return f"4-bit x int8/group vpdpbusd, {tiles} (vnni)"
        if ISA == "avx2":
            return f"4-bit x int8/group vpmaddubsw + vpmaddwd, {tiles} (avx2)"
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
