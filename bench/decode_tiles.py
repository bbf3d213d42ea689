"""Which decode tile shape streams fastest on this CPU: every candidate side by side in one process.

    .venv/bin/python bench/decode_tiles.py [--rounds 30]

For bf16, int8 and 4-bit weights of the 2B MLP shape (7680 x 2560; copies cycled so that nothing
stays in cache), times y = W x with R weight rows per register tile (R = 4, 2, 1), with and
without software prefetch of the next tile's rows, interleaved round by round with the read
probe `rgemma bench` uses. Prints GB/s best / median, 1 and 2 threads, and the median fraction of
the probe. x86 only (the tiles are x86 intrinsics). What `cpu.DECODE_TILES` picks per CPU family
comes from this table (docs/kernels.md#decode-prefetch).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from rgemma_cli.kernels import cpu
from rgemma_cli.kernels import matvec as mv
from rgemma_cli.kernels.tile import tile, tile_i8, tile_q4
from rgemma_cli.selfcheck import ReadProbe

ROWS, N = 7680, 2560
SHAPES = ((4, False), (4, True), (2, True), (1, True))  # (rows per tile, prefetch)


@njit
def _as_row(x):
    return x.reshape(1, x.size)


@njit
def _as_int16_row(x):
    return mv.quantize_i16(x)[0].reshape(1, x.size)


def _rows_kernel(t, R, prepare):
    """y = W x with tile t (R rows x 1), x made the tile's activation row by `prepare`."""
    @njit(parallel=True, nogil=True)
    def run(w, x, y):
        X = prepare(x)
        for k in prange(w.shape[0] // R):
            t(w, X, y.reshape(1, y.size), R * k, 0)
    return run


def _float_kernel(R, pf):
    return _rows_kernel(tile(R, 1, pf), R, _as_row)


def _int8_kernel(R, pf):
    return _rows_kernel(tile_i8(R, 1, cpu.ISA == "vnni", pf), R, _as_int16_row)


def _q4_kernel(R, pf):
    t = tile_q4(R, 1, cpu.ISA == "vnni", pf)

    @njit(parallel=True, nogil=True)
    def run(w, x, y):
        packed, scale = w
        XQ, XS, XT = mv._quantize_groups_q4(x.reshape(1, x.size))
        rows = packed.shape[0]
        for c in prange(rows // 64):
            CS = np.empty((R, scale.shape[1]), np.float32)
            for r in range(64 * c, 64 * c + 64, R):
                mv._tile_scales(scale, XS, r, R, 0, 1, CS)
                t(packed, CS, XQ, XT, y.reshape(1, rows), r, 0)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    if not cpu.ISA:
        raise SystemExit("error: the register tiles are x86 kernels; this CPU runs the portable loops")
    rng = np.random.default_rng(0)
    copies = 4  # bf16 4 x 39 MB, int8 8 x 20 MB, 4-bit 12 x 10 MB: ~4x a 32 MB L3
    weights = {
        "bf16": [rng.integers(0x3c00, 0x3d00, (ROWS, N)).astype(np.uint16) for _ in range(copies)],
        "int8": [rng.integers(-127, 128, (ROWS, N), dtype=np.int8) for _ in range(2 * copies)],
        "q4": [(rng.integers(0, 256, (ROWS, N // 2), dtype=np.uint8),
                rng.integers(0x3c00, 0x3c80, (ROWS, N // 64)).astype(np.uint16)) for _ in range(3 * copies)],
    }
    nbytes = {"bf16": ROWS * N * 2, "int8": ROWS * N, "q4": ROWS * N // 2 + ROWS * N // 64 * 2}
    build = {"bf16": _float_kernel, "int8": _int8_kernel, "q4": _q4_kernel}
    kernels = {(f, R, pf): build[f](R, pf) for f in weights for R, pf in SHAPES}
    x = rng.standard_normal(N).astype(np.float32)
    y, ref = np.empty(ROWS, np.float32), np.empty(ROWS, np.float32)
    for (f, R, pf), k in kernels.items():  # compile; every shape gives the same bits
        k(weights[f][0], x, y)
        if R == 4 and not pf:
            ref[:] = y
        assert np.array_equal(y, ref), (f, R, pf)
    probe = ReadProbe(1 << 30)
    print(f"CPU: {cpu.describe()}")
    print(f"DECODE_TILES here: {cpu.DECODE_TILES}")
    for threads in (1, 2):
        numba.set_num_threads(threads)
        rates = {key: [] for key in kernels} | {"probe": []}
        calls = dict.fromkeys(weights, 0)
        for i in range(a.rounds):
            rates["probe"].append(probe.once())
            for (f, R, pf), k in kernels.items():
                # every call its own copy, the next in turn: the copies a format cycles through
                # are 4x the last-level cache, so no call finds its weights left in cache by
                # the call before (which made the later shapes of a round look faster)
                w = weights[f][calls[f] % len(weights[f])]
                calls[f] += 1
                t0 = time.perf_counter()
                k(w, x, y)
                rates[(f, R, pf)].append(nbytes[f] / 1e9 / (time.perf_counter() - t0))
        p = float(np.median(rates["probe"]))
        print(f"\n{threads} thread{'s' if threads > 1 else ''}: read probe {max(rates['probe']):.1f} / {p:.1f} GB/s (best / median)")
        print("format  rows/tile  prefetch  GB/s best  median  of probe (median)")
        for (f, R, pf), v in ((k, v) for k, v in rates.items() if k != "probe"):
            print(f"{f:6}  {R:9}  {'yes' if pf else 'no':8}  {max(v):9.1f}  {np.median(v):6.1f}  {np.median(v) / p:.2f}")


if __name__ == "__main__":
    main()
