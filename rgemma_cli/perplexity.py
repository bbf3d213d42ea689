"""Perplexity: the teacher-forced negative log-likelihood of a text under a model.

Every token after the first is predicted from all the tokens before it; the text is fed in
chunks, and the recurrent state (RG-LRU, conv1d, the attention window's keys and values) is
carried from one chunk to the next, so the whole file is one sequence and the result does not
depend on the chunk size (up to float rounding). This is what llama.cpp's `llama-perplexity`
and `mlx_lm.evaluate` report; a transformer has to cut a long text into windows, a recurrent
model does not.

    perplexity = exp(mean over scored tokens of -log p(token | everything before it))
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import RgemmaError

DEFAULT_CHUNK = 512


@dataclass
class PerplexityResult:
    """tokens: scored (predicted) tokens; nll: their mean negative log-likelihood in nats;
    seconds: wall time of the forward passes; chunks: forward calls made."""

    tokens: int
    nll: float
    seconds: float
    chunks: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "chunks": self.chunks}


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[t] per row, in float64: logits (T, V) float32, targets (T,) ints."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(z.shape[0]), targets]


def perplexity(model, ids, *, chunk_size: int = DEFAULT_CHUNK, max_tokens: int | None = None,
               progress=None) -> PerplexityResult:
    """Teacher-forced NLL of the token sequence `ids` (a BOS first, as `Tokenizer.raw_prompt`
    gives it): ids[1:] are scored, at most `max_tokens` of them.

    The model sees ids[:-1] in chunks of `chunk_size` tokens with its state carried across
    (`Griffin.forward`); `progress(scored, total, running_nll)` is called after each chunk.
    Raises RgemmaError for fewer than two ids, a chunk size < 1 or max_tokens < 1.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if chunk_size < 1:
        raise RgemmaError(f"chunk size must be >= 1, got {chunk_size}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise RgemmaError(f"max tokens must be >= 1, got {max_tokens}")
        ids = ids[:max_tokens + 1]
    if ids.size < 2:
        raise RgemmaError("perplexity needs at least one token to predict (the text is empty)")
    total = ids.size - 1
    state = model.initial_state()
    nll_sum, chunks, seconds = 0.0, 0, 0.0
    for start in range(0, total, chunk_size):
        piece = ids[start:min(start + chunk_size, total)]
        t0 = time.perf_counter()
        # donate: the state of the previous chunk is not needed again (its rings are reused)
        logits, state = model.forward(piece, state, donate=True)
        seconds += time.perf_counter() - t0
        nll_sum += float(token_nll(logits, ids[start + 1:start + 1 + piece.size]).sum())
        chunks += 1
        if progress is not None:
            done = start + piece.size
            progress(done, total, nll_sum / done)
    return PerplexityResult(tokens=total, nll=nll_sum / total, seconds=seconds, chunks=chunks)


def read_text(path) -> str:
    """A UTF-8 text file's contents; RgemmaError (one line) if it is missing, unreadable, not
    UTF-8 or empty."""
    from pathlib import Path

    from .files import read_regular
    path = Path(path)
    data = read_regular(path, "text file", missing=f"no such file: {path}")  # no FIFO, no /dev/zero
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RgemmaError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise RgemmaError(f"{path} is not a text file (it contains NUL bytes)")
    if not text.strip():
        raise RgemmaError(f"{path} is empty: nothing to score")
    return text
