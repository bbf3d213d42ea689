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
written to a temporary name unique to the save, fsynced and renamed over the target
(`files.write_atomic`), so a failed or interrupted save leaves the previous file intact; only
regular files are read or replaced (`files.open_regular`, `files.check_writable`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ATTENTION, ModelConfig
from .errors import RgemmaError, not_utf8
from .files import SaveInterrupted, check_writable, open_regular, write_atomic
from .generation import HISTORY_KEEP, Context, Session
from .sampling import SamplerSettings
from .schema import is_int, parse_json, short
from .state import AttentionState, State

MAGIC = b"RGEMMAST"
MAX_HEADER = 100 * 1024 * 1024  # as safetensors: tokens and transcript text, never this much
MAX_POS = 2**53  # tokens fed: far beyond any run, exact in every JSON reader
MAX_PENDING = 1 << 24  # a queued prompt
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ")  # magic, version, header CRC-32, header length


def model_identity(model, tokenizer) -> dict:
    """What a state belongs to: the weights (`model.fingerprint`, checkpoint.fingerprint v2:
    config, tensor headers and a fixed sample of bytes of every tensor) and the tokenizer file.
    `digest` is the one value compared on load; `identity` is the fingerprint's version."""
    from .checkpoint import FINGERPRINT_VERSION  # (here: `rgemma state` never imports Numba)
    tok_hash = tokenizer.sha256 if tokenizer is not None else "none"
    digest = hashlib.sha256(f"{model.fingerprint}:{tok_hash}".encode()).hexdigest()
    return {"digest": digest, "fingerprint": model.fingerprint, "identity": FINGERPRINT_VERSION,
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
    path = check_target(path)
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
        data_hash.update(a.reshape(-1).view(np.uint8))  # (a ring with no row yet is empty)
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
    _atomic_write(path, [_PREFIX.pack(MAGIC, FORMAT_VERSION, zlib.crc32(blob), len(blob)), blob, *tensors])
    return _PREFIX.size + len(blob) + offset


def check_target(path: str | Path) -> Path:
    """Raise RgemmaError unless `save(path, ...)` can replace `path` (see files.check_writable;
    not a file of another kind either); returns the path a save will write."""
    path = check_writable(path, "state")
    _refuse_foreign_overwrite(path)
    return path


def _refuse_foreign_overwrite(path: Path) -> None:
    """Do not replace a file that is not a state file (a typo'd path like `--save-state notes.md`).
    An empty file is fine (`touch s.rgs`, or mktemp)."""
    try:
        with open_regular(path, "state file") as (f, _):
            head = f.read(len(MAGIC))
    except RgemmaError:
        return  # absent or unreadable: check_writable and the write itself decide
    if head and head != MAGIC:
        raise RgemmaError(f"refusing to overwrite {path}: it is not an rgemma state file")


def _atomic_write(path: Path, parts) -> None:
    """`write_atomic`, with its failures as one line that says what is on disk."""
    existed = path.exists()
    before = "the previous file is unchanged" if existed else "nothing was written"
    try:
        write_atomic(path, parts)
    except OSError as e:
        raise RgemmaError(f"cannot save state to {path}: {e.strerror or e}; {before}") from None
    except SaveInterrupted as e:
        if e.replaced:
            raise RgemmaError(f"interrupted, after the new state was saved to {path}",
                              exit_code=130) from None
        raise RgemmaError(f"interrupted while saving {path}; {before}", exit_code=130) from None


# -- reading -------------------------------------------------------------------------------------

def load(path: str | Path) -> Saved:
    """Read and verify a state file; any problem is an RgemmaError naming the file."""
    path = Path(path)
    raw = _read(path)
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
    if hlen > MAX_HEADER:
        raise RgemmaError(f"{path} is corrupt (header length {hlen} > {MAX_HEADER})")
    start = _PREFIX.size + hlen
    if start > len(raw):
        raise RgemmaError(f"{path} is truncated ({len(raw)} bytes; the header alone needs {start})")
    if zlib.crc32(raw[_PREFIX.size:start]) != hcrc:
        raise RgemmaError(f"{path} is corrupt (header checksum mismatch)")
    try:
        h = parse_json(raw[_PREFIX.size:start], "bad header")
        data = memoryview(raw)[start:]
        cfg, table = check_header(h, version, len(data))
        if hashlib.sha256(data).hexdigest() != h["data_sha256"]:
            raise ValueError("data checksum mismatch")
        state = _state_from(cfg, h["pos"], table, data)
    except (RgemmaError, ValueError) as e:
        msg = str(e)
        if msg.startswith("truncated"):
            raise RgemmaError(f"{path} is {msg}") from None
        raise RgemmaError(f"{path} is corrupt ({msg})") from None
    ctx = Context(state, tuple(h["recent"]), tuple(h["pending"]), h["rng"])
    return Saved(ctx, SamplerSettings.from_dict(h["sampler"]), h["mode"], h["transcript"],
                 h["model"], version, h.get("created", ""), len(raw))


# -- the header schema (docs/state-format.md, "Header") -------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ROLES = ("system", "user", "model")


def check_header(h, version: int, data_len: int):
    """Check every field of a parsed header before anything is built from it; returns (config,
    tensor table). Raises ValueError (or RgemmaError from the config) naming the bad field;
    "truncated ..." when the data section is shorter than the tensors need."""
    def need(ok, what):
        if not ok:
            raise ValueError(what)

    need(isinstance(h, dict), "the header is not a JSON object")
    # JSON's "\ud800" escapes parse to lone surrogates, which no terminal, file or tokenizer
    # can take: refuse them anywhere in the header, not where they are first printed
    bad = _first_unencodable(h)
    need(bad is None, f"{bad} holds a lone surrogate (a \\uD800-\\uDFFF escape), which is not text")
    need(h.get("format") == "rgemma-state" and is_int(h.get("version")) and h["version"] == version,
         "format/version fields do not match the file's prefix")
    need(isinstance(h.get("created", ""), str), "created is not a string")
    m = h.get("model")
    need(isinstance(m, dict), "model is not an object")
    need(isinstance(m.get("digest"), str) and _HEX64.match(m["digest"]) is not None,
         "model.digest is not a SHA-256 hex string")
    for key in ("fingerprint", "tokenizer_sha256", "name"):
        need(isinstance(m.get(key), str) and len(m[key]) <= 4096, f"model.{key} is not a string")
    need(is_int(m.get("identity", 1), 1, 1 << 16), "model.identity is not a version number")
    need(isinstance(m.get("config"), dict), "model.config is not an object")
    cfg = ModelConfig.from_dict(m["config"])
    V = cfg.vocab_size
    need(is_int(h.get("pos"), 0, MAX_POS), f"pos is not an integer in [0, 2^53], got {short(h.get('pos'))}")
    for key, most in (("recent", HISTORY_KEEP), ("pending", MAX_PENDING)):
        ids = h.get(key)
        need(isinstance(ids, list) and len(ids) <= most and all(is_int(t, 0, V - 1) for t in ids),
             f"{key} is not a list of at most {most} token ids in [0, {V})")
    # every fed token passes through `recent` (decode.step / prefill), so its length pins pos:
    # a pos rewritten to another value the tensor shapes allow (any pos >= W) is caught here
    need(len(h["recent"]) == min(h["pos"], HISTORY_KEEP),
         f"pos {h['pos']} does not match the {len(h['recent'])} recent tokens")
    sampler = h.get("sampler")
    need(isinstance(sampler, dict), "sampler is not an object")
    try:
        SamplerSettings.from_dict(sampler)
    except RgemmaError as e:
        raise ValueError(f"sampler: {e}") from None
    need(is_pcg64_state(h.get("rng")), "rng is not a NumPy PCG64 state")
    need(h.get("mode") in ("chat", "raw"), "mode is not 'chat' or 'raw'")
    tr = h.get("transcript")
    need(isinstance(tr, list) and all(
        isinstance(e, dict) and e.get("role") in ROLES and isinstance(e.get("content"), str)
        for e in tr), "transcript is not a list of {role, content} strings")
    need(isinstance(h.get("data_sha256"), str) and _HEX64.match(h["data_sha256"]) is not None,
         "data_sha256 is not a SHA-256 hex string")
    table = h.get("tensors")
    need(isinstance(table, dict), "tensors is not an object")
    wanted = state_shapes(cfg, h["pos"])
    need(set(table) == set(wanted), "the tensor table does not match the model config")
    spans = []
    for name, shape in wanted.items():
        t = table[name]
        need(isinstance(t, dict) and t.get("dtype") == "F32" and isinstance(t.get("shape"), list)
             and all(type(d) is int for d in t["shape"]) and t["shape"] == list(shape),
             f"tensor {name} is not F32 of shape {list(shape)}")
        off = t.get("offsets")
        need(isinstance(off, list) and len(off) == 2 and all(is_int(o) for o in off)
             and off[1] - off[0] == 4 * math.prod(shape), f"tensor {name} has bad offsets")
        spans.append((off[0], off[1], name))
    end = 0
    for begin, stop, name in sorted(spans):  # the tensors tile the data: no overlap, no gap
        need(begin == end, f"tensor {name} overlaps another or leaves a gap")
        end = stop
    if data_len < end:
        raise ValueError(f"truncated (the data section has {data_len} bytes, the tensors need {end})")
    need(data_len == end, "trailing bytes after the data")
    return cfg, table


def _first_unencodable(v, where="the header"):
    """The path of the first string (key or value) in parsed JSON `v` that is not UTF-8
    encodable, or None. Depth is bounded: `parse_json` refused deep nesting already."""
    if isinstance(v, str):
        return None if not_utf8(v) is None else where
    if isinstance(v, dict):
        for k, x in v.items():
            if not_utf8(k) is not None:
                return f"a key of {where}"
            bad = _first_unencodable(x, k if where == "the header" else f"{where}.{k}")
            if bad:
                return bad
    elif isinstance(v, list):
        for i, x in enumerate(v):
            bad = _first_unencodable(x, f"{where}[{i}]")
            if bad:
                return bad
    return None


def state_shapes(cfg: ModelConfig, pos: int) -> dict[str, tuple[int, ...]]:
    """The stored shape of every state tensor (attention rings: only the min(pos, W) slots
    written), computed without allocating the state."""
    R, K = cfg.lru_width, cfg.conv1d_width
    rows = min(pos, cfg.attention_window_size)
    kv = (rows, cfg.num_key_value_heads, cfg.head_dim)
    out = {}
    for i, kind in enumerate(cfg.layer_types):
        if kind == ATTENTION:
            out.update({f"layers.{i}.k": kv, f"layers.{i}.v": kv})
        else:
            out.update({f"layers.{i}.h": (R,), f"layers.{i}.conv": (K - 1, R)})
    return out


def is_pcg64_state(rng) -> bool:
    """Whether `rng` is what np.random.PCG64().state returns (128-bit state, odd increment)."""
    if not (isinstance(rng, dict) and set(rng) == {"bit_generator", "state", "has_uint32", "uinteger"}):
        return False
    st = rng["state"]
    return (rng["bit_generator"] == "PCG64" and isinstance(st, dict) and set(st) == {"state", "inc"}
            and is_int(st["state"], 0, 2**128 - 1) and is_int(st["inc"], 0, 2**128 - 1)
            and st["inc"] % 2 == 1 and rng["has_uint32"] in (0, 1) and type(rng["has_uint32"]) is int
            and is_int(rng["uinteger"], 0, 2**32 - 1))


def _read(path: Path) -> bytes:
    """The file's bytes, read no further than its header says it holds: the prefix, the header
    (its length from the prefix), then the data (its length from the header's tensor table).
    A file larger than that is refused without reading the rest; a FIFO or device never read."""
    with open_regular(path, "state file") as (f, size):
        raw = f.read(min(size, _PREFIX.size))
        if len(raw) < _PREFIX.size or raw[:len(MAGIC)] != MAGIC:
            return raw
        hlen = _PREFIX.unpack_from(raw)[3]
        if _PREFIX.size + hlen > size or hlen > MAX_HEADER:
            return raw  # load() reports it as truncated or corrupt
        raw += f.read(hlen)
        try:
            table = json.loads(raw[_PREFIX.size:].decode("utf-8"))["tensors"]
            need = max((int(t["offsets"][1]) for t in table.values()), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                OverflowError, RecursionError):
            return raw  # load() reports the header as corrupt
        if need < 0 or _PREFIX.size + hlen + need > size:
            return raw + f.read(max(0, size - len(raw)))  # truncated: load() says by how much
        if _PREFIX.size + hlen + need < size:
            raise RgemmaError(f"{path} is corrupt (trailing bytes after the data: the file holds "
                              f"{size:,} bytes, its header describes {_PREFIX.size + hlen + need:,})")
        return raw + f.read(need)


def _state_from(cfg: ModelConfig, pos: int, table: dict, data: memoryview) -> State:
    """Rebuild a State from a checked tensor table (check_header); values must be finite."""
    state = State.zeros(cfg)
    state.pos = pos
    for name, target in state.arrays().items():
        b, e = table[name]["offsets"]
        a = np.frombuffer(data[b:e], dtype="<f4").reshape(table[name]["shape"])
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {name} holds NaN or Inf")
        target[:a.shape[0]] = a  # attention rings: the first min(pos, W) slots
    return state


def check_model(saved: Saved, model, tokenizer, path) -> None:
    """Refuse a state saved with other weights or another tokenizer."""
    from .checkpoint import FINGERPRINT_VERSION
    mine = model_identity(model, tokenizer)
    if saved.model.get("identity", 1) != FINGERPRINT_VERSION:
        raise RgemmaError(
            f"{path} was saved by an older rgemma whose model identity (v{saved.model.get('identity', 1)}) "
            f"covered only tensor headers and 1-D tensors, so it cannot be verified against this "
            f"model; start a new conversation (`rgemma state {path}` still shows its transcript)")
    if saved.model.get("digest") == mine["digest"]:
        # the digest covers the model's config, but the file's own copy of the config (which
        # shaped its tensors) is a separate field: a file edited to another config with the
        # digest kept would resume a state of the wrong shape or meaning
        # (compared field by field as JSON: a key an older rgemma did not write is skipped)
        mine_cfg = json.loads(json.dumps(mine["config"]))
        theirs = saved.model["config"]
        bad = [k for k in theirs if k in mine_cfg and theirs[k] != mine_cfg[k]]
        if bad:
            raise RgemmaError(f"{path} is corrupt (its model config does not match the model "
                              f"its digest names: {', '.join(bad[:3])})")
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
