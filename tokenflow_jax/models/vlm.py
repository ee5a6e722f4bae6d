"""LLaVA-style understanding model on TokenFlow features (ByteFlow-AI/TokenFlow ``i2t/llava``).

    features = visual_features(tok_model, tok_vars, images, "final")     # [B, T, C], frozen tokenizer
    logits = VLM(cfg).apply({"params": p}, input_ids, features, mask)      # [B, L, V]

The frozen TokenFlow encoder turns each image into T feature vectors (``visual_features``):

* ``final`` (default, the reference's ``encode(images)[0]``): the cumulative final-grid map F, the sum
  over all scales of the upsampled unit-norm code vectors, semantic and pixel halves: T = h*w, C = 40;
* ``final_semantic``: its semantic half only (Table 8 "last scale semantic feat. only"): C = 32;
* ``all_scales``: the code vector of every scale's token (Table 8 "full scale"): T = sum s_k^2, C = 40.

A 2-layer GELU projector (``mlp2x_gelu``) maps them to the decoder's width, and they replace the text
embeddings at the placeholder positions: the data pipeline expands the ``<image>`` placeholder into T
copies of ``IMAGE_TOKEN_INDEX`` (-200, LLaVA's sentinel, never an embedding row), so the t-th such
position of a row receives feature t. Rows without an image have no placeholder and nothing is spliced.
Everything else is the shared Llama / Qwen2 decoder (``models/transformer.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.models import transformer
from tokenflow_jax.models.projector import Projector
from tokenflow_jax.ops.cross_entropy import softmax_cross_entropy

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id; data/conversation.py writes it, the model replaces it
FEATURES = ("final", "final_semantic", "all_scales")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    llm: transformer.TransformerConfig
    feature_dim: int  # C of the visual features (40, or 32 for final_semantic)
    num_image_tokens: int  # T: placeholder positions per image


def init_args(config: VLMConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``VLM.init``'s inputs as shapes: input ids [1, 8] int32 (any length builds the same parameters),
    image features [1, T, feature_dim]."""
    return (jax.ShapeDtypeStruct((1, 8), jnp.int32),
            jax.ShapeDtypeStruct((1, config.num_image_tokens, config.feature_dim), jnp.float32))


def feature_shape(tok_config, kind: str) -> tuple[int, int]:
    """(T, C) of ``visual_features`` for the tokenizer described by ``tok_config`` (a tokenizer config)."""
    if kind not in FEATURES:
        raise ConfigError(f"config.model.features={kind!r}: expected one of {FEATURES}")
    q = tok_config.quantizer
    c = int(q.semantic_dim + q.pixel_dim)
    scales = tuple(q.scales)
    if kind == "all_scales":
        return sum(s * s for s in scales), c
    return scales[-1] ** 2, int(q.semantic_dim) if kind == "final_semantic" else c


def visual_features(tok_model: tokenizer_lib.TokenFlow, tok_vars: Any, images: jax.Array, kind: str) -> jax.Array:
    """Frozen tokenizer features of images [B, H, W, 3] in [-1, 1] -> float32 [B, T, C] (no gradient)."""
    features, aux, indices = tok_model.apply(tok_vars, images, method=tokenizer_lib.TokenFlow.encode)
    b = images.shape[0]
    if kind == "all_scales":
        semantic = aux.quantizer.get("semantic_indices")  # mapping 'separate': the semantic half's own indices
        out = tok_model.apply(tok_vars, indices, semantic,
                              method=lambda m, i, s: m.quantizer.lookup(i, s))  # [B, N, C]
    else:
        out = features.reshape(b, -1, features.shape[-1])
        if kind == "final_semantic":
            out = out[..., : tok_model.config.quantizer.semantic_dim]
        elif kind != "final":
            raise ConfigError(f"config.model.features={kind!r}: expected one of {FEATURES}")
    return jax.lax.stop_gradient(out.astype(jnp.float32))


