"""Random RecurrentGemma checkpoints in the real Hugging Face layout, for tests and benchmarks.

NumPy only (plus `rgemma_cli` for the config class and the checkpoint writer). Imported by the
tests, the bench and the fixture script (`from rgemma_cli.testing import synth`), and runnable:

    python -m rgemma_cli.testing.synth OUT --config tiny-80        # the test-vector weights, f32
    python -m rgemma_cli.testing.synth OUT --config tiny-80 --dtype bf16 --shards 3 --dialect old --lm-head
    python -m rgemma_cli.testing.synth OUT --preset 2b --dtype bf16  # 2B-shaped random, ~5.4 GB

`spec_weights(cfg, seed)` follows docs/model.md#synthetic-test-weights exactly (names, sorted
order, rng draws, scales), so `spec_weights(CONFIGS["tiny-80"], 0)` *is* the checkpoint of
docs/model.md#test-vector; the same rule
generalises to any config (multi-KV heads, lru_width != hidden_size, any block pattern).
Large presets use `write_random_checkpoint`, which streams tensors to disk in row chunks with a
fast float32 RNG path (never more than about two chunks in RAM); it does not draw the same
values as `spec_weights`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointWriter, expected_shapes
from ..config import ATTENTION, PRESETS, RECURRENT, ModelConfig
from ..safetensors import Streamed, f32_to_bf16

R_, A_ = RECURRENT, ATTENTION


def tiny(**kw) -> ModelConfig:
    """A small config; head_dim = hidden_size / num_attention_heads (as both references assume).

    (Any ModelConfig works with the functions below, including head_dim != D/H, but only
    head_dim = D/H checkpoints mean the same thing to transformers and the official package.)
    """
    base = dict(vocab_size=128, hidden_size=80, intermediate_size=320, num_attention_heads=4,
                num_key_value_heads=1, num_hidden_layers=6, lru_width=80,
                attention_window_size=8, conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6,
                rope_theta=10000.0, partial_rotary_factor=0.5, block_types=(R_, R_, A_))
    base.update(kw)
    base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    return ModelConfig(**base)


# Named small configs. tiny-80 is the test vector's (docs/model.md#test-vector). The others are
# the parity-fixture variants.
CONFIGS: dict[str, ModelConfig] = {
    "tiny-80": tiny(),
    # multi-KV-head attention (grouped queries: 4 query heads share 2 K/V heads). The official
    # package supports exactly one K/V head, so this one is compared against HF only.
    "mkv": tiny(vocab_size=96, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                num_key_value_heads=2, lru_width=64, attention_window_size=8),
    # RG-LRU wider than the residual stream, a different window.
    "lru": tiny(vocab_size=112, hidden_size=48, intermediate_size=288, num_attention_heads=4,
                lru_width=96, num_hidden_layers=5, attention_window_size=6),
    # attention first, alternating, a short window.
    "pattern": tiny(vocab_size=100, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                    lru_width=64, num_hidden_layers=5, attention_window_size=5,
                    block_types=(A_, R_)),
}


def get_config(name: str) -> ModelConfig:
    """A named small config or a preset ("2b", "9b")."""
    if name in CONFIGS:
        return CONFIGS[name]
    if name in PRESETS:
        return PRESETS[name]
    raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS) + sorted(PRESETS)}")


# -- names and shapes ------------------------------------------------------------------------

def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint (docs/model.md#checkpoint-layout), without
    lm_head.weight, in sorted order."""
    s = expected_shapes(cfg)
    return {n: s[n] for n in sorted(s)}


def _scale(name: str, shape) -> float:
    """The scale (docs/model.md#synthetic-test-weights) applied to a standard normal draw
    (recurrent_param is uniform instead)."""
    if name.endswith("norm.weight") or name.endswith("bias"):
        return 0.1
    if name.endswith("conv_1d.weight"):
        return 0.5
    if name.endswith("gate_weight"):
        return 1.0 / math.sqrt(shape[-2])
    return 1.0 / math.sqrt(shape[1])


def spec_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights by the rule of docs/model.md#synthetic-test-weights
    (one rng, sorted names)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("recurrent_param"):
            w = rng.uniform(-4.0, 1.0, size=shape)
        else:
            w = rng.standard_normal(shape) * _scale(name, shape)
        out[name] = w.astype(np.float32)
    return out


def bf16_round(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 values of the weights after rounding each to bfloat16 (nearest even)."""
    return {n: (f32_to_bf16(w).astype(np.uint32) << 16).view(np.float32).reshape(w.shape)
            for n, w in weights.items()}


def tokens_for(cfg: ModelConfig, n: int, seed: int = 1) -> np.ndarray:
    """`n` random token ids with BOS (2) first; for tiny-80/seed 1 the first 20 are the test
    vector's (docs/model.md#test-vector)."""
    t = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=n)
    t[0] = cfg.bos_token_id
    return t.astype(np.int64)


