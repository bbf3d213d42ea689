"""Measurements for `bench/run.py`, each run in its own process (`python bench/workers.py NAME
JSON_ARGS`) so that thread settings, OPENBLAS_CORETYPE and peak RSS belong to one measurement.
Each worker prints one JSON line: its results.

Every timed sample records wall and process CPU time: on 2 cores a free machine gives a CPU/wall
ratio near 2 for the parallel kernels; a ratio near 1 or below means another process had a core.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from numba import njit  # noqa: E402


# -- small tools ---------------------------------------------------------------------------------


def timed(fn):
    """(result, wall seconds, cpu seconds) of fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0, time.process_time() - c0


def memory() -> dict:
    """Current RSS split into private anonymous memory and file-backed pages (GB), and the peak."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":")
        fields[k.strip()] = int(v.split()[0]) * 1024
    status = {l.split(":")[0]: l.split(":")[1] for l in Path("/proc/self/status").read_text().splitlines()}
    hwm = int(status["VmHWM"].split()[0]) * 1024
    anon = fields.get("Anonymous", 0)
    return {"rss": fields["Rss"] / 1e9, "private": anon / 1e9, "file": (fields["Rss"] - anon) / 1e9,
            "peak_rss": hwm / 1e9}


class PeakMemory:
    """Tracks the largest private and file-backed RSS seen at `sample()` calls."""

    def __init__(self):
        self.private = self.file = 0.0

    def sample(self):
        m = memory()
        self.private, self.file = max(self.private, m["private"]), max(self.file, m["file"])
        return m


def stats(walls, cpus=None, unit=1.0) -> dict:
    """best / median rate (unit / wall) and the CPU/wall ratio of a list of samples."""
    w = np.asarray(walls, dtype=np.float64)
    out = {"best": unit / w.min(), "median": unit / float(np.median(w)), "n": int(w.size)}
    if cpus is not None:
        out["cpu_per_wall"] = float(np.sum(cpus) / w.sum())
    return out


_BW = None


def read_bandwidth(reps=5, gb=1.0) -> dict:
    """GB/s of a vectorised parallel Numba read of a `gb`-sized f32 array (all threads): the
    read probe of `rgemma bench` (rgemma_cli.selfcheck.ReadProbe)."""
    global _BW
    from rgemma_cli.selfcheck import ReadProbe
    if _BW is None or _BW.a.nbytes != int(gb * 2**30) // (4 * 16384) * 4 * 16384:
        _BW = ReadProbe(int(gb * 2**30))
    samples = [timed(_BW.once) for _ in range(reps)]
    return stats([s[1] for s in samples], [s[2] for s in samples], unit=_BW.a.nbytes / 1e9)


def read_once() -> float:
    """GB/s of one read of the `read_bandwidth` array (~25 ms): a probe to pair with one token."""
    if _BW is None:
        read_bandwidth(1)
    return _BW.once()


def weight_bytes(model) -> int:
    """Bytes read per decoded token: every weight once (the tied embedding as the output head)."""
    return int(sum(w.nbytes for w in model.weights.values()))


def matrix_params(model) -> int:
    """Parameters of the non-embedding weights (2 FLOPs each per prefilled token)."""
    return int(sum(int(np.prod(w.shape)) for n, w in model.weights.items()
                   if n != "model.embed_tokens.weight"))


def prompt(model, n, seed=0):
    return np.random.default_rng(seed).integers(3, model.config.vocab_size, n)


def decode_steps(model, state, n, tok=5, probes=None):
    """Decode n tokens greedily from state, which is consumed: keys go into its ring in place,
    as `Session` decodes. Returns (walls, cpus, state). With a list `probes`, the read bandwidth
    is measured just before each token and appended to it (GB/s)."""
    walls, cpus = [], []
    for _ in range(n):
        if probes is not None:
            probes.append(read_once())
        (logits, state), w, c = timed(lambda: model.forward([tok], state, donate=True))
        tok = int(logits[0].argmax())
        walls.append(w)
        cpus.append(c)
    return walls, cpus, state


def warm_state(model):
    """A state after a 16-token prompt and 2 decoded tokens: kernels compiled, pages faulted in."""
    state = model.forward(prompt(model, 16), last_only=True)[1]
    return decode_steps(model, state, 2)[2]


def kernel_share(model, state, n) -> tuple[dict, object]:
    """Where a decoded token's time goes: seconds per token inside the weight-streaming kernels
    (matvec of every format, with the activation quantization of the int8 / 4-bit ones, and the
    RG-LRU gate blocks) against the whole step, by timing those kernels through wrappers for n
    tokens. Returns (shares, state)."""
    from rgemma_cli.kernels import matvec
    names = ["matvec", "matvec_f16", "matvec_i8", "matvec_q4", "block_diagonal_vec"]
    spent = dict.fromkeys(names, 0.0)
    originals = {k: getattr(matvec, k) for k in names}

    def timer(k, f):
        def run(*a):
            t0 = time.perf_counter()
            r = f(*a)
            spent[k] += time.perf_counter() - t0
            return r
        return run

    for k, f in originals.items():
        setattr(matvec, k, timer(k, f))
    try:
        walls, _, state = decode_steps(model, state, n)
    finally:
        for k, f in originals.items():
            setattr(matvec, k, f)
    total = sum(walls)
    share = {"token_ms": 1e3 * total / n,
             "weights_ms": 1e3 * sum(spent.values()) / n}
    share["other_ms"] = share["token_ms"] - share["weights_ms"]
    return share, state


def at_position(state, pos):
    """The same state moved to position `pos` (must equal state.pos modulo the window, so the
    ring buffer of keys keeps its layout). The work of a decode step depends on the position
    only through how full the window is, so this times decoding at `pos` exactly."""
    return dataclasses.replace(state.copy(), pos=pos)


# -- workers ---------------------------------------------------------------------------------------


def w_decode(args) -> dict:
    """Interleaved rounds: bandwidth probe, then a few tokens of every variant, then decode at
    several positions of one generation (bf16)."""
    from rgemma_cli import load
    models = {v: load(p)[0] for v, p in args["models"].items()}
    out = {"variants": {}, "bandwidth": [], "positions": {}}
    states = {v: warm_state(m) for v, m in models.items()}
    for v, m in models.items():
        out["variants"][v] = {"bytes_per_token": weight_bytes(m), "walls": [], "cpus": [],
                              "probes": []}
    for r in range(args["rounds"]):
        out["bandwidth"].append(read_bandwidth(3))
        for v, m in models.items():
            walls, cpus, states[v] = decode_steps(m, states[v], args["tokens"],
                                                  probes=out["variants"][v]["probes"])
            out["variants"][v]["walls"] += walls
            out["variants"][v]["cpus"] += cpus
    for v in out["variants"].values():
        v.update(stats(v["walls"], v["cpus"]))
    for v, m in models.items():
        out["variants"][v]["share"], states[v] = kernel_share(m, states[v], args["tokens"])

    # decode rate at positions of one generation: a real 128-token and 2048-token prefill; 4096
    # and 32768 are the 2048-token state advanced by whole windows (see `at_position`)
    if not args.get("position_model"):
        return out
    m = models[args["position_model"]]
    W = m.config.attention_window_size
    s128 = m.forward(prompt(m, 128, 1), m.initial_state(), last_only=True)[1]
    (_, s2k), wall, cpu = timed(lambda: m.forward(prompt(m, W, 2), m.initial_state(), last_only=True))
    out["long_prefill"] = {"tokens": W, "tok_s": W / wall, "cpu_per_wall": cpu / wall}
    pos_states = {128: s128, W: s2k, 2 * W: at_position(s2k, 2 * W), 16 * W: at_position(s2k, 16 * W)}
    samples = {p: ([], [], []) for p in pos_states}
    for r in range(args["rounds"] + 2):
        for p in pos_states:
            walls, cpus, _ = decode_steps(m, pos_states[p].copy(), args["tokens"])
            samples[p][0].extend(walls)
            samples[p][1].extend(cpus)
            samples[p][2].append(1 / float(np.median(walls)))
    out["positions"] = {str(p): {**stats(w, c), "round_tok_s": t} for p, (w, c, t) in samples.items()}
    return out


def w_prefill(args) -> dict:
    """sgemm peak and rgemma prefill in one process (the OPENBLAS_CORETYPE given by the parent);
    with `memory`, peak private / file-backed RSS over load, prefill and decode."""
    from rgemma_cli import load
    from rgemma_cli.linear import blas_threads
    peak = PeakMemory()
    peak.sample()
    out = {"coretype_env": os.environ.get("OPENBLAS_CORETYPE"), "corename": blas_corename()}
    blas_threads(None)
    rng = np.random.default_rng(0)
    gemm = {}
    for M, K, N in ((512, 2560, 7680), (2048, 2048, 2048)):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((N, K), dtype=np.float32)
        a @ b.T
        samples = [timed(lambda: a @ b.T) for _ in range(5)]
        gemm[f"{M}x{K}x{N}"] = stats([s[1] for s in samples], [s[2] for s in samples],
                                     unit=2 * M * K * N / 1e9)
    out["sgemm_gflops"] = gemm
    out["sgemm_peak"] = max(g["best"] for g in gemm.values())
    m = load(args["model"])[0]
    peak.sample()
    T = args["tokens"]
    flops = 2 * matrix_params(m)
    m.forward(prompt(m, 64), m.initial_state(), last_only=True)  # compile
    samples = []
    for r in range(args["reps"]):
        samples.append(timed(lambda: m.forward(prompt(m, T, r), m.initial_state(), last_only=True))[1:])
        peak.sample()
    st = stats([s[0] for s in samples], [s[1] for s in samples], unit=T)
    st["gflops_best"] = st["best"] * flops / 1e9
    st["fraction_of_sgemm_peak"] = st["gflops_best"] / out["sgemm_peak"]
    out["prefill"] = {"tokens": T, "flops_per_token": flops, **st}
    if args.get("memory"):
        s = m.forward(prompt(m, T), m.initial_state(), last_only=True)[1]
        for _ in range(8):
            s = m.forward([7], s)[1]
            peak.sample()
        out["memory"] = {"peak_private_gb": peak.private, "peak_file_gb": peak.file,
                         "weights_gb": weight_bytes(m) / 1e9, **memory()}
    return out


def blas_corename():
    import ctypes
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*")):
        lib = ctypes.CDLL(path)
        for sym in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
            if hasattr(lib, sym):
                f = getattr(lib, sym)
                f.restype = ctypes.c_char_p
                return f().decode()
    return None


def w_transformers(args) -> dict:
    """Hugging Face transformers bf16 on the same checkpoint, torch on 2 threads: prefill and
    decode rate at several prompt lengths, timed per token with a streamer."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(args.get("threads", 2))
    peak = PeakMemory()
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16)
    model.eval()
    peak.sample()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append((time.perf_counter(), time.process_time()))

        def end(self):
            pass

    V = model.config.vocab_size
    out = {"threads": torch.get_num_threads(), "lengths": {}}
    with torch.inference_mode():
        model.generate(torch.tensor([[2, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
        for L in args["lengths"]:
            ids = torch.tensor(np.random.default_rng(L).integers(3, V, (1, L)))
            clock = Clock()
            t0, c0 = time.perf_counter(), time.process_time()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["tokens"] + 1,
                           min_new_tokens=args["tokens"] + 1, do_sample=False, streamer=clock)
            peak.sample()
            (t1, c1), rest = clock.times[1], clock.times[1:]  # [0] is the prompt itself
            walls = [b[0] - a[0] for a, b in zip(rest, rest[1:])]
            cpus = [b[1] - a[1] for a, b in zip(rest, rest[1:])]
            out["lengths"][str(L)] = {"prefill_tok_s": L / (t1 - t0), "prefill_cpu_per_wall": (c1 - c0) / (t1 - t0),
                                      "decode": stats(walls, cpus)}
    out["memory"] = {"peak_private_gb": peak.private, "peak_file_gb": peak.file, **memory()}
    return out


def w_versus(args) -> dict:
    """rgemma against transformers' bf16 decode, alternating round by round in one process (so
    each ratio compares rates measured seconds apart). Each library's thread pool is left idle
    for a moment before the other's turn, so that neither spins on the cores the other needs."""
    import torch
    from transformers import AutoModelForCausalLM
    from rgemma_cli import load
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(args["reference"], dtype=torch.bfloat16).eval()
    ours = {v: load(p)[0] for v, p in args["models"].items()}
    states = {v: warm_state(m) for v, m in ours.items()}
    ids = torch.tensor(prompt(ours[next(iter(ours))], 64, 4)[None])
    n = args["tokens"]
    rounds = {"transformers": []} | {v: [] for v in ours}

    def hf_round():
        clock = []
        streamer = type("Clock", (), {"put": lambda self, v: clock.append(time.perf_counter()),
                                      "end": lambda self: None})()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n + 1,
                        min_new_tokens=n + 1, do_sample=False, streamer=streamer)
        return [b - a for a, b in zip(clock[1:], clock[2:])]  # clock[0]: the prompt

    hf_round()  # warm up
    for _ in range(args["rounds"]):
        time.sleep(0.5)
        rounds["transformers"].append(hf_round())
        for v, m in ours.items():
            time.sleep(0.5)
            walls, _, states[v] = decode_steps(m, states[v], n)
            rounds[v].append(walls)
    out = {"tokens_per_round": n, "rounds": rounds, "transformers": stats(sum(rounds["transformers"], []))}
    for v in ours:
        ratios = [np.median(h) / np.median(r) for h, r in zip(rounds["transformers"], rounds[v])]
        out[v] = {**stats(sum(rounds[v], [])), "ratio_median": float(np.median(ratios)),
                  "ratio_min": float(np.min(ratios)), "ratio_max": float(np.max(ratios))}
    return out


def w_quality(args) -> dict:
    """Next-token distributions of quantized models against the unquantized one, teacher-forced
    over the same tokens on the decode path: mean KL(p_ref || p_q) and top-1 agreement."""
    from rgemma_cli import load
    ref = load(args["reference"])[0]
    toks = prompt(ref, args["tokens"], 3)

    def logprobs(m):
        s = m.forward(toks[:4], m.initial_state(), last_only=True)[1]
        rows = []
        for t in toks[4:]:
            logits, s = m.forward([t], s)
            z = logits[0].astype(np.float64)
            z -= z.max()
            rows.append(z - np.log(np.exp(z).sum()))
        return np.array(rows)

    lr = logprobs(ref)
    out = {"positions": int(lr.shape[0])}
    for name, path in args["variants"].items():
        lq = logprobs(load(path)[0])
        kl = (np.exp(lr) * (lr - lq)).sum(axis=1)
        out[name] = {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                     "top1_agreement": float((lr.argmax(1) == lq.argmax(1)).mean())}
    return out


def w_big(args) -> dict:
    """A large checkpoint (9B-shaped): load, decode a few tokens, peak memory."""
    from rgemma_cli import load
    peak = PeakMemory()
    m = load(args["model"])[0]
    s = m.forward(prompt(m, 4), m.initial_state(), last_only=True)[1]
    peak.sample()
    walls, cpus, s = decode_steps(m, s, args["tokens"])
    peak.sample()
    bw = read_bandwidth(3)
    return {"bytes_per_token": weight_bytes(m), "decode": stats(walls, cpus), "walls": walls,
            "bandwidth": bw, "peak_private_gb": peak.private, "peak_file_gb": peak.file,
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9}


def w_kernels(args) -> dict:
    """`rgemma bench` (rgemma_cli.selfcheck) at full length: each format's decode kernel variant
    on this CPU and its GB/s (7680 x 2560 matrices cycled out of cache), 1 and 2 threads
    interleaved, against the read probe; plus the CPU's description."""
    from rgemma_cli import selfcheck
    r = selfcheck.run(quick=args.get("quick", False))
    out = {f"{f}/{t}": v for (f, t), v in r.pop("rates").items()}
    out["read_bandwidth"] = {"best": r["probe_gbs"]}
    return {**out, **r}


def w_perplexity(args) -> dict:
    """`rgemma perplexity` of each model variant over one held-out text: perplexity, mean NLL
    (nats / token) and tokens/s (2 threads), chunked with the state carried across."""
    from rgemma_cli import load
    from rgemma_cli.perplexity import perplexity, read_text
    text = read_text(args["text"])
    out = {"text": Path(args["text"]).name}
    for name, path in args["models"].items():
        m, tok = load(path)
        ids = tok.raw_prompt(text)
        perplexity(m, ids[:80], chunk_size=args.get("chunk", 512))  # compile / fault in
        out[name] = perplexity(m, ids, chunk_size=args.get("chunk", 512),
                               max_tokens=args.get("max_tokens")).to_dict()
    return out


def w_prefill_versus(args) -> dict:
    """Prefill of a T-token prompt: transformers bf16 against rgemma's variants, alternating
    round by round in one process (each library's pool idle for a moment before the other's
    turn). transformers' time is `generate(max_new_tokens=1)`, its prefill and the first
    token's sampling; rgemma's is `forward(last_only=True)`."""
    import torch
    from transformers import AutoModelForCausalLM
    from rgemma_cli import load
    from rgemma_cli.linear import blas_threads
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(args["reference"], dtype=torch.bfloat16).eval()
    ours = {v: load(p)[0] for v, p in args["models"].items()}
    T = args["tokens"]
    first = next(iter(ours.values()))
    ids = prompt(first, T, 11)
    tids = torch.tensor(ids[None])
    for m in ours.values():
        m.forward(ids[:64], m.initial_state(), last_only=True)  # compile, fault the pages in

    def hf_prefill():
        with torch.inference_mode():
            hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=1, do_sample=False)

    rounds = {"transformers": []} | {v: [] for v in ours}
    for _ in range(args["rounds"]):
        time.sleep(0.5)
        rounds["transformers"].append(timed(hf_prefill)[1:])
        for v, m in ours.items():
            time.sleep(0.5)
            blas_threads(None)
            rounds[v].append(timed(lambda: m.forward(ids, m.initial_state(), last_only=True))[1:])
    out = {"tokens": T, "rounds": rounds}
    for v, r in rounds.items():
        out[v] = {**stats([a for a, _ in r], [c for _, c in r], unit=T)}
        if v != "transformers":
            ratios = [h[0] / x[0] for h, x in zip(rounds["transformers"], r)]
            out[v].update(ratio_median=float(np.median(ratios)), ratio_min=min(ratios),
                          ratio_max=max(ratios))
    return out


def w_startup(args) -> dict:
    """Seconds from launching `rgemma generate -m MODEL -n 1` to its exit (the first token):
    once with an empty Numba cache (cold: every kernel compiles) and then with it filled (warm)."""
    import subprocess
    import tempfile

    cmd = [sys.executable, "-c", "import sys; from rgemma_cli.cli import main; sys.exit(main())",
           "generate", "-m", args["model"], "-n", "1", "-t", "0", "-q", "Hello"]
    env = dict(os.environ, NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="rgemma-numba-"))

    def launch():
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
        return time.perf_counter() - t0

    cold = launch()
    warm = [launch() for _ in range(args.get("reps", 5))]
    return {"cold_s": cold, "warm_best_s": min(warm), "warm_median_s": float(np.median(warm))}


