"""The Griffin forward pass (RecurrentGemma), float32 compute over stored-format weights.

Reads top to bottom beside the paper and `griffin-spec.md`: embedding -> residual blocks
(RG-LRU recurrent block or local multi-query attention, then a gated MLP) -> final norm ->
tied output head -> soft cap. The model is a pure function `(tokens, state) -> (logits, state)`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .config import ATTENTION, ModelConfig
from .errors import RgemmaError
from .kernels.sequence import local_attention_kernel, rg_lru_scan
from .linear import block_diagonal, embed, linear
from .state import AttentionState, RecurrentState, State

# Long inputs are processed in pieces so activations stay small; results do not depend on it.
CHUNK = 1024


# -- elementwise pieces ------------------------------------------------------------------------

def rms_norm(x, scale, eps):
    """x / sqrt(mean(x^2) + eps) * scale, where scale = 1 + g (g is stored zero-centred; the
    model adds the 1 once at load)."""
    mean_sq = np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # = np.mean
    return x / np.sqrt(mean_sq + np.float32(eps)) * scale


def gelu_tanh(z):
    """The tanh approximation of GELU, used everywhere in Griffin."""
    return 0.5 * z * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (z + 0.044715 * z * z * z)))


def sigmoid(z):
    """1 / (1 + e^-z), as the references compute it."""
    with np.errstate(over="ignore"):  # exp(-z) = inf for very negative z gives the right 0
        return 1.0 / (1.0 + np.exp(-z))


def softplus(z):
    """log(1 + e^z), without overflow."""
    return np.logaddexp(np.float32(0.0), z)


@functools.cache
def _inv_freq(rotary_dims, theta):
    # theta^(-2i/r) in float32, as both references compute it; cached, so read-only
    exponent = np.arange(0, rotary_dims, 2, dtype=np.float32) / np.float32(rotary_dims)
    f = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    f.setflags(write=False)
    return f


def rope_angles(pos, rotary_dims, theta):
    """cos and sin of the RoPE angles at positions pos (T,), each (T, 1, rotary_dims/2), in
    float32 as both references compute them. Once per chunk: every attention layer rotates its
    queries and keys by the same angles."""
    angle = pos.astype(np.float32)[:, None] * _inv_freq(rotary_dims, theta)[None, :]  # (T, half)
    return np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]


def rope(x, angles):
    """Rotate the first rotary_dims dims of each head of x (T, heads, hd), pairing i with
    i + rotary_dims/2, by `angles` = rope_angles(...)."""
    cos, sin = angles
    half = cos.shape[-1]
    if half == 0:
        return x
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)


# -- blocks ------------------------------------------------------------------------------------

def gated_mlp(x, w):
    """GeGLU: (gelu_tanh(x Wg + bg) * (x Wu + bu)) Wd + bd."""
    gate = gelu_tanh(linear(x, w["gate_proj.weight"], w["gate_proj.bias"]))
    up = linear(x, w["up_proj.weight"], w["up_proj.bias"])
    return linear(gate * up, w["down_proj.weight"], w["down_proj.bias"])


def conv1d(u, conv_state, w, b):
    """Causal depthwise conv of width K; tap K-1 multiplies the current input.

    u (T, R) new inputs, conv_state (K-1, R) the previous inputs, w (K, R), b (R,).
    Returns the outputs (T, R) and the new state (the last K-1 inputs).
    """
    K, T = w.shape[0], u.shape[0]
    buf = np.concatenate([conv_state, u], axis=0)  # (K-1+T, R)
    out = b + w[0] * buf[0:T]
    for j in range(1, K):
        out = out + w[j] * buf[j:j + T]
    return out, buf[T:]


def rg_lru(c, pos, h0, w):
    """The Real-Gated Linear Recurrent Unit over a chunk; returns all h (T, R)."""
    gate_x = sigmoid(block_diagonal(c, w["input_gate_weight"], w["input_gate_bias"]))
    gate_a = sigmoid(block_diagonal(c, w["recurrent_gate_weight"], w["recurrent_gate_bias"]))
    log_a = np.float32(-8.0) * gate_a * w["softplus_recurrent_param"]
    a = np.exp(log_a)
    multiplier = np.sqrt(1.0 - np.exp(2.0 * log_a))  # as written in both references
    reset = pos == 0  # a new sequence: forget h and do not scale the input
    a[reset] = 0.0
    multiplier[reset] = 1.0
    return rg_lru_scan(a.astype(np.float32), (c * gate_x * multiplier).astype(np.float32), h0)


def recurrent_block(x, pos, w, s: RecurrentState):
    """Griffin's recurrent block: gelu(x Wy) * rg_lru(conv1d(x Wx)), then Wout."""
    y = gelu_tanh(linear(x, w["linear_y.weight"], w["linear_y.bias"]))
    u = linear(x, w["linear_x.weight"], w["linear_x.bias"])
    c, conv = conv1d(u, s.conv, w["conv_1d.weight"], w["conv_1d.bias"])
    h = rg_lru(c, pos, s.h, w)
    out = linear(h * y, w["linear_out.weight"], w["linear_out.bias"])
    return out, RecurrentState(h[-1].copy(), np.ascontiguousarray(conv, dtype=np.float32))


