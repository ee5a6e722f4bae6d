"""Numerics and small modules of the Llama-family decoder, each matching HF ``modeling_llama`` exactly.

RMSNorm in float32 (``x * rsqrt(mean(x^2) + eps)``, cast back to the input dtype, times the weight);
rotate-half RoPE with ``inv_freq = 1 / theta^(arange(0, d, 2) / d)`` in float32; grouped-query softmax
attention with float32 logits and softmax; masks and HF's position ids for left-padded batches.

Masks: ``True`` / 0 = attend. Boolean masks set masked logits to ``MASK_VALUE``; float masks are additive
(0 / ``finfo.min``, as HF's 4-D masks) and the biased logits are clamped at ``finfo(float32).min``, so a
fully masked row (a left-padding query) stays finite instead of producing NaNs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.models import layers

MASK_VALUE = float(np.finfo(np.float32).min)




def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any = None) -> jax.Array:
    """HF ``LlamaRMSNorm``: ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``; x [..., N], weight [N]."""
    dtype = x.dtype if dtype is None else dtype
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * normed.astype(x.dtype).astype(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """[head_dim // 2] float32: ``1 / theta^(arange(0, d, 2) / d)`` computed in float32 like HF."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] (int) -> cos, sin [B, L, head_dim] float32 (frequencies repeated twice, as HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(head_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, N, Dh]; cos, sin [B, L, Dh] (cast to x's dtype first, as HF) -> [B, L, N, Dh]."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query softmax attention with float32 logits and softmax (HF eager attention).

    Args:
      q: [B, Lq, H, Dh]; k, v: [B, Lk, K, Dh] with H % K == 0 (query head h uses kv head h // (H / K)).
      bias: a boolean mask (True = attend) or a float32 additive bias (0 = attend, ``MASK_VALUE`` = masked),
        [B or 1, H or 1, Lq, Lk] (:func:`mask_to_bias`).
    Returns:
      [B, Lq, H, Dh] in v's dtype.

    Layout: q, k and v are transposed to [B, K, (G *) L, Dh] first, so both matmuls produce and consume the
    scores [B, K, G * Lq, Lk] in their natural order; written on [B, L, K, G, Dh] directly, XLA transposes the
    score tensor, G * Lq * Lk per kv head and much larger than q, k or v, in the forward and the backward pass.
    A boolean mask selects ``MASK_VALUE`` where the bias would add it (the same logits: ``x + MASK_VALUE``
    rounds to ``MASK_VALUE`` for any |x| far below its ulp), and its gradient needs only the mask, where
    ``maximum(x + bias, MASK_VALUE)`` keeps the biased logits of every layer for the backward pass.
    """
    b, lq, h, dh = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    lk = k.shape[1]
    # [B, K, G * Lq, Dh]: one query axis, so the backward products dK = dS^T Q and dV = W^T dO contract a single
    # axis (XLA transposes the score-sized operand of a dot that contracts two).
    q = q.reshape(b, lq, kv_heads, groups, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * lq, dh)
    k = k.transpose(0, 2, 1, 3)  # [B, K, Lk, Dh]
    v = v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (dh**-0.5)
    logits = logits.reshape(b, kv_heads, groups, lq, lk)
    if bias.shape[1] == 1:
        bias = bias[:, :, None]  # [B, 1, 1, Lq, Lk]
    else:
        bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
    if bias.dtype == jnp.bool_:
        logits = jnp.where(bias, logits, MASK_VALUE)
    else:
        logits = jnp.maximum(logits + bias, MASK_VALUE)
    # softmax on the [B, K, G * Lq, Lk] view the second matmul reads: its output is then one residual, not two
    weights = jax.nn.softmax(logits.reshape(b, kv_heads, groups * lq, lk), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).reshape(b, kv_heads, groups, lq, dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh)


def mask_to_bias(mask: jax.Array, batch: int, heads: int, lq: int, lk: int) -> jax.Array:
    """A boolean (True = attend) or additive float mask -> the ``bias`` of :func:`attention`, [B or 1, H or 1,
    Lq, Lk]: boolean masks stay boolean (``attention`` selects ``MASK_VALUE`` where they are False), float masks
    become float32.

    Accepted shapes: [B, Lq, Lk] or [B, 1 or H, Lq, Lk] (B may be 1).
    """
    mask = jnp.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    if (mask.ndim != 4 or mask.shape[-2:] != (lq, lk) or mask.shape[0] not in (1, batch)
            or mask.shape[1] not in (1, heads)):
        raise ValueError(
            f"attention mask must be [B, Lq, Lk] or [B, 1|H, Lq, Lk] with B={batch}, H={heads}, Lq={lq}, Lk={lk}; "
            f"got shape {mask.shape}"
        )
    if mask.dtype == jnp.bool_:
        return mask
    return mask.astype(jnp.float32)


def causal_mask(length: int, padding: jax.Array | None = None) -> jax.Array:
    """Boolean [B or 1, Lq=L, Lk=L]: causal, and keys with ``padding`` [B, L] False masked out."""
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None]
    if padding is not None:
        mask = mask & jnp.asarray(padding, jnp.bool_)[:, None, :]
    return mask


def positions_from_padding(padding: jax.Array) -> jax.Array:
    """HF's generation position ids from a [B, L] attention mask (1 = token, 0 = padding).

    ``cumsum(mask) - 1`` with padded slots set to 1, so a left-padded prompt starts at position 0.
    Returns int32 [B, L].
    """
    padding = jnp.asarray(padding).astype(jnp.int32)
    positions = jnp.cumsum(padding, axis=-1) - 1
    return jnp.where(padding == 0, 1, positions).astype(jnp.int32)




class Linear(nn.Module):
    """``x [..., *in_shape] @ kernel [*in_shape, *features] (+ bias [*features])`` with logical axis names.

    ``layers.dense`` fixes float32 parameters and 2-D kernels; attention needs [D, H, Dh] / [H, Dh, D]
    kernels (heads stay a separate, shardable axis) and a configurable parameter dtype.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # names of kernel axes: len(in dims) + len(features)
    in_dims: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, columns: tuple[int, int] | None = None) -> jax.Array:
        """``columns = (start, size)`` (one output feature axis, no bias): only outputs start..start+size-1,
        from that slice of the kernel, so the other outputs are never computed."""
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(layers.normal_002, self.axes),
            (*in_shape, *self.features),
            self.param_dtype,
        )
        if columns is not None:
            if len(self.features) != 1 or self.use_bias:
                raise ValueError(f"Linear: columns needs one output axis and no bias, got features {self.features}")
            kernel = jax.lax.slice_in_dim(kernel, columns[0], columns[0] + columns[1], axis=kernel.ndim - 1)
        # The leading axes flattened to one ([B, L, ...] -> [B * L, ...], free for a contiguous array): the weight
        # gradient x^T dy then contracts a single axis; contracting B and L, XLA's CPU dot first transposes dy.
        lead = x.shape[: x.ndim - self.in_dims]
        flat = x.reshape(math.prod(lead), *in_shape)
        contract = tuple(range(1, 1 + self.in_dims))
        y = jax.lax.dot_general(
            flat.astype(self.dtype), kernel.astype(self.dtype), ((contract, tuple(range(self.in_dims))), ((), ()))
        )
        y = y.reshape(*lead, *y.shape[1:])
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims :]),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """HF ``LlamaRMSNorm`` over the last axis; parameter ``scale`` [N] initialised to ones."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        return rms_norm(x, scale, self.eps, self.dtype)
