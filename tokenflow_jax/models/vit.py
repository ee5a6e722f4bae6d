"""Vision Transformer in three flavours: CLIP and SigLIP (semantic encoder), BEiT-v2 (semantic decoder).

One module, :class:`VisionTransformer`, maps an NHWC input to its patch tokens [B, h*w, D] (row-major
h, w; any class token dropped). The flavour fixes everything that differs between the references:

============  ==========  ======  =========  ========  ==========  ==============  ============
flavour       patch bias  cls     ln_pre     LN eps    activation  k_proj bias     final norm
============  ==========  ======  =========  ========  ==========  ==============  ============
``clip``      no          yes     yes        1e-5      QuickGELU   yes             ``ln_post``
``siglip``    yes         no      no         1e-6      tanh GELU   yes             none
``beit``      yes         yes     no         1e-6      erf GELU    no (fixed 0)    ``fc_norm``
============  ==========  ======  =========  ========  ==========  ==============  ============

Blocks are pre-LN (``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``) and stacked with ``nn.scan``, so every
block parameter has a leading [depth] axis named ``layers``. Parameter names (the converter's contract)::

    patch_embed/{kernel [p, p, C, D], bias [D]}     (no bias for clip)
    cls_token [D]                                    (clip, beit)
    pos_embed [G, D]                                 G = pos_grid**2 (+1 with a class token)
    ln_pre/{scale, bias}                             (clip)
    blocks/ln_1, blocks/ln_2                         {scale, bias} [depth, D]
    blocks/attn/{q,k,v,out}_proj/{kernel [depth, D, D], bias [depth, D]}   (no k_proj bias for beit)
    blocks/mlp/fc1/{kernel [depth, D, F], bias}, blocks/mlp/fc2/{kernel [depth, F, D], bias}
    ln_post/{scale, bias} (clip)  |  fc_norm/{scale, bias} (beit)

Position tables of clip and beit are resized with the DINO "+0.1" bicubic trick when the input's patch
grid differs from ``pos_grid`` (class-token row unchanged); SigLIP refuses other grids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import layers
from tokenflow_jax.ops.resize import interpolate_pos_embed

FLAVOURS = ("clip", "siglip", "beit")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    flavour: str  # 'clip' | 'siglip' | 'beit'
    width: int  # D
    depth: int  # number of transformer blocks that are built and run
    num_heads: int
    mlp_dim: int
    patch_size: int  # 16 (CLIP-B/16), 14 (SigLIP), 1 (BEiT decoder on the code grid)
    pos_grid: int  # side of the stored position table
    in_channels: int = 3  # 3 for images, 32 for the BEiT decoder on semantic codes
    remat: bool = False  # nn.remat each block

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"unknown ViT flavour {self.flavour!r}; expected one of {FLAVOURS}")
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def has_cls_token(self) -> bool:
        return self.flavour in ("clip", "beit")

    @property
    def num_positions(self) -> int:
        """Rows of the stored position table."""
        return self.pos_grid**2 + int(self.has_cls_token)

    @property
    def norm_eps(self) -> float:
        return 1e-5 if self.flavour == "clip" else 1e-6

    @property
    def activation(self) -> str:
        return {"clip": "quick_gelu", "siglip": "gelu_tanh", "beit": "gelu"}[self.flavour]


def _rescaled_init(base: layers.Initializer, layer_id: jax.Array) -> layers.Initializer:
    """``base`` divided by sqrt(2 * layer_id) (BEiT's ``fix_init_weight``); ``layer_id`` may be traced."""

    def init(key, shape, dtype=jnp.float32):
        return (base(key, shape, dtype) / jnp.sqrt(2.0 * layer_id)).astype(dtype)

    return init


class Attention(nn.Module):
    config: ViTConfig
    out_init: layers.Initializer = layers.normal_002
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, length, d = x.shape

        def proj(name: str, use_bias: bool = True) -> jax.Array:
            y = layers.dense(d, ("embed", "heads"), use_bias=use_bias, dtype=self.dtype, name=name)(x)
            return y.reshape(b, length, cfg.num_heads, cfg.head_dim)

        q = proj("q_proj")
        k = proj("k_proj", use_bias=cfg.flavour != "beit")
        v = proj("v_proj")
        o = layers.dot_product_attention(q, k, v, scale=cfg.head_dim**-0.5)
        o = o.reshape(b, length, d)
        return layers.dense(
            d, ("heads", "embed"), dtype=self.dtype, kernel_init=self.out_init, name="out_proj"
        )(o)


class Mlp(nn.Module):
    config: ViTConfig
    out_init: layers.Initializer = layers.normal_002
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = layers.activation(cfg.activation)(h)
        return layers.dense(
            cfg.width, ("mlp", "embed"), dtype=self.dtype, kernel_init=self.out_init, name="fc2"
        )(h)


class Block(nn.Module):
    """Pre-LN transformer block; scanned: ``(x, layer_id) -> (x, None)`` with a 1-based ``layer_id``."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, layer_id: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        # BEiT rescales attn.proj and mlp.fc2 by 1/sqrt(2 * layer_id) at init; the others load weights.
        out_init = _rescaled_init(layers.normal_002, layer_id) if cfg.flavour == "beit" else layers.normal_002
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layers.layer_norm(cfg.norm_eps, dtype=self.dtype, name="ln_1")(x)
        x = x + Attention(cfg, out_init=out_init, dtype=self.dtype, name="attn")(h)
        h = layers.layer_norm(cfg.norm_eps, dtype=self.dtype, name="ln_2")(x)
        x = x + Mlp(cfg, out_init=out_init, dtype=self.dtype, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, None


class VisionTransformer(nn.Module):
    """NHWC input [B, H, W, C] -> patch tokens [B, h*w, D] (class token dropped)."""

    config: ViTConfig
    dtype: Any = jnp.float32

    def _position_table(self, table: jax.Array, grid: int) -> jax.Array:
        """The stored table, or its patch part resized to ``grid`` x ``grid`` (DINO +0.1 bicubic)."""
        cfg = self.config
        if grid == cfg.pos_grid:
            return table
        if not cfg.has_cls_token:
            raise ValueError(
                f"{cfg.flavour} ViT: the input's patch grid is {grid}x{grid} but the position table is for "
                f"{cfg.pos_grid}x{cfg.pos_grid} (input side {cfg.pos_grid * cfg.patch_size}); "
                "this flavour does not interpolate position embeddings"
            )

        patch = interpolate_pos_embed(table[1:], grid)
        return jnp.concatenate([table[:1], patch.astype(table.dtype)], axis=0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"{cfg.flavour} ViT expects NHWC input with {cfg.in_channels} channels, got shape {x.shape}"
            )
        b, height, width, _ = x.shape
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        if gh != gw:
            raise ValueError(
                f"{cfg.flavour} ViT needs a square patch grid; input {height}x{width} with patch "
                f"{cfg.patch_size} gives {gh}x{gw}"
            )
        if gh == 0:
            raise ValueError(f"input {height}x{width} is smaller than one {cfg.patch_size}-pixel patch")

        x = layers.conv(
            cfg.width,
            cfg.patch_size,
            stride=cfg.patch_size,
            padding="VALID",
            use_bias=cfg.flavour != "clip",
            dtype=self.dtype,
            axes=(None, None, "conv_in", "embed"),
            name="patch_embed",
        )(x.astype(self.dtype))
        x = x.reshape(b, gh * gw, cfg.width)

        if cfg.has_cls_token:
            cls = self.param(
                "cls_token",
                nn.with_logical_partitioning(layers.normal_002, ("embed",)),
                (cfg.width,),
                jnp.float32,
            )
            cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1)
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(layers.normal_002, (None, "embed")),
            (cfg.num_positions, cfg.width),
            jnp.float32,
        )
        x = x + self._position_table(table, gh).astype(self.dtype)[None]

        if cfg.flavour == "clip":
            x = layers.layer_norm(cfg.norm_eps, dtype=self.dtype, name="ln_pre")(x)

        block = Block
        if cfg.remat:
            block = nn.remat(block, prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, dtype=self.dtype, name="blocks")
        x, _ = blocks(x, jnp.arange(1, cfg.depth + 1, dtype=jnp.float32))

        if cfg.flavour == "clip":
            x = layers.layer_norm(cfg.norm_eps, dtype=self.dtype, name="ln_post")(x)
        if cfg.has_cls_token:
            x = x[:, 1:]
        if cfg.flavour == "beit":
            x = layers.layer_norm(cfg.norm_eps, dtype=self.dtype, name="fc_norm")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))
