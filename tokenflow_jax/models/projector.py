"""LLaVA's ``mlp2x_gelu`` projector: TokenFlow's 40-d code features -> the decoder's width.

Both downstream models use it: the next-scale t2i model projects the running codebook map of the scales
decoded so far (ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/multimodal_encoder/vision_tokenizer.py``,
``VQTower.forward``), the understanding model the tokenizer's final-grid feature map
(``i2t/llava/model/multimodal_projector/builder.py``, ``build_vision_projector``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.models.llm_layers import Linear


class Projector(nn.Module):
    """Linear(C -> D), exact GELU, Linear(D -> D): [..., C] -> [..., D]."""

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear((self.width,), (None, "embed"), name="fc1", **kw)(x)
        h = nn.gelu(h, approximate=False)
        return Linear((self.width,), ("mlp", "embed"), name="fc2", **kw)(h)
