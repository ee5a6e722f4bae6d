"""HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (and Qwen3-style QK-norm) weights -> :class:`Transformer` params.

Two steps, both strict:

1. :func:`config_from_hf` turns an HF config (object or ``config.json`` dict) into a
   :class:`TransformerConfig`, refusing features the decoder does not implement (scaled RoPE, sliding
   windows, MLP biases, other activations) with the field's name.
2. :func:`convert` places every parameter directly into its target sharding with
   ``jax.make_array_from_callback``. Each callback reads only the block its device holds (HF layout ->
   ours: ``[out, in]`` linears transposed, q/k/v rows split into [heads, head_dim], per-layer tensors
   stacked on the leading ``layers`` axis), so a host reads only the slices its devices need. Before any
   data is read, the source's names and shapes are checked against what the config implies; one
   :class:`~tokenflow_jax.convert.hf.ConversionError` lists every missing key, unexpected key and shape
   mismatch (expected vs found).

:func:`load` does both for a local directory (``config.json`` + ``model.safetensors``, a sharded
``model.safetensors.index.json`` checkpoint, or ``pytorch_model.bin`` read with ``weights_only=True``) or a
hub id (``huggingface_hub.snapshot_download``; offline, the error names the id).

Safetensors files are memory-mapped (``sources.memmap_safetensors``) rather than read through
``safe_open(framework="np")``: numpy cannot represent the bfloat16 tensors every released Llama / Qwen2.5
checkpoint uses, and torch is not a dependency of this package. A slice of the memory map touches only
the pages it covers, which is what ``safe_open(...).get_slice`` would give.

Vocabulary extension (``vocab_size`` larger than the checkpoint's, e.g. the t2i model's 32,768
``<vq_token_i>`` + ``[PAD]``): old rows are copied exactly; new rows of ``embed_tokens`` and ``lm_head``
are either ``"mean"`` (default) - the mean of the old rows, as LLaVA's ``smart_tokenizer_and_embedding_resize``
that TokenFlow's training code inherits - or ``"normal"`` - N(0, 0.02) like HF's ``_init_weights``, seeded
per row so every sharding gives the same values. The mean is the better start for a head: the new tokens
begin with the logit of an average old token instead of random logits of scale ~0.02 * |h|, so the initial
loss over the new tokens is close to uniform and no new token is favoured by chance.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from tokenflow_jax import parallel
from tokenflow_jax.convert import sources
from tokenflow_jax.convert.hf import ConversionError, check_tree_matches
from tokenflow_jax.models.transformer import TransformerConfig, abstract_variables, param_count

logger = logging.getLogger(__name__)

Params = dict[str, Any]

# model_type -> family. LLaVA checkpoints (TokenFlow's t2i ``llava_llama``, i2t ``llava_qwen``) hold the same
# decoder under the same names plus ``model.mm_projector.*`` / ``model.vision_tower.*`` (pass ``ignore``).
FAMILIES = {"llama": "llama", "llava_llama": "llama", "qwen2": "qwen2", "llava_qwen": "qwen2", "qwen3": "qwen3"}
NEW_ROW_INITS = ("mean", "normal")
# Buffers some older checkpoints saved; never parameters.
ALWAYS_IGNORED = (r"\.rotary_emb\.inv_freq$",)


# ----------------------------------------------------------------------------------------------------------
# Config


def _getter(cfg: Any) -> Callable[..., Any]:
    if isinstance(cfg, Mapping):
        return lambda name, default=None: cfg.get(name, default)
    return lambda name, default=None: getattr(cfg, name, default)


def config_from_hf(hf_config: Any, **overrides: Any) -> TransformerConfig:
    """A :class:`TransformerConfig` from an HF Llama / Qwen2 / Qwen3 config (``PretrainedConfig`` or dict).

    Reads hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
    head_dim (when present), rope_theta (or ``rope_parameters['rope_theta']``), rms_norm_eps,
    tie_word_embeddings, max_position_embeddings and the attention biases (Qwen2: q/k/v; Llama:
    ``attention_bias`` = q/k/v/o). Qwen3 gets ``qk_norm`` with eps = rms_norm_eps.
    ``overrides`` replace any field afterwards (e.g. ``dtype='bfloat16'``, ``qk_norm=True``,
    ``vocab_size=...`` to extend the vocabulary).

    Raises ValueError naming the field for anything unsupported: a model_type outside :data:`FAMILIES`
    (llama, llava_llama, qwen2, llava_qwen, qwen3), rope scaling of any type (only plain RoPE), sliding-window
    attention, MLP biases, an activation other than SiLU.
    """
    get = _getter(hf_config)
    model_type = get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(f"HF config: model_type {model_type!r} is not supported; expected one of "
                              f"{tuple(FAMILIES)}")
    family = FAMILIES[model_type]
    problems = []

    act = get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} (only 'silu' is implemented)")
    rope_params = get("rope_parameters") or {}
    rope_scaling = get("rope_scaling")
    if isinstance(rope_params, Mapping) and rope_params.get("rope_type", "default") != "default":
        problems.append(
            f"rope_parameters.rope_type {rope_params['rope_type']!r} (only plain RoPE, rope_type 'default', is "
            "implemented)"
        )
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type")) if isinstance(rope_scaling, Mapping) else None
        if kind not in (None, "default"):
            problems.append(f"rope_scaling type {kind!r} (only rope_scaling=None, i.e. plain RoPE, is implemented)")
    if get("mlp_bias", False):
        problems.append("mlp_bias=True (the SwiGLU MLP has no biases)")
    if get("use_sliding_window", False):
        problems.append("use_sliding_window=True (only full attention is implemented)")
    layer_types = get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types {sorted(set(layer_types))} (only 'full_attention' is implemented)")
    if problems:
        raise ConversionError(f"HF {model_type} config not supported by Transformer: " + "; ".join(problems))

    theta = rope_params.get("rope_theta") if isinstance(rope_params, Mapping) else None
    if theta is None:
        theta = get("rope_theta", 10000.0)
    heads = int(get("num_attention_heads"))
    kv_heads = get("num_key_value_heads") or heads
    attention_bias = bool(get("attention_bias", False))
    fields = dict(
        vocab_size=int(get("vocab_size")),
        width=int(get("hidden_size")),
        depth=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(get("head_dim")) if get("head_dim") else None,
        mlp_dim=int(get("intermediate_size")),
        rope_theta=float(theta),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=attention_bias if family != "qwen2" else False,
        qk_norm=family == "qwen3",
        qk_norm_eps=float(get("rms_norm_eps", 1e-6)) if family == "qwen3" else 1e-6,
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        max_positions=int(get("max_position_embeddings", 4096)),
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(f"config_from_hf: unknown TransformerConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------------------------
# The conversion plan: one entry per parameter of ours


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one parameter comes from.

    key: HF name; ``{i}`` marks a per-layer tensor (stacked on our leading axis).
    kind: the layout change, see :func:`_read_block`.
    ours: our (per-layer) shape; theirs: the HF tensor's shape.
    """

    key: str
    kind: str
    ours: tuple[int, ...]
    theirs: tuple[int, ...]
    layered: bool = False


