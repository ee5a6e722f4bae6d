"""Shared-mapping nearest-code search: one index per token for two codebooks.

For L2-normalised token halves (z_sem [N, Ds], z_pix [N, Dp]) and codebooks (e_sem [K, Ds],
e_pix [K, Dp]) the reference picks

    index = argmin_k  d_sem[n, k] + w_dis * d_pix[n, k],   d[n, k] = |z_n|^2 + |e_k|^2 - 2 z_n . e_k

with the first minimum on ties (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``,
``VectorQuantizer.forward``; w_dis = 1.0 as in paper Table 11). Three implementations share one distance formula:

* :func:`nearest_code_naive` materialises the whole [N, K] matrix (the reference's way);
* :func:`nearest_code_chunked` tiles tokens and codes and keeps a running (min, argmin), so peak
  memory is set by a byte budget instead of N * K; ties stay first-minimum because a later code
  block only wins on a strictly smaller distance;
* :func:`nearest_code_sharded` runs the chunked search on each shard of a codebook split over a
  mesh axis (``jax.shard_map``) and reduces to the global first minimum with two ``pmin``s.

All distances are float32 with HIGHEST matmul precision: TPU's default bf16 passes would flip indices.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tokenflow_jax.errors import ConfigError

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_MEMORY_BYTES = 64 * 2**20


class CodeSearchResult(NamedTuple):
    """indices [N] int32 (first minimum) and the minimal shared distance [N] float32."""

    indices: jax.Array
    distances: jax.Array


def _sq_norm(x: jax.Array) -> jax.Array:
    return jnp.sum(x * x, axis=-1)


def shared_mapping_distances(
    z_sem: jax.Array, z_pix: jax.Array, e_sem: jax.Array, e_pix: jax.Array, w_dis: float
) -> jax.Array:
    """d_sem + w_dis * d_pix for every token/code pair: [N, Ds], [N, Dp], [K, Ds], [K, Dp] -> [N, K].

    Written exactly as the reference (|z|^2 + |e|^2 - 2 z.e per half, then the weighted sum), so the
    rounding matches it as closely as float32 allows.
    """
    z_sem, z_pix, e_sem, e_pix = (a.astype(jnp.float32) for a in (z_sem, z_pix, e_sem, e_pix))
    d_sem = _sq_norm(z_sem)[:, None] + _sq_norm(e_sem)[None, :] - 2.0 * jnp.einsum(
        "nd,kd->nk", z_sem, e_sem, precision=HIGHEST
    )
    d_pix = _sq_norm(z_pix)[:, None] + _sq_norm(e_pix)[None, :] - 2.0 * jnp.einsum(
        "nd,kd->nk", z_pix, e_pix, precision=HIGHEST
    )
    return d_sem + w_dis * d_pix


def nearest_code_naive(
    z_sem: jax.Array, z_pix: jax.Array, e_sem: jax.Array, e_pix: jax.Array, w_dis: float = 1.0
) -> CodeSearchResult:
    """Reference search over the full [N, K] distance matrix."""
    d = shared_mapping_distances(z_sem, z_pix, e_sem, e_pix, w_dis)
    idx = jnp.argmin(d, axis=1).astype(jnp.int32)
    return CodeSearchResult(idx, jnp.take_along_axis(d, idx[:, None], axis=1)[:, 0])


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    for d in range(cap, 0, -1):
        if n % d == 0:
            return d
    return 1


def plan_blocks(num_tokens: int, codebook_size: int, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> tuple[int, int]:
    """(token_block, code_block) so that a block's few [token_block, code_block] float32 temporaries
    fit in ``memory_bytes``. Code blocks divide K exactly; tokens are padded to a block multiple.

    Prefers wide code blocks (long matmul rows) and then as many tokens as the budget allows.
    """
    live_matrices = 4  # d_sem, d_pix, their sum and the argmin's scratch, conservatively
    budget_elems = max(memory_bytes // (4 * live_matrices), 1)
    code_block = _largest_divisor_at_most(codebook_size, min(4096, budget_elems // 8))
    token_block = max(8, min(num_tokens, budget_elems // code_block))
    return token_block, code_block


def first_minimum(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lowest column index of each row's minimum [N] int32, that minimum [N]) of d [N, K].

    Same result as ``argmin`` (first minimum on ties) for NaN-free d, as two plain reductions: XLA:CPU
    lowers argmin to a variadic (value, index) reduce that it does not vectorise, which made the tile
    reduction cost as much as the distance matmuls (bench/quantizer_tile.py).
    """
    m = jnp.min(d, axis=1)
    cols = jax.lax.broadcasted_iota(jnp.int32, d.shape, 1)
    first = jnp.min(jnp.where(d == m[:, None], cols, d.shape[1] - 1), axis=1)
    return first, m


