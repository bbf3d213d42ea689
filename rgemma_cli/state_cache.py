"""A cache of conversation states keyed by the exact token prefix they have read.

The OpenAI API is stateless: every request resends the whole conversation. RecurrentGemma's
state is fixed in size whatever the length, so the server keeps, after each response, the
state (and the recent tokens the repeat penalty looks at) under the ids it has fed; a later
request whose prompt starts with those ids feeds only the rest. llama.cpp's prompt cache does
this for one KV cache per slot; here every conversation's state is kept.

    cache = StateCache(max_bytes=512 << 20, directory=Path("~/.cache/rgemma/states"), model=m,
                       tokenizer=tok)
    hit = cache.lookup(prompt_ids)        # the longest cached proper prefix, or None
    cache.put(fed_ids, state, recent)     # after a response
    cache.close()                         # spill what is only in memory to the directory

Entries live in memory, least recently used evicted first once their bytes pass `max_bytes`.
With a directory, evicted entries (and all of them at `close`) are written there as state
files (rgemma_cli/statefile.py, docs/state-format.md) named `{length}-{sha256 of the ids}.rgs`,
so a restarted server finds yesterday's conversations; the directory is bounded too, by
`max_disk_bytes`, oldest file first. Files are kept per model (a subdirectory named by the
model identity digest), and a file that fails to load is deleted and treated as a miss.

An entry may also be found under an *alias*: the prompt a client sends back renders the
model's reply from its text, whose canonical tokenization can differ from the ids the model
sampled (both decode to the same text). `put(..., aliases=[ids])` files the same state under
those ids too.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RgemmaError
from .state import State


@dataclass
class Hit:
    """A cached state whose ids are a prefix of the prompt looked up."""

    length: int  # prompt tokens it covers (= cached_tokens)
    state: State  # a private copy: the caller may write into it
    recent: tuple[int, ...]  # the last fed tokens, for the repeat penalty


@dataclass
class _Entry:
    state: State
    recent: tuple[int, ...]
    keys: list  # (length, digest) of the ids it is filed under: its own and its aliases
    on_disk: bool = False


def digest(ids) -> str:
    """The SHA-256 of token ids (as little-endian uint32), the key of an entry."""
    return hashlib.sha256(np.asarray(ids, dtype="<u4").tobytes()).hexdigest()


class StateCache:
    """An LRU of model states keyed by token prefixes, bounded in bytes, optionally on disk.

    Thread-safe. `max_bytes` 0 keeps nothing in memory (with a directory, entries go straight
    to disk). A state handed to `put` must not be written afterwards by its giver; `lookup`
    returns copies.
    """

    def __init__(self, max_bytes: int, directory: str | Path | None = None, *, model=None,
                 tokenizer=None, model_name: str = "", max_disk_bytes: int = 4 << 30):
        self.max_bytes, self.max_disk_bytes = int(max_bytes), int(max_disk_bytes)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # own digest -> entry, LRU first
        self._index: dict[str, str] = {}  # digest of any key (own or alias) -> own digest
        self._lengths: dict[int, int] = {}  # key length -> how many keys have it (memory + disk)
        self._files: OrderedDict[str, tuple[int, Path]] = OrderedDict()  # digest -> (len, path)
        self.nbytes = 0
        self.hits = self.misses = 0
        self.directory = None
        if directory is not None:
            from .statefile import model_identity
            self.directory = Path(directory).expanduser() / model_identity(model, tokenizer)["digest"][:16]
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RgemmaError(f"cannot use {directory} as the state cache directory: "
                                  f"{e.strerror or e}") from None
            self._scan()

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, ids) -> Hit | None:
        """The longest cached key that is a proper prefix of `ids` (at least one id is left to
        feed, whose logits choose the first new token), or None."""
        ids = np.asarray(ids, dtype="<u4")
        raw = ids.tobytes()
        with self._lock:
            for n in sorted((n for n in self._lengths if 0 < n < ids.size), reverse=True):
                d = hashlib.sha256(raw[:4 * n]).hexdigest()
                own = self._index.get(d)
                if own is not None and own in self._entries:
                    e = self._entries[own]
                    self._entries.move_to_end(own)
                    self.hits += 1
                    return Hit(n, e.state.copy(), e.recent)
                if d in self._files:
                    hit = self._load_file(d, n)
                    if hit is not None:
                        self.hits += 1
                        return hit
            self.misses += 1
            return None

    # -- insertion and eviction -----------------------------------------------------------------

    def put(self, ids, state: State, recent, aliases=()) -> None:
        """Keep `state`, the state after feeding exactly `ids`, also under each alias."""
        if len(ids) == 0 or (self.max_bytes <= 0 and self.directory is None):
            return
        own = digest(ids)
        keys = [(len(ids), own)] + [(len(a), digest(a)) for a in aliases if len(a)]
        with self._lock:
            if own in self._entries:
                self._drop(own)
            e = _Entry(state, tuple(int(t) for t in recent), keys)
            self._entries[own] = e
            self.nbytes += state.nbytes
            for n, d in keys:
                self._index[d] = own
                self._lengths[n] = self._lengths.get(n, 0) + 1
            while self._entries and self.nbytes > self.max_bytes:
                self._evict(next(iter(self._entries)))

    def close(self) -> None:
        """Write every entry that is only in memory to the directory (no-op without one)."""
        with self._lock:
            if self.directory is None:
                return
            for own, e in self._entries.items():
                if not e.on_disk:
                    self._write(own, e)
            self._trim_disk()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, own: str) -> None:
        e = self._entries[own]
        if self.directory is not None and not e.on_disk:
            self._write(own, e)
            self._trim_disk()
        self._drop(own)

    def _drop(self, own: str) -> None:
        """Forget an in-memory entry (its files, if any, stay indexed)."""
        e = self._entries.pop(own)
        self.nbytes -= e.state.nbytes
        for n, d in e.keys:
            if self._index.get(d) == own:
                del self._index[d]
            self._unlength(n)

    def _unlength(self, n: int) -> None:
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]

    # -- the directory --------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the state files already in the directory (names only; read on a hit)."""
        found = []
        for p in self.directory.glob("*.rgs"):
            n, _, d = p.stem.partition("-")
            if n.isdigit() and len(d) == 64:
                try:
                    found.append((p.stat().st_mtime, int(n), d, p))
                except OSError:
                    continue
        for _, n, d, p in sorted(found):  # oldest first: the first to go when over the bound
            self._files[d] = (n, p)
            self._lengths[n] = self._lengths.get(n, 0) + 1

    def _write(self, own: str, e: _Entry) -> None:
        """Write an entry under its own name and hard-link its aliases; a failure (full disk)
        only loses the entry, as an eviction would."""
        from . import statefile
        from .generation import Context, Session
        from .sampling import SamplerSettings, new_rng_state

        session = Session(self.model, self.tokenizer, SamplerSettings(seed=0),
                          Context(e.state, e.recent, (), new_rng_state(0)))
        first = None
        for n, d in e.keys:
            if d in self._files:
                continue
            path = self.directory / f"{n}-{d}.rgs"
            try:
                if first is None:
                    statefile.save(path, session, name=self.model_name)
                    first = path
                else:
                    os.link(first, path)
            except (RgemmaError, OSError):
                continue
            self._files[d] = (n, path)
            self._lengths[n] = self._lengths.get(n, 0) + 1  # the file's own count
        e.on_disk = True

    def _trim_disk(self) -> None:
        """Delete the oldest files while the directory holds more than max_disk_bytes."""
        sizes = {}
        for d, (n, p) in self._files.items():
            try:
                sizes[d] = p.stat().st_size
            except OSError:
                sizes[d] = 0
        total = sum(sizes.values())
        while self._files and total > self.max_disk_bytes:
            d, (n, p) = next(iter(self._files.items()))
            self._forget_file(d)
            total -= sizes.get(d, 0)

    def _forget_file(self, d: str) -> None:
        n, p = self._files.pop(d)
        self._unlength(n)
        try:
            p.unlink()
        except OSError:
            pass

    def _load_file(self, d: str, n: int) -> Hit | None:
        """Read a state file found by digest; a bad or foreign file is deleted (a miss)."""
        from . import statefile
        _, path = self._files[d]
        try:
            saved = statefile.load(path)
            statefile.check_model(saved, self.model, self.tokenizer, path)
            if saved.ctx.pending or saved.ctx.state.pos < 1:
                raise RgemmaError(f"{path} is not a cache entry")
        except RgemmaError:
            self._forget_file(d)
            return None
        self._files.move_to_end(d)
        try:
            os.utime(path)  # recently used: last to be trimmed, also after a restart
        except OSError:
            pass
        return Hit(n, saved.ctx.state, tuple(saved.ctx.recent))
