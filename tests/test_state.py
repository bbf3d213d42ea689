"""The state as a plain value: shapes, sizes (docs/model.md#state-sizes), copies and equality."""

import numpy as np

from rgemma_cli.config import PRESETS, ModelConfig
from rgemma_cli.state import AttentionState, RecurrentState, State


def test_2b_and_9b_state_sizes_match_the_spec():
    # the official totals include one 4-byte counter per attention layer; State keeps one `pos`
    assert State.zeros(PRESETS["2b"]).nbytes == 34_291_744 - 8 * 4
    assert State.zeros(PRESETS["9b"]).nbytes == 52_035_632 - 12 * 4


def test_layers_follow_the_pattern():
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=4, num_hidden_layers=4, lru_width=6,
                      attention_window_size=3, block_types=("attention", "recurrent"))
    s = State.zeros(cfg)
    assert [type(l) for l in s.layers] == [AttentionState, RecurrentState] * 2
    assert s.layers[0].k.shape == (3, 2, 4) and s.layers[1].conv.shape == (3, 6)
    assert list(s.arrays())[:3] == ["layers.0.k", "layers.0.v", "layers.1.h"]


def test_copy_is_deep_and_equality_is_by_value():
    cfg = PRESETS["2b"]
    s = State.zeros(ModelConfig(**{**cfg.__dict__, "num_hidden_layers": 3, "attention_window_size": 4}))
    c = s.copy()
    assert c == s and c is not s
    c.layers[0].h[0] = 1.0
    assert c != s and s.layers[0].h[0] == 0.0
    assert State(1, s.layers) != s
