"""Continuous batching: many independent sequences decoded together, one token each per step.

Every decoded token of one sequence streams all the weights for one row of work; `Engine.step`
decodes every running sequence in one `Griffin.forward_batch` call, so each weight matrix is
read once per step for all of them (llama.cpp's server and vLLM batch the same way). Sequences
join and leave between steps; a joining sequence reads its prompt in chunks of at most
`prefill_chunk` tokens, one chunk per step, so the others keep decoding meanwhile.

Each sequence has its own state, position, sampler settings and random stream, and its tokens
and text are exactly those `Session.generate` produces for it alone (batch invariance: a row of
`forward_batch` is bit for bit the one-sequence forward; the prompt is read in the pieces
`forward` uses; sampling, stop ids, stop strings and text streaming follow `Session._run`).

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

import numpy as np

from .errors import RgemmaError
from .generation import HISTORY_KEEP, _find_stop, _held_back
from .model import CHUNK
from .sampling import SamplerSettings, sample
from .tokenizer import END_OF_TURN


@dataclass
class Request:
    """What one sequence should do: read `prompt_ids`, then sample up to `max_tokens` tokens.

    `stop_ids` defaults to `<eos>`, plus `<end_of_turn>` when `chat` (as `Session.generate`);
    a token in it or a stop string ends the sequence, and neither is part of the text. A
    missing seed is chosen at random when the request is submitted (see `Sequence.settings`).
    """

    prompt_ids: list[int]
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    max_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] | None = None
    chat: bool = False
    id: object = None  # the caller's label, carried through untouched


class Sequence:
    """One request in the engine; its fields fill in as it runs.

    tokens: the sampled ids (the stopping one included); text: all text streamed so far;
    finish_reason: None while running, then "stop", "length" or "cancelled".
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
        self.read = 0  # prompt tokens fed so far
        self.state = None  # allocated when the sequence joins the batch
        self.recent: tuple[int, ...] = ()
        self.pending: int | None = None  # the last sampled token, fed by the next step
        self.rng = np.random.Generator(np.random.PCG64(self.settings.seed))
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.started = self.finished = None  # perf_counter times of joining and finishing
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
        return len(self.tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _sample(self, logits: np.ndarray, fed) -> str:
        """Sample the next token after `fed` from one row of logits; returns the new text."""
        self.recent = (self.recent + tuple(fed))[-HISTORY_KEEP:]
        token = sample(logits, self.settings, self.recent, self.rng)
        self.tokens.append(token)
        self.pending = token
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
        """End the sequence; returns the text held back until now (as `Session._run` does)."""
        self.finish_reason = reason
        self.finished = time.perf_counter()
        piece, self._out = self._all[self._out:], len(self._all)
        self.text += piece
        self.state = None  # free the state now: the caller may keep the Sequence for long
        return piece


class Engine:
    """A model serving many sequences at once (see the module docstring). Not thread-safe:
    call `submit`, `step` and `cancel` from one thread (a server runs the loop in one worker).

    max_batch: sequences decoded together at most (each holds one model state, ~34 MB for the
    2B); prefill_chunk: prompt tokens read per step. The default, `model.CHUNK`, reads a prompt
    in the pieces `Griffin.forward` does, which keeps the tokens equal to `Session.generate`'s
    bit for bit; a smaller value bounds the step time a joining prompt adds (results then
    differ in rounding only).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, prefill_chunk: int = CHUNK):
        if max_batch < 1:
            raise RgemmaError(f"batch size must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise RgemmaError(f"prefill chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tokens_decoded = 0  # sampled tokens, all sequences

    @property
    def busy(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def submit(self, request: Request) -> Sequence:
        """Queue a request; it joins the batch at a step with room. Raises RgemmaError for a
        request that cannot run (empty prompt, token id out of range, max_tokens < 0)."""
        seq = Sequence(request, self.tokenizer, self.model.config.vocab_size)
        if request.max_tokens == 0:  # as `Session.generate`: nothing is run
            seq._finish("length")
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Make `seq` leave before the next step (finish_reason "cancelled")."""
        if not seq.done:
            seq._finish("cancelled")
        self.running = [s for s in self.running if s is not seq]
        self.waiting = deque(s for s in self.waiting if s is not seq)

    def step(self) -> list[tuple[Sequence, str]]:
        """Advance every running sequence by one token (one `forward_batch` call), then read
        one prompt chunk of the first sequence still reading its prompt.

        Returns (sequence, new text) for every sequence that sampled a token this step, in
        batch order; finished sequences leave the batch (their finish_reason is set, and the
        text returned with it is their last)."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.state, seq.started = self.model.initial_state(), time.perf_counter()
            self.running.append(seq)
        events = []
        decoding = [s for s in self.running if s.pending is not None]
        if decoding:
            logits, states = self.model.forward_batch([s.pending for s in decoding],
                                                      [s.state for s in decoding], donate=True)
            for s, row, state in zip(decoding, logits, states):
                s.state, fed = state, (s.pending,)
                events.append((s, s._sample(row, fed)))
            self.tokens_decoded += len(decoding)
        reading = next((s for s in self.running if s.pending is None), None)
        if reading is not None:
            lo = reading.read
            chunk = reading.prompt[lo:lo + self.prefill_chunk]
            last = lo + len(chunk) == len(reading.prompt)
            logits, reading.state = self.model.forward(chunk, reading.state, last_only=True,
                                                       donate=True)
            reading.read += len(chunk)
            if last:
                events.append((reading, reading._sample(logits[-1], reading.prompt)))
                self.tokens_decoded += 1
        self.running = [s for s in self.running if not s.done]
        return events


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