def _plan(config: TransformerConfig, hf_vocab_size: int, prefix: str) -> dict[tuple[str, ...], _Source]:
    """Our param path -> its source, for ``Transformer(config)`` and a checkpoint of ``hf_vocab_size`` rows."""
    d, f, dh = config.width, config.mlp_dim, config.head_dim
    h, k, v = config.num_heads, config.num_kv_heads, config.vocab_size
    layer = prefix + "layers.{i}."
    plan: dict[tuple[str, ...], _Source] = {}

    def add(path: str, key: str, kind: str, ours, theirs, layered=True):
        plan[tuple(path.split("/"))] = _Source(key, kind, tuple(ours), tuple(theirs), layered)

    add("embed_tokens/embedding", prefix + "embed_tokens.weight", "vocab_rows", (v, d), (hf_vocab_size, d), False)
    add("norm/scale", prefix + "norm.weight", "copy", (d,), (d,), False)
    if not config.tie_embeddings:
        add("lm_head/kernel", "lm_head.weight", "vocab_cols", (d, v), (hf_vocab_size, d), False)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        add(f"layers/{norm}/scale", f"{layer}{norm}.weight", "copy", (d,), (d,))
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        add(f"layers/self_attn/{name}/kernel", f"{layer}self_attn.{name}.weight", "heads_in", (d, heads, dh),
            (heads * dh, d))
        if config.qkv_bias:
            add(f"layers/self_attn/{name}/bias", f"{layer}self_attn.{name}.bias", "heads_bias", (heads, dh),
                (heads * dh,))
    add("layers/self_attn/o_proj/kernel", f"{layer}self_attn.o_proj.weight", "heads_out", (h, dh, d), (d, h * dh))
    if config.o_bias:
        add("layers/self_attn/o_proj/bias", f"{layer}self_attn.o_proj.bias", "copy", (d,), (d,))
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            add(f"layers/self_attn/{name}/scale", f"{layer}self_attn.{name}.weight", "copy", (dh,), (dh,))
    for name, ours in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
        add(f"layers/mlp/{name}/kernel", f"{layer}mlp.{name}.weight", "linear", ours, ours[::-1])
    return plan


