"""PyTorch / HF state dicts -> Flax parameter trees of :class:`tokenflow_jax.models.vit.VisionTransformer`.

All functions are pure: they take a flat ``Mapping[str, array]`` in PyTorch layout (numpy arrays, e.g. from
``safetensors.numpy.load_file``) and return nested dicts of float32 numpy arrays laid out like
``flax.linen.unbox(VisionTransformer(config).init(...)['params'])``.

Layout rules: Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; Linear [out, in] -> [in, out]; LayerNorm
weight/bias -> scale/bias; per-layer tensors are stacked along a new leading axis in layer order.

Every converter is strict. It collects, then raises one :class:`ConversionError` (a ``KeyError`` and a
``ValueError``) listing every missing key, every per-layer tensor whose shape differs from layer 0's and,
when ``config`` is given, every parameter whose shape differs from the model's. Keys under the prefix that
are not used are logged (and returned with ``return_ignored=True``).

Supported layouts:
  * :func:`clip_vision_params` - HF ``CLIPVisionModel`` / ``CLIPModel`` (``vision_model.`` optional);
  * :func:`siglip_vision_params` - HF ``SiglipVisionModel`` / ``SiglipModel``, first ``depth`` layers;
  * :func:`beit_params` - HF ``BeitModel`` (saved names ``encoder.layer.N.attention.attention.query`` or the
    transformers-5 module names ``layers.N.attention.q_proj``), fc_norm = ``pooler.layernorm``;
  * :func:`openai_clip_params` - the OpenAI CLIP visual tower (TokenFlow-B's ``encoder_vqkd.``);
  * :func:`beit_v2_params` - the BEiT-v2 ``VisionTransformer`` (TokenFlow's ``decoder_vqkd.``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import ConfigError, UserError
from tokenflow_jax.models.vit import VisionTransformer, ViTConfig
from tokenflow_jax.utils import trees

logger = logging.getLogger(__name__)

Params = dict[str, Any]
Path = tuple[str, ...]


class ConversionError(UserError, KeyError, ValueError):
    """A state dict does not fit the model; the message lists every problem."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------
# Layout transforms (PyTorch -> Flax)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """Conv2d weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
    if w.ndim != 4:
        raise ValueError(f"conv weight must be 4-D [O, I, kh, kw], got shape {w.shape}")
    return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """Linear weight [out, in] -> Dense kernel [in, out]."""
    if w.ndim != 2:
        raise ValueError(f"linear weight must be 2-D [out, in], got shape {w.shape}")
    return w.T


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _flatten_leading(a: np.ndarray) -> np.ndarray:
    """[1, 1, D] / [1, G, D] -> [D] / [G, D] (cls tokens and position tables stored with batch dims)."""
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    return a


