"""What a model directory says about itself beyond its weights: chat or raw, and the ids that
end generation.

Chat or raw is a property of the model, not of the string typed: the record a quantized copy
carries in its config.json, the demo's directory, the Hub repo id a cached snapshot belongs to,
and only then the name (Hugging Face's "-it" suffix for instruction-tuned models).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import DEMO_DIR
from .config import read_config_json
from .errors import RgemmaError

RECORD_KEY = "rgemma"  # config.json: {"chat": bool, "source": str}, written by `rgemma quantize`
_IT = re.compile(r"[-_]it(?=$|[-_./])")
_HF_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


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
    the demo lists <eos> 1 and <end_of_turn> 107) and config.json's."""
    directory = Path(directory)
    ids = []
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if not path.exists():
            continue
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RgemmaError(f"{path} is not valid JSON: {e}") from None
        v = d.get("eos_token_id") if isinstance(d, dict) else None
        for i in (v if isinstance(v, list) else [] if v is None else [v]):
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise RgemmaError(f"{path}: eos_token_id must be token ids, got {v!r}")
            ids.append(i)
    return tuple(dict.fromkeys(ids))


def read_card(directory: str | Path, name: str | None = None) -> ModelCard:
    """The card of the model in `directory` (see `chat_nature`, `eos_ids`)."""
    chat, why = chat_nature(directory, name)
    return ModelCard(chat, why, eos_ids(directory))
