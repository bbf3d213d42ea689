"""The conversation layer: template, transcript, streamed text, stop rules, Ctrl-C.

A `Session` is a conversation over one token stream. Decoding is `decode.Decoder`'s (feed,
sample, in-place rings); the session turns text into the ids of the chat template, streams the
reply as text, records it in its transcript and, after a Ctrl-C, goes back to exactly what was
shown. `cli generate`, the terminal chat and the server are print loops over `Session.send`:

    session = Session(model, tokenizer, SamplerSettings(temperature=0), mode="chat")
    for piece in session.send("Hello", max_tokens=20):
        print(piece, end="", flush=True)

In chat mode the stream the model has seen is always the transcript in the chat template:
`session.stream_ids()` equals `tokenizer.apply_chat_template(session.transcript, ...)`. A reply
is closed with `<end_of_turn>\\n` however it stopped (`<end_of_turn>`, `<start_of_turn>`,
`<eos>`, a stop string); a reply the model spelled differently from the canonical tokenization
of its text is re-read (prefilled) from the last point where both agree, as llama.cpp's server
does when it re-tokenizes a conversation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .decode import HISTORY_KEEP, Context, Decoder
from .errors import RgemmaError
from .sampling import SamplerSettings
from .tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

__all__ = ["HISTORY_KEEP", "Context", "Generation", "Session"]


@dataclass
class Generation:
    """One reply being generated: iterate for text pieces; the fields fill in as it runs.

    With `keep` (the default) `tokens` and `text` hold the whole reply; without it (a long
    `rgemma generate` printing as it goes) they stay empty and only `generated` counts, so
    memory and the time per token stay flat however long the run (docs/api.md)."""

    tokens: list[int] = field(default_factory=list)  # sampled ids, the stopping one included
    finish_reason: str | None = None  # "stop" | "length" | "interrupted"
    cancelled: bool = False  # Ctrl-C before any text: the message was withdrawn
    prompt_tokens: int = 0  # tokens fed by the first step (the prompt and the old pending token)
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0
    shown: Context | None = None  # the context as of the last text yielded
    keep: bool = True  # keep `tokens` and `text` (False: only count them)
    generated: int = 0  # tokens sampled, the stopping one included (kept or not)
    chars: int = 0  # characters yielded (kept or not)
    last_newline: bool = False  # the last character yielded is a newline (kept or not)
    _flush: object = lambda: None  # writes the pieces not yet in the transcript
    _pieces: list = field(default_factory=list)  # the text yielded, appended in O(1)
    _iter: object = None
    _done: bool = False

    def __iter__(self):
        return self._iter

    @property
    def text(self) -> str:
        """Everything yielded ("" when not `keep`)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _sampled(self, token: int) -> None:
        self.generated += 1
        if self.keep:
            self.tokens.append(token)

    def _shown(self, piece: str) -> None:
        self.chars += len(piece)
        if piece:
            self.last_newline = piece.endswith("\n")
        if self.keep:
            self._pieces.append(piece)

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens per second (the first step: prefill plus the first sample)."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tps(self) -> float:
        """Generated tokens per second after the first one."""
        n = self.generated - 1  # the first token's time is counted with the prompt
        return n / self.gen_seconds if n > 0 and self.gen_seconds else 0.0


@dataclass
class _Turn:
    """What a reply may need to go back to (see Session._settle)."""

    before: Context  # the stream before the prompt
    transcript_len: int  # the transcript before the prompt's messages
    prompt: tuple[int, ...]  # the ids the prompt appended
    record: bool  # the reply goes into transcript[-1] (a model message)
    after_prompt: Context | None = None  # the state right after the prompt was fed


