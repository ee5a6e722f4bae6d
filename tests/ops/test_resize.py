"""``tokenflow_jax.ops.resize`` against ``torch.nn.functional.interpolate`` on random N(0, 1) float32 maps.

Tolerance everywhere: max abs error <= 1e-5 (TOL). The residual error is float32 rounding of torch's own
index/weight arithmetic and of the accumulation order, ~1e-6 in practice.

Every (in, out) pair in 1..27 is checked on the cached matrices, applied with numpy: compiling the JAX
function for all 729 x 2 output shapes would take ~40 s on 2 CPU cores (XLA compiles each shape). The
JAX functions themselves are checked on the pairs the multi-scale schedules actually use, on the large
image resizes, under jit, with and without batch axes, and for gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_jax.ops.resize import area_matrix, area_resize, bicubic_matrix, bicubic_resize, interpolate_pos_embed

TOL = 1e-5  # max abs error vs torch, float32, N(0, 1) inputs

SIZES = range(1, 28)
SCHEDULES = ([1, 2, 4, 6, 8, 10, 12, 14, 16], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27])


def torch_resize(x: np.ndarray, mode: str, **kwargs) -> np.ndarray:
    """F.interpolate on an NHWC numpy array [B, H, W, C] (via NCHW); returns NHWC numpy."""
    if mode == "bicubic":
        kwargs["align_corners"] = False
    y = F.interpolate(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), mode=mode, **kwargs)
    return y.permute(0, 2, 3, 1).numpy()


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def schedule_pairs(mode: str) -> list[tuple[int, int]]:
    """(in, out) pairs the schedules use: to/from the final grid and to/from the next scale.

    Bicubic gets the upsampling pairs and area the downsampling ones, as the multi-scale quantiser uses
    them; the other directions are covered by the all-pairs matrix test.
    """
    pairs = set()
    for sched in SCHEDULES:
        final = sched[-1]
        for s in sched:
            pairs |= {(s, final), (final, s)}
        for a, b in zip(sched[:-1], sched[1:]):
            pairs |= {(a, b), (b, a)}
    keep = (lambda i, o: i < o) if mode == "bicubic" else (lambda i, o: i > o)
    return sorted(p for p in pairs if keep(*p))


@pytest.mark.parametrize("in_size", SIZES)
def test_matrices_match_torch_all_pairs(in_size):
    rng = np.random.default_rng(in_size)
    x = rng.standard_normal((2, in_size, in_size, 5), dtype=np.float32)
    for out in SIZES:
        for mode, matrix in (("bicubic", bicubic_matrix), ("area", area_matrix)):
            m = matrix(in_size, out)
            assert m.dtype == np.float32 and m.shape == (out, in_size)
            # Same contraction order as the JAX code: H first, then W, float32 throughout.
            y = np.einsum("oh,bhwc->bowc", m, x)
            y = np.einsum("pw,bowc->bopc", m, y)
            ref = torch_resize(x, mode, size=(out, out))
            assert max_err(y, ref) <= TOL, (mode, in_size, out)


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_schedule_resizes_match_torch(mode):
    fn = bicubic_resize if mode == "bicubic" else area_resize
    pairs = schedule_pairs(mode)
    if len(pairs) % 2:
        pairs.append(pairs[0])  # pairs are consumed two at a time
    rng = np.random.default_rng(1)
    # Each call resizes H with one pair and W with the next, so half the compiles cover every pair and
    # non-square maps (H and W axes kept apart) are exercised too.
    cases = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs) - 1, 2)]
    xs = [rng.standard_normal((2, ph[0], pw[0], 5), dtype=np.float32) for ph, pw in cases]
    sizes = [(ph[1], pw[1]) for ph, pw in cases]
    ys = jax.jit(lambda xs: [fn(x, s) for x, s in zip(xs, sizes)])(xs)
    for x, s, y in zip(xs, sizes, ys):
        assert y.dtype == jnp.float32
        assert max_err(y, torch_resize(x, mode, size=s)) <= TOL, (mode, x.shape, s)


def test_many_channels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 14, 14, 40), dtype=np.float32)
    assert max_err(bicubic_resize(x, (16, 16)), torch_resize(x, "bicubic", size=(16, 16))) <= TOL
    x = rng.standard_normal((2, 27, 27, 40), dtype=np.float32)
    assert max_err(area_resize(x, (22, 22)), torch_resize(x, "area", size=(22, 22))) <= TOL


@pytest.mark.parametrize(("in_size", "out"), [(384, 432), (432, 384)])
def test_bicubic_image_sizes(in_size, out):
    # Image resizes between the teacher and tokenizer resolutions. 432 -> 384 is a downsample, which torch
    # does without antialiasing. At these sizes torch's float32 source coordinates matter (see resize.py):
    # exact float64 coordinates would be off by ~9e-5. torch's own result depends on whether its kernel
    # was compiled with FMA: the AVX2/AVX512 kernels (and CUDA) are, the DEFAULT one is not and differs
    # from them by ~7e-5 at 384 -> 432. We reproduce the FMA variant.
    if (in_size, out) == (384, 432) and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch's non-FMA CPU kernel rounds the source coordinate differently")
    x = np.random.default_rng(3).standard_normal((1, in_size, in_size, 3), dtype=np.float32)
    y = jax.jit(bicubic_resize, static_argnums=1)(x, (out, out))
    assert max_err(y, torch_resize(x, "bicubic", size=(out, out))) <= TOL


@pytest.mark.parametrize(("n", "out"), [(14, 16), (16, 14), (14, 14), (27, 27), (24, 27)])
def test_interpolate_pos_embed(n, out):
    d = 8
    table = np.random.default_rng(4).standard_normal((n * n, d), dtype=np.float32)
    got = jax.jit(interpolate_pos_embed, static_argnums=1)(table, out)
    assert got.shape == (out * out, d)
    if n == out:
        # The reference returns the table untouched when the grid already fits (DINO's early return).
        # Raw F.interpolate with scale (N + 0.1) / N would NOT be the identity: it maps coordinates with
        # N / (N + 0.1) and moves values by ~0.4 here, so it must not be called for equal sizes.
        np.testing.assert_array_equal(np.asarray(got), table)
        return
    sf = (out + 0.1) / n
    grid = torch.from_numpy(table).reshape(1, n, n, d).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(sf, sf), mode="bicubic", align_corners=False)
    assert ref.shape[-2:] == (out, out)  # the "+0.1" really lands on `out`, so the comparison is valid
    ref = ref.permute(0, 2, 3, 1).reshape(out * out, d).numpy()
    assert max_err(got, ref) <= TOL


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_batch_axes_jit_and_dtype(mode):
    fn = bicubic_resize if mode == "bicubic" else area_resize
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 7, 11, 4), dtype=np.float32)  # two batch axes, H != W
    size = (13, 5)  # up along H, down along W
    ref = torch_resize(x.reshape(6, 7, 11, 4), mode, size=size).reshape(2, 3, 13, 5, 4)
    jitted = jax.jit(fn, static_argnums=1)
    for xb, rb in ((x, ref), (x[0], ref[0]), (x[0, 0], ref[0, 0])):  # [B1, B2, H, W, C], [B, ...], [H, W, C]
        for f in (fn, jitted):
            y = f(xb, size)
            assert y.shape == rb.shape
            assert max_err(y, rb) <= TOL
    # The output keeps the input dtype (weights are applied in float32 for low-precision inputs).
    y16 = fn(jnp.asarray(x[0], jnp.bfloat16), size)
    assert y16.dtype == jnp.bfloat16
    assert max_err(y16, ref[0]) <= 0.05


def test_same_size_is_identity():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 9, 9, 3), dtype=np.float32))
    assert bicubic_resize(x, (9, 9)) is x
    assert area_resize(x, (9, 9)) is x
    # torch agrees: half-pixel cubic at scale 1 samples exactly on the input pixels.
    np.testing.assert_array_equal(torch_resize(np.asarray(x), "bicubic", size=(9, 9)), np.asarray(x))
    np.testing.assert_array_equal(bicubic_matrix(9, 9), np.eye(9, dtype=np.float32))


def test_explicit_scale_factor_matches_torch():
    # bicubic_resize(size, scale_factor) == F.interpolate(scale_factor) with size = floor(in * sf).
    x = np.random.default_rng(7).standard_normal((2, 10, 12, 3), dtype=np.float32)
    sf = (1.37, 0.61)
    ref = torch_resize(x, "bicubic", scale_factor=sf)
    size = ref.shape[1:3]
    assert size == (int(10 * sf[0]), int(12 * sf[1]))
    assert max_err(bicubic_resize(x, size, scale_factor=sf), ref) <= TOL
    # Without the scale factor the samples sit elsewhere: the two conventions really differ.
    assert max_err(bicubic_resize(x, size), ref) > 1e-2


@pytest.mark.parametrize(("in_size", "out"), [(7, 16), (27, 22)])
def test_bicubic_gradient_matches_torch(in_size, out):
    x = np.random.default_rng(8).standard_normal((2, in_size, in_size, 3), dtype=np.float32)
    # Plain sum (as in the spec), and a random cotangent, which is sensitive to every weight, not only to
    # the matrices' column sums.
    for w in (np.ones((2, out, out, 3), np.float32),
              np.random.default_rng(9).standard_normal((2, out, out, 3), dtype=np.float32)):
        g = jax.jit(jax.grad(lambda x, w=w: jnp.sum(bicubic_resize(x, (out, out)) * w)))(x)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = F.interpolate(xt.permute(0, 3, 1, 2), size=(out, out), mode="bicubic", align_corners=False)
        (yt.permute(0, 2, 3, 1) * torch.from_numpy(w)).sum().backward()
        assert max_err(g, xt.grad.numpy()) <= TOL
