"""Model configuration: the hyper-parameters of a RecurrentGemma checkpoint.

Field names follow Hugging Face `config.json` so a config loads by filtering keys; both the
dialect of the released repos (`_block_types`, top-level rope keys) and the one transformers 5.x
writes (`block_types`, `rope_parameters`) are accepted (docs/model.md#configuration).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RgemmaError
from .files import read_regular
from .schema import is_int, is_number, parse_json, short

RECURRENT = "recurrent"
ATTENTION = "attention"

# Upper bounds on the integer fields, far above any released model (the 9B: vocab 256000,
# hidden 4096, 38 layers, window 2048), so a hostile config cannot make rgemma allocate or loop
# for minutes before a tensor is even read; docs/file-formats.md.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 14,
          "num_hidden_layers": 1 << 12, "lru_width": 1 << 17, "attention_window_size": 1 << 20,
          "conv1d_width": 64}
MAX_STATE_BYTES = 16 << 30  # the decode state of a full attention window (2B: 34 MB)


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
    tie_word_embeddings: bool = True  # False: the output head is lm_head.weight

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
        """Raise RgemmaError if the values cannot describe a working Griffin model, or one whose
        decode state would not fit in memory (limits: LIMITS, MAX_STATE_BYTES; the rules are
        listed in docs/file-formats.md)."""
        def need(cond, msg):
            if not cond:
                raise RgemmaError(f"unsupported model config: {msg}")

        for name, hi in LIMITS.items():
            v = getattr(self, name)
            need(is_int(v, 1, hi), f"{name} must be an integer in [1, {hi:,}], got {short(v)}")
        for name in ("logits_soft_cap", "rms_norm_eps", "rope_theta", "partial_rotary_factor"):
            v = getattr(self, name)
            need(is_number(v), f"{name} must be a finite number, got {short(v)}")
        for name in ("embeddings_scale_by_sqrt_dim", "tie_word_embeddings"):
            v = getattr(self, name)
            need(type(v) is bool, f"{name} must be true or false, got {short(v)}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(is_int(v, 0, self.vocab_size - 1),
                 f"{name} must be a token id in [0, vocab_size), got {short(v)}")
        need(self.intermediate_size % 2 == 0, "intermediate_size must be even (2 x MLP width)")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads")
        need(self.lru_width % self.num_attention_heads == 0,
             "lru_width must be a multiple of num_attention_heads (RG-LRU gate blocks)")
        need(0 <= self.partial_rotary_factor <= 1, "partial_rotary_factor must be in [0, 1]")
        need(self.rotary_dims % 2 == 0 and 0 <= self.rotary_dims <= self.head_dim,
             "partial_rotary_factor * head_dim must be an even number of dims")
        need(isinstance(self.block_types, tuple) and len(self.block_types) > 0, "block_types is empty")
        bad = [t for t in self.block_types if t not in (RECURRENT, ATTENTION)]
        need(not bad, f"unknown block type {short(bad[:1])} (expected 'recurrent' or 'attention')")
        need(self.logits_soft_cap > 0, "logits_soft_cap must be positive")
        need(0 < self.rms_norm_eps < 1, "rms_norm_eps must be in (0, 1)")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.state_bytes <= MAX_STATE_BYTES,
             f"its decode state would take {self.state_bytes / 2**30:.1f} GiB (attention window "
             f"{self.attention_window_size:,}); rgemma refuses more than {MAX_STATE_BYTES >> 30} GiB")

    @property
    def state_bytes(self) -> int:
        """Bytes of the decode state once the attention window is full (State.nbytes)."""
        n_att = sum(t == ATTENTION for t in self.layer_types)
        ring = self.attention_window_size * self.num_key_value_heads * self.head_dim
        return 4 * (n_att * 2 * ring + (self.num_hidden_layers - n_att) * self.conv1d_width * self.lru_width)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build a config from a HF config.json dict of either dialect.

        Values are type-checked, never converted: "no" is not false and "2560" is not 2560.
        Raises RgemmaError (one line) for anything rgemma cannot run."""
        if not isinstance(d, dict):
            raise RgemmaError("unsupported model config: config.json is not a JSON object")
        mt = d.get("model_type")
        if mt is not None and mt != "recurrent_gemma":
            raise RgemmaError(f"unsupported model type {short(mt)}: rgemma runs 'recurrent_gemma' models")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw.pop("block_types", None)
        # the key given (null: not given) decides; an empty or false pattern is refused, not
        # taken for the default pattern
        pattern = next((d[k] for k in ("block_types", "_block_types") if d.get(k) is not None), None)
        if pattern is not None:
            if not isinstance(pattern, list) or not pattern:
                raise RgemmaError(f"unsupported model config: block_types must be a non-empty list, "
                                  f"got {short(pattern)}")
            kw["block_types"] = tuple(pattern)
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise RgemmaError(f"unsupported model config: rope_parameters must be an object, got {short(rope)}")
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in kw and key in rope:
                kw[key] = rope[key]
        if "tie_word_embeddings" in d and d["tie_word_embeddings"] is None:
            kw.pop("tie_word_embeddings")
        if "head_dim" not in d or d["head_dim"] is None:
            h = d.get("num_attention_heads", cls.num_attention_heads)
            D = d.get("hidden_size", cls.hidden_size)
            if not (is_int(h, 1) and is_int(D, 1)) or D % h:
                raise RgemmaError("unsupported model config: hidden_size is not a multiple of "
                                  "num_attention_heads and head_dim is missing")
            kw["head_dim"] = D // h
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kw.get(key), list):  # generation configs sometimes list several ids
                if not kw[key]:
                    raise RgemmaError(f"unsupported model config: {key} is an empty list")
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
                 attention_bias=False, hidden_activation="gelu_pytorch_tanh")
        return d


def read_config_json(path: str | Path) -> dict:
    """The raw dict of a config.json (keys rgemma does not model, like `quantization`, kept)."""
    path = Path(path)
    raw = read_regular(path, "config.json", limit=16 * 2**20,
                       missing=f"missing config.json in {path.parent}")
    return parse_json(raw, f"{path} is not valid JSON")


PRESETS: dict[str, ModelConfig] = {
    "2b": ModelConfig(),
    "9b": ModelConfig(hidden_size=4096, intermediate_size=24576, num_attention_heads=16,
                      num_hidden_layers=38, lru_width=4096),
}
