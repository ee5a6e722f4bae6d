"""One decoder that generates images (next-scale, as ``models/t2i.py``) and answers questions about them (LLaVA
style, as ``models/vlm.py``) with TokenFlow tokens: one parameter tree, one checkpoint.

Parameters, and which task reads them::

    llm              shared: the decoder, its token embeddings and LM head
    projector        generation: the running code map (40-d code vectors) -> decoder width (the t2i model's)
    level_embed      generation: scale-level embeddings [n + 1, D]
    pos_embed        generation: image-token position embeddings [N, D]
    code_head        generation, head='separate' only: the K-way image-code head
    vision_projector understanding: TokenFlow features (40-d) -> decoder width (the VLM's ``projector``)

With ``head='extended'`` the LM head carries the K ``<vq_token_i>`` rows after the text ids and ``[PAD]`` (the
released t2i model's layout), so text and image codes share one softmax and one embedding table; with
``'separate'`` the vocabulary is the text tokenizer's and image codes have their own head.

Generation is the t2i model's computation exactly (this module is a :class:`~tokenflow_jax.models.t2i.NextScaleT2I`
with one more projector, so the t2i samplers run on it unchanged); understanding is the VLM's (features
projected and spliced at the image placeholders, then the decoder; :func:`~tokenflow_jax.models.vlm.spliced_logits`
and :func:`~tokenflow_jax.models.vlm.spliced_extend` run on it as on a VLM). A unified model whose parameters
are a t2i model's (plus any ``vision_projector``) samples the same codes; one whose ``llm`` and
``vision_projector`` are a VLM's (``head='separate'``, the same vocabulary) gives the same answers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i, vlm
from tokenflow_jax.models.projector import Projector


@dataclasses.dataclass(frozen=True)
class UnifiedConfig(t2i.T2IConfig):
    """The t2i model's fields (decoder, scales, K, text prefix, head) plus the understanding inputs."""

    feature_dim: int = 40  # C of the visual features the VLM path reads (40, or 32 for 'final_semantic')
    num_image_tokens: int = 0  # T: image placeholder positions per understanding example

    def __post_init__(self):
        super().__post_init__()
        if self.feature_dim < 1 or self.num_image_tokens < 1:
            raise ConfigError(f"unified model: feature_dim and num_image_tokens must be >= 1, got "
                              f"{self.feature_dim} and {self.num_image_tokens}")

    def vlm_config(self) -> vlm.VLMConfig:
        """The understanding half as a VLM config (same decoder)."""
        return vlm.VLMConfig(llm=self.llm, feature_dim=self.feature_dim, num_image_tokens=self.num_image_tokens)


def init_args(config: UnifiedConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``UnifiedModel.init``'s inputs as shapes: the t2i model's (text ids, mask [1, P], codes [1, N, C]) and
    image features [1, T, feature_dim] for the understanding projector."""
    return (*t2i.init_args(config),
            jax.ShapeDtypeStruct((1, config.num_image_tokens, config.feature_dim), jnp.float32))


class UnifiedModel(t2i.NextScaleT2I):
    """``NextScaleT2I`` (generation entry points unchanged) + ``vision_projector`` and the VLM's ``embed``.

    * ``__call__(text_ids, text_mask, codes, features)``: image-code logits as ``NextScaleT2I.__call__`` (the
      features only create ``vision_projector`` at init; use :meth:`generation_logits` to train).
    * ``generation_logits(text_ids, text_mask, codes, full=False)``: teacher-forced image-code logits.
    * ``answer_logits(input_ids, features, mask)``: the VLM's logits [B, L, V] over a conversation.
    * ``embed(input_ids, features)``: spliced input embeddings, what ``vlm.spliced_extend`` decodes from.
    """

    config: UnifiedConfig

    def setup(self):
        super().setup()
        llm = self.config.llm
        self.vision_projector = Projector(llm.width, dtype=llm.compute_dtype, param_dtype=llm.weight_dtype)

    def __call__(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array, features: jax.Array | None = None,
                 *, full: bool = False):
        if features is not None and self.is_initializing():
            self.vision_projector(features.astype(self.config.llm.compute_dtype))
        return super().__call__(text_ids, text_mask, codes, full=full)

    def generation_logits(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array, full: bool = False):
        """Teacher-forced image-code logits [B, N, K] (or [B, N, V] with ``full``), as the t2i model's."""
        return super().__call__(text_ids, text_mask, codes, full=full)

    def embed(self, input_ids: jax.Array, features: jax.Array | None) -> jax.Array:
        """input_ids [B, L] (IMAGE_TOKEN_INDEX at image positions), features [B, T, C] or None -> [B, L, D]."""
        return vlm.splice_features(self.llm, self.vision_projector, self.config.feature_dim, input_ids, features)

    def answer_logits(self, input_ids: jax.Array, features: jax.Array | None, mask: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, L, V] of a conversation (the VLM's forward)."""
        return vlm.spliced_logits(self, input_ids, features, mask, positions)
