"""Continuous batching: many independent sequences decoded together, one token each per step.

Every decoded token of one sequence streams all the weights for one row of work; `Engine.step`
decodes every running sequence in one `Griffin.forward_batch` call, so each weight matrix is
read once per step for all of them (llama.cpp's server and vLLM batch the same way). Sequences
join and leave between steps; a joining sequence reads its prompt in chunks of at most
`prefill_chunk` tokens, and the sequences reading prompts take turns (first come, first served)
at about `prefill_chunk` prompt tokens a step in all, so the others keep decoding meanwhile.
This one engine runs `rgemma batch` (a file of requests) and `rgemma serve` (`Scheduler`, which
drives it from a thread and adds a bounded queue and callbacks).

Each sequence has its own state, position, sampler settings and random stream, and its tokens
and text are exactly those `Session.generate` produces for it alone (batch invariance: a row of
`forward_batch` is bit for bit the one-sequence forward; a prompt is always cut at the same
places, whatever else runs; sampling, stop ids, stop strings and text streaming follow
`Session._run`). With a `StateCache`, a sequence starts from the longest cached prefix of its
prompt and reads only the rest (`Sequence.cached_tokens`); when it finishes, its state is
cached under the ids it has read.

    engine = Engine(model, tokenizer, max_batch=16)
    seqs = [engine.submit(Request(tokenizer.raw_prompt(p), SamplerSettings(seed=1), 64))
            for p in prompts]
    while engine.busy:
        for seq, piece in engine.step():
            ...  # piece: new text of seq; seq.finish_reason is set once it is done
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .decode import non_finite_error
from .errors import RgemmaError
from .generation import HISTORY_KEEP, _find_stop, _held_back
from .model import CHUNK
from .sampling import SamplerSettings, sample
from .tokenizer import END_OF_TURN


@dataclass(frozen=True)
class Request:
    """What one sequence should do: read `prompt_ids`, then sample up to `max_tokens` tokens.

    `stop_ids` defaults to `<eos>`, plus `<end_of_turn>` when `chat` (as `Session.generate`);
    a token in it or a stop string ends the sequence, and neither is part of the text. A
    missing seed is chosen at random when the request is submitted (see `Sequence.settings`).
    `render_reply` (text -> ids) is how a client will send the prompt plus this reply back
    (the chat template re-tokenizes the reply's text): a state cache files the finished state
    under those ids too. max_tokens 0 only reads the prompt (into the state cache, if any).
    """

    prompt_ids: tuple[int, ...] | list[int]
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    max_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] | None = None
    chat: bool = False
    id: object = None  # the caller's label, carried through untouched
    render_reply: Callable[[str], list[int]] | None = None


class Sequence:
    """One request in the engine; its fields fill in as it runs.

    tokens: the sampled ids (the stopping one included); text: all text streamed so far;
    finish_reason: None while running, then "stop", "length", "cancelled" or "error" (with
    `error`, one line); cached_tokens: prompt tokens taken from the state cache; fed: every id
    the state has read. Raises RgemmaError for a request that cannot run (empty prompt, token
    id out of range, max_tokens < 0).
    """

    def __init__(self, request: Request, tokenizer, vocab_size: int):
        if request.max_tokens < 0:
            raise RgemmaError(f"max_tokens must be >= 0, got {request.max_tokens}")
        ids = [int(i) for i in request.prompt_ids]
        if not ids:
            raise RgemmaError("empty prompt: nothing to continue from")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise RgemmaError(f"prompt token id out of range for a vocabulary of {vocab_size}")
        self.request = request
        self.settings = request.settings.with_seed()
        self.stop_ids = frozenset(request.stop_ids if request.stop_ids is not None else
                                  {tokenizer.eos_id} | ({END_OF_TURN} if request.chat else set()))
        self.stops = [s for s in request.stop_strings if s]
        self.prompt = ids
        self.todo: list[int] = []  # ids to read before the next sample (set when it joins)
        self.fed: list[int] = []  # every id the state has read
        self.cached_tokens = 0
        self.state = None  # allocated when the sequence joins the batch
        self.recent: tuple[int, ...] = ()
        self.rng = np.random.Generator(np.random.PCG64(self.settings.seed))
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.started = self.first_token_at = self.finished = None  # perf_counter times
        self._cancel = False
        self._at_prompt = None  # (state, recent) once the prompt is read, kept for the cache
        # when a stop string may cut the reply (see `Engine._cache`)
        self._detok = tokenizer.detokenizer()
        self._all = ""  # generated text, including what is held back
        self._out = 0  # chars of _all already streamed

    @property
    def id(self):
        return self.request.id

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        """Sampled tokens, the stopping one included (as `rgemma generate` counts them)."""
        return len(self.tokens)

    @property
    def reply_tokens(self) -> int:
        """Sampled tokens less a stop id that ended the reply (the ids of the reply's text)."""
        n = len(self.tokens)
        return n - 1 if n and self.tokens[-1] in self.stop_ids else n

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Leave the engine at its next step (finish_reason "cancelled"); safe from any
        thread, a no-op once finished."""
        self._cancel = True

    def _read(self, chunk) -> None:
        """Account for `chunk`, the next ids of `todo`, having been fed to the state."""
        self.fed += chunk
        self.recent = (self.recent + tuple(chunk))[-HISTORY_KEEP:]
        del self.todo[:len(chunk)]

    def _sample(self, logits: np.ndarray) -> str:
        """Sample the next token from the logits after the last id read; returns new text."""
        token = sample(logits, self.settings, self.recent, self.rng)
        self.tokens.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.todo = [token]
        if token in self.stop_ids:
            return self._finish("stop")
        self._all += self._detok.add(token)
        hit = _find_stop(self._all, self._out, self.stops)
        if hit is not None:
            self._all = self._all[:hit]
            return self._finish("stop")
        if len(self.tokens) >= self.request.max_tokens:
            return self._finish("length")
        safe = len(self._all) - _held_back(self._all, self.stops)
        if safe <= self._out:
            return ""
        piece, self._out = self._all[self._out:safe], safe
        self.text += piece
        return piece

    def _finish(self, reason: str) -> str:
        """End the sequence; returns the text held back until now (as `Session._run` does),
        or nothing for a sequence cancelled or failed."""
        self.finish_reason = reason
        self.finished = time.perf_counter()
        if reason in ("cancelled", "error"):
            return ""
        piece, self._out = self._all[self._out:], len(self._all)
        self.text += piece
        return piece


class Engine:
    """A model serving many sequences at once (see the module docstring). Not thread-safe:
    call `submit`, `step` and `cancel` from one thread (`Scheduler` runs it in one worker;
    `Sequence.cancel` is the one call safe from elsewhere).

    max_batch: sequences decoded together at most (each holds one model state, ~34 MB for the
    2B); prefill_chunk: prompt tokens read per step. The default, `model.CHUNK`, reads a prompt
    in the pieces `Griffin.forward` does, which keeps the tokens equal to `Session.generate`'s
    bit for bit; a smaller value bounds the step time a joining prompt adds (results may then
    differ in rounding only). cache: a `StateCache` or None.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, prefill_chunk: int = CHUNK,
                 cache=None):
        if max_batch < 1:
            raise RgemmaError(f"batch size must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise RgemmaError(f"prefill chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0  # steps run so far
        self.tokens_decoded = 0  # sampled tokens, all sequences

    @property
    def busy(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def sequence(self, request: Request) -> Sequence:
        """A new `Sequence` for `request` (raises RgemmaError if it cannot run), not yet added."""
        return Sequence(request, self.tokenizer, self.model.config.vocab_size)

    def submit(self, request: Request) -> Sequence:
        """Queue a request; it joins the batch at a step with room. Raises RgemmaError for a
        request that cannot run (empty prompt, token id out of range, max_tokens < 0)."""
        return self.add(self.sequence(request))

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence made by `sequence`. With max_tokens 0 and no cache to read the
        prompt into, it finishes at once ("length"), as `Session.generate` runs nothing."""
        if seq.request.max_tokens == 0 and self.cache is None:
            seq._finish("length")
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Make `seq` leave now (finish_reason "cancelled")."""
        if not seq.done:
            seq._finish("cancelled")
        seq.state = None
        self.running = [s for s in self.running if s is not seq]
        self.waiting = deque(s for s in self.waiting if s is not seq)

    def step(self) -> list[tuple[Sequence, str]]:
        """Admit waiting sequences while there is room, drop cancelled ones, then advance every
        running sequence once: one token for those decoding (all in one `forward_batch`
        call), a prompt chunk for those reading their prompts while this step's
        `prefill_chunk` budget lasts.

        Returns (sequence, new text) for every sequence that sampled a token or finished this
        step, in batch order; finished sequences leave the batch (their finish_reason is set,
        and the text returned with it is their last)."""
        events = []
        for seq in [s for s in list(self.waiting) + self.running if s._cancel]:
            self.cancel(seq)
            events.append((seq, ""))
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            self._admit(seq)
            self.running.append(seq)
        batch, chunks, budget = [], [], self.prefill_chunk
        for seq in self.running:
            if seq.tokens:  # decoding: its one pending token
                n = 1
            elif budget > 0:  # reading its prompt, in chunks that never depend on other sequences
                n = min(len(seq.todo), self.prefill_chunk)
                budget -= n
            else:  # this step's prompt budget is spent: wait for the next step
                continue
            batch.append(seq)
            chunks.append(seq.todo[:n])
        if batch:
            try:
                results = self._forward(batch, chunks)
            except Exception as e:  # a bug must not take every sequence down: fail these only
                results = [e] * len(batch)
            for seq, chunk, result in zip(batch, chunks, results):
                try:
                    if isinstance(result, Exception):
                        raise result
                    logits, seq.state = result
                    seq._read(chunk)
                    if logits is None:
                        continue
                    if seq.request.max_tokens == 0:  # only read the prompt (into the cache)
                        events.append((seq, seq._finish("length")))
                    else:
                        if not np.isfinite(logits).all():  # as `decode.step`: stop, say why
                            raise non_finite_error(self.model, seq.state.pos - 1)
                        if not seq.tokens and seq.stops and self.cache is not None:
                            seq._at_prompt = (seq.state.copy(), seq.recent)
                        events.append((seq, seq._sample(logits)))
                        self.tokens_decoded += 1
                except Exception as e:
                    seq.error = str(e) if isinstance(e, RgemmaError) else \
                        f"internal error: {type(e).__name__}: {e}"
                    events.append((seq, seq._finish("error")))
        self.steps += 1
        for seq in self.running:
            if seq.done:
                self._retire(seq)
        self.running = [s for s in self.running if not s.done]
        return events

    def _admit(self, seq: Sequence) -> None:
        hit = self.cache.lookup(seq.prompt) if self.cache is not None else None
        if hit is not None:
            seq.state, seq.recent, seq.cached_tokens = hit.state, hit.recent, hit.length
            seq.fed = seq.prompt[:hit.length]
        else:
            seq.state = self.model.initial_state()
        seq.todo = seq.prompt[seq.cached_tokens:]
        seq.started = time.perf_counter()

    def _forward(self, batch, chunks):
        """(last-position logits or None, new state) per sequence, after reading its chunk.

        Every sequence that reads one token (decoding, or the last token of its prompt) goes
        into one `Griffin.forward_batch` call, which reads each weight matrix once for all of
        them and computes each row bit for bit as the one-sequence forward would (so a
        sequence's text never depends on who else runs); prompt chunks run one `forward` each.
        A sequence's state is its own (cache hits are copies), so both write its rings in
        place (`donate`)."""
        out = [None] * len(batch)
        single = [i for i, (seq, chunk) in enumerate(zip(batch, chunks))
                  if len(chunk) == 1 == len(seq.todo)]
        if single:
            logits, states = self.model.forward_batch([chunks[i][0] for i in single],
                                                      [batch[i].state for i in single], donate=True)
            for row, i in enumerate(single):
                out[i] = (logits[row], states[row])
        for i, (seq, chunk) in enumerate(zip(batch, chunks)):
            if out[i] is None:
                last = len(chunk) == len(seq.todo)  # only the chunk that ends the prompt samples
                logits, state = self.model.forward(chunk, seq.state, last_only=True, donate=True)
                out[i] = (logits[-1] if last else None, state)
        return out

    def _retire(self, seq: Sequence) -> None:
        """A finished sequence leaves: its state goes to the cache (if any) and is freed."""
        if self.cache is not None and seq.finish_reason in ("stop", "length") and seq.state is not None:
            if seq.finish_reason == "length" and seq.tokens and seq.todo:
                # the reply's last token is sampled but not read, and the client will send it
                # back: read it now (the caller already has its answer), before any later
                # request is admitted and looks the conversation up
                try:
                    _, seq.state = self.model.forward(seq.todo, seq.state, last_only=True,
                                                      donate=True)
                    seq._read(list(seq.todo))
                except Exception:
                    pass  # only a cache entry is lost
            self._cache(seq)
        seq.state = seq._at_prompt = None  # free the states now: the caller may keep the Sequence

    def _cache(self, seq: Sequence) -> None:
        """Keep the state under the ids read and, for a reply read to its end, also under the
        ids the client will render for it (`Request.render_reply`). A reply cut by a stop
        string ends inside what the state has read (the client sends back only the text before
        the stop string), so for it the state at the end of the prompt is kept instead: the
        next turn then reads the short reply and its own message, not the whole conversation."""
        if not seq.fed:
            return
        if seq.tokens and seq.finish_reason == "stop" and seq.tokens[-1] not in seq.stop_ids:
            if seq._at_prompt is not None:
                state, recent = seq._at_prompt
                self.cache.put(seq.prompt, state, recent)
            return
        aliases = []
        n = len(seq.prompt)
        reply = seq.fed[n:]
        ended = seq.tokens and (seq.tokens[-1] in seq.stop_ids or
                                len(seq.fed) == n + len(seq.tokens))  # at a stop id, or all read
        render = seq.request.render_reply
        if render is not None and ended and seq.text == seq._all:  # (not cut by a stop string)
            try:
                alias = list(render(seq.text))
            except RgemmaError:  # a conversation the template cannot continue: no alias
                alias = seq.fed
            if alias != seq.fed and self.tokenizer.decode(reply).strip() == seq.text.strip():
                aliases.append(alias)
        self.cache.put(seq.fed, seq.state, seq.recent, aliases)


# -- requests from JSON (`rgemma batch`, one object per line) ----------------------------------

REQUEST_FIELDS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_k", "top_p",
                  "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop", "raw", "system"}
_SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                   "seed")


def request_from_json(obj, tokenizer, *, settings: dict, max_tokens: int, stop=(),
                      chat: bool = True, system: str | None = None) -> Request:
    """A `Request` from one decoded JSON object of `rgemma batch`'s input.

    obj: {"prompt": str} or {"messages": [...]} (see `Tokenizer.chat_messages`), optionally
    "id", "max_tokens", the sampler fields of `SamplerSettings`, "stop" (str or list), "raw"
    (bool: no chat template for "prompt") and "system". Fields absent take the defaults given
    (`settings`: SamplerSettings keywords; the others as named), so a request is the same as
    `rgemma generate` with those flags. Raises RgemmaError naming the bad field.
    """
    if not isinstance(obj, dict):
        raise RgemmaError("a request must be a JSON object")
    unknown = sorted(set(obj) - REQUEST_FIELDS)
    if unknown:
        raise RgemmaError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected some of "
                          + ", ".join(sorted(REQUEST_FIELDS)))

    def typed(name, kinds, what):
        v = obj.get(name)
        if v is not None and (isinstance(v, bool) != (bool in kinds) or not isinstance(v, kinds)):
            raise RgemmaError(f'"{name}" must be {what}, got {json_type(v)}')
        return v

    knobs = dict(settings)
    for name in _SAMPLER_FIELDS:
        kinds = (int,) if name in ("top_k", "repeat_last_n", "seed") else (int, float)
        v = typed(name, kinds, "an integer" if kinds == (int,) else "a number")
        if v is not None:
            knobs[name] = v
    try:
        sampler = SamplerSettings(**knobs)
    except RgemmaError as e:  # the message names the CLI flag: name the field instead
        msg = str(e)
        for name in _SAMPLER_FIELDS:
            msg = msg.replace("--" + name.replace("_", "-"), f'"{name}"')
        raise RgemmaError(msg) from None
    n = typed("max_tokens", (int,), "an integer")
    n = max_tokens if n is None else n
    if n < 0:
        raise RgemmaError(f'"max_tokens" must be >= 0, got {n}')
    stops = obj.get("stop", None)
    if stops is None:
        stops = tuple(stop)
    elif isinstance(stops, str):
        stops = (stops,)
    elif isinstance(stops, list) and all(isinstance(s, str) for s in stops):
        stops = tuple(stops)
    else:
        raise RgemmaError('"stop" must be a string or a list of strings')
    raw = typed("raw", (bool,), "true or false")
    system = typed("system", (str,), "a string") or system
    use_chat = chat if raw is None else not raw
    if ("prompt" in obj) == ("messages" in obj):
        raise RgemmaError('a request needs exactly one of "prompt" and "messages"')
    if "messages" in obj:
        if raw:
            raise RgemmaError('"messages" are always wrapped in the chat template; "raw" must '
                              'not be true')
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise RgemmaError('"messages" must be a non-empty list of {"role", "content"} objects')
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "model")
                    or not isinstance(m.get("content"), str)):
                raise RgemmaError(f'"messages"[{i}] must be {{"role": "system" | "user" | '
                                  f'"assistant", "content": a string}}')
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        ids, use_chat = tokenizer.chat_messages(messages), True
    else:
        text = typed("prompt", (str,), "a string")
        if not text.strip():
            raise RgemmaError('empty "prompt"')
        ids = (tokenizer.chat_prompt(text, system=system) if use_chat
               else tokenizer.raw_prompt(text))
    return Request(ids, sampler, n, stops, chat=use_chat, id=obj.get("id"))


def json_type(v) -> str:
    """JSON's name for the type of a decoded value."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
