"""Live parity: rgemma against transformers and the official `recurrentgemma`, on configs drawn
fresh at test time (so a stale fixture cannot hide a bug).

Needs the `reference` extra (torch, transformers, recurrentgemma + jaxtyping, einops); skipped
cleanly when they are absent. The seed comes from the clock unless RGEMMA_LIVE_SEED is set; it
is printed in every failure message, so a failing draw can be replayed:

    RGEMMA_LIVE_SEED=1234 .venv/bin/pytest -q tests/test_reference_live.py
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch", exc_type=ImportError)
pytest.importorskip("transformers", exc_type=ImportError)
if importlib.util.find_spec("recurrentgemma") is None:
    pytest.skip("the official 'recurrentgemma' package is not installed", allow_module_level=True)
for _mod in ("jaxtyping", "einops"):
    pytest.importorskip(_mod, exc_type=ImportError)

from rgemma_cli.config import ATTENTION, RECURRENT, ModelConfig  # noqa: E402
from rgemma_cli.testing import synth  # noqa: E402
from rgemma_cli.testing.references import run_references  # noqa: E402

ATOL = 1e-5
BASE_SEED = int(os.environ.get("RGEMMA_LIVE_SEED", time.time_ns() % 1_000_000))
DRAWS = int(os.environ.get("RGEMMA_LIVE_DRAWS", 3))


def draw(seed: int):
    """A random small config, weight seed, dtype, token sequence (> 2W) and chunking."""
    rng = np.random.default_rng(seed)
    H = int(rng.choice([1, 2, 4]))
    hd = int(rng.choice([4, 8, 12, 16]))  # RoPE rotates hd/2 dims, paired: hd % 4 == 0
    # At widths below 16 float32 rounding alone, amplified over a few random layers, reaches
    # the 1e-5 tolerance (seen: D=8, 1.1e-5 against both references, with every block within
    # 1 ulp of HF's); the released models are 2560 and 4096 wide.
    hd = max(hd, 16 // H)
    kvh = 1 if rng.random() < 0.7 or H == 1 else int(rng.choice([k for k in (2, 4) if H % k == 0]))
    while True:
        pattern = tuple(rng.choice([RECURRENT, ATTENTION], size=int(rng.integers(1, 4))).tolist())
        L = int(rng.integers(2, 6))
        kinds = {pattern[i % len(pattern)] for i in range(L)}
        if kinds == {RECURRENT, ATTENTION}:
            break
    W = int(rng.integers(2, 8))
    cfg = ModelConfig(
        vocab_size=int(rng.integers(24, 130)), hidden_size=H * hd,
        intermediate_size=2 * int(rng.integers(4, 49)), num_attention_heads=H,
        num_key_value_heads=kvh, head_dim=hd, num_hidden_layers=L,
        lru_width=H * int(rng.integers(2, 13)), attention_window_size=W, block_types=pattern)
    T = 2 * W + int(rng.integers(3, 12))
    tokens = synth.tokens_for(cfg, T, seed=seed + 1)
    cuts = sorted(rng.choice(np.arange(1, T), size=int(rng.integers(1, min(8, T - 1))), replace=False))
    bounds = [0, *map(int, cuts), T]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    dtype = "bf16" if rng.random() < 0.3 else "f32"
    return cfg, int(rng.integers(0, 2**31)), dtype, tokens, chunks


def feed(model, tokens, chunks, state=None):
    state = model.initial_state() if state is None else state
    out, p = [], 0
    for n in chunks:
        lg, state = model.forward(tokens[p:p + n], state)
        out.append(lg)
        p += n
    return np.concatenate(out), state


@pytest.mark.parametrize("k", range(DRAWS))
def test_live_random_config(k, tmp_path):
    import rgemma_cli
    seed = BASE_SEED + 7919 * k
    cfg, wseed, dtype, tokens, chunks = draw(seed)
    where = (f"[RGEMMA_LIVE_SEED={BASE_SEED} draw {k}: D={cfg.hidden_size} H={cfg.num_attention_heads} "
             f"KV={cfg.num_key_value_heads} R={cfg.lru_width} E={cfg.mlp_width} V={cfg.vocab_size} "
             f"layers={''.join(t[0].upper() for t in cfg.layer_types)} W={cfg.attention_window_size} "
             f"T={len(tokens)} {dtype} chunks={chunks}]")
    w = synth.spec_weights(cfg, wseed)
    w_vals = synth.bf16_round(w) if dtype == "bf16" else w
    ref = run_references(cfg, w_vals, tokens, workdir=tmp_path / "ref", dtype=dtype)

    # rgemma loads a checkpoint written independently of the reference run (sharded, old
    # dialect, lm_head for half the draws)
    extra = dict(shards=2, dialect="old", lm_head=True) if seed % 2 else {}
    synth.write_checkpoint(tmp_path / "ours", cfg, w, dtype=dtype, **extra)
    model, _ = rgemma_cli.load(str(tmp_path / "ours"))

    full, state = model.forward(tokens, model.initial_state())
    chunked, cstate = feed(model, tokens, chunks)
    steps, _ = feed(model, tokens, [1] * len(tokens))
    last, _ = model.forward(tokens, model.initial_state(), last_only=True)
    refs = {"hf": ref["hf"]}
    if ref["official"] is not None:
        refs["official"] = ref["official"]
        refs["official 1-token steps"] = ref["official_chunked"]
        assert np.abs(ref["hf"] - ref["official"]).max() <= ATOL, f"references disagree {where}"
    for rname, want in refs.items():
        for what, got in (("full pass", full), ("chunked", chunked), ("1-token decode", steps),
                          ("last_only", np.broadcast_to(last, (1, want.shape[1])))):
            want_rows = want[-1:] if what == "last_only" else want
            d = np.abs(got - want_rows)
            if d.max() > ATOL:
                t = int(np.unravel_index(np.argmax(d), d.shape)[0])
                pos = len(tokens) - 1 if what == "last_only" else t
                pytest.fail(f"{what} vs {rname}: max |Δlogit| {d.max():.3g} at position {pos} {where}")
    if ref["state"] is not None:
        ours = state.arrays()
        ours_c = cstate.arrays()
        assert state.pos == cstate.pos == int(ref["state"]["pos"]) == len(tokens)
        for key, v in ref["state"].items():
            if key == "pos":
                continue
            for label, arrs in (("full", ours), ("chunked", ours_c)):
                d = float(np.abs(arrs[key] - v).max())
                assert d <= ATOL, f"state {key} ({label}) vs official cache: {d:.3g} {where}"
