"""The offline quantizer (`rgemma quantize`): int8 per output channel and 4-bit with per-group
scales. The runtime side (the weight objects and their kernels) is `formats`.

A quantized checkpoint keeps the Hugging Face layout and names. Each quantized linear weight
`X.weight` is stored as
  int8   `X.weight` I8 (out, in)           + `X.weight_scale` F32 (out,)       w = q * scale[r]
  4-bit  `X.weight` U8 (out, in/2) packed  + `X.weight_scale` BF16 (out, in/G) w = (nib - 8) * scale[r, g]
where in every group of G = 64 weights byte j holds weight j in its low nibble and weight j + 32
in its high nibble (the layout `kernels.matvec.matvec_q4` reads with 256-bit integer dot products), and
config.json gains `"quantization": {"method": "rgemma", "bits", "group_size", "embedding_bits"}`.

What stays at full precision: the RG-LRU parameters (recurrence and gate blocks), conv1d, norms
and biases (the recurrence is sensitive, and they are a fraction of a percent of the bytes). The
tied embedding / output head gets the same bits as the other matrices unless `embedding_bits`
says otherwise (`--embedding-bits 8` keeps a 4-bit model's head in int8: ~0.3 GB more to read per
2B token, for the quality measured in docs/benchmarks.md).

4-bit scales are stored as bfloat16 (their rounding is folded into the choice of each scale), so
a 4-bit weight costs 4.25 bits. Files from before, with F32 scales, load as well.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .checkpoint import IGNORED, CheckpointWriter, load_weights, open_tensors
from .config import read_config_json
from .errors import RgemmaError
from .files import make_temp_dir, recover_dir, replace_dir, write_atomic
from .formats import Q4_GROUP, SCALE_SUFFIX
from .modelcard import RECORD_KEY, chat_nature
from .safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16

QUANTIZED_LAYERS = ("mlp_block.gate_proj", "mlp_block.up_proj", "mlp_block.down_proj",
                    "temporal_block.linear_x", "temporal_block.linear_y",
                    "temporal_block.linear_out", "temporal_block.q_proj",
                    "temporal_block.k_proj", "temporal_block.v_proj", "temporal_block.o_proj")
EMBEDDING = "model.embed_tokens.weight"
_ROWS = 8192  # rows quantized at a time (bounds the f32 working memory)


# -- quantizing ------------------------------------------------------------------------------


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 (out, in) -> (int8 q, f32 scale (out,)), symmetric round-to-nearest per row."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


# Candidate levels for a group's value of largest magnitude: -8 is Q4_0's rule (every level
# used, nothing clipped); beyond -8 the peak is clipped to -8 and the other weights get a finer
# step.
_Q4_PEAK_LEVELS = np.arange(-9.5, -7.4, 0.25)


def quantize_int4(w: np.ndarray, group: int = Q4_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """f32 (out, in) -> (uint8 packed (out, in/2), bf16 scale bits (out, in/group)).

    Per group, the scale is the candidate peak / level (`_Q4_PEAK_LEVELS`) whose levels -8..7
    reproduce the group with the least squared error weighted by w^2, with the scale rounded to
    bf16 as stored. The weighting is the one llama.cpp uses for its legacy 4-bit formats: large
    weights, which matter most in a trained model, are kept closest. Measured on the trained demo
    model it gives the lowest KL of plain max-scaling, unweighted and w^2-weighted search
    (docs/benchmarks.md). The stored nibble is level + 8.
    """
    w = np.asarray(w, np.float32)
    out, n = w.shape
    if n % group:
        raise RgemmaError(f"cannot quantize a ({out}, {n}) weight to 4 bits: {n} is not a "
                          f"multiple of the group size {group}")
    g = w.reshape(out, n // group, group)
    importance = np.square(g)
    idx = np.abs(g).argmax(axis=2)
    peak = np.take_along_axis(g, idx[..., None], axis=2)[..., 0]
    best_bits = best_err = None
    for level in _Q4_PEAK_LEVELS:
        bits = f32_to_bf16(peak / np.float32(level))
        scale = bf16_to_f32(bits)[..., None]
        q = np.clip(np.rint(g / np.where(scale == 0, 1.0, scale)), -8, 7)
        err = (importance * np.square(q * scale - g)).sum(axis=2)
        if best_bits is None:
            best_bits, best_err, best_q = bits, err, q
        else:
            better = err < best_err
            np.copyto(best_bits, bits, where=better)
            np.copyto(best_err, err, where=better)
            np.copyto(best_q, q, where=better[..., None])
    nib = (best_q + 8).astype(np.uint8)
    half = group // 2
    packed = nib[..., :half] | (nib[..., half:] << 4)
    return packed.reshape(out, n // 2), best_bits


def _to_f32(t: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(t) if dtype == "BF16" else np.asarray(t, np.float32)


def _quantize_tensor(f: SafetensorsFile, name: str, bits: int) -> dict:
    """{name: data, name_scale: scales} quantizing `name` in blocks of rows."""
    t, dt = f.tensor(name), f.dtype(name)
    if bits == 4 and t.shape[1] % Q4_GROUP:
        bits = 8  # a width that is not a whole number of groups (small test models) stays int8
    parts, scales = [], []
    for lo in range(0, t.shape[0], _ROWS):
        block = _to_f32(t[lo:lo + _ROWS], dt)
        q, s = quantize_int8(block) if bits == 8 else quantize_int4(block)
        parts.append(q)
        scales.append(s)
    return {name: np.concatenate(parts), name + SCALE_SUFFIX: np.concatenate(scales)}


def quantize_checkpoint(src_dir, out_dir, bits: int, *, embedding_bits: int | None = None,
                        shard_bytes: int = 2 << 30, progress=None) -> Path:
    """Write a quantized copy of the checkpoint in `src_dir` to `out_dir` and return out_dir.

    bits: 8 (int8 per output channel) or 4 (groups of 64 with bf16 scales; a matrix whose input
    width is not a multiple of 64 is written as int8). embedding_bits: the tied embedding /
    output head: 4, 8 or 16 (kept as stored); by default the same as `bits`. Tokenizer and other side files are copied.
    `progress(done_tensors, total_tensors)` is called after each tensor if given.

    The source is checked as `load` checks it (config.json, every tensor with its shape and
    dtype) before anything is written. `out_dir` is replaced whole and atomically: the copy is
    built in a temp directory beside it and swapped in (`files.replace_dir`); an existing
    `out_dir` must be empty or a model written by rgemma quantize. Raises RgemmaError (one
    line) for a bad source, an unusable `out_dir`, or a failed write (`out_dir` unchanged).
    """
    if bits not in (4, 8):
        raise RgemmaError(f"--bits must be 8 or 4, got {bits}")
    embedding_bits = bits if embedding_bits is None else embedding_bits
    if embedding_bits not in (4, 8, 16):
        raise RgemmaError(f"embedding bits must be 4, 8 or 16, got {embedding_bits}")
    src = Path(src_dir)
    config = read_config_json(src / "config.json")
    if "quantization" in config:
        raise RgemmaError(f"{src} is already quantized ({config['quantization']})")
    load_weights(src)  # the loader's own checks: a copy of a source it refuses could not load
    shown = Path(out_dir)
    out = _output_dir(src, shown)
    try:
        tmp = make_temp_dir(out.parent)
    except OSError as e:
        raise RgemmaError(f"cannot write {shown}: {e.strerror or e} (directory {out.parent})") from None
    try:
        _write_copy(src, tmp, config, bits, embedding_bits, shard_bytes, progress)
        replace_dir(tmp, out)
    except OSError as e:
        raise RgemmaError(f"cannot write {shown}: {e.strerror or e}; {shown} is unchanged") from None
    finally:
        if tmp.exists():  # not swapped in: a failure, Ctrl-C
            shutil.rmtree(tmp, ignore_errors=True)
    return shown


def _output_dir(src: Path, given: Path) -> Path:
    """The directory to replace for OUT (a symlink's target: the link stays), after finishing
    a killed run's swap into it; refuses what must not be replaced. Messages name OUT as given."""
    out = given
    real = Path(os.path.realpath(given))
    recover_dir(real)
    if real == src.resolve() or real in src.resolve().parents:
        raise RgemmaError(f"{out} is the model's own directory: the output must be another "
                          f"directory (the same directory would replace the model being read)")
    if os.path.lexists(real) and not real.is_dir():
        raise RgemmaError(f"{out} exists and is not a directory: give a new or existing directory")
    try:
        occupied = real.is_dir() and any(real.iterdir())
    except OSError as e:
        raise RgemmaError(f"cannot read {out}: {e.strerror or e}") from None
    if occupied and not _made_by_quantize(real):
        raise RgemmaError(f"{out} is a directory that does not hold a model written by rgemma "
                          f"quantize; the output replaces its directory whole, so give a new or "
                          f"empty directory")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RgemmaError(f"cannot create {out.parent}: {e.strerror or e}") from None
    return real


def _made_by_quantize(directory: Path) -> bool:
    try:
        method = (read_config_json(directory / "config.json").get("quantization") or {})
        return isinstance(method, dict) and method.get("method") == "rgemma"
    except RgemmaError:
        return False


def _write_copy(src: Path, out: Path, config: dict, bits: int, embedding_bits: int,
                shard_bytes: int, progress) -> None:
    """The quantized checkpoint, its side files and config.json, written into the empty `out`
    and fsynced."""
    untied = config.get("tie_word_embeddings") is False  # then lm_head.weight is the head: keep it
    names = [(f, n) for n, f in open_tensors(src).items() if untied or n not in IGNORED]
    writer = CheckpointWriter(out, shard_bytes)
    for done, (f, name) in enumerate(names, 1):
        layer = name.rsplit(".", 1)[0]
        if name == EMBEDDING and embedding_bits < 16:
            quantized = _quantize_tensor(f, name, embedding_bits)
        elif name.endswith(".weight") and layer.endswith(QUANTIZED_LAYERS):
            quantized = _quantize_tensor(f, name, bits)
        else:
            quantized = None
            writer.add(name, f.tensor(name), f.dtype(name))  # as stored
        for k, v in (quantized or {}).items():
            writer.add(k, v)
        if progress:
            progress(done, len(names))
    writer.close()
    for p in src.iterdir():  # tokenizer and friends
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(p, out / p.name)
            with open(out / p.name, "rb") as copy:
                os.fsync(copy.fileno())
    config["quantization"] = {"method": "rgemma", "bits": bits, "group_size": Q4_GROUP,
                              "embedding_bits": embedding_bits}
    chat, why = chat_nature(src)  # a copy is a chat model exactly when its source is
    config[RECORD_KEY] = {"chat": chat, "source": f"{src.resolve()}: {why}"}
    write_atomic(out / "config.json", [(json.dumps(config, indent=2) + "\n").encode()])