def _expected_keys(plan: Mapping[tuple[str, ...], _Source], depth: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for src in plan.values():
        for i in range(depth) if src.layered else (None,):
            out[src.key.format(i=i) if src.layered else src.key] = src.theirs
    return out


def expected_keys(config: TransformerConfig, *, hf_vocab_size: int | None = None,
                  prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every tensor an HF checkpoint of ``Transformer(config)`` holds (``hf_vocab_size``
    rows of ``embed_tokens`` / ``lm_head``, default ``config.vocab_size``)."""
    hf_vocab_size = config.vocab_size if hf_vocab_size is None else hf_vocab_size
    return _expected_keys(_plan(config, hf_vocab_size, prefix), config.depth)


def check_keys(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, ignore: Sequence[str] = (),
               what: str, model: str) -> None:
    """One ConversionError listing every missing key, unexpected key (not matching an ``ignore`` regex) and
    shape mismatch (expected vs found) of ``tensors`` against ``expected``; nothing is read but shapes.

    ``model`` describes the target in the message's first line (e.g. the decoder's dimensions)."""
    patterns = [re.compile(p) for p in (*ALWAYS_IGNORED, *ignore)]
    missing = [k for k in expected if k not in tensors]
    unexpected = [
        f"{k} {tuple(tensors[k].shape)}"
        for k in sorted(tensors)
        if k not in expected and not any(p.search(k) for p in patterns)
    ]
    mismatched = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(tensors[k].shape)}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = [f"{what}: the checkpoint does not fit the model ({model})"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{title} ({len(items)}):\n" + "\n".join(f"  {x}" for x in items))
        raise ConversionError("\n".join(parts))


def describe(config: TransformerConfig) -> str:
    """The decoder's dimensions, for error messages."""
    return (f"vocab {config.vocab_size}, width {config.width}, depth {config.depth}, heads {config.num_heads}/"
            f"{config.num_kv_heads} x {config.head_dim}, mlp {config.mlp_dim}, qkv_bias {config.qkv_bias}, "
            f"o_bias {config.o_bias}, qk_norm {config.qk_norm}, tied {config.tie_embeddings}")


def _check_source(
    tensors: Mapping[str, Any],
    plan: Mapping[tuple[str, ...], _Source],
    config: TransformerConfig,
    ignore: Sequence[str],
    what: str,
) -> None:
    """One ConversionError listing every missing key, unexpected key and shape mismatch."""
    ignore = list(ignore)
    if config.tie_embeddings:  # some tied checkpoints also save the (identical) head
        ignore.append(r"^lm_head\.weight$")
    check_keys(tensors, _expected_keys(plan, config.depth), ignore=ignore, what=what, model=describe(config))


# Fields of TransformerConfig that an HF config.json fixes (the rest are run settings: dtype, remat, ...).
ARCHITECTURE_FIELDS = ("width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "rope_theta",
                       "norm_eps", "qkv_bias", "o_bias", "tie_embeddings")


def architecture_differences(ours: TransformerConfig, theirs: TransformerConfig, field_prefix: str = "model.llm",
                             fields: Sequence[str] = ARCHITECTURE_FIELDS) -> list[str]:
    """``['model.llm.depth: config 3, checkpoint 2', ...]`` for every architecture field that differs."""
    return [f"{field_prefix}.{f}: config {getattr(ours, f)!r}, checkpoint {getattr(theirs, f)!r}"
            for f in fields if getattr(ours, f) != getattr(theirs, f)]


# ----------------------------------------------------------------------------------------------------------
# Reading blocks


def _bounds(index: Sequence[slice], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    out = []
    for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {sl} is not supported")
        out.append((start, stop))
    return tuple(out)


class _NewRows:
    """Rows ``hf_vocab..`` of an extended vocabulary: the mean of the old rows, or seeded N(0, 0.02) rows."""

    def __init__(self, init: str, seed: int, width: int):
        self.init, self.seed, self.width = init, seed, width
        self._means: dict[tuple[str, int, int], np.ndarray] = {}

    def block(self, tensor: Any, key: str, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        (r0, r1), (c0, c1) = rows, cols
        if self.init == "mean":
            if (key, c0, c1) not in self._means:
                self._means[(key, c0, c1)] = np.asarray(tensor[:, c0:c1], np.float64).mean(axis=0)
            return np.broadcast_to(self._means[(key, c0, c1)], (r1 - r0, c1 - c0))
        salt = sum(key.encode())  # distinct rows for embed_tokens and lm_head
        return np.stack([
            0.02 * np.random.default_rng((self.seed, salt, r)).standard_normal(self.width, np.float32)[c0:c1]
            for r in range(r0, r1)
        ]).reshape(r1 - r0, c1 - c0)


def _vocab_block(tensor, key, rows, cols, new_rows: _NewRows) -> np.ndarray:
    """[rows, cols] of an HF [V_hf, D] matrix extended with new rows past V_hf."""
    hf_rows = tensor.shape[0]
    (r0, r1), (c0, c1) = rows, cols
    parts = []
    if r0 < hf_rows:
        parts.append(np.asarray(tensor[r0 : min(r1, hf_rows), c0:c1]))
    if r1 > hf_rows:
        parts.append(new_rows.block(tensor, key, (max(r0, hf_rows), r1), cols))
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _read_block(tensor: Any, src: _Source, key: str, bounds, new_rows: _NewRows) -> np.ndarray:
    """The block ``bounds`` (one (start, stop) per axis of ``src.ours``) of our layout, read from ``tensor``."""
    if src.kind == "copy":
        return np.asarray(tensor[tuple(slice(a, b) for a, b in bounds)])
    if src.kind == "linear":  # ours [in, out] = theirs [out, in].T
        (i0, i1), (o0, o1) = bounds
        return np.asarray(tensor[o0:o1, i0:i1]).T
    dh = src.ours[-1] if src.kind in ("heads_in", "heads_bias") else src.ours[1]
    if src.kind == "heads_in":  # ours [D, N, Dh] <- theirs [N * Dh, D]
        (d0, d1), (n0, n1), (e0, e1) = bounds
        block = np.asarray(tensor[n0 * dh : n1 * dh, d0:d1]).reshape(n1 - n0, dh, d1 - d0)
        return block[:, e0:e1].transpose(2, 0, 1)
    if src.kind == "heads_bias":  # ours [N, Dh] <- theirs [N * Dh]
        (n0, n1), (e0, e1) = bounds
        return np.asarray(tensor[n0 * dh : n1 * dh]).reshape(n1 - n0, dh)[:, e0:e1]
    if src.kind == "heads_out":  # ours [H, Dh, D] <- theirs [D, H * Dh]
        (n0, n1), (e0, e1), (d0, d1) = bounds
        block = np.asarray(tensor[d0:d1, n0 * dh : n1 * dh]).reshape(d1 - d0, n1 - n0, dh)
        return block[:, :, e0:e1].transpose(1, 2, 0)
    if src.kind == "vocab_rows":  # ours [V, D] <- theirs [V_hf, D]
        return _vocab_block(tensor, key, bounds[0], bounds[1], new_rows)
    if src.kind == "vocab_cols":  # ours [D, V] <- theirs [V_hf, D]
        return _vocab_block(tensor, key, bounds[1], bounds[0], new_rows).T
    raise AssertionError(f"unknown layout kind {src.kind!r}")


def _place(
    tensors: Mapping[str, Any], src: _Source, shape: tuple[int, ...], sharding: Sharding, dtype, new_rows: _NewRows
) -> jax.Array:
    """One parameter as a jax.Array in ``sharding``; each device's block read on its own."""
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # replicated blocks are read once

    def callback(index):
        bounds = _bounds(index, shape)
        if bounds not in blocks:
            if src.layered:
                (l0, l1), inner = bounds[0], bounds[1:]
                per_layer = [
                    _read_block(tensors[src.key.format(i=i)], src, src.key.format(i=i), inner, new_rows)
                    for i in range(l0, l1)
                ]
                block = np.stack(per_layer)
            else:
                block = _read_block(tensors[src.key], src, src.key, bounds, new_rows)
            # A copy: the block may be a view of a memory map, which jax could otherwise alias on CPU.
            blocks[bounds] = np.array(block, dtype=dtype, order="C", copy=True)
        return blocks[bounds]

    return jax.make_array_from_callback(shape, sharding, callback)


def convert(
    tensors: Mapping[str, Any],
    config: TransformerConfig,
    *,
    hf_vocab_size: int | None = None,
    mesh: Mesh | None = None,
    rules=parallel.DEFAULT_RULES,
    prefix: str = "model.",
    ignore: Sequence[str] = (),
    new_rows: str = "mean",
    seed: int = 0,
    what: str = "HF decoder",
) -> Params:
    """HF tensors (name -> array-like with ``.shape`` and slicing) -> unboxed params of ``Transformer(config)``.

    Args:
      tensors: HF state dict, e.g. numpy arrays or the lazy memory-mapped arrays of :func:`open_tensors`.
      config: the target config; its dtype for parameters is ``config.param_dtype``.
      hf_vocab_size: rows of the checkpoint's ``embed_tokens`` / ``lm_head`` (default: ``config.vocab_size``).
        Smaller than ``config.vocab_size`` extends the vocabulary with ``new_rows`` ('mean' or 'normal').
      mesh, rules: place every parameter in the sharding ``parallel.shardings_from_abstract`` derives for
        ``Transformer(config)``; without a mesh everything goes to the first local device.
      prefix: prefix of the decoder's keys (``model.`` for ``*ForCausalLM``); ``lm_head.weight`` has none.
      ignore: regexes of keys that belong to something else (e.g. ``r'^model\\.mm_projector\\.'``).
      seed: seed of the 'normal' new rows.
    Returns:
      nested dict of jax.Arrays (``{'params': ...}`` content) in ``config.param_dtype``.
    Raises:
      ConversionError listing every missing / unexpected key and every shape mismatch (expected vs found).
    """
    hf_vocab_size = config.vocab_size if hf_vocab_size is None else hf_vocab_size
    if new_rows not in NEW_ROW_INITS:
        raise ValueError(f"new_rows must be one of {NEW_ROW_INITS}, got {new_rows!r}")
    if hf_vocab_size > config.vocab_size:
        raise ConversionError(
            f"{what}: config.vocab_size {config.vocab_size} is smaller than the checkpoint's {hf_vocab_size} rows "
            "(the vocabulary can be extended, not shrunk)"
        )
    plan = _plan(config, hf_vocab_size, prefix)
    _check_source(tensors, plan, config, ignore, what)

    abstract = abstract_variables(config)
    unboxed = parallel.unbox_without_constraints(abstract)["params"]
    # The plan and the model must agree leaf for leaf (catches a model change the converter did not follow).
    plan_shapes = traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(((config.depth,) if s.layered else ()) + s.ours, np.float32) for p, s in plan.items()
    })
    check_tree_matches(plan_shapes, unboxed)
    if mesh is not None:
        shardings = parallel.shardings_from_abstract(abstract, mesh, rules)["params"]
    else:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), unboxed)

    dtype = np.dtype(config.weight_dtype)
    extra = _NewRows(new_rows, seed, config.width)
    flat_abstract = traverse_util.flatten_dict(unboxed)
    flat_shardings = traverse_util.flatten_dict(shardings)
    flat = {
        path: _place(tensors, plan[path], leaf.shape, flat_shardings[path], dtype, extra)
        for path, leaf in flat_abstract.items()
    }
    return traverse_util.unflatten_dict(flat)


