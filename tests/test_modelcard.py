"""Chat or raw is a property of the model (issue 10 item 3), and its stop ids."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from rgemma_cli.checkpoint import DEMO_DIR
from rgemma_cli.errors import RgemmaError
from rgemma_cli.modelcard import chat_nature, eos_ids, read_card
from rgemma_cli.quantize import quantize_checkpoint


def test_the_demo_is_a_chat_model_however_it_is_named(tmp_path, monkeypatch):
    assert chat_nature(DEMO_DIR)[0]
    monkeypatch.chdir(DEMO_DIR.parent.parent)
    assert chat_nature("weights/demo")[0] and chat_nature("./weights/demo/")[0]
    os.symlink(DEMO_DIR, tmp_path / "my-model")
    chat, why = chat_nature(tmp_path / "my-model")
    assert chat and "demo" in why


def test_a_quantized_copy_keeps_its_sources_nature(tmp_path, tiny_model_dir, tiny_base_dir):
    for src, chat in ((DEMO_DIR, True), (tiny_model_dir, True), (tiny_base_dir, False)):
        out = quantize_checkpoint(src, tmp_path / f"copy-{chat}-{src.name}-q8", 8)
        assert chat_nature(out)[0] is chat, src
        assert json.loads((out / "config.json").read_text())["rgemma"]["chat"] is chat
        again = quantize_checkpoint(src, tmp_path / f"q4-of-{src.name}", 4)  # any name
        got, why = chat_nature(again)
        assert got is chat and "recorded in config.json" in why


@pytest.mark.parametrize("repo, chat", [("google--recurrentgemma-2b-it", True),
                                        ("google--recurrentgemma-2b", False),
                                        ("someone--gemma-9b-it-q8", True)])
def test_hub_snapshots_follow_the_repo_id(tmp_path, tiny_base_dir, repo, chat):
    snap = tmp_path / "hub" / f"models--{repo}" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_base_dir, snap)
    got, why = chat_nature(snap)
    assert got is chat and repo.replace("--", "/") in why


def test_directory_names_follow_the_it_rule(tmp_path, tiny_base_dir):
    for name, chat in (("recurrentgemma-2b-it", True), ("rg_it", True), ("tiny", False),
                       ("edit-model", False)):
        d = shutil.copytree(tiny_base_dir, tmp_path / name)
        assert chat_nature(d)[0] is chat, name


def test_eos_ids_come_from_generation_config(tmp_path, tiny_base_dir):
    assert eos_ids(DEMO_DIR) == (1, 107)
    assert read_card(DEMO_DIR).eos_ids == (1, 107)
    d = shutil.copytree(tiny_base_dir, tmp_path / "m")
    (d / "generation_config.json").write_text('{"eos_token_id": [1, 107, 5]}')
    assert set(eos_ids(d)) == {1, 107, 5}
    (d / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(RgemmaError, match="eos_token_id"):
        eos_ids(d)
    (d / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(RgemmaError, match="not valid JSON"):
        eos_ids(d)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep", "too-large", "id-too-big",
                                  "negative", "bool"])
def test_generation_config_is_untrusted_input(tmp_path, tiny_base_dir, kind):
    """A FIFO is refused, not waited on; /dev/zero is refused, not read to exhaustion; deep
    nesting is a parse error, not a RecursionError; ids outside [0, vocab_size) are refused."""
    d = shutil.copytree(tiny_base_dir, tmp_path / "m")
    gc = d / "generation_config.json"
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    if kind == "fifo":
        os.mkfifo(gc)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", gc)
    elif kind == "deep":
        gc.write_text("[" * 100000)
    elif kind == "too-large":
        gc.write_text('{"eos_token_id": 1, "pad": "' + "x" * (2 << 20) + '"}')
    else:
        bad = {"id-too-big": [1, 99999999999999999999], "negative": -1, "bool": True}[kind]
        gc.write_text(json.dumps({"eos_token_id": bad}))
    with pytest.raises(RgemmaError, match="generation_config.json") as e:
        read_card(d)
    assert "\n" not in str(e.value)
    gc.unlink()
    gc.write_text(json.dumps({"eos_token_id": [1, vocab - 1]}))
    assert eos_ids(d) == (1, vocab - 1)
    gc.write_text(json.dumps({"eos_token_id": vocab}))
    with pytest.raises(RgemmaError, match=r"\[0, %d\)" % vocab):
        eos_ids(d)


def test_info_and_generate_refuse_a_fifo_generation_config(tmp_path, tiny_base_dir):
    """Subprocesses: before the fix both commands blocked forever in open()."""
    d = shutil.copytree(tiny_base_dir, tmp_path / "m")
    os.mkfifo(d / "generation_config.json")
    for args in (["info", d], ["generate", "-m", d, "-n", "1", "--raw", "hi"]):
        r = subprocess.run([sys.executable, "-m", "rgemma_cli.cli", *map(str, args)],
                           capture_output=True, text=True, timeout=60)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), err
        assert "generation_config.json" in err[0] and "FIFO" in err[0]