# -- config.json -----------------------------------------------------------------------------

def config_json(cfg: ModelConfig, dialect: str = "new", dtype: str = "f32") -> dict:
    """config.json contents in the transformers-5.x ("new") or released-repo ("old") dialect."""
    torch_dtype = {"f32": "float32", "bf16": "bfloat16"}[dtype]
    d = cfg.to_dict()
    if dialect == "new":
        theta, prf = d.pop("rope_theta"), d.pop("partial_rotary_factor")
        d["rope_parameters"] = {"rope_theta": theta, "partial_rotary_factor": prf,
                                "rope_type": "default"}
        d["dtype"] = torch_dtype
        d["transformers_version"] = "5.0.0"
    elif dialect == "old":
        d["_block_types"] = d.pop("block_types")
        d.pop("tie_word_embeddings", None)
        if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size:
            d.pop("head_dim")  # loaders must derive it (docs/model.md#configuration)
        d["torch_dtype"] = torch_dtype
        d["transformers_version"] = "4.40.0.dev0"
        d.update(attention_dropout=0.0, use_cache=True, w_init_variance_scale=0.01,
                 final_w_init_variance_scale=2.0 / cfg.num_hidden_layers)
    else:
        raise ValueError(f"unknown dialect {dialect!r}")
    return dict(sorted(d.items()))


# -- writing ---------------------------------------------------------------------------------

_ST_DTYPE = {"f32": ("F32", 4), "bf16": ("BF16", 2)}


