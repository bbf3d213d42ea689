"""The server's batching loop: the `Engine` driven from one background thread.

Requests arrive on the server's threads and join the engine between steps; a bounded queue
stands before it (`submit` raises `QueueFull` once `max_batch` requests run and `max_queue`
wait: the server answers 429). Each step advances every running request by one unit of work (a decoded token,
or a chunk of its prompt within the step's `prefill_chunk` budget), so a long prompt arriving
never stalls the streams already running for more than about a chunk. A request leaves at the
step it finishes, or at the first step after `Sequence.cancel()` (a client that went away).

What a request produces depends only on its own prompt, settings and seed (see `engine`): a
seeded request gives the text `rgemma generate --seed` gives for the same prompt, whatever
else runs. Events go to the request's `on_event` callback, from the scheduler's thread:
("text", piece), then ("done", finish_reason) or ("error", message).

    sched = Scheduler(model, tokenizer, max_batch=8, cache=cache)
    sched.start()
    seq = sched.submit(Request(ids, SamplerSettings(seed=1), max_tokens=64), on_event=print)
    ...
    sched.stop()
"""

from __future__ import annotations

import threading
from collections import deque

from .engine import Engine, Request, Sequence  # noqa: F401  (Request: the server builds them)
from .errors import RgemmaError

PREFILL_CHUNK = 128  # prompt tokens read per step (all joining requests together) while others decode


class QueueFull(RgemmaError):
    """The batch and its waiting queue are full; try again later."""


class ShuttingDown(RgemmaError):
    """The scheduler no longer accepts requests."""


class Scheduler:
    """Runs an `Engine` on a background thread; see the module docstring. `submit`, `cancel`
    (on the Sequence), `drain` and `stop` are safe from any thread; `step` is the loop's."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 cache=None, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1:
            raise RgemmaError(f"--max-batch must be >= 1, got {max_batch}")
        self.engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk,
                             cache=cache)
        self.cache, self.max_batch, self.max_queue = cache, max_batch, max_queue
        self._incoming: deque[Sequence] = deque()  # submitted, not yet handed to the engine
        self._listeners: dict[Sequence, object] = {}
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = None

    @property
    def running(self) -> list[Sequence]:
        return self.engine.running

    @property
    def waiting(self) -> list[Sequence]:
        return list(self._incoming) + list(self.engine.waiting)

    @property
    def steps(self) -> int:
        return self.engine.steps

    # -- the outside: submit, start, drain, stop --------------------------------------------------

    def submit(self, request: Request, on_event) -> Sequence:
        """Queue a request; raises RgemmaError for one that cannot run (empty prompt, token id
        out of range), QueueFull or ShuttingDown."""
        seq = self.engine.sequence(request)
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            queued = len(self._incoming) + len(self.engine.waiting) + len(self.engine.running)
            if queued >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} "
                                f"waiting; try again shortly")
            self._incoming.append(seq)
            self._listeners[seq] = on_event
            self._cond.notify()
        return seq

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
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self.engine.busy or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    left = list(self._incoming) + list(self.engine.waiting) + self.engine.running
                    self._incoming.clear()
                    for seq in left:
                        self.engine.cancel(seq)
                        self._tell(seq, "")
                    return
            self.step()

    def step(self) -> None:
        """One engine step, after handing it the requests submitted since the last."""
        with self._cond:
            new = list(self._incoming)
            self._incoming.clear()
        for seq in new:
            self.engine.add(seq)
            if seq.done:  # (max_tokens 0 with nothing to read it into)
                self._tell(seq, "")
        for seq, piece in self.engine.step():
            self._tell(seq, piece)

    def _tell(self, seq: Sequence, piece: str) -> None:
        listener = self._listeners.get(seq)
        if listener is None:
            return
        if piece:
            listener(("text", piece))
        if seq.done:
            del self._listeners[seq]
            listener(("error", seq.error) if seq.finish_reason == "error"
                     else ("done", seq.finish_reason))
