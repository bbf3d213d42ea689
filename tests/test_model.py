"""The forward pass as a pure function of (tokens, state), independent of the chunking.

Exactness against the references is in test_parity.py; these are the properties every
configuration must have.
"""


import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rgemma_cli.config import ModelConfig
from rgemma_cli.errors import RgemmaError
from rgemma_cli.model import Griffin, rope, rope_angles, slot_positions

from rgemma_cli.testing import synth

CFG = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_hidden_layers=4, lru_width=16,
                  attention_window_size=5, block_types=("recurrent", "attention"))
SEQ = np.random.default_rng(7).integers(0, 50, size=23)
SEQ[0] = 2


@pytest.fixture(scope="module")
def model():
    return Griffin(CFG, synth.spec_weights(CFG, seed=11))


@pytest.fixture(scope="module")
def full(model):
    return model.forward(SEQ, model.initial_state())


def test_shapes_and_dtypes(model, full):
    logits, state = full
    assert logits.shape == (23, 50) and logits.dtype == np.float32
    assert np.all(np.abs(logits) < CFG.logits_soft_cap)
    assert state.pos == 23
    last, _ = model.forward(SEQ, model.initial_state(), last_only=True)
    assert last.shape == (1, 50)
    assert np.allclose(last[0], logits[-1], atol=1e-6, rtol=0)


def test_input_state_is_never_mutated(model):
    _, mid = model.forward(SEQ[:9], model.initial_state())
    snapshot = mid.copy()
    a, sa = model.forward(SEQ[9:], mid)
    b, sb = model.forward(SEQ[9:], mid)
    assert mid == snapshot
    assert np.array_equal(a, b) and sa == sb


@pytest.mark.parametrize("sizes", [[1] * 14, [3, 1, 6, 1, 1, 1, 1], [9, 5]])
def test_donated_state_gives_the_same_result(model, sizes):
    _, mine = model.forward(SEQ[:9])
    _, ref = model.forward(SEQ[:9])
    at = 9
    for n in sizes:  # steps past the window (5): every ring slot is written in place
        rings = [(l.k, l.v) for l in mine.layers if hasattr(l, "k")]
        got, mine = model.forward(SEQ[at:at + n], mine, donate=True)
        want, ref = model.forward(SEQ[at:at + n], ref)
        assert np.array_equal(got, want) and mine == ref
        assert [(l.k, l.v) for l in mine.layers if hasattr(l, "k")] == rings  # same arrays
        at += n


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 23), min_size=1, max_size=23))
def test_any_chunking_gives_the_same_logits(model, full, cuts):
    bounds = sorted(set(c for c in cuts if c < 23)) + [23]
    state, outs, start = model.initial_state(), [], 0
    for end in bounds:
        out, state = model.forward(SEQ[start:end], state)
        outs.append(out)
        start = end
    assert np.abs(np.concatenate(outs) - full[0]).max() < 1e-5
    ref = full[1]
    assert state.pos == ref.pos
    for a, b in zip(state.arrays().values(), ref.arrays().values()):
        assert np.abs(a - b).max() < 1e-5


def test_state_size_is_fixed(model):
    s0 = model.initial_state()
    _, s = model.forward(SEQ, s0)
    assert s.nbytes == s0.nbytes
    assert s.copy() == s and s.copy() is not s


def test_slot_positions():
    assert slot_positions(0, 4).tolist() == [-1, -1, -1, -1]
    assert slot_positions(3, 4).tolist() == [0, 1, 2, -1]
    assert slot_positions(20, 8).tolist() == [16, 17, 18, 19, 12, 13, 14, 15]  # docs/model.md#test-vector


def test_rope_rotates_only_the_first_dims_and_preserves_norm():
    x = np.random.default_rng(0).standard_normal((3, 2, 8)).astype(np.float32)
    y = rope(x, rope_angles(np.array([0, 5, 999]), 4, 10000.0))
    assert np.array_equal(y[0], x[0])  # position 0: no rotation
    assert np.array_equal(y[:, :, 4:], x[:, :, 4:])
    assert np.allclose(np.linalg.norm(y[..., :4], axis=-1), np.linalg.norm(x[..., :4], axis=-1), atol=1e-5)


def test_bad_tokens(model):
    with pytest.raises(RgemmaError, match="out of range"):
        model.forward([2, 50], model.initial_state())
    with pytest.raises(RgemmaError, match="at least one token"):
        model.forward([], model.initial_state())
