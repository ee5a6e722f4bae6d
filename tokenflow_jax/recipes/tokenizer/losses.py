"""Tokenizer loss terms (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_loss.py``, ``VQLoss``). Images are
[B, H, W, 3] in [-1, 1]."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.eval import metrics


def reconstruction_loss(images: jax.Array, recon: jax.Array, kind: str = "l2") -> jax.Array:
    """Mean squared (``l2``, the reference default) or absolute (``l1``) error over all elements."""
    diff = images.astype(jnp.float32) - recon.astype(jnp.float32)
    if kind == "l2":
        return jnp.mean(diff**2)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ConfigError(f"loss.recon must be 'l2' or 'l1', got {kind!r}")


def semantic_cosine_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """mean over tokens of 1 - cos(pred, target); pred, target [B, L, D]. Both sides are divided by
    their norms without an epsilon, as the reference does."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    pred = pred / jnp.linalg.norm(pred, axis=-1, keepdims=True)
    target = target / jnp.linalg.norm(target, axis=-1, keepdims=True)
    return jnp.mean(1.0 - jnp.sum(pred * target, axis=-1))


def adversarial_weight(step: jax.Array, disc_start: int, disc_weight: float) -> jax.Array:
    """0 before ``disc_start`` steps, then ``disc_weight`` (applies to the generator and the
    discriminator loss alike, so the discriminator does not train before ``disc_start``)."""
    return jnp.where(step >= disc_start, jnp.float32(disc_weight), jnp.float32(0.0))


def batch_psnr(images: jax.Array, recon: jax.Array) -> jax.Array:
    """Mean PSNR (dB, data range 1) over the batch, images mapped from [-1, 1] to [0, 1] and clipped."""
    a = (images.astype(jnp.float32) + 1.0) / 2.0
    b = jnp.clip((recon.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return jnp.mean(metrics.psnr_per_image(a, b))
