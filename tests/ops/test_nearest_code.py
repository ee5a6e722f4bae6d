"""Chunked and sharded nearest-code search against the naive [N, K] search.

Two kinds of inputs:
* dyadic values (multiples of 1/2, as small as 0 or 1) make every distance exactly representable, so
  all three searches must agree bit for bit, ties included (first minimum);
* random unit vectors, where float32 rounding may legitimately flip near-ties: indices must agree
  wherever the naive best and second-best distances are apart by more than float32 noise, and a
  disagreeing pick must be within that noise of the minimum.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax.ops import nearest_code as nc

NEAR_TIE = 1e-5  # distances are O(4); float32 rounding of d is ~5e-7


def dyadic(rng, n, dim):
    return (rng.integers(-1, 2, size=(n, dim)) * 0.5).astype(np.float32)


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_search(result, z_s, z_p, e_s, e_p, w_dis=1.0):
    """Gap-aware equality with the naive search (see module docstring)."""
    d = np.asarray(nc.shared_mapping_distances(z_s, z_p, e_s, e_p, w_dis))
    ref = np.argmin(d, axis=1)
    got = np.asarray(result.indices)
    sorted_d = np.sort(d, axis=1)
    clear = sorted_d[:, 1] - sorted_d[:, 0] > NEAR_TIE
    np.testing.assert_array_equal(got[clear], ref[clear])
    chosen = d[np.arange(len(got)), got]
    assert np.all(chosen - sorted_d[:, 0] <= NEAR_TIE)
    np.testing.assert_allclose(np.asarray(result.distances), sorted_d[:, 0], atol=NEAR_TIE)


def test_exact_ties_pick_the_first_minimum_across_blocks(rng):
    n, k = 200, 256
    z_s, z_p, e_s, e_p = dyadic(rng, n, 32), dyadic(rng, n, 8), dyadic(rng, k, 32), dyadic(rng, k, 8)
    # Duplicate codes in different code blocks (block size 32): the lower index must win.
    e_s[200:210], e_p[200:210] = e_s[10:20], e_p[10:20]
    z_s[:10], z_p[:10] = e_s[10:20], e_p[10:20]  # tokens sitting exactly on the duplicated codes
    naive = nc.nearest_code_naive(z_s, z_p, e_s, e_p)
    d = np.asarray(nc.shared_mapping_distances(z_s, z_p, e_s, e_p, 1.0))
    assert (np.sum(d == d.min(1, keepdims=True), axis=1) > 1).sum() > 10  # there really are ties
    np.testing.assert_array_equal(np.asarray(naive.indices), np.argmin(d, axis=1))
    assert np.all(np.asarray(naive.indices)[:10] < 200)
    for blocks in [(64, 32), (7, 256), (200, 8), (13, 128)]:
        chunked = jax.jit(lambda *a, b=blocks: nc.nearest_code_chunked(*a, blocks=b))(z_s, z_p, e_s, e_p)
        np.testing.assert_array_equal(np.asarray(chunked.indices), np.asarray(naive.indices), err_msg=str(blocks))
        np.testing.assert_array_equal(np.asarray(chunked.distances), np.asarray(naive.distances))


def test_sharded_search_exact_ties(rng, mesh222):
    n, k = 256, 512
    z_s, z_p, e_s, e_p = dyadic(rng, n, 32), dyadic(rng, n, 8), dyadic(rng, k, 32), dyadic(rng, k, 8)
    e_s[300:320], e_p[300:320] = e_s[0:20], e_p[0:20]  # duplicates in the other codebook shard
    z_s[:20], z_p[:20] = e_s[:20], e_p[:20]
    naive = nc.nearest_code_naive(z_s, z_p, e_s, e_p)
    with jax.set_mesh(mesh222):
        for axis, tokens in [("tensor", ("data", "fsdp")), ("fsdp", ("data",)), (None, ("data", "fsdp", "tensor"))]:
            found = jax.jit(
                lambda *a, ax=axis, t=tokens: nc.nearest_code_sharded(*a, codebook_axis=ax, token_axes=t)
            )(z_s, z_p, e_s, e_p)
            np.testing.assert_array_equal(np.asarray(found.indices), np.asarray(naive.indices), err_msg=str(axis))
    assert np.all(np.asarray(naive.indices)[:20] < 20)


def test_w_dis_weights_the_pixel_distance(rng):
    z_s, z_p, e_s, e_p = unit(rng, 300, 32), unit(rng, 300, 8), unit(rng, 1024, 32), unit(rng, 1024, 8)
    for w in (0.0, 0.5, 2.0):
        found = nc.nearest_code_chunked(z_s, z_p, e_s, e_p, w, blocks=(128, 256))
        assert_same_search(found, z_s, z_p, e_s, e_p, w)
        d = (2 - 2 * z_s @ e_s.T) + w * (2 - 2 * z_p @ e_p.T)
        assert (np.asarray(found.indices) == np.argmin(d, 1)).mean() > 0.99


@pytest.mark.parametrize("k", [32768, 131072, 1048576])
def test_large_codebooks(rng, k):
    n = 96
    z_s, z_p, e_s, e_p = unit(rng, n, 32), unit(rng, n, 8), unit(rng, k, 32), unit(rng, k, 8)
    tokens, codes = nc.plan_blocks(n, k)
    assert k % codes == 0 and tokens * codes * 4 * 4 <= nc.DEFAULT_MEMORY_BYTES
    found = jax.jit(nc.nearest_code_chunked)(z_s, z_p, e_s, e_p)
    assert_same_search(found, z_s, z_p, e_s, e_p)


def test_block_plan_bounds_memory():
    for n, k in [(52288, 32768), (52288, 1048576), (10, 7), (1, 1)]:
        for budget in (2**20, 64 * 2**20):
            tokens, codes = nc.plan_blocks(n, k, budget)
            assert k % codes == 0 and tokens >= 1
            assert tokens * codes * 16 <= max(budget, 16 * 8 * codes)
    with pytest.raises(ValueError, match="must divide"):
        nc.nearest_code_chunked(*(jnp.zeros((4, d)) for d in (32, 8)), *(jnp.zeros((10, d)) for d in (32, 8)),
                                blocks=(4, 3))


def test_first_minimum_equals_argmin_with_ties(rng):
    d = rng.integers(0, 5, size=(64, 37)).astype(np.float32)  # many exact ties
    i, m = nc.first_minimum(jnp.asarray(d))
    np.testing.assert_array_equal(np.asarray(i), np.argmin(d, axis=1))
    np.testing.assert_array_equal(np.asarray(m), d.min(axis=1))
