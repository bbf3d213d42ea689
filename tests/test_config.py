"""ModelConfig: both config.json dialects, presets, and clear errors."""

import json
import re

import pytest

from rgemma_cli.config import PRESETS, ModelConfig, bf16_round
from rgemma_cli.errors import RgemmaError

# The released 2B-it config.json (docs/model.md#configuration), old dialect.
RELEASED_2B_IT = {
    "_block_types": ["recurrent", "recurrent", "attention"], "architectures": ["RecurrentGemmaForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0, "attention_window_size": 2048, "bos_token_id": 2,
    "conv1d_width": 4, "embeddings_scale_by_sqrt_dim": True, "eos_token_id": 1,
    "final_w_init_variance_scale": 0.07692307692307693, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2560, "intermediate_size": 15360, "logits_soft_cap": 30.0, "lru_width": 2560,
    "model_type": "recurrent_gemma", "num_attention_heads": 10, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 256000, "w_init_variance_scale": 0.01,
}


def test_released_2b_config_equals_preset():
    assert ModelConfig.from_dict(RELEASED_2B_IT) == PRESETS["2b"]


def test_9b_dialect_block_types_and_no_scale_key():
    d = dict(RELEASED_2B_IT, hidden_size=4096, intermediate_size=24576, lru_width=4096,
             num_attention_heads=16, num_hidden_layers=38)
    d["block_types"] = d.pop("_block_types")
    del d["embeddings_scale_by_sqrt_dim"]
    cfg = ModelConfig.from_dict(d)
    assert cfg == PRESETS["9b"]
    assert cfg.embed_scale == 64.0
    assert sum(t == "attention" for t in cfg.layer_types) == 12


def test_transformers5_dialect_rope_parameters_and_missing_head_dim():
    d = {k: v for k, v in RELEASED_2B_IT.items() if k not in ("rope_theta", "partial_rotary_factor", "head_dim", "_block_types")}
    d["rope_parameters"] = {"rope_theta": 5000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}
    d["block_types"] = ["recurrent", "attention"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 5000.0 and cfg.partial_rotary_factor == 0.25
    assert cfg.head_dim == 256 and cfg.rotary_dims == 64
    assert cfg.layer_types[:4] == ("recurrent", "attention", "recurrent", "attention")


def test_derived_values_of_the_2b():
    cfg = PRESETS["2b"]
    assert cfg.mlp_width == 7680
    assert cfg.embed_scale == 50.5  # bf16(sqrt(2560)), not 50.596
    assert [i for i, t in enumerate(cfg.layer_types) if t == "attention"] == [2, 5, 8, 11, 14, 17, 20, 23]
    assert cfg.lru_block_width == 256


def test_bf16_round():
    assert bf16_round(80 ** 0.5) == 8.9375
    assert bf16_round(1.0) == 1.0


def test_to_dict_round_trips():
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_hidden_layers=5, lru_width=48,
                      attention_window_size=16)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gemma"}, "unsupported model type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": 15361}, "even"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"lru_width": 2561}, "lru_width"),
    ({"_block_types": ["recurrent", "mlp"]}, "unknown block type"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"no_such_key_is_fine": 1, "num_hidden_layers": -2}, "num_hidden_layers"),
])
def test_bad_configs_give_one_line_errors(change, words):
    with pytest.raises(RgemmaError) as e:
        ModelConfig.from_dict(dict(RELEASED_2B_IT, **change))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_from_json_errors(tmp_path):
    with pytest.raises(RgemmaError, match="missing config.json"):
        ModelConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RgemmaError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(RgemmaError, match="not a JSON object"):
        ModelConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("change, words", [
    ({"rope_theta": 0}, "rope_theta must be positive"),
    ({"rope_theta": -10000.0}, "rope_theta must be positive"),
    ({"rope_theta": "10000"}, "rope_theta must be a finite number"),
    ({"attention_window_size": 10**9}, "attention_window_size must be an integer in"),
    ({"attention_window_size": 2048.0}, "attention_window_size must be an integer"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers must be an integer in"),
    ({"hidden_size": 10**12}, "hidden_size"),
    ({"embeddings_scale_by_sqrt_dim": "no"}, "must be true or false"),
    ({"tie_word_embeddings": "no"}, "must be true or false"),
    ({"tie_word_embeddings": 0}, "must be true or false"),
    ({"logits_soft_cap": True}, "logits_soft_cap must be a finite number"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a finite number"),
    ({"partial_rotary_factor": 2.0}, "partial_rotary_factor"),
    ({"eos_token_id": 256000}, "eos_token_id must be a token id"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"bos_token_id": "2"}, "bos_token_id"),
    ({"rope_parameters": "x", "rope_theta": None}, "rope_parameters|rope_theta"),
    ({"_block_types": "recurrent"}, "block_types must be a non-empty list"),
    ({"_block_types": []}, "block_types must be a non-empty list"),  # was the default pattern
    ({"_block_types": False}, "block_types must be a non-empty list"),
    ({"_block_types": None, "block_types": 0}, "block_types must be a non-empty list"),
    ({"_block_types": [["recurrent"]]}, "unknown block type"),
    ({"head_dim": None, "num_attention_heads": "10"}, "hidden_size is not a multiple"),
    ({"attention_window_size": 2**20, "num_hidden_layers": 3000}, "decode state would take"),
])
def test_values_of_the_wrong_type_or_range_are_refused(change, words):
    with pytest.raises(RgemmaError) as e:
        ModelConfig.from_dict(dict(RELEASED_2B_IT, **change))
    assert re.search(words, str(e.value)) and "\n" not in str(e.value)


def test_deeply_nested_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RgemmaError, match="nested too deeply"):
        ModelConfig.from_json(tmp_path / "config.json")


# -- the config.json schema, property test: one field at a time ---------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mutations import FUZZ, attempt, dumps, mutated  # noqa: E402


@FUZZ
@given(data=st.data())
def test_property_mutated_config_json_is_refused_or_loads(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("cfg") / "config.json"
    p.write_bytes(dumps(data.draw(mutated(RELEASED_2B_IT))))
    def check(cfg):  # accepted: a config that validates again and round-trips exactly
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.state_bytes <= 16 << 30
    attempt("config.json", lambda: ModelConfig.from_json(p), check)
