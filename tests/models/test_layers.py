"""Shared layers against torch.nn.functional on random inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_jax.models import layers


@pytest.mark.parametrize("shape,groups", [((2, 16, 12, 64), 32), ((1, 8, 8, 96), 32), ((3, 5, 7, 8), 4),
                                          ((2, 10, 6), 2)])
def test_group_norm_matches_torch(rng, shape, groups):
    x = (rng.normal(size=shape) * 3 + 1.5).astype(np.float32)
    c = shape[-1]
    scale = rng.normal(size=(c,)).astype(np.float32)
    bias = rng.normal(size=(c,)).astype(np.float32)
    ours = layers.group_norm(groups).apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))

    channels_first = torch.tensor(np.moveaxis(x, -1, 1))
    ref = F.group_norm(channels_first, groups, torch.tensor(scale), torch.tensor(bias), eps=1e-6)
    np.testing.assert_allclose(np.asarray(ours), np.moveaxis(ref.numpy(), 1, -1), rtol=0, atol=2e-5)


def test_group_norm_params_init_and_constant_groups():
    norm = layers.group_norm(4)
    x = jnp.ones((1, 3, 3, 8))
    variables = norm.init(jax.random.key(0), x)
    params = jax.tree.map(np.asarray, nn.unbox(variables))["params"]
    assert sorted(params) == ["bias", "scale"] and np.all(params["scale"] == 1) and np.all(params["bias"] == 0)
    y = norm.apply(variables, x)  # zero variance: normalised to 0, no NaN
    assert np.all(np.asarray(y) == 0)
    with pytest.raises(ValueError, match="groups"):
        layers.group_norm(32).init(jax.random.key(0), jnp.ones((1, 2, 2, 48)))
