"""Regenerate the parity fixtures in tests/fixtures/ by running BOTH public references.

    make fixtures            # or: .venv/bin/python scripts/make_fixtures.py [--check-layout]

For each entry of FIXTURES: build the weights with scripts/synth.py (spec §8.2 rule, a seed),
write them as a real HF checkpoint, load it with transformers' `RecurrentGemmaForCausalLM`
(built with attention_window_size = W + 1, which equals the official window rule, spec §4.3) and
build the official `recurrentgemma` torch `Griffin` from the same values (names mapped per spec
§5.2); run both in float32 on a sequence reaching past 2x the window (BOS at position 0); assert
they agree to 1e-5; save tokens, full-sequence logits of each reference and the official state
after the sequence (RG-LRU h, conv inputs, K/V ring) as `tests/fixtures/<name>.npz`; write
`tests/fixtures/summary.json` with the max |Δ| numbers for the parity table.

bf16 fixtures: the references run in float32 on the bf16-ROUNDED weights (our reference of
record, spec §4.1). The official package supports exactly one K/V head, so multi-KV-head configs
are compared against transformers only.

Needs the `reference` extra (torch, transformers, recurrentgemma, jaxtyping, einops). The
official package's `__init__` imports its JAX half (jax + flax); `import_official()` imports
`recurrentgemma.torch` without running that `__init__`, so jax/flax are not needed.
The functions here are also used by tests/test_reference_live.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import synth  # noqa: E402
from rgemma_cli.config import ATTENTION, ModelConfig  # noqa: E402

FIXTURE_DIR = ROOT / "tests" / "fixtures"
TOL = 1e-5

# name -> how to make it. `tokens` reaches past 2x the window in every config.
FIXTURES = {
    "tiny80": dict(config="tiny-80", seed=0, dtype="f32", n_tokens=40, token_seed=1),
    "tiny80_bf16": dict(config="tiny-80", seed=0, dtype="bf16", n_tokens=40, token_seed=1),
    "mkv": dict(config="mkv", seed=3, dtype="f32", n_tokens=40, token_seed=4),
    "lru": dict(config="lru", seed=5, dtype="f32", n_tokens=30, token_seed=6),
    "pattern": dict(config="pattern", seed=7, dtype="f32", n_tokens=27, token_seed=8),
}


def fixture_weights(spec: dict) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The float32 weight values a fixture was made from (bf16 fixtures: the rounded values)."""
    cfg = synth.get_config(spec["config"])
    w = synth.spec_weights(cfg, spec["seed"])
    if spec["dtype"] == "bf16":
        w = synth.bf16_round(w)
    return cfg, w


def weights_checksum(weights: dict[str, np.ndarray]) -> float:
    return float(sum(float(weights[n].astype(np.float64).sum()) for n in sorted(weights)))


# -- the references ---------------------------------------------------------------------------

def import_official():
    """`recurrentgemma.torch` without the package `__init__` (which imports jax and flax)."""
    if "recurrentgemma.torch" in sys.modules:
        return sys.modules["recurrentgemma.torch"]
    try:
        import recurrentgemma.torch as rg  # works when jax + flax are installed
        return rg
    except ImportError:
        for k in [k for k in sys.modules if k == "recurrentgemma" or k.startswith("recurrentgemma.")]:
            del sys.modules[k]
    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official 'recurrentgemma' package is not installed")
    pkg = types.ModuleType("recurrentgemma")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["recurrentgemma"] = pkg
    import recurrentgemma.torch as rg
    return rg


def official_supports(cfg: ModelConfig) -> bool:
    """The official Griffin has one K/V head, head_dim = D/H and RoPE on exactly half the dims."""
    return (cfg.num_key_value_heads == 1 and cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
            and cfg.partial_rotary_factor == 0.5 and cfg.rope_theta == 10000.0
            and cfg.conv1d_width == 4 and cfg.logits_soft_cap == 30.0)


