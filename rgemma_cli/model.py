"""The Griffin forward pass (RecurrentGemma), float32 compute over stored-format weights.

Reads top to bottom beside the paper and docs/model.md: embedding -> residual blocks (RG-LRU
recurrent block or local multi-query attention, then a gated MLP) -> final norm -> tied output
head -> soft cap. The model is a pure function `(tokens, state) -> (logits, state)`.

Shapes: T tokens in a chunk, D = hidden_size, R = lru_width, H query heads and KVH key/value
heads of hd dims, W = attention_window_size, V = vocab_size. Activations are float32; the weights
(`weights.GriffinWeights`) stay in their stored formats.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .config import ATTENTION, RECURRENT, ModelConfig
from .errors import RgemmaError
from .kernels.sequence import local_attention_kernel, rg_lru_scan
from .linear import batched_block_diagonal, batched_linear, block_diagonal, embed, linear
from .state import AttentionState, RecurrentState, State
from .weights import (RGLRU, AttentionBlock, Conv1D, GriffinWeights, MLPBlock, RecurrentBlock,
                      ResidualBlock, sanitize)

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


def soft_cap(z, cap):
    """cap * tanh(z / cap): Gemma's logit soft-capping (docs/model.md), float32. A logit that
    is not finite stays so (NaN): tanh would turn an Inf into a plausible +cap and hide a
    broken weight from the caller's non-finite check."""
    cap = np.float32(cap)
    y = np.tanh(z / cap) * cap
    bad = ~np.isfinite(z)
    if bad.any():
        y[bad] = np.nan
    return y


@functools.cache
def _inv_freq(rotary_dims, theta):
    # theta^(-2i/r) in float32, as both references compute it; cached, so read-only
    exponent = np.arange(0, rotary_dims, 2, dtype=np.float32) / np.float32(rotary_dims)
    f = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    f.setflags(write=False)
    return f


def rope_angles(pos, rotary_dims, theta):
    """cos and sin of the RoPE angles at positions pos (T,) int64, each (T, 1, rotary_dims/2)
    float32, computed as both references do. Once per chunk (`Chunk`): every attention layer
    rotates its queries and keys by the same angles."""
    angle = pos.astype(np.float32)[:, None] * _inv_freq(rotary_dims, theta)[None, :]  # (T, half)
    return np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]


def rope(x, angles):
    """Rotate the first rotary_dims dims of each head of x (T, heads, hd) float32, pairing i with
    i + rotary_dims/2, by `angles` = rope_angles(...); the other dims pass through."""
    cos, sin = angles
    half = cos.shape[-1]
    if half == 0:
        return x
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)