@njit(cache=True)
def _rg_lru_elementwise_numba(c, gx, ga, softplus_lam, out_a, out_x):
    # the same math as model.rg_lru's NumPy ufuncs, as one scalar Numba loop (no SVML here)
    T, R = c.shape
    for t in range(T):
        for j in range(R):
            i = 1.0 / (1.0 + np.exp(-gx[t, j]))
            r = 1.0 / (1.0 + np.exp(-ga[t, j]))
            log_a = -8.0 * r * softplus_lam[j]
            out_a[t, j] = np.exp(log_a)
            out_x[t, j] = c[t, j] * i * np.sqrt(1.0 - np.exp(2.0 * log_a))


def w_elementwise(args) -> dict:
    """The RG-LRU's elementwise work (gates, decay, input scaling) and its scan, for a 2048-token
    chunk and for one decoded row (2B width): NumPy ufuncs against one Numba loop, and the scan
    as a NumPy loop over time against the Numba kernel. Best of `reps`, milliseconds."""
    from rgemma_cli.kernels.sequence import rg_lru_scan
    from rgemma_cli.model import sigmoid
    from rgemma_cli.weights import softplus

    R, reps = 2560, args.get("reps", 7)
    rng = np.random.default_rng(0)
    lam = rng.uniform(-4, 1, R).astype(np.float32)
    out = {}
    for T in (2048, 1):
        c, gx, ga = (rng.standard_normal((T, R)).astype(np.float32) for _ in range(3))

        def numpy_elementwise():
            log_a = np.float32(-8.0) * sigmoid(ga) * softplus(lam)
            return np.exp(log_a), c * sigmoid(gx) * np.sqrt(1.0 - np.exp(2.0 * log_a))

        a_out, x_out = np.empty_like(c), np.empty_like(c)
        sp = softplus(lam)
        a, x = numpy_elementwise()
        h0 = np.zeros(R, np.float32)

        def numpy_scan():
            h, hs = h0, np.empty_like(x)
            for t in range(T):
                h = a[t] * h + x[t]
                hs[t] = h
            return hs

        variants = {"elementwise, NumPy ufuncs": numpy_elementwise,
                    "elementwise, Numba loop": lambda: _rg_lru_elementwise_numba(c, gx, ga, sp, a_out, x_out),
                    "scan, NumPy loop over time": numpy_scan,
                    "scan, Numba kernel": lambda: rg_lru_scan(a, x, h0)}
        for name, fn in variants.items():
            fn()  # compile / warm up
            out[f"{name}/{T}"] = 1e3 * min(timed(fn)[1] for _ in range(reps))
    return out


