"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator``, as in ByteFlow-AI/TokenFlow
``tokenflow/tokenizer/discriminator_patchgan.py``), NHWC.

conv4x4/2 (3 -> ndf) + LeakyReLU(0.2), then n_layers - 1 blocks of conv4x4/2 (no bias) + BatchNorm +
LeakyReLU doubling the channels (capped at 8 * ndf), one conv4x4/1 block, and a conv4x4/1 to one logit
per patch. All convs pad 1 pixel on each side. Initialisation: conv weights N(0, 0.02), BatchNorm scale
N(1, 0.02) and bias 0; conv biases start at zero (the reference leaves PyTorch's default there; it only
affects the first steps).

BatchNorm statistics live in the ``batch_stats`` collection. Under ``jax.jit`` on global arrays the
batch statistics are over the global batch (like SyncBatchNorm); the reference's DDP BatchNorm uses each
GPU's local batch. PyTorch momentum 0.1 is Flax momentum 0.9; eps 1e-5.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.models import layers


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nn.Module):
    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        """x [B, H, W, 3] in [-1, 1] -> patch logits [B, H', W', 1] (30x30 for 256 px)."""
        conv = lambda features, stride, bias, name: layers.conv(  # noqa: E731
            features, 4, stride=stride, padding=1, use_bias=bias, dtype=self.dtype,
            kernel_init=layers.normal_002, name=name,
        )
        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        mult = 1
        for i in range(1, self.n_layers + 1):
            mult = min(2**i, 8)
            stride = 2 if i < self.n_layers else 1
            h = conv(self.ndf * mult, stride, False, f"conv_{i}")(h)
            h = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                scale_init=nn.with_logical_partitioning(_bn_scale_init, ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                name=f"norm_{i}",
            )(h)
            h = nn.leaky_relu(h, 0.2)
        return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean D(x_hat) (the reference's hinge generator loss)."""
    return -jnp.mean(logits_fake)
