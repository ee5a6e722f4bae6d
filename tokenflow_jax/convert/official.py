"""Official TokenFlow checkpoints (``tokenflow_clipb_32k_enhanced.pt``, ``tokenflow_siglip_32k.pt``) <-> our variables.

The official ``TokenFlow`` PyTorch module (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``) is stored
as one flat state dict. This module maps it to
the variables of :class:`tokenflow_jax.models.tokenizer.TokenFlow` built from a ``configs/tokenizer.py`` config,
and back, bit-exactly:

  * :func:`load_official_state_dict` reads a ``.pt`` (``torch.load(weights_only=True)``, weights under ``ema``,
    then ``model``, then ``state_dict``, else the dict itself) or a ``.safetensors`` file into numpy arrays;
  * :func:`official_to_variables` -> ``{'params': ..., 'quantizer': {'quantizer': {...}}}``;
  * :func:`variables_to_official` -> the exact key set and shapes that the official
    ``TokenFlow.load_state_dict(strict=True)`` accepts; :func:`save_official` writes it (``.pt`` / ``.safetensors``);
  * :func:`official_key_shapes` lists that key set (PyTorch layout) without touching any weights.

Name mapping (ours <- official):

  pixel_encoder / pixel_decoder      encoder. / decoder.  (``conv_blocks_{i}/res_{j}`` <- ``conv_blocks.{i}.res.{j}``,
                                     ``attn_{j}``, ``mid_{j}`` likewise, ``downsample`` <- ``downsample.conv``)
  quant_conv, post_quant_conv        same names (1x1 convs)
  semantic_encoder ('clip')          encoder_vqkd. in the OpenAI CLIP layout (``conv1``, ``transformer.resblocks.N``)
  semantic_encoder ('siglip')        encoder_vqkd.vision_model. (HF SigLIP; the ``vision_model.`` level is optional)
  semantic_decoder ('beit')          decoder_vqkd. (BEiT-v2: ``blocks.N.attn.qkv`` + ``q_bias`` / ``v_bias``)
  encode/decode_task_layer/fc1, fc2  encode/decode_task_layer.0, .2
  quantizer codebook_semantic/pixel  quantize.embedding_vqkd.weight / quantize.embedding_vqgan.weight (in ``params``
                                     for codebook_update='loss', in the ``quantizer`` collection for 'ema')

Layouts: Conv2d [O, I, kh, kw] <-> [kh, kw, I, O]; Linear [out, in] <-> [in, out]; the CNN's 1x1 attention convs
[O, I, 1, 1] <-> Dense [I, O]; fused q/k/v rows (``in_proj_weight``, ``qkv.weight``) <-> q, k, v in that order;
norm weight/bias <-> scale/bias; per-layer tensors <-> our leading ``layers`` axis; BEiT ``cls_token`` [1, 1, D] and
``pos_embed`` [1, G, D] <-> [D] and [G, D]. Codebooks stay un-normalised, as stored.

Official tensors our model does not hold are accepted on import (and logged) and filled on export (with a
warning): ``quantize.codebook_used`` (a usage metric buffer, zeros), ``scaling_layer.shift/scale`` (constant input
normalisation, checked against the config's ``input_scaling``) and, for SigLIP, the layers from ``depth`` on,
``post_layernorm`` and ``head`` (TokenFlow reads ``hidden_states[-2]``; exported as zeros, which the official
forward never uses).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from tokenflow_jax import prng
from tokenflow_jax.convert import sources
from tokenflow_jax.convert.hf import ConversionError, _resolve_prefix, conv_kernel, linear_kernel, tree_mismatches
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import quantizer as quantizer_lib
from tokenflow_jax.models import tokenizer

logger = logging.getLogger(__name__)

Path = tuple[str, ...]
StateDict = dict[str, np.ndarray]

# Where training checkpoints keep the weights, in the order every official loader looks (ByteFlow-AI/TokenFlow
# ``tokenflow/tokenizer/reconstruction_vq_ddp.py``, ``i2t/llava/model/multimodal_encoder/tokenflow_vq.py``,
# ``t2i/llava_t2i/model/multimodal_encoder/tokenflow.py``).
CHECKPOINT_NESTING = ("ema", "model", "state_dict")
USAGE_BUFFER_SIZE = 131072  # quantize.codebook_used, hard-wired in the reference whatever the codebook size
CLIP_PREFIX = "encoder_vqkd."
SIGLIP_PREFIX = "encoder_vqkd.vision_model."  # transformers < 5; transformers 5 saves without ``vision_model.``
BEIT_PREFIX = "decoder_vqkd."


# ----------------------------------------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor (or one part of a fused tensor) changes between PyTorch and Flax."""

    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # from our shape


