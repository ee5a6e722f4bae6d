"""``tokenflow_jax.ops.cross_entropy`` against ``torch.nn.functional.cross_entropy`` (values and gradients) and
against the log-softmax composition it replaces (bit-identical forward values)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_jax.ops.cross_entropy import softmax_cross_entropy


def _inputs(shape, vocab, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((*shape, vocab)) * scale).astype(np.float32)
    targets = rng.integers(0, vocab, size=shape).astype(np.int32)
    return logits, targets


def _torch_loss_and_grad(logits, targets, weights):
    x = torch.from_numpy(logits).requires_grad_(True)
    nll = F.cross_entropy(x.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1).long(),
                          reduction="none").reshape(targets.shape)
    loss = (nll * torch.from_numpy(weights)).sum()
    loss.backward()
    return nll.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("shape,vocab", [((3, 5), 7), ((2, 9), 1000)])
def test_values_and_gradient_match_torch(shape, vocab):
    logits, targets = _inputs(shape, vocab)
    weights = np.random.default_rng(1).uniform(0, 2, size=shape).astype(np.float32)  # a non-uniform cotangent
    ref_nll, ref_grad = _torch_loss_and_grad(logits, targets, weights)

    def loss(x):
        return jnp.sum(softmax_cross_entropy(x, jnp.asarray(targets)) * weights)

    nll = np.asarray(jax.jit(softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(targets)))
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(logits)))
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert np.abs(grad).max() > 0.1  # a real gradient, not zeros


def test_forward_is_bit_identical_to_log_softmax_and_gradient_to_float_rounding():
    logits, targets = _inputs((4, 6), 513, seed=2, scale=10.0)
    x, t = jnp.asarray(logits), jnp.asarray(targets)

    def reference(x):
        logp = jax.nn.log_softmax(x, axis=-1)
        return -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]

    np.testing.assert_array_equal(np.asarray(jax.jit(softmax_cross_entropy)(x, t)), np.asarray(jax.jit(reference)(x)))
    ours = jax.jit(jax.grad(lambda x: jnp.mean(softmax_cross_entropy(x, t))))(x)
    theirs = jax.jit(jax.grad(lambda x: jnp.mean(reference(x))))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-8)


def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_float32():
    logits, targets = _inputs((2, 3), 50, seed=3)
    x = jnp.asarray(logits, jnp.bfloat16)
    nll = softmax_cross_entropy(x, jnp.asarray(targets))
    grad = jax.grad(lambda x: jnp.sum(softmax_cross_entropy(x, jnp.asarray(targets))))(x)
    assert nll.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    ref_nll, ref_grad = _torch_loss_and_grad(np.array(x.astype(jnp.float32)), targets, np.ones((2, 3), np.float32))
    np.testing.assert_allclose(np.asarray(nll), ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), ref_grad, atol=1e-2)  # bfloat16 rounding