def w_flat(args) -> dict:
    """A long generation stays flat (issue 11, item 7): tokens/s and RSS in windows of
    `window` tokens over `tokens` sampled tokens of the model (stop tokens ignored), as
    `rgemma generate` runs it: plain (keep=False: no ids or text kept) and kept (keep=True,
    as with --json / --save-state: ids, text and the transcript grow by what they hold)."""
    from rgemma_cli import load
    from rgemma_cli.generation import Session
    from rgemma_cli.sampling import SamplerSettings

    model, tok = load(args["model"])
    n, window = args["tokens"], args["window"]
    out = {"tokens": n, "window": window}
    for label, keep in (("plain", False), ("kept", True)):
        s = Session(model, tok, SamplerSettings(temperature=0.8, seed=1), mode="raw")
        g = s.generate(s.user_turn("Once upon a time"), n, stop_ids=(), keep=keep)
        marks, t0 = [], time.perf_counter()
        for _ in g:
            if g.generated >= (len(marks) + 1) * window:
                marks.append((g.generated, time.perf_counter() - t0, memory()["rss"] * 1e9))
        rates = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]
        (n0, _, rss0), (n1, _, rss1) = marks[0], marks[-1]
        out[label] = {"tokens_per_s_first": rates[0], "tokens_per_s_last": rates[-1],
                      "rate_last_over_first": rates[-1] / rates[0],
                      "rss_start_mb": rss0 / 1e6, "rss_end_mb": rss1 / 1e6,
                      "rss_bytes_per_token": (rss1 - rss0) / (n1 - n0), "generated": n1}
    return out


