"""Find and load a Hugging Face RecurrentGemma checkpoint, memory-mapped in its stored dtype.

A model argument is a local directory, `demo` (the small model shipped inside the package, in
rgemma_cli/demo; the checkout's weights/demo links to it), or a
Hub repo id resolved through huggingface-hub (HF cache, HF_TOKEN, HF_HUB_OFFLINE), fetching only
the files rgemma needs. Weights stay memory-mapped in their stored dtype (a 17 GB bf16 9B must
fit in 24 GB); only the small vectors are widened to float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .config import ATTENTION, ModelConfig, read_config_json
from .errors import RgemmaError
from .files import read_regular, recover_dir
from .formats import from_stored
from .safetensors import SafetensorsFile, bf16_to_f32, write_atomic, write_safetensors
from .schema import parse_json, short

# package data: it travels with any install (editable, `pip install .`, a wheel)
DEMO_DIR = Path(__file__).resolve().parent / "demo"
NEEDED_FILES = ["config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", "model-*.safetensors", "tokenizer.model"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A copy of the tied embedding that the HF conversion wrote into the released checkpoints; read
# as the output head only when config.json says tie_word_embeddings: false.
LM_HEAD = "lm_head.weight"
IGNORED = {LM_HEAD}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# -- finding the files --------------------------------------------------------------------------

def resolve(model: str, *, tqdm_class=None) -> Path:
    """The local directory holding `model`: a directory, "demo", or a Hub repo id (downloaded)."""
    if model == "demo":
        if not (DEMO_DIR / "config.json").exists():
            raise RgemmaError(f"the demo model is missing from {DEMO_DIR}")
        return DEMO_DIR
    path = Path(model).expanduser()
    if not os.path.lexists(path):  # `rgemma quantize` killed between its renames: put it back
        recover_dir(path)
    if path.is_dir():
        return path
    if path.exists():
        raise RgemmaError(f"{model} is a file; give the model's directory (config.json + *.safetensors)")
    if not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise RgemmaError(f"model not found: {model} is neither a local directory nor a Hub repo id "
                          f"like google/recurrentgemma-2b-it")
    return _from_hub(model, tqdm_class)


def _from_hub(repo_id: str, tqdm_class=None) -> Path:
    # Imported here: huggingface_hub costs ~0.3 s to import and local models never need it.
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    licence = f"https://huggingface.co/{repo_id}"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=NEEDED_FILES, tqdm_class=tqdm_class))
    except hf.GatedRepoError:
        raise RgemmaError(f"{repo_id} is gated: accept its licence at {licence} and set HF_TOKEN "
                          f"(or run `hf auth login`); the model `demo` works offline") from None
    except hf.RepositoryNotFoundError:
        raise RgemmaError(f"unknown model {repo_id}: no such repo on the Hugging Face Hub (if it is "
                          f"private or gated, set HF_TOKEN or run `hf auth login`)") from None
    except hf.RevisionNotFoundError:
        raise RgemmaError(f"{repo_id}: revision not found on the Hub") from None
    except hf.LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise RgemmaError(f"{repo_id} is not in the local HF cache and HF_HUB_OFFLINE is set: "
                              f"run `rgemma download {repo_id}` with network access first (the model `demo` "
                              f"needs no download)") from None
        raise RgemmaError(f"cannot reach the Hugging Face Hub and {repo_id} is not in the local "
                          f"cache: check the network (the model `demo` needs none)") from None
    except hf.HfHubHTTPError as e:
        raise RgemmaError(f"{repo_id}: Hub request failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise RgemmaError(f"{repo_id}: download failed: {e}") from None


# -- reading the tensors ------------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its HF shape."""
    D, R, E, H, hd = cfg.hidden_size, cfg.lru_width, cfg.mlp_width, cfg.num_attention_heads, cfg.head_dim
    bw, kv = cfg.lru_block_width, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.final_norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, D)
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        shapes.update({
            p + "temporal_pre_norm.weight": (D,), p + "channel_pre_norm.weight": (D,),
            p + "mlp_block.gate_proj.weight": (E, D), p + "mlp_block.gate_proj.bias": (E,),
            p + "mlp_block.up_proj.weight": (E, D), p + "mlp_block.up_proj.bias": (E,),
            p + "mlp_block.down_proj.weight": (D, E), p + "mlp_block.down_proj.bias": (D,),
        })
        t = p + "temporal_block."
        if kind == ATTENTION:
            shapes.update({t + "q_proj.weight": (H * hd, D), t + "k_proj.weight": (kv, D),
                           t + "v_proj.weight": (kv, D), t + "o_proj.weight": (D, H * hd),
                           t + "o_proj.bias": (D,)})
        else:
            shapes.update({
                t + "linear_y.weight": (R, D), t + "linear_y.bias": (R,),
                t + "linear_x.weight": (R, D), t + "linear_x.bias": (R,),
                t + "linear_out.weight": (D, R), t + "linear_out.bias": (D,),
                t + "conv_1d.weight": (R, 1, cfg.conv1d_width), t + "conv_1d.bias": (R,),
                t + "rg_lru.recurrent_param": (R,),
                t + "rg_lru.input_gate_weight": (H, bw, bw), t + "rg_lru.input_gate_bias": (H, bw),
                t + "rg_lru.recurrent_gate_weight": (H, bw, bw), t + "rg_lru.recurrent_gate_bias": (H, bw),
            })
    return shapes


