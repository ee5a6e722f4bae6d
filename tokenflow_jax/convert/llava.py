"""What the released TokenFlow text-to-image and understanding checkpoints share: the LLaVA folder layout.

Both are HF ``save_pretrained`` folders of a LLaVA model (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, or ``pytorch_model*.bin``, plus the text tokenizer's files): a Llama / Qwen2
decoder under the usual HF names and LLaVA's ``mlp2x_gelu`` projector
(``model.mm_projector.0`` = Linear(C -> D), GELU, ``model.mm_projector.2`` = Linear(D -> D)). This module reads
and writes such folders and converts the projector; ``official_t2i.py`` and ``official_vlm.py`` add what each
model has on top.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from tokenflow_jax.convert import llm as convert_llm
from tokenflow_jax.convert import sources

logger = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
# The tokenizer files a LLaVA folder may carry (sentencepiece Llama, HF tokenizers, Qwen BPE).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
SAFETENSORS_SHARD_BYTES = 5 * 1024**3  # HF's default max_shard_size for save_pretrained


def projector_key_shapes(width: int, feature_dim: int) -> dict[str, tuple[int, ...]]:
    """Official projector keys -> shapes (PyTorch ``nn.Linear`` weights are [out, in])."""
    p = PROJECTOR_PREFIX
    return {f"{p}0.weight": (width, feature_dim), f"{p}0.bias": (width,), f"{p}2.weight": (width, width),
            f"{p}2.bias": (width,)}


def projector_params(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Official projector tensors -> ``Projector`` params (numpy, kernels [in, out])."""
    p = PROJECTOR_PREFIX
    return {"fc1": {"kernel": np.asarray(tensors[f"{p}0.weight"]).T, "bias": np.asarray(tensors[f"{p}0.bias"])},
            "fc2": {"kernel": np.asarray(tensors[f"{p}2.weight"]).T, "bias": np.asarray(tensors[f"{p}2.bias"])}}


def projector_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``Projector`` params -> official projector tensors (the inverse of :func:`projector_params`)."""
    p = PROJECTOR_PREFIX
    return {f"{p}0.weight": np.asarray(params["fc1"]["kernel"]).T, f"{p}0.bias": np.asarray(params["fc1"]["bias"]),
            f"{p}2.weight": np.asarray(params["fc2"]["kernel"]).T, f"{p}2.bias": np.asarray(params["fc2"]["bias"])}


def place(value: Any, sharding: jax.sharding.Sharding | None, dtype: Any) -> jax.Array:
    """A small parameter read whole: cast to ``dtype`` and put in ``sharding`` (default: the first device)."""
    array = np.array(value, dtype=dtype, order="C", copy=True)  # a copy: never alias a memory map
    return jax.device_put(array, sharding if sharding is not None else jax.local_devices()[0])


def read_folder(model_dir: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(lazy tensors by name, config.json dict, weight files) of a released LLaVA folder (or hub id)."""
    model_dir = sources.resolve_model_dir(model_dir)
    hf_config = sources.read_config(model_dir)
    tensors, files = convert_llm.open_tensors(model_dir)
    return tensors, hf_config, files


def has_tokenizer(model_dir: str) -> bool:
    return os.path.isdir(model_dir) and any(
        os.path.isfile(os.path.join(model_dir, name)) for name in ("tokenizer.model", "tokenizer.json"))


def write_folder(out_dir: str, state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                 tokenizer_dir: str = "", max_shard_bytes: int = SAFETENSORS_SHARD_BYTES) -> list[str]:
    """Writes an HF folder: ``config.json``, the state dict as safetensors (shards of at most ``max_shard_bytes``
    with ``model.safetensors.index.json`` when it is larger, as ``save_pretrained``), and the tokenizer files
    of ``tokenizer_dir`` when it is a local folder. Returns the weight files written."""

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2, sort_keys=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(state[key])
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(v.nbytes for v in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return [os.path.join(out_dir, n) for n in names]


def check_hf_fields(hf_config: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``['mm_hidden_size: config 40, checkpoint 32', ...]`` for every field of ``expected`` that the folder's
    config.json sets to something else (fields it does not set are not checked)."""
    return [f"{name}: config {value!r}, checkpoint {hf_config[name]!r}" for name, value in expected.items()
            if name in hf_config and hf_config[name] != value]