def _to_hf_layout(ours: np.ndarray, kind: str) -> np.ndarray:
    """One (per-layer) parameter of ours -> the HF tensor (the inverse of :func:`_read_block`)."""
    if kind in ("copy", "vocab_rows"):
        return ours
    if kind in ("linear", "vocab_cols"):  # ours [in, out] -> theirs [out, in]
        return ours.T
    if kind == "heads_in":  # ours [D, N, Dh] -> theirs [N * Dh, D]
        return ours.reshape(ours.shape[0], -1).T
    if kind == "heads_bias":  # ours [N, Dh] -> theirs [N * Dh]
        return ours.reshape(-1)
    if kind == "heads_out":  # ours [H, Dh, D] -> theirs [D, H * Dh]
        return ours.reshape(-1, ours.shape[-1]).T
    raise AssertionError(f"unknown layout kind {kind!r}")


def to_hf(params: Params, config: TransformerConfig, *, prefix: str = "model.", dtype: Any = None
          ) -> dict[str, np.ndarray]:
    """Params of ``Transformer(config)`` -> an HF Llama / Qwen2 state dict (``{key: numpy array}``, C order).

    The exact inverse of :func:`convert` (no vocabulary change): ``convert(to_hf(p), config)`` == p bit for bit.
    ``dtype`` casts floating tensors (e.g. ``ml_dtypes.bfloat16``); default: the parameters' own dtype.
    """
    plan = _plan(config, config.vocab_size, prefix)
    flat = traverse_util.flatten_dict(params)
    check_tree_matches(traverse_util.unflatten_dict({p: flat[p] for p in plan if p in flat}),
                       traverse_util.unflatten_dict({
                           p: jax.ShapeDtypeStruct(((config.depth,) if s.layered else ()) + s.ours, np.float32)
                           for p, s in plan.items()}))
    out: dict[str, np.ndarray] = {}
    for path, src in plan.items():
        value = np.asarray(jax.device_get(flat[path]))
        if dtype is not None:
            value = value.astype(dtype)
        if src.layered:
            for i in range(config.depth):
                out[src.key.format(i=i)] = np.ascontiguousarray(_to_hf_layout(value[i], src.kind))
        else:
            out[src.key] = np.ascontiguousarray(_to_hf_layout(value, src.kind))
    return out