def slot_positions(n, window):
    """Position held by each ring slot after n tokens (-1 where the slot is still empty)."""
    slots = np.arange(window)
    held = slots + ((n - 1 - slots) // window) * window
    return np.where(held >= 0, held, -1)


def local_attention(x, pos, angles, slots, w, s: AttentionState, cfg: ModelConfig,
                    donate: bool = False):
    """Sliding-window multi-query attention: a query at p sees keys at p-W..p (official rule).

    `angles` and `slots` (rope_angles, slot_positions) are the chunk's, shared by all layers.
    The new keys and values go into a copy of the ring, or into `s`'s own ring if `donate`."""
    T, H, hd, W = x.shape[0], cfg.num_attention_heads, cfg.head_dim, cfg.attention_window_size
    kvh = cfg.num_key_value_heads
    q = rope(linear(x, w["q_proj.weight"]).reshape(T, H, hd), angles)
    k = rope(linear(x, w["k_proj.weight"]).reshape(T, kvh, hd), angles)
    v = linear(x, w["v_proj.weight"]).reshape(T, kvh, hd)

    out = local_attention_kernel(np.ascontiguousarray(q, dtype=np.float32), pos, s.k, s.v,
                                 slots, np.ascontiguousarray(k),
                                 np.ascontiguousarray(v), W, 1.0 / math.sqrt(hd))
    out = linear(out.reshape(T, H * hd), w["o_proj.weight"], w["o_proj.bias"])

    new_k, new_v = (s.k, s.v) if donate else (s.k.copy(), s.v.copy())
    last = slice(max(0, T - W), T)  # only the last W keys of a long chunk survive
    new_k[pos[last] % W] = k[last]
    new_v[pos[last] % W] = v[last]
    return out, AttentionState(new_k, new_v)


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Griffin:
    """A RecurrentGemma model: config, weights (HF names, stored formats) and its identity."""

    config: ModelConfig
    weights: dict  # HF tensor names -> arrays (small ones float32, matrices as stored)
    fingerprint: str = ""  # digest of the config and checkpoint headers; identifies the model

    def __post_init__(self):
        w = self.weights
        self.embed_tokens = w["model.embed_tokens.weight"]
        # the output head: the embedding (tied, as released) or lm_head.weight when untied
        self.lm_head = w.get("lm_head.weight", self.embed_tokens)
        self.final_norm = 1.0 + w["model.final_norm.weight"]
        self.layers = []
        for i, kind in enumerate(self.config.layer_types):
            prefix = f"model.layers.{i}."
            lw = {n[len(prefix):]: a for n, a in w.items() if n.startswith(prefix)}
            tb = "temporal_block."
            self.layers.append(dict(
                kind=kind,
                temporal_pre_norm=1.0 + lw["temporal_pre_norm.weight"],  # rms_norm scales
                channel_pre_norm=1.0 + lw["channel_pre_norm.weight"],
                temporal={n[len(tb):].removeprefix("rg_lru."): a for n, a in lw.items() if n.startswith(tb)},
                mlp={n[len("mlp_block."):]: a for n, a in lw.items() if n.startswith("mlp_block.")},
            ))
            if kind != ATTENTION:
                t = self.layers[-1]["temporal"]
                if t["conv_1d.weight"].ndim == 3:  # HF conv weight (R, 1, K) -> taps (K, R)
                    t["conv_1d.weight"] = np.ascontiguousarray(t["conv_1d.weight"][:, 0, :].T)
                t["softplus_recurrent_param"] = softplus(t["recurrent_param"])  # once, not per token

    def initial_state(self) -> State:
        """The state before the first token (position 0, all zeros)."""
        return State.zeros(self.config)

    def forward(self, token_ids, state: State | None = None, *, last_only: bool = False,
                donate: bool = False):
        """Process `token_ids` on top of `state` (default: the initial state); returns
        (logits, new_state).

        logits are float32 (len(token_ids), vocab), or (1, vocab) for the last position only
        when `last_only`. The input state is left untouched, unless `donate`: then the new
        state reuses its key/value rings, written in place (copying them costs ~5% of a 4-bit
        2B token), and `state` must not be used again.
        """
        if state is None:
            state = self.initial_state()
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if tokens.size == 0:
            raise RgemmaError("forward() needs at least one token")
        if tokens.min() < 0 or tokens.max() >= V:
            raise RgemmaError(f"token id out of range for a vocabulary of {V}")
        logits = []
        for start in range(0, tokens.size, CHUNK):
            piece = tokens[start:start + CHUNK]
            want = not last_only or start + CHUNK >= tokens.size
            out, state = self._forward_chunk(piece, state, last_only=last_only, logits=want,
                                             donate=donate or start > 0)
            if want:
                logits.append(out)
        return np.concatenate(logits), state

    def _forward_chunk(self, tokens, state, *, last_only, logits, donate):
        cfg = self.config
        pos = state.pos + np.arange(tokens.size, dtype=np.int64)
        angles = rope_angles(pos, cfg.rotary_dims, cfg.rope_theta)
        slots = slot_positions(state.pos, cfg.attention_window_size)
        x = embed(self.embed_tokens, tokens) * np.float32(cfg.embed_scale)
        new_layers = []
        for layer, s in zip(self.layers, state.layers):
            xn = rms_norm(x, layer["temporal_pre_norm"], cfg.rms_norm_eps)
            if layer["kind"] == ATTENTION:
                o, s = local_attention(xn, pos, angles, slots, layer["temporal"], s, cfg, donate)
            else:
                o, s = recurrent_block(xn, pos, layer["temporal"], s)
            new_layers.append(s)
            r = x + o
            x = r + gated_mlp(rms_norm(r, layer["channel_pre_norm"], cfg.rms_norm_eps), layer["mlp"])
        new_state = State(state.pos + int(tokens.size), tuple(new_layers))
        if not logits:
            return None, new_state
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.final_norm, cfg.rms_norm_eps)
        cap = np.float32(cfg.logits_soft_cap)
        return np.tanh(linear(x, self.lm_head) / cap) * cap, new_state