def official_model(cfg: ModelConfig, weights: dict[str, np.ndarray]):
    """The official torch Griffin (float32) holding `weights` (HF names, mapped per spec §5.2)."""
    import torch
    rg = import_official()
    kinds = {"recurrent": rg.TemporalBlockType.RECURRENT, "attention": rg.TemporalBlockType.ATTENTION}
    gc = rg.GriffinConfig(
        vocab_size=cfg.vocab_size, width=cfg.hidden_size, mlp_expanded_width=cfg.mlp_width,
        num_heads=cfg.num_attention_heads, block_types=tuple(kinds[k] for k in cfg.layer_types),
        embeddings_scale_by_sqrt_dim=True, attention_window_size=cfg.attention_window_size,
        logits_soft_cap=cfg.logits_soft_cap, lru_width=cfg.lru_width)
    model = rg.Griffin(gc, gradient_checkpointing=False, dtype=torch.float32)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    sd = {"embedder.input_embedding": t(weights["model.embed_tokens.weight"]),
          "final_norm.scale": t(weights["model.final_norm.weight"])}
    for i, kind in enumerate(cfg.layer_types):
        hp, op = f"model.layers.{i}.", f"blocks.{i}."
        g = lambda n: weights[hp + n]  # noqa: E731
        sd[op + "temporal_pre_norm.scale"] = t(g("temporal_pre_norm.weight"))
        sd[op + "channel_pre_norm.scale"] = t(g("channel_pre_norm.weight"))
        sd[op + "mlp_block.ffw_up.w"] = t(np.stack([g("mlp_block.gate_proj.weight").T,
                                                    g("mlp_block.up_proj.weight").T]))
        sd[op + "mlp_block.ffw_up.b"] = t(np.stack([g("mlp_block.gate_proj.bias"),
                                                    g("mlp_block.up_proj.bias")])[:, None, None, :])
        sd[op + "mlp_block.ffw_down.weight"] = t(g("mlp_block.down_proj.weight"))
        sd[op + "mlp_block.ffw_down.bias"] = t(g("mlp_block.down_proj.bias"))
        tb = "temporal_block."
        if kind == ATTENTION:
            for h, o in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v"),
                         ("o_proj", "proj_final")):
                sd[op + f"attention_block.{o}.weight"] = t(g(tb + h + ".weight"))
            sd[op + "attention_block.proj_final.bias"] = t(g(tb + "o_proj.bias"))
        else:
            rb = op + "recurrent_block."
            for n in ("linear_x", "linear_y", "linear_out"):
                sd[rb + n + ".weight"] = t(g(tb + n + ".weight"))
                sd[rb + n + ".bias"] = t(g(tb + n + ".bias"))
            sd[rb + "conv_1d.w"] = t(g(tb + "conv_1d.weight")[:, 0, :].T)
            sd[rb + "conv_1d.b"] = t(g(tb + "conv_1d.bias"))
            sd[rb + "rg_lru.a_param"] = t(g(tb + "rg_lru.recurrent_param"))
            sd[rb + "rg_lru.input_gate.w"] = t(g(tb + "rg_lru.input_gate_weight"))
            sd[rb + "rg_lru.input_gate.b"] = t(g(tb + "rg_lru.input_gate_bias"))
            sd[rb + "rg_lru.a_gate.w"] = t(g(tb + "rg_lru.recurrent_gate_weight"))
            sd[rb + "rg_lru.a_gate.b"] = t(g(tb + "rg_lru.recurrent_gate_bias"))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def official_run(model, tokens, chunks=None):
    """Logits (T, V) float32 and the cache, feeding `tokens` in `chunks` (default: one chunk).

    The official code accepts a prompt on an empty cache and then only 1-token steps (a longer
    chunk on top of a cache fails an assertion in its Conv1D).
    """
    import torch
    tokens = np.asarray(tokens, dtype=np.int64)
    chunks = chunks or [len(tokens)]
    assert sum(chunks) == len(tokens)
    out, cache, p = [], None, 0
    with torch.no_grad():
        for n in chunks:
            tok = torch.from_numpy(tokens[p:p + n])[None]
            pos = torch.arange(p, p + n, dtype=torch.int64)[None]
            logits, cache = model(tok, pos, cache=cache, return_cache=True)
            out.append(logits[0].float().numpy())
            p += n
    return np.concatenate(out), cache


def official_state(cfg: ModelConfig, cache) -> dict[str, np.ndarray]:
    """The official cache as rgemma-style state arrays: layers.{i}.h / .conv / .k / .v, pos."""
    st = {}
    pos = None
    for i, kind in enumerate(cfg.layer_types):
        c = cache[f"blocks.{i}"]
        if kind == ATTENTION:
            st[f"layers.{i}.k"] = c.keys[0].float().numpy()      # (W, 1, hd)
            st[f"layers.{i}.v"] = c.values[0].float().numpy()
            pos = int(c.num_tokens[0])
        else:
            st[f"layers.{i}.h"] = c.rg_lru_state[0].float().numpy()     # (R,)
            st[f"layers.{i}.conv"] = c.conv1d_state[0].float().numpy()  # (K-1, R)
    if pos is not None:
        st["pos"] = np.array(pos)
    return st