# -- Figure 1a: aggregate sampling throughput of batched decoding against generation length ---


def random_state(model, pos, rng):
    """A full-window state with random contents at position `pos`: after a 2k-token prompt every
    layer's state has this size and a decode step does this work whatever the contents (the
    attention window is full), so it stands for any position >= the window."""
    from rgemma_cli.state import State
    s = State.zeros(model.config)
    for a in s.arrays().values():
        a[...] = rng.standard_normal(a.shape, dtype=np.float32) * 0.5
    return dataclasses.replace(s, pos=pos)


def batched_steps(model, states, n):
    """n timed `forward_batch` steps (greedy tokens); returns (walls, cpus, states)."""
    tokens = np.full(len(states), 5)
    walls, cpus = [], []
    for _ in range(n):
        (logits, states), w, c = timed(lambda: model.forward_batch(tokens, states, donate=True))
        tokens = logits.argmax(axis=1)
        walls.append(w)
        cpus.append(c)
    return walls, cpus, states


def gemm_peak(w, rounds=5) -> dict:
    """FLOP/s of the batched decode kernel (`Weight.matmat`) at B=64 on 384 rows of `w`, small
    enough to stay in cache: the compute ceiling of a batched step in this format."""
    from rgemma_cli import formats, linear
    rows = 384
    wf = formats.as_weight(w)
    block = (formats.Int8Weight(wf.q[:rows], wf.scale[:rows]) if isinstance(wf, formats.Int8Weight)
             else formats.Int4Weight(wf.packed[:rows], wf.scale[:rows])
             if isinstance(wf, formats.Int4Weight) else wf.a[:rows])
    x = np.random.default_rng(0).standard_normal((64, w.shape[1]), dtype=np.float32)
    linear.batched_linear(x, block)
    walls = [timed(lambda: linear.batched_linear(x, block))[1] for _ in range(rounds)]
    return {"gflops": 2 * 64 * rows * w.shape[1] / min(walls) / 1e9, "rows": rows,
            "in": int(w.shape[1])}