def _rows(part: int, of: int, then: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Selects the ``part``-th of ``of`` equal row blocks (e.g. q, k, v of a fused in_proj), then ``then``."""

    def take(a: np.ndarray) -> np.ndarray:
        if a.shape[0] % of:
            raise ValueError(f"cannot split {a.shape[0]} rows into {of} equal parts")
        n = a.shape[0] // of
        return then(a[part * n : (part + 1) * n])

    return take


# ----------------------------------------------------------------------------------------------------------
# Tree checks


def _unwrapped(tree: Any) -> Any:
    tree = nn.unbox(tree)
    return tree["params"] if isinstance(tree, Mapping) and set(tree) == {"params"} else tree


def tree_mismatches(params: Any, abstract_params: Any) -> list[tuple[str, str]]:
    """(path, description) for every missing, unexpected or wrongly shaped leaf, in path order (a
    ``{'params': ...}`` wrapper on either side is looked through)."""
    return trees.shape_differences(_unwrapped(params), _unwrapped(abstract_params))


def check_tree_matches(params: Any, abstract_params: Any) -> None:
    """Raises one ValueError listing every path that is missing, unexpected or of a different shape.

    ``abstract_params`` may be boxed (``nn.Partitioned``), ``jax.ShapeDtypeStruct`` leaves or arrays, and may
    be wrapped in ``{'params': ...}``.
    """
    problems = tree_mismatches(params, abstract_params)
    if problems:
        lines = [f"  {name}: {what}" for name, what in problems]
        raise ValueError(
            f"parameter tree does not match the model ({len(problems)} problems):\n" + "\n".join(lines)
        )


def abstract_vit_params(config: ViTConfig) -> Params:
    """Unboxed ``jax.ShapeDtypeStruct`` tree of ``VisionTransformer(config)``'s params (nothing allocated)."""
    side = config.pos_grid * config.patch_size
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    abstract = jax.eval_shape(VisionTransformer(config).init, jax.random.key(0), x)
    return nn.unbox(abstract["params"])


# ----------------------------------------------------------------------------------------------------------
# The strict builder shared by every layout


class _Builder:
    """Reads keys under ``prefix``, records what is missing / used / malformed, assembles the tree."""

    def __init__(self, state_dict: Mapping[str, Any], prefix: str, what: str):
        self.sd = state_dict
        self.prefix = prefix
        self.what = what
        self.tree: Params = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.problems: list[str] = []
        self.sources: dict[Path, str] = {}
        self.unfilled: set[Path] = set()

    def _get(self, key: str) -> np.ndarray | None:
        full = self.prefix + key
        if full not in self.sd:
            if full not in self.missing:
                self.missing.append(full)
            return None
        self.used.add(full)
        return np.asarray(self.sd[full], dtype=np.float32)

    def _set(self, path: Path, value: np.ndarray) -> None:
        node = self.tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)

    def _apply(
        self, fn: Callable[[np.ndarray], np.ndarray], a: np.ndarray, full_key: str
    ) -> np.ndarray | None:
        try:
            return fn(a)
        except ValueError as e:
            self.problems.append(f"{full_key}: {e}")
            return None

    def put(self, path: str, key: str, fn: Callable[[np.ndarray], np.ndarray] = _identity) -> None:
        p = tuple(path.split("/"))
        self.sources[p] = self.prefix + key
        a = self._get(key)
        out = None if a is None else self._apply(fn, a, self.prefix + key)
        if out is None:
            self.unfilled.add(p)
        else:
            self._set(p, out)

    def put_layers(
        self, path: str, key: str, depth: int, fn: Callable[[np.ndarray], np.ndarray] = _identity
    ) -> None:
        """``key`` has a ``{i}`` placeholder; layers 0..depth-1 are converted and stacked on axis 0."""
        p = tuple(path.split("/"))
        self.sources[p] = self.prefix + key.replace("{i}", "*")
        per_layer = []
        for i in range(depth):
            full = self.prefix + key.format(i=i)
            a = self._get(key.format(i=i))
            per_layer.append(None if a is None else self._apply(fn, a, full))
        if any(a is None for a in per_layer):
            self.unfilled.add(p)
            return
        bad = [i for i, a in enumerate(per_layer) if a.shape != per_layer[0].shape]
        if bad:
            for i in bad:
                self.problems.append(
                    f"{self.prefix + key.format(i=i)}: shape (converted) {per_layer[i].shape} differs from "
                    f"layer 0's {per_layer[0].shape}"
                )
            self.unfilled.add(p)
            return
        self._set(p, np.stack(per_layer))

    def reject(self, pattern: str, reason: str) -> None:
        """Every key under the prefix matching ``pattern`` is an error (a feature the model lacks)."""
        for k in self.sd:
            if k.startswith(self.prefix) and re.search(pattern, k[len(self.prefix) :]):
                self.problems.append(f"{k}: {reason}")
                self.used.add(k)

    def finish(self, config: ViTConfig | None, return_ignored: bool):
        mismatches = []
        if config is not None:
            for name, what in tree_mismatches(self.tree, abstract_vit_params(config)):
                path = tuple(name.split("/"))
                if path in self.unfilled:  # already reported through its source key
                    continue
                source = self.sources.get(path)
                mismatches.append(f"{name}" + (f" (from {source})" if source else "") + f": {what}")
        if self.missing or self.problems or mismatches:
            parts = [f"{self.what}: the state dict does not fit (prefix {self.prefix!r})"]
            if self.missing:
                parts.append(
                    f"missing keys ({len(self.missing)}):\n" + "\n".join(f"  {k}" for k in self.missing)
                )
            if self.problems:
                parts.append(
                    f"bad tensors ({len(self.problems)}):\n" + "\n".join(f"  {p}" for p in self.problems)
                )
            if mismatches:
                parts.append(
                    f"shape mismatches against the model ({len(mismatches)}):\n"
                    + "\n".join(f"  {m}" for m in mismatches)
                )
            raise ConversionError("\n".join(parts))
        ignored = sorted(k for k in self.sd if k.startswith(self.prefix) and k not in self.used)
        if ignored:
            logger.info("%s: ignored %d keys under %r: %s", self.what, len(ignored), self.prefix, ignored)
        return (self.tree, ignored) if return_ignored else self.tree