def hf_config_dict(config: TransformerConfig, model_type: str, **extra: Any) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``config`` (the inverse of :func:`config_from_hf`) plus ``extra`` fields."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"hf_config_dict: model_type {model_type!r} is not one of {tuple(FAMILIES)}")
    out = dict(
        model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.width,
        num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, intermediate_size=config.mlp_dim,
        hidden_act="silu", rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, max_position_embeddings=config.max_positions,
        rope_scaling=None,
    )
    if family == "llama":
        out["attention_bias"] = config.o_bias
        out["mlp_bias"] = False
    out.update(extra)
    return out


# ----------------------------------------------------------------------------------------------------------
# Files

def open_tensors(model_dir: str) -> tuple[dict[str, Any], list[str]]:
    """(name -> lazy array, files) for every weight file of an HF model directory.

    Safetensors files are memory-mapped (read on slicing); ``pytorch_model*.bin`` files are loaded whole
    with ``torch.load(weights_only=True)`` (floating tensors as float32).
    """
    files = sources.weight_files(model_dir)
    tensors: dict[str, Any] = {}
    for path in files:
        found = sources.memmap_safetensors(path) if path.endswith(".safetensors") else sources.torch_state_dict(path)
        duplicated = set(found) & set(tensors)
        if duplicated:
            raise ConversionError(f"{model_dir}: tensors stored twice (e.g. in {path!r}): {sorted(duplicated)}")
        tensors.update(found)
    return tensors, files


