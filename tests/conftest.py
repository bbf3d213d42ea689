"""Shared fixtures."""

# -- a tiny -it model directory with the test tokenizer (CLI, generation and state-file tests) --

import shutil
from pathlib import Path

import numpy as np
import pytest

TEST_TOKENIZER = Path(__file__).parent / "fixtures/tokenizer/tokenizer.model"


def tiny_config(**changes):
    """A Griffin small enough to run a token in well under a millisecond, with the test
    tokenizer's vocabulary and a window short enough (8) that tests wrap it."""
    from rgemma_cli.config import ModelConfig
    kw = dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, num_hidden_layers=3, lru_width=32,
              attention_window_size=8, block_types=("recurrent", "recurrent", "attention"))
    return ModelConfig(**{**kw, **changes})


def write_tiny_model(directory: Path, seed: int = 0, **changes) -> Path:
    """Random weights (numpy only) + config.json + tokenizer.model in `directory`."""
    from rgemma_cli.checkpoint import expected_shapes
    from rgemma_cli.testing import synth
    cfg = tiny_config(**changes)
    rng = np.random.default_rng(seed)
    # unit-variance weights: smaller ones make greedy decoding repeat one token forever
    tensors = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in expected_shapes(cfg).items()}
    synth.write_checkpoint(directory, cfg, tensors)
    shutil.copy(TEST_TOKENIZER, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A chat ("-it") model directory: the CLI defaults to the chat template for it."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-it")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A base model directory (raw prompts by default), other weights than tiny-it."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded from tiny_model_dir."""
    from rgemma_cli import load
    return load(str(tiny_model_dir))


# -- parity: random HF checkpoints (rgemma_cli.testing.synth), reference fixtures -------------
# (test_parity.py, test_reference_live.py; the fixtures come from scripts/fixtures/make_fixtures.py)

PARITY_FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def synth_checkpoint(tmp_path_factory):
    """make(config, seed=0, **write_checkpoint_kw) -> directory of a synth.py checkpoint.

    `config` is a name from synth.CONFIGS / a preset name or a ModelConfig; the weights are
    synth.spec_weights(config, seed) (docs/model.md#synthetic-test-weights). Cached for the
    session per arguments.
    """
    from rgemma_cli.testing import synth
    made = {}

    def make(config="tiny-80", seed=0, **kw):
        cfg = synth.get_config(config) if isinstance(config, str) else config
        key = (repr(cfg), seed, tuple(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp("synth")
            synth.write_checkpoint(d, cfg, synth.spec_weights(cfg, seed), **kw)
            made[key] = d
        return made[key]

    return make
