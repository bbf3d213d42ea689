"""Continuous batching: many requests advanced together, one step at a time, on one thread.

A request (`Job`) joins the running batch at the next step once there is room (`max_batch`);
until then it waits in a bounded queue (`submit` raises `QueueFull` past `max_queue`: the server
answers 429). Each step advances every running job by one unit of work: a chunk of at most
`prefill_chunk` prompt tokens, or one decoded token, so a long prompt arriving never stalls the
streams already running for more than about a chunk: jobs reading their prompts take turns,
first come first served, at most ~`prefill_chunk` prompt tokens a step in all. A job's prompt
is always cut at the same places, whatever else runs, so its arithmetic is too. A job leaves the batch at the step it finishes
or at the first step after `cancel()` (a client that went away).

What a job produces depends only on its own prompt, settings and seed: every job has its own
state, repeat-penalty history and random generator, seeded as `Session` seeds it, so a seeded
request gives the text `rgemma generate --seed` gives for the same prompt.

With a `StateCache`, a job starts from the longest cached prefix of its prompt and feeds only
the rest (`Job.cached_tokens`); when it finishes, its state is cached under the ids it fed.

    sched = Scheduler(model, tokenizer, max_batch=8, cache=cache)
    sched.start()
    job = sched.submit(Request(ids, SamplerSettings(seed=1), max_tokens=64), on_event=print)
    ...
    sched.stop()
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import RgemmaError
from .generation import HISTORY_KEEP, _find_stop, _held_back
from .sampling import SamplerSettings, sample

PREFILL_CHUNK = 128  # prompt tokens read per step (all joining jobs together) while others decode


@functools.cache
def _forward_params(model_type) -> frozenset:
    """The keyword arguments the model's forward takes (stand-in models in tests take fewer)."""
    return frozenset(inspect.signature(model_type.forward).parameters)


class QueueFull(RgemmaError):
    """The batch and its waiting queue are full; try again later."""


class ShuttingDown(RgemmaError):
    """The scheduler no longer accepts requests."""


@dataclass(frozen=True)
class Request:
    """What to generate: prompt ids, sampler settings (a concrete seed), limits and stops."""

    prompt_ids: tuple[int, ...]
    settings: SamplerSettings
    max_tokens: int
    stop_ids: frozenset = frozenset()  # ids that end the reply (not shown)
    stop_strings: tuple[str, ...] = ()  # texts that end the reply (not shown)
    # text -> the ids a client will send back for the prompt plus this reply (the chat
    # template re-tokenizes the reply's text): the finished state is cached under them too
    render_reply: object = None


