"""docs/benchmarks.md and the throughput plot from bench/out/results.json (`bench/run.py`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _head(w, *columns):
    """A Markdown table header."""
    w("| " + " | ".join(columns) + " |")
    w("|" + "---|" * len(columns))


def _ok(flag):
    return "reported" if flag is None else "met" if flag else "**missed**"


def derived(R) -> dict:
    """The ratios the issue asks for, computed from the raw results."""
    d = {}
    dec = R.get("decode", {})
    if "variants" in dec:
        bws = [b["best"] for b in dec["bandwidth"]]
        d["bw"] = float(np.median(bws))
        d["bw_best"] = float(max(bws))
        d["bw_cpu"] = float(np.mean([b["cpu_per_wall"] for b in dec["bandwidth"]]))
        for v, r in dec["variants"].items():
            ceiling = d["bw"] * 1e9 / r["bytes_per_token"]
            # tokens against probes taken just before each of them, so that both sample the
            # same mix of the shared machine's fast and slow stretches: median against median
            # (a single 25 ms probe is too noisy to divide one token by), best against best
            gb = r["bytes_per_token"] / 1e9
            d[v] = {"ceiling": ceiling,
                    "median_frac": gb / float(np.median(r["walls"])) / float(np.median(r["probes"])),
                    "best_frac": gb / min(r["walls"]) / max(r["probes"])}
        pos = dec["positions"]
        if "128" in pos and "32768" in pos:
            fl = [a / b for a, b in zip(pos["32768"]["round_tok_s"], pos["128"]["round_tok_s"])]
            d["flat_median"], d["flat_min"], d["flat_max"] = float(np.median(fl)), min(fl), max(fl)
    vs = R.get("versus", {})
    if "transformers" in vs:
        d["vs"] = {v: r["ratio_median"] for v, r in vs.items() if isinstance(r, dict) and "ratio_median" in r}
    return d


def _fmt_set(xs, nd=1):
    return " / ".join("—" if x is None else f"{x:.{nd}f}" for x in xs)


def update_cpus(R, path: Path) -> dict:
    """bench/cpus.json (committed): one summary per CPU family, this run's replacing the entry
    of the same CPU model, so docs/benchmarks.md keeps a row for every CPU benchmarked."""
    cpus = json.loads(path.read_text()) if path.exists() else {}
    m = R.get("machine", {})
    key = m.get("cpu_model") or m.get("cpu", "?")
    d = derived(R)
    ker, vs, pv = R.get("kernels", {}), d.get("vs", {}), R.get("prefill_versus", {})
    fmts = ("f32", "bf16", "int8", "q4")
    dec = R.get("decode", {}).get("variants", {})
    cpw = [r.get("cpu_per_wall") for r in (ker.get("f32/2", {}), *dec.values()) if r.get("cpu_per_wall")]
    runs = R.get("runs", [{}])
    source = ("make bench" + (" --quick" if any(r.get("quick") for r in runs) else "")
              + (f" (CPU/wall of the 2-thread figures {min(cpw):.2f}-{max(cpw):.2f}: about 2 = both "
                 "cores ours)" if cpw else ""))
    e = {"cpu": key, "features": " ".join(k for k, v in m.get("features", {}).items() if v),
         "date": time.strftime("%Y-%m-%d"), "source": source,
         "probe_gbs": d.get("bw") or ker.get("read_bandwidth", {}).get("best"),
         "kernel_gbs_2t": [ker.get(f"{f}/2", {}).get("best") for f in fmts],
         "variants": ker.get("variants", {}),
         "decode_fraction": [d.get(v, {}).get("median_frac") for v in ("bf16", "int8", "q4")],
         "decode_tok_s": [dec.get(v, {}).get("median") for v in ("bf16", "int8", "q4")],
         "vs_transformers_decode": [vs.get("bf16"), vs.get("q4")],
         "prefill_tok_s": [pv.get(v, {}).get("median") for v in ("transformers", "bf16", "q4")],
         "prefill_vs_transformers": [pv.get(v, {}).get("ratio_median") for v in ("bf16", "q4")]}
    cpus[key] = e
    path.write_text(json.dumps(cpus, indent=1) + "\n")
    return cpus


def cpu_table(w, cpus: dict):
    """The per-CPU-family summary table of docs/benchmarks.md."""
    _head(w, "CPU (features)", "read probe GB/s", "kernel GB/s, 2 threads: f32 / bf16 / int8 / q4",
          "decode, fraction of ceiling: bf16 / int8 / q4", "decode tok/s: bf16 / int8 / q4",
          "decode vs transformers bf16: bf16 / q4", "prefill 512 tok/s: transformers bf16 / rgemma bf16 / q4",
          "source")
    for e in cpus.values():
        ratios = " / ".join("—" if x is None else f"{x:.2f}x" for x in e.get("vs_transformers_decode", []))
        w(f"| {e['cpu']} ({e.get('features') or '?'}) | {_f(e.get('probe_gbs'), 1)} | "
          f"{_fmt_set(e.get('kernel_gbs_2t', []))} | {_fmt_set(e.get('decode_fraction', []), 2)} | "
          f"{_fmt_set(e.get('decode_tok_s', []))} | {ratios} | {_fmt_set(e.get('prefill_tok_s', []))} | "
          f"{e.get('source', '')}, {e.get('date', '')} |")
    w("")


def plot(R, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4))
    pos = R.get("decode", {}).get("positions", {})
    if pos:
        xs = sorted(int(p) for p in pos)
        ax.plot(xs, [pos[str(x)]["best"] for x in xs], "o-", label="rgemma bf16 (best)")
        ax.plot(xs, [pos[str(x)]["median"] for x in xs], "o--", alpha=0.6, label="rgemma bf16 (median)")
    hf = R.get("transformers", {}).get("lengths", {})
    if hf:
        xs = sorted(int(p) for p in hf)
        ax.plot(xs, [hf[str(x)]["decode"]["best"] for x in xs], "s-", label="transformers bf16 (best)")
    for v, style in (("int8", "^"), ("q4", "v")):
        r = R.get("decode", {}).get("variants", {}).get(v)
        if r:
            ax.plot([16], [r["best"]], style, label=f"rgemma {v} (best, position ~16)")
    ax.set_xscale("log")
    ax.set_xlabel("tokens into the generation (position of the decoded token)")
    ax.set_ylabel("decode throughput (tokens/s, batch 1)")
    ax.set_title("RecurrentGemma-2B shapes, 2-core laptop-class CPU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


_NAMES = {"bf16": "rgemma bf16", "int8": "rgemma int8", "q4": "rgemma 4-bit"}


def plot_fig1a(F, path, memory_path) -> bool:
    """The paper's Figure 1a on this CPU (aggregate tokens/s at the best batch size against
    generation length) and memory per sequence against length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rg, tf = F.get("rgemma", {}).get("formats", {}), F.get("transformers", {})
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for fmt, r in rg.items():
        xs = sorted(int(k) for k in r["lengths"])
        ax.plot(xs, [r["lengths"][str(x)]["tok_s"] for x in xs], "o-",
                label=f"{_NAMES.get(fmt, fmt)} (B={r['best_batch']})")
    for key, label in (("recurrentgemma", "transformers RecurrentGemma bf16"),
                       ("gemma", "transformers Gemma-2B bf16")):
        if key in tf:
            xs = sorted(int(k) for k in tf[key]["lengths"])
            ax.plot(xs, [tf[key]["lengths"][str(x)]["tok_s"] for x in xs], "s--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generation length after a 2k-token prompt (tokens)")
    ax.set_ylabel("aggregate sampling throughput (tok/s)")
    ax.set_title(f"Figure 1a on this CPU: best batch size within {F.get('budget_gb')} GB")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lengths = np.array([512, 1024, 2048, 4096, 8192, 16384, 32768])
    prompt = F.get("prompt", 2048)
    for fmt, r in list(rg.items())[:1]:
        ax.plot(lengths, np.full(lengths.shape, r["state_bytes"] / 2**20), "o-",
                label="rgemma (any format): its state")
        ax.plot(lengths, np.full(lengths.shape, r["private_bytes_per_added_sequence"] / 2**20),
                "x:", label="rgemma: private memory per added sequence (measured)")
    if "recurrentgemma" in tf:
        ax.plot(lengths, np.full(lengths.shape, tf["recurrentgemma"]["state_bytes"] / 2**20), "s--",
                label="transformers RecurrentGemma bf16: state")
    if "gemma" in tf:
        ax.plot(lengths, tf["gemma"]["kv_bytes_per_token"] * (prompt + lengths) / 2**20, "s--",
                label="transformers Gemma-2B bf16: KV cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("generation length after a 2k-token prompt (tokens)")
    ax.set_ylabel("memory per sequence (MiB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(memory_path, dpi=110)
    plt.close(fig)
    return True


def fig1a_section(F, w, m) -> None:
    """The Figure 1a tables and the issue's targets, measured in one run."""
    rg, tf = F.get("rgemma", {}).get("formats", {}), F.get("transformers", {})
    if not rg:
        w(f"Figure 1a phase failed: {F.get('rgemma', {}).get('error', '?')}\n")
        return
    w("## Aggregate throughput against generation length\n")
    w(f"CPU: {m.get('cpu', '?')} ({m.get('cpus')} CPUs). Aggregate sampling throughput (tokens/s "
      f"over all sequences of a batch) of decode steps after a {F.get('prompt')}-token prompt, at the "
      f"best batch size whose states / KV caches fit {F.get('budget_gb')} GB besides the weights. "
      "rgemma's state is the same size at every length, so a full-window state with random "
      "contents stands for any length; transformers' caches are filled with random keys and "
      "values up to each length (`bench/workers.py`, `w_fig1a_*`). rgemma: the lengths "
      "interleaved, 3 steps each, median; transformers: 2 steps each, at batch sizes tried "
      "upward until the rate falls.\n")
    if tf.get("from_run"):
        w(f"The transformers rows come from the `fig1a` run started at {tf['from_run']} (the "
          "same machine and day; about 20 minutes on a CPU without bf16 instructions), the "
          "rgemma rows from the latest.\n")
    _head(w, "system", "best B", *[f"{int(k) // 1024}k" if int(k) >= 1024 else k
                                   for k in next(iter(rg.values()))["lengths"]])
    for fmt, r in rg.items():
        w(f"| {_NAMES.get(fmt, fmt)} | {r['best_batch']} | "
          + " | ".join(_f(v["tok_s"]) for v in r["lengths"].values()) + " |")
    for key, label in (("recurrentgemma", "transformers RecurrentGemma"), ("gemma", "transformers Gemma-2B")):
        if key in tf:
            ls = tf[key]["lengths"]
            w(f"| {label} | " + "/".join(sorted({str(v['best_batch']) for v in ls.values()}, key=int))
              + " | " + " | ".join(_f(v["tok_s"]) for v in ls.values()) + " |")
    if "error" in tf:
        w(f"\ntransformers phase failed: {tf['error']}")
    cw = [v["cpu_per_wall"] for r in rg.values() for v in r["lengths"].values() if "cpu_per_wall" in v]
    if cw:
        w(f"\nCPU/wall of the rgemma steps: {np.median(cw):.2f} (2.0 = both cores ours; far below "
          "means other processes held the cores and these figures are bounded by that, not by "
          "the kernels).")
    w("\nBatch sweep (rgemma, aggregate tok/s at 2k + 2k):\n")
    sizes = next(iter(rg.values()))["batch_sizes"]
    _head(w, "format", *[f"B={b}" for b in sizes], "GEMM peak GFLOP/s", "ceiling tok/s")
    for fmt, r in rg.items():
        w(f"| {_NAMES.get(fmt, fmt)} | " + " | ".join(_f(r["sweep"].get(str(b), {}).get("tok_s")) for b in sizes)
          + f" | {_f(r['gemm']['gflops'], 1)} | {_f(r['ceiling_tok_s'])} |")
    b = rg.get("bf16")
    w("\nTargets (ratios from this one run):\n")
    if b and "1" in b["sweep"] and "4" in b["sweep"]:
        x = b["sweep"]["4"]["tok_s"] / b["sweep"]["1"]["tok_s"]
        w(f"- bf16 aggregate at B=4 / B=1: {x:.2f}x (target >= 3.2x): {_ok(x >= 3.2)}")
    if b:
        best = max(v["tok_s"] for v in b["sweep"].values())
        frac = best / b["ceiling_tok_s"]
        w(f"- bf16 at its best B ({b['best_batch']}): {frac:.2f} of the compute ceiling (the "
          f"batched kernel's measured GEMM peak {b['gemm']['gflops']:.1f} GFLOP/s / (2 x "
          f"{b['params_per_token'] / 1e9:.2f} G parameters per token)) (target >= 0.6): {_ok(frac >= 0.6)}")
        for fmt in ("int8", "q4"):
            r = rg.get(fmt)
            sb = str(b["best_batch"])
            if r and sb in r["sweep"]:
                best_q = max(v["tok_s"] for v in r["sweep"].values())
                x = best_q / b["sweep"][sb]["tok_s"]
                w(f"- {_NAMES[fmt]} at its best B ({r['best_batch']}) / bf16 at B={sb}: {x:.2f}x "
                  f"(target >= 2x): {_ok(x >= 2)}")
    for fmt, r in rg.items():
        ls = r["lengths"]
        if "2048" in ls and "32768" in ls:
            x = ls["32768"]["tok_s"] / ls["2048"]["tok_s"]
            w(f"- flat, {_NAMES.get(fmt, fmt)}: 32k / 2k = {x:.2f} (target within 10%): {_ok(abs(1 - x) <= 0.1)}")
    g = tf.get("gemma", {}).get("lengths", {})
    if "2048" in g and "32768" in g:
        w(f"- transformers Gemma-2B: 32k / 2k = {g['32768']['tok_s'] / g['2048']['tok_s']:.2f} "
          f"(best B {g['2048']['best_batch']} -> {g['32768']['best_batch']}: its KV cache grows "
          f"{tf['gemma']['kv_bytes_per_token'] / 1024:.0f} KiB per token per sequence)")
    if b:
        w(f"- memory: private memory per added sequence {b['private_bytes_per_added_sequence'] / 1e6:.1f} MB "
          f"against its state {b['state_bytes'] / 1e6:.1f} MB (target: ~ the state)")
    w("")


def write_report(R, doc: Path, png: Path, cpus: dict | None = None,
                 fig1a_png: Path | None = None, fig1a_memory_png: Path | None = None):
    d = derived(R)
    m = R.get("machine", {})
    L = []
    w = L.append
    w("# Benchmarks\n")
    w("Generated by `make bench` (`.venv/bin/python bench/run.py`) on "
      f"{time.strftime('%Y-%m-%d')}; raw numbers in `bench/out/results.json` (not committed). "
      "Random weights with the real 2B / 9B shapes (`rgemma_cli.testing.synth`); int8 and 4-bit files made "
      "from them with `rgemma_cli.quantize.quantize_checkpoint`.\n")
    w(f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {_f(m.get('mem_gb'), 1)} GB; numpy "
      f"{m.get('numpy')}, numba {m.get('numba')}; OPENBLAS_CORETYPE in the environment: "
      f"`{m.get('OPENBLAS_CORETYPE')}`. Load average at start {tuple(round(x, 1) for x in m.get('loadavg_start', ()))}, "
      f"at end {tuple(round(x, 1) for x in m.get('loadavg_end', ()))}; the run took "
      f"{_f(m.get('bench_minutes'), 1)} min.\n")
    for r in R.get("runs", [])[1:]:
        w(f"Phases `{r['phases']}` were re-run at {r['start']} ({_f(r.get('minutes'), 1)} min, load average "
          f"{tuple(round(x, 1) for x in r['loadavg_start'])}) with `bench/run.py --only`.\n")
    w("The machine is shared. Every figure is given as best and median of interleaved samples, "
      "with the process CPU time / wall time over those samples: about 2.0 means both cores were "
      "ours, about 1.0 or less means another process held a core and the 2-thread kernels waited "
      "for it (docs/kernels.md#one-thread-pool-at-a-time). Ratios compare measurements taken side by side in this run.\n")
    quiet = []
    for k in ("kernels", "decode", "versus", "prefill_versus", "transformers", "perplexity", "9b"):
        if isinstance(R.get(k), dict) and "busy_cores_before" in R[k]:
            quiet.append(f"{k} {R[k]['busy_cores_before']} (waited {R[k]['waited_s']} s)")
    for k, r in R.get("prefill", {}).items():
        if "busy_cores_before" in r:
            quiet.append(f"prefill/{k} {r['busy_cores_before']} (waited {r['waited_s']} s)")
    if quiet:
        runs = R.get("runs", [{}])
        wait = runs[-1].get("max_wait", 300)
        w(f"Cores kept busy by other processes just before each phase (the bench waits up to {wait:.0f} s "
          "for less than 0.15): " + "; ".join(quiet) + ".\n")
        if any(r.get("quick") for r in runs):
            w("This run used `bench/run.py --quick` (fewer rounds and tokens per figure).\n")
    if cpus:
        w("## Per CPU family\n")
        w("One row per CPU model benchmarked (`bench/cpus.json`, updated by each `make bench` for "
          "its own CPU; the features are LLVM's names for what the kernels can use). Every "
          "figure below this table is from this run's CPU: "
          f"**{m.get('cpu_described', m.get('cpu', '?'))}**.\n")
        cpu_table(w, cpus)
        cpw = [r["cpu_per_wall"] for k, r in R.get("kernels", {}).items() if k.endswith("/2")]
        if cpw and max(cpw) < 1.5:
            w(f"**This run's figures are not this CPU's capability**: its 2-thread kernels had "
              f"{max(cpw):.2f} of the 2 cores on average (process CPU time / wall time; load average "
              f"{m.get('loadavg_start', [0])[0]:.0f} at the start: other processes held the cores and "
              "the memory bus). They show that every path runs and what each CPU is given "
              "(variants), not speed; re-run `make bench` on a quiet machine.\n")
    head = len(L)

    ker = R.get("kernels", {})
    if "read_bandwidth" in ker:
        w("## Kernels alone (`rgemma bench`: matvec of 7680 x 2560 weights, copies cycled: not cache-resident)\n")
        w("GB/s of weight bytes streamed (4-bit: packed nibbles + bf16 group scales), and the kernel "
          "variant this CPU runs (`rgemma_cli/kernels/cpu.py` picks it from the CPU's features at "
          "start-up). Read bandwidth in the same process: "
          f"{_f(ker['read_bandwidth']['best'], 1)} GB/s best.\n")
        _head(w, 'format', '1 thread best', 'median', 'CPU/wall', '2 threads best', 'median', 'CPU/wall', 'kernel variant')
        for k in ("f32", "bf16", "int8", "q4"):
            a, b = ker.get(f"{k}/1"), ker.get(f"{k}/2")
            if a and b:
                w(f"| {k} | {_f(a['best'], 1)} | {_f(a['median'], 1)} | {_f(a['cpu_per_wall'])} | "
                  f"{_f(b['best'], 1)} | {_f(b['median'], 1)} | {_f(b['cpu_per_wall'])} | "
                  f"{ker.get('variants', {}).get(k, '')} |")
        w("")
        w("The 2-thread CPU/wall of a single format is rough here: Linux accounts the worker "
          "thread's CPU time at scheduler ticks, and these calls take well under a tick, so part "
          "of one format's CPU time can land on the format timed next (their mean is what holds).\n")

    dec = R.get("decode", {})
    if "variants" in dec:
        w("## Decode (batch 1, 2B shapes)\n")
        w(f"Read bandwidth (vectorised Numba read of 1 GiB, 2 threads, probed before every round): "
          f"median of the round bests **{_f(d['bw'], 1)} GB/s**, best {_f(d['bw_best'], 1)}, "
          f"CPU/wall {_f(d['bw_cpu'])}. Ceiling = that bandwidth / bytes of weights read per token.\n")
        w("Fraction of the ceiling: a read of the probe array (1 GiB, ~25 ms) is taken just before "
          "every timed token, so tokens and probes sample the same mix of the shared memory bus's "
          "states; median token rate x bytes / median probe, and best / best. (The 'ceiling tok/s' "
          "column uses the median of the round probes.)\n")
        _head(w, 'weights', 'GB read / token', 'tok/s best', 'tok/s median', 'ceiling tok/s', 'fraction of ceiling: median', 'best', 'CPU/wall', 'vs transformers (paired)')
        for v, r in dec["variants"].items():
            vs = f"{d['vs'][v]:.2f}x" if v in d.get("vs", {}) else "—"
            w(f"| {v} | {r['bytes_per_token'] / 1e9:.2f} | {_f(r['best'])} | {_f(r['median'])} | "
              f"{_f(d[v]['ceiling'])} | {_f(d[v]['median_frac'])} | {_f(d[v]['best_frac'])} | "
              f"{_f(r['cpu_per_wall'])} | {vs} |")
        w("")
        w("4-bit: groups of 64 with bf16 scales (4.25 bits per weight), the tied embedding / output "
          "head included (`q4`, the default of `--bits 4`), or with an int8 head "
          "(`--embedding-bits 8`: `q4-emb8`); see `rgemma_cli/quantize.py`.\n")
        pos = dec["positions"]
    if "variants" in dec and pos:
        w("### Decode rate against position in one generation (bf16)\n")
        _head(w, 'position', 'tok/s best', 'tok/s median', 'CPU/wall')
        for p in sorted(pos, key=int):
            w(f"| {p} | {_f(pos[p]['best'])} | {_f(pos[p]['median'])} | {_f(pos[p]['cpu_per_wall'])} |")
        w("")
        lp = dec.get("long_prefill", {})
        w(f"How: 128 and {lp.get('tokens')} are real prefills of random prompts (the "
          f"{lp.get('tokens')}-token prompt, which fills the attention window, took "
          f"{_f(lp.get('tok_s'), 1)} tok/s, CPU/wall {_f(lp.get('cpu_per_wall'))}). 4096 and 32768 are "
          "that state with its position advanced by whole windows: the ring buffer of keys keeps "
          "its layout and the work per token depends on the position only through the window fill "
          "(full from 2048 on: RG-LRU state is fixed-size, attention reads at most 2048 keys), so "
          "this times decoding at those positions without decoding 32k tokens first. Positions are "
          "interleaved round by round.\n")
        if "flat_median" in d:
            w(f"32k / 128 decode rate, round by round: median {_f(d['flat_median'], 3)} (from "
              f"{_f(d['flat_min'], 3)} to {_f(d['flat_max'], 3)}).\n")

    pre = R.get("prefill", {})
    if pre:
        w("## Prefill (512-token prompt, last logits only) against the sgemm peak\n")
        w("Each row is one process with OPENBLAS_CORETYPE as labelled (the bench command alone changes "
          "it). sgemm peak = best of (512x2560 @ 2560x7680) and 2048^3 in that process, 2 threads. "
          "FLOPs per token = 2 x non-embedding parameters.\n")
        _head(w, 'OPENBLAS_CORETYPE', 'OpenBLAS core', 'sgemm peak GFLOP/s', 'prefill tok/s best', 'median', 'GFLOP/s', 'fraction of peak', 'CPU/wall')
        for label, r in pre.items():
            if "error" in r:
                w(f"| {label} | error: {r['error'][-80:]} |")
                continue
            p = r["prefill"]
            w(f"| {label} | {r['corename']} | {_f(r['sgemm_peak'], 0)} | {_f(p['best'], 1)} | {_f(p['median'], 1)} | "
              f"{_f(p['gflops_best'], 0)} | {_f(p['fraction_of_sgemm_peak'])} | {_f(p['cpu_per_wall'])} |")
        w("")

    hf = R.get("transformers", {})
    if "lengths" in hf:
        w("## transformers bf16 on the same checkpoint (torch, "
          f"{hf['threads']} threads)\n")
        _head(w, 'prompt tokens', 'prefill tok/s', 'prefill CPU/wall', 'decode tok/s best', 'median', 'decode CPU/wall')
        for Lk, r in hf["lengths"].items():
            w(f"| {Lk} | {_f(r['prefill_tok_s'], 1)} | {_f(r['prefill_cpu_per_wall'])} | {_f(r['decode']['best'])} | "
              f"{_f(r['decode']['median'])} | {_f(r['decode']['cpu_per_wall'])} |")
        w("")
    elif hf:
        w(f"## transformers\n\nfailed: `{hf.get('error')}`\n")

    pv = R.get("prefill_versus", {})
    if "transformers" in pv:
        w(f"## Prefill against transformers, side by side ({pv['tokens']}-token prompt)\n")
        w(f"One process alternates {len(pv['rounds']['transformers'])} rounds: transformers bf16 "
          "(`generate(max_new_tokens=1)`, torch 2 threads), then rgemma's prefill (`forward(last_only="
          "True)`, the exact f32 path: weights widened by blocks, OpenBLAS sgemm) of each format. "
          "Ratio: transformers' time / rgemma's, per round.\n")
        _head(w, 'weights', 'tok/s best', 'tok/s median', 'CPU/wall', 'vs transformers bf16: median', 'min', 'max')
        for v, r in pv.items():
            if isinstance(r, dict) and "best" in r:
                ratio = (f"{r['ratio_median']:.2f}x | {r['ratio_min']:.2f}x | {r['ratio_max']:.2f}x"
                         if "ratio_median" in r else "1 | |")
                w(f"| {'transformers bf16' if v == 'transformers' else 'rgemma ' + v} | {_f(r['best'], 1)} | "
                  f"{_f(r['median'], 1)} | {_f(r.get('cpu_per_wall'))} | {ratio} |")
        w("")
    elif pv:
        w(f"## Prefill against transformers\n\nfailed: `{pv.get('error')}`\n")

    vs = R.get("versus", {})
    if "transformers" in vs:
        w("## rgemma against transformers, side by side\n")
        w(f"One process alternates {len(vs['rounds']['transformers'])} rounds of {vs['tokens_per_round']} "
          "decoded tokens: transformers bf16 (torch, 2 threads, 64-token prompt), then each rgemma "
          "variant, each library's thread pool idle for 0.5 s before the other's turn. The ratio is "
          "the median over rounds of (rgemma's median token time / transformers' in the same round), "
          "so a slow or fast stretch of the shared machine moves both sides of a ratio together. "
          "The targets use it.\n")
        _head(w, 'weights', 'tok/s best', 'tok/s median', 'vs transformers bf16: median ratio', 'min', 'max')
        t = vs["transformers"]
        w(f"| transformers bf16 | {_f(t['best'])} | {_f(t['median'])} | 1 | | |")
        for v, r in vs.items():
            if isinstance(r, dict) and "ratio_median" in r:
                w(f"| rgemma {v} | {_f(r['best'])} | {_f(r['median'])} | {r['ratio_median']:.2f}x | "
                  f"{r['ratio_min']:.2f}x | {r['ratio_max']:.2f}x |")
        w("")
    elif vs:
        w(f"## rgemma against transformers\n\nfailed: `{vs.get('error')}`\n")

    w("## Memory (2B bf16: load, 512-token prefill, 8 decoded tokens)\n")
    _head(w, '', 'peak private (anonymous) GB', 'peak file-backed GB', 'weights GB')
    mem = next((r["memory"] for r in pre.values() if "memory" in r), None)
    if mem:
        w(f"| rgemma | {_f(mem['peak_private_gb'])} | {_f(mem['peak_file_gb'])} | {_f(mem['weights_gb'])} |")
    if "memory" in hf:
        w(f"| transformers | {_f(hf['memory']['peak_private_gb'])} | {_f(hf['memory']['peak_file_gb'])} | |")
    w("\nrgemma memory-maps the weights: they are file-backed pages of the page cache, shared and "
      "reclaimable, not private memory.\n")

    q = R.get("quality", {})
    if q:
        w("## Quantization quality (next-token distributions against the unquantized model)\n")
        w("Teacher-forced on the decode path over the same random tokens; KL(p_ref || p_quant) in nats.\n")
        _head(w, 'model', 'positions', 'weights', 'mean KL', 'max KL', 'top-1 agreement')
        for name, r in q.items():
            if "error" in r:
                w(f"| {name} | error | | | | |")
                continue
            for v, x in r.items():
                if isinstance(x, dict):
                    w(f"| {name} | {r['positions']} | {v} | {_f(x['mean_kl'], 4)} | {_f(x['max_kl'], 4)} | "
                      f"{_f(x['top1_agreement'])} |")
        w("\n`tiny-80` is the parity fixtures' config: its widths (80) are not whole 4-bit groups, so "
          "its '4-bit' file is int8 except where a width is a multiple of 64. `demo` (when present) is "
          "the project's small trained model in weights/demo. Random weights say how much the "
          "numerics move, not how a trained model's text changes.\n")

    pp = R.get("perplexity", {})
    if pp and "error" not in pp:
        w("## Perplexity of the demo model on held-out text\n")
        w(f"`rgemma perplexity -m MODEL bench/heldout/{pp.get('text')}`: teacher-forced over the whole "
          "file as one sequence (chunks of 512 with the state carried across), every token after "
          "BOS scored. The text (bench/heldout/README.md) is public domain and outside the demo's "
          "training corpus. 'as shipped' is weights/demo as stored (bf16 matrices); the others are "
          "its quantized copies. Relative change: perplexity / as shipped - 1 (target of issue 13 "
          "for a fast path: within 1%). Rate: tokens/s of the whole forward passes, 2 threads.\n")
        _head(w, 'weights', 'tokens', 'perplexity', 'mean NLL (nats)', 'relative change', 'tok/s')
        base = pp.get("as shipped", {}).get("perplexity")
        for v, r in pp.items():
            if isinstance(r, dict):
                rel = f"{r['perplexity'] / base - 1:+.2%}" if base else "—"
                w(f"| {v} | {r['tokens']} | {_f(r['perplexity'], 2)} | {_f(r['nll'], 4)} | {rel} | "
                  f"{_f(r['tokens_per_second'], 0)} |")
        w("")
    elif pp:
        w(f"## Perplexity\n\nfailed: `{pp.get('error')}`\n")

    big = R.get("9b")
    if big:
        w("## 9B shapes, bf16\n")
        if "error" in big:
            w(f"failed or skipped: `{big['error']}`\n")
        else:
            ceiling = big["bandwidth"]["best"] * 1e9 / big["bytes_per_token"]
            w(f"Weights read per token {big['bytes_per_token'] / 1e9:.2f} GB on a {_f(big['mem_total_gb'], 1)} GB "
              f"machine. Decode {_f(big['decode']['best'])} tok/s best, {_f(big['decode']['median'])} median "
              f"(CPU/wall {_f(big['decode']['cpu_per_wall'])}); ceiling at the bandwidth measured in that "
              f"process ({_f(big['bandwidth']['best'], 1)} GB/s): {_f(ceiling)} tok/s. Peak private memory "
              f"{_f(big['peak_private_gb'])} GB, file-backed {_f(big['peak_file_gb'])} GB.\n")

    targets = []
    vs = d.get("vs", {})
    for v in ("bf16", "int8", "q4"):
        if v in d:
            targets.append((f"{v} decode >= 0.85 of its bandwidth ceiling",
                            f"{_f(d[v]['median_frac'])} (medians; best {_f(d[v]['best_frac'])})",
                            d[v]["median_frac"] >= 0.85))
    var = dec.get("variants", {})
    if "bf16" in var and "int8" in var and "q4" in var:
        a, b = var["int8"]["median"] / var["bf16"]["median"], var["q4"]["median"] / var["int8"]["median"]
        targets.append(("int8 about 2x bf16, 4-bit faster still (decode tok/s, medians)",
                        f"int8 {a:.2f}x bf16, q4 {b:.2f}x int8", a >= 1.8 and b > 1))
    if "bf16" in vs:
        targets.append(("bf16 / 4-bit decode vs transformers bf16 (paired; reported, not a target)",
                        f"{vs['bf16']:.2f}x / {vs.get('q4', float('nan')):.2f}x", None))
    pv = R.get("prefill_versus", {})
    for v in ("bf16", "q4"):
        if "ratio_median" in pv.get(v, {}):
            targets.append((f"prefill 512: rgemma {v} >= 1.0x transformers' bf16 (paired)",
                            f"{pv[v]['ratio_median']:.2f}x", pv[v]["ratio_median"] >= 1.0))
    fr = [r["prefill"]["fraction_of_sgemm_peak"] for r in pre.values() if "prefill" in r]
    if fr:
        targets.append(("exact f32 prefill >= 0.7 of the sgemm peak (same process)", ", ".join(
            f"{k}: {_f(r['prefill']['fraction_of_sgemm_peak'])}" for k, r in pre.items() if "prefill" in r), min(fr) >= 0.7))
    if "flat_median" in d:
        targets.append(("decode at 32k within 5% of decode at 128", f"{_f(d['flat_median'], 3)} (median of paired rounds)", abs(1 - d["flat_median"]) <= 0.05))
    if mem:
        targets.append(("private RSS < 0.5 GB for the 2B", f"{_f(mem['peak_private_gb'])} GB", mem["peak_private_gb"] < 0.5))
    if targets:
        T = [f"## Targets of issues 13 and 4 (this run, {m.get('cpu_model', m.get('cpu', '?'))})\n", "| target | measured | |", "|---|---|---|"]
        T += [f"| {t} | {v} | {_ok(ok)} |" for t, v, ok in targets] + [""]
        L[head:head] = T
    ew = R.get("elementwise")
    if ew and "error" not in ew:
        w("## Where the RG-LRU's elementwise work runs (2B width, milliseconds, best of 7)\n")
        w("The PyPI llvmlite has no SVML, so `exp`/`log` in a Numba loop are scalar calls. Measured "
          "here, the gates and decay run as NumPy ufuncs and only the recurrence `h = a*h + x` runs "
          "in Numba (`kernels.rg_lru_scan`); that is what `model.rg_lru` does.\n")
        _head(w, "work", "2048-token chunk ms", "one decoded row ms")
        for name in ("elementwise, NumPy ufuncs", "elementwise, Numba loop", "scan, NumPy loop over time",
                     "scan, Numba kernel"):
            w(f"| {name} | {_f(ew.get(f'{name}/2048'), 2)} | {_f(ew.get(f'{name}/1'), 3)} |")
        w("")
    su = R.get("startup")
    if su and "error" not in su:
        w("## Start-up: first token of the demo model\n")
        w("Wall time of `rgemma generate -m demo -n 1 -t 0 \"Hello\"` from launch to exit (Python "
          "start, imports, memory-mapping the weights, the prompt and one token). Cold: an empty "
          "Numba cache, every kernel compiles; warm: the cache `cache=True` leaves behind.\n")
        _head(w, "cold s", "warm best s", "warm median s", "target: warm < 1.5 s")
        w(f"| {_f(su.get('cold_s'))} | {_f(su.get('warm_best_s'))} | {_f(su.get('warm_median_s'))} | "
          f"{_ok(su.get('warm_median_s', 9) < 1.5)} |\n")
    fl = R.get("flat")
    if fl and "error" not in fl and "plain" in fl:
        w("## A long generation stays flat (issue 11, item 7)\n")
        w(f"The demo model generating {fl['tokens']:,} sampled tokens (stop tokens ignored) in one "
          f"call, tokens/s and RSS measured per window of {fl['window']:,} tokens (`bench/run.py "
          f"--only flat`). plain: as `rgemma generate` (no ids or text kept); kept: as with "
          f"`--json` / `--save-state` (ids, text and transcript kept: they grow by what they hold).\n")
        _head(w, "run", "tok/s first window", "tok/s last window", "last / first", "RSS start MB",
              "RSS end MB", "RSS bytes per token")
        for k in ("plain", "kept"):
            r = fl.get(k, {})
            if "tokens_per_s_first" in r:
                w(f"| {k} | {_f(r['tokens_per_s_first'], 0)} | {_f(r['tokens_per_s_last'], 0)} | "
                  f"{_f(r['rate_last_over_first'])} | {_f(r['rss_start_mb'], 1)} | "
                  f"{_f(r['rss_end_mb'], 1)} | {_f(r['rss_bytes_per_token'], 1)} |")
        w("")
    w("## What bounds these numbers\n")
    shares = {v: r["share"] for v, r in dec.get("variants", {}).items() if "share" in r}
    if shares:
        w("Where a decoded token's time goes (`decode` worker, the kernels timed through wrappers "
          "for a few tokens after the rounds above): the weight-streaming kernels (every matvec, "
          "with the quantization of activations for the integer dots, and the RG-LRU gate "
          "blocks), and everything else, which runs on one core between the kernels.\n")
        _head(w, 'weights', 'token ms', 'weight kernels ms', 'kernel GB/s', 'other ms', 'other share')
        for v, sh in shares.items():
            gbs = dec["variants"][v]["bytes_per_token"] / 1e6 / sh["weights_ms"]
            w(f"| {v} | {_f(sh['token_ms'], 1)} | {_f(sh['weights_ms'], 1)} | {_f(gbs, 1)} | "
              f"{_f(sh['other_ms'], 1)} | {_f(sh['other_ms'] / sh['token_ms'])} |")
        w("")
    feats = m.get("features", {})
    ker_frac = {k: ker[f"{k}/2"]["best"] / ker["read_bandwidth"]["best"]
                for k in ("f32", "bf16", "int8", "q4") if f"{k}/2" in ker and "read_bandwidth" in ker}
    slow = [k for k, f in ker_frac.items() if f < 0.85]
    w("- Decode: a format whose kernel alone streams at >= 0.85 of the probe (kernel table) is "
      "bound by the memory bus; " + (f"here {', '.join(slow)} did not (compute per byte: widening, "
      "integer dots and scales, on a core without the wider integer-dot instructions), "
      if slow else "here all did, ") + "and the 'other' column (RMSNorm, GELU, RoPE, the RG-LRU "
      "gates, attention and Python glue, ~150 small NumPy calls per token on one core) is a fixed "
      "cost that weighs most on the smallest (4-bit) tokens.")
    vsr = R.get("versus", {})
    if "bf16" in vsr and "transformers" in vsr:
        b, q = vsr["bf16"], vsr.get("q4", {})
        w("- Against transformers: rgemma is bound by the memory bus and transformers mostly is "
          "not, so the ratio moves with the state of the bus. Round by "
          f"round: bf16 {b['ratio_min']:.2f}x to {b['ratio_max']:.2f}x"
          + (f", 4-bit {q['ratio_min']:.2f}x to {q['ratio_max']:.2f}x" if q else "")
          + " in this run; the targets use the median.")
    bf16_units = feats.get("avx512bf16") or feats.get("amx-bf16")
    w("- Prefill: rgemma's exact path widens weight blocks to f32 and runs OpenBLAS sgemm, bounded "
      "by the f32 FMA peak of 2 cores. " + (
          "This CPU has bf16 dot-product instructions (AVX512-BF16 / AMX), which torch's bf16 "
          "matmul (oneDNN) uses: it can pass the f32 peak, and only kernels on those instructions "
          "(not written yet) would catch it." if bf16_units else
          "This CPU has no bf16 instructions (no AVX512-BF16, no AMX): torch's bf16 matmul converts "
          "in software and runs far below the f32 sgemm, so the exact f32 path is ahead of "
          "transformers' bf16 (prefill table). An int8 x int8 GEMM (vpmaddubsw / vpmaddwd) could "
          "at most double the f32 FMA rate on AVX2 and is not written yet."))
    w("- The shared machine's memory bus changes state over minutes, so the decode fractions "
      "interleave a probe before every token, and every comparison with transformers alternates "
      "rounds. In the fast stretches the fraction of the probe drops (the kernels and the fixed "
      "cost do not speed up with the bus).")
    w("- Every 2-thread figure needs both cores free: with one core taken by another process the "
      "parallel kernels wait at each of the ~165 barriers per token (CPU/wall near 1.0 flags it).\n")
    if plot(R, png):
        w(f"## Throughput against generation length\n\n![decode throughput]({png.name})\n")
    serve = Path(__file__).resolve().parent / "serve.md"  # bench/serve_ttft.py's last run
    if serve.exists():
        w(serve.read_text())
    if "fig1a" in R and fig1a_png is not None:
        fig1a_doc = doc.parent / "figure-1a.md"
        write_fig1a(R["fig1a"], m, fig1a_doc, fig1a_png, fig1a_memory_png)
        w(f"## Batched decoding (the paper's Figure 1a)\n\nSee [{fig1a_doc.name}]({fig1a_doc.name}).\n")
    doc.write_text("\n".join(L) + "\n")


def write_fig1a(F, machine: dict, doc: Path, png: Path, memory_png: Path) -> None:
    """docs/figure-1a.md and its two plots from the fig1a phase's results."""
    L = []
    w = L.append
    w("# Batched decoding: the paper's Figure 1a on a CPU\n")
    w(f"Generated by `make bench` (phase `fig1a`: `bench/run.py --only fig1a`) on "
      f"{time.strftime('%Y-%m-%d')}.\n")
    fig1a_section(F, w, machine)
    if plot_fig1a(F, png, memory_png):
        w(f"![Figure 1a: throughput against length]({png.name})\n")
        w(f"![memory per sequence against length]({memory_png.name})\n")
    doc.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    R = json.loads((root / "bench" / "out" / "results.json").read_text())
    cpus = update_cpus(R, root / "bench" / "cpus.json")
    write_report(R, root / "docs" / "benchmarks.md", root / "docs" / "bench-throughput.png", cpus,
                 root / "docs" / "bench-fig1a-throughput.png", root / "docs" / "bench-fig1a-memory.png")
    sys.exit(0)