def params_per_token(model) -> int:
    """Parameters a decoded token multiplies (2 FLOPs each): every matrix, the tied head once."""
    return int(sum(int(np.prod(w.shape)) for w in model.weights.values() if len(w.shape) >= 2))


def w_fig1a_rgemma(args) -> dict:
    """rgemma bf16 / int8 / 4-bit: aggregate tokens/s of batched decode steps at each batch size
    within the memory budget (at 2k + 2k), then at the best B for each generation length after a
    2k-token prompt; the GEMM ceiling of the same kernels; private memory per added sequence."""
    from rgemma_cli import load
    rng = np.random.default_rng(0)
    budget = args["budget_gb"] * 1e9
    prompt_len, steps = args["prompt"], args["steps"]
    out = {"formats": {}}
    for fmt, path in args["models"].items():
        model = load(path)[0]
        template = random_state(model, prompt_len, rng)
        per_seq = template.nbytes
        sizes = [b for b in args["batch_sizes"] if b * per_seq <= budget]
        r = out["formats"][fmt] = {"state_bytes": per_seq, "batch_sizes": sizes,
                                   "params_per_token": params_per_token(model),
                                   "gemm": gemm_peak(model.weights["model.layers.0.mlp_block.up_proj.weight"])}
        # private memory per added sequence: the states of B=1 and of B=1+extra kept alive,
        # each after a step; a step at the larger size first, so that the allocator's pools for
        # the step's temporaries (logits: 1 MB per sequence) have grown before either reading
        # private memory per added sequence: the live bytes a step at B=1+extra holds beyond
        # B=1's, after the step, counted by tracemalloc (NumPy reports its buffers to it). The
        # resident-memory difference said ~0: the allocator keeps the pages of a warm-up step's
        # freed temporaries and hands them to the new states, so RSS cannot see them.
        extra = args.get("memory_extra", 16)
        states = batched_steps(model, [template.copy()], 1)[2]
        gc.collect()
        tracemalloc.start()
        m0 = tracemalloc.get_traced_memory()[0]
        states = batched_steps(model, states + [template.copy() for _ in range(extra)], 1)[2]
        gc.collect()
        r["private_bytes_per_added_sequence"] = (tracemalloc.get_traced_memory()[0] - m0) / extra
        tracemalloc.stop()
        del states
        # batch sweep, interleaved: every size one step per round
        pool = {b: [template.copy() for _ in range(b)] for b in sizes}
        sweep = {b: [] for b in sizes}
        for b in sizes:
            batched_steps(model, pool[b], 1)  # warm: compiled, pages in
        for _ in range(max(steps, 3)):
            for b in sizes:
                walls, _, pool[b] = batched_steps(model, pool[b], 1)
                sweep[b] += walls
        r["sweep"] = {str(b): {"step_s": float(np.median(w)), "tok_s": b / float(np.median(w))}
                      for b, w in sweep.items()}
        best = max(sizes, key=lambda b: r["sweep"][str(b)]["tok_s"])
        r["best_batch"] = best
        states = pool.pop(best)
        del pool
        # the lengths interleaved, one step each per round, so that a slow stretch of the
        # shared machine lands on all of them (the work per step is the same at every length)
        walls = {L: [] for L in args["lengths"]}
        cpus = {L: [] for L in args["lengths"]}
        for _ in range(args.get("length_rounds", 3)):
            for L in args["lengths"]:
                states = [dataclasses.replace(s, pos=prompt_len + L + len(walls[L])) for s in states]
                w, c, states = batched_steps(model, states, 1)
                walls[L] += w
                cpus[L] += c
        r["lengths"] = {str(L): {"step_s": float(np.median(walls[L])),
                                 "tok_s": best / float(np.median(walls[L])),
                                 "cpu_per_wall": float(np.sum(cpus[L]) / np.sum(walls[L]))}
                        for L in args["lengths"]}
        ceiling = r["gemm"]["gflops"] * 1e9 / (2 * r["params_per_token"])
        r["ceiling_tok_s"] = ceiling
        del model, states, template
    return out