def _resolve_prefix(state_dict: Mapping[str, Any], prefix: str, probe: str) -> str:
    """``prefix``, or ``prefix`` without its ``vision_model.`` level when only that form is present.

    transformers < 5 saves ``CLIPVisionModel`` / ``SiglipVisionModel`` weights under ``vision_model.``;
    transformers 5 drops that level (so TokenFlow state dicts differ by the saving version).
    """
    if prefix + probe in state_dict:
        return prefix
    if prefix.endswith("vision_model."):
        shorter = prefix[: -len("vision_model.")]
        if shorter + probe in state_dict:
            return shorter
    return prefix


def _num_layers(state_dict: Mapping[str, Any], layer_prefix: str) -> int:
    """1 + the largest N of keys ``{layer_prefix}N.``; 0 when there are none."""
    pattern = re.compile(re.escape(layer_prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state_dict if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _check_depth(config: ViTConfig | None, depth: int, what: str) -> None:
    if config is not None and config.depth != depth:
        raise ValueError(f"{what}: config.depth is {config.depth} but {depth} layers were asked for")


# ----------------------------------------------------------------------------------------------------------
# HF towers


def _hf_encoder_layers(b: _Builder, depth: int, layers: str) -> None:
    """CLIP / SigLIP encoder layers (identical HF naming)."""
    for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
        b.put_layers(f"blocks/{ours}/scale", f"{layers}{{i}}.{theirs}.weight", depth)
        b.put_layers(f"blocks/{ours}/bias", f"{layers}{{i}}.{theirs}.bias", depth)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        b.put_layers(
            f"blocks/attn/{proj}/kernel", f"{layers}{{i}}.self_attn.{proj}.weight", depth, linear_kernel
        )
        b.put_layers(f"blocks/attn/{proj}/bias", f"{layers}{{i}}.self_attn.{proj}.bias", depth)
    for fc in ("fc1", "fc2"):
        b.put_layers(f"blocks/mlp/{fc}/kernel", f"{layers}{{i}}.mlp.{fc}.weight", depth, linear_kernel)
        b.put_layers(f"blocks/mlp/{fc}/bias", f"{layers}{{i}}.mlp.{fc}.bias", depth)


def _layer_norm(b: _Builder, ours: str, theirs: str) -> None:
    b.put(f"{ours}/scale", f"{theirs}.weight")
    b.put(f"{ours}/bias", f"{theirs}.bias")


def clip_vision_params(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "vision_model.",
    config: ViTConfig | None = None,
    return_ignored: bool = False,
):
    """HF ``CLIPVisionModel`` / ``CLIPModel`` weights -> 'clip' flavour params.

    Args:
      state_dict: flat name -> array mapping in PyTorch layout.
      prefix: prefix of the vision tower's keys; when absent, the same prefix without its
        ``vision_model.`` level is tried (transformers 5 saves ``CLIPVisionModel`` without it).
      config: when given, the result is also checked against ``VisionTransformer(config)``'s shapes and
        only the first ``config.depth`` layers are used.
      return_ignored: also return the sorted keys under the prefix that were not used.
    """
    what = "CLIP vision tower"
    pfx = _resolve_prefix(state_dict, prefix, "embeddings.patch_embedding.weight")
    depth = config.depth if config is not None else _num_layers(state_dict, pfx + "encoder.layers.")
    b = _Builder(state_dict, pfx, what)
    b.put("patch_embed/kernel", "embeddings.patch_embedding.weight", conv_kernel)
    b.put("cls_token", "embeddings.class_embedding")
    b.put("pos_embed", "embeddings.position_embedding.weight")
    _layer_norm(b, "ln_pre", "pre_layrnorm")
    _hf_encoder_layers(b, depth, "encoder.layers.")
    _layer_norm(b, "ln_post", "post_layernorm")
    if depth == 0:
        b.missing.append(pfx + "encoder.layers.0.*")
    return b.finish(config, return_ignored)


def siglip_vision_params(
    state_dict: Mapping[str, Any],
    *,
    depth: int,
    prefix: str = "vision_model.",
    config: ViTConfig | None = None,
    return_ignored: bool = False,
):
    """HF ``SiglipVisionModel`` / ``SiglipModel`` weights -> 'siglip' flavour params of ``depth`` blocks.

    Uses layers 0..depth-1 only; later layers, ``post_layernorm`` and ``head`` are ignored (TokenFlow takes
    ``hidden_states[-2]``, i.e. depth = num_hidden_layers - 1). Other arguments as :func:`clip_vision_params`.
    """
    what = "SigLIP vision tower"
    _check_depth(config, depth, what)
    pfx = _resolve_prefix(state_dict, prefix, "embeddings.patch_embedding.weight")
    b = _Builder(state_dict, pfx, what)
    b.put("patch_embed/kernel", "embeddings.patch_embedding.weight", conv_kernel)
    b.put("patch_embed/bias", "embeddings.patch_embedding.bias")
    b.put("pos_embed", "embeddings.position_embedding.weight")
    _hf_encoder_layers(b, depth, "encoder.layers.")
    return b.finish(config, return_ignored)


def beit_params(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    config: ViTConfig | None = None,
    return_ignored: bool = False,
):
    """HF ``BeitModel`` weights (absolute positions, mean pooling, no layer scale) -> 'beit' flavour params.

    ``fc_norm`` comes from ``pooler.layernorm`` (HF's mean-pooling norm; our model applies it per patch
    token). Accepts the names ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``) and
    transformers 5's module names (``layers.N.attention.q_proj``). Relative position biases and layer scale
    (``lambda_1/2``) cannot be represented and are errors.
    """
    what = "BEiT (HF)"
    saved = _num_layers(state_dict, prefix + "encoder.layer.") > 0
    layers = "encoder.layer." if saved else "layers."
    depth = config.depth if config is not None else _num_layers(state_dict, prefix + layers)
    b = _Builder(state_dict, prefix, what)
    b.put("patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", conv_kernel)
    b.put("patch_embed/bias", "embeddings.patch_embeddings.projection.bias")
    b.put("cls_token", "embeddings.cls_token", _flatten_leading)
    b.put("pos_embed", "embeddings.position_embeddings", _flatten_leading)
    L = layers + "{i}."
    for ours, theirs in (("ln_1", "layernorm_before"), ("ln_2", "layernorm_after")):
        b.put_layers(f"blocks/{ours}/scale", f"{L}{theirs}.weight", depth)
        b.put_layers(f"blocks/{ours}/bias", f"{L}{theirs}.bias", depth)
    if saved:
        attn = {
            "q_proj": "attention.attention.query",
            "k_proj": "attention.attention.key",
            "v_proj": "attention.attention.value",
            "out_proj": "attention.output.dense",
        }
        mlp = {"fc1": "intermediate.dense", "fc2": "output.dense"}
    else:
        attn = {p: f"attention.{p}" for p in ("q_proj", "k_proj", "v_proj")} | {
            "out_proj": "attention.o_proj"
        }
        mlp = {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for ours, theirs in attn.items():
        b.put_layers(f"blocks/attn/{ours}/kernel", f"{L}{theirs}.weight", depth, linear_kernel)
        if ours != "k_proj":
            b.put_layers(f"blocks/attn/{ours}/bias", f"{L}{theirs}.bias", depth)
    for ours, theirs in mlp.items():
        b.put_layers(f"blocks/mlp/{ours}/kernel", f"{L}{theirs}.weight", depth, linear_kernel)
        b.put_layers(f"blocks/mlp/{ours}/bias", f"{L}{theirs}.bias", depth)
    _layer_norm(b, "fc_norm", "pooler.layernorm")
    b.reject(r"relative_position_bias", "relative position biases are not supported")
    b.reject(r"\.lambda_[12]$", "layer scale is not supported (needs layer_scale_init_value <= 0)")
    b.reject(r"\.key\.bias$|\.k_proj\.bias$", "the beit flavour has no key bias")
    if depth == 0:
        b.missing.append(prefix + layers + "0.*")
    return b.finish(config, return_ignored)


# ----------------------------------------------------------------------------------------------------------
# Reference (non-HF) layouts used inside TokenFlow checkpoints


def openai_clip_params(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    config: ViTConfig | None = None,
    return_ignored: bool = False,
):
    """OpenAI CLIP ``VisionTransformer`` weights (``conv1``, ``transformer.resblocks.N``) -> 'clip' params.

    TokenFlow-B stores its semantic encoder this way under ``encoder_vqkd.`` (``proj`` deleted; a ``proj``
    key, when present, is ignored). ``attn.in_proj_weight`` [3D, D] is split into q, k, v rows in order.
    """
    what = "OpenAI CLIP visual"
    depth = config.depth if config is not None else _num_layers(state_dict, prefix + "transformer.resblocks.")
    b = _Builder(state_dict, prefix, what)
    b.put("patch_embed/kernel", "conv1.weight", conv_kernel)
    b.put("cls_token", "class_embedding")
    b.put("pos_embed", "positional_embedding")
    _layer_norm(b, "ln_pre", "ln_pre")
    L = "transformer.resblocks.{i}."
    for ln in ("ln_1", "ln_2"):
        b.put_layers(f"blocks/{ln}/scale", f"{L}{ln}.weight", depth)
        b.put_layers(f"blocks/{ln}/bias", f"{L}{ln}.bias", depth)
    for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        b.put_layers(
            f"blocks/attn/{proj}/kernel", f"{L}attn.in_proj_weight", depth, _rows(part, 3, linear_kernel)
        )
        b.put_layers(f"blocks/attn/{proj}/bias", f"{L}attn.in_proj_bias", depth, _rows(part, 3, _identity))
    b.put_layers("blocks/attn/out_proj/kernel", f"{L}attn.out_proj.weight", depth, linear_kernel)
    b.put_layers("blocks/attn/out_proj/bias", f"{L}attn.out_proj.bias", depth)
    for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
        b.put_layers(f"blocks/mlp/{ours}/kernel", f"{L}mlp.{theirs}.weight", depth, linear_kernel)
        b.put_layers(f"blocks/mlp/{ours}/bias", f"{L}mlp.{theirs}.bias", depth)
    _layer_norm(b, "ln_post", "ln_post")
    if depth == 0:
        b.missing.append(prefix + "transformer.resblocks.0.*")
    return b.finish(config, return_ignored)


def beit_v2_params(
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    config: ViTConfig | None = None,
    return_ignored: bool = False,
):
    """BEiT-v2 ``VisionTransformer`` weights (``blocks.N.attn.qkv``, ``q_bias``, ``v_bias``) -> 'beit' params.

    TokenFlow's semantic decoder is stored this way under ``decoder_vqkd.``. ``attn.qkv.weight`` [3D, D] is
    split into q, k, v rows; the k bias is fixed at zero in the reference and absent here. Layer scale
    (``gamma_1/2``) and relative position biases are errors.
    """
    what = "BEiT-v2 VisionTransformer"
    depth = config.depth if config is not None else _num_layers(state_dict, prefix + "blocks.")
    b = _Builder(state_dict, prefix, what)
    b.put("patch_embed/kernel", "patch_embed.proj.weight", conv_kernel)
    b.put("patch_embed/bias", "patch_embed.proj.bias")
    b.put("cls_token", "cls_token", _flatten_leading)
    b.put("pos_embed", "pos_embed", _flatten_leading)
    L = "blocks.{i}."
    for ours, theirs in (("ln_1", "norm1"), ("ln_2", "norm2")):
        b.put_layers(f"blocks/{ours}/scale", f"{L}{theirs}.weight", depth)
        b.put_layers(f"blocks/{ours}/bias", f"{L}{theirs}.bias", depth)
    for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        b.put_layers(
            f"blocks/attn/{proj}/kernel", f"{L}attn.qkv.weight", depth, _rows(part, 3, linear_kernel)
        )
    b.put_layers("blocks/attn/q_proj/bias", f"{L}attn.q_bias", depth)
    b.put_layers("blocks/attn/v_proj/bias", f"{L}attn.v_bias", depth)
    b.put_layers("blocks/attn/out_proj/kernel", f"{L}attn.proj.weight", depth, linear_kernel)
    b.put_layers("blocks/attn/out_proj/bias", f"{L}attn.proj.bias", depth)
    for fc in ("fc1", "fc2"):
        b.put_layers(f"blocks/mlp/{fc}/kernel", f"{L}mlp.{fc}.weight", depth, linear_kernel)
        b.put_layers(f"blocks/mlp/{fc}/bias", f"{L}mlp.{fc}.bias", depth)
    _layer_norm(b, "fc_norm", "fc_norm")
    b.reject(r"relative_position", "relative position biases are not supported")
    b.reject(r"\.gamma_[12]$", "layer scale is not supported (reference uses init_values=0)")
    b.reject(r"attn\.qkv\.bias$", "a full qkv bias would give k a bias; the beit flavour has none")
    if depth == 0:
        b.missing.append(prefix + "blocks.0.*")
    return b.finish(config, return_ignored)


# ----------------------------------------------------------------------------------------------------------
# Configs

_FLAVOUR_ACTS = {"clip": ("quick_gelu",), "siglip": ("gelu_pytorch_tanh", "gelu_new"), "beit": ("gelu",)}


def vit_config_from_hf(hf_config: Any, flavour: str, depth: int | None = None) -> ViTConfig:
    """A :class:`ViTConfig` from an HF vision config (object or ``config.json`` dict).

    Accepts ``CLIPVisionConfig`` / ``SiglipVisionConfig`` / ``BeitConfig`` or a full ``CLIPConfig`` /
    ``SiglipConfig`` (its ``vision_config`` is used). ``depth`` defaults to ``num_hidden_layers``, except for
    SigLIP where it defaults to ``num_hidden_layers - 1`` (TokenFlow uses ``hidden_states[-2]``).
    Raises ValueError when the HF model uses a feature the flavour does not implement.
    """

    def get(cfg, name, default=None):
        return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)

    if flavour not in _FLAVOUR_ACTS:
        raise ConfigError(f"unknown ViT flavour {flavour!r}; expected one of {tuple(_FLAVOUR_ACTS)}")
    vision = get(hf_config, "vision_config")
    cfg = vision if vision is not None and flavour != "beit" else hf_config

    def size(name):
        v = get(cfg, name)
        if isinstance(v, (tuple, list)):
            if len(set(v)) != 1:
                raise ConversionError(f"{name} {v} is not square")
            v = v[0]
        return int(v)

    problems = []
    act = get(cfg, "hidden_act")
    if act not in _FLAVOUR_ACTS[flavour]:
        problems.append(f"hidden_act {act!r} (the {flavour} flavour uses {_FLAVOUR_ACTS[flavour][0]!r})")
    eps = get(cfg, "layer_norm_eps")
    want_eps = 1e-5 if flavour == "clip" else 1e-6
    if eps is None or not math.isclose(float(eps), want_eps, rel_tol=1e-6):
        problems.append(f"layer_norm_eps {eps} (the {flavour} flavour uses {want_eps})")
    if flavour == "beit":
        required = {
            "use_absolute_position_embeddings": True,
            "use_relative_position_bias": False,
            "use_shared_relative_position_bias": False,
            "use_mean_pooling": True,
        }
        for name, value in required.items():
            if bool(get(cfg, name, value)) != value:
                problems.append(f"{name}={get(cfg, name)} (needs {value})")
        scale = get(cfg, "layer_scale_init_value", 0.0)
        if scale is not None and float(scale) > 0:
            problems.append(f"layer_scale_init_value={scale} (layer scale unsupported; needs <= 0)")
    if problems:
        raise ConversionError(f"HF {flavour} config not expressible by VisionTransformer: " + "; ".join(problems))

    n_layers = int(get(cfg, "num_hidden_layers"))
    if depth is None:
        depth = n_layers - 1 if flavour == "siglip" else n_layers
    if not 1 <= depth <= n_layers:
        raise ConversionError(f"depth {depth} outside 1..{n_layers} (num_hidden_layers)")
    patch = size("patch_size")
    return ViTConfig(
        flavour=flavour,
        width=int(get(cfg, "hidden_size")),
        depth=depth,
        num_heads=int(get(cfg, "num_attention_heads")),
        mlp_dim=int(get(cfg, "intermediate_size")),
        patch_size=patch,
        pos_grid=size("image_size") // patch,
        in_channels=int(get(cfg, "num_channels", 3)),
    )