def load(
    id_or_path: str,
    *,
    mesh: Mesh | None = None,
    rules=parallel.DEFAULT_RULES,
    vocab_size: int | None = None,
    new_rows: str = "mean",
    seed: int = 0,
    prefix: str = "model.",
    ignore: Sequence[str] = (),
    key_map: Callable[[str], str | None] | None = None,
    **config_overrides: Any,
) -> tuple[TransformerConfig, Params]:
    """Reads an HF Llama / Qwen2 / Qwen3 checkpoint into ``(config, params)``.

    Args:
      id_or_path: a local model directory (config.json + weights) or a hub id.
      mesh, rules: target sharding (see :func:`convert`); each device's block is read on its own.
      vocab_size: extend the vocabulary to this many rows (new rows: ``new_rows``, see the module docstring).
      prefix, ignore, seed: as in :func:`convert`.
      key_map: renames checkpoint keys before matching (return None to drop one), e.g. TokenFlow-t2i's
        ``self_attn.qknorm.query_norm`` -> ``self_attn.q_norm``.
      config_overrides: TransformerConfig fields, e.g. ``param_dtype='bfloat16'``, ``dtype='bfloat16'``,
        ``qk_norm=True``, ``remat='full'``.
    Returns:
      (config, params) with params a nested dict of jax.Arrays for ``{'params': params}``.
    """
    start = time.perf_counter()
    model_dir = sources.resolve_model_dir(id_or_path)
    hf_config = sources.read_config(model_dir)
    hf_vocab = int(hf_config["vocab_size"])
    if vocab_size is not None:
        config_overrides["vocab_size"] = vocab_size
    config = config_from_hf(hf_config, **config_overrides)
    tensors, files = open_tensors(model_dir)
    if key_map is not None:
        tensors = {new: v for k, v in tensors.items() if (new := key_map(k)) is not None}
    params = convert(
        tensors, config, hf_vocab_size=hf_vocab, mesh=mesh, rules=rules, prefix=prefix, ignore=ignore,
        new_rows=new_rows, seed=seed, what=f"{hf_config.get('model_type')} checkpoint {model_dir}",
    )
    jax.block_until_ready(params)
    count = param_count(params)
    logger.info(
        "loaded %s from %s (%d file%s): %s parameters (%.1f M, %.2f GB), %s, vocab %d%s, mesh %s, %.1f s",
        hf_config.get("model_type"), id_or_path, len(files), "" if len(files) == 1 else "s", f"{count:,}",
        count / 1e6, num_bytes(params) / 1e9, config.param_dtype, hf_vocab,
        f" -> {config.vocab_size} (new rows: {new_rows})" if config.vocab_size != hf_vocab else "",
        dict(mesh.shape) if mesh is not None else "none", time.perf_counter() - start,
    )
    return config, params


def num_bytes(params: Params) -> int:
    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
