"""The generation loop: feed tokens, sample, stream text, stop; resumable at any token.

A conversation's position is a `Context` — the model state, the recent fed tokens, the *pending*
tokens (decided but not yet fed: the last sampled token, or a prompt not yet run) and the
sampler's RNG state. A step feeds the pending tokens and samples one new pending token. The
context is immutable and replaced by a single assignment after each step, so a Ctrl-C at any
moment leaves `Session.ctx` describing exactly the tokens shown so far, and saving it then
resuming reproduces an uninterrupted run token for token.

    session = Session(model, tokenizer, SamplerSettings(temperature=0))
    for piece in session.generate(tokenizer.raw_prompt("Hello"), max_tokens=20):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import RgemmaError
from .sampling import MAX_REPEAT_LAST_N, SamplerSettings, new_rng_state, sample
from .state import AttentionState, State
from .tokenizer import END_OF_TURN, Tokenizer

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


@dataclass
class Generation:
    """One call of `Session.generate`: iterate for text pieces; the fields fill in as it runs."""

    tokens: list[int] = field(default_factory=list)  # sampled ids, the stopping one included
    text: str = ""  # everything yielded
    finish_reason: str | None = None  # "stop" | "length" | "interrupted"
    prompt_tokens: int = 0  # tokens fed by the first step (the prompt and the old pending token)
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0
    shown: Context | None = None  # the context as of the last text yielded
    _iter: object = None

    def __iter__(self):
        return self._iter

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (the first step: prefill plus the first sample)."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        """Generated tokens per second after the first one."""
        n = len(self.tokens) - 1  # the first token's time is counted with the prompt
        return n / self.gen_seconds if n > 0 and self.gen_seconds else 0.0


class Session:
    """A model, its tokenizer, sampler settings and a `Context`; generation advances it.

    Decoding writes each new key/value into the state's ring in place instead of copying the
    ring (`Griffin.forward(donate=True)`), but only while the state is the session's own: once
    `ctx` has been read or set from outside, the next step copies, so a context anyone holds
    keeps its meaning. Inside `generate`, the ring slots a step overwrites are saved first, so
    `interrupt` can still go back to the last context shown.
    """

    def __init__(self, model, tokenizer: Tokenizer, settings: SamplerSettings,
                 ctx: Context | None = None, *, mode: str = "raw", transcript=None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings.with_seed()
        self._ctx = ctx or Context(model.initial_state(), (), (), new_rng_state(self.settings.seed))
        self._shared = ctx is not None  # someone else may hold self._ctx: do not write into it
        self._undo = None  # in `generate`: [(ring, slot, old rows)] written in place since `shown`
        self.mode = mode  # "chat" or "raw": how prompts are wrapped
        self.transcript = list(transcript or [])  # [{"role": "system"|"user"|"model", "content"}]
        self._rng = np.random.Generator(np.random.PCG64())

    @property
    def ctx(self) -> Context:
        """The current context. Reading it makes the next step leave its state untouched."""
        self._shared = True
        if self._undo:  # its rings may still be rolled back by `interrupt`: hand out a copy
            return replace(self._ctx, state=self._ctx.state.copy())
        return self._ctx

    @ctx.setter
    def ctx(self, value: Context) -> None:
        self._ctx, self._shared = value, True

    @property
    def fresh(self) -> bool:
        """Nothing has been fed or queued yet."""
        return self._ctx.tokens_seen == 0

    def prompt_ids(self, text: str, system: str | None = None) -> list[int]:
        """The ids that append `text` as a prompt: a user turn in chat mode, plain text in raw
        mode (BOS only at the very start)."""
        if self.mode == "chat":
            return self.tokenizer.chat_prompt(
                text, system=system, first=self.fresh,
                close_model_turn=self._ctx.pending[-1:] != (END_OF_TURN,))
        return self.tokenizer.raw_prompt(text, bos=self.fresh)

    def user_turn(self, text: str, system: str | None = None) -> list[int]:
        """Record a prompt in the transcript (with an empty reply to stream into) and return
        the ids that append it."""
        ids = self.prompt_ids(text, system)
        if self.fresh and system and system.strip():
            self.transcript.append({"role": "system", "content": system.strip()})
        self.transcript += [{"role": "user", "content": text.strip()}, {"role": "model", "content": ""}]
        return ids

    def feed(self, ids) -> None:
        """Queue tokens; they are run by the next step (or stay pending in a saved file)."""
        self._ctx = replace(self._ctx, pending=self._ctx.pending + tuple(int(i) for i in ids))

    def step(self) -> int:
        """Feed the pending tokens, sample the next one; it becomes the only pending token."""
        c = self._ctx
        if not c.pending:
            raise RgemmaError("nothing to continue from: give a prompt")
        donate = not self._shared and len(c.pending) == 1 and _takes_donate(type(self.model))
        if donate and self._undo is not None:  # keep what the new slot held, for `interrupt`
            W = self.model.config.attention_window_size
            slot = c.state.pos % W
            self._undo += [(ring, slot, ring[slot].copy()) for layer in c.state.layers
                           if isinstance(layer, AttentionState) for ring in (layer.k, layer.v)]
        try:  # NaN / Inf are reported once, below, not as NumPy warnings on the way
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                logits, state = self.model.forward(list(c.pending), c.state, last_only=True,
                                                   **({"donate": True} if donate else {}))
        except ZeroDivisionError:  # a kernel's softmax sum was NaN: non-finite activations
            logits = None
        if logits is None or not np.isfinite(logits[-1]).all():  # ~20 us for 256k logits
            raise non_finite_error(self.model, c.state.pos + len(c.pending) - 1)
        recent = (c.recent + c.pending)[-HISTORY_KEEP:]
        self._rng.bit_generator.state = c.rng
        token = sample(logits[-1], self.settings, recent, self._rng)
        self._ctx = Context(state, recent, (token,), self._rng.bit_generator.state)  # one store
        self._shared = False
        return token

    def generate(self, prompt_ids=(), max_tokens: int = 256, *, stop_ids=None,
                 stop_strings=()) -> Generation:
        """Append `prompt_ids` and generate up to `max_tokens` tokens, streaming text pieces.

        Stops at a token in `stop_ids` (default: `<eos>`, plus `<end_of_turn>` in chat mode)
        or when a stop string appears; neither is printed, and the stopping token stays pending.
        """
        if max_tokens < 0:
            raise RgemmaError(f"--max-tokens must be >= 0, got {max_tokens}")
        if stop_ids is None:
            stop_ids = {self.tokenizer.eos_id} | ({END_OF_TURN} if self.mode == "chat" else set())
        # A pure continuation may start inside a character whose first bytes the previous call
        # held back: prime the decoder with the last tokens so it can complete it.
        tail = () if len(prompt_ids) else (self._ctx.recent + self._ctx.pending)[-4:]
        self.feed(prompt_ids)
        if max_tokens > 0 and not self._ctx.pending:
            raise RgemmaError("nothing to continue from: give a prompt")
        g = Generation()
        g._iter = self._run(g, max_tokens, frozenset(stop_ids), [s for s in stop_strings if s], tail)
        return g

    def interrupt(self, g: Generation) -> None:
        """Stop `g` after a Ctrl-C: forget the tokens sampled but not yet shown as text, so the
        context matches exactly what the user saw (also call it when the Ctrl-C landed outside
        the generator, e.g. while printing)."""
        if g.shown is not None and g.finish_reason in (None, "interrupted"):
            dropped = self._ctx.tokens_seen - g.shown.tokens_seen
            for ring, slot, rows in reversed(self._undo or ()):  # un-write steps since `shown`
                ring[slot] = rows
            self._ctx, self._undo = g.shown, []
            if dropped > 0:
                del g.tokens[-dropped:]
        g.finish_reason = "interrupted"

    def _run(self, g: Generation, max_tokens: int, stop_ids, stops, tail):
        detok = self.tokenizer.detokenizer()
        for token in tail:
            detok.add(token)
        text = ""  # generated text, including what is held back
        out = 0  # chars of `text` already yielded
        # The last context whose every sampled token has been yielded as text. A Ctrl-C goes
        # back to it (see `interrupt`), so the state never holds tokens nobody saw.
        g.shown, self._undo = self._ctx, []
        g.prompt_tokens = len(self._ctx.pending)
        t0 = time.perf_counter()
        try:
            while len(g.tokens) < max_tokens:
                token = self.step()
                g.tokens.append(token)
                now = time.perf_counter()
                if len(g.tokens) == 1:
                    g.prompt_seconds, t0 = now - t0, now
                else:
                    g.gen_seconds = now - t0
                if token in stop_ids:
                    g.finish_reason = "stop"
                    break
                text += detok.add(token)
                hit = _find_stop(text, out, stops)
                if hit is not None:
                    g.finish_reason = "stop"
                    text = text[:hit]
                    break
                safe = len(text) - _held_back(text, stops)
                if safe == len(text) and not detok.holding:
                    g.shown, self._undo = self._ctx, []
                if safe > out:
                    piece, out = text[out:safe], safe
                    g.text += piece
                    yield piece
            else:
                # an incomplete character stays unprinted; a continuation completes it (see tail)
                g.finish_reason = "length"
        except KeyboardInterrupt:
            self.interrupt(g)
            raise
        finally:
            self._undo = None
        if len(text) > out:
            g.text += text[out:]
            yield text[out:]


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


def _find_stop(text: str, start: int, stops) -> int | None:
    """The index of the earliest stop string in text[start:], or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops) -> int:
    """How many trailing chars could begin a stop string (kept until it is decided)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