@dataclass(eq=False)
class Job:
    """A request in the scheduler. Events go to `on_event` (from the scheduler thread):
    ("text", piece), then ("done", finish_reason) or ("error", message)."""

    request: Request
    on_event: object
    cached_tokens: int = 0  # prompt tokens taken from the state cache
    tokens: list = field(default_factory=list)  # sampled ids, the stopping one included
    text: str = ""  # all text sent
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    submitted: float = 0.0
    first_token_at: float | None = None  # perf_counter() when the first token was sampled
    # -- the scheduler's own --
    _cancel: bool = False
    _state: object = None
    _recent: tuple = ()
    _todo: list = field(default_factory=list)  # ids to feed before the next sample
    _fed: list = field(default_factory=list)  # every id the state has read
    _rng: object = None
    _detok: object = None
    _buf: str = ""  # generated text, including what is held back
    _out: int = 0  # chars of _buf already sent

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Sampled tokens, less a stop id that ended the reply."""
        n = len(self.tokens)
        return n - 1 if n and self.tokens[-1] in self.request.stop_ids else n

    def cancel(self) -> None:
        """Leave the batch at the next step (thread-safe)."""
        self._cancel = True


class Scheduler:
    """Runs jobs on a background thread; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 cache=None, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1:
            raise RgemmaError(f"--max-batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.steps = 0  # steps run so far
        self.generated = 0  # tokens sampled so far, all jobs
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = None

    # -- the outside: submit, cancel, start, stop -----------------------------------------------

    def submit(self, request: Request, on_event) -> Job:
        """Queue a request; raises QueueFull or ShuttingDown. Tokens must be in the vocabulary."""
        V = self.model.config.vocab_size
        if not request.prompt_ids:
            raise RgemmaError("the prompt is empty")
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= V:
            raise RgemmaError(f"token id out of range for a vocabulary of {V}")
        job = Job(request, on_event, submitted=time.perf_counter())
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {len(self.waiting)} "
                                f"waiting; try again shortly")
            self.waiting.append(job)
            self._cond.notify()
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rgemma-scheduler", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Accept no new requests; running and queued ones go on."""
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is left and end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            for job in list(self.waiting) + self.running:
                job.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self.running)

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    for job in list(self.waiting) + self.running:
                        self._finish(job, "cancelled")
                    self.waiting.clear()
                    self.running.clear()
                    return
            self.step()

    def step(self) -> None:
        """One step: admit waiting jobs, drop cancelled ones, advance every running job once."""
        with self._cond:
            for job in [j for j in self.running if j._cancel]:
                self._finish(job, "cancelled")
            self.running = [j for j in self.running if j.finish_reason is None]
            while self.waiting and len(self.running) < self.max_batch:
                job = self.waiting.popleft()
                if job._cancel:
                    self._finish(job, "cancelled")
                    continue
                self.running.append(job)
                self._admit(job)
        batch, chunks, budget = [], [], self.prefill_chunk
        for job in self.running:
            if job.finish_reason is not None:
                continue
            if job.tokens:  # decoding: its one pending token
                n = 1
            elif budget > 0:  # reading its prompt, in chunks that never depend on other jobs
                n = min(len(job._todo), self.prefill_chunk)
                budget -= n
            else:  # this step's prompt budget is spent: wait for the next step
                n = 0
            if n:
                batch.append(job)
                chunks.append(job._todo[:n])
        if batch:
            try:
                results = self._forward(batch, chunks)
            except Exception as e:  # a bug must not kill the server: fail these jobs only
                for job in batch:
                    self._fail(job, e)
                results = []
            for job, chunk, (logits, state) in zip(batch, chunks, results):
                try:
                    self._advance(job, chunk, logits, state)
                except Exception as e:
                    self._fail(job, e)
        self.steps += 1
        with self._cond:
            self.running = [j for j in self.running if j.finish_reason is None]

    def _forward(self, batch, chunks):
        """(last-position logits or None, new state) per job, after feeding its chunk.

        Every job that feeds one token (decoding, or the last token of its prompt) goes into
        one `Griffin.forward_batch` call, which reads each weight matrix once for all of them
        and computes each row bit for bit as the one-sequence forward would (so a job's text
        never depends on who else runs); prompt chunks run one `forward` each. A job's state
        is its own (cache hits are copies), so both write its rings in place (`donate`)."""
        out = [None] * len(batch)
        single = [i for i, (job, chunk) in enumerate(zip(batch, chunks))
                  if len(chunk) == 1 == len(job._todo)]
        forward_batch = getattr(self.model, "forward_batch", None)
        if forward_batch is not None and single:
            logits, states = forward_batch([chunks[i][0] for i in single],
                                           [batch[i]._state for i in single], donate=True)
            for row, i in enumerate(single):
                out[i] = (logits[row], states[row])
        for i, (job, chunk) in enumerate(zip(batch, chunks)):
            if out[i] is None:
                last = len(chunk) == len(job._todo)  # only the chunk that ends the todo samples
                logits, state = self.model.forward(chunk, job._state, last_only=True,
                                                   **self._forward_kw(last))
                out[i] = (logits[-1] if last else None, state)
        return out

    def _forward_kw(self, want_logits: bool) -> dict:
        """`forward`'s in-place and logits-skipping options, where the model has them."""
        params = _forward_params(type(self.model))
        kw = {"donate": True} if "donate" in params else {}
        if "want_logits" in params:
            kw["want_logits"] = want_logits  # the head is the largest matrix: skip it mid-prompt
        return kw

    def _admit(self, job: Job) -> None:
        ids = list(job.request.prompt_ids)
        hit = self.cache.lookup(ids) if self.cache is not None else None
        if hit is not None:
            job._state, job._recent, job.cached_tokens = hit.state, hit.recent, hit.length
            job._fed = ids[:hit.length]
        else:
            job._state, job._recent = self.model.initial_state(), ()
        job._todo = ids[job.cached_tokens:]
        job._rng = np.random.Generator(np.random.PCG64(job.request.settings.with_seed().seed))
        job._detok = self.tokenizer.detokenizer()

    def _advance(self, job: Job, chunk, logits, state) -> None:
        job._state = state
        job._fed += chunk
        job._recent = (job._recent + tuple(chunk))[-HISTORY_KEEP:]
        del job._todo[:len(chunk)]
        if logits is None:
            return
        r = job.request
        if r.max_tokens == 0:  # only read the prompt (into the cache)
            return self._finish(job, "length")
        token = sample(logits, r.settings, job._recent, job._rng)
        job.tokens.append(token)
        self.generated += 1
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if token in r.stop_ids:
            return self._finish(job, "stop")
        job._buf += job._detok.add(token)
        hit = _find_stop(job._buf, job._out, r.stop_strings)
        if hit is not None:
            job._buf = job._buf[:hit]
            return self._finish(job, "stop")
        safe = len(job._buf) - _held_back(job._buf, r.stop_strings)
        if safe > job._out:
            self._send(job, job._buf[job._out:safe])
        job._todo = [token]
        if len(job.tokens) >= r.max_tokens:
            self._finish(job, "length")

    def _send(self, job: Job, piece: str) -> None:
        job._out += len(piece)
        job.text += piece
        job.on_event(("text", piece))

    def _finish(self, job: Job, reason: str) -> None:
        if job.finish_reason is not None:
            return
        if reason != "cancelled" and len(job._buf) > job._out:
            self._send(job, job._buf[job._out:])  # held back for a stop string that never came
        job.finish_reason = reason
        job.on_event(("done", reason))
        if reason != "cancelled" and job._state is not None and self.cache is not None:
            if reason == "length" and job._todo:
                # the reply's last token is sampled but not read, and the client will send it
                # back: read it now (the client already has its answer), before any later
                # request is admitted and looks the conversation up
                try:
                    _, job._state = self.model.forward(job._todo, job._state, last_only=True)
                    job._fed += job._todo
                    job._recent = (job._recent + tuple(job._todo))[-HISTORY_KEEP:]
                except Exception:
                    pass  # only a cache entry is lost
            self._cache(job)
        job._state = None

    def _fail(self, job: Job, e: Exception) -> None:
        if job.finish_reason is not None:
            return
        job.finish_reason, job._state = "error", None
        msg = str(e) if isinstance(e, RgemmaError) else f"internal error: {type(e).__name__}: {e}"
        job.on_event(("error", msg))

    def _cache(self, job: Job) -> None:
        """Keep the state under the ids fed and, for a reply read to its end, also under the
        ids the client will render for it (`Request.render_reply`)."""
        if self.cache is None or not job._fed:
            return
        aliases = []
        n = len(job.request.prompt_ids)
        reply = job._fed[n:]
        ended = job.tokens and (job.tokens[-1] in job.request.stop_ids or
                                len(job._fed) == n + len(job.tokens))  # at a stop id, or all read
        render = job.request.render_reply
        if render is not None and ended and job.text == job._buf:  # (not cut by a stop string)
            try:
                alias = list(render(job.text))
            except RgemmaError:  # a conversation the template cannot continue: no alias
                alias = job._fed
            if alias != job._fed and self.tokenizer.decode(reply).strip() == job.text.strip():
                aliases.append(alias)
        self.cache.put(job._fed, job._state, job._recent, aliases)
