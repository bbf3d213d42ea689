"""What a model directory says about itself beyond its weights: chat or raw, and the ids that
end generation.

Chat or raw is a property of the model, not of the string typed: the record a quantized copy
carries in its config.json, the demo's directory, the Hub repo id a cached snapshot belongs to,
and only then the name (Hugging Face's "-it" suffix for instruction-tuned models).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import DEMO_DIR
from .config import ModelConfig, read_config_json
from .errors import RgemmaError
from .files import read_regular
from .schema import is_int, parse_json, short

RECORD_KEY = "rgemma"  # config.json: {"chat": bool, "source": str}, written by `rgemma quantize`
_IT = re.compile(r"[-_]it(?=$|[-_./])")
_HF_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")
GENERATION_CONFIG_LIMIT = 1 << 20  # Hub files are < 1 KB; a cap so /dev/zero-like input is refused


@dataclass(frozen=True)
class ModelCard:
    """Facts about a loaded model that are not in its weights."""

    chat: bool  # the Gemma chat template applies (instruction-tuned)
    chat_reason: str  # why `chat` is what it is, for people
    eos_ids: tuple[int, ...]  # every id that ends generation (generation_config.json)


def hub_repo_of(directory: Path) -> str | None:
    """The repo id of a Hugging Face cache snapshot (.../models--org--name/snapshots/<rev>)."""
    for part in reversed(Path(directory).resolve().parts):
        m = _HF_CACHE_DIR.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def chat_nature(directory: str | Path, name: str | None = None) -> tuple[bool, str]:
    """(chat?, why) for the model in `directory` (`name`: the model argument, unused by the
    rule since `-m weights/demo` and `-m demo` are the same model)."""
    directory = Path(directory)
    config = read_config_json(directory / "config.json")
    record = config.get(RECORD_KEY)
    if isinstance(record, dict) and isinstance(record.get("chat"), bool):
        src = record.get("source")
        where = f" (a copy of {src})" if isinstance(src, str) and src else ""
        return record["chat"], f"recorded in config.json{where}"
    if directory.resolve() == DEMO_DIR.resolve():
        return True, "the demo model, trained on the chat template"
    repo = hub_repo_of(directory)
    if repo is not None:
        return _by_name(repo, "Hub repo")
    return _by_name(directory.resolve().name, "directory name")


def _by_name(name: str, what: str) -> tuple[bool, str]:
    if _IT.search(name.rstrip("/").lower()):
        return True, f"{what} {name} ends in -it (instruction-tuned)"
    return False, f"{what} {name} has no -it: a base model, raw text"


def eos_ids(directory: str | Path) -> tuple[int, ...]:
    """The ids that end generation: generation_config.json's `eos_token_id` (an id or a list;
    the demo lists <eos> 1 and <end_of_turn> 107) and config.json's.

    Both files are untrusted: read as regular files only (a FIFO or /dev/zero is refused, not
    waited on), generation_config.json at most GENERATION_CONFIG_LIMIT bytes, parsed by
    `parse_json`; every id must be an integer in [0, vocab_size). Raises RgemmaError (one line
    naming the file) otherwise; a missing generation_config.json is fine."""
    directory = Path(directory)
    config = read_config_json(directory / "config.json")
    vocab_size = ModelConfig.from_dict(config).vocab_size
    docs = []
    path = directory / "generation_config.json"
    if os.path.lexists(path):
        raw = read_regular(path, "generation_config.json", limit=GENERATION_CONFIG_LIMIT)
        docs.append((path, parse_json(raw, f"{path} is not valid JSON")))
    docs.append((directory / "config.json", config))
    ids = []
    for path, d in docs:
        v = d.get("eos_token_id") if isinstance(d, dict) else None
        for i in (v if isinstance(v, list) else [] if v is None else [v]):
            if not is_int(i, 0, vocab_size - 1):
                raise RgemmaError(f"{path}: eos_token_id must be token ids in [0, {vocab_size}) "
                                  f"(vocab_size), got {short(v)}")
            ids.append(i)
    return tuple(dict.fromkeys(ids))


def read_card(directory: str | Path, name: str | None = None) -> ModelCard:
    """The card of the model in `directory` (see `chat_nature`, `eos_ids`)."""
    chat, why = chat_nature(directory, name)
    return ModelCard(chat, why, eos_ids(directory))