def splice_images(text_embeds: jax.Array, image_embeds: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Puts image_embeds [B, T, D] at the IMAGE_TOKEN_INDEX positions of input_ids [B, L], in order.

    text_embeds [B, L, D]. The t-th placeholder of a row (counting from its first) gets image_embeds[:, t];
    a row with more than T placeholders reuses the last (the data pipeline never writes one).
    """
    is_image = input_ids == IMAGE_TOKEN_INDEX
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)  # [B, L]
    gathered = jnp.take_along_axis(image_embeds, slot[..., None], axis=1)  # [B, L, D]
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def splice_features(llm: transformer.Transformer, projector: nn.Module, feature_dim: int, input_ids: jax.Array,
                    features: jax.Array | None) -> jax.Array:
    """Token embeddings of input_ids [B, L] with ``projector(features)`` [B, T, C] -> [B, T, D] at the
    IMAGE_TOKEN_INDEX positions (:func:`splice_images`); text only when ``features`` is None -> [B, L, D]."""
    text = llm.embed(jnp.maximum(input_ids, 0))  # the sentinel's row is never read
    if features is None:
        return text
    if features.ndim != 3 or features.shape[-1] != feature_dim:
        raise ValueError(f"features must be [B, T, {feature_dim}], got {features.shape}")
    image = projector(features.astype(llm.config.compute_dtype))
    return splice_images(text, image, input_ids)


# The understanding computations, as functions of a bound module that has ``llm`` and ``embed(input_ids,
# features)``: the VLM and the unified model (models/unified.py) run the same code. Pass them as
# ``module.apply(variables, ..., method=spliced_extend)``.

def spliced_logits(module, input_ids: jax.Array, features: jax.Array | None, mask: jax.Array | None = None,
                   positions: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, L, V]; mask [B, L] (1 = token) as in ``Transformer.__call__``."""
    return module.llm(inputs_embeds=module.embed(input_ids, features), mask=mask, positions=positions)


def spliced_logits_at(module, input_ids: jax.Array, features: jax.Array | None, mask: jax.Array,
                      positions: jax.Array, index: jax.Array) -> jax.Array:
    """Float32 logits [B, V] of position ``index`` only (the no-cache decode reference: the other positions'
    logits are never used, so under jit XLA drops their unembedding)."""
    _, hidden = module.llm(inputs_embeds=module.embed(input_ids, features), mask=mask, positions=positions,
                           return_hidden=True)
    picked = jax.lax.dynamic_index_in_dim(hidden, index, axis=1, keepdims=True)  # [B, 1, D]
    return module.llm.unembed(picked)[:, 0]


def spliced_extend(module, cache: transformer.KVCache, input_ids: jax.Array, features: jax.Array | None, *,
                   positions: jax.Array, valid: jax.Array | None = None, only_last: bool = True):
    """``Transformer.extend`` on spliced embeddings: (logits [B, 1 or L, V], cache)."""
    return module.llm.extend(cache, inputs_embeds=module.embed(input_ids, features), positions=positions,
                             valid=valid, only_last=only_last)


class VLM(nn.Module):
    """Projector + decoder. Entry points (``apply(..., method=...)``): ``__call__`` (training / full
    forward), ``embed`` (spliced input embeddings) and ``extend`` (KV-cached prefill and decode)."""

    config: VLMConfig

    def setup(self):
        llm = self.config.llm
        self.llm = transformer.Transformer(llm)
        self.projector = Projector(llm.width, dtype=llm.compute_dtype, param_dtype=llm.weight_dtype)

    def embed(self, input_ids: jax.Array, features: jax.Array | None) -> jax.Array:
        """input_ids [B, L] (IMAGE_TOKEN_INDEX at image positions), features [B, T, C] or None -> [B, L, D]."""
        return splice_features(self.llm, self.projector, self.config.feature_dim, input_ids, features)

    def __call__(self, input_ids: jax.Array, features: jax.Array | None, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, L, V]; mask [B, L] (1 = token) as in ``Transformer.__call__``."""
        return spliced_logits(self, input_ids, features, mask, positions)

    def logits_at(self, input_ids: jax.Array, features: jax.Array | None, mask: jax.Array, positions: jax.Array,
                  index: jax.Array) -> jax.Array:
        """:func:`spliced_logits_at`."""
        return spliced_logits_at(self, input_ids, features, mask, positions, index)

    def extend(self, cache: transformer.KVCache, input_ids: jax.Array, features: jax.Array | None, *,
               positions: jax.Array, valid: jax.Array | None = None, only_last: bool = True):
        """:func:`spliced_extend`."""
        return spliced_extend(self, cache, input_ids, features, positions=positions, valid=valid,
                              only_last=only_last)


def token_nll(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy: logits [B, L, V] predict labels shifted by one (HF's convention).

    Returns (nll [B, L-1] float32, weight [B, L-1] float32 = 1 where the label is trained).
    """
    targets = labels[:, 1:]
    weight = (targets != ignore_index).astype(jnp.float32)
    nll = softmax_cross_entropy(logits[:, :-1], jnp.maximum(targets, 0))
    return nll * weight, weight
