"""Building blocks shared by every model: layers with logical axis names, activations, attention.

Conventions used across ``tokenflow_jax.models``:
  * images and feature maps are NHWC; token sequences are [B, L, D], flattened row-major (h, w);
  * parameters are float32 (``param_dtype``); ``dtype`` is the compute dtype;
  * every weight carries logical axis names (see ``tokenflow_jax.parallel``);
  * initialisers follow the reference where it matters for from-scratch training: PyTorch's
    ``trunc_normal_(std=0.02)`` truncates at +-2 absolute, i.e. is an untruncated normal here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.ops import conv as conv_ops

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch nn.Linear / nn.Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
normal_002 = nn.initializers.normal(0.02)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = normal_002,
    name: str | None = None,
) -> nn.Dense:
    """``nn.Dense`` whose kernel [in, out] and bias [out] carry logical names ``axes``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: str | Sequence[tuple[int, int]] | int = "SAME",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = torch_default_init,
    axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out"),
    name: str | None = None,
) -> nn.Conv:
    """NHWC ``nn.Conv``; kernel [kh, kw, in, out] with logical names ``axes``.

    ``padding`` as an int means symmetric zero padding of that many pixels, like PyTorch.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        # XLA:CPU's weight-gradient convolution is ~10% of its matmul rate on large maps (ops/conv.py).
        conv_general_dilated=conv_ops.conv_general_dilated if conv_ops.matmul_weight_grad_applies() else None,
        name=name,
    )


def layer_norm(epsilon: float, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis, two-pass variance (matches torch to float32 rounding)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over NHWC maps, as torch ``nn.GroupNorm(G, C, eps)``: two-pass statistics in float32.

    The statistics are reduced per channel over H*W first (a contiguous reduction XLA vectorises), then
    within each group: ~1.6x faster on CPU than reducing [B, H*W, G, C/G] directly (bench/groupnorm.py),
    the same operation up to float32 summation order. Parameters ``scale`` and ``bias`` [C] as flax's.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, ..., C] -> same shape, ``dtype``."""
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,), jnp.float32)
        b, per_group = x.shape[0], c // self.num_groups
        flat = x.astype(jnp.float32).reshape(b, -1, c)
        count = flat.shape[1] * per_group

        def group_mean(per_channel_sums):  # [B, C] -> [B, C], each channel given its group's mean
            group = per_channel_sums.reshape(b, self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(group, per_group, axis=1)

        centred = flat - group_mean(jnp.sum(flat, axis=1))[:, None, :]
        inv = jax.lax.rsqrt(group_mean(jnp.sum(centred * centred, axis=1)) + self.epsilon)
        return (centred * (inv * scale)[:, None, :] + bias).reshape(x.shape).astype(self.dtype)


def group_norm(
    num_groups: int = 32, epsilon: float = 1e-6, *, dtype: Dtype = jnp.float32, name: str | None = None
) -> GroupNorm:
    """GroupNorm over NHWC maps (torch ``nn.GroupNorm(32, C, eps=1e-6)``), two-pass variance."""
    return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU (torch ``nn.GELU()``)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU (``gelu_pytorch_tanh`` in transformers)."""
    return jax.nn.gelu(x, approximate=True)


def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) (the VQGAN CNN's ``nonlinearity``)."""
    return x * jax.nn.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_erf,
    "gelu_tanh": gelu_tanh,
    "swish": swish,
    "silu": swish,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None, scale: float | None = None
) -> jax.Array:
    """Softmax attention with float32 logits and softmax (as the reference's eager attention).

    Args:
      q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh].
      bias: optional additive bias broadcastable to [B, H, Lq, Lk] (e.g. a -inf mask).
      scale: logit scale, default Dh ** -0.5.
    Returns:
      [B, Lq, H, Dh] in v's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