IDENTITY = Layout(lambda a: a, lambda a: a, lambda s: tuple(s))
CONV = Layout(conv_kernel, lambda k: np.transpose(k, (3, 2, 0, 1)), lambda s: (s[3], s[2], s[0], s[1]))
LINEAR = Layout(linear_kernel, lambda k: k.T, lambda s: (s[1], s[0]))
# The CNN's attention q/k/v/proj_out are 1x1 Conv2d in the reference and Dense layers here.
CONV1X1_AS_DENSE = Layout(lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None], lambda s: (s[1], s[0], 1, 1))


def _unsqueezed(n: int) -> Layout:
    """Tensors stored with ``n`` leading singleton axes (BEiT cls_token [1, 1, D], pos_embed [1, G, D])."""
    return Layout(lambda a: a.reshape(a.shape[n:]), lambda a: a.reshape((1,) * n + a.shape), lambda s: (1,) * n + s)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One official tensor (per layer when ``depth``) <-> one or more of our leaves.

    With several ``ours`` leaves the official tensor is their row-wise concatenation (fused q, k, v).
    ``ours`` paths start with the collection name (``params`` or ``quantizer``).
    """

    ours: tuple[Path, ...]
    key: str  # '{i}' stands for the layer index when depth > 0
    layout: Layout = IDENTITY
    depth: int = 0  # > 0: official tensors of layers 0..depth-1, stacked on our leading axis

    def keys(self) -> list[str]:
        return [self.key.format(i=i) for i in range(self.depth)] if self.depth else [self.key]

    def torch_shape(self, shapes: Mapping[Path, tuple[int, ...]]) -> tuple[int, ...]:
        """The official shape of each of ``keys()``, from our (abstract) shapes."""
        parts = [self.layout.torch_shape(shapes[p][1:] if self.depth else shapes[p]) for p in self.ours]
        if len(parts) == 1:
            return parts[0]
        return (sum(p[0] for p in parts),) + parts[0][1:]


def _p(path: str) -> Path:
    return tuple(path.split("/"))


def _one(ours: str | tuple[str, ...], key: str, layout: Layout = IDENTITY, depth: int = 0) -> _Rule:
    ours = (ours,) if isinstance(ours, str) else ours
    return _Rule(tuple(_p("params/" + o) for o in ours), key, layout, depth)


def _norm(ours: str, key: str, depth: int = 0) -> list[_Rule]:
    return [_one(f"{ours}/scale", f"{key}.weight", depth=depth), _one(f"{ours}/bias", f"{key}.bias", depth=depth)]


def _linear(ours: str, key: str, depth: int = 0) -> list[_Rule]:
    return [_one(f"{ours}/kernel", f"{key}.weight", LINEAR, depth), _one(f"{ours}/bias", f"{key}.bias", depth=depth)]


def _qkv(ours: str, leaf: str) -> tuple[str, ...]:
    return tuple(f"{ours}/blocks/attn/{p}/{leaf}" for p in ("q_proj", "k_proj", "v_proj"))


# ----------------------------------------------------------------------------------------------------------
# The rule tables


_CNN_ROOTS = {"pixel_encoder": "encoder", "pixel_decoder": "decoder", "quant_conv": "quant_conv",
              "post_quant_conv": "post_quant_conv"}
_CNN_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _cnn_key(path: Path) -> str:
    """('pixel_encoder', 'conv_blocks_4', 'attn_0', 'q', 'kernel') -> 'encoder.conv_blocks.4.attn.0.q.weight'."""
    parts = [_CNN_ROOTS[path[0]]]
    for name in path[1:-1]:
        m = re.fullmatch(r"(conv_blocks|res|attn|mid)_(\d+)", name)
        if m:
            parts += [m.group(1), m.group(2)]
        elif name in ("downsample", "upsample"):
            parts += [name, "conv"]
        else:
            parts.append(name)
    return ".".join(parts + [_CNN_LEAVES[path[-1]]])


def _cnn_rules(shapes: Mapping[Path, tuple[int, ...]]) -> list[_Rule]:
    """The pixel CNNs and quant convs: our names mirror the reference module names, so this is a rename."""
    rules = []
    for path, shape in shapes.items():
        if path[0] != "params" or path[1] not in _CNN_ROOTS:
            continue
        layout = IDENTITY
        if path[-1] == "kernel":
            layout = CONV if len(shape) == 4 else CONV1X1_AS_DENSE
        rules.append(_Rule((path,), _cnn_key(path[1:]), layout))
    order = list(_CNN_ROOTS)  # the reference registers encoder, decoder, quant_conv, post_quant_conv
    return sorted(rules, key=lambda r: order.index(r.ours[0][1]))


def _clip_rules(prefix: str, depth: int) -> list[_Rule]:
    """OpenAI CLIP visual tower (TokenFlow-B's encoder_vqkd, ``proj`` deleted)."""
    e, lay = "semantic_encoder", prefix + "transformer.resblocks.{i}."
    return [
        _one(f"{e}/patch_embed/kernel", prefix + "conv1.weight", CONV),
        _one(f"{e}/cls_token", prefix + "class_embedding"),
        _one(f"{e}/pos_embed", prefix + "positional_embedding"),
        *_norm(f"{e}/ln_pre", prefix + "ln_pre"),
        *_norm(f"{e}/blocks/ln_1", lay + "ln_1", depth),
        _one(_qkv(e, "kernel"), lay + "attn.in_proj_weight", LINEAR, depth),
        _one(_qkv(e, "bias"), lay + "attn.in_proj_bias", depth=depth),
        *_linear(f"{e}/blocks/attn/out_proj", lay + "attn.out_proj", depth),
        *_norm(f"{e}/blocks/ln_2", lay + "ln_2", depth),
        *_linear(f"{e}/blocks/mlp/fc1", lay + "mlp.c_fc", depth),
        *_linear(f"{e}/blocks/mlp/fc2", lay + "mlp.c_proj", depth),
        *_norm(f"{e}/ln_post", prefix + "ln_post"),
    ]


def _siglip_rules(prefix: str, depth: int) -> list[_Rule]:
    """HF SigLIP vision tower, first ``depth`` layers (TokenFlow-XL's encoder_vqkd)."""
    e, lay = "semantic_encoder", prefix + "encoder.layers.{i}."
    rules = [
        _one(f"{e}/patch_embed/kernel", prefix + "embeddings.patch_embedding.weight", CONV),
        _one(f"{e}/patch_embed/bias", prefix + "embeddings.patch_embedding.bias"),
        _one(f"{e}/pos_embed", prefix + "embeddings.position_embedding.weight"),
        *_norm(f"{e}/blocks/ln_1", lay + "layer_norm1", depth),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(f"{e}/blocks/attn/{proj}", lay + f"self_attn.{proj}", depth)
    rules += _norm(f"{e}/blocks/ln_2", lay + "layer_norm2", depth)
    rules += _linear(f"{e}/blocks/mlp/fc1", lay + "mlp.fc1", depth)
    rules += _linear(f"{e}/blocks/mlp/fc2", lay + "mlp.fc2", depth)
    return rules


def _beit_rules(prefix: str, depth: int) -> list[_Rule]:
    """BEiT-v2 VisionTransformer (decoder_vqkd): fused qkv weight, separate q/v biases, no k bias."""
    d, lay = "semantic_decoder", prefix + "blocks.{i}."
    return [
        _one(f"{d}/cls_token", prefix + "cls_token", _unsqueezed(2)),
        _one(f"{d}/pos_embed", prefix + "pos_embed", _unsqueezed(1)),
        _one(f"{d}/patch_embed/kernel", prefix + "patch_embed.proj.weight", CONV),
        _one(f"{d}/patch_embed/bias", prefix + "patch_embed.proj.bias"),
        *_norm(f"{d}/blocks/ln_1", lay + "norm1", depth),
        _one(f"{d}/blocks/attn/q_proj/bias", lay + "attn.q_bias", depth=depth),
        _one(f"{d}/blocks/attn/v_proj/bias", lay + "attn.v_bias", depth=depth),
        _one(_qkv(d, "kernel"), lay + "attn.qkv.weight", LINEAR, depth),
        *_linear(f"{d}/blocks/attn/out_proj", lay + "attn.proj", depth),
        *_norm(f"{d}/blocks/ln_2", lay + "norm2", depth),
        *_linear(f"{d}/blocks/mlp/fc1", lay + "mlp.fc1", depth),
        *_linear(f"{d}/blocks/mlp/fc2", lay + "mlp.fc2", depth),
        *_norm(f"{d}/fc_norm", prefix + "fc_norm"),
    ]


def _rules(cfg: tokenizer.TokenFlowConfig, shapes: Mapping[Path, tuple[int, ...]], siglip_prefix: str) -> list[_Rule]:
    """Every official tensor the model holds, in the reference's module order."""
    enc, dec = cfg.semantic_encoder, cfg.semantic_decoder
    if enc.flavour == "clip":
        semantic = _clip_rules(CLIP_PREFIX, enc.depth)
    elif enc.flavour == "siglip":
        semantic = _siglip_rules(siglip_prefix, enc.depth)
    else:
        raise ConfigError(f"official TokenFlow has a clip or siglip semantic encoder, not {enc.flavour!r} "
                          "(config.model.semantic_encoder.flavour)")
    if dec.flavour != "beit":
        raise ConfigError(f"official TokenFlow has a beit semantic decoder, not {dec.flavour!r} "
                          "(config.model.semantic_decoder.flavour)")
    col = "params" if cfg.quantizer.codebook_update == "loss" else "quantizer"
    return [
        *_cnn_rules(shapes),
        *semantic,
        *_beit_rules(BEIT_PREFIX, dec.depth),
        *_linear("encode_task_layer/fc1", "encode_task_layer.0"),
        *_linear("encode_task_layer/fc2", "encode_task_layer.2"),
        *_linear("decode_task_layer/fc1", "decode_task_layer.0"),
        *_linear("decode_task_layer/fc2", "decode_task_layer.2"),
        _Rule(((col, "quantizer", "codebook_semantic"),), "quantize.embedding_vqkd.weight"),
        _Rule(((col, "quantizer", "codebook_pixel"),), "quantize.embedding_vqgan.weight"),
    ]


# ----------------------------------------------------------------------------------------------------------
# Official tensors the model does not hold


def _scaling_values(cfg: tokenizer.TokenFlowConfig) -> dict[str, np.ndarray] | None:
    stats = tokenizer.INPUT_SCALINGS[cfg.input_scaling]
    if stats is None:
        return None  # clipb_224: scaling_layer = None, no buffers
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in stats)
    return {"scaling_layer.shift": mean, "scaling_layer.scale": std}


def _siglip_extra_shapes(cfg: tokenizer.TokenFlowConfig, prefix: str, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the SigLIP tensors the official module has but TokenFlow never uses (transformers 4.43 names)."""
    enc = cfg.semantic_encoder
    d, f = enc.width, enc.mlp_dim
    layer = {"layer_norm1.weight": (d,), "layer_norm1.bias": (d,), "layer_norm2.weight": (d,),
             "layer_norm2.bias": (d,), "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f),
             "mlp.fc2.bias": (d,)}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        layer |= {f"self_attn.{proj}.weight": (d, d), f"self_attn.{proj}.bias": (d,)}
    out = {}
    for i in range(enc.depth, num_layers):
        out |= {f"{prefix}encoder.layers.{i}.{k}": s for k, s in layer.items()}
    out |= {f"{prefix}post_layernorm.weight": (d,), f"{prefix}post_layernorm.bias": (d,),
            f"{prefix}head.probe": (1, 1, d), f"{prefix}head.attention.in_proj_weight": (3 * d, d),
            f"{prefix}head.attention.in_proj_bias": (3 * d,), f"{prefix}head.attention.out_proj.weight": (d, d),
            f"{prefix}head.attention.out_proj.bias": (d,), f"{prefix}head.layernorm.weight": (d,),
            f"{prefix}head.layernorm.bias": (d,), f"{prefix}head.mlp.fc1.weight": (f, d),
            f"{prefix}head.mlp.fc1.bias": (f,), f"{prefix}head.mlp.fc2.weight": (d, f),
            f"{prefix}head.mlp.fc2.bias": (d,)}
    return out


def _unused_reason(key: str, value: np.ndarray, cfg: tokenizer.TokenFlowConfig, siglip_prefix: str) -> str | None:
    """Why an official key outside the rules is fine to drop, or None when it is unexpected.

    Raises ValueError (collected by the caller) when a known buffer holds values the model would not reproduce.
    """
    if key == "quantize.codebook_used":
        return "usage metric buffer"
    scaling = _scaling_values(cfg)
    if scaling is not None and key in scaling:
        want = scaling[key]
        if value.shape != want.shape or not np.allclose(value, want, rtol=0, atol=1e-6):
            raise ValueError(
                f"{key}: holds {np.asarray(value).ravel().tolist()} but input_scaling={cfg.input_scaling!r} "
                f"normalises with {want.ravel().tolist()}"
            )
        return "constant input normalisation"
    if cfg.semantic_encoder.flavour == "siglip" and key.startswith(siglip_prefix):
        rest = key[len(siglip_prefix):]
        m = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= cfg.semantic_encoder.depth:
            return "SigLIP layer after hidden_states[-2]"
        if rest.startswith(("post_layernorm.", "head.")):
            return "SigLIP post_layernorm / head (unused)"
        if rest == "embeddings.position_ids":
            return "SigLIP position ids buffer"
    return None


# ----------------------------------------------------------------------------------------------------------
# Model shapes


def _tokenflow_config(config: Any) -> tokenizer.TokenFlowConfig:
    if isinstance(config, tokenizer.TokenFlowConfig):
        return config
    return tokenizer.tokenflow_config(config)


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg: tokenizer.TokenFlowConfig) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(tokenizer.TokenFlow(cfg).init, prng.make_key(0), x))


def abstract_variables(config: Any) -> dict[str, Any]:
    """Unboxed ``jax.ShapeDtypeStruct`` tree of the model's init (``params`` and ``quantizer`` collections)."""
    return _abstract_variables(_tokenflow_config(config))


def _shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
    return {tuple(str(k) for k in p): tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(tree).items()}


def official_key_shapes(config: Any, *, siglip_layers: int | None = None, siglip_prefix: str = SIGLIP_PREFIX,
                        include_unused: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict for ``config`` -> its PyTorch shape (nothing is allocated).

    With ``include_unused`` the tensors the model does not hold are listed too (what
    :func:`variables_to_official` fills); ``siglip_layers`` is the official SigLIP layer count (default depth + 1).
    """
    cfg = _tokenflow_config(config)
    shapes = _shapes(abstract_variables(cfg))
    out = {}
    for rule in _rules(cfg, shapes, siglip_prefix):
        shape = rule.torch_shape(shapes)
        out |= {key: shape for key in rule.keys()}
    if include_unused:
        out |= {k: v.shape for k, v in _unused_fill(cfg, siglip_layers, siglip_prefix).items()}
    return out


def _unused_fill(cfg: tokenizer.TokenFlowConfig, siglip_layers: int | None, siglip_prefix: str) -> StateDict:
    out: StateDict = {}
    if cfg.semantic_encoder.flavour == "siglip":
        n = cfg.semantic_encoder.depth + 1 if siglip_layers is None else siglip_layers
        if n < cfg.semantic_encoder.depth:
            raise ValueError(f"siglip_layers={n} is smaller than the model's SigLIP depth {cfg.semantic_encoder.depth}")
        out |= {k: np.zeros(s, np.float32) for k, s in _siglip_extra_shapes(cfg, siglip_prefix, n).items()}
    out |= _scaling_values(cfg) or {}
    out["quantize.codebook_used"] = np.zeros((USAGE_BUFFER_SIZE,), np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------
# Official -> ours


def _ours_only_state(cfg: tokenizer.TokenFlowConfig, variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """The quantizer collection's state that no official tensor carries, initialised as the model's init does."""
    q = cfg.quantizer
    state = {"code_age": np.full((q.codebook_size,), quantizer_lib.NEVER_USED, np.int32)}
    if q.codebook_update == "ema":
        books = variables["quantizer"]["quantizer"]
        count = np.ones((q.codebook_size,), np.float32)
        state |= {
            "ema_count": count,
            "ema_sum_semantic": books["codebook_semantic"] * count[:, None],
            "ema_sum_pixel": books["codebook_pixel"] * count[:, None],
        }
    return state


def _set(tree: dict, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _describe(config: Any) -> str:
    spec = config.get("config_spec") if hasattr(config, "get") else None
    return f" ({spec})" if spec else ""


def official_to_variables(state_dict: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Official TokenFlow state dict (PyTorch layout) -> our variables ``{'params': ..., 'quantizer': {...}}``.

    Args:
      state_dict: flat key -> array (numpy, or anything ``np.asarray`` takes), e.g. from
        :func:`load_official_state_dict`. SigLIP keys may carry the ``vision_model.`` level or not.
      config: a ``configs/tokenizer.py`` ConfigDict (or a ``TokenFlowConfig``); it fixes the expected shapes.
    Returns:
      float32 numpy variables (``code_age`` int32) whose tree equals ``jax.eval_shape`` of the model's init.
    Raises:
      ConversionError: one error listing every missing key, unexpected key and shape mismatch (expected vs
        found, PyTorch layout).
    """
    cfg = _tokenflow_config(config)
    abstract = abstract_variables(cfg)
    shapes = _shapes(abstract)
    siglip_prefix = _resolve_prefix(state_dict, SIGLIP_PREFIX, "embeddings.patch_embedding.weight")
    rules = _rules(cfg, shapes, siglip_prefix)

    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        shape = rule.torch_shape(shapes)
        expected |= {key: shape for key in rule.keys()}

    missing, unexpected, wrong, bad_values, ignored = [], [], [], [], {}
    arrays: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        if key not in state_dict:
            missing.append(f"  {key}: expected shape {shape}")
            continue
        a = np.asarray(state_dict[key])
        if a.shape != shape:
            wrong.append(f"  {key}: expected shape {shape}, found {a.shape}")
        else:
            arrays[key] = a.astype(np.float32, copy=False)
    absent = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    suggest = len(absent) * len(extra) <= 10_000  # difflib is quadratic; hints only help for a few renames
    for key in extra:
        value = state_dict[key]
        value = np.asarray(value)
        try:
            reason = _unused_reason(key, value, cfg, siglip_prefix)
        except ValueError as e:
            bad_values.append(f"  {e}")
            continue
        if reason is None:
            close = difflib.get_close_matches(key, absent, n=1, cutoff=0.8) if suggest else []
            hint = f" (did you mean {close[0]}?)" if close else ""
            unexpected.append(f"  {key}: found shape {value.shape}{hint}")
        else:
            ignored.setdefault(reason, []).append(key)

    if missing or unexpected or wrong or bad_values:
        n = len(missing) + len(unexpected) + len(wrong) + len(bad_values)
        parts = [f"official TokenFlow state dict does not fit the model{_describe(config)}: {n} problems"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches (PyTorch layout)", wrong), ("bad buffer values", bad_values)):
            if items:
                parts.append(f"{title} ({len(items)}):\n" + "\n".join(items))
        raise ConversionError("\n".join(parts))

    variables: dict[str, Any] = {}
    for rule in rules:
        per_key = [arrays[k] for k in rule.keys()]
        for j, path in enumerate(rule.ours):
            parts = []
            for a in per_key:
                if len(rule.ours) > 1:
                    rows = a.shape[0] // len(rule.ours)
                    a = a[j * rows:(j + 1) * rows]
                parts.append(rule.layout.to_ours(a))
            value = np.stack(parts) if rule.depth else parts[0]
            _set(variables, path, np.array(value, dtype=np.float32, order="C"))  # a copy: never alias the input
    for name, value in _ours_only_state(cfg, variables).items():
        _set(variables, ("quantizer", "quantizer", name), value)

    problems = tree_mismatches(variables, abstract)
    if problems:  # a converter bug or a model change, never a checkpoint problem
        raise ValueError(
            f"converted variables do not match the model's init ({len(problems)} problems):\n"
            + "\n".join(f"  {name}: {what}" for name, what in problems)
        )
    if ignored:
        logger.info(
            "official state dict: ignored %d tensors the model does not use: %s",
            sum(len(v) for v in ignored.values()),
            "; ".join(f"{reason}: {_summarise(keys)}" for reason, keys in ignored.items()),
        )
    return variables


def _summarise(keys: list[str], limit: int = 12) -> str:
    """Keys grouped into families (``...layers.26.*``, ``...head.*``) with counts, in first-seen order."""
    families: dict[str, int] = {}
    for key in keys:
        m = re.match(r"(.*?\.(?:layers|resblocks|blocks)\.\d+\.|.*?\.(?:head|post_layernorm)\.)", key)
        family = m.group(1) + "*" if m else key
        families[family] = families.get(family, 0) + 1
    items = [f if n == 1 else f"{f} ({n})" for f, n in families.items()]
    if len(items) > limit:
        items = items[:limit] + [f"... ({len(keys)} tensors in all)"]
    return ", ".join(items)


# ----------------------------------------------------------------------------------------------------------
# Ours -> official


def variables_to_official(
    variables: Mapping[str, Any],
    config: Any,
    *,
    siglip_layers: int | None = None,
    siglip_prefix: str = SIGLIP_PREFIX,
) -> StateDict:
    """Our variables -> the official state dict (exact keys and shapes for ``load_state_dict(strict=True)``).

    Args:
      variables: ``{'params': ..., 'quantizer': ...}`` (boxed or not; jax or numpy arrays). The ``quantizer``
        collection is only read in EMA mode, where it holds the codebooks.
      config: the model's ``configs/tokenizer.py`` ConfigDict (or ``TokenFlowConfig``).
      siglip_layers: layer count of the official SigLIP tower (default ``depth + 1``: TokenFlow reads
        ``hidden_states[-2]``; 27 for so400m). Layers from ``depth`` on are filled with zeros.
      siglip_prefix: ``encoder_vqkd.vision_model.`` (the released checkpoints, transformers < 5) or
        ``encoder_vqkd.`` (a module built with transformers 5).
    Returns:
      float32 numpy arrays by official key, in the reference's module order. Tensors the model does not hold
      (usage buffer, scaling layer, unused SigLIP parts) are filled and listed in a warning.
    """
    cfg = _tokenflow_config(config)
    if siglip_prefix not in (SIGLIP_PREFIX, CLIP_PREFIX):
        raise ValueError(f"siglip_prefix must be {SIGLIP_PREFIX!r} or {CLIP_PREFIX!r}, got {siglip_prefix!r}")
    abstract = abstract_variables(cfg)
    shapes = _shapes(abstract)
    rules = _rules(cfg, shapes, siglip_prefix)
    variables = nn.unbox(dict(variables))

    needed = {path for rule in rules for path in rule.ours}
    found = _shapes({k: variables[k] for k in ("params", "quantizer") if k in variables})
    problems = [(p, "missing") for p in sorted(needed) if p not in found]
    problems += [(p, f"expected shape {shapes[p]}, found {found[p]}") for p in sorted(needed)
                 if p in found and found[p] != shapes[p]]
    problems += [(p, f"unexpected (found shape {found[p]})") for p in sorted(found)
                 if p[0] == "params" and p not in shapes]
    if problems:
        raise ConversionError(
            f"variables do not match the model{_describe(config)} ({len(problems)} problems):\n"
            + "\n".join(f"  {'/'.join(p)}: {what}" for p, what in problems)
        )

    out: StateDict = {}
    for rule in rules:
        leaves = [np.asarray(_get(variables, path), dtype=np.float32) for path in rule.ours]
        for i, key in enumerate(rule.keys()):
            parts = [rule.layout.to_torch(leaf[i] if rule.depth else leaf) for leaf in leaves]
            out[key] = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
    filled = _unused_fill(cfg, siglip_layers, siglip_prefix)
    # Reference order: the scaling layer sits between the task layers and the quantizer.
    codebooks = {k: out.pop(k) for k in ("quantize.embedding_vqkd.weight", "quantize.embedding_vqgan.weight")}
    out |= {k: v for k, v in filled.items() if k.startswith(siglip_prefix)}
    out |= {k: v for k, v in filled.items() if k.startswith("scaling_layer.")}
    out |= {"quantize.codebook_used": filled["quantize.codebook_used"], **codebooks}
    logger.warning(
        "official state dict: filled %d tensors the model does not hold (unused by the official forward): %s",
        len(filled), _summarise(list(filled)),
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# Files


def _strip_wrapper_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    """Drops a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _torch_to_numpy(key: str, value: Any, path: str) -> np.ndarray:
    import torch  # deferred: optional, only to read the official .pt / .pth pickles

    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def _pick_state_dict(obj: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a dict with a TokenFlow state dict")
    for name in CHECKPOINT_NESTING:
        if isinstance(obj.get(name), Mapping):
            return obj[name]
    import torch  # deferred: optional, only to read the official .pt / .pth pickles

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConversionError(
        f"{path}: has none of the keys {list(CHECKPOINT_NESTING)} and is not itself a state dict "
        f"(top-level keys: {_summarise([str(k) for k in obj])})"
    )


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file through the project's one reader (floats as float32, bf16 too)."""
    try:
        return dict(sources.iter_tensors(path))
    except sources.WeightsNotFoundError as e:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_official_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads an official TokenFlow checkpoint into ``{key: numpy array}`` (bfloat16 becomes float32).

    ``.safetensors`` files are read directly; anything else goes through ``torch.load(map_location='cpu',
    weights_only=True)`` (tensors and plain containers only, never pickled code) and the state dict is taken
    from ``ema``, then ``model``, then ``state_dict``, else the dict itself. Raises FileNotFoundError, or
    ValueError naming the file when it is empty, truncated, not a checkpoint or holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise sources.WeightsNotFoundError(f"official TokenFlow checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: file is empty (0 bytes), not a checkpoint")
    if path.endswith(".safetensors"):
        return _strip_wrapper_prefix(_load_safetensors(path))

    import torch  # deferred: optional, only to read the official .pt / .pth pickles

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; the reason is the "Unsupported ..." line.
        found = re.search(r"(Unsupported (?:global: GLOBAL \S+|[^.\n]*))", str(e))
        reason = found.group(1) if found else type(e).__name__
        raise ConversionError(
            f"{path}: holds more than tensors and plain containers, so torch.load(weights_only=True) refused it "
            f"(pickled code is never loaded here; re-save the state dict with torch.save): {reason}"
        ) from e
    except Exception as e:  # RuntimeError (bad zip / truncated), EOFError, ...
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or not a torch.save file): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    sd = _pick_state_dict(obj, path)
    return _strip_wrapper_prefix({str(k): _torch_to_numpy(str(k), v, path) for k, v in sd.items()})


def save_official(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes an official state dict: ``.safetensors``, or ``.pt`` / ``.pth`` (a plain dict under ``"model"``,
    via ``torch.save``, as the official loaders expect)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):

        save_file(arrays, path)
    elif path.endswith((".pt", ".pth")):
        import torch  # deferred: optional, only to read the official .pt / .pth pickles

        torch.save({"model": {k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
                              for k, v in arrays.items()}}, path)
    else:
        raise ConfigError(f"{path}: unknown checkpoint suffix; use .pt, .pth or .safetensors")

