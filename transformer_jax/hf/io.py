"""Reading and writing checkpoint files: safetensors (the default) and, only on
request, PyTorch pickles.

safetensors (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and byte range, and then the raw bytes. It holds data only, so reading it
runs no code. The header is checked here before the bytes are read, so that a
truncated download fails with a message naming the file and the missing bytes.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from transformer_jax.validation import is_int

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"

# The header size safetensors itself accepts (100 MB); more means a corrupt file.
_MAX_HEADER = 100_000_000

PICKLE_REFUSAL = """\
{path} is a PyTorch pickle, and this directory has no {safetensors}. Unpickling
runs whatever code the file names, so loading an untrusted pickle can execute
arbitrary code on this machine; it is refused by default. Convert it once, in an
environment you trust, to safetensors (data only, no code):

    python -c "import torch; from safetensors.torch import save_file; \\
sd = torch.load('{path}', map_location='cpu', weights_only=True); \\
save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, '{target}', metadata={{'format': 'pt'}})"

or, if you trust the file, pass allow_pickle=True (needs torch installed)."""


def _require_safetensors():
    try:
        import safetensors.numpy as stn
    except ImportError as err:  # pragma: no cover - the hf extra installs it
        raise ImportError("reading and writing Hugging Face checkpoints needs the `safetensors` "
                          "package: pip install 'transformer-jax[hf]' (or pip install safetensors)") from err
    return stn


def _json_type(value) -> str:
    """The JSON name of a parsed value's type ("array", not Python's "list")."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_count(value) -> bool:
    """A JSON integer >= 0 (true/false are not counts)."""
    return is_int(value) and value >= 0


def _check_entry(path: Path, name: str, entry) -> None:
    """One tensor's header entry is {"dtype": str, "shape": [int >= 0, ...],
    "data_offsets": [begin, end]} with 0 <= begin <= end; the byte ranges are
    compared with the file's size afterwards."""
    problem = None
    if not isinstance(entry, dict):
        problem = f"is a JSON {_json_type(entry)}, not an object"
    elif not isinstance(entry.get("dtype"), str):
        problem = f"has dtype={entry.get('dtype')!r}, not a dtype name such as 'F32'"
    elif not isinstance(entry.get("shape"), list) or not all(map(_is_count, entry["shape"])):
        problem = f"has shape={entry.get('shape')!r}, not a list of sizes >= 0"
    else:
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            problem = f"has data_offsets={offsets!r}, not [begin, end] with 0 <= begin <= end"
    if problem:
        raise ValueError(f"{path} is corrupt: the header entry of tensor {name!r} {problem}")


def check_safetensors_header(path: Path) -> dict:
    """Parses and validates the header ({name: {"dtype", "shape", "data_offsets"}});
    raises ValueError for a truncated or corrupt file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file: it has {size} bytes, fewer than "
                             "the 8-byte header length (truncated or empty download?)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is truncated or corrupt: its header claims {header_len} bytes "
                             f"but the file has only {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is corrupt: its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is a JSON {_json_type(header)}, not "
                         "an object mapping tensor names to their dtype, shape and data_offsets")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry)
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ValueError(f"{path} is truncated: its header describes {expected} bytes of tensors "
                         f"but the file has only {size} bytes (re-download or re-save it)")
    return header


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as {name: numpy array} in their stored
    shapes (bf16 as ml_dtypes.bfloat16)."""
    path = Path(path)
    check_safetensors_header(path)
    stn = _require_safetensors()
    try:
        return dict(stn.load_file(str(path)))
    except Exception as err:  # SafetensorError is not importable under a stable name
        raise ValueError(f"{path} could not be read as safetensors: {err}") from err


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes {name: numpy array} (any shapes, made contiguous); metadata format=pt
    so transformers loads it."""
    stn = _require_safetensors()
    stn.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


def _read_sharded(index_path: Path) -> dict[str, np.ndarray]:
    """Checkpoints split by `save_pretrained(max_shard_size=...)`: an index maps names to files."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index_path} is not a safetensors index (needs a 'weight_map'): {err}") from err
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise ValueError(f"{index_path} lists shard {shard!r} but {shard_path} does not exist")
        tensors.update(read_safetensors(shard_path))
    return tensors


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"allow_pickle=True needs torch to read {path}, and torch is not "
                          "installed: pip install torch (or convert the file to safetensors "
                          "elsewhere)") from err
    # weights_only=True still restricts what the unpickler may construct: the
    # opt-in accepts the file, not arbitrary objects inside it.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_checkpoint(directory: Path, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], Path]:
    """(tensors {HF name: numpy array}, the file read). Prefers safetensors (one
    file or an index of shards); a pickle only with opt-in."""
    for name, reader in ((SAFETENSORS, read_safetensors), (SAFETENSORS_INDEX, _read_sharded)):
        if (directory / name).exists():
            return reader(directory / name), directory / name
    pickle_path = directory / PICKLE
    if pickle_path.exists():
        if not allow_pickle:
            raise ValueError(PICKLE_REFUSAL.format(path=pickle_path, safetensors=SAFETENSORS,
                                                   target=directory / SAFETENSORS))
        return _read_pickle(pickle_path), pickle_path
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise ValueError(f"{directory} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
                     f"or {PICKLE}; found {present}")
