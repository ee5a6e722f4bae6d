"""A stride-1 NHWC convolution whose weight gradient is computed as shifted matmuls.

XLA:CPU's weight-gradient convolution is slow for large maps with few channels: 3x3, batch 2, f32 on the
project's 2-core machines (2048^3 matmul ~415 GFLOP/s), forward / input-gradient / weight-gradient run at
271 / 264 / 37 GFLOP/s at 224x224x128 and 368 / 351 / 207 at 56x56x512. The pixel CNN's early levels are
exactly that shape, so in training the weight gradients dominated the step. ``models.layers.conv`` uses
this on the CPU backend only (TPU and GPU compilers have fast native weight gradients).

Here the forward pass and the input gradient are XLA's own convolutions, and the weight gradient is

    dW[i, j, :, :] = sum_{n, h, w} x_pad[n, h + i, w + j, :]^T dy[n, h, w, :]      (one matmul per tap)

i.e. kh * kw matmuls of [C_in, N*H*W] x [N*H*W, C_out]. It is the same sum
in a different order (float32 rounding differences only). Any other convolution (strided, dilated,
grouped, other layouts) falls through to ``lax.conv_general_dilated``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def _forward(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_weight_grad(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...],
                            precision: Any = None) -> jax.Array:
    """x [N, H, W, Cin], w [kh, kw, Cin, Cout] -> [N, H', W', Cout]; stride 1, explicit ``padding``."""
    return _forward(x, w, padding, precision)


def _fwd(x, w, padding, precision):
    return _forward(x, w, padding, precision), (x, w)


def _bwd(padding, precision, residuals, g):
    x, w = residuals
    (dx,) = jax.linear_transpose(lambda x_: _forward(x_, w, padding, precision), x)(g)
    kh, kw, c_in, c_out = w.shape
    out_h, out_w = g.shape[1:3]
    x_pad = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    dy = g.reshape(-1, c_out)
    n = x.shape[0]

    # One plain [Cin, NHW] x [NHW, Cout] matmul per tap: 1.3-3.4x XLA:CPU's weight-gradient convolution
    # (bench/conv_wgrad.py), where an einsum over (n, h, w) is slower. A scan over the taps keeps one
    # shifted copy of the input alive at a time (unrolled, all kh * kw copies coexist: 2x the step's memory).
    def tap(_, offset):
        window = lax.dynamic_slice(x_pad, (0, offset[0], offset[1], 0), (n, out_h, out_w, c_in))
        return None, jnp.matmul(window.reshape(-1, c_in).T, dy, precision=precision)

    offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)
    _, taps = lax.scan(tap, None, offsets)
    dw = taps.reshape(kh, kw, c_in, c_out)
    return dx, dw.astype(w.dtype)


conv_matmul_weight_grad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                         **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` (flax ``nn.Conv(conv_general_dilated=...)``): stride-1,
    undilated, ungrouped NHWC/HWIO convolutions with explicit padding take :func:`conv_matmul_weight_grad`,
    unless traced under a multi-device mesh (see :func:`matmul_weight_grad_applies`)."""
    simple = (
        matmul_weight_grad_applies() and tuple(window_strides) == (1, 1)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1))) and feature_group_count == 1 and not kwargs
        and not isinstance(padding, str) and _is_nhwc(dimension_numbers)
    )
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv_matmul_weight_grad(lhs, rhs, pads, precision)


def matmul_weight_grad_applies() -> bool:
    """True on the CPU backend when no multi-device mesh is set (``jax.set_mesh``) at trace time.

    On a sharded mesh the per-tap slices of a batch- or channel-sharded input put collectives inside the
    scan's loop body, once per tap; XLA:CPU runs such in-loop collectives in a different order on
    different fake devices than the collectives outside the loop, which deadlocked the (2, 2, 2) trainer
    test (device 0 waiting in an all-gather of the semantic encoder while the other seven waited in the
    discriminator's collective-permute). Multi-device CPU runs are tests and debugging, where XLA's own
    weight gradient is the right choice; single-device CPU training keeps the fast path.
    """
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        # flax passes ConvDimensionNumbers built from ('NHWC', 'HWIO', 'NHWC').
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), NHWC)
    return tuple(dimension_numbers) == NHWC
