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

import numpy as np

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


class WeightsNotFoundError(FileNotFoundError):
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
        from huggingface_hub import snapshot_download
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


def _weight_files(model_dir: str) -> list[str]:
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
    """(name, array) from one .safetensors or PyTorch weights file, one tensor at a time."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsNotFoundError(f"cannot read safetensors file {path!r}: {e}") from None
        return
    for name, array in torch_state_dict(path).items():
        yield name, array


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
        import torch
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
    for path in _weight_files(model_dir):
        state.update(iter_tensors(path))
    logger.info("read %d tensors from %s", len(state), model_dir)
    return state, config
