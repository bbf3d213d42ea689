"""The decode step: feed the pending tokens, sample the next one. No text, no template.

A token stream's position is a `Context`: the model state, the recent fed tokens, the *pending*
tokens (decided but not yet fed: the last sampled token, or a prompt not yet run) and the
sampler's RNG state. `step` is the whole of decoding, as mlx-lm's `generate_step`:

    token, ctx = step(model, ctx, settings)       # feeds ctx.pending, samples; ctx is a value

`Decoder` owns one stream and is the only code that writes its state in place (the attention
rings, ~37 MB for a 2B, are not copied per token). What it hands out stays valid: reading
`Decoder.ctx` makes its next step copy instead. Between `mark()` and `commit()` it remembers
what in-place steps overwrote, so `rollback()` can return to the marked context after a Ctrl-C.
The conversation layer (`generation.Session`) and the batch/server code sit on top of this.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace

import numpy as np

from .errors import RgemmaError
from .sampling import MAX_REPEAT_LAST_N, SamplerSettings, new_rng_state, sample
from .state import AttentionState, State

HISTORY_KEEP = MAX_REPEAT_LAST_N  # fed tokens remembered: the widest repeat-penalty window


@dataclass(frozen=True)
class Context:
    """Where a token stream stands. Never mutated: every step makes a new one."""

    state: State  # the model state after every fed token
    recent: tuple[int, ...]  # the last fed tokens (at most HISTORY_KEEP), for the repeat penalty
    pending: tuple[int, ...]  # decided but not yet fed; fed first by the next step
    rng: dict  # the sampler's PCG64 state (JSON-able)

    @property
    def tokens_seen(self) -> int:
        """Tokens in the stream so far, fed or pending."""
        return self.state.pos + len(self.pending)

    @classmethod
    def start(cls, model, seed: int) -> "Context":
        """The empty stream of `model`, its sampler seeded with `seed`."""
        return cls(model.initial_state(), (), (), new_rng_state(seed))


def step(model, ctx: Context, settings: SamplerSettings, *, donate: bool = False,
         rng: np.random.Generator | None = None) -> tuple[int, Context]:
    """Feed `ctx.pending` (a prompt: one prefill; else the last sampled token) and sample the
    next token. Returns (token id, the new context, whose only pending token is that id).

    donate: the caller gives up `ctx.state`; the model may write the new key/value into its
    rings in place (only for a single pending token). Raises RgemmaError if nothing is pending.
    """
    if not ctx.pending:
        raise RgemmaError("nothing to continue from: give a prompt")
    kw = {"donate": True} if donate and len(ctx.pending) == 1 and _takes_donate(type(model)) else {}
    try:  # NaN / Inf are reported once, below, not as NumPy warnings on the way
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            logits, state = model.forward(list(ctx.pending), ctx.state, last_only=True, **kw)
    except ZeroDivisionError:  # a kernel's softmax sum was NaN: non-finite activations
        logits = None
    if logits is None or not np.isfinite(logits[-1]).all():  # ~20 us for 256k logits
        raise non_finite_error(model, ctx.state.pos + len(ctx.pending) - 1)
    recent = (ctx.recent + ctx.pending)[-HISTORY_KEEP:]
    rng = rng or np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = ctx.rng
    token = sample(logits[-1], settings, recent, rng)
    return token, Context(state, recent, (token,), rng.bit_generator.state)


def prefill(model, ctx: Context) -> Context:
    """Feed `ctx.pending` without sampling (a document read now, answered later)."""
    if not ctx.pending:
        return ctx
    _, state = model.forward(list(ctx.pending), ctx.state, last_only=True)
    return replace(ctx, state=state, recent=(ctx.recent + ctx.pending)[-HISTORY_KEEP:], pending=())


class Decoder:
    """The owner of one token stream: steps it, in place while nobody else holds its state."""

    def __init__(self, model, settings: SamplerSettings, ctx: Context | None = None):
        self.model = model
        self.settings = settings.with_seed()
        self._ctx = ctx or Context.start(model, self.settings.seed)
        self._shared = ctx is not None  # someone else may hold self._ctx: do not write into it
        self._undo = None  # after mark(): [(ring, slot, old rows)] written in place since
        self._rng = np.random.Generator(np.random.PCG64())

    @property
    def ctx(self) -> Context:
        """The current context, a value: reading it makes the next step leave its state alone."""
        self._shared = True
        if self._undo:  # its rings may still be rolled back: hand out a copy
            return replace(self._ctx, state=self._ctx.state.copy())
        return self._ctx

    @ctx.setter
    def ctx(self, value: Context) -> None:
        self._ctx, self._shared = value, True

    @property
    def pending(self) -> tuple[int, ...]:
        return self._ctx.pending

    @property
    def tokens_seen(self) -> int:
        return self._ctx.tokens_seen

    def feed(self, ids) -> None:
        """Queue tokens; they are run by the next step (or stay pending in a saved file)."""
        self._ctx = replace(self._ctx, pending=self._ctx.pending + tuple(int(i) for i in ids))

    def step(self) -> int:
        """Feed the pending tokens, sample the next one; it becomes the only pending token."""
        c = self._ctx
        donate = not self._shared and len(c.pending) == 1 and _takes_donate(type(self.model))
        if donate and self._undo is not None:  # keep what the new slot held, for `rollback`
            slot = c.state.pos % self.model.config.attention_window_size
            self._undo += [(ring, slot, ring[slot].copy()) for layer in c.state.layers
                           if isinstance(layer, AttentionState) for ring in (layer.k, layer.v)]
        token, self._ctx = step(self.model, c, self.settings, donate=donate, rng=self._rng)  # one store
        self._shared = False
        return token

    def prefill(self) -> None:
        """Feed the pending tokens without sampling."""
        self._ctx = prefill(self.model, self._ctx)
        self._shared = False

    def mark(self) -> Context:
        """Start remembering in-place writes; returns the current context to roll back to."""
        self._undo = []
        return self._ctx

    def commit(self) -> Context:
        """Forget the in-place writes so far: the current context becomes the rollback point."""
        self._undo = [] if self._undo is not None else None
        return self._ctx

    def rollback(self, to: Context) -> None:
        """Return to `to` (the context of the last `mark` or `commit`), un-writing the rows
        that in-place steps overwrote since."""
        for ring, slot, rows in reversed(self._undo or ()):
            ring[slot] = rows
        self._ctx, self._undo = to, []

    def release(self) -> None:
        """Stop remembering in-place writes."""
        self._undo = None


def non_finite_error(model, pos: int) -> RgemmaError:
    """The error for NaN / Inf logits at token position `pos`, naming the first weight tensor
    holding NaN or Inf (a scan of the weights, paid only on this error path) if there is one."""
    from .checkpoint import non_finite_tensors
    bad = non_finite_tensors(getattr(model, "weights", {}))
    why = (f"tensor {bad[0]} holds NaN or Inf" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
           if bad else "the activations overflowed (the weights are finite)")
    return RgemmaError(f"the model produced NaN/Inf logits at position {pos}: {why}; generation "
                       f"stopped (`rgemma info --check MODEL` scans a checkpoint)")


@functools.cache
def _takes_donate(model_type) -> bool:
    """Whether the model's forward accepts `donate` (stand-in models in tests may not)."""
    return "donate" in inspect.signature(model_type.forward).parameters
