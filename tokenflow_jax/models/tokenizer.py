"""TokenFlow: the dual-codebook image tokenizer (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``).

    x [B, H, W, 3] in [-1, 1]
      -> semantic ViT (CLIP/SigLIP) -> encode_task_layer -> [B, h, w, 32]   \\ concat (semantic first)
      -> pixel CNN (at ``pixel_resolution``) -> quant_conv -> [B, h, w, 8]   /  -> [B, h, w, 40]
      -> shared-mapping multi-scale residual VQ -> F [B, h, w, 40], indices [B, sum s_k^2]
    decode(F): F[..., :32] -> BEiT decoder -> decode_task_layer -> semantic [B, h*w, D_teacher]
               F[..., 32:] -> post_quant_conv -> pixel CNN decoder -> image [B, H, W, 3]

Public methods (call through ``model.apply(variables, ..., method=...)``): ``encode``, ``decode``,
``decode_code`` (any prefix of the scales) and ``__call__`` (encode then decode).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflow_jax.config import to_dataclass
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import layers
from tokenflow_jax.models.cnn import CNNConfig, Decoder, Encoder
from tokenflow_jax.models.quantizer import MultiScaleQuantizer, QuantizerConfig
from tokenflow_jax.models.vit import VisionTransformer, ViTConfig
from tokenflow_jax.ops import resize

# Per-channel (mean, std) applied to [0, 1] images before the semantic encoder (ByteFlow-AI/TokenFlow
# ``tokenflow/tokenizer/vq_model.py``, ``ScalingLayerForClip`` / ``ScalingLayerForSigLip``).
INPUT_SCALINGS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,  # clipb_224: the encoder sees x in [-1, 1] unchanged
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclasses.dataclass(frozen=True)
class TokenFlowConfig:
    image_size: int
    semantic_encoder: ViTConfig
    semantic_decoder: ViTConfig
    pixel_encoder: CNNConfig
    pixel_decoder: CNNConfig
    quantizer: QuantizerConfig
    semantic_out_dim: int  # width of the teacher features the semantic decoder regresses
    pixel_resolution: int | None = None  # XL: 432 (= 16 * 27); None means image_size
    input_scaling: str = "none"

    def __post_init__(self):
        if self.input_scaling not in INPUT_SCALINGS:
            raise ConfigError(f"model.input_scaling must be one of {sorted(INPUT_SCALINGS)}, "
                              f"got {self.input_scaling!r}")
        # The patch conv is VALID, so SigLIP's 384 / 14 gives a 27 grid (the last 6 pixels unused).
        sem_grid = self.image_size // self.semantic_encoder.patch_size
        pix_grid = self.pixel_input_size // self.pixel_encoder.downsample_factor
        if self.pixel_input_size % self.pixel_encoder.downsample_factor or sem_grid != pix_grid:
            raise ConfigError(
                f"semantic grid ({self.image_size}//{self.semantic_encoder.patch_size} = {sem_grid}) and pixel "
                f"grid ({self.pixel_input_size}/{self.pixel_encoder.downsample_factor}) must be the same integer"
            )
        if sem_grid != self.quantizer.scales[-1]:
            raise ConfigError(
                f"quantizer.scales must end at the token grid {sem_grid} (image_size {self.image_size}), "
                f"got {self.quantizer.scales}"
            )
        if self.semantic_decoder.in_channels != self.quantizer.semantic_dim:
            raise ConfigError("semantic decoder in_channels must equal quantizer.semantic_dim")

    @property
    def pixel_input_size(self) -> int:
        return self.pixel_resolution or self.image_size

    @property
    def grid(self) -> int:
        return self.quantizer.scales[-1]


class EncodeAux(NamedTuple):
    """What ``encode`` returns besides F and the indices."""

    quantizer: dict[str, Any]  # losses (training) and metrics, see MultiScaleQuantizer
    semantic_latent: jax.Array  # [B, h, w, 32] before quantisation
    pixel_latent: jax.Array  # [B, h, w, 8] before quantisation


class Encoded(NamedTuple):
    """What ``TokenFlow.encode`` returns."""

    features: jax.Array  # F [B, h, w, 40]: the sum over scales of the upsampled unit-norm code vectors
    aux: EncodeAux
    indices: jax.Array  # [B, sum s_k^2] int32, scale by scale, row-major inside a scale


class Reconstruction(NamedTuple):
    """What ``TokenFlow.__call__`` (encode, then decode) returns."""

    semantic: jax.Array  # [B, h*w, semantic_out_dim]: the semantic decoder's features (the teacher's target)
    image: jax.Array  # [B, H, W, 3] in about [-1, 1]
    features: jax.Array  # F [B, h, w, 40]
    aux: EncodeAux
    indices: jax.Array  # [B, sum s_k^2] int32


class TaskLayer(nn.Module):
    """Linear(D, D) -> tanh -> Linear(D, out) with trunc-normal(0.02) weights, zero biases."""

    width: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.dense(self.width, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        return layers.dense(self.out_dim, ("mlp", None), dtype=self.dtype, name="fc2")(jnp.tanh(x))


def scale_input(x: jax.Array, scaling: str) -> jax.Array:
    """[-1, 1] images -> the semantic encoder's input normalisation (identity for 'none')."""
    stats = INPUT_SCALINGS[scaling]
    if stats is None:
        return x
    mean, std = (jnp.asarray(v, x.dtype) for v in stats)
    unit = jnp.clip((x + 1.0) * 127.5, 0.0, 255.0) / 255.0
    return (unit - mean) / std


