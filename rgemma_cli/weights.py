"""The model's weights, typed: one dataclass per unit of the paper, built from a checkpoint's
tensors by one `sanitize` step at load.

Field paths follow the Hugging Face tensor names, so a field greps to its tensor:
`layers[i].temporal_block.rg_lru.input_gate_weight` is
`model.layers.{i}.temporal_block.rg_lru.input_gate_weight`, `layers[i].mlp_block.up_proj.weight`
is `model.layers.{i}.mlp_block.up_proj.weight`. Where sanitize changes a value, the field's
comment says how (conv taps transposed, `1 +` on the norms, softplus of the recurrence
parameter; the output head, docs/model.md#output-head).

Shapes use D = hidden_size, R = lru_width, E = intermediate_size, H = num_attention_heads,
KVH = num_key_value_heads, hd = head_dim, K = conv1d_width, V = vocab_size and, for the RG-LRU
gates, H blocks of bw = R / H. Matrices stay in their stored format (`formats.Weight`: f32,
bf16, f16, int8 or 4-bit, memory-mapped); vectors are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ATTENTION, ModelConfig
from .formats import Weight, as_weight
from .linear import linear


def softplus(z):
    """log(1 + e^z), without overflow."""
    return np.logaddexp(np.float32(0.0), z)


@dataclass
class Linear:
    """y = x @ weight.T + bias. weight (out, in) in its stored format, bias (out,) float32 or
    None (the attention projections q, k, v have none)."""

    weight: Weight
    bias: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (T, in) float32 -> (T, out) float32 (`linear.linear`)."""
        return linear(x, self.weight, self.bias)


@dataclass
class RGLRU:
    """`temporal_block.rg_lru.*`: the Real-Gated Linear Recurrent Unit's gates and decay.

    The gates are block-diagonal: H blocks of (bw, bw), stored [block, in, out] (f32, or bf16
    bits kept as stored: they are read every token)."""

    input_gate_weight: np.ndarray      # (H, bw, bw) f32 or bf16 bits
    input_gate_bias: np.ndarray        # (H, bw) f32
    recurrent_gate_weight: np.ndarray  # (H, bw, bw) f32 or bf16 bits
    recurrent_gate_bias: np.ndarray    # (H, bw) f32
    recurrent_param: np.ndarray        # (R,) f32, as stored: Λ of the paper
    softplus_recurrent_param: np.ndarray  # (R,) f32: softplus(Λ), once at load, not per token


@dataclass
class Conv1D:
    """`temporal_block.conv_1d.*`: a causal depthwise convolution of width K."""

    weight: np.ndarray  # (K, R) f32: tap j of channel r; stored (R, 1, K), transposed at load
    bias: np.ndarray    # (R,) f32


@dataclass
class RecurrentBlock:
    """`temporal_block.*` of a recurrent layer: gelu(x Wy) * rg_lru(conv1d(x Wx)), then Wout."""

    linear_y: Linear    # (R, D) + (R,)
    linear_x: Linear    # (R, D) + (R,)
    conv_1d: Conv1D
    rg_lru: RGLRU
    linear_out: Linear  # (D, R) + (D,)


@dataclass
class AttentionBlock:
    """`temporal_block.*` of a local-attention layer (multi-query: KVH key/value heads)."""

    q_proj: Linear  # (H*hd, D), no bias
    k_proj: Linear  # (KVH*hd, D), no bias
    v_proj: Linear  # (KVH*hd, D), no bias
    o_proj: Linear  # (D, H*hd) + (D,)


@dataclass
class MLPBlock:
    """`mlp_block.*`: the gated MLP (GeGLU)."""

    gate_proj: Linear  # (E, D) + (E,)
    up_proj: Linear    # (E, D) + (E,)
    down_proj: Linear  # (D, E) + (D,)