def nearest_code_chunked(
    z_sem: jax.Array,
    z_pix: jax.Array,
    e_sem: jax.Array,
    e_pix: jax.Array,
    w_dis: float = 1.0,
    *,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    blocks: tuple[int, int] | None = None,
) -> CodeSearchResult:
    """Memory-bounded search: same indices as :func:`nearest_code_naive` up to float32 rounding of
    near-ties (exactly the same on exactly-representable inputs), with peak memory independent of K
    beyond the codebook itself.

    Args:
      z_sem, z_pix: [N, Ds], [N, Dp] token halves (already normalised).
      e_sem, e_pix: [K, Ds], [K, Dp] codebooks (already normalised).
      memory_bytes: budget for the distance tiles.
      blocks: explicit (token_block, code_block); code_block must divide K.
    """
    n, k = z_sem.shape[0], e_sem.shape[0]
    token_block, code_block = blocks or plan_blocks(n, k, memory_bytes)
    if k % code_block:
        raise ValueError(f"code block {code_block} must divide the codebook size {k}")
    num_token_blocks = math.ceil(n / token_block)
    pad = num_token_blocks * token_block - n
    zs = jnp.pad(z_sem.astype(jnp.float32), ((0, pad), (0, 0))).reshape(num_token_blocks, token_block, -1)
    zp = jnp.pad(z_pix.astype(jnp.float32), ((0, pad), (0, 0))).reshape(num_token_blocks, token_block, -1)
    es = e_sem.astype(jnp.float32).reshape(k // code_block, code_block, -1)
    ep = e_pix.astype(jnp.float32).reshape(k // code_block, code_block, -1)
    offsets = jnp.arange(k // code_block, dtype=jnp.int32) * code_block

    def search_token_block(z_pair):
        z_s, z_p = z_pair

        def scan_code_block(carry, block):
            best_d, best_i = carry
            e_s, e_p, offset = block
            d = shared_mapping_distances(z_s, z_p, e_s, e_p, w_dis)
            i, m = first_minimum(d)
            better = m < best_d  # strict: an equal distance in a later block never wins
            return (jnp.where(better, m, best_d), jnp.where(better, i + offset, best_i)), None

        init = (jnp.full((token_block,), jnp.inf, jnp.float32), jnp.zeros((token_block,), jnp.int32))
        (best_d, best_i), _ = jax.lax.scan(scan_code_block, init, (es, ep, offsets))
        return best_i, best_d

    idx, dist = jax.lax.map(search_token_block, (zs, zp))
    return CodeSearchResult(idx.reshape(-1)[:n], dist.reshape(-1)[:n])


def nearest_code_sharded(
    z_sem: jax.Array,
    z_pix: jax.Array,
    e_sem: jax.Array,
    e_pix: jax.Array,
    w_dis: float = 1.0,
    *,
    codebook_axis: str | None,
    token_axes: tuple[str, ...] = (),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> CodeSearchResult:
    """Per-device search under the current mesh (``jax.set_mesh``).

    Tokens are split over ``token_axes`` so no device searches another's tokens. With
    ``codebook_axis`` set, the codebook is split over that axis too: each device searches its shard,
    the global minimum is a ``pmin`` over the codebook axis and the global first minimum a second
    ``pmin`` over the candidate indices that reach it. With ``codebook_axis=None`` the codebook is
    replicated and the search is purely local.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or (codebook_axis is not None and codebook_axis not in mesh.axis_names):
        raise ValueError(f"nearest_code_sharded needs an active mesh (with axis {codebook_axis!r})")
    k = e_sem.shape[0]
    shards = mesh.shape[codebook_axis] if codebook_axis else 1
    if k % shards:
        raise ConfigError(f"codebook size {k} is not divisible by mesh axis {codebook_axis!r} of size {shards}; "
                          "change config.quantizer.codebook_size, config.quantizer.codebook_axis or config.mesh.shape")
    token_axes = tuple(a for a in token_axes if a != codebook_axis and mesh.shape[a] > 1)
    if token_axes and z_sem.shape[0] % math.prod(mesh.shape[a] for a in token_axes):
        token_axes = ()  # uneven token split: fall back to every device searching all tokens
    tok = P(token_axes or None, None)
    code = P(codebook_axis, None)

    def local_search(z_s, z_p, e_s, e_p):
        local = nearest_code_chunked(z_s, z_p, e_s, e_p, w_dis, memory_bytes=memory_bytes)
        if codebook_axis is None:
            return local.indices, local.distances
        global_idx = local.indices + jax.lax.axis_index(codebook_axis).astype(jnp.int32) * (k // shards)
        best = jax.lax.pmin(local.distances, codebook_axis)
        candidate = jnp.where(local.distances == best, global_idx, jnp.int32(k))
        return jax.lax.pmin(candidate, codebook_axis), best

    out = P(token_axes or None)
    # check_vma=False: the scan carry starts replicated and becomes device-varying once it meets
    # the codebook shard; the outputs are made uniform over the codebook axis by the pmins above.
    idx, dist = jax.shard_map(
        local_search, mesh=mesh, in_specs=(tok, tok, code, code), out_specs=(out, out), check_vma=False
    )(z_sem, z_pix, e_sem, e_pix)
    return CodeSearchResult(idx, dist)
