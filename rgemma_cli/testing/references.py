"""The two public references run on a checkpoint: transformers' `RecurrentGemmaForCausalLM`
and Google's official `recurrentgemma` torch `Griffin`, in float32. Used by the live parity test
and by scripts/fixtures/make_fixtures.py, which stores their outputs as the committed fixtures.

Needs the `reference` extra (torch, transformers, recurrentgemma, jaxtyping, einops), imported
inside the functions: importing this module costs nothing without them. The official package's
`__init__` imports its JAX half (jax + flax); `import_official()` imports `recurrentgemma.torch`
without running that `__init__`, so jax/flax are not needed.

transformers is built with attention_window_size = W + 1, which equals the official window rule
(docs/model.md#local-attention); the official Griffin gets the same values under its own
names (docs/model.md#official-names).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np

from ..config import ATTENTION, ModelConfig
from .synth import write_checkpoint


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
    """The official torch Griffin (float32) holding `weights` (HF names, mapped as docs/model.md#official-names
    says)."""
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
    write_checkpoint(workdir, cfg, weights, dtype=dtype)
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
