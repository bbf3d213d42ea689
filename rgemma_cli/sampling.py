"""Choosing the next token from the logits: greedy, or sampled with the usual knobs.

The pipeline follows llama.cpp / Hugging Face semantics: repetition penalty over the last n
tokens (positive logits divided, negative multiplied), then temperature, top-k, top-p (the
smallest set of most likely tokens whose mass reaches p) and min-p (drop tokens less likely
than min_p x the most likely one). Temperature 0 is greedy: argmax, ties to the lowest id.

Sampling draws exactly one uniform number per token from a NumPy PCG64 generator whose state is
plain JSON, so a saved conversation resumes with the very same random stream.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from dataclasses import dataclass

import numpy as np

from .errors import RgemmaError

MAX_REPEAT_LAST_N = 4096  # the history a state file keeps (statefile.HISTORY_KEEP)
# Clamps that keep every setting finite in float32 (docs/usage.md, "Sampling limits"): a
# temperature below MIN_TEMPERATURE samples as MIN_TEMPERATURE (1/T would overflow float32 and
# turn the most likely token's 0 x inf into NaN; at 1e-30 it is already the argmax but for exact
# ties), and a repetition penalty that pushes a logit past +-LOGIT_LIMIT leaves it there.
MIN_TEMPERATURE = 1e-30
LOGIT_LIMIT = 1e30


@dataclass(frozen=True)
class SamplerSettings:
    """The sampling knobs; names match the CLI flags."""

    temperature: float = 0.7
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # 0 = off
    seed: int | None = None  # None (or -1, llama.cpp's spelling): a random seed, chosen once and recorded

    def __post_init__(self):
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool) and self.seed == -1:
            object.__setattr__(self, "seed", None)
        self.validate()

    def validate(self) -> None:
        """Raise RgemmaError naming the flag whose value is out of range or of the wrong type
        (bool is not a number; a JSON 1e400 is inf, not a number)."""
        def need(ok, msg):
            if not ok:
                raise RgemmaError(msg)

        def real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        need(real(self.temperature) and self.temperature >= 0,
             f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        need(integer(self.top_k) and self.top_k >= 0, f"--top-k must be an integer >= 0, got {self.top_k!r}")
        need(real(self.top_p) and 0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p!r}")
        need(real(self.min_p) and 0 <= self.min_p <= 1, f"--min-p must be in [0, 1], got {self.min_p!r}")
        need(real(self.repeat_penalty) and self.repeat_penalty > 0,
             f"--repeat-penalty must be a finite number > 0, got {self.repeat_penalty!r}")
        need(integer(self.repeat_last_n) and 0 <= self.repeat_last_n <= MAX_REPEAT_LAST_N,
             f"--repeat-last-n must be in [0, {MAX_REPEAT_LAST_N}], got {self.repeat_last_n!r}")
        need(self.seed is None or (integer(self.seed) and 0 <= self.seed < 2**64),
             f"--seed must be in [0, 2^64) (or -1: random), got {self.seed!r}")

    def with_seed(self) -> "SamplerSettings":
        """These settings with a concrete seed (a random one if none was given)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(63))

    def replace(self, **changes) -> "SamplerSettings":
        """A copy with some values changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as JSON-able values (state files)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerSettings":
        """Settings from `to_dict` output; unknown keys (a newer writer's) are ignored."""
        if not isinstance(d, dict):
            raise RgemmaError(f"sampler settings must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def new_rng_state(seed: int) -> dict:
    """The JSON-able PCG64 state a seed starts from."""
    return np.random.PCG64(seed).state


def apply_repeat_penalty(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """Penalise every token in `recent` once (llama.cpp / HF CTRL-style penalty)."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    logits = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.size)]
    x = logits[ids].astype(np.float64)  # (a few ids) a penalty of 1e-38 overflows float32
    with np.errstate(over="ignore", under="ignore"):
        x = np.where(x > 0, x / penalty, x * penalty)
    logits[ids] = np.clip(x, -LOGIT_LIMIT, LOGIT_LIMIT)
    return logits


def candidates(logits: np.ndarray, s: SamplerSettings) -> tuple[np.ndarray, np.ndarray]:
    """The tokens left after temperature, top-k, top-p and min-p, most likely first, with their
    probabilities (float64, summing to 1). Ties are ordered by lowest id."""
    l = np.asarray(logits, dtype=np.float32)
    inv_t = np.float32(1.0 / max(s.temperature, MIN_TEMPERATURE))  # finite: no 0 x inf = NaN
    with np.errstate(over="ignore"):  # (l - max) x inv_t may reach -inf: exp gives the right 0
        w = np.exp((l - l.max()) * inv_t)  # p / p_max in [0, 1], never NaN for finite logits
    ids = np.arange(l.size)
    if 0 < s.top_k < l.size:  # partial selection: a full sort of 256k logits costs ~30 ms
        kth = -np.partition(-l, s.top_k - 1)[s.top_k - 1]
        above = np.flatnonzero(l > kth)
        ids = np.concatenate([above, np.flatnonzero(l == kth)[:s.top_k - above.size]])  # ties: lowest ids
    total = w[ids].sum(dtype=np.float64)  # top-p sees the distribution renormalised after top-k
    if s.min_p > 0.0:
        # min-p keeps p >= min_p * p_max; that set is a most-likely prefix that top-p cannot
        # extend, so it is applied before sorting (the result is the same, the sort is small)
        ids = ids[w[ids] >= s.min_p]
    ids = ids[np.lexsort((ids, -l[ids]))]  # by logit descending, then id ascending
    p = w[ids].astype(np.float64) / total
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p)) + 1  # smallest prefix reaching p
        ids, p = ids[:keep], p[:keep]
    return ids, p / p.sum()


def sample(logits: np.ndarray, s: SamplerSettings, recent, rng: np.random.Generator) -> int:
    """The next token id from one row of logits; `recent` are the preceding token ids.

    Greedy (temperature 0) uses no randomness; otherwise exactly one `rng.random()` is drawn.
    """
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if s.repeat_last_n > 0:
        logits = apply_repeat_penalty(logits, list(recent)[-s.repeat_last_n:], s.repeat_penalty)
    if s.temperature == 0:
        return int(np.argmax(logits))
    u = rng.random()
    ids, p = candidates(logits, s)
    i = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(ids[min(i, ids.size - 1)])
