"""ModelConfig: both config.json dialects, presets, and clear errors."""

import json

import pytest

from rgemma_cli.config import PRESETS, ModelConfig, bf16_round
from rgemma_cli.errors import RgemmaError

# The released 2B-it config.json (spec §1.3), old dialect.
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
