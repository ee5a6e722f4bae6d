"""The convolution with a matmul weight gradient: same values and gradients as XLA's convolution, and
flax's nn.Conv (through layers.conv) really takes it on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax.models import layers
from tokenflow_jax.ops import conv as conv_ops

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel,padding,stride", [(3, ((1, 1), (1, 1)), 1), (1, ((0, 0), (0, 0)), 1),
                                                   (3, ((0, 1), (0, 1)), 2), (3, ((2, 0), (1, 1)), 1)])
def test_values_and_gradients_match_xla(rng, kernel, padding, stride):
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 6)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 6, 5)).astype(np.float32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=dn)))

    np.testing.assert_allclose(conv_ops.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn),
                               jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn),
                               rtol=0, atol=1e-6)
    ours = jax.grad(loss(conv_ops.conv_general_dilated), (0, 1))(x, w)
    theirs = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_layers_conv_uses_it_and_keeps_the_param_tree(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)).astype(np.float32))
    conv = layers.conv(6, 3, padding=1)
    variables = conv.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2)))(variables))
    # On CPU the weight gradient is a matmul per tap, scanned (XLA's own path has no matmul at all).
    assert jaxpr.count("dot_general[") == 1 and "scan[" in jaxpr
    unboxed = layers.nn.unbox(variables)
    assert sorted(unboxed["params"]) == ["bias", "kernel"] and unboxed["params"]["kernel"].shape == (3, 3, 4, 6)


def test_a_multi_device_mesh_keeps_xla_weight_gradients(rng, mesh222):
    # Under a sharded mesh the per-tap scan would put collectives inside a loop body (a deadlock on
    # XLA:CPU's fake devices, see ops/conv.py); traced under jax.set_mesh, layers.conv falls back.
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 4)).astype(np.float32))
    assert conv_ops.matmul_weight_grad_applies()
    with jax.set_mesh(mesh222):
        assert not conv_ops.matmul_weight_grad_applies()
        conv = layers.conv(6, 3, padding=1)
        variables = conv.init(jax.random.key(0), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2)))(variables))
    assert "scan[" not in jaxpr and "dot_general[" not in jaxpr