def _plan_shards(sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Split names (in order) into `shards` contiguous groups of roughly equal bytes."""
    names = list(sizes)
    if shards <= 1:
        return [names]
    if shards > len(names):
        raise ValueError("more shards than tensors")
    total = sum(sizes.values())
    groups, cur, acc = [], [], 0
    for i, n in enumerate(names):
        left_names, left_groups = len(names) - i, shards - len(groups)
        if cur and (acc + sizes[n] > total * (len(groups) + 1) / shards or left_names < left_groups):
            groups.append(cur)
            cur = []
        cur.append(n)
        acc += sizes[n]
    groups.append(cur)
    assert len(groups) == shards and all(groups), (len(groups), shards)
    return groups


def _write(out_dir: Path, cfg, dialect, dtype, tensors: dict, groups, total_params) -> None:
    """The tensors (arrays or Streamed) in `groups` of names, one shard each, and config.json."""
    writer = CheckpointWriter(out_dir, shard_bytes=None)
    st = _ST_DTYPE[dtype][0]
    for group in groups:
        for n in sorted(group):
            writer.add(n, tensors[n], st)
        writer.end_shard()
    writer.close({"total_parameters": total_params})
    (out_dir / "config.json").write_text(json.dumps(config_json(cfg, dialect, dtype), indent=2) + "\n")


def write_checkpoint(out_dir, cfg: ModelConfig, weights: dict[str, np.ndarray], *,
                     dtype: str = "f32", shards: int = 1, dialect: str = "new",
                     lm_head: bool = False) -> Path:
    """Write config.json + safetensors (single file, or `shards` files and an index).

    `weights` are float32 arrays (HF names/shapes); with dtype="bf16" they are rounded to bf16.
    `lm_head=True` adds `lm_head.weight`, a copy of the embedding, as the released repos have.
    """
    out_dir = Path(out_dir)
    tensors = dict(weights)
    if lm_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors = {n: tensors[n] for n in sorted(tensors)}
    if dtype == "bf16":
        tensors = {n: f32_to_bf16(w).reshape(w.shape) for n, w in tensors.items()}
    else:
        tensors = {n: np.ascontiguousarray(w, dtype=np.float32) for n, w in tensors.items()}
    groups = _plan_shards({n: t.nbytes for n, t in tensors.items()}, shards)
    total_params = sum(int(np.prod(t.shape)) for n, t in tensors.items() if n != "lm_head.weight")
    _write(out_dir, cfg, dialect, dtype, tensors, groups, total_params)
    return out_dir


def make_checkpoint(out_dir, config: str | ModelConfig = "tiny-80", *, seed: int = 0,
                    **kw) -> tuple[Path, ModelConfig, dict[str, np.ndarray]]:
    """spec_weights + write_checkpoint in one call; returns (dir, cfg, float32 weights)."""
    cfg = get_config(config) if isinstance(config, str) else config
    w = spec_weights(cfg, seed)
    return write_checkpoint(out_dir, cfg, w, **kw), cfg, w


# -- streaming writer for big random checkpoints ----------------------------------------------

@functools.lru_cache(maxsize=None)
def _quantile_table(kind: str, scale: float, dtype: str) -> np.ndarray:
    """65536 values at the midpoints of equal-probability bins of the distribution: a random
    uint16 index into this table is a sample (normal * scale, or uniform(-4, 1))."""
    u = (np.arange(65536) + 0.5) / 65536
    if kind == "uniform":
        v = -4.0 + 5.0 * u
    else:
        inv = statistics.NormalDist().inv_cdf
        v = np.array([inv(x) for x in u]) * scale
    v = v.astype(np.float32)
    return f32_to_bf16(v) if dtype == "bf16" else v


def _random_rows(rng, name, shape, rows, dtype):
    """`rows` leading rows of a tensor with the distributions of `spec_weights` (fast: a table lookup by
    random 16-bit indices, ~5x faster than drawing normals), in the on-disk dtype."""
    n = rows * int(np.prod(shape[1:]))
    idx = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    if name.endswith("recurrent_param"):
        table = _quantile_table("uniform", 1.0, dtype)
    else:
        table = _quantile_table("normal", _scale(name, shape), dtype)
    return table[idx]


def write_random_checkpoint(out_dir, cfg: ModelConfig, *, dtype: str = "bf16", seed: int = 0,
                            shards: int | None = None, dialect: str = "new", lm_head: bool = False,
                            chunk_bytes: int = 64 << 20, progress: bool = False) -> Path:
    """A random checkpoint of any size, streamed to disk in row chunks (low RAM, fast RNG).

    Values follow the distributions of `spec_weights` (quantised to 65536 levels) but not its exact draws.
    Default shards: ~2 GB each. lm_head.weight, if asked for, is an exact copy of the embedding.
    """
    out_dir = Path(out_dir)
    item = _ST_DTYPE[dtype][1]
    shapes = dict(weight_shapes(cfg))
    if lm_head:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    shapes = {n: shapes[n] for n in sorted(shapes)}
    sizes = {n: int(np.prod(s)) * item for n, s in shapes.items()}
    if shards is None:
        shards = max(1, math.ceil(sum(sizes.values()) / (2 << 30)))
    groups = _plan_shards(sizes, shards)
    # one generator per tensor (keyed by its name's index), so lm_head can be an exact copy
    key = {n: i for i, n in enumerate(sorted(weight_shapes(cfg)))}
    key["lm_head.weight"] = key["model.embed_tokens.weight"]
    done, total, t0 = 0, sum(sizes.values()), time.time()

    def rows(n):
        nonlocal done
        shape = shapes[n]
        gen_name = "model.embed_tokens.weight" if n == "lm_head.weight" else n
        rng = np.random.default_rng([seed, key[n]])
        step = max(1, chunk_bytes // (4 * int(np.prod(shape[1:]))))
        for r0 in range(0, shape[0], step):
            x = _random_rows(rng, gen_name, shape, min(step, shape[0] - r0), dtype)
            yield x
            done += x.size * item
            if progress:
                print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB  {time.time() - t0:5.0f} s",
                      end="", file=sys.stderr, flush=True)

    tensors = {n: Streamed(_ST_DTYPE[dtype][0], shapes[n], rows(n)) for n in shapes}
    params = sum(int(np.prod(s)) for n, s in shapes.items() if n != "lm_head.weight")
    _write(out_dir, cfg, dialect, dtype, tensors, groups, params)
    if progress:
        print(file=sys.stderr)
    return out_dir


# -- CLI ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--config", help=f"small named config: {', '.join(CONFIGS)} (default tiny-80)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="full-size shapes, streamed random weights")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None,
                    help="tensor dtype on disk (default f32 for --config, bf16 for --preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=None, help="number of safetensors files")
    ap.add_argument("--dialect", choices=["new", "old"], default="new", help="config.json dialect")
    ap.add_argument("--lm-head", action="store_true", help="also write lm_head.weight (a copy)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    a = ap.parse_args(argv)
    import dataclasses
    if a.preset:
        cfg = PRESETS[a.preset]
        if a.layers:
            cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
        t0 = time.time()
        out = write_random_checkpoint(a.out, cfg, dtype=a.dtype or "bf16", seed=a.seed,
                                      shards=a.shards, dialect=a.dialect, lm_head=a.lm_head,
                                      progress=sys.stderr.isatty())
        print(f"wrote {out} ({a.preset}, {a.dtype or 'bf16'}) in {time.time() - t0:.0f} s")
    else:
        cfg = get_config(a.config or "tiny-80")
        if a.layers:
            cfg = dataclasses.replace(cfg, num_hidden_layers=a.layers)
        out = write_checkpoint(a.out, cfg, spec_weights(cfg, a.seed), dtype=a.dtype or "f32",
                               shards=a.shards or 1, dialect=a.dialect, lm_head=a.lm_head)
        print(f"wrote {out} ({a.config or 'tiny-80'}, {a.dtype or 'f32'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
