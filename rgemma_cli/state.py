"""The model's decode-time state: a plain value, fixed in size whatever the sequence length.

Per recurrent layer the RG-LRU hidden state `h` and the last `K-1` conv inputs; per attention
layer the post-RoPE key/value ring buffers (slot = position mod W); and `pos`, the number of
tokens processed (= the position of the next token). docs/model.md#state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ATTENTION, ModelConfig


@dataclass
class RecurrentState:
    """State of one recurrent layer."""

    h: np.ndarray  # (R,) float32: RG-LRU hidden state after the last token
    conv: np.ndarray  # (K-1, R) float32: last conv inputs, oldest first (zeros before the start)


@dataclass
class AttentionState:
    """State of one local-attention layer."""

    k: np.ndarray  # (W, KVH, hd) float32: post-RoPE keys, slot = position mod W
    v: np.ndarray  # (W, KVH, hd) float32: values, same slots


@dataclass
class State:
    """Everything the model carries from one chunk of tokens to the next."""

    pos: int
    layers: tuple  # one RecurrentState or AttentionState per layer

    @classmethod
    def zeros(cls, config: ModelConfig) -> "State":
        """The state before any token: position 0, all buffers zero."""
        R, W = config.lru_width, config.attention_window_size
        kv = (W, config.num_key_value_heads, config.head_dim)
        layers = tuple(
            AttentionState(np.zeros(kv, np.float32), np.zeros(kv, np.float32))
            if t == ATTENTION else
            RecurrentState(np.zeros(R, np.float32), np.zeros((config.conv1d_width - 1, R), np.float32))
            for t in config.layer_types)
        return cls(0, layers)

    def copy(self) -> "State":
        """A deep copy (states are values; the model never mutates its input state)."""
        return State(self.pos, tuple(
            type(l)(*(a.copy() for a in vars(l).values())) for l in self.layers))

    def __eq__(self, other) -> bool:
        if not isinstance(other, State) or self.pos != other.pos or len(self.layers) != len(other.layers):
            return False
        return all(type(a) is type(b) and all(np.array_equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
                   for a, b in zip(self.layers, other.layers))

    def arrays(self) -> dict[str, np.ndarray]:
        """The state's tensors by name (`layers.{i}.h`, `.conv`, `.k`, `.v`), for files and tests."""
        return {f"layers.{i}.{name}": a for i, l in enumerate(self.layers) for name, a in vars(l).items()}

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the state's arrays."""
        return sum(a.nbytes for a in self.arrays().values())
