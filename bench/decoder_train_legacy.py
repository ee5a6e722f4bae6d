"""The decoder train step's code as it was before issue 20's changes, for side-by-side timing in one process.

``bench/decoder_train.py --compare-legacy`` traces each recipe's step twice: once as the package is now and once
inside :func:`legacy_paths`, which swaps back, for the duration of the trace, what the issue changed:

* the losses' ``-take_along_axis(log_softmax(x))`` (now ``ops/cross_entropy.softmax_cross_entropy``);
* attention written on [B, L, K, G, Dh] operands, masks turned into float32 biases added and clamped (now
  transposed operands, one G * Lq query axis, boolean masks selected);
* ``Linear`` contracting the input's trailing axes without flattening its leading ones (now [B * L, ...]).

Both programs then run alternately on one shared (donated) train state, so the machine's load falls on both.
The legacy functions are verbatim copies of the previous ``models/llm_layers.py``, ``models/t2i.py`` and
``models/vlm.py`` code; the parameter trees are identical (same module names and shapes).
"""
from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.models import layers, llm_layers, projector, t2i, transformer, vlm

MASK_VALUE = llm_layers.MASK_VALUE


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    b, lq, h, dh = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    q = q.reshape(b, lq, kv_heads, groups, dh)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * (dh**-0.5)
    if bias.shape[1] == 1:
        bias = bias[:, :, None]  # [B, 1, 1, Lq, Lk]
    else:
        bias = bias.reshape(bias.shape[0], kv_heads, groups, *bias.shape[2:])
    logits = jnp.maximum(logits + bias, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v)
    return out.reshape(b, lq, h, dh)


def mask_to_bias(mask: jax.Array, batch: int, heads: int, lq: int, lk: int) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)
    return mask.astype(jnp.float32)


class Linear(llm_layers.Linear):
    @nn.compact
    def __call__(self, x: jax.Array, columns: tuple[int, int] | None = None) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param("kernel", nn.with_logical_partitioning(layers.normal_002, self.axes),
                            (*in_shape, *self.features), self.param_dtype)
        if columns is not None:
            kernel = jax.lax.slice_in_dim(kernel, columns[0], columns[0] + columns[1], axis=kernel.ndim - 1)
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), ((contract, tuple(range(self.in_dims))), ((), ()))
        )
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims :]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def image_nll(logits: jax.Array, indices: jax.Array, offset: int = 0) -> jax.Array:
    targets = indices + offset
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def token_nll(logits: jax.Array, labels: jax.Array, ignore_index: int = -100) -> tuple[jax.Array, jax.Array]:
    targets = labels[:, 1:]
    weight = (targets != ignore_index).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return -picked * weight, weight


PATCHES: list[tuple[Any, str, Any]] = [
    (transformer, "attention", attention), (transformer, "mask_to_bias", mask_to_bias),
    (transformer, "Linear", Linear), (t2i, "Linear", Linear), (projector, "Linear", Linear),
    (t2i, "image_nll", image_nll), (vlm, "token_nll", token_nll),
]


@contextlib.contextmanager
def legacy_paths():
    """Within the block, tracing builds the pre-issue-20 step (module attributes swapped, restored on exit)."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in PATCHES]
    try:
        for module, name, value in PATCHES:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
