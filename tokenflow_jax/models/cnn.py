"""Pixel-branch CNN encoder and decoder (the LlamaGen / taming VQ-16 architecture, NHWC).

Encoder: conv_in -> per level (ResBlock x num_res_blocks [+ AttnBlock at the last level], Downsample
except at the last level) -> mid (Res, Attn, Res) -> GroupNorm, swish, conv_out -> [B, H/16, W/16, z].
Decoder mirrors it with num_res_blocks + 1 blocks per level and nearest-x2 + conv upsampling.
Parameter names follow the reference's module names (``conv_blocks_{i}/res_{j}/conv1`` ...) so weight
conversion is a rename; the channel multipliers are those of ByteFlow-AI/TokenFlow
``tokenflow/tokenizer/vq_model.py`` (``Encoder``, ``Decoder``): ch 128, ch_mult (1, 1, 2, 2, 4), z 256, giving
29.30M encoder and 42.45M decoder parameters (237.12M for the enhanced decoder: ch 256, num_res_blocks 4).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Hyper-parameters of the pixel encoder or decoder.

    ``ch_mult`` is listed from the highest resolution to the lowest, as in the reference; the
    decoder walks it in reverse. Base: ch 128, 2 res blocks; enhanced decoder: ch 256, 4.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    num_groups: int = 32
    remat: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 ``nin_shortcut`` when channels change."""

    out_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
        h = layers.group_norm(self.num_groups, dtype=self.dtype, name="norm1")(x)
        h = layers.conv(self.out_channels, 3, padding=1, dtype=self.dtype, name="conv1")(layers.swish(h))
        h = layers.group_norm(self.num_groups, dtype=self.dtype, name="norm2")(h)
        h = layers.conv(self.out_channels, 3, padding=1, dtype=self.dtype, name="conv2")(layers.swish(h))
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, padding=0, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (1x1 convs as Dense on the channel axis)."""

    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
        b, height, width, c = x.shape
        h = layers.group_norm(self.num_groups, dtype=self.dtype, name="norm")(x)
        proj = lambda name: layers.dense(  # noqa: E731
            c, ("conv_in", "conv_out"), dtype=self.dtype, kernel_init=layers.torch_default_init, name=name
        )
        q, k, v = (proj(n)(h).reshape(b, height * width, 1, c) for n in ("q", "k", "v"))
        h = layers.dot_product_attention(q, k, v).reshape(b, height, width, c)
        return x + proj("proj_out")(h)


def _stage_block(module: type[nn.Module], remat: bool) -> type[nn.Module]:
    # Rematerialising whole res/attn blocks trades ~30% more FLOPs for activation memory that no
    # longer grows with depth; worth it for the 256 px enhanced decoder in training.
    return nn.remat(module) if remat else module


class Level(nn.Module):
    """One resolution level: res blocks (each followed by attention when ``with_attn``), then an
    optional resampling conv. Named ``conv_blocks_{i}`` so its parameters mirror the reference."""

    out_channels: int
    num_blocks: int
    with_attn: bool
    resample: str | None  # 'down' | 'up' | None
    num_groups: int = 32
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        res_block = _stage_block(ResBlock, self.remat)
        attn_block = _stage_block(AttnBlock, self.remat)
        for j in range(self.num_blocks):
            h = res_block(self.out_channels, self.num_groups, self.dtype, name=f"res_{j}")(h)
            if self.with_attn:
                h = attn_block(self.num_groups, self.dtype, name=f"attn_{j}")(h)
        if self.resample == "down":
            # Asymmetric zero padding (right and bottom only) before a VALID stride-2 conv.
            h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
            h = layers.conv(h.shape[-1], 3, stride=2, padding="VALID", dtype=self.dtype, name="downsample")(h)
        elif self.resample == "up":
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
            h = layers.conv(h.shape[-1], 3, padding=1, dtype=self.dtype, name="upsample")(h)
        return h


def _mid(h: jax.Array, num_groups: int, remat: bool, dtype: Any) -> jax.Array:
    """Res, Attn, Res at the lowest resolution; must be called inside a compact method, where it
    creates ``mid_0``, ``mid_1``, ``mid_2`` as children of the caller (mirroring ``encoder.mid.{i}``)."""
    channels = h.shape[-1]
    h = _stage_block(ResBlock, remat)(channels, num_groups, dtype, name="mid_0")(h)
    h = _stage_block(AttnBlock, remat)(num_groups, dtype, name="mid_1")(h)
    return _stage_block(ResBlock, remat)(channels, num_groups, dtype, name="mid_2")(h)


class Encoder(nn.Module):
    """Image [B, H, W, 3] in [-1, 1] -> latent [B, H/16, W/16, z_channels]."""

    config: CNNConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = layers.conv(cfg.ch, 3, padding=1, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        last = len(cfg.ch_mult) - 1
        for i, mult in enumerate(cfg.ch_mult):
            h = Level(
                cfg.ch * mult, cfg.num_res_blocks, with_attn=i == last, resample=None if i == last else "down",
                num_groups=cfg.num_groups, remat=cfg.remat, dtype=self.dtype, name=f"conv_blocks_{i}",
            )(h)
        h = _mid(h, cfg.num_groups, cfg.remat, self.dtype)
        h = layers.swish(layers.group_norm(cfg.num_groups, dtype=self.dtype, name="norm_out")(h))
        return layers.conv(cfg.z_channels, 3, padding=1, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent [B, h, w, z_channels] -> image [B, 16h, 16w, 3] (roughly in [-1, 1], not clamped)."""

    config: CNNConfig
    out_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        h = layers.conv(cfg.ch * cfg.ch_mult[-1], 3, padding=1, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        h = _mid(h, cfg.num_groups, cfg.remat, self.dtype)
        last = len(cfg.ch_mult) - 1
        for i, mult in enumerate(reversed(cfg.ch_mult)):  # i = 0 is the lowest resolution
            h = Level(
                cfg.ch * mult, cfg.num_res_blocks + 1, with_attn=i == 0, resample=None if i == last else "up",
                num_groups=cfg.num_groups, remat=cfg.remat, dtype=self.dtype, name=f"conv_blocks_{i}",
            )(h)
        h = layers.swish(layers.group_norm(cfg.num_groups, dtype=self.dtype, name="norm_out")(h))
        return layers.conv(self.out_channels, 3, padding=1, dtype=self.dtype, name="conv_out")(h)
