"""The trained demo model in weights/demo: parity on real (trained, not random) weights, and the
behaviour it was trained for. Tests check format and stop behaviour, never what the text says.

tests/fixtures/demo_golden.npz holds float32 logits of transformers' RecurrentGemmaForCausalLM
(window W + 1 = the official rule) on weights/demo at a few positions of three prompts, made by
`scripts/demo/train_demo.py golden`. Everything is skipped when weights/demo is absent.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("RGEMMA_DEMO_DIR", ROOT / "weights" / "demo"))
GOLDEN = Path(__file__).parent / "fixtures" / "demo_golden.npz"
EOS, START_OF_TURN, END_OF_TURN = 1, 106, 107

pytestmark = pytest.mark.skipif(
    not (DEMO / "model.safetensors").exists() or not (DEMO / "config.json").exists(),
    reason="weights/demo is missing",
)


@pytest.fixture(scope="module")
def demo():
    from rgemma_cli import load
    return load("demo" if DEMO == ROOT / "weights" / "demo" else str(DEMO))


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip("tests/fixtures/demo_golden.npz is missing")
    with np.load(GOLDEN) as z:
        g = {k: z[k] for k in z.files}
    digest = hashlib.sha256((DEMO / "model.safetensors").read_bytes()).hexdigest()
    if str(g["weights_sha256"]) != digest:
        pytest.skip("weights/demo changed since the golden logits were made (re-run train_demo.py golden)")
    return g


def greedy(model, ids, max_new, stop=(EOS, END_OF_TURN)):
    """Temperature-0 decoding with the model alone: prefill, then one token at a time."""
    logits, state = model.forward(ids, model.initial_state(), last_only=True)
    out = []
    for _ in range(max_new):
        nxt = int(np.argmax(logits[-1]))
        out.append(nxt)
        if nxt in stop:
            break
        logits, state = model.forward([nxt], state)
    return out


def test_config_and_tokenizer(demo):
    model, tok = demo
    cfg = model.config
    assert tok is not None
    assert cfg.vocab_size == tok.vocab_size == 8000
    assert cfg.num_key_value_heads == 1
    assert cfg.attention_window_size == 64  # official rule; transformers needs 65
    assert tok.sp.id_to_piece(START_OF_TURN) == "<start_of_turn>"
    assert tok.sp.id_to_piece(END_OF_TURN) == "<end_of_turn>"
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    text = "<start_of_turn>user\nHi!\n\n  two spaces<end_of_turn>\n"
    assert tok.decode(tok.encode(text)) == text


def test_demo_is_small():
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 40e6


@pytest.mark.parametrize("name", ["chat", "austen", "bible"])
def test_logits_match_transformers(demo, golden, name):
    model, _ = demo
    ids = golden[f"{name}_tokens"].tolist()
    pos = golden[f"{name}_positions"]
    want = golden[f"{name}_logits"]
    got, _ = model.forward(ids, model.initial_state())
    np.testing.assert_allclose(got[pos], want, atol=1e-4, rtol=0)
    # the decode path (one token at a time, ring-buffer window) gives the same numbers
    state = model.initial_state()
    steps = []
    for t in ids:
        lg, state = model.forward([t], state)
        steps.append(lg[0])
    np.testing.assert_allclose(np.stack(steps)[pos], want, atol=1e-4, rtol=0)


# Greedy decoding of this tiny model loops ("I'm not sure if I'm not sure if ...") on about 4 in
# 10 chat prompts (see weights/demo/README.md); these prompts end their reply at temperature 0.
@pytest.mark.parametrize("user", ["Hi", "Do you have any pets?", "What is your favorite food?",
                                  "What does \"river\" mean?"])
def test_chat_reply_ends_with_end_of_turn(demo, user):
    model, tok = demo
    out = greedy(model, tok.chat_prompt(user), max_new=120)
    assert out[-1] == END_OF_TURN, tok.decode(out)
    reply = tok.decode(out[:-1])
    assert reply.strip(), "empty reply"
    assert START_OF_TURN not in out


def test_generate_continues_with_english_words(demo):
    model, tok = demo
    out = greedy(model, tok.raw_prompt("It is a truth universally acknowledged"), max_new=40, stop=(EOS,))
    text = tok.decode(out)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 5, text
    # mostly made of letters and spaces, not bytes or markup
    letters = sum(c.isalpha() or c.isspace() for c in text)
    assert letters / max(1, len(text)) > 0.8, text
    assert "<start_of_turn>" not in text and "<end_of_turn>" not in text
