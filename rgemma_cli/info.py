"""The facts `rgemma info` shows about a model, as data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import describe as weight_format
from .modelcard import read_card
from .state import State


def describe(model, tokenizer, name: str, path: str | Path) -> list[tuple[str, str]]:
    """What `rgemma info` shows, as (label, value) rows: parameters, weight bytes and formats,
    state size, tokenizer, chat or raw and why, then the config."""
    head = model.weights["model.embed_tokens.weight"]
    matrices = sorted({weight_format(w) for n, w in model.weights.items()
                       if n.endswith("proj.weight") or n.endswith("linear_out.weight")})
    cfg = model.config
    params = sum(int(np.prod(w.shape)) for w in model.weights.values())
    nbytes = sum(int(getattr(w, "nbytes", 0)) for w in model.weights.values())
    state = State.zeros(cfg).nbytes
    card = getattr(model, "card", None) or read_card(path, name)
    rows = [("model", name), ("path", str(path)), ("parameters", f"{params:,}"),
            ("weight bytes", f"{nbytes:,} ({nbytes / 2**30:.2f} GiB)" if nbytes >= 2**30
             else f"{nbytes:,} ({nbytes / 2**20:.2f} MiB)"),
            ("linear weights", ", ".join(matrices)),
            ("embedding / head", weight_format(head)),
            ("state size", f"{state:,} bytes ({state / 2**20:.2f} MiB) at >= "
                           f"{cfg.attention_window_size} tokens"),
            ("tokenizer", f"{tokenizer.vocab_size:,} pieces" if tokenizer else
             "none (no tokenizer.model)"),
            ("chat template", f"yes: {card.chat_reason}" if card.chat else
             f"no, raw text: {card.chat_reason}"),
            ("stops at", ", ".join(str(i) for i in card.eos_ids) or "<eos>")]
    return rows + [(k, str(v)) for k, v in cfg.to_dict().items()]
