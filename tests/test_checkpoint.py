"""Checkpoint loading: HF layouts, dtypes, memory mapping, the Hub path, and every error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rgemma_cli import load
from rgemma_cli import checkpoint
from rgemma_cli.config import ModelConfig
from rgemma_cli.errors import RgemmaError
from rgemma_cli.safetensors import bf16_to_f32, f32_to_bf16, write_safetensors

from rgemma_cli.testing import synth

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, num_hidden_layers=3, lru_width=32,
                  attention_window_size=4)
TOKENS = [2, 5, 9, 11, 3, 60, 7, 7, 1, 33]


@pytest.fixture(scope="module")
def weights():
    return synth.spec_weights(CFG, seed=3)


def write(tmp_path, weights, **kw):
    d = tmp_path / "model"
    synth.write_checkpoint(d, CFG, weights, **kw)
    return d


def logits_of(directory):
    model, _ = load(str(directory))
    return model.forward(TOKENS, model.initial_state())[0]


def test_layouts_and_dialects_give_the_same_model(tmp_path, weights):
    base = logits_of(write(tmp_path / "a", weights))
    sharded = write(tmp_path / "b", weights, shards=3, dialect="old", lm_head=True)
    assert (sharded / "model.safetensors.index.json").exists()
    assert np.array_equal(logits_of(sharded), base)


def test_bf16_stays_bf16_and_memory_mapped(tmp_path, weights):
    d = write(tmp_path, weights, dtype="bf16")
    model, tok = load(str(d))
    emb = model.weights["model.embed_tokens.weight"]
    assert emb.dtype == np.uint16 and not emb.flags.owndata and not emb.flags.writeable
    assert model.weights["model.final_norm.weight"].dtype == np.float32
    gates = [a for n, a in model.weights.items() if n.endswith("gate_weight")]  # read per token
    assert gates and all(g.dtype == np.uint16 and not g.flags.owndata for g in gates)
    # The same model as f32 weights rounded to bf16.
    rounded = {k: bf16_to_f32(f32_to_bf16(v)) for k, v in weights.items()}
    assert np.abs(logits_of(d) - logits_of(write(tmp_path / "r", rounded))).max() < 1e-5


def test_f16_weights_load(tmp_path, weights):
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    d = tmp_path / "m"
    synth.write_checkpoint(d, CFG, {k: v.astype(np.float32) for k, v in half.items()})
    ref = logits_of(d)
    write_safetensors(d / "model.safetensors", half)
    assert np.abs(logits_of(d) - ref).max() < 1e-5


def test_fingerprint_tracks_config_and_headers(tmp_path, weights):
    a, _ = load(str(write(tmp_path / "a", weights)))
    b, _ = load(str(write(tmp_path / "b", weights, shards=2, dialect="old")))
    c, _ = load(str(write(tmp_path / "c", weights, dtype="bf16")))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def error_of(directory) -> str:
    with pytest.raises(RgemmaError) as e:
        load(str(directory))
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_directory_and_files(tmp_path, weights):
    assert "not found" in error_of(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "config.json" in error_of(tmp_path / "empty")
    d = write(tmp_path, weights)
    (d / "model.safetensors").unlink()
    assert "no model.safetensors" in error_of(d)


def test_missing_shard(tmp_path, weights):
    d = write(tmp_path, weights, shards=2)
    next(d.glob("model-00002-*.safetensors")).unlink()
    assert "missing checkpoint file" in error_of(d)


@pytest.mark.parametrize("cut", [4, 100, 2000, -3])
def test_truncated_file(tmp_path, weights, cut):
    d = write(tmp_path, weights)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    assert "truncated" in error_of(d) or "corrupt" in error_of(d)


def test_corrupt_header(tmp_path, weights):
    d = write(tmp_path, weights)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    assert "corrupt" in error_of(d)


def test_missing_extra_and_misshapen_tensors(tmp_path, weights):
    name = "model.layers.1.temporal_block.rg_lru.recurrent_param"
    d = write(tmp_path / "missing", {k: v for k, v in weights.items() if k != name})
    assert "missing tensor " + name in error_of(d)
    d = write(tmp_path / "extra", dict(weights, **{"model.layers.1.foo.weight": np.zeros(3, np.float32)}))
    assert "unexpected tensor model.layers.1.foo.weight" in error_of(d)
    bad = dict(weights)
    bad["model.layers.2.temporal_block.q_proj.weight"] = np.zeros((31, 32), np.float32)
    assert "shape [31, 32], expected [32, 32]" in error_of(write(tmp_path / "shape", bad))


def test_config_that_does_not_match_the_weights(tmp_path, weights):
    d = write(tmp_path, weights)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    assert "num_hidden_layers=4 but the checkpoint holds 3 layers" in error_of(d)


def test_unsupported_dtype(tmp_path, weights):
    d = write(tmp_path, weights)
    write_safetensors(d / "model.safetensors", {k: v.astype(np.float64) for k, v in weights.items()})
    assert "dtype F64" in error_of(d)


def test_unknown_model_names():
    with pytest.raises(RgemmaError, match="neither a local directory nor a Hub repo id"):
        checkpoint.resolve("./no/such/dir")
    with pytest.raises(RgemmaError, match="neither"):
        checkpoint.resolve("just-a-name")


def test_gated_repo_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hf

    def gated(*a, **k):
        err = hf.GatedRepoError.__new__(hf.GatedRepoError)
        Exception.__init__(err, "403")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(RgemmaError) as e:
        checkpoint.resolve("google/recurrentgemma-2b-it")
    msg = str(e.value)
    assert "https://huggingface.co/google/recurrentgemma-2b-it" in msg and "HF_TOKEN" in msg
    assert "hf auth login" in msg and "\n" not in msg


def _run_load(model, env):
    code = ("import sys; from rgemma_cli import load, RgemmaError\n"
            "try:\n m, t = load(sys.argv[1]); print('OK', m.config.num_hidden_layers)\n"
            "except RgemmaError as e:\n print('ERR', e); sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_hub_repo_id_from_a_prepopulated_cache_offline(tmp_path, weights):
    # The HF cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}.
    repo = tmp_path / "hub" / "models--someorg--tiny-griffin"
    commit = "0123456789abcdef0123456789abcdef01234567"
    synth.write_checkpoint(repo / "snapshots" / commit, CFG, weights)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path))
    r = _run_load("someorg/tiny-griffin", env)
    assert r.stdout.strip() == "OK 3", r.stderr
    r = _run_load("someorg/not-cached", env)
    assert r.returncode == 1 and "not in the local HF cache" in r.stdout and "HF_HUB_OFFLINE" in r.stdout


# -- untrusted config.json, index and tensors (issue 11, item 1 and 4) --------------------------

def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_a_million_layers_is_refused_at_once(tmp_path, weights):
    d = write(tmp_path, weights)
    _edit_config(d, num_hidden_layers=10**6)
    assert "num_hidden_layers" in error_of(d)
    _edit_config(d, num_hidden_layers=4000)  # within the bound: checked against the tensors
    assert "num_hidden_layers=4000 but the checkpoint holds 3 layers" in error_of(d)


@pytest.mark.parametrize("changes, words", [
    ({"rope_theta": 0.0}, "rope_theta"), ({"attention_window_size": 10**9}, "attention_window_size"),
    ({"hidden_size": "32"}, "hidden_size"), ({"embeddings_scale_by_sqrt_dim": "no"}, "true or false"),
    ({"quantization": "int8"}, "quantization must be an object"),
])
def test_bad_config_values_are_one_line(tmp_path, weights, changes, words):
    d = write(tmp_path, weights)
    _edit_config(d, **changes)
    assert words in error_of(d)


def test_untied_head_is_used_or_refused(tmp_path, weights):
    d = write(tmp_path, weights, lm_head=True)
    tied = logits_of(d)
    head = np.random.default_rng(7).standard_normal(weights["model.embed_tokens.weight"].shape)
    write_safetensors(d / "model.safetensors", dict(weights, **{"lm_head.weight": head.astype(np.float32)}))
    assert np.array_equal(logits_of(d), tied)  # tied (the default): lm_head.weight is a copy, unread
    _edit_config(d, tie_word_embeddings=False)
    model, _ = load(str(d))
    x = model.forward(TOKENS)[0]
    assert not np.allclose(x, tied)
    # the untied head computes exactly the logits of a tied model whose embedding were that head,
    # for the last hidden state: check through the model's own pieces
    head = model.params.lm_head
    assert head is not model.params.embed_tokens
    assert np.shares_memory(head.widen(), model.weights["lm_head.weight"])  # read as loaded
    write_safetensors(d / "model.safetensors", weights)
    assert "tie_word_embeddings: false but the checkpoint has no lm_head.weight" in error_of(d)


@pytest.mark.parametrize("weight_map, words", [
    ({"model.final_norm.weight": 3}, "not a .safetensors file name"),
    ({"model.final_norm.weight": ["model.safetensors"]}, "not a .safetensors file name"),
    ({"model.final_norm.weight": "../model.safetensors"}, "not a .safetensors file name"),
    ({"model.final_norm.weight": "/etc/passwd"}, "not a .safetensors file name"),
    ([], "no weight_map"), ({}, "no weight_map"),
])
def test_bad_shard_index_is_refused(tmp_path, weights, weight_map, words):
    d = write(tmp_path, weights, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    if isinstance(weight_map, dict) and weight_map:
        index["weight_map"].update(weight_map)
    else:
        index["weight_map"] = weight_map
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert words in error_of(d)


def test_non_finite_norm_is_refused_at_load(tmp_path, weights):
    bad = dict(weights)
    bad["model.layers.1.channel_pre_norm.weight"] = bad["model.layers.1.channel_pre_norm.weight"].copy()
    bad["model.layers.1.channel_pre_norm.weight"][3] = np.nan
    assert "model.layers.1.channel_pre_norm.weight" in error_of(write(tmp_path, bad))


def test_check_finite_names_every_bad_tensor(tmp_path, weights):
    d = write(tmp_path / "ok", weights, dtype="bf16")
    assert checkpoint.check_finite(d) == []
    bad = dict(weights)
    for name, v in (("model.embed_tokens.weight", np.inf), ("model.layers.2.temporal_block.o_proj.weight", np.nan)):
        bad[name] = bad[name].copy()
        bad[name].flat[5] = v
    for dtype in ("f32", "bf16"):
        d = write(tmp_path / dtype, bad, dtype=dtype)
        assert checkpoint.check_finite(d) == ["model.embed_tokens.weight",
                                              "model.layers.2.temporal_block.o_proj.weight"]


# -- the shard index schema, property test ------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mutations import FUZZ, attempt, dumps, mutated  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("sharded") / "model"
    synth.write_checkpoint(d, CFG, weights, shards=2)
    return d, json.loads((d / "model.safetensors.index.json").read_text()), logits_of(d)


@FUZZ
@given(data=st.data())
def test_property_mutated_index_is_refused_or_loads(sharded, tmp_path_factory, data):
    src, index, ref = sharded
    d = tmp_path_factory.mktemp("idx")
    for p in src.iterdir():
        (d / p.name).symlink_to(p)
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors.index.json").write_bytes(dumps(data.draw(mutated(index))))
    attempt("shard index", lambda: load(str(d))[0],
            lambda model: np.testing.assert_array_equal(model.forward(TOKENS)[0], ref))  # the same model