def slot_positions(n, window):
    """Position held by each of the `window` ring slots after n tokens, (window,) int64, -1 where
    the slot is still empty (slot = position mod window)."""
    slots = np.arange(window)
    held = slots + ((n - 1 - slots) // window) * window
    return np.where(held >= 0, held, -1)


@dataclass(frozen=True)
class Chunk:
    """Where a chunk of T tokens sits in the sequence; computed once, read by every layer.

    pos (T,) int64: the tokens' positions, state.pos ... state.pos + T - 1.
    angles: cos, sin (T, 1, rotary_dims/2) float32 of the RoPE angles at pos (`rope_angles`).
    slots (W,) int64: the position each key/value ring slot holds before the chunk, -1 if empty.
    """

    pos: np.ndarray
    angles: tuple[np.ndarray, np.ndarray]
    slots: np.ndarray

    @classmethod
    def at(cls, start: int, n: int, cfg: ModelConfig) -> "Chunk":
        """The chunk of n tokens after the first `start` of the sequence."""
        pos = start + np.arange(n, dtype=np.int64)
        return cls(pos, rope_angles(pos, cfg.rotary_dims, cfg.rope_theta),
                   slot_positions(start, cfg.attention_window_size))


# -- blocks ------------------------------------------------------------------------------------
# The two temporal blocks share one signature, (x, chunk, w, state, donate) -> (out, new state),
# so a residual block calls either without knowing which.

def gated_mlp(x, w: MLPBlock):
    """GeGLU: (gelu_tanh(x Wg + bg) * (x Wu + bu)) Wd + bd; x (T, D) -> (T, D) float32."""
    return w.down_proj(gelu_tanh(w.gate_proj(x)) * w.up_proj(x))


def conv1d(u, conv_state, w: Conv1D):
    """Causal depthwise conv of width K; tap K-1 multiplies the current input.

    u (T, R) new inputs, conv_state (K-1, R) the previous inputs, w.weight (K, R), w.bias (R,),
    all float32. Returns the outputs (T, R) and the new state (the last K-1 inputs).
    """
    K, T = w.weight.shape[0], u.shape[0]
    buf = np.concatenate([conv_state, u], axis=0)  # (K-1+T, R)
    out = w.bias + w.weight[0] * buf[0:T]
    for j in range(1, K):
        out = out + w.weight[j] * buf[j:j + T]
    return out, buf[T:]


def rg_lru(c, pos, h0, w: RGLRU):
    """The Real-Gated Linear Recurrent Unit over a chunk (docs/model.md#rg-lru).

    c (T, R) float32 inputs at positions pos (T,), h0 (R,) float32 the state before the chunk.
    Returns every h (T, R) float32; a position 0 starts a new sequence (h forgotten).
    """
    gate_x = sigmoid(block_diagonal(c, w.input_gate_weight, w.input_gate_bias))
    gate_a = sigmoid(block_diagonal(c, w.recurrent_gate_weight, w.recurrent_gate_bias))
    log_a = np.float32(-8.0) * gate_a * w.softplus_recurrent_param
    a = np.exp(log_a)
    multiplier = np.sqrt(1.0 - np.exp(2.0 * log_a))  # as written in both references
    reset = pos == 0  # a new sequence: forget h and do not scale the input
    a[reset] = 0.0
    multiplier[reset] = 1.0
    return rg_lru_scan(a.astype(np.float32), (c * gate_x * multiplier).astype(np.float32), h0)


def recurrent_block(x, chunk: Chunk, w: RecurrentBlock, s: RecurrentState, donate: bool = False):
    """Griffin's recurrent block: gelu(x Wy) * rg_lru(conv1d(x Wx)), then Wout.

    x (T, D) float32 (normed) -> (out (T, D) float32, the layer's new RecurrentState). The state
    is small and always new (`donate` is for the attention block's rings)."""
    y = gelu_tanh(w.linear_y(x))
    c, conv = conv1d(w.linear_x(x), s.conv, w.conv_1d)
    h = rg_lru(c, chunk.pos, s.h, w.rg_lru)
    out = w.linear_out(h * y)
    return out, RecurrentState(h[-1].copy(), np.ascontiguousarray(conv, dtype=np.float32))


def local_attention(x, chunk: Chunk, w: AttentionBlock, s: AttentionState, donate: bool = False):
    """Sliding-window multi-query attention: a query at p sees keys at p-W..p (the official
    rule, docs/model.md#local-attention).

    x (T, D) float32 (normed) -> (out (T, D) float32, the layer's new AttentionState). The head
    counts and window come from the shapes: s.k, s.v (W, KVH, hd), q_proj (H*hd, D). The new keys
    and values go into a copy of the ring, or into `s`'s own ring if `donate`."""
    T = x.shape[0]
    W, kvh, hd = s.k.shape
    H = w.q_proj.weight.shape[0] // hd
    q = rope(w.q_proj(x).reshape(T, H, hd), chunk.angles)
    k = rope(w.k_proj(x).reshape(T, kvh, hd), chunk.angles)
    v = w.v_proj(x).reshape(T, kvh, hd)

    out = local_attention_kernel(np.ascontiguousarray(q, dtype=np.float32), chunk.pos, s.k, s.v,
                                 chunk.slots, np.ascontiguousarray(k),
                                 np.ascontiguousarray(v), W, 1.0 / math.sqrt(hd))
    out = w.o_proj(out.reshape(T, H * hd))

    new_k, new_v = (s.k, s.v) if donate else (s.k.copy(), s.v.copy())
    last = slice(max(0, T - W), T)  # only the last W keys of a long chunk survive
    new_k[chunk.pos[last] % W] = k[last]
    new_v[chunk.pos[last] % W] = v[last]
    return out, AttentionState(new_k, new_v)


TEMPORAL = {RECURRENT: recurrent_block, ATTENTION: local_attention}


def residual_block(x, chunk: Chunk, w: ResidualBlock, s, eps: float, donate: bool = False):
    """One layer: r = x + temporal(rms_norm(x)), then r + gated_mlp(rms_norm(r)).

    x (T, D) float32 -> (x' (T, D) float32, the layer's new state)."""
    out, s = TEMPORAL[w.kind](rms_norm(x, w.temporal_pre_norm, eps), chunk, w.temporal_block, s,
                              donate)
    r = x + out
    return r + gated_mlp(rms_norm(r, w.channel_pre_norm, eps), w.mlp_block), s


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Griffin:
    """A RecurrentGemma model: config, weights and its identity.

    `weights` maps the checkpoint's HF names to arrays as loaded (small ones float32, matrices
    in their stored format); `params` (built from them at construction, `weights.sanitize`) is
    what the forward pass reads."""

    config: ModelConfig
    weights: dict  # HF tensor names -> arrays (small ones float32, matrices as stored)
    fingerprint: str = ""  # digest of the config and checkpoint headers; identifies the model

    def __post_init__(self):
        self.params: GriffinWeights = sanitize(self.config, self.weights)

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
        2B token), and `state` must not be used again. Raises RgemmaError for an empty input or
        a token id outside the vocabulary.
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
        cfg, p = self.config, self.params
        chunk = Chunk.at(state.pos, tokens.size, cfg)
        x = embed(p.embed_tokens, tokens) * np.float32(cfg.embed_scale)
        new_layers = []
        for w, s in zip(p.layers, state.layers):
            x, s = residual_block(x, chunk, w, s, cfg.rms_norm_eps, donate)
            new_layers.append(s)
        new_state = State(state.pos + int(tokens.size), tuple(new_layers))
        if not logits:
            return None, new_state
        if last_only:
            x = x[-1:]
        x = rms_norm(x, p.final_norm, cfg.rms_norm_eps)
        return soft_cap(linear(x, p.lm_head), cfg.logits_soft_cap), new_state

    def forward_batch(self, token_ids, states, *, donate: bool = False):
        """One decode step of B independent sequences at once: sequence i feeds token_ids[i]
        on top of states[i] (each at its own position, with its own rings).

        token_ids: (B,) ints; states: B `State`s. Returns (logits (B, vocab) float32, list of
        B new States). Row i is bit for bit `forward([token_ids[i]], states[i],
        last_only=True)` whatever the other rows are (batch invariance): the linear layers
        stream each weight once for all B rows (`batched_linear`), computing every row as the
        one-row kernel does; conv1d, the RG-LRU scan and attention run per sequence. With
        `donate` the new states reuse the inputs' rings (see `forward`). Raises RgemmaError
        for a token id out of range or a count mismatch.
        """
        cfg, p = self.config, self.params
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        states = list(states)
        B = tokens.size
        if B == 0 or B != len(states):
            raise RgemmaError(f"forward_batch() needs one token per state, got {B} tokens for "
                              f"{len(states)} states")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise RgemmaError(f"token id out of range for a vocabulary of {cfg.vocab_size}")
        chunks = [Chunk.at(s.pos, 1, cfg) for s in states]
        pos = np.array([s.pos for s in states], dtype=np.int64)
        lin = lambda x, m: batched_linear(x, m.weight, m.bias)  # noqa: E731
        x = embed(p.embed_tokens, tokens) * np.float32(cfg.embed_scale)
        new_layers = [[] for _ in range(B)]
        for li, w in enumerate(p.layers):
            xn = rms_norm(x, w.temporal_pre_norm, cfg.rms_norm_eps)
            t = w.temporal_block
            if w.kind == ATTENTION:
                q, k, v = lin(xn, t.q_proj), lin(xn, t.k_proj), lin(xn, t.v_proj)
                out = np.empty((B, q.shape[1]), np.float32)
                for i, st in enumerate(states):
                    s = st.layers[li]
                    W, kvh, hd = s.k.shape
                    c = chunks[i]
                    qi = rope(q[i].reshape(1, -1, hd), c.angles)
                    ki = rope(k[i].reshape(1, kvh, hd), c.angles)
                    vi = v[i].reshape(1, kvh, hd)
                    o = local_attention_kernel(np.ascontiguousarray(qi, dtype=np.float32), c.pos,
                                               s.k, s.v, c.slots, np.ascontiguousarray(ki),
                                               np.ascontiguousarray(vi), W, 1.0 / math.sqrt(hd))
                    out[i] = o.reshape(-1)
                    nk, nv = (s.k, s.v) if donate else (s.k.copy(), s.v.copy())
                    nk[c.pos % W], nv[c.pos % W] = ki, vi
                    new_layers[i].append(AttentionState(nk, nv))
                o = lin(out, t.o_proj)
            else:
                y = gelu_tanh(lin(xn, t.linear_y))
                u = lin(xn, t.linear_x)
                c = np.empty_like(u)
                convs = []
                for i, st in enumerate(states):
                    ci, conv = conv1d(u[i:i + 1], st.layers[li].conv, t.conv_1d)
                    c[i] = ci[0]
                    convs.append(conv)
                g = t.rg_lru  # rg_lru's coefficients, its gates batched
                gate_x = sigmoid(batched_block_diagonal(c, g.input_gate_weight, g.input_gate_bias))
                gate_a = sigmoid(batched_block_diagonal(c, g.recurrent_gate_weight,
                                                        g.recurrent_gate_bias))
                log_a = np.float32(-8.0) * gate_a * g.softplus_recurrent_param
                a = np.exp(log_a)
                multiplier = np.sqrt(1.0 - np.exp(2.0 * log_a))
                reset = pos == 0
                a[reset] = 0.0
                multiplier[reset] = 1.0
                a, xin = a.astype(np.float32), (c * gate_x * multiplier).astype(np.float32)
                h = np.empty_like(c)
                for i, st in enumerate(states):
                    h[i] = rg_lru_scan(a[i:i + 1], xin[i:i + 1], st.layers[li].h)[0]
                    new_layers[i].append(RecurrentState(h[i].copy(), np.ascontiguousarray(
                        convs[i], dtype=np.float32)))
                o = lin(h * y, t.linear_out)
            r = x + o
            m = w.mlp_block
            rn = rms_norm(r, w.channel_pre_norm, cfg.rms_norm_eps)
            x = r + lin(gelu_tanh(lin(rn, m.gate_proj)) * lin(rn, m.up_proj), m.down_proj)
        x = rms_norm(x, p.final_norm, cfg.rms_norm_eps)
        logits = soft_cap(batched_linear(x, p.lm_head), cfg.logits_soft_cap)
        return logits, [State(s.pos + 1, tuple(n)) for s, n in zip(states, new_layers)]