def _hf_fill(model, cache, B, T, layers, rng_seed=0):
    """Put T random keys and values (bf16) into `cache` for each attention layer index in
    `layers`, as a prompt of T tokens would have (the contents do not change the work)."""
    import torch
    g = torch.Generator().manual_seed(rng_seed)
    cfg = model.config
    kvh, hd = cfg.num_key_value_heads, cfg.head_dim
    for i in layers:
        k = torch.randn((B, kvh, T, hd), generator=g, dtype=torch.float32).to(torch.bfloat16)
        cache.update(k, k.clone(), i)


def _hf_steps(model, cache, B, T, n, kw="past_key_values"):
    """n timed one-token decode steps of B sequences at position T (and on); returns walls."""
    import torch
    walls = []
    ids = torch.full((B, 1), 5, dtype=torch.long)
    for i in range(n):
        pos = torch.full((B, 1), T + i, dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=ids, position_ids=pos, use_cache=True, **{kw: cache})
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        walls.append(time.perf_counter() - t0)
    return walls


def _best_batch(sizes, measure):
    """The best aggregate rate over batch sizes, searched upward: `measure(b)` -> tokens/s at
    each size in `sizes` (ascending) until the rate falls below 0.97 of the best so far. torch's
    bf16 matmuls without the CPU's bf16 instructions are compute-bound already at a few rows
    (Zen 3: Gemma-2B 2.2 tok/s at B=4, 1.8 at B=16, a 16-row step ~10 s), so trying the largest
    sizes that fit first cost tens of minutes per length for nothing. Returns {str(b): rate}."""
    res, best = {}, 0.0
    for b in sizes:
        r = res[str(b)] = measure(b)
        if r["tok_s"] < 0.97 * best:
            break
        best = max(best, r["tok_s"])
    return res