class TokenFlow(nn.Module):
    config: TokenFlowConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.semantic_encoder = VisionTransformer(cfg.semantic_encoder, dtype=self.dtype)
        self.encode_task_layer = TaskLayer(cfg.semantic_encoder.width, cfg.quantizer.semantic_dim, self.dtype)
        self.pixel_encoder = Encoder(cfg.pixel_encoder, dtype=self.dtype)
        self.quant_conv = layers.conv(cfg.quantizer.pixel_dim, 1, padding=0, dtype=self.dtype)
        self.quantizer = MultiScaleQuantizer(cfg.quantizer)
        self.semantic_decoder = VisionTransformer(cfg.semantic_decoder, dtype=self.dtype)
        self.decode_task_layer = TaskLayer(cfg.semantic_decoder.width, cfg.semantic_out_dim, self.dtype)
        self.post_quant_conv = layers.conv(cfg.pixel_encoder.z_channels, 1, padding=0, dtype=self.dtype)
        self.pixel_decoder = Decoder(cfg.pixel_decoder, dtype=self.dtype)

    def _check_image(self, x: jax.Array) -> None:
        size = self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"TokenFlow expects images [B, {size}, {size}, 3] in [-1, 1], got shape {x.shape}")

    def encode(self, x: jax.Array, *, train: bool = False) -> Encoded:
        """x [B, H, W, 3] -> ``Encoded(features F [B, h, w, 40], aux, indices [B, sum s_k^2] int32)``."""
        self._check_image(x)
        cfg = self.config
        b, grid = x.shape[0], cfg.grid
        semantic = self.semantic_encoder(scale_input(x, cfg.input_scaling))  # [B, h*w, D]
        semantic = self.encode_task_layer(semantic).reshape(b, grid, grid, -1)
        pixel_in = x
        if cfg.pixel_input_size != cfg.image_size:
            # XL: 384 -> 432 (values may overshoot [-1, 1]; the reference does not clamp).
            pixel_in = resize.bicubic_resize(x, (cfg.pixel_input_size, cfg.pixel_input_size))
        pixel = self.quant_conv(self.pixel_encoder(pixel_in))
        h = jnp.concatenate([semantic.astype(jnp.float32), pixel.astype(jnp.float32)], axis=-1)
        features, quant_aux, indices = self.quantizer(h, train=train)
        return Encoded(features, EncodeAux(quant_aux, semantic, pixel), indices)

    def decode(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """F [B, h, w, 40] -> (semantic [B, h*w, semantic_out_dim], image [B, H, W, 3])."""
        cfg = self.config
        sem_dim = cfg.quantizer.semantic_dim
        semantic = self.decode_task_layer(self.semantic_decoder(features[..., :sem_dim].astype(self.dtype)))
        image = self.pixel_decoder(self.post_quant_conv(features[..., sem_dim:].astype(self.dtype)))
        if cfg.pixel_input_size != cfg.image_size:
            image = resize.bicubic_resize(image, (cfg.image_size, cfg.image_size))
        return semantic, image

    def decode_code(self, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        """indices [B, L] for any prefix of the scales -> decode() of their accumulated map."""
        return self.decode(self.quantizer.decode_indices(indices))

    def __call__(self, x: jax.Array, *, train: bool = False) -> Reconstruction:
        """Encode then decode: ``Reconstruction(semantic, image, features, aux, indices)``."""
        encoded = self.encode(x, train=train)
        semantic, image = self.decode(encoded.features)
        return Reconstruction(semantic, image, encoded.features, encoded.aux, encoded.indices)


def tokenflow_config(config) -> TokenFlowConfig:
    """TokenFlowConfig from a ``configs/tokenizer.py`` ConfigDict (fields ``model`` and ``quantizer``)."""

    m = config.model
    return to_dataclass(
        TokenFlowConfig,
        {k: v for k, v in m.items()},
        "model",
        semantic_encoder=to_dataclass(ViTConfig, m.semantic_encoder, "model.semantic_encoder"),
        semantic_decoder=to_dataclass(ViTConfig, m.semantic_decoder, "model.semantic_decoder"),
        pixel_encoder=to_dataclass(CNNConfig, m.pixel_encoder, "model.pixel_encoder"),
        pixel_decoder=to_dataclass(CNNConfig, m.pixel_decoder, "model.pixel_decoder"),
        quantizer=to_dataclass(QuantizerConfig, config.quantizer, "quantizer"),
        pixel_resolution=m.pixel_resolution or None,
    )


def init_args(model: TokenFlow) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``TokenFlow.init``'s input as a shape: one image [1, S, S, 3]."""
    size = model.config.image_size
    return (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),)


def build(config) -> TokenFlow:
    """The TokenFlow module for a tokenizer config."""
    return TokenFlow(tokenflow_config(config), dtype=jnp.dtype(config.get("dtype", "float32")))