class Session:
    """A conversation: a tokenizer, a mode ("chat": Gemma's template; "raw": plain text), a
    transcript [{"role": "system"|"user"|"model", "content": str}] and a `Decoder`.

    `special`: text may spell control tokens and generated control tokens are printed
    (llama.cpp's --special). `stop_ids`: the ids that end a reply (default: the model's eos
    ids, `model.card.eos_ids`, plus `<start_of_turn>`/`<end_of_turn>` in chat mode).
    """

    def __init__(self, model, tokenizer: Tokenizer, settings: SamplerSettings,
                 ctx: Context | None = None, *, mode: str = "raw", transcript=None,
                 special: bool = False):
        if mode not in ("chat", "raw"):
            raise RgemmaError(f"unknown mode {mode!r} (chat or raw)")
        self.decoder = Decoder(model, settings, ctx)
        self.tokenizer, self.mode, self.special = tokenizer, mode, special
        self.transcript = list(transcript or [])
        self._turn: _Turn | None = None

    # -- the stream -------------------------------------------------------------------------------

    model = property(lambda self: self.decoder.model,
                     lambda self, m: setattr(self.decoder, "model", m))
    settings = property(lambda self: self.decoder.settings,
                        lambda self, s: setattr(self.decoder, "settings", s))

    @property
    def ctx(self) -> Context:
        """The current context (a value; see `Decoder.ctx`)."""
        return self.decoder.ctx

    @ctx.setter
    def ctx(self, value: Context) -> None:
        self.decoder.ctx = value

    @property
    def fresh(self) -> bool:
        """Nothing has been fed or queued yet."""
        return self.decoder.tokens_seen == 0

    def stop_ids(self) -> frozenset[int]:
        """The ids that end a reply."""
        card = getattr(self.model, "card", None)
        ids = {self.tokenizer.eos_id, *(card.eos_ids if card else ())}
        return frozenset(ids | ({START_OF_TURN, END_OF_TURN} if self.mode == "chat" else set()))

    def _tail(self, n: int) -> tuple[int, ...]:
        c = self.decoder._ctx
        return (c.recent + c.pending)[-n:]

    @property
    def finished(self) -> bool:
        """Chat mode: the last turn is closed (`<end_of_turn>\\n`): there is nothing to continue."""
        return self.mode == "chat" and self._closed()

    def _closed(self) -> bool:
        """The stream ends with a closed chat turn (`<end_of_turn>\\n`), in either mode."""
        close = (END_OF_TURN, *self.tokenizer.newline)
        return not self.fresh and self._tail(len(close)) == close

    def stream_ids(self) -> list[int]:
        """The chat template of the transcript as the model has seen it (chat mode), which
        `recent + pending` equal while the stream is shorter than HISTORY_KEEP."""
        return self.tokenizer.apply_chat_template(self.transcript, special=self.special,
                                                  continue_final_message=not self.finished)

    # -- prompts ------------------------------------------------------------------------------------

    def prompt_ids(self, text: str, system: str | None = None, *, reply: bool = True) -> list[int]:
        """The ids that append `text`: a user turn in chat mode (closing an open reply first;
        `reply` opens the model's turn after it), plain text in raw mode (BOS only at the very
        start). A stop token left pending by an older file is replaced by the turn's end."""
        tok = self.tokenizer
        if self.mode == "raw":
            return tok.raw_prompt(text, bos=self.fresh, special=self.special)
        msgs = ([{"role": "system", "content": system}] if self.fresh and system and system.strip()
                else []) + [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=reply, special=self.special)
        if self.fresh:
            return ids
        return self._close() + ids[1:]

    def _close(self) -> list[int]:
        """The ids that close the last turn, if it is open."""
        if self.finished:
            return []
        if self._tail(1) == (END_OF_TURN,):
            return self.tokenizer.newline
        c = self.decoder._ctx
        if c.pending[-1:] and c.pending[-1] in self.stop_ids():  # <eos> never goes in front
            self.decoder._ctx = replace(c, pending=c.pending[:-1])
        return [END_OF_TURN] + self.tokenizer.newline

    def user_turn(self, text: str, system: str | None = None, *, reply: bool = True) -> list[int]:
        """Record a prompt in the transcript (with an empty reply to stream into, if `reply`)
        and return the ids that append it."""
        before, n = self.decoder.ctx, len(self.transcript)
        ids = self.prompt_ids(text, system, reply=reply)
        if self.fresh and system and system.strip():
            self.transcript.append({"role": "system", "content": system.strip()})
        self.transcript.append({"role": "user", "content": text.strip() if self.mode == "chat" else text})
        if reply:
            self.transcript.append({"role": "model", "content": ""})
        self._turn = _Turn(before, n, tuple(ids), reply)
        return ids

    def feed(self, ids) -> None:
        """Queue tokens; they are run by the next step (or stay pending in a saved file)."""
        self.decoder.feed(ids)

    def step(self) -> int:
        """Feed the pending tokens, sample the next one; it becomes the only pending token."""
        return self.decoder.step()

    # -- the conversation -----------------------------------------------------------------------------

    def send(self, text: str, max_tokens: int = 256, *, system: str | None = None,
             stop_strings=(), keep: bool = True) -> Generation:
        """Add a user message (chat) or text (raw) and generate the reply (`keep`: see
        `generate`)."""
        if max_tokens < 0:
            raise RgemmaError(f"--max-tokens must be >= 0, got {max_tokens}")
        return self.generate(self.user_turn(text, system), max_tokens, stop_strings=stop_strings,
                             keep=keep)

    def read(self, text: str, system: str | None = None) -> None:
        """Read `text` into the state now and generate nothing: in chat mode a closed user
        turn (a document, answered by a later `send` or `resume`), in raw mode plain text."""
        ids = self.user_turn(text, system, reply=False)
        self._turn = None
        self.decoder.feed(ids)
        self.decoder.prefill()

    def resume(self, max_tokens: int = 256, *, stop_strings=(), keep: bool = True) -> Generation:
        """Generate with no new message: continue a reply cut short, answer a user turn left
        unanswered (`read`), or continue raw text. A finished reply is an RgemmaError."""
        if max_tokens < 0:
            raise RgemmaError(f"--max-tokens must be >= 0, got {max_tokens}")
        if self.fresh:
            raise RgemmaError("nothing to continue from: give a prompt")
        if self.mode == "raw":
            if self._closed():  # a chat state resumed with --raw: the model would open a user turn
                raise RgemmaError("the last reply is finished (its chat turn is closed): nothing to "
                                  "continue; give a prompt")
            if self.transcript[-1:] and self.transcript[-1]["role"] == "model":
                n = len(self.transcript) - 1
            else:
                n = len(self.transcript)
                self.transcript.append({"role": "model", "content": ""})
            self._turn = _Turn(self.decoder.ctx, n, (), True)
            return self.generate((), max_tokens, stop_strings=stop_strings, keep=keep)
        last = self.transcript[-1]["role"] if self.transcript else None
        if self.finished and last == "model":
            raise RgemmaError("the last reply is finished: nothing to continue; give a prompt")
        if self.finished or last != "model":  # a user turn waits for its answer
            before, n = self.decoder.ctx, len(self.transcript)
            ids = self._close() + self.tokenizer.generation_prompt()
            self.transcript.append({"role": "model", "content": ""})
            self._turn = _Turn(before, n, tuple(ids), True)
            return self.generate(ids, max_tokens, stop_strings=stop_strings, keep=keep)
        self._turn = _Turn(self.decoder.ctx, len(self.transcript) - 1, (), True)
        return self.generate((), max_tokens, stop_strings=stop_strings, keep=keep)

    def restore(self, ctx: Context, transcript_len: int) -> None:
        """Go back to an earlier point of the conversation (/undo, /regen), keeping the random
        stream where it is (so a regenerated answer is a new one)."""
        self.decoder.ctx = replace(ctx, rng=self.decoder._ctx.rng)
        del self.transcript[transcript_len:]
        self._turn = None

    # -- generating -----------------------------------------------------------------------------------

    def generate(self, prompt_ids=(), max_tokens: int = 256, *, stop_ids=None,
                 stop_strings=(), keep: bool = True) -> Generation:
        """Append `prompt_ids` and generate up to `max_tokens` tokens, streaming text pieces.

        Stops at a token in `stop_ids` (default: `stop_ids()`) or when a stop string appears;
        neither is printed. The text goes into the transcript's last message when the prompt
        came from `user_turn` / `resume` (`send` does both).

        keep=False: nothing grows with the reply's length (a long `rgemma generate`): the
        Generation keeps no ids or text (`generated` counts them) and in raw mode the reply is
        not recorded in the transcript. A chat reply is always kept: the chat template needs it.
        """
        if max_tokens < 0:
            raise RgemmaError(f"--max-tokens must be >= 0, got {max_tokens}")
        stop_ids = self.stop_ids() if stop_ids is None else frozenset(stop_ids)
        turn, self._turn = self._turn, None
        if turn is None or turn.prompt != tuple(prompt_ids):
            turn = _Turn(self.decoder.ctx, len(self.transcript), tuple(prompt_ids), False)
        # A pure continuation may start inside a character whose first bytes the previous call
        # held back: prime the decoder with the last tokens so it can complete it.
        tail = () if len(prompt_ids) else self._tail(4)
        self.decoder.feed(prompt_ids)
        if max_tokens > 0 and not self.decoder.pending:
            raise RgemmaError("nothing to continue from: give a prompt")
        g = Generation(keep=keep or (self.mode == "chat" and turn.record))
        g._iter = self._run(g, turn, max_tokens, stop_ids, [s for s in stop_strings if s], tail)
        return g

    def interrupt(self, g: Generation) -> None:
        """Stop `g` after a Ctrl-C: forget the tokens sampled but not yet shown as text, so the
        stream matches exactly what the user saw; with no text shown at all, the message is
        withdrawn (also call it when the Ctrl-C landed outside the generator, e.g. while
        printing)."""
        if g._done:
            return
        g._flush()
        if g.shown is not None:
            dropped = self.decoder.tokens_seen - g.shown.tokens_seen
            self.decoder.rollback(g.shown)
            if dropped > 0:
                g.generated -= dropped
                del g.tokens[len(g.tokens) - min(dropped, len(g.tokens)):]
        g.finish_reason = "interrupted"
        turn = getattr(g, "_turn", None)
        if turn is not None and turn.record and not g.chars:
            self.decoder.ctx = replace(turn.before, rng=self.decoder._ctx.rng)
            del self.transcript[turn.transcript_len:]
            g.cancelled = True
        elif turn is not None:
            self._settle(g, turn)
        g._done = True
        self.decoder.release()

    def _run(self, g: Generation, turn: _Turn, max_tokens: int, stop_ids, stops, tail):
        g._turn = turn
        detok = self.tokenizer.detokenizer(special=self.special)
        for token in tail:
            detok.add(token)
        text = ""  # generated text not yet yielded plus what is held back (trimmed as yielded)
        out = 0  # chars of `text` already yielded
        # The last context whose every sampled token has been yielded as text. A Ctrl-C goes
        # back to it (see `interrupt`), so the state never holds tokens nobody saw.
        g.shown = self.decoder.mark()
        g.prompt_tokens = len(self.decoder.pending)
        t0 = time.perf_counter()
        msg = self.transcript[-1] if turn.record and self.transcript and g.keep else None
        reply = []  # pieces for msg["content"], joined once (`+=` per piece copies it: O(n^2))

        def flush():
            if msg is not None and reply:
                msg["content"] += "".join(reply)
                reply.clear()
        g._flush = flush
        try:
            while g.generated < max_tokens:
                token = self.decoder.step()
                g._sampled(token)
                now = time.perf_counter()
                if g.generated == 1:
                    g.prompt_seconds, t0 = now - t0, now
                    if turn.record and self.mode == "chat":
                        turn.after_prompt = self.decoder.ctx  # (the next step copies the rings)
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
                    g.shown = self.decoder.commit()
                if safe > out:
                    piece, text, out = text[out:safe], text[safe:], 0  # keep only the unshown
                    g._shown(piece)
                    if msg is not None:
                        reply.append(piece)
                    yield piece
            else:
                # an incomplete character stays unprinted; a continuation completes it (see tail)
                g.finish_reason = "length"
        except KeyboardInterrupt:
            self.interrupt(g)
            raise
        finally:  # also when the caller stops iterating (GeneratorExit)
            flush()
        if len(text) > out:
            g._shown(text[out:])
            if msg is not None:
                reply.append(text[out:])
            flush()
        self._settle(g, turn)
        g._done = True
        self.decoder.release()
        if len(text) > out:
            yield text[out:]

    def _settle(self, g: Generation, turn: _Turn) -> None:
        """Chat mode, after a reply: make the stream equal the transcript in the template.

        The reply is closed with `<end_of_turn>\\n` if it stopped (whatever stopped it). Where
        the sampled ids differ from the template's tokenization of the text (a stop string cut
        inside a token, bytes held back at a Ctrl-C, a word spelled in other pieces, a reply
        starting with a newline that merges with the template's), the stream goes back to the
        last state that agrees and the rest is queued (pending), to be read by the next step.
        """
        if self.mode != "chat" or not turn.record or g.cancelled:
            return
        closed = g.finish_reason == "stop"
        want = self.tokenizer.apply_chat_template(self.transcript, special=self.special,
                                                  continue_final_message=not closed)
        before, cur = turn.before, self.decoder._ctx
        m0 = before.state.pos
        if len(want) < before.tokens_seen:  # the transcript does not describe this stream
            return
        have = list(before.pending) + list(turn.prompt) + g.tokens
        want_tail = want[m0:]
        if have == want_tail:
            return
        for base in (cur, turn.after_prompt, before):
            if base is None:
                continue
            k = base.state.pos - m0  # tokens of `have` that `base` has fed
            # (something must stay pending: the next step needs a token to feed)
            if 0 <= k < len(want_tail) and k <= len(have) and have[:k] == want_tail[:k]:
                self.decoder.ctx = Context(base.state, base.recent, tuple(want_tail[k:]), cur.rng)
                return


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
