"""Where weights come from: a local HF model directory, a hub id, a .safetensors or a PyTorch file.

Everything returns flat ``{name: np.ndarray}`` state dicts in PyTorch layout. Safetensors files are
read tensor by tensor (memory-mapped), PyTorch files with ``torch.load(weights_only=True)``, which
never unpickles code. A hub id is resolved through ``huggingface_hub`` when the machine is online;
offline, the error names the id and says how to fetch it elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from tokenflow_jax.errors import UserError

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


class WeightsNotFoundError(UserError, FileNotFoundError):
    """No usable weights at the given path or hub id."""


def resolve_model_dir(id_or_path: str) -> str:
    """A local directory holding ``config.json`` and weights for ``id_or_path``.

    Local directories are used as they are; anything else is treated as a hub id and downloaded (or
    found in the local hub cache) with ``huggingface_hub.snapshot_download``.
    """
    path = os.path.expanduser(id_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise WeightsNotFoundError(f"{id_or_path!r} is a file; expected a model directory or a hub id")
    if id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1:
        raise WeightsNotFoundError(f"no model directory at {id_or_path!r}")
    try:
        from huggingface_hub import snapshot_download  # deferred: only hub ids reach here
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise WeightsNotFoundError(f"{id_or_path!r} looks like a hub id but huggingface_hub is missing") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(id_or_path, allow_patterns=list(WEIGHT_PATTERNS), local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "not available here"
        raise WeightsNotFoundError(
            f"cannot get {id_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). On a machine with "
            f"network access run `huggingface-cli download {id_or_path} --local-dir DIR`, copy DIR here and "
            "pass the directory instead of the id"
        ) from None


def read_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"{model_dir!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def weight_files(model_dir: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(model_dir, name) for name in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(model_dir, name)):
            return [os.path.join(model_dir, name)]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    raise WeightsNotFoundError(f"{model_dir!r} holds no model.safetensors, pytorch_model.bin or sharded index")


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) from one .safetensors or PyTorch weights file, one tensor at a time.

    Floating tensors come back as float32 from either format (bf16 / f16 checkpoints included).
    """
    if path.endswith(".safetensors"):
        for name, view in memmap_safetensors(path).items():
            # A copy (the file is unmapped once the views are dropped); floats as float32, as torch_state_dict.
            yield name, np.array(view, np.float32 if view.dtype in _FLOAT_DTYPES else view.dtype)
        return
    for name, array in torch_state_dict(path).items():
        yield name, array


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


_FLOAT_DTYPES = {np.dtype(d) for name, d in _SAFETENSORS_DTYPES.items() if name.startswith(("F", "BF"))}


def memmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Lazy read-only views of every tensor of a .safetensors file (nothing is read until sliced).

    The views keep the ``np.memmap`` alive; it is unmapped when the last of them is dropped.
    """
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        buffer = np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) > 8 + header_len else None
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(f"cannot read safetensors file {path!r}: {e}") from None
    out = {}
    available = os.path.getsize(path) - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "dtype" not in info or "data_offsets" not in info:
            raise WeightsNotFoundError(f"cannot read safetensors file {path!r}: malformed header entry {name!r}")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsNotFoundError(f"{path!r}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if end > available:
            raise WeightsNotFoundError(f"safetensors file {path!r} is truncated: tensor {name} ends at byte {end} of "
                                       f"the data, which holds {available}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if buffer is None or begin == end:
            out[name] = np.zeros(info["shape"], dtype)
            continue
        data = buffer[8 + header_len + begin : 8 + header_len + end]
        out[name] = data.view(dtype).reshape(info["shape"])
    return out


def torch_state_dict(path: str, container_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A PyTorch checkpoint as numpy, loaded with ``weights_only=True``.

    When the file holds a dict with one of ``container_keys`` (e.g. 'ema', 'model'), that entry is
    the state dict (first match wins).
    """
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"no such file: {path!r}")
    if os.path.getsize(path) == 0:
        raise WeightsNotFoundError(f"{path!r} is empty (0 bytes)")
    try:
        import torch  # deferred: optional, only .bin / .pt weights need it
    except ImportError as e:
        raise WeightsNotFoundError(f"reading {path!r} needs torch (pip install torch==2.13.0)") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise WeightsNotFoundError(f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(loaded, Mapping):
        for key in container_keys:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise WeightsNotFoundError(f"{path!r} does not hold a state dict (found {type(loaded).__name__})")
    out = {}
    for name, value in loaded.items():
        if hasattr(value, "detach"):
            out[name] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return out


def load_hf_model(id_or_path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, config.json dict) of an HF model directory or hub id."""
    model_dir = resolve_model_dir(id_or_path)
    config = read_config(model_dir)
    state = {}
    for path in weight_files(model_dir):
        state.update(iter_tensors(path))
    logger.info("read %d tensors from %s", len(state), model_dir)
    return state, config
