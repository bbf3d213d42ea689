"""Time to first token of turn k of a growing conversation, through `rgemma serve`, with and
without the state cache; and a bounded load test. Writes bench/serve.md (docs/benchmarks.md
includes it; bench/report.py appends it on every `make bench`).

    .venv/bin/python bench/serve_ttft.py [--turns 20] [--models demo weights/bench-2b-bf16]
                                         [--load-only] [--no-load]

Each conversation: turn k sends the k user messages so far and the k-1 replies the server gave
(as a chat client does), asks for `--reply-tokens` tokens, and records the time from sending
the request to the first streamed chunk after the role chunk. "Without" is the same server
with `--state-cache-mb 0`: every turn reads the whole conversation again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "serve.md"

from rgemma_cli import server as srv  # noqa: E402

USER = ("Here is the next part of my question about the garden, the weather and the old "
        "house by the river; what do you think about turn {k}?")


def Server(model, **kw):
    return srv.Background(model, **kw)


def first_chunk(base, body):
    """(seconds to the first chunk after the role chunk, reply text, usage)."""
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj["choices"]:
                if "role" in c["delta"]:
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(c["delta"].get("content") or "")
    return ttft, "".join(text), usage


def conversation(model, turns, reply_tokens):
    """Turns 1..turns against a server with the state cache: per turn the TTFT, the prompt
    and cached token counts, and the request body (replayed without the cache)."""
    s = Server(model, max_batch=1)
    rows = []
    try:
        msgs = []
        for k in range(1, turns + 1):
            msgs.append({"role": "user", "content": USER.format(k=k)})
            body = {"messages": list(msgs), "max_tokens": reply_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            ttft, text, usage = first_chunk(s.base, body)
            rows.append({"turn": k, "ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"],
                         "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                         "body": body})
            print(f"  {model} turn {k}: {ttft:.3f} s, prompt {usage['prompt_tokens']}, cached "
                  f"{rows[-1]['cached_tokens']}", flush=True)
            msgs.append({"role": "assistant", "content": text})
    finally:
        s.stop()
    return rows


def without_cache(model, rows, turns):
    """The same requests (turns in `turns`) to a server without the cache."""
    s = Server(model, max_batch=1, state_cache_mb=0)
    out = {}
    try:
        for r in rows:
            if r["turn"] in turns:
                out[r["turn"]], _, usage = first_chunk(s.base, r["body"])
                assert usage["prompt_tokens_details"]["cached_tokens"] == 0
                print(f"  {model} without cache, turn {r['turn']}: {out[r['turn']]:.3f} s", flush=True)
    finally:
        s.stop()
    return out


def load_test(model, clients=16, requests=64, max_tokens=32, max_batch=16):
    s = Server(model, max_batch=max_batch)
    try:
        def one(i):
            body = {"messages": [{"role": "user", "content": f"Tell me about day {i}."}],
                    "max_tokens": max_tokens, "seed": i, "stream": True,
                    "stream_options": {"include_usage": True}}
            _, _, usage = first_chunk(s.base, body)
            return usage["completion_tokens"]
        first_chunk(s.base, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2,
                             "stream": True, "stream_options": {"include_usage": True}})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - t0
    finally:
        s.stop()
    return {"clients": clients, "requests": requests, "completed": len(tokens),
            "max_tokens": max_tokens, "max_batch": max_batch, "tokens": sum(tokens),
            "seconds": seconds, "tok_s": sum(tokens) / seconds}


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--reply-tokens", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["demo", str(ROOT / "weights" / "bench-2b-bf16")])
    ap.add_argument("--big-turns", type=int, nargs="+", default=[1, 2, 5, 10, 15, 20],
                    help="turns measured without the cache on models other than the demo")
    ap.add_argument("--no-load", action="store_true", help="skip the load test")
    ap.add_argument("--load-only", action="store_true", help="only the load test")
    ap.add_argument("--load-requests", type=int, default=64)
    ap.add_argument("--load-tokens", type=int, default=32)
    a = ap.parse_args()
    saved = ROOT / "bench" / "out" / "serve.json"
    saved.parent.mkdir(exist_ok=True)
    results = json.loads(saved.read_text()) if saved.exists() else {}  # other models' last run
    results.update({"cpu": cpu_name(), "cores": os.cpu_count(),
                    "threads": {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}})
    results.setdefault("ttft", {})
    for model in ([] if a.load_only else a.models):
        if not Path(model).exists() and model != "demo":
            print(f"skipping {model}: not found (bench/run.py makes it)")
            continue
        if model != "demo" and not (Path(model) / "tokenizer.model").exists():
            # a synthetic checkpoint has none; the demo's has Gemma's special ids and 8000 pieces
            shutil.copy(ROOT / "weights" / "demo" / "tokenizer.model", Path(model) / "tokenizer.model")
        rows = conversation(model, a.turns, a.reply_tokens)
        turns = set(range(1, a.turns + 1)) if model == "demo" else set(a.big_turns)
        without = without_cache(model, rows, turns)
        results["ttft"][Path(model).name] = [{**{k: v for k, v in r.items() if k != "body"},
                                             "ttft_without_s": without.get(r["turn"])} for r in rows]
        results.setdefault("args", {})[Path(model).name] = {
            "turns": a.turns, "reply_tokens": a.reply_tokens, "without": sorted(turns),
            "threads": results["threads"]}
        saved.write_text(json.dumps(results, indent=1))
    if not a.no_load:
        results["load"] = load_test("demo", requests=a.load_requests, max_tokens=a.load_tokens)
    results["loadavg"] = os.getloadavg()
    saved.write_text(json.dumps(results, indent=1))
    OUT.write_text(render(results, a))
    print(OUT.read_text())


def render(R, a) -> str:
    L = ["## Server: time to first token", "",
         f"`bench/serve_ttft.py` on {R['cpu']} ({R['cores']} cores; load average "
         f"{R.get('loadavg', [float('nan')])[0]:.1f} at the end of the run, 2.0 = both cores "
         f"busy). Turn k "
         f"sends the whole conversation so far (k user messages of ~30 tokens and the server's "
         f"k-1 replies), as every OpenAI client does, and the time is from sending it to the "
         f"first streamed token. With the state cache the server reads only the new turn "
         f"(`cached` prompt tokens come from the cache); without it (`--state-cache-mb 0`, the "
         f"same requests replayed) it reads the whole conversation. The 2B is the synthetic "
         f"2B-shaped bf16 checkpoint of `make bench` (random weights, the demo's tokenizer).", ""]
    for model, rows in R["ttft"].items():
        m = R.get("args", {}).get(model, {})
        env = " ".join(f"{k}={v}" for k, v in (R.get("threads") or {}).items() if v)
        cmd = (f"{env + ' ' if env else ''}python bench/serve_ttft.py --turns "
               f"{m.get('turns', len(rows))} --reply-tokens {m.get('reply_tokens', '?')}"
               + ("" if model == "demo" else f" --big-turns {' '.join(map(str, m.get('without', [])))}")
               + f" --models {'demo' if model == 'demo' else 'weights/' + model}")
        L += [f"**{model}** (`{cmd}`)", "",
              "| turn | prompt tokens | cached | TTFT with cache (s) | TTFT without (s) |",
              "|---:|---:|---:|---:|---:|"]
        for w in rows:
            wo = "" if w.get("ttft_without_s") is None else f"{w['ttft_without_s']:.2f}"
            L.append(f"| {w['turn']} | {w['prompt_tokens']} | {w['cached_tokens']} | "
                     f"{w['ttft_s']:.2f} | {wo} |")
        L.append("")
    if "load" in R:
        d = R["load"]
        L += ["### Load test (demo)", "",
              f"`python bench/serve_ttft.py --load-only --load-requests {d['requests']} "
              f"--load-tokens {d['max_tokens']}`: {d['clients']} "
              f"concurrent streaming clients, {d['requests']} chat requests of up to "
              f"{d['max_tokens']} tokens, `--max-batch {d['max_batch']}`: {d['completed']} of "
              f"{d['requests']} completed, {d['tokens']} tokens in {d['seconds']:.1f} s = "
              f"**{d['tok_s']:.1f} tok/s** aggregate.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
