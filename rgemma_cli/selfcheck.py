"""`rgemma bench --quick`: does this CPU get the memory-bandwidth limit in every weight format?

Decoding one token reads every weight once, so a matrix-vector kernel is as fast as it can be
when it streams weights at the machine's read bandwidth. This check measures both in the same
process: a read probe (a vectorised parallel sum over an array far larger than the caches) and
each format's decode kernel on a 2B-MLP-sized matrix (7680 x 2560, several copies cycled so that
none stays in cache), and names the kernel variant this CPU was given (`kernels.cpu`).
A format whose kernel reaches ~0.85 of the probe or more is at the limit; well below it, the
kernel is compute-bound on this core (docs/benchmarks.md says what bounds each).

The full benchmark (`make bench`, bench/) times whole decoded tokens against transformers.
"""

from __future__ import annotations

import os
import time

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads

from . import linear
from .formats import Int4Weight, Int8Weight
from .kernels import cpu

MATRIX = (7680, 2560)  # a 2B MLP projection (out, in)
PROBE_BYTES = 256 << 20  # the --quick probe (1 GiB without it)
AT_LIMIT = 0.85  # the fraction of the probe issue 13 calls "at the bandwidth limit"


@njit(fastmath=True, cache=True, nogil=True)
def _row_sum(a):
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i]
    return s


@njit(parallel=True, cache=True)
def _read_rows(a, out):
    # the reduction lives in a helper: inline in the prange body it is not vectorised
    for r in prange(a.shape[0]):
        out[r] = _row_sum(a[r])


class ReadProbe:
    """GB/s of a vectorised parallel read of an f32 array of `nbytes` (all Numba threads)."""

    def __init__(self, nbytes: int = 1 << 30):
        self.a = np.ones((max(1, nbytes // (4 * 16384)), 16384), np.float32)
        self.out = np.empty(self.a.shape[0], np.float32)
        _read_rows(self.a, self.out)  # compile, fault the pages in

    def once(self) -> float:
        t0 = time.perf_counter()
        _read_rows(self.a, self.out)
        return self.a.nbytes / 1e9 / (time.perf_counter() - t0)

    def best(self, reps: int = 5) -> float:
        return max(self.once() for _ in range(reps))


def random_weights(fmt: str, shape=MATRIX, seed: int = 0):
    """A random matrix in format `fmt` ("f32", "bf16", "int8", "q4"): kernel speed does not
    depend on the values, so quantized ones are drawn directly (no quantizer run)."""
    rng = np.random.default_rng(seed)
    out, n = shape
    if fmt == "f32":
        return rng.random(shape, dtype=np.float32) - np.float32(0.5)
    if fmt == "bf16":
        return rng.integers(0x3c00, 0x3f80, shape, dtype=np.uint16)  # bf16 bits in [2^-7, 1)
    if fmt == "int8":
        return Int8Weight(rng.integers(-127, 128, shape, dtype=np.int8),
                          np.full(out, 0.01, np.float32))
    if fmt == "q4":
        from .formats import Q4_GROUP
        return Int4Weight(rng.integers(0, 256, (out, n // 2), dtype=np.uint8),
                          np.full((out, n // Q4_GROUP), 0x3c00, np.uint16))
    raise ValueError(f"unknown format {fmt!r}")


FORMATS = ("f32", "bf16", "int8", "q4")
_CYCLED_BYTES = 160 << 20  # copies of each matrix cycled: several times any L3 cache


def kernel_rates(formats=FORMATS, threads=(1, None), rounds: int = 8, shape=MATRIX,
                 cycled_bytes: int = _CYCLED_BYTES) -> dict:
    """GB/s of weight bytes streamed by each format's decode kernel, best and median of
    `rounds` calls, and the process CPU time / wall time over them, for each thread count
    (None: all Numba threads). Formats are interleaved call by call so that a slow stretch of a
    shared machine hits all of them alike; each cycles through copies of its matrix totalling
    ~160 MB so that none is served from cache."""
    ws = {}
    for f in formats:
        first = random_weights(f, shape)
        copies = max(2, -(-cycled_bytes // first.nbytes))
        ws[f] = [first] + [random_weights(f, shape, seed=i) for i in range(1, copies)]
    x = np.random.default_rng(9).standard_normal(shape[1], dtype=np.float32)
    full = get_num_threads()
    out = {}
    try:
        for t in threads:
            set_num_threads(t or full)
            samples = {f: [] for f in formats}
            cpu = {f: [0.0, 0.0] for f in formats}
            for r in range(rounds + 1):
                for f in formats:
                    w = ws[f][r % len(ws[f])]
                    c0, t0 = time.process_time(), time.perf_counter()
                    linear.linear(x[None], w)
                    wall = time.perf_counter() - t0
                    if r:  # the first round compiles and warms up
                        samples[f].append(w.nbytes / 1e9 / wall)
                        cpu[f][0] += time.process_time() - c0
                        cpu[f][1] += wall
            for f, s in samples.items():
                out[(f, t or full)] = {"best": max(s), "median": float(np.median(s)),
                                       "cpu_per_wall": cpu[f][0] / cpu[f][1]}
    finally:
        set_num_threads(full)
    return out


def run(quick: bool = True, probe_bytes: int | None = None) -> dict:
    """The self-check's figures: CPU, variants, probe and kernel GB/s (see the module doc)."""
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    probe = ReadProbe(probe_bytes or (PROBE_BYTES if quick else 4 * PROBE_BYTES))
    threads = get_num_threads()
    bw = [probe.best(3)]
    rates = kernel_rates(rounds=6 if quick else 20, shape=MATRIX, cycled_bytes=_CYCLED_BYTES)
    bw.append(probe.best(3))
    return {"cpu": cpu.describe(), "threads": threads, "probe_gbs": max(bw),
            "variants": {f: cpu.variant(f) for f in FORMATS}, "rates": rates,
            "loadavg": load0, "cpus": os.cpu_count()}


def render(r: dict) -> str:
    """The self-check as text: one line per format."""
    t = r["threads"]
    lines = [f"CPU: {r['cpu']}",
             f"read probe ({t} threads): {r['probe_gbs']:.1f} GB/s",
             f"{'format':<6} {'1 thread':>9} {f'{t} threads':>10} {'of probe':>9} {'CPU/wall':>9}  kernel variant"]
    for f, v in r["variants"].items():
        one, all_ = r["rates"][(f, 1)], r["rates"][(f, t)]
        frac = all_["best"] / r["probe_gbs"]
        lines.append(f"{f:<6} {one['best']:>9.1f} {all_['best']:>10.1f} {frac:>9.2f} "
                     f"{all_['cpu_per_wall']:>9.2f}  {v}")
    lines.append(f"GB/s of weight bytes streamed, best of the calls (a 7680 x 2560 matrix). At the "
                 f"bandwidth limit: >= {AT_LIMIT} of the probe.")
    if r.get("loadavg") is not None and r["loadavg"] > 0.5:
        lines.append(f"note: load average {r['loadavg']:.1f} on {r['cpus']} CPUs at the start: other "
                     f"processes shared the cores and the memory bus; with CPU/wall well under "
                     f"{t} the {t}-thread kernels waited for a core. Re-run on a quiet machine.")
    return "\n".join(lines)
