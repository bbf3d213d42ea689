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
            t[k] = (v / np.sqrt(v.shape[1])).astype(np.float32)
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


# -- the source is checked as load checks it, before anything is written (F13) -----------------

def _quantize_cli(capsys, *args):
    """`rgemma quantize -q ARGS` through cli.main: (exit status, stderr lines)."""
    from rgemma_cli import cli
    code = cli.main(["quantize", "-q", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def _broken_source(directory, tensors=None, **config):
    d = write_tiny_model(directory)
    if tensors:
        t = {k: np.array(v) for k, v in _tensors(d).items()}
        t.update(tensors)
        write_safetensors(d / "model.safetensors", t)
    if config:
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, **config}))
    return d


GATE = "model.layers.0.mlp_block.gate_proj.weight"


@pytest.mark.parametrize("tensors, config, message", [
    ({GATE: np.ones(32, np.float32)}, {}, "tensor model.layers.0.mlp_block.gate_proj.weight has shape [32]"),
    ({GATE: np.ones((32, 32, 2), np.float32)}, {}, "has shape [32, 32, 2], expected [32, 32]"),
    ({}, {"num_hidden_layers": 1000000}, "num_hidden_layers"),
    ({}, {"num_hidden_layers": 4}, "says num_hidden_layers=4 but the checkpoint holds 3 layers"),
    ({"model.layers.0.mlp_block.up_proj.bias": np.full(32, np.nan, np.float32)}, {}, "NaN or Inf"),
    ({"model.layers.0.mlp_block.up_proj.weight": np.ones((32, 32), np.int32)}, {}, "dtype I32"),
])
def test_a_source_that_load_refuses_is_refused_before_anything_is_written(
        tmp_path, capsys, tensors, config, message):
    src = _broken_source(tmp_path / "src", tensors, **config)
    out = tmp_path / "out" / "q"
    code, err = _quantize_cli(capsys, "--bits", 4, src, out)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


# -- OUT is replaced whole, atomically (F12) ----------------------------------------------------

def test_out_must_be_new_empty_or_a_model_written_by_quantize(tiny64, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = _quantize_cli(capsys, tiny64, mine)
    assert code == 1 and "does not hold a model written by rgemma quantize" in err[0]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _quantize_cli(capsys, tiny64, empty)[0] == 0 and (empty / "config.json").exists()
    link = tmp_path / "link"  # a symlink to OUT stays a symlink; its target is replaced
    link.symlink_to(empty)
    assert _quantize_cli(capsys, "--bits", 4, tiny64, link)[0] == 0
    assert link.is_symlink() and json.loads((empty / "config.json").read_text())["quantization"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "mine"]
    for own in (tiny64, tiny64.parent):  # replacing either would delete the source
        code, err = _quantize_cli(capsys, tiny64, own)
        assert code == 1 and len(err) == 1 and "error: " in err[0] and (tiny64 / "config.json").exists()


def _state_of(out):
    """The bits of the model at `out` after a load's recovery, checked for consistency: the
    config and the tensors say the same, and `load_weights` accepts it."""
    from rgemma_cli.checkpoint import load_weights, resolve
    cfg, weights, _ = load_weights(resolve(str(out)))
    bits = json.loads((out / "config.json").read_text())["quantization"]["bits"]
    kind = type(weights["model.layers.0.mlp_block.down_proj.weight"])
    assert kind is {8: F.Int8Weight, 4: F.Int4Weight}[bits], (bits, kind)
    return bits


def _killed_at(fn_name, when, n, src, out):
    """Fork a child that runs `rgemma quantize --bits 4 src out` and SIGKILLs itself just
    `when` ("before" / "after") the n-th call of `fn_name` (os.fsync, os.rename, ...).
    Returns whether the kill happened (False: the run finished first)."""
    import os
    import shutil
    import signal
    module = os if hasattr(os, fn_name) else shutil
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real, calls = getattr(module, fn_name), [0]

            def killer(*a, **k):
                calls[0] += 1
                if calls[0] == n and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                r = real(*a, **k)
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return r
            setattr(module, fn_name, killer)
            from rgemma_cli import cli
            code = cli.main(["quantize", "-q", "--bits", "4", str(src), str(out)])
        finally:
            os._exit(3)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 3  # finished (the finally's exit) without a kill
    return False


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_kill_at_any_point_leaves_the_old_or_the_new_model(tiny64, tmp_path):
    # every call of each of these, killed just before and just after: every file written and
    # fsynced (shards, index, config.json, side files; after an fsync comes the next call
    # killed before), renamed into place, the directory swap and the cleanup
    parent = tmp_path / "models"
    out = parent / "qb"
    Q.quantize_checkpoint(tiny64, out, 8)
    seen = set()
    for fn, when in [("fsync", "before"), ("copy2", "before"), ("copy2", "after")] + [
            (fn, when) for fn in ("replace", "rename", "rmtree") for when in ("before", "after")]:
        for n in range(1, 50):
            if not _killed_at(fn, when, n, tiny64, out):
                Q.quantize_checkpoint(tiny64, out, 8)  # it finished: back to int8
                break
            seen.add(_state_of(out))  # the old (8) or the new (4) model, never a mix
            Q.quantize_checkpoint(tiny64, out, 8)  # the next run cleans up
            assert sorted(p.name for p in parent.iterdir()) == ["qb"], (fn, when, n)
            assert _state_of(out) == 8
    assert seen == {8, 4}  # kills landed both before and after the swap


def test_a_killed_run_as_a_separate_process(tmp_path):
    # the report's reproduction: SIGKILL in the side-file copy of `quantize --bits 4 demo qb`
    # over an int8 copy used to leave 4-bit weights under a config saying 8 bits
    import subprocess
    import sys
    from rgemma_cli.checkpoint import DEMO_DIR
    Q.quantize_checkpoint(DEMO_DIR, tmp_path / "qb", 8)
    script = ("import os, signal, shutil, sys\n"
              "shutil.copy2 = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "from rgemma_cli.cli import main\n"
              "sys.exit(main(['quantize', '-q', '--bits', '4', 'demo', 'qb']))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True)
    assert r.returncode == -9, r.stderr
    assert _state_of(tmp_path / "qb") == 8


def test_only_our_own_temp_directories_are_removed(tmp_path):
    from rgemma_cli.files import remove_orphans
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    ours, theirs = tmp_path / f".rgemma-tmp-{dead}-abc.tmp", tmp_path / f".notes.{dead}.tmp"
    for d in (ours, theirs):
        d.mkdir()
        (d / "f").write_text("x")
    assert remove_orphans(tmp_path) == 1 and not ours.exists() and (theirs / "f").exists()