def open_tensors(directory: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, from the index or the single file.

    The index must be `{"weight_map": {tensor name: shard file name}}` with plain file names
    (no directories: a shard is read only from `directory`); docs/file-formats.md."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        raw = read_regular(index, "safetensors index", limit=256 * 2**20)
        doc = parse_json(raw, f"{index} is not a valid safetensors index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise RgemmaError(f"{index} is not a valid safetensors index (no weight_map object)")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not _SHARD.match(shard):
                raise RgemmaError(f"{index} is not a valid safetensors index: tensor {name!r} maps "
                                  f"to {short(shard)}, not a .safetensors file name in {directory}")
        files = {s: SafetensorsFile(directory / s) for s in sorted(set(weight_map.values()))}
        where = {}
        for name, shard in weight_map.items():
            if name not in files[shard].header:
                raise RgemmaError(f"{directory / shard}: tensor {name!r} listed in the index is missing")
            where[name] = files[shard]
        return where
    single = directory / "model.safetensors"
    if not single.exists():
        raise RgemmaError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}


FINGERPRINT_VERSION = 2
_SAMPLES, _SAMPLE_BYTES = 16, 256  # per tensor: 16 evenly spaced runs of 256 bytes (4 KiB)


def fingerprint(cfg: ModelConfig, files: dict[str, SafetensorsFile]) -> str:
    """The model's identity (v2): a SHA-256 of the config, every tensor's name, dtype and shape,
    and bytes of every tensor: all of a tensor up to 4 KiB, else 16 evenly spaced runs of 256
    bytes. A fine-tune changes every matrix, so it changes the sample; the cost is ~4 KiB read
    per tensor (~1.3 MB for a 2B), not the checkpoint's GBs. Weights that differ only outside
    the sample hash alike: the identity guards against resuming on the wrong model, not against
    an adversary crafting a collision."""
    h = hashlib.sha256(f"rgemma-fingerprint-v{FINGERPRINT_VERSION}".encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(files):
        f = files[name]
        h.update(f"{name}:{f.dtype(name)}:{f.shape(name)};".encode())
        data = f.raw_bytes(name)
        n = len(data)
        if n <= _SAMPLES * _SAMPLE_BYTES:
            h.update(data)
        else:
            step = (n - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for k in range(_SAMPLES):
                h.update(data[k * step:k * step + _SAMPLE_BYTES])
    return h.hexdigest()


def check_finite(directory: str | Path, progress=None) -> list[str]:
    """Scan every floating-point tensor of a checkpoint for NaN or Inf (`rgemma info --check`).

    Returns the names of the tensors holding any, sorted. Reads every byte once (a 2B bf16:
    ~5 GB, seconds from the page cache); int8 / 4-bit weights are checked through their
    scales. `progress(done, total)` is called after each tensor if given."""
    files = open_tensors(Path(directory))
    bad, names = [], sorted(files)
    for done, name in enumerate(names, 1):
        dtype = files[name].dtype(name)
        if dtype in ("F32", "F16", "F64", "BF16") and not _finite(files[name].tensor(name), dtype == "BF16"):
            bad.append(name)
        if progress:
            progress(done, len(names))
    return bad


def non_finite_tensors(weights: dict) -> list[str]:
    """The names of the loaded weights (arrays, or int8 / 4-bit objects: their scales) holding
    NaN or Inf, in layer order. Reads every weight once: for error paths, not the hot path."""
    bad = []
    for name, w in weights.items():
        # quantized: the integers are finite, the scales may not be; dense wrappers hold `.a`
        a = getattr(w, "scale", getattr(w, "a", w))
        if isinstance(a, np.ndarray) and a.dtype.kind in "fu" and a.dtype != np.uint8:
            if not _finite(a, a.dtype == np.uint16):
                bad.append(name)
    return bad


def _finite(a: np.ndarray, bf16: bool) -> bool:
    """No NaN / Inf in `a` (bf16 as uint16 bits: exponent all ones), in bounded blocks."""
    a = a.reshape(-1)
    for i in range(0, a.size, 1 << 22):
        block = a[i:i + (1 << 22)]
        if bf16 and np.any((block & 0x7F80) == 0x7F80) or not bf16 and not np.isfinite(block).all():
            return False
    return True


_SHARD = re.compile(r"^[^/\\\x00]+\.safetensors$")


def _check_layer_count(cfg: ModelConfig, files, directory) -> None:
    """Compare num_hidden_layers with the layers the checkpoint holds, before anything is built
    from the config (a config claiming 10^6 layers is refused at once)."""
    found = {int(m.group(1)) for m in map(_LAYER.match, files) if m}
    n = max(found) + 1 if found else 0
    if n != cfg.num_hidden_layers:
        raise RgemmaError(f"config.json in {directory} says num_hidden_layers={cfg.num_hidden_layers} "
                          f"but the checkpoint holds {n} layers")


def load_weights(directory: str | Path):
    """Read config.json and the safetensors of a model directory.

    Returns (config, weights, fingerprint): weights maps HF names to arrays; 2-D matrices stay
    memory-mapped in their stored dtype (bf16 as uint16 bits, or the int8 / 4-bit objects of
    `formats` for a quantized checkpoint), and so do bf16 RG-LRU gate blocks; small tensors
    become float32.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RgemmaError(f"model directory not found: {directory}")
    config = read_config_json(directory / "config.json")
    cfg = ModelConfig.from_dict(config)
    files = open_tensors(directory)
    _check_layer_count(cfg, files, directory)
    if cfg.tie_word_embeddings:
        files = {n: f for n, f in files.items() if n not in IGNORED}  # the copy is not read
    elif LM_HEAD not in files:
        raise RgemmaError(f"config.json in {directory} says tie_word_embeddings: false but the "
                          f"checkpoint has no {LM_HEAD}")
    tensors = {name: f.tensor(name) for name, f in files.items()}
    quantization = config.get("quantization")
    if quantization is not None:
        if not isinstance(quantization, dict):
            raise RgemmaError(f"config.json in {directory}: quantization must be an object, got "
                              f"{short(quantization)}")
        tensors = from_stored(tensors, {"quantization": quantization})

    shapes = expected_shapes(cfg)
    for problem, names in (("is missing", sorted(set(shapes) - set(tensors))),
                           ("has unexpected", sorted(set(tensors) - set(shapes)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise RgemmaError(f"checkpoint in {directory} {problem} tensor {names[0]}{more}; "
                              f"it does not match its config.json")
    weights = {}
    for name, shape in shapes.items():
        a = tensors[name]
        if tuple(a.shape) != shape:
            raise RgemmaError(f"tensor {name} has shape {list(a.shape)}, expected {list(shape)} "
                              f"from config.json")
        if isinstance(a, np.ndarray):
            dtype = files[name].dtype(name)
            if dtype not in ("F32", "BF16", "F16"):
                raise RgemmaError(f"tensor {name} has dtype {dtype}; rgemma reads F32, BF16, F16 "
                                  f"and its own int8/4-bit checkpoints")
            matrix = name.endswith(".weight") and len(shape) == 2
            gate_blocks = name.endswith("gate_weight") and dtype == "BF16"  # read per token too
            if not (matrix or gate_blocks):  # small: keep as float32
                a = bf16_to_f32(a) if dtype == "BF16" else np.array(a, dtype=np.float32)
                if not np.isfinite(a).all():  # cheap here (norms, biases); matrices: info --check
                    raise RgemmaError(f"tensor {name} in {directory} holds NaN or Inf values; "
                                      f"the checkpoint is corrupt")
        weights[name] = a
    return cfg, weights, fingerprint(cfg, files)


# -- writing ------------------------------------------------------------------------------------

class CheckpointWriter:
    """Write a checkpoint's tensors into `directory` in the Hugging Face layout: one
    `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json` (weight_map, total_size = tensor bytes).

    Tensors are added one at a time (an array, with its safetensors dtype where the NumPy one is
    ambiguous, or a `safetensors.Streamed`) and held until the current shard reaches
    `shard_bytes` (None: only `end_shard()` ends one), so at most a shard is in memory. Each
    shard is written atomically under a temporary name and renamed by `close()`, once the
    number of shards is known; `close()` also removes the shard and index files of an earlier
    checkpoint in the directory, which would otherwise be read instead of, or with, the new one.
    config.json and the side files are the caller's. Writing into an existing model directory
    is not atomic as a whole: to replace a model, write into a fresh `files.make_temp_dir` and
    swap it in with `files.replace_dir`, as `rgemma quantize` does.
    """

    def __init__(self, directory, shard_bytes: int | None = 2 << 30, metadata: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.metadata = shard_bytes, metadata or {"format": "pt"}
        self._pending, self._dtypes, self._size = {}, {}, 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor, dtype: str | None = None) -> None:
        """Queue one tensor; ends the shard when it reaches shard_bytes."""
        self._pending[name] = tensor
        if dtype is not None:
            self._dtypes[name] = dtype
        self._size += tensor.nbytes
        self.total_size += tensor.nbytes
        if self.shard_bytes is not None and self._size >= self.shard_bytes:
            self.end_shard()

    def end_shard(self) -> None:
        """Write the queued tensors as one shard (nothing if none are queued)."""
        if not self._pending:
            return
        path = self.directory / f"shard-{len(self._shards):05d}.tmp.safetensors"
        write_safetensors(path, self._pending, metadata=self.metadata, dtypes=self._dtypes)
        self._shards.append((path, sorted(self._pending)))
        self._pending, self._dtypes, self._size = {}, {}, 0

    def close(self, index_metadata: dict | None = None) -> list[str]:
        """Write the last shard, give the shards their final names, write the index (when
        sharded, with `index_metadata` beside total_size); returns the file names written."""
        self.end_shard()
        n = len(self._shards)
        names = ["model.safetensors"] if n <= 1 else [
            f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for old in self.directory.glob("model*.safetensors*"):  # an earlier checkpoint's files
            if old.name not in names:
                old.unlink()
        weight_map = {}
        for (path, keys), name in zip(self._shards, names):
            os.replace(path, self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_size, **(index_metadata or {})},
                     "weight_map": dict(sorted(weight_map.items()))}
            write_atomic(self.directory / "model.safetensors.index.json",
                         [(json.dumps(index, indent=2) + "\n").encode()])
            names.append("model.safetensors.index.json")
        return names if n else []
