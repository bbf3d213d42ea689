"""Model configuration: the hyper-parameters of a RecurrentGemma checkpoint.

Field names follow Hugging Face `config.json` so a config loads by filtering keys; both the
dialect of the released repos (`_block_types`, top-level rope keys) and the one transformers 5.x
writes (`block_types`, `rope_parameters`) are accepted (spec §1.3).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RgemmaError

RECURRENT = "recurrent"
ATTENTION = "attention"


def bf16_round(x: float) -> float:
    """Round a float to the nearest bfloat16 (ties to even), returned as a Python float."""
    bits = int(np.array(x, dtype=np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Griffin model, named as in HF `config.json`."""

    vocab_size: int = 256000
    hidden_size: int = 2560  # D, the residual width
    intermediate_size: int = 15360  # HF convention: 2 x the MLP branch width
    num_attention_heads: int = 10
    num_key_value_heads: int = 1
    head_dim: int = 256
    num_hidden_layers: int = 26
    lru_width: int = 2560  # R, the RG-LRU width
    attention_window_size: int = 2048  # keys visible: the current token + this many previous
    conv1d_width: int = 4
    logits_soft_cap: float = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    block_types: tuple[str, ...] = (RECURRENT, RECURRENT, ATTENTION)
    embeddings_scale_by_sqrt_dim: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self):
        self.validate()

    # -- derived quantities -------------------------------------------------------------------

    @property
    def mlp_width(self) -> int:
        """E, the width of each MLP branch (HF stores twice this as intermediate_size)."""
        return self.intermediate_size // 2

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The temporal block type of every layer, the pattern repeated and cut to length."""
        p = self.block_types
        return tuple(p[i % len(p)] for i in range(self.num_hidden_layers))

    @property
    def embed_scale(self) -> float:
        """sqrt(D) rounded to bfloat16, as both references do (50.5 for the 2B)."""
        return bf16_round(math.sqrt(self.hidden_size)) if self.embeddings_scale_by_sqrt_dim else 1.0

    @property
    def rotary_dims(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def lru_block_width(self) -> int:
        """Width of one block of the block-diagonal RG-LRU gates (R / H)."""
        return self.lru_width // self.num_attention_heads

    # -- construction -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise RgemmaError if the values cannot describe a working Griffin model."""
        def need(cond, msg):
            if not cond:
                raise RgemmaError(f"unsupported model config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_hidden_layers", "lru_width",
                     "attention_window_size", "conv1d_width"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.intermediate_size % 2 == 0, "intermediate_size must be even (2 x MLP width)")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads")
        need(self.lru_width % self.num_attention_heads == 0,
             "lru_width must be a multiple of num_attention_heads (RG-LRU gate blocks)")
        need(self.rotary_dims % 2 == 0 and 0 <= self.rotary_dims <= self.head_dim,
             "partial_rotary_factor * head_dim must be an even number of dims")
        need(len(self.block_types) > 0, "block_types is empty")
        bad = [t for t in self.block_types if t not in (RECURRENT, ATTENTION)]
        need(not bad, f"unknown block type {bad[:1]} (expected 'recurrent' or 'attention')")
        need(self.logits_soft_cap > 0, "logits_soft_cap must be positive")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build a config from a HF config.json dict of either dialect."""
        if not isinstance(d, dict):
            raise RgemmaError("unsupported model config: config.json is not a JSON object")
        mt = d.get("model_type")
        if mt is not None and mt != "recurrent_gemma":
            raise RgemmaError(f"unsupported model type {mt!r}: rgemma runs 'recurrent_gemma' models")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw.pop("block_types", None)
        pattern = d.get("block_types") or d.get("_block_types")
        if pattern:
            kw["block_types"] = tuple(pattern)
        rope = d.get("rope_parameters") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in kw and key in rope:
                kw[key] = rope[key]
        if "head_dim" not in d or d["head_dim"] is None:
            h = d.get("num_attention_heads", cls.num_attention_heads)
            D = d.get("hidden_size", cls.hidden_size)
            if not h or D % h:
                raise RgemmaError("unsupported model config: hidden_size is not a multiple of "
                                  "num_attention_heads and head_dim is missing")
            kw["head_dim"] = D // h
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kw.get(key), list):  # generation configs sometimes list several ids
                kw[key] = kw[key][0]
        try:
            return cls(**kw)
        except TypeError as e:
            raise RgemmaError(f"unsupported model config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict:
        """The config as a transformers-5.x style config.json dict."""
        d = dataclasses.asdict(self)
        d["block_types"] = list(self.block_types)
        d.update(model_type="recurrent_gemma", architectures=["RecurrentGemmaForCausalLM"],
                 attention_bias=False, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True)
        return d


def read_config_json(path: str | Path) -> dict:
    """The raw dict of a config.json (keys rgemma does not model, like `quantization`, kept)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RgemmaError(f"missing config.json in {path.parent}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RgemmaError(f"{path} is not valid JSON: {e}") from None


PRESETS: dict[str, ModelConfig] = {
    "2b": ModelConfig(),
    "9b": ModelConfig(hidden_size=4096, intermediate_size=24576, num_attention_heads=16,
                      num_hidden_layers=38, lru_width=4096),
}
