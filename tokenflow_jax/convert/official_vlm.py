"""The released TokenFlow understanding models <-> :class:`VLM` params (LLaVA-Qwen2.5 / LLaVA-Llama layouts).

The release (ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning, ``LlavaQwenForCausalLM``, ``model_type:
llava_qwen``; the paper's Vicuna models would be ``llava_llama``) is an HF folder of a standard pre-norm decoder
plus LLaVA's projector over the 40-d TokenFlow features (ByteFlow-AI/TokenFlow ``i2t/llava``)::

    model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight   -> llm (HF names)
    model.mm_projector.{0,2}.{weight,bias}                                            -> projector/{fc1,fc2}
    model.vision_tower.* (the frozen TokenFlow tokenizer, if saved with the model)      skipped: the image tokenizer
                                                                                       comes from
                                                                                       config.tokenizer.checkpoint

:func:`to_params` checks every key and shape before reading any tensor; :func:`to_state_dict` is its inverse.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tokenflow_jax import parallel
from tokenflow_jax.convert import llava
from tokenflow_jax.convert import llm as convert_llm
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.models import vlm

MODEL_TYPES = {"llava_qwen": "qwen2", "llava_llama": "llama", "qwen2": "qwen2", "llama": "llama"}
VISION_TOWER = r"^model\.vision_tower\."


def key_shapes(cfg: vlm.VLMConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of the model ``cfg`` describes -> its shape (a saved vision tower excluded)."""
    out = dict(convert_llm.expected_keys(cfg.llm))
    out.update(llava.projector_key_shapes(cfg.llm.width, cfg.feature_dim))
    return out


def check(tensors: Mapping[str, Any], cfg: vlm.VLMConfig, what: str) -> None:
    ignore = [VISION_TOWER] + ([r"^lm_head\.weight$"] if cfg.llm.tie_embeddings else [])
    convert_llm.check_keys(tensors, key_shapes(cfg), ignore=ignore, what=what,
                           model=f"{convert_llm.describe(cfg.llm)}, features of width {cfg.feature_dim}")


def to_params(tensors: Mapping[str, Any], cfg: vlm.VLMConfig, *, mesh=None, rules=parallel.DEFAULT_RULES,
              what: str = "official VLM checkpoint") -> dict[str, Any]:
    """Official tensors -> ``VLM(cfg)`` params in ``cfg.llm.param_dtype``; the decoder placed in its shardings
    on ``mesh`` (the projector replicated, as ``VLM`` leaves it), default: the first device."""
    check(tensors, cfg, what)
    llm_params = convert_llm.convert(tensors, cfg.llm, mesh=mesh, rules=rules,
                                     ignore=[VISION_TOWER, re.escape(llava.PROJECTOR_PREFIX)],
                                     what=what)
    dtype = np.dtype(cfg.llm.weight_dtype)
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    projector = {layer: {name: llava.place(value, replicated, dtype) for name, value in leaves.items()}
                 for layer, leaves in llava.projector_params(tensors).items()}
    return {"llm": llm_params, "projector": projector}


def vision_tower_keys(tensors: Mapping[str, Any]) -> list[str]:
    return [k for k in tensors if re.match(VISION_TOWER, k)]


def to_state_dict(params: Mapping[str, Any], cfg: vlm.VLMConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """``VLM(cfg)`` params -> the official state dict (the inverse of :func:`to_params`)."""
    state = convert_llm.to_hf(params["llm"], cfg.llm, dtype=dtype)
    projector = llava.projector_tensors(jax.device_get(params["projector"]))
    state.update({k: np.ascontiguousarray(v if dtype is None else v.astype(dtype)) for k, v in projector.items()})
    return state


def hf_config(cfg: vlm.VLMConfig, family: str, tokenizer_max_length: int) -> dict[str, Any]:
    """The official ``config.json`` fields: ``LlavaQwenForCausalLM`` (family qwen2) or ``LlavaLlamaForCausalLM``."""
    model_type, arch = ("llava_qwen", "LlavaQwenForCausalLM") if family == "qwen2" else \
        ("llava_llama", "LlavaLlamaForCausalLM")
    return convert_llm.hf_config_dict(
        cfg.llm, model_type, architectures=[arch], mm_hidden_size=cfg.feature_dim, mm_projector_type="mlp2x_gelu",
        mm_vision_vq_type="TOKENFLOW", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        tokenizer_model_max_length=tokenizer_max_length)


def family(cfg: vlm.VLMConfig) -> str:
    """qwen2 (q/k/v biases) or llama."""
    return "qwen2" if cfg.llm.qkv_bias and not cfg.llm.o_bias else "llama"


def check_hf_config(hf_config_json: Mapping[str, Any], cfg: vlm.VLMConfig, what: str) -> None:
    """ValueError listing every field of the folder's config.json that contradicts the configured model."""
    model_type = hf_config_json.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{what}: config.json has model_type {model_type!r}; expected one of "
                              f"{tuple(MODEL_TYPES)}")
    theirs = convert_llm.config_from_hf(hf_config_json)
    problems = convert_llm.architecture_differences(cfg.llm, theirs, fields=(*convert_llm.ARCHITECTURE_FIELDS,
                                                                             "vocab_size"))
    problems += llava.check_hf_fields(hf_config_json, {"mm_hidden_size": cfg.feature_dim,
                                                       "mm_projector_type": "mlp2x_gelu"})
    if problems:
        raise ConversionError(f"{what} does not have the configured model (--config and its overrides):\n  "
                              + "\n  ".join(problems))
