"""The released TokenFlow text-to-image model (ByteFlow-AI/TokenFlow-t2i) <-> :class:`NextScaleT2I` params.

The release is an HF folder of the official ``LlavaLlamaForCausalLM`` (``model_type: llava_llama``): Llama-2-7B
whose decoder layers normalise each sub-block's output (``block_order='post_sublayer_norm'``), with QK-norm and
three additions (ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/llava_arch.py``). Keys, D = width, Dh = head dim,
n = scales, N = image tokens, C = code width (40)::

    model.embed_tokens.weight [V, D], lm_head.weight [V, D]          V = 32000 + [PAD] + K codes
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight, self_attn.{q,k,v,o}_proj.weight,
        mlp.{gate,up,down}_proj.weight, model.norm.weight            (standard HF Llama names)
    model.layers.{i}.self_attn.qknorm.{query_norm,key_norm}.weight [Dh]   -> llm/layers/self_attn/{q,k}_norm
    model.mm_projector.{0,2}.{weight,bias}                          -> projector/{fc1,fc2}
    model.lvl_embed.weight [n + 1, D]                                -> level_embed
    model.pos_1LC [N, D]                                             -> pos_embed
    image_token_start, image_token_end (0-d int buffers, optional)   checked: = V - K and V - 1

:func:`to_params` checks every key and shape first (one error lists everything missing, unexpected or
mis-shaped, before any tensor is read) and places the decoder with ``convert/llm.py`` (each device reads only
its block); :func:`to_state_dict` is its exact inverse, so a round trip reproduces the file bit for bit.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from tokenflow_jax import parallel
from tokenflow_jax.convert import llava
from tokenflow_jax.convert import llm as convert_llm
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i

MODEL_TYPES = ("llava_llama", "llama")
LEVEL_KEY, POSITION_KEY = "model.lvl_embed.weight", "model.pos_1LC"
BUFFERS = ("image_token_start", "image_token_end")
_QKNORM = re.compile(r"^(model\.layers\.\d+\.self_attn\.)qknorm\.(query|key)_norm\.weight$")
_OURS_NORM = re.compile(r"^(model\.layers\.\d+\.self_attn\.)(q|k)_norm\.weight$")


def _to_llm_names(key: str) -> str:
    """Official QK-norm names -> the names ``convert/llm.py`` reads (Qwen3's ``self_attn.q_norm``)."""
    return _QKNORM.sub(lambda m: f"{m.group(1)}{m.group(2)[0]}_norm.weight", key)


def _to_official_names(key: str) -> str:
    return _OURS_NORM.sub(lambda m: f"{m.group(1)}qknorm.{'query' if m.group(2) == 'q' else 'key'}_norm.weight",
                          key)


def key_shapes(cfg: t2i.T2IConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of the model ``cfg`` describes -> its shape (the optional buffers excluded)."""
    if not cfg.llm.qk_norm or cfg.head != "extended":
        raise ConfigError("the released t2i layout has QK-norm and the extended vocabulary head: set "
                          "config.model.llm.qk_norm=True and config.model.head=extended")
    width = cfg.llm.width
    out = {_to_official_names(k): v for k, v in convert_llm.expected_keys(cfg.llm).items()}
    out.update(llava.projector_key_shapes(width, cfg.code_dim))
    out[LEVEL_KEY] = (len(cfg.scales) + 1, width)
    out[POSITION_KEY] = (cfg.num_tokens, width)
    return out


def buffer_values(cfg: t2i.T2IConfig) -> dict[str, int]:
    """The official scalar buffers: ids of the first and last ``<vq_token_i>``."""
    return {"image_token_start": cfg.image_token_start,
            "image_token_end": cfg.image_token_start + cfg.codebook_size - 1}


def check(tensors: Mapping[str, Any], cfg: t2i.T2IConfig, what: str) -> None:
    """One ConversionError for every missing, unexpected or mis-shaped key, or a buffer of the wrong value."""
    convert_llm.check_keys(tensors, key_shapes(cfg), ignore=[f"^{b}$" for b in BUFFERS], what=what,
                           model=f"{convert_llm.describe(cfg.llm)}, {len(cfg.scales)} scales, {cfg.num_tokens} "
                                 f"image tokens, K {cfg.codebook_size}, codes of width {cfg.code_dim}")
    wrong = [f"  {name}: expected {value}, found {np.asarray(tensors[name]).reshape(-1).tolist()}"
             for name, value in buffer_values(cfg).items()
             if name in tensors and np.asarray(tensors[name]).reshape(-1).tolist() != [value]]
    if wrong:
        raise ConversionError(f"{what}: the image-code ids do not match the vocabulary layout "
                              f"([PAD] = {cfg.image_token_start - 1}, codes {cfg.image_token_start}..):\n"
                              + "\n".join(wrong))


def abstract_params(cfg: t2i.T2IConfig) -> Any:
    """Boxed ShapeDtypeStructs ``{'params': ...}`` of ``NextScaleT2I(cfg)`` (nothing allocated)."""
    return jax.eval_shape(t2i.NextScaleT2I(cfg).init, jax.random.key(0), *t2i.init_args(cfg))


def to_params(tensors: Mapping[str, Any], cfg: t2i.T2IConfig, *, mesh=None, rules=parallel.DEFAULT_RULES,
              what: str = "official t2i checkpoint") -> dict[str, Any]:
    """Official tensors (name -> array-like) -> ``NextScaleT2I(cfg)`` params, placed in their shardings on
    ``mesh`` (default: the first device) in ``cfg.llm.param_dtype``."""
    check(tensors, cfg, what)
    renamed = {_to_llm_names(k): v for k, v in tensors.items()}
    extras = [re.escape(llava.PROJECTOR_PREFIX), re.escape(LEVEL_KEY), re.escape(POSITION_KEY),
              *(f"^{b}$" for b in BUFFERS)]
    llm_params = convert_llm.convert(renamed, cfg.llm, mesh=mesh, rules=rules, ignore=extras, what=what)
    dtype = np.dtype(cfg.llm.weight_dtype)
    shardings = None
    if mesh is not None:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            shardings = parallel.shardings_from_abstract(abstract_params(cfg), mesh, rules)["params"]
    sharding = lambda *path: None if shardings is None else _get(shardings, path)  # noqa: E731
    projector = llava.projector_params(tensors)
    params = {
        "llm": llm_params,
        "projector": {layer: {name: llava.place(value, sharding("projector", layer, name), dtype)
                              for name, value in leaves.items()} for layer, leaves in projector.items()},
        "level_embed": llava.place(tensors[LEVEL_KEY], sharding("level_embed"), dtype),
        "pos_embed": llava.place(tensors[POSITION_KEY], sharding("pos_embed"), dtype),
    }
    return params


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def to_state_dict(params: Mapping[str, Any], cfg: t2i.T2IConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """``NextScaleT2I(cfg)`` params -> the official state dict (buffers included), floats cast to ``dtype``
    (default: the parameters' own). The exact inverse of :func:`to_params`."""
    cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x).astype(dtype))  # noqa: E731
    state = {_to_official_names(k): v for k, v in convert_llm.to_hf(params["llm"], cfg.llm, dtype=dtype).items()}
    params = jax.device_get({k: v for k, v in params.items() if k != "llm"})
    state.update({k: cast(v) for k, v in llava.projector_tensors(params["projector"]).items()})
    state[LEVEL_KEY] = cast(params["level_embed"])
    state[POSITION_KEY] = cast(params["pos_embed"])
    state.update({name: np.asarray(value, np.int64) for name, value in buffer_values(cfg).items()})
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def hf_config(cfg: t2i.T2IConfig, tokenizer_max_length: int = 2048) -> dict[str, Any]:
    """The official ``config.json`` fields of ``cfg`` (``LlavaLlamaForCausalLM``, as the hub config).

    ``mm_vision_tower`` (the image tokenizer's ``.pt``) is left empty: the official sampling script passes
    ``from_pretrained(..., mm_vision_tower=--tokenizer-path)``, and transformers only overrides fields that
    config.json already has (an absent one is passed on to the model's constructor, a TypeError).
    """
    return convert_llm.hf_config_dict(
        cfg.llm, "llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=cfg.code_dim,
        mm_projector_type="mlp2x_gelu", mm_use_vq_token=True, mm_vision_vq_type="TOKEN_FLOW", mm_vision_tower="",
        vq_codebook_size=cfg.codebook_size, tokenizer_model_max_length=tokenizer_max_length,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=cfg.image_token_start - 1)


def check_hf_config(hf_config_json: Mapping[str, Any], cfg: t2i.T2IConfig, what: str) -> None:
    """ValueError listing every field of the folder's config.json that contradicts the configured model."""
    model_type = hf_config_json.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{what}: config.json has model_type {model_type!r}; a released t2i model is one of "
                              f"{MODEL_TYPES}")
    theirs = convert_llm.config_from_hf(hf_config_json)
    problems = convert_llm.architecture_differences(cfg.llm, theirs, fields=(*convert_llm.ARCHITECTURE_FIELDS,
                                                                             "vocab_size"))
    problems += llava.check_hf_fields(hf_config_json, {
        "mm_hidden_size": cfg.code_dim, "vq_codebook_size": cfg.codebook_size, "mm_projector_type": "mlp2x_gelu"})
    if problems:
        raise ConversionError(f"{what} does not have the configured model (--config and its overrides):\n  "
                              + "\n  ".join(problems))
