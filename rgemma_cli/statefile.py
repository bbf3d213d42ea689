"""State files: a conversation saved with its model state, resumable without re-reading it.

Layout (little-endian; docs/state-format.md):

    magic    8 bytes  b"RGEMMAST"
    version  u32      FORMAT_VERSION
    hcrc     u32      CRC-32 of the header bytes
    hlen     u64      length of the JSON header (padded with spaces to a multiple of 8)
    header   hlen bytes of UTF-8 JSON: model identity, positions, tokens, sampler, transcript and
             a table of tensors {name: {dtype, shape, offsets}} into the data section
    data     raw float32 tensors; its SHA-256 is in the header

No pickle: the header is JSON and the tensors are raw bytes. While fewer than W tokens have been
fed, only the W slots of the attention ring buffers that were written are stored. Files are
written to a temporary name, fsynced and renamed over the target, so a failed or interrupted
save leaves the previous file intact.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import RgemmaError
from .generation import Context, Session
from .safetensors import write_atomic
from .sampling import SamplerSettings
from .state import AttentionState, State

MAGIC = b"RGEMMAST"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, header CRC-32, header length


def model_identity(model, tokenizer) -> dict:
    """What a state belongs to: the weights (`model.fingerprint`: config, tensor headers and the
    values of the 1-D tensors, which tell a base model from its -it sibling) and the tokenizer
    file. `digest` is the one value compared on load."""
    tok_hash = tokenizer.sha256 if tokenizer is not None else "none"
    digest = hashlib.sha256(f"{model.fingerprint}:{tok_hash}".encode()).hexdigest()
    return {"digest": digest, "fingerprint": model.fingerprint,
            "tokenizer_sha256": tok_hash, "config": model.config.to_dict()}


@dataclass
class Saved:
    """The contents of a state file."""

    ctx: Context
    settings: SamplerSettings
    mode: str  # "chat" | "raw"
    transcript: list  # [{"role", "content"}]
    model: dict  # model_identity() plus "name", the model argument it was saved with
    version: int
    created: str
    size: int  # bytes of the file

    @property
    def config(self) -> ModelConfig:
        """The config of the model the state was saved with."""
        return ModelConfig.from_dict(self.model["config"])


# -- writing -------------------------------------------------------------------------------------

def save(path: str | Path, session: Session, name: str = "") -> int:
    """Write `session` (context, settings, transcript) to `path` atomically; returns the size."""
    path = Path(path)
    ctx = session.ctx
    tensors, offset, header_tensors = [], 0, {}
    W = session.model.config.attention_window_size
    for key, a in ctx.state.arrays().items():
        layer = ctx.state.layers[int(key.split(".")[1])]
        if isinstance(layer, AttentionState) and ctx.state.pos < W:
            a = a[:ctx.state.pos]  # slots >= pos were never written: they are zeros
        a = np.ascontiguousarray(a, dtype="<f4")
        header_tensors[key] = {"dtype": "F32", "shape": list(a.shape),
                               "offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        tensors.append(a)
    data_hash = hashlib.sha256()
    for a in tensors:
        data_hash.update(memoryview(a).cast("B"))
    header = {
        "format": "rgemma-state", "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {**model_identity(session.model, session.tokenizer), "name": name},
        "pos": ctx.state.pos, "recent": list(ctx.recent), "pending": list(ctx.pending),
        "sampler": session.settings.to_dict(), "rng": ctx.rng,
        "mode": session.mode, "transcript": session.transcript,
        "tensors": header_tensors, "data_sha256": data_hash.hexdigest(),
    }
    blob = json.dumps(header, ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    _refuse_foreign_overwrite(path)
    _atomic_write(path, [_PREFIX.pack(MAGIC, FORMAT_VERSION, zlib.crc32(blob), len(blob)), blob, *tensors])
    return _PREFIX.size + len(blob) + offset


def _refuse_foreign_overwrite(path: Path) -> None:
    """Do not replace a file that is not a state file (a typo'd path like `--save-state notes.md`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return
    if head != MAGIC and head:
        raise RgemmaError(f"refusing to overwrite {path}: it is not an rgemma state file")


def _atomic_write(path: Path, parts) -> None:
    """`write_atomic`, with its failures as one-line errors that say the old file survived."""
    try:
        write_atomic(path, parts)
    except OSError as e:
        raise RgemmaError(f"cannot save state to {path}: {e.strerror or e}; the previous file "
                          f"(if any) is unchanged") from None
    except KeyboardInterrupt:
        raise RgemmaError(f"interrupted while saving {path}; the previous file (if any) is "
                          f"unchanged") from None


# -- reading -------------------------------------------------------------------------------------

def load(path: str | Path) -> Saved:
    """Read and verify a state file; any problem is an RgemmaError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RgemmaError(f"state file not found: {path}") from None
    except IsADirectoryError:
        raise RgemmaError(f"{path} is a directory, not a state file") from None
    except OSError as e:
        raise RgemmaError(f"cannot read state file {path}: {e.strerror or e}") from None
    if len(raw) < _PREFIX.size or raw[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(raw[:len(MAGIC)]) and len(raw) < _PREFIX.size:
            raise RgemmaError(f"{path} is truncated ({len(raw)} bytes)")
        raise RgemmaError(f"{path} is not an rgemma state file")
    _, version, hcrc, hlen = _PREFIX.unpack_from(raw)
    if version > FORMAT_VERSION:
        raise RgemmaError(f"{path} was written by a newer rgemma (state format v{version}; this "
                          f"version reads up to v{FORMAT_VERSION}): upgrade rgemma")
    if version < 1:
        raise RgemmaError(f"{path} is corrupt (format version {version})")
    start = _PREFIX.size + hlen
    if start > len(raw):
        raise RgemmaError(f"{path} is truncated ({len(raw)} bytes; the header alone needs {start})")
    try:
        if zlib.crc32(raw[_PREFIX.size:start]) != hcrc:
            raise ValueError("header checksum mismatch")
        h = json.loads(raw[_PREFIX.size:start].decode("utf-8"))
        data = memoryview(raw)[start:]
        need = max((t["offsets"][1] for t in h["tensors"].values()), default=0)
        if len(data) < need:
            raise RgemmaError(f"{path} is truncated ({len(raw)} bytes, expected {start + need})")
        if len(data) > need:
            raise ValueError("trailing bytes after the data")
        if hashlib.sha256(data).hexdigest() != h["data_sha256"]:
            raise ValueError("checksum mismatch")
        cfg = ModelConfig.from_dict(h["model"]["config"])
        state = _state_from(cfg, h["pos"], h["tensors"], data)
        ctx = Context(state, tuple(int(t) for t in h["recent"]),
                      tuple(int(t) for t in h["pending"]), h["rng"])
        settings = SamplerSettings.from_dict(h["sampler"])
        if h["mode"] not in ("chat", "raw") or not isinstance(h["transcript"], list):
            raise ValueError("bad mode or transcript")
        return Saved(ctx, settings, h["mode"], h["transcript"], h["model"], version,
                     h.get("created", ""), len(raw))
    except RgemmaError as e:
        if str(e).startswith(str(path)):
            raise
        raise RgemmaError(f"{path} is corrupt ({e})") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise RgemmaError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def _state_from(cfg: ModelConfig, pos: int, table: dict, data: memoryview) -> State:
    """Rebuild a State from the tensor table; shapes must be what the config implies."""
    state = State.zeros(cfg)
    state.pos = int(pos)
    wanted = state.arrays()
    if set(table) != set(wanted) or state.pos < 0:
        raise ValueError("tensor table does not match the model config")
    for name, target in wanted.items():
        t = table[name]
        b, e = t["offsets"]
        a = np.frombuffer(data[b:e], dtype="<f4").reshape(t["shape"])
        rows = min(state.pos, cfg.attention_window_size) if name.endswith((".k", ".v")) else None
        if rows is not None:
            if a.shape != (rows,) + target.shape[1:]:
                raise ValueError(f"{name} has shape {list(a.shape)}")
            target[:rows] = a
        else:
            if a.shape != target.shape:
                raise ValueError(f"{name} has shape {list(a.shape)}")
            target[...] = a
    return state


def check_model(saved: Saved, model, tokenizer, path) -> None:
    """Refuse a state saved with other weights or another tokenizer."""
    mine = model_identity(model, tokenizer)
    if saved.model.get("digest") == mine["digest"]:
        return
    name = saved.model.get("name")
    what = "tokenizer" if saved.model.get("fingerprint") == mine["fingerprint"] else "model"
    hint = f"; resume it with -m {name}" if name else ""
    raise RgemmaError(f"{path} was saved with a different {what} ({name or 'unnamed'}, digest "
                      f"{str(saved.model.get('digest'))[:12]}){hint}")


def restore(saved: Saved, model, tokenizer) -> Session:
    """A Session continuing exactly where the saved one stopped."""
    return Session(model, tokenizer, saved.settings, saved.ctx, mode=saved.mode,
                   transcript=saved.transcript)
