"""Sampling primitives of the next-scale text-to-image sampler (paper Table 6; ByteFlow-AI/TokenFlow
``t2i/llava_t2i/model/language_model/llava_llama.py``, ``autoregressive_infer_cfg``).

Per scale index ``si`` of ``n`` scales the reference

1. ramps the classifier-free-guidance weight linearly, ``t = cfg * si / (n - 1)`` (0 at the 1x1 scale),
   and combines ``(1 + t) * cond - t * uncond`` (:func:`guidance_scale`, :func:`apply_guidance`);
2. sets every id outside the image-code range to -inf (:func:`mask_to_range`);
3. filters with VAR's ``sample_with_top_k_top_p_`` and draws one token per position
   (:func:`top_k_top_p_filter`, :func:`sample`), using the next ``(top_k, top_p)`` pair of the
   multi-step strategy on every refinement pass (:class:`SamplingSchedule`).

Filter semantics, exactly as VAR:

* top-k keeps every logit ``>=`` the k-th largest, so ties at the threshold all survive;
  ``top_k <= 0`` or ``top_k >= V`` disables it;
* top-p then sorts the (already top-k-filtered) logits ascending, takes the softmax cumulative sum and
  drops the tokens whose cumulative mass is ``<= 1 - top_p``, always keeping the largest one;
  ``top_p <= 0`` disables it. ``top_p >= 1`` keeps everything (VAR would still drop tokens whose float32
  probability underflows to exactly 0, which cannot change a draw).

The sort is stable, so among equal logits straddling the top-p boundary the lower ids are dropped
first; torch's default (unstable) sort in the reference leaves that order unspecified. Draws use
``jax.random.categorical`` (Gumbel-max), so they match the reference in distribution, not sample by
sample.

``top_k`` / ``top_p`` are meant to be static Python numbers (one pair per pass; the disabled cases
then cost nothing, ``top_k == 1`` is a plain argmax, and a static ``0 < top_k < V`` spares top-p its
sort of the vocabulary: only the ``top_k`` candidates are ordered, with bit-identical results, see
:func:`_top_k_top_p_candidates`). Traced scalars work too, at the price of one full sort for top-k,
one for top-p and both branches always computed; a traced ``top_p`` forms ``1 - top_p`` in float32
instead of Python's float64, which can move the boundary by one float32 ulp.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import ConfigError

DEFAULT_TOP_K = (1200, 100, 1)
DEFAULT_TOP_P = (0.8, 0.8, 0.0)
# `multi_step_infer_strategy` of the reference, keyed by the number of passes per scale.
STRATEGY_PRESETS: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {
    1: ((600,), (0.6,)),
    2: ((1200, 1), (0.8, 0.0)),
    3: (DEFAULT_TOP_K, DEFAULT_TOP_P),
}


def _is_static(x) -> bool:
    return isinstance(x, numbers.Number | np.generic) and not isinstance(x, jax.Array)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------


def guidance_scale(cfg: float, scale_index: int | jax.Array, num_scales: int) -> float | jax.Array:
    """The guidance weight ``t = cfg * scale_index / (num_scales - 1)`` of one scale.

    A linear ramp from 0 at the 1x1 scale (``scale_index == 0``) to ``cfg`` at the last scale; a single
    scale gets 0. ``num_scales`` must be a Python int; ``scale_index`` may be traced (e.g. a
    ``fori_loop`` counter), in which case a float32 scalar is returned, else a Python float.
    """
    if not isinstance(num_scales, numbers.Integral) or num_scales < 1:
        raise ValueError(f"guidance_scale: num_scales must be a positive int, got {num_scales!r}")
    if _is_static(scale_index) and not 0 <= scale_index < num_scales:
        raise ValueError(f"guidance_scale: scale_index must be in [0, {num_scales}), got {scale_index!r}")
    if num_scales == 1:
        return 0.0 if _is_static(scale_index) else jnp.zeros((), jnp.float32)
    if _is_static(scale_index):
        return float(cfg) * float(scale_index) / (num_scales - 1)
    return jnp.asarray(cfg, jnp.float32) * jnp.asarray(scale_index, jnp.float32) / (num_scales - 1)


def apply_guidance(cond_logits: jax.Array, uncond_logits: jax.Array, t: float | jax.Array) -> jax.Array:
    """``(1 + t) * cond - t * uncond`` in float32: [..., V], [..., V] -> [..., V] float32.

    ``t`` is a scalar or anything broadcasting against the logits (e.g. [B, 1, 1] per row).
    """
    cond = jnp.asarray(cond_logits, jnp.float32)
    uncond = jnp.asarray(uncond_logits, jnp.float32)
    if cond.shape != uncond.shape:
        raise ValueError(f"apply_guidance: cond_logits {cond.shape} and uncond_logits {uncond.shape} differ")
    t = jnp.asarray(t, jnp.float32)
    return (1.0 + t) * cond - t * uncond


# ----------------------------------------------------------------------------------------------------
# Vocabulary masking, top-k / top-p filtering, sampling
# ----------------------------------------------------------------------------------------------------


def mask_to_range(logits: jax.Array, start: int | jax.Array, stop: int | jax.Array) -> jax.Array:
    """Set logits of ids outside ``[start, stop)`` to -inf: [..., V] -> [..., V] (same dtype).

    The reference uses this to forbid text ids (everything below ``<vq_token_0>``) when the image
    codes live at the end of an extended vocabulary. Static bounds are checked; the range must be
    non-empty, otherwise the following softmax would be NaN.
    """
    vocab = logits.shape[-1]
    if _is_static(start) and _is_static(stop) and not 0 <= start < stop <= vocab:
        raise ValueError(f"mask_to_range: need 0 <= start < stop <= V={vocab}, got start={start}, stop={stop}")
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    keep = (ids >= start) & (ids < stop)
    return jnp.where(keep, logits, jnp.asarray(-jnp.inf, logits.dtype))


def _top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` behind an optimisation barrier.

    XLA (CPU at least) lowers top-k as a full sort plus a slice and turns that back into a cheap
    partial-sort kernel only when every use slices from 0; a later ``[..., k - 1]`` read gets folded
    into the sort's slice and the whole row is sorted (10x slower at V = 32768). The barrier keeps the
    slices apart.
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(logits, k))


def _top_k_mask(logits: jax.Array, top_k) -> jax.Array:
    vocab = logits.shape[-1]
    if _is_static(top_k):
        if top_k <= 0 or top_k >= vocab:
            return logits
        kth_largest = _top_k(logits, int(top_k))[0][..., -1:]
        return jnp.where(logits < kth_largest, -jnp.inf, logits)
    top_k = jnp.asarray(top_k, jnp.int32)
    ascending = jnp.sort(logits, axis=-1)
    position = jnp.clip(vocab - top_k, 0, vocab - 1)
    kth_largest = jax.lax.dynamic_index_in_dim(ascending, position, axis=logits.ndim - 1, keepdims=True)
    enabled = (top_k > 0) & (top_k < vocab)
    return jnp.where(enabled & (logits < kth_largest), -jnp.inf, logits)


def _top_p_disabled(top_p) -> bool:
    return _is_static(top_p) and (top_p <= 0 or top_p >= 1)


def _top_p_remove_sorted(ascending: jax.Array, top_p) -> tuple[jax.Array, bool | jax.Array]:
    """VAR's top-p cut on logits sorted ascending over the whole vocabulary: (remove flags, enabled)."""
    if _is_static(top_p):
        enabled = True
    else:
        top_p = jnp.asarray(top_p, jnp.float32)
        enabled = (top_p > 0) & (top_p < 1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    return remove_sorted.at[..., -1].set(False), enabled  # the largest logit always survives


def _top_p_mask(logits: jax.Array, top_p) -> jax.Array:
    """Top-p by one stable sort of the whole vocabulary (any logits, any ``top_p``)."""
    if _top_p_disabled(top_p):
        return logits
    order = jnp.argsort(logits, axis=-1, stable=True)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    remove_sorted, enabled = _top_p_remove_sorted(ascending, top_p)
    remove = jnp.put_along_axis(jnp.zeros_like(remove_sorted), order, remove_sorted, axis=-1, inplace=False)
    return jnp.where(enabled & remove, -jnp.inf, logits)


def _tie_slack(top_k: int) -> int:
    """Candidates :func:`_top_k_top_p_candidates` takes beyond ``top_k``, for ties at the k-th largest logit."""
    return max(64, top_k // 16)


def _top_k_top_p_candidates(logits: jax.Array, top_k: int, top_p) -> jax.Array:
    """Top-k then top-p for a static ``0 < top_k < V`` without sorting the vocabulary.

    Bit-for-bit ``_top_p_mask(_top_k_mask(logits, top_k), top_p)``. That path sorts the top-k-filtered
    row stably: the ``V - m`` removed entries (-inf) first, then the ``m >= top_k`` survivors (every
    logit ``>=`` the k-th largest; ties make ``m > top_k``) by (value, id). The softmax, the cumulative
    sum and the cut then run on that sorted row. Here:

    * ``lax.top_k`` over ``w = top_k + slack`` logits gives the candidates, descending, equal values
      in increasing id order (its documented tie rule; zeros are made +0 first, since ``top_k`` orders
      -0 below +0 while the sort treats them as equal). Every logit above the k-th largest is a
      candidate, so the sorted row is ``V - m`` times -inf, ``m - a`` times the k-th largest ``kth``
      (``a`` = the candidates above it), then the candidates above ``kth`` reversed. That row is built
      elementwise over V and the same softmax / cumsum / cut (:func:`_top_p_remove_sorted`) run on it,
      so the same ops see the same values (the sign of a zero logit cannot change ``exp(x - max)``);
      tests/ops/test_sampling.py checks the bits against the full-sort path.
    * Both orders keep each group of equal values in increasing id order, so a candidate at descending
      index ``j`` of a group spanning ``[s, e)`` sits at sorted position ``V - e + (j - s)``; for the
      group of ``kth`` ``e = m``, as the ``top_k`` candidates are its lowest ids. Its cut flag is read
      there and scattered to its id.
    * Survivors beyond the candidates (``m > w``: more ties at ``kth`` than the slack) are the rest of
      ``kth``'s group, at sorted positions ``V - m + (w - a) + rank`` with ``rank`` their order by id;
      that needs a cumulative count over the vocabulary, done only when some row has them
      (``lax.cond``; under ``vmap`` both branches run, which stays exact).
    * A row holding a NaN survivor gets an all-NaN softmax in the sorted path, which removes nothing;
      such rows are left as top-k filtered.
    """
    vocab = logits.shape[-1]
    axis = logits.ndim - 1
    width = min(vocab - 1, top_k + _tie_slack(top_k))
    values, ids = _top_k(jnp.where(logits == 0, 0.0, logits), width)
    kth_largest = values[..., top_k - 1 : top_k]
    filtered = jnp.where(logits < kth_largest, -jnp.inf, logits)  # == _top_k_mask(logits, top_k)
    survivors = jnp.sum(~(logits < kth_largest), axis=-1, keepdims=True)
    has_nan = jnp.any(jnp.isnan(logits), axis=-1, keepdims=True)
    above = jnp.sum(values > kth_largest, axis=-1, keepdims=True)

    position = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    reversed_values = jax.lax.pad(jax.lax.rev(values, (axis,)), jnp.float32(-jnp.inf),
                                  [(0, 0, 0)] * axis + [(vocab - width, 0, 0)])
    ascending = jnp.where(position >= vocab - above, reversed_values,
                          jnp.where(position >= vocab - survivors, kth_largest, -jnp.inf))
    remove_sorted, enabled = _top_p_remove_sorted(ascending, top_p)

    j = jax.lax.broadcasted_iota(jnp.int32, values.shape, axis)
    differs = values[..., 1:] != values[..., :-1]
    edge = jnp.ones(values.shape[:-1] + (1,), bool)
    start = jax.lax.cummax(jnp.where(jnp.concatenate([edge, differs], -1), j, 0), axis=axis)
    end = jax.lax.cummin(jnp.where(jnp.concatenate([differs, edge], -1), j + 1, width), axis=axis, reverse=True)
    end = jnp.where(values == kth_largest, survivors, end)
    sorted_position = jnp.clip(vocab - end + (j - start), 0, vocab - 1)  # junk for non-survivors, unused
    candidate_remove = jnp.take_along_axis(remove_sorted, sorted_position, axis=-1)
    remove = jnp.put_along_axis(jnp.zeros(logits.shape, bool), ids, candidate_remove, axis=-1, inplace=False)

    def remove_beyond_candidates(remove):
        candidate = jnp.put_along_axis(jnp.zeros(logits.shape, bool), ids, True, axis=-1, inplace=False)
        beyond = ~(logits < kth_largest) & ~candidate
        # Exact in any order (integers). Not jnp.cumsum: its V-wide reduce-window is V^2 adds to XLA's
        # cost analysis of the lowered HLO, which the FLOP figures of bench/sample.py read.
        rank = jax.lax.associative_scan(jnp.add, beyond.astype(jnp.int32), axis=axis) - 1
        at = jnp.clip(vocab - survivors + (width - above) + rank, 0, vocab - 1)
        return remove | (beyond & jnp.take_along_axis(remove_sorted, at, axis=-1))

    remove = jax.lax.cond(jnp.any(survivors > width), remove_beyond_candidates, lambda r: r, remove)
    return jnp.where(enabled & remove & ~has_nan, -jnp.inf, filtered)


def top_k_top_p_filter(logits: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 0.0) -> jax.Array:
    """VAR's top-k then top-p filter: [..., V] -> [..., V] float32, removed entries -inf.

    Kept entries keep their (float32) value. ``top_k`` / ``top_p``: Python numbers (preferred, pass them
    as static arguments under ``jax.jit``) or traced scalars; see the module docstring for the exact
    rules and disabled values.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if _is_static(top_k) and 0 < top_k < logits.shape[-1] and not _top_p_disabled(top_p):
        return _top_k_top_p_candidates(logits, int(top_k), top_p)
    return _top_p_mask(_top_k_mask(logits, top_k), top_p)


def sample(key: jax.Array, logits: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 0.0) -> jax.Array:
    """Filter with :func:`top_k_top_p_filter`, then draw one id per position: [..., V] -> int32 [...].

    A static ``top_k == 1`` is an argmax (greedy; ``key`` unused). It equals VAR except on exactly tied
    maxima, where argmax takes the lowest id and VAR draws among them uniformly.
    """
    if _is_static(top_k) and top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = top_k_top_p_filter(logits, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Multi-step strategy
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """The per-pass ``(top_k, top_p)`` lists of the multi-step sampler (``multi_step_infer_strategy``).

    Pass 0 drafts a scale, passes 1.. re-predict it conditioned on the draft; the 1x1 scale only gets
    pass 0. ``top_k`` entries are ints >= 0 (0 disables top-k), ``top_p`` entries floats in [0, 1]
    (0 disables top-p). Lists are accepted and stored as tuples.
    """

    top_k: tuple[int, ...] = DEFAULT_TOP_K
    top_p: tuple[float, ...] = DEFAULT_TOP_P

    def __post_init__(self):
        top_k = _as_tuple("top_k", self.top_k)
        top_p = _as_tuple("top_p", self.top_p)
        if len(top_k) != len(top_p):
            raise ConfigError(
                f"SamplingSchedule: top_k has {len(top_k)} entries {list(top_k)} but top_p has {len(top_p)} "
                f"{list(top_p)}; give one (top_k, top_p) pair per pass"
            )
        for i, k in enumerate(top_k):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise ConfigError(f"SamplingSchedule: top_k[{i}] must be an int >= 0 (0 disables top-k), got {k!r}")
        for i, p in enumerate(top_p):
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and 0 <= p <= 1):
                raise ConfigError(
                    f"SamplingSchedule: top_p[{i}] must be a float in [0, 1] (0 disables top-p), got {p!r}"
                )
        object.__setattr__(self, "top_k", tuple(int(k) for k in top_k))
        object.__setattr__(self, "top_p", tuple(float(p) for p in top_p))

    @classmethod
    def preset(cls, loops: int) -> SamplingSchedule:
        """The reference strategy with ``loops`` passes per scale (1, 2 or 3; 3 is the paper default)."""
        if loops not in STRATEGY_PRESETS:
            raise ConfigError(f"SamplingSchedule.preset: loops must be one of {sorted(STRATEGY_PRESETS)}, "
                              f"got {loops!r}")
        top_k, top_p = STRATEGY_PRESETS[loops]
        return cls(top_k, top_p)

    @property
    def num_passes(self) -> int:
        return len(self.top_k)

    def passes(self, scale_index: int) -> tuple[tuple[int, float], ...]:
        """The ``(top_k, top_p)`` pairs used at one scale: only the first for scale 0, all otherwise."""
        pairs = tuple(zip(self.top_k, self.top_p))
        return pairs[:1] if scale_index == 0 else pairs

    def num_forward_passes(self, num_scales: int) -> int:
        """Model forwards for a whole image: ``1 + (num_scales - 1) * num_passes`` (25 for 9 scales, 3 passes)."""
        return 1 + (num_scales - 1) * self.num_passes


def _as_tuple(name: str, values) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ConfigError(f"SamplingSchedule: {name} must be a list of per-pass values, got {values!r}")
    values = tuple(values.tolist() if isinstance(values, np.ndarray) else values)
    if not values:
        raise ConfigError(f"SamplingSchedule: {name} is empty; give at least one pass")
    return values
