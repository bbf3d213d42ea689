"""`make bench`: decode and prefill throughput against this machine's limits, in one run.

    .venv/bin/python bench/run.py [--quick] [--skip-9b] [--skip-transformers]

Prepares random 2B-shaped checkpoints under weights/ (bf16 from rgemma_cli.testing.synth, int8 and 4-bit
from it with rgemma_cli.quantize; kept for the next run), then runs each measurement in its own
process (bench/workers.py) and writes bench/out/results.json, docs/benchmarks.md and
docs/bench-throughput.png. Ratios are taken between measurements of the same run, interleaved
where they are compared; every figure carries its CPU/wall ratio (about 2.0 = both cores ours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WEIGHTS = ROOT / "weights"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "bench-throughput.png"
FIG1A = ROOT / "docs" / "bench-fig1a-throughput.png"  # the paper's Figure 1a on this CPU
FIG1A_MEMORY = ROOT / "docs" / "bench-fig1a-memory.png"
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]  # generation lengths after the prompt
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
BUDGET_GB = 8.0  # memory for the sequences' states / KV caches, besides the weights
PY = sys.executable
HELDOUT = ROOT / "bench" / "heldout" / "declaration-of-independence.txt"
CPUS = ROOT / "bench" / "cpus.json"  # committed: one summary per CPU family, for docs/benchmarks.md


def _cpu_features() -> dict:
    sys.path.insert(0, str(ROOT))
    from rgemma_cli.kernels.cpu import features
    return features()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def busy_cores(seconds=1.0) -> float:
    """How many cores other processes kept busy over `seconds` (from /proc/stat)."""
    def sample():
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait
    (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


MAX_WAIT = 300.0  # seconds each phase waits for a quiet machine (--max-wait)


def wait_quiet(limit=None, threshold=0.15) -> dict:
    """Wait (at most `limit` s) until other processes use less than `threshold` of a core."""
    t0, limit = time.time(), MAX_WAIT if limit is None else limit
    while True:
        busy = busy_cores()
        if busy < threshold or time.time() - t0 > limit:
            return {"busy_cores_before": round(busy, 2), "waited_s": round(time.time() - t0, 1)}
        time.sleep(2)


def worker(name, args, env=None, timeout=3600):
    """Run bench/workers.py NAME in a fresh process; returns its JSON (or {"error": ...}).
    Waits first for the machine to be quiet (up to --max-wait s) and records what it found."""
    quiet = wait_quiet()
    log(f"  {name}: {quiet}")
    e = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    t0 = time.time()
    p = subprocess.run([PY, str(ROOT / "bench" / "workers.py"), name, json.dumps(args)], env=e,
                       capture_output=True, text=True, timeout=timeout)
    log(f"  {name} took {time.time() - t0:.0f} s")
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-5:]
        log(f"  {name} failed: " + " | ".join(tail))
        return {"error": "\n".join(tail), **quiet}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), **quiet}


def prepare(preset, dtype="bf16"):
    """The synthetic checkpoints (generated once, kept in the git-ignored weights/)."""
    src = WEIGHTS / f"bench-{preset}-{dtype}"
    if not (src / "config.json").exists():
        log(f"generating {src} (random weights, rgemma_cli.testing.synth)")
        subprocess.run([PY, "-m", "rgemma_cli.testing.synth", str(src), "--preset", preset,
                        "--dtype", dtype], check=True)
    return src


def quantized(src, bits, embedding_bits=None, out=None):
    """src quantized (cached beside it, or in `out`); redone when quantize.py has changed since."""
    from rgemma_cli.quantize import quantize_checkpoint
    suffix = f"q{bits}" + (f"-emb{embedding_bits}" if embedding_bits else "")
    out = out or src.parent / f"{src.name.rsplit('-', 1)[0]}-{suffix}"
    stamp = hashlib.sha256((ROOT / "rgemma_cli" / "quantize.py").read_bytes()).hexdigest()
    if not (out / "config.json").exists() or _read(out / ".quantize-stamp") != stamp:
        log(f"quantizing {src.name} to {suffix}")
        shutil.rmtree(out, ignore_errors=True)
        quantize_checkpoint(src, out, bits, embedding_bits=embedding_bits)
        (out / ".quantize-stamp").write_text(stamp)
    return out


def _read(path):
    return path.read_text() if path.exists() else None


def machine():
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (OSError, ValueError):
        pass
    import numba
    import numpy
    info.update(numpy=numpy.__version__, numba=numba.__version__)
    sys.path.insert(0, str(ROOT))
    from rgemma_cli.kernels.cpu import cpu_model, describe, features
    info.update(cpu_model=cpu_model(), cpu_described=describe(), features=features())
    return info


def small_models(tmp):
    """Small checkpoints for the quality table: the parity fixtures' tiny-80 config (widths of 80
    are not whole 4-bit groups: its 4-bit file is int8 almost throughout), a 64-wide one, and the
    trained demo model when present."""
    from rgemma_cli.testing import synth
    out = {}
    for name in ("tiny-80", "mkv"):
        d = tmp / name
        if not (d / "config.json").exists():
            subprocess.run([PY, "-m", "rgemma_cli.testing.synth", str(d), "--config", name],
                           check=True, capture_output=True)
        out[name] = d
    demo = WEIGHTS / "demo"
    if (demo / "config.json").exists():
        out["demo"] = demo
    return out


def main():
    global MAX_WAIT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and tokens (a smoke run)")
    ap.add_argument("--skip-9b", action="store_true", help="skip the 9B-shaped checkpoint (17 GB)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--only", help="comma-separated phases to run (kernels,decode,versus,prefill,prefill_versus,transformers,quality,perplexity,elementwise,startup,flat,fig1a,9b); "
                                   "the others are kept from the previous results.json")
    ap.add_argument("--formats", help="comma-separated 2B formats to run (bf16,int8,q4,q4-emb8; "
                                      "default all, --quick: all but q4-emb8)")
    ap.add_argument("--max-wait", type=float, default=300.0,
                    help="seconds each phase waits for other processes to leave the cores (default 300)")
    a = ap.parse_args()
    MAX_WAIT = a.max_wait
    OUT.mkdir(parents=True, exist_ok=True)
    prev = json.loads((OUT / "results.json").read_text()) if (a.only and (OUT / "results.json").exists()) else {}
    only = set(a.only.split(",")) if a.only else None
    want = lambda phase: only is None or phase in only  # noqa: E731
    rounds, tokens = (2, 3) if a.quick else (4, 5)
    t_start = time.time()
    R = dict(prev)
    R["machine"] = {**prev.get("machine", {}), **machine()} if not prev else prev["machine"]
    run = {"phases": a.only or "all", "start": time.strftime("%H:%M"), "loadavg_start": os.getloadavg(),
           "quick": a.quick, "max_wait": a.max_wait}
    R["runs"] = prev.get("runs", []) + [run]
    log(f"machine: {machine()}")

    needs_2b = {"decode", "versus", "prefill", "prefill_versus", "transformers", "quality", "fig1a"}
    if only is None or only & needs_2b:
        bf16 = prepare("2b")
        # (--quick: the 2B with an int8 head is left out; small models keep it)
        formats = a.formats.split(",") if a.formats else ["bf16", "int8", "q4"] + ([] if a.quick else ["q4-emb8"])
        make = {"bf16": lambda: bf16, "int8": lambda: quantized(bf16, 8), "q4": lambda: quantized(bf16, 4),
                "q4-emb8": lambda: quantized(bf16, 4, embedding_bits=8)}
        models = {f: str(make[f]()) for f in formats}

    if want("kernels"):
        log("kernels: GB/s of each matvec format, 1 and 2 threads")
        R["kernels"] = worker("kernels", {"quick": a.quick})
    if want("decode"):
        log("decode: bf16 / int8 / 4-bit interleaved with bandwidth probes; positions 128..32k")
        R["decode"] = worker("decode", {"models": models, "rounds": rounds, "tokens": tokens,
                                        "position_model": None if a.quick else "bf16"})
    if want("versus") and not a.skip_transformers:
        log("versus: rgemma and transformers' bf16 decode alternating round by round, one process")
        R["versus"] = worker("versus", {"reference": models["bf16"], "models": models,
                                        "rounds": 3 if a.quick else 10, "tokens": tokens})
    if want("prefill"):
        # OPENBLAS_CORETYPE: as this environment sets it, unset (OpenBLAS picks the AVX-512
        # kernel), and Haswell (what these machines set) when the environment leaves it unset
        settings = {"as set": os.environ.get("OPENBLAS_CORETYPE"), "unset": None}
        if settings["as set"] is None:
            settings = {"unset": None} if a.quick else {"unset": None, "Haswell": "Haswell"}
        R["prefill"] = {}
        for i, (label, value) in enumerate(settings.items()):
            log(f"prefill + sgemm peak, OPENBLAS_CORETYPE {label} ({value})")
            R["prefill"][label] = worker("prefill", {"model": models["bf16"], "tokens": 512,
                                                     "reps": 1 if a.quick else 3, "memory": i == 0},
                                         env={"OPENBLAS_CORETYPE": value})
    if want("prefill_versus") and not a.skip_transformers:
        log("prefill_versus: 512-token prefill, transformers bf16 and rgemma alternating, one process")
        R["prefill_versus"] = worker("prefill_versus", {
            "reference": models["bf16"], "models": {k: models[k] for k in ("bf16", "int8", "q4") if k in models},
            "tokens": 512, "rounds": 1 if a.quick else 2})
    if want("transformers") and not a.skip_transformers:
        # without AVX512-BF16 / AMX torch's bf16 matmul has no bf16 instructions: a 2048-token
        # prefill then takes minutes (prefill_versus measures the 512-token one)
        long = not a.quick and _cpu_features().get("avx512bf16", False)
        log("transformers bf16 (torch, 2 threads): prefill and decode at 128 / 512" + (" / 2048" if long else ""))
        R["transformers"] = worker("transformers", {"model": models["bf16"], "tokens": tokens + 2,
                                                    "lengths": [128, 512, 2048] if long else [128, 512]})
    if want("quality"):
        log("quality: KL and top-1 agreement against the unquantized model")
        R["quality"] = {"2b": worker("quality", {"reference": models["bf16"], "tokens": 12 if a.quick else 24,
                                                 "variants": {k: models[k] for k in ("int8", "q4", "q4-emb8") if k in models}})}
        for name, d in small_models(OUT / "small").items():
            small = OUT / "small"
            qs = {"int8": str(quantized(d, 8, out=small / f"{name}-q8")),
                  "q4": str(quantized(d, 4, out=small / f"{name}-q4")),
                  "q4-emb8": str(quantized(d, 4, 8, out=small / f"{name}-q4-emb8"))}
            R["quality"][name] = worker("quality", {"reference": str(d), "tokens": 64, "variants": qs})
    if want("perplexity"):
        demo = WEIGHTS / "demo"
        if (demo / "config.json").exists():
            log("perplexity: the demo model in every format over the held-out text")
            small = OUT / "small"
            R["perplexity"] = worker("perplexity", {"text": str(HELDOUT), "models": {
                "as shipped": str(demo), "int8": str(quantized(demo, 8, out=small / "demo-q8")),
                "q4": str(quantized(demo, 4, out=small / "demo-q4")),
                "q4-emb8": str(quantized(demo, 4, 8, out=small / "demo-q4-emb8"))}})
    if want("elementwise"):
        log("elementwise: the RG-LRU's transcendentals and scan, NumPy against Numba")
        R["elementwise"] = worker("elementwise", {"reps": 3 if a.quick else 7})
    if want("startup"):
        log("startup: `rgemma generate -m demo -n 1`, cold and warm Numba cache")
        R["startup"] = worker("startup", {"model": "demo", "reps": 3 if a.quick else 5})
    if want("flat"):
        log("flat: tokens/s and RSS at the start and end of a long demo generation")
        R["flat"] = worker("flat", {"model": "demo", "tokens": 20_000 if a.quick else 100_000,
                                    "window": 2_000 if a.quick else 10_000})
    if want("fig1a"):
        # Figure 1a: aggregate sampling throughput after a 2k-token prompt against generation
        # length, each system at its best batch size within BUDGET_GB (a few steps per length)
        log("fig1a: batched decode throughput against generation length, rgemma and transformers")
        steps = 1 if a.quick else 2
        lengths = [512, 2048, 32768] if a.quick else LENGTHS
        common = {"budget_gb": BUDGET_GB, "prompt": 2048, "steps": steps, "lengths": lengths,
                  "batch_sizes": [1, 4, 16] if a.quick else BATCH_SIZES}
        R["fig1a"] = {"budget_gb": BUDGET_GB, "prompt": 2048, "rgemma": worker(
            "fig1a_rgemma", {**common, "models": {k: models[k] for k in ("bf16", "int8", "q4") if k in models}})}
        if not a.skip_transformers:
            R["fig1a"]["transformers"] = worker("fig1a_transformers", {
                **common, "recurrentgemma": models["bf16"]}, timeout=7200)
            R["fig1a"]["transformers"]["from_run"] = run["start"]
        elif "transformers" in prev.get("fig1a", {}):
            # the transformers side (~20 min on a CPU without bf16 instructions) kept from the
            # previous run, and labelled with its start time in the report
            old = prev["fig1a"]
            R["fig1a"]["transformers"] = {**old["transformers"],
                                          "from_run": old["transformers"].get("from_run") or next(
                                              (r["start"] for r in prev.get("runs", [])[::-1]
                                               if "fig1a" in r.get("phases", "")), "?")}
    if want("9b") and not a.skip_9b:
        try:
            big = prepare("9b")
            log("9B-shaped bf16: decode within this machine's memory")
            R["9b"] = worker("big", {"model": str(big), "tokens": 3 if a.quick else 5})
        except (subprocess.CalledProcessError, OSError) as e:
            R["9b"] = {"error": str(e)}
    run.update(loadavg_end=os.getloadavg(), minutes=(time.time() - t_start) / 60)
    if not prev:
        R["machine"].update(loadavg_end=run["loadavg_end"], bench_minutes=run["minutes"])
    if a.only and (OUT / "results.json").exists():
        # another `--only` run may have written its phases since this one started: keep them
        latest = json.loads((OUT / "results.json").read_text())
        mine = {k: v for k, v in R.items() if k not in prev or prev[k] is not v}
        for k in ("decode", "versus", "prefill_versus", "quality"):
            # a phase run for some formats (--formats) adds them to the same phase of another run
            old, new = latest.get(k), mine.get(k)
            if isinstance(old, dict) and isinstance(new, dict) and "error" not in old and "error" not in new:
                merged = {**old, **new}
                if "variants" in old and "variants" in new:
                    merged["variants"] = {**old["variants"], **new["variants"]}
                mine[k] = merged
        runs = latest.get("runs", []) + [run]
        R = {**latest, **mine, "runs": runs}
    (OUT / "results.json").write_text(json.dumps(R, indent=1))
    from report import update_cpus, write_report
    cpus = update_cpus(R, CPUS)
    write_report(R, DOC, PLOT, cpus, FIG1A, FIG1A_MEMORY)
    log(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} in {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