@dataclass
class ResidualBlock:
    """`model.layers.{i}.*`: one residual block, a temporal block then an MLP block, each after
    an RMS norm."""

    kind: str                      # config.RECURRENT ("recurrent") or config.ATTENTION
    temporal_pre_norm: np.ndarray  # (D,) f32: 1 + the stored `temporal_pre_norm.weight`
    temporal_block: RecurrentBlock | AttentionBlock
    channel_pre_norm: np.ndarray   # (D,) f32: 1 + the stored `channel_pre_norm.weight`
    mlp_block: MLPBlock


@dataclass
class GriffinWeights:
    """`model.*`: every weight of a Griffin."""

    embed_tokens: Weight        # (V, D): the embedding
    layers: list[ResidualBlock]
    final_norm: np.ndarray      # (D,) f32: 1 + the stored `final_norm.weight`
    lm_head: Weight             # (V, D): the output head: embed_tokens itself when tied (as
    #                             released), `lm_head.weight` when config.json unties them


def sanitize(cfg: ModelConfig, tensors: dict) -> GriffinWeights:
    """The typed weights of `tensors` (HF names -> arrays or `formats` weights, as
    `checkpoint.load_weights` returns them, every name of `checkpoint.expected_shapes(cfg)`).

    The one place a stored value is changed for computing: the HF conv weight (R, 1, K) becomes
    taps (K, R); the zero-centred norm weights g become rms_norm scales 1 + g; softplus of the
    recurrence parameter is computed once; matrices are wrapped in their `formats` class.
    Nothing is copied otherwise (memory-mapped matrices stay memory-mapped). The output head is
    `embed_tokens` unless the tensors hold an `lm_head.weight` (checkpoint.load_weights passes
    it only when config.json says tie_word_embeddings: false; the released repos' copy of the
    embedding is not read).
    """
    def t(name):
        return tensors[name]

    def lin(prefix, bias=True):
        return Linear(as_weight(t(prefix + ".weight")), t(prefix + ".bias") if bias else None)

    def norm(name):
        return (1.0 + t(name)).astype(np.float32)

    layers = []
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        tb = p + "temporal_block."
        if kind == ATTENTION:
            temporal = AttentionBlock(q_proj=lin(tb + "q_proj", bias=False),
                                      k_proj=lin(tb + "k_proj", bias=False),
                                      v_proj=lin(tb + "v_proj", bias=False),
                                      o_proj=lin(tb + "o_proj"))
        else:
            conv = t(tb + "conv_1d.weight")
            if conv.ndim == 3:  # HF (R, 1, K) -> taps (K, R)
                conv = conv[:, 0, :].T
            lru = tb + "rg_lru."
            temporal = RecurrentBlock(
                linear_y=lin(tb + "linear_y"), linear_x=lin(tb + "linear_x"),
                conv_1d=Conv1D(np.ascontiguousarray(conv, np.float32), t(tb + "conv_1d.bias")),
                rg_lru=RGLRU(input_gate_weight=t(lru + "input_gate_weight"),
                             input_gate_bias=t(lru + "input_gate_bias"),
                             recurrent_gate_weight=t(lru + "recurrent_gate_weight"),
                             recurrent_gate_bias=t(lru + "recurrent_gate_bias"),
                             recurrent_param=t(lru + "recurrent_param"),
                             softplus_recurrent_param=softplus(t(lru + "recurrent_param"))),
                linear_out=lin(tb + "linear_out"))
        mlp = p + "mlp_block."
        layers.append(ResidualBlock(
            kind=kind,
            temporal_pre_norm=norm(p + "temporal_pre_norm.weight"),
            temporal_block=temporal,
            channel_pre_norm=norm(p + "channel_pre_norm.weight"),
            mlp_block=MLPBlock(lin(mlp + "gate_proj"), lin(mlp + "up_proj"), lin(mlp + "down_proj"))))
    embed_tokens = as_weight(t("model.embed_tokens.weight"))
    head = tensors.get("lm_head.weight")
    return GriffinWeights(embed_tokens=embed_tokens, layers=layers,
                          final_norm=norm("model.final_norm.weight"),
                          lm_head=embed_tokens if head is None else as_weight(head))
