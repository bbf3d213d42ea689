"""Quantized checkpoints: writing, memory-mapped loading, and a forward pass close to bf16."""

import json

import numpy as np
import pytest

from rgemma_cli import formats as F
from rgemma_cli import quantize as Q
from rgemma_cli.errors import RgemmaError
from rgemma_cli.safetensors import SafetensorsFile, write_safetensors

from conftest import write_tiny_model


def _tensors(directory):
    index = directory / "model.safetensors.index.json"
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    out = {}
    for n in names:
        f = SafetensorsFile(directory / n)
        out.update({k: f.tensor(k) for k in f.keys()})
    return out


def _model(directory):
    from rgemma_cli.config import ModelConfig
    from rgemma_cli.model import Griffin
    config = json.loads((directory / "config.json").read_text())
    weights = F.from_stored(_tensors(directory), config)
    return Griffin(ModelConfig.from_dict(config), weights), weights


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny model whose widths are whole 4-bit groups (64), with small weights."""
    d = write_tiny_model(tmp_path_factory.mktemp("src"), hidden_size=64, intermediate_size=256,
                         lru_width=64, head_dim=32, vocab_size=640)
    t = {k: np.array(v) for k, v in _tensors(d).items()}
    for k, v in t.items():  # fan-in scaling, so that activations stay O(1) like a trained model
        if v.ndim == 2 and k.endswith("proj.weight") or "linear_" in k and k.endswith("weight"):
            t[k] = v / np.sqrt(v.shape[1])
    write_safetensors(d / "model.safetensors", t)
    return d


def test_quantizing_over_an_earlier_checkpoint_leaves_none_of_its_files(tiny64, tmp_path):
    # a stale model.safetensors.index.json would be read instead of the new model.safetensors
    out = tmp_path / "q"
    Q.quantize_checkpoint(tiny64, out, 8, shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    Q.quantize_checkpoint(tiny64, out, 4)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert _tensors(out)["model.layers.0.mlp_block.down_proj.weight"].dtype == np.uint8


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trip(tiny64, tmp_path, bits):
    out = Q.quantize_checkpoint(tiny64, tmp_path / f"q{bits}", bits, shard_bytes=20_000)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert (out / "tokenizer.model").exists() and (out / "model.safetensors.index.json").exists()
    raw = _tensors(out)
    src = _tensors(tiny64)
    name = "model.layers.0.mlp_block.down_proj.weight"
    assert raw[name].dtype == (np.int8 if bits == 8 else np.uint8)
    assert raw["model.embed_tokens.weight"].dtype == raw[name].dtype  # the head follows --bits
    assert raw[name + "_scale"].dtype == (np.float32 if bits == 8 else np.uint16)  # 4-bit: BF16
    assert raw["model.layers.0.temporal_block.rg_lru.recurrent_param"].dtype == np.float32
    assert raw["model.layers.0.temporal_block.conv_1d.weight"].dtype == np.float32
    w = F.from_stored(raw, config)
    assert not any(k.endswith("_scale") for k in w)
    assert isinstance(w[name], F.Int8Weight if bits == 8 else F.Int4Weight)
    assert w[name].shape == src[name].shape
    assert isinstance(w[name].scale, np.memmap) or w[name].scale.base is not None  # not copied
    dense = w[name].dequantize()
    err = np.abs(dense - src[name]).max() / np.abs(src[name]).max()
    assert err < (0.01 if bits == 8 else 0.15)


def test_quantized_model_logits_close_to_float(tiny64, tmp_path):
    from rgemma_cli.config import ModelConfig
    from rgemma_cli.model import Griffin
    cfg = ModelConfig.from_json(tiny64 / "config.json")
    ref = Griffin(cfg, _tensors(tiny64))
    tokens = [2, 17, 300, 5, 99]
    lr, _ = ref.forward(tokens, ref.initial_state())
    for bits, tol in ((8, 0.02), (4, 0.4)):  # random weights, 4-bit head too: a sanity bound
        model, _ = _model(Q.quantize_checkpoint(tiny64, tmp_path / f"q{bits}", bits))
        lq, _ = model.forward(tokens, model.initial_state())  # prefill path
        s = model.initial_state()  # decode path, token by token
        for i, t in enumerate(tokens):
            ld, s = model.forward([t], s)
            np.testing.assert_allclose(ld[0], lq[i], atol=0.05 * np.abs(lq).max())
        err = np.abs(lq - lr).max() / np.abs(lr).max()
        assert err < tol, (bits, err)


def test_embedding_bits_override_the_head_only(tiny64, tmp_path):
    for bits, head, dtype in ((4, 8, np.int8), (8, 4, np.uint8), (4, 16, np.float32)):
        out = Q.quantize_checkpoint(tiny64, tmp_path / f"q{bits}-{head}", bits, embedding_bits=head)
        raw = _tensors(out)
        assert raw["model.embed_tokens.weight"].dtype == dtype
        assert raw["model.layers.0.mlp_block.up_proj.weight"].dtype == (np.uint8 if bits == 4 else np.int8)
        assert json.loads((out / "config.json").read_text())["quantization"]["embedding_bits"] == head


def test_narrow_layers_fall_back_to_int8(tmp_path):
    d = write_tiny_model(tmp_path / "src")  # widths of 32: not whole 4-bit groups
    out = Q.quantize_checkpoint(d, tmp_path / "q4", 4)
    raw = _tensors(out)
    assert raw["model.layers.0.mlp_block.up_proj.weight"].dtype == np.int8


def test_refusals(tiny64, tmp_path):
    with pytest.raises(RgemmaError, match="--bits"):
        Q.quantize_checkpoint(tiny64, tmp_path / "x", 3)
    q = Q.quantize_checkpoint(tiny64, tmp_path / "q8", 8)
    with pytest.raises(RgemmaError, match="already quantized"):
        Q.quantize_checkpoint(q, tmp_path / "again", 8)
    with pytest.raises(RgemmaError, match="unsupported quantization"):
        F.from_stored({}, {"quantization": {"method": "gptq"}})


def test_weight_format_names_each_storage():
    w = np.ones((2, 64), np.float32)
    p, s = Q.quantize_int4(w)
    assert F.describe(F.Int4Weight(p, s)) == "4-bit (groups of 64, bf16 scales)"
    assert F.describe(F.Int4Weight(p, np.ones(s.shape, np.float32))) == "4-bit (groups of 64, f32 scales)"
    assert F.describe(F.Int8Weight(*Q.quantize_int8(w))) == "int8 (per-row scales)"
    assert [F.describe(w.astype(t)) for t in (np.float32, np.float16, np.uint16)] == ["f32", "f16", "bf16"]