def w_fig1a_transformers(args) -> dict:
    """transformers bf16, torch on 2 threads: GemmaForCausalLM with the Gemma-2B config (random
    weights; the paper's transformer baseline) and RecurrentGemma (the bf16 checkpoint). For each
    generation length after a 2k-token prompt, the caches are filled with random keys and values
    up to that length, and the aggregate tokens/s of decode steps is measured at batch sizes
    whose caches fit the memory budget, upward until the rate falls (`_best_batch`); the best
    is reported."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, GemmaConfig, GemmaForCausalLM
    torch.set_num_threads(args.get("threads", 2))
    budget, prompt_len, steps = args["budget_gb"] * 1e9, args["prompt"], args["steps"]
    out = {"threads": torch.get_num_threads()}
    with torch.inference_mode():
        if args.get("gemma", True):
            cfg = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                              num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                              head_dim=256, max_position_embeddings=65536)
            torch.manual_seed(0)
            torch.set_default_dtype(torch.bfloat16)  # built in bf16: no 10 GB float32 copy first
            model = GemmaForCausalLM(cfg).eval()
            torch.set_default_dtype(torch.float32)
            per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
            g = out["gemma"] = {"params": sum(p.numel() for p in model.parameters()),
                                "kv_bytes_per_token": per_token, "lengths": {}}
            for L in args["lengths"]:
                T = prompt_len + L
                sizes = [b for b in args["batch_sizes"] if b * per_token * T <= budget]
                def gemma_at(b):
                    cache = DynamicCache(config=cfg)
                    _hf_fill(model, cache, b, T, range(cfg.num_hidden_layers))
                    walls = _hf_steps(model, cache, b, T, steps + 1)[1:]
                    return {"step_s": float(np.median(walls)), "tok_s": b / float(np.median(walls))}
                res = _best_batch(sizes, gemma_at)
                best = max(res, key=lambda k: res[k]["tok_s"])
                g["lengths"][str(L)] = {"sizes": res, "best_batch": int(best), **res[best],
                                        "cache_bytes_per_sequence": per_token * T}
            del model
        if args.get("recurrentgemma"):
            model = AutoModelForCausalLM.from_pretrained(args["recurrentgemma"], dtype=torch.bfloat16).eval()
            cfg = model.config
            W = cfg.attention_window_size
            attn = [i for i, t in enumerate(cfg.layers_block_type[:cfg.num_hidden_layers]) if t in ("attention", "sliding_attention")]
            per_seq = (len(attn) * 2 * cfg.num_key_value_heads * cfg.head_dim * W * 2
                       + (cfg.num_hidden_layers - len(attn)) * cfg.lru_width * (cfg.conv1d_width - 1 + 1) * 2)
            rg = out["recurrentgemma"] = {"state_bytes": per_seq, "lengths": {}}
            sizes = [b for b in args["batch_sizes"] if b * per_seq <= budget]
            for L in args["lengths"]:
                T = prompt_len + L
                def rg_at(b):
                    cache = DynamicCache(config=cfg)
                    _hf_fill(model, cache, b, W, attn)
                    walls = _hf_steps(model, cache, b, T, steps + 1, kw="cache")[1:]
                    return {"step_s": float(np.median(walls)), "tok_s": b / float(np.median(walls))}
                res = _best_batch(sizes, rg_at)
                best = max(res, key=lambda k: res[k]["tok_s"])
                rg["lengths"][str(L)] = {"sizes": res, "best_batch": int(best), **res[best]}
    return out


WORKERS = {"fig1a_rgemma": w_fig1a_rgemma, "fig1a_transformers": w_fig1a_transformers,
           "perplexity": w_perplexity, "prefill_versus": w_prefill_versus, "kernels": w_kernels, "decode": w_decode, "prefill": w_prefill, "transformers": w_transformers,
           "versus": w_versus, "quality": w_quality, "big": w_big, "startup": w_startup, "elementwise": w_elementwise, "flat": w_flat}

if __name__ == "__main__":
    result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