def hf_from_dir(directory, cfg: ModelConfig, *, check_weights: dict | None = None):
    """transformers' model loaded with from_pretrained(dir), float32, window W + 1 (official rule).

    With `check_weights`, assert that every loaded parameter equals the given float32 values and
    that nothing was missing or unexpected (this proves the on-disk layout is the real HF one).
    """
    import torch
    from transformers import RecurrentGemmaForCausalLM
    model, info = RecurrentGemmaForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attention_window_size=cfg.attention_window_size + 1,
        attn_implementation="eager", output_loading_info=True)
    model.eval()
    if check_weights is not None:
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
            {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
        assert not bad, f"transformers loading problems: {bad}"
        assert model.config.layers_block_type == [
            "linear_attention" if k == "recurrent" else "sliding_attention" for k in cfg.layer_types]
        sd = model.state_dict()
        for n, w in check_weights.items():
            assert n in sd, n
            got = sd[n].float().numpy()
            assert got.shape == w.shape and np.array_equal(got, w), f"{n} differs after loading"
        emb = sd["model.embed_tokens.weight"]
        assert model.lm_head.weight.data_ptr() == emb.data_ptr() or torch.equal(model.lm_head.weight, emb)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        return model(ids, use_cache=False).logits[0].float().numpy()


def run_references(cfg: ModelConfig, weights: dict[str, np.ndarray], tokens, *, workdir,
                   dtype: str = "f32") -> dict:
    """Both references on one sequence. Writes a checkpoint (dtype on disk) into workdir.

    `weights` are float32 values; for dtype bf16 they must already be bf16-representable.
    Returns {"hf": logits, "official": logits or None, "state": dict or None,
             "official_chunked": logits or None}.
    """
    import torch
    torch.manual_seed(0)
    synth.write_checkpoint(workdir, cfg, weights, dtype=dtype)
    hf = hf_from_dir(workdir, cfg, check_weights=weights)
    res = {"hf": hf_logits(hf, tokens), "official": None, "state": None, "official_chunked": None}
    if official_supports(cfg):
        om = official_model(cfg, weights)
        res["official"], cache = official_run(om, tokens)
        res["state"] = official_state(cfg, cache)
        W, T = cfg.attention_window_size, len(tokens)
        # the official incremental path: a prompt from an empty cache, then 1-token steps
        chunks = [W + 3] + [1] * (T - W - 3)
        res["official_chunked"], _ = official_run(om, tokens, chunks)
    return res


# -- fixtures ---------------------------------------------------------------------------------

def make_fixture(name: str, spec: dict, out_dir: Path) -> dict:
    cfg, w = fixture_weights(spec)
    tokens = synth.tokens_for(cfg, spec["n_tokens"], spec["token_seed"])
    assert spec["n_tokens"] > 2 * cfg.attention_window_size
    with tempfile.TemporaryDirectory() as tmp:
        r = run_references(cfg, w, tokens, workdir=Path(tmp) / "ckpt", dtype=spec["dtype"])
    summary = {"config": spec["config"], "dtype": spec["dtype"], "seed": spec["seed"],
               "tokens": len(tokens), "window": cfg.attention_window_size,
               "kv_heads": cfg.num_key_value_heads, "hidden_size": cfg.hidden_size,
               "lru_width": cfg.lru_width, "layer_types": "".join(k[0].upper() for k in cfg.layer_types),
               "max_abs_logit": float(np.abs(r["hf"]).max()),
               "references": "hf+official" if r["official"] is not None else "hf only"}
    arrays = {"tokens": tokens, "logits_hf": r["hf"].astype(np.float32),
              "config_json": np.array(json.dumps(synth.config_json(cfg, "new", spec["dtype"]))),
              "spec_json": np.array(json.dumps(spec)),
              "weights_sum": np.array(weights_checksum(w))}
    if r["official"] is not None:
        d = float(np.abs(r["hf"] - r["official"]).max())
        dc = float(np.abs(r["official_chunked"] - r["official"]).max())
        summary["hf_vs_official"] = d
        summary["official_chunked_vs_full"] = dc
        assert d <= TOL, f"{name}: the references disagree by {d:.3g}"
        assert dc <= TOL, f"{name}: official chunked vs full pass differ by {dc:.3g}"
        arrays["logits_official"] = r["official"].astype(np.float32)
        for k, v in r["state"].items():
            arrays["state." + k] = v
    np.savez_compressed(out_dir / f"{name}.npz", **arrays)
    return summary


def rgemma_numbers(name: str, spec: dict, out_dir: Path) -> dict:
    """max |Δ| of rgemma against the stored fixture (full pass, 1-token decode), if it loads."""
    import rgemma_cli
    cfg, w = fixture_weights(spec)
    fx = np.load(out_dir / f"{name}.npz")
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_checkpoint(tmp, cfg, synth.spec_weights(cfg, spec["seed"]), dtype=spec["dtype"])
        model, _ = rgemma_cli.load(tmp)
        toks = fx["tokens"]
        full, _ = model.forward(toks, model.initial_state())
        st, steps = model.initial_state(), []
        for t in toks:
            lg, st = model.forward(toks[len(steps):len(steps) + 1], st)
            steps.append(lg[0])
        steps = np.stack(steps)
    out = {}
    for ref in ("hf", "official"):
        if f"logits_{ref}" in fx:
            out[f"rgemma_vs_{ref}"] = float(np.abs(full - fx[f"logits_{ref}"]).max())
            out[f"rgemma_decode_vs_{ref}"] = float(np.abs(steps - fx[f"logits_{ref}"]).max())
    return out


def check_layouts(verbose=True) -> None:
    """transformers loads every checkpoint variant synth.py writes, with identical values."""
    variants = [("tiny-80", dict()), ("tiny-80", dict(dtype="bf16")),
                ("tiny-80", dict(shards=3, dialect="old", lm_head=True)),
                ("tiny-80", dict(shards=2, dtype="bf16", lm_head=True)),
                ("tiny-80", dict(dialect="old")), ("mkv", dict(shards=2)), ("lru", dict(lm_head=True)),
                ("pattern", dict(shards=4))]
    for cname, kw in variants:
        cfg = synth.get_config(cname)
        w = synth.spec_weights(cfg, 11)
        if kw.get("dtype") == "bf16":
            w = synth.bf16_round(w)
        with tempfile.TemporaryDirectory() as tmp:
            synth.write_checkpoint(tmp, cfg, w, **kw)
            hf_from_dir(tmp, cfg, check_weights=w)
        if verbose:
            print(f"  transformers loads {cname} {kw or '(f32, single file, new dialect)'}: ok")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="regenerate tests/fixtures/*.npz with both references")
    ap.add_argument("--out", type=Path, default=FIXTURE_DIR)
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    ap.add_argument("--no-layout-check", action="store_true")
    ap.add_argument("--no-rgemma", action="store_true", help="do not add rgemma's numbers")
    a = ap.parse_args(argv)
    import torch
    import transformers
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.no_layout_check:
        check_layouts()
    summary_path = a.out / "summary.json"
    old = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    fixtures = old.get("fixtures", {})
    for name, spec in FIXTURES.items():
        if a.only and name not in a.only:
            continue
        t0 = time.time()
        s = make_fixture(name, spec, a.out)
        if not a.no_rgemma:
            try:
                s.update(rgemma_numbers(name, spec, a.out))
            except Exception as e:  # the model may not exist yet; tests check it anyway
                s["rgemma_error"] = f"{type(e).__name__}: {e}"[:300]
        fixtures[name] = s
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in s.items()) + f"  ({time.time() - t0:.1f} s)")
    try:
        import importlib.metadata as md
        versions = {p: md.version(p) for p in ("torch", "transformers", "recurrentgemma", "numpy")}
    except Exception:
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import subprocess
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        commit = None
    summary = {"tolerance": TOL, "rgemma_numbers_at_commit": commit, "compute": "float32 (bf16 fixtures: f32 on bf16-rounded weights)",
               "hf_window": "attention_window_size = W + 1 (equals the official rule)",
               "versions": versions, "fixtures": fixtures}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    total = sum(p.stat().st_size for p in a.out.glob("*.npz"))
    print(f"wrote {summary_path} ({total / 1024:.0f} KiB of .npz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
