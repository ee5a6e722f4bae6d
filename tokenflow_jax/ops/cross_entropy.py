"""Softmax cross-entropy over a large vocabulary with a hand-written gradient.

``nll = log(sum(exp(x - max))) - (x[target] - max)``: the same float32 operations, in the same order, as
``-take_along_axis(jax.nn.log_softmax(x), target)``, so the forward values are bit-identical to it. The
difference is the backward pass. Differentiating that composition makes XLA keep the whole log-softmax
[..., V] as a residual, scatter the cotangent of the picked entries into a zero [..., V] tensor (the
transpose of ``take_along_axis``) and then combine the two; here the residuals are the logits (already
alive for the head's own backward) and two numbers per row, and the gradient is one fused elementwise
pass::

    d nll / d x = softmax(x) - onehot(target)      (softmax recomputed as exp((x - max) - log(sum)))

For the decoders' heads (t2i: [B, 817, 32768]; VLM: [B, L, 32000] and more) that removes two
vocabulary-sized float32 tensors and a scatter from every train step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _statistics(logits: jax.Array, targets: jax.Array):
    x = logits.astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    log_sum = jnp.log(jnp.sum(jnp.exp(x - row_max), axis=-1, keepdims=True))
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)
    nll = (log_sum - (picked - row_max))[..., 0]
    return nll, row_max, log_sum


@jax.custom_vjp
def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy, float32.

    Args:
      logits: [..., V] (any float dtype; computed in float32).
      targets: [...] integer ids in [0, V) (callers clip ignored labels to a valid id and weight them out).
    Returns:
      nll [...] float32 = ``logsumexp(logits) - logits[target]``.
    """
    return _statistics(logits, targets)[0]


def _forward(logits, targets):
    nll, row_max, log_sum = _statistics(logits, targets)
    return nll, (logits, targets, row_max, log_sum)


def _backward(residuals, cotangent):
    logits, targets, row_max, log_sum = residuals
    x = logits.astype(jnp.float32)
    softmax = jnp.exp((x - row_max) - log_sum)
    onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == targets[..., None]
    grad = (softmax - onehot.astype(jnp.float32)) * cotangent[..., None]
    return grad.astype(logits.dtype), None


softmax_cross_entropy.defvjp(_forward, _backward)
