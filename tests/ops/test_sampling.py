"""Sampling primitives against a torch re-implementation of VAR's `sample_with_top_k_top_p_`."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenflow_jax.ops import sampling


def var_filter_torch(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """VAR's filter (models/helpers.py) in torch, for any batch dims: [..., V] -> [..., V].

    Differences from the original, both deliberate: top_k is clamped to V (torch.topk raises above V;
    k == V already removes nothing) and the sort is stable, so ties at the top-p boundary are ordered.
    """
    x = torch.from_numpy(np.array(logits, np.float32))
    vocab = x.shape[-1]
    if top_k > 0:
        kth = x.topk(min(top_k, vocab), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        x = x.masked_fill(x < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = x.sort(dim=-1, descending=False, stable=True)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        remove = sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove)
        x = x.masked_fill(remove, -torch.inf)
    return x.numpy()


def assert_same_filter(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    kept = np.isfinite(want)
    np.testing.assert_array_equal(got[kept], want[kept])


VOCAB = 64
PAIRS = [
    (0, 0.0), (1, 0.0), (1, 0.8), (2, 0.0), (5, 0.0), (5, 0.8), (10, 0.5), (30, 0.95), (0, 0.3), (0, 0.9),
    (0, 0.999), (0, 1e-9), (7, 1e-9), (63, 0.8), (VOCAB, 0.8), (VOCAB + 7, 0.3), (20, 1.0), (0, 1.0),
    (-3, 0.6), (12, -0.5),
]


def _logits(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "normal":
        return (3.0 * rng.standard_normal((2, 3, VOCAB))).astype(np.float32)
    # Small integers: many exact ties at both the top-k threshold and the top-p boundary.
    return rng.integers(-4, 5, size=(4, 5, VOCAB)).astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_filter_matches_var_static(kind):
    logits = _logits(kind)
    # Eager op-by-op dispatch: one XLA compile per pair under jit would dominate the test's time.
    for top_k, top_p in PAIRS:
        want = var_filter_torch(logits, top_k, top_p)
        got = sampling.top_k_top_p_filter(logits, top_k, top_p)
        assert_same_filter(got, want)
        # The filter really filtered where it should (guards against a reference that does nothing).
        removed = np.isneginf(want).sum(-1)
        if 0 < top_k < VOCAB and kind == "normal":
            assert (removed >= VOCAB - top_k).all(), (top_k, top_p)
        if top_k <= 0 and (top_p <= 0 or top_p >= 1):
            assert (removed == 0).all(), (top_k, top_p)


# A traced top_p forms 1 - p from float32(p), while torch rounds Python's float64 1 - p: for p = 0.8 the
# thresholds are 0.19999999 and 0.2, and integer logits put cumulative masses exactly on 0.2. With p
# exactly representable in float32 both thresholds agree, so the tie case uses such p.
DYADIC_PAIRS = [
    (0, 0.0), (1, 0.75), (5, 0.75), (10, 0.5), (30, 0.875), (0, 0.25), (0, 0.96875), (63, 0.75),
    (VOCAB, 0.75), (VOCAB + 7, 0.25), (20, 1.0), (-3, 0.625), (12, -0.5),
]


@pytest.mark.parametrize("kind, pairs", [("normal", PAIRS), ("normal", DYADIC_PAIRS), ("ties", DYADIC_PAIRS)])
def test_filter_matches_var_traced(kind, pairs):
    logits = _logits(kind)
    filt = jax.jit(sampling.top_k_top_p_filter)
    for top_k, top_p in pairs:
        got = filt(logits, jnp.int32(top_k), jnp.float32(top_p))
        assert_same_filter(got, var_filter_torch(logits, top_k, top_p))


def test_filter_jit_static():
    logits = _logits("ties")
    filt = jax.jit(sampling.top_k_top_p_filter, static_argnums=(1, 2))
    for top_k, top_p in [(5, 0.8), (0, 0.9)]:
        assert_same_filter(filt(logits, top_k, top_p), var_filter_torch(logits, top_k, top_p))


def test_filter_hand_cases():
    # Ties at the k-th largest are all kept.
    logits = np.array([1.0, 3.0, 3.0, 2.0, 3.0], np.float32)
    got = np.asarray(sampling.top_k_top_p_filter(logits, 2, 0.0))
    np.testing.assert_array_equal(got, [-np.inf, 3.0, 3.0, -np.inf, 3.0])
    # p = 0.75: ascending cumulative mass .05, .20, .50, 1.0 -> the two smallest (<= .25) go.
    probs = np.array([0.3, 0.05, 0.5, 0.15], np.float32)
    got = np.asarray(sampling.top_k_top_p_filter(np.log(probs), 0, 0.75))
    np.testing.assert_array_equal(np.isneginf(got), [False, True, False, True])
    # A tiny p keeps only the largest, never nothing: float32(1 - 1e-9) == 1 >= every cumulative mass,
    # so without VAR's "keep the last" guard the whole row would go.
    for tiny_p in (1e-6, 1e-9):
        got = np.asarray(sampling.top_k_top_p_filter(np.log(probs), 0, tiny_p))
        np.testing.assert_array_equal(np.isneginf(got), [True, True, False, True])
    # bf16 input comes back float32 with the same values.
    got = sampling.top_k_top_p_filter(jnp.asarray(probs, jnp.bfloat16), 2, 0.0)
    assert got.dtype == jnp.float32


# Known probabilities, the expected survivors of each (top_k, top_p) pair worked out by hand.
PROBS = np.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
SURVIVORS = {
    (0, 0.0): [0, 1, 2, 3, 4, 5],
    (3, 0.0): [0, 1, 2],
    # ascending cumulative .05 .13 .25 .45 .70 1.0; <= .5 removes ids 5, 4, 3, 2
    (0, 0.5): [0, 1],
    # top-4 renormalised (/.87): .345 .287 .230 .138; ascending cumulative .138 .368 ...; <= .1 removes none
    (4, 0.9): [0, 1, 2, 3],
    # ... <= .4 removes ids 3 and 2
    (4, 0.6): [0, 1],
}
NUM_DRAWS = 20_000
# Frequency standard error is at most sqrt(.25 / 20000) = .0035; .015 is > 4 sigma.
FREQ_ATOL = 0.015


@pytest.mark.parametrize("pair", list(SURVIVORS))
def test_sample_frequencies(pair):
    top_k, top_p = pair
    logits = jnp.asarray(np.log(PROBS), jnp.float32)
    keys = jax.random.split(jax.random.key(sum(map(ord, str(pair)))), NUM_DRAWS)
    draws = jax.jit(jax.vmap(lambda k: sampling.sample(k, logits, top_k, top_p)))(keys)
    assert draws.dtype == jnp.int32 and draws.shape == (NUM_DRAWS,)
    counts = np.bincount(np.asarray(draws), minlength=len(PROBS))
    survivors = SURVIVORS[pair]
    removed = np.setdiff1d(np.arange(len(PROBS)), survivors)
    assert counts[removed].sum() == 0, counts
    want = np.zeros(len(PROBS))
    want[survivors] = PROBS[survivors] / PROBS[survivors].sum()
    np.testing.assert_allclose(counts / NUM_DRAWS, want, atol=FREQ_ATOL)


def test_sample_batched_traced_matches_frequencies():
    # Batch dims and traced (top_k, top_p): 20k rows of the same logits, one key.
    logits = jnp.broadcast_to(jnp.asarray(np.log(PROBS), jnp.float32), (NUM_DRAWS // 4, 4, len(PROBS)))
    draws = jax.jit(sampling.sample)(jax.random.key(3), logits, jnp.int32(4), jnp.float32(0.9))
    assert draws.shape == (NUM_DRAWS // 4, 4) and draws.dtype == jnp.int32
    counts = np.bincount(np.asarray(draws).ravel(), minlength=len(PROBS))
    assert counts[4:].sum() == 0
    np.testing.assert_allclose(counts / NUM_DRAWS, np.r_[PROBS[:4] / PROBS[:4].sum(), 0, 0], atol=FREQ_ATOL)


@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.8, 1.0])
def test_top_k_one_is_argmax(top_p):
    logits = np.random.default_rng(1).standard_normal((4, 7, 100)).astype(np.float32)
    want = logits.argmax(-1)
    for key in jax.random.split(jax.random.key(0), 5):
        np.testing.assert_array_equal(sampling.sample(key, logits, 1, top_p), want)
        traced = jax.jit(sampling.sample)(key, logits, jnp.int32(1), jnp.float32(top_p))
        np.testing.assert_array_equal(traced, want)


def test_sample_never_draws_removed_tokens():
    logits = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    filtered = np.asarray(sampling.top_k_top_p_filter(logits, 5, 0.7))
    for key in jax.random.split(jax.random.key(1), 20):
        draws = np.asarray(sampling.sample(key, logits, 5, 0.7))
        assert np.isfinite(np.take_along_axis(filtered, draws[:, None], -1)).all()


def test_guidance_ramp():
    ramp = [sampling.guidance_scale(7.5, si, 9) for si in range(9)]
    np.testing.assert_allclose(ramp, [7.5 * si / 8 for si in range(9)], rtol=0, atol=1e-12)
    assert ramp[0] == 0.0 and ramp[-1] == 7.5 and ramp[4] == 3.75
    assert sampling.guidance_scale(7.5, 0, 1) == 0.0
    traced = jax.jit(lambda si: sampling.guidance_scale(7.5, si, 9))(jnp.int32(6))
    assert traced.dtype == jnp.float32 and float(traced) == 7.5 * 6 / 8
    with pytest.raises(ValueError, match="scale_index"):
        sampling.guidance_scale(7.5, 9, 9)
    with pytest.raises(ValueError, match="num_scales"):
        sampling.guidance_scale(7.5, 0, 0)


def test_apply_guidance():
    rng = np.random.default_rng(4)
    cond, uncond = rng.standard_normal((2, 3, 5, 11)).astype(np.float32)
    got = sampling.apply_guidance(cond, uncond, 3.75)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, 4.75 * cond - 3.75 * uncond, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sampling.apply_guidance(cond, uncond, 0.0), cond)
    # Per-row t broadcasts; bf16 inputs are combined in float32.
    t = np.array([0.0, 1.0, 7.5], np.float32)[:, None, None]
    got = sampling.apply_guidance(jnp.asarray(cond, jnp.bfloat16), jnp.asarray(uncond, jnp.bfloat16), t)
    c16 = np.asarray(jnp.asarray(cond, jnp.bfloat16), np.float32)
    u16 = np.asarray(jnp.asarray(uncond, jnp.bfloat16), np.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, (1 + t) * c16 - t * u16, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="uncond_logits"):
        sampling.apply_guidance(cond, uncond[:, :4], 1.0)


def test_mask_to_range():
    logits = np.arange(2 * 10, dtype=np.float32).reshape(2, 10)
    got = np.asarray(sampling.mask_to_range(logits, 3, 8))
    assert np.isneginf(got[:, :3]).all() and np.isneginf(got[:, 8:]).all()
    np.testing.assert_array_equal(got[:, 3:8], logits[:, 3:8])
    traced = jax.jit(sampling.mask_to_range)(logits, jnp.int32(3), jnp.int32(8))
    np.testing.assert_array_equal(traced, got)
    # Sampling after the mask stays in range even though the largest logits were outside it.
    draws = sampling.sample(jax.random.key(0), got, 0, 0.0)
    assert ((draws >= 3) & (draws < 8)).all()
    for start, stop in [(5, 5), (-1, 4), (2, 11)]:
        with pytest.raises(ValueError, match="start < stop"):
            sampling.mask_to_range(logits, start, stop)


def test_schedule_defaults_and_presets():
    default = sampling.SamplingSchedule()
    assert default.top_k == (1200, 100, 1) and default.top_p == (0.8, 0.8, 0.0)
    assert default == sampling.SamplingSchedule.preset(3)
    assert sampling.SamplingSchedule.preset(1) == sampling.SamplingSchedule([600], [0.6])
    two = sampling.SamplingSchedule.preset(2)
    assert two.top_k == (1200, 1) and two.top_p == (0.8, 0.0) and two.num_passes == 2
    assert default.passes(0) == ((1200, 0.8),)
    assert default.passes(4) == ((1200, 0.8), (100, 0.8), (1, 0.0))
    assert default.num_forward_passes(9) == 25  # paper Table 4, "#Steps 25"
    # Lists are stored as hashable tuples, so a schedule can be a static jit argument.
    sched = sampling.SamplingSchedule([5, 0], np.array([0.5, 1.0]))
    assert sched.top_k == (5, 0) and sched.top_p == (0.5, 1.0) and hash(sched) == hash(sched)
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.top_k = (1,)


@pytest.mark.parametrize(
    "top_k, top_p, match",
    [
        ([1200, 100, 1], [0.8, 0.8], r"top_k has 3 entries .* top_p has 2"),
        ([], [], "top_k is empty"),
        ([5], [], "top_p is empty"),
        ([-1], [0.5], r"top_k\[0\] must be an int >= 0"),
        ([5, 2.5], [0.5, 0.5], r"top_k\[1\]"),
        ([True], [0.5], r"top_k\[0\]"),
        ([5], [1.5], r"top_p\[0\] must be a float in \[0, 1\]"),
        ([5, 1], [0.5, -0.1], r"top_p\[1\]"),
        ([5], [math.nan], r"top_p\[0\]"),
        ([5], ["0.5"], r"top_p\[0\]"),
        (600, [0.6], "top_k must be a list"),
        ([600], "0.6", "top_p must be a list"),
    ],
)
def test_schedule_validation(top_k, top_p, match):
    with pytest.raises(ValueError, match=match):
        sampling.SamplingSchedule(top_k, top_p)


def test_schedule_preset_validation():
    with pytest.raises(ValueError, match="loops must be one of"):
        sampling.SamplingSchedule.preset(4)


# ----------------------------------------------------------------------------------------------------
# A static 0 < top_k < V orders only lax.top_k's candidates for top-p; the results must be the bits of
# the full-sort implementation it replaced, kept here verbatim as the reference.
# ----------------------------------------------------------------------------------------------------


def _reference_top_k_mask(logits, top_k):
    vocab = logits.shape[-1]
    if sampling._is_static(top_k):
        if top_k <= 0 or top_k >= vocab:
            return logits
        kth_largest = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        return jnp.where(logits < kth_largest, -jnp.inf, logits)
    top_k = jnp.asarray(top_k, jnp.int32)
    ascending = jnp.sort(logits, axis=-1)
    position = jnp.clip(vocab - top_k, 0, vocab - 1)
    kth_largest = jax.lax.dynamic_index_in_dim(ascending, position, axis=logits.ndim - 1, keepdims=True)
    enabled = (top_k > 0) & (top_k < vocab)
    return jnp.where(enabled & (logits < kth_largest), -jnp.inf, logits)


def _reference_top_p_mask(logits, top_p):
    if sampling._is_static(top_p):
        if top_p <= 0 or top_p >= 1:
            return logits
        enabled = True
    else:
        top_p = jnp.asarray(top_p, jnp.float32)
        enabled = (top_p > 0) & (top_p < 1)
    order = jnp.argsort(logits, axis=-1, stable=True)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted = remove_sorted.at[..., -1].set(False)
    remove = jnp.put_along_axis(jnp.zeros_like(remove_sorted), order, remove_sorted, axis=-1, inplace=False)
    return jnp.where(enabled & remove, -jnp.inf, logits)


def _reference(logits, top_k, top_p):
    return _reference_top_p_mask(_reference_top_k_mask(logits, top_k), top_p)


_reference_filter = jax.jit(_reference, static_argnums=(1, 2))
_reference_filter_traced_p = jax.jit(_reference, static_argnums=(1,))
_filter = jax.jit(sampling.top_k_top_p_filter, static_argnums=(1, 2))


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


CANDIDATE_VOCAB = 3000


def _candidate_logits(kind: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    shape = (2, 5, CANDIDATE_VOCAB)
    if kind == "normal":
        return (3.0 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "ties":  # ~330 copies of each value: the k-th largest's ties overflow the candidates
        return rng.integers(-4, 5, size=shape).astype(np.float32)
    if kind == "fine_ties":  # ~40 copies of each value: ties sometimes within the slack, sometimes past it
        return (rng.integers(-40, 40, size=shape) / 8).astype(np.float32)
    if kind == "signed_zeros":  # -0 and +0 compare equal (one group for the stable sort, two for top_k)
        x = rng.integers(-1, 2, size=shape).astype(np.float32)
        return np.where(rng.random(shape) < 0.5, -x, x).astype(np.float32)
    assert kind == "special"
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    x[0, 0, rng.integers(0, CANDIDATE_VOCAB, 3)] = np.nan  # a NaN survivor: nothing is cut
    x[0, 1, 17] = -np.nan
    x[0, 2, 5] = np.inf
    x[0, 3, :] = -np.inf  # fewer finite logits than top_k: the k-th largest is -inf
    x[0, 3, rng.integers(0, CANDIDATE_VOCAB, 40)] = rng.standard_normal(40)
    x[1, 0, rng.integers(0, CANDIDATE_VOCAB, 500)] = -np.inf
    x[1, 1, :] = 2.5  # one value everywhere
    return x


CANDIDATE_PAIRS = [
    (1, 0.8), (2, 0.5), (5, 0.8), (7, 0.0), (7, 1.0), (30, 0.95), (100, 0.8), (1200, 0.8), (1200, 0.5),
    (1200, 1e-9), (1200, 0.999), (CANDIDATE_VOCAB - 1, 0.8), (CANDIDATE_VOCAB - 2, 0.3), (CANDIDATE_VOCAB, 0.8),
    (CANDIDATE_VOCAB + 5, 0.8), (0, 0.8),
]


@pytest.mark.parametrize("kind", ["normal", "ties", "fine_ties", "signed_zeros", "special"])
def test_candidate_filter_bits_match_full_sort(kind):
    logits = _candidate_logits(kind)
    for top_k, top_p in CANDIDATE_PAIRS:
        assert_same_bits(_filter(logits, top_k, top_p), _reference_filter(logits, top_k, top_p))


def test_candidate_filter_bits_match_full_sort_large_vocab():
    # The sampler's shapes: K = 32768 with the default schedule's (1200, 0.8) and (100, 0.8).
    rng = np.random.default_rng(12)
    logits = (4.0 * rng.standard_normal((2, 4, 32768))).astype(np.float32)
    logits[1] = np.round(logits[1])  # integer logits: ~1300 ties at the 1200th largest
    for top_k, top_p in [(1200, 0.8), (100, 0.8), (600, 0.6)]:
        assert_same_bits(_filter(logits, top_k, top_p), _reference_filter(logits, top_k, top_p))


def test_candidate_filter_ties_past_the_candidates():
    # 5 logits of 1.0 and 300 of 0.0, the rest -inf: top_k = 10 keeps all 305 (ties at the 10th), far
    # more than the 10 + slack candidates, and top-p 0.5 cuts inside the zeros past the candidates
    # (ascending cumulative mass 1/(5e + 300) per zero). The stable order drops the lowest ids first.
    vocab, top_k = 512, 10
    rng = np.random.default_rng(13)
    logits = np.full((3, vocab), -np.inf, np.float32)
    for row in logits:
        ids = rng.permutation(vocab)
        row[ids[:5]], row[ids[5:305]] = 1.0, 0.0
    assert 305 > top_k + sampling._tie_slack(top_k)
    got = np.asarray(_filter(logits, top_k, 0.5))
    assert_same_bits(got, _reference_filter(logits, top_k, 0.5))
    assert_same_filter(got, var_filter_torch(logits, top_k, 0.5))
    for row, out in zip(logits, got):
        zeros = np.flatnonzero(row == 0.0)
        kept = np.isfinite(out[zeros])
        assert 0 < kept.sum() < len(zeros) - 100
        assert not kept[: len(zeros) - kept.sum()].any() and kept[len(zeros) - kept.sum() :].all()


@pytest.mark.parametrize("kind", ["normal", "fine_ties"])
def test_candidate_filter_traced_top_p(kind):
    logits = _candidate_logits(kind)
    filt = jax.jit(sampling.top_k_top_p_filter, static_argnums=(1,))
    for top_k, top_p in [(5, 0.75), (100, 0.8), (1200, 0.5), (1200, 0.0), (1200, 1.0), (100, -0.5)]:
        got = filt(logits, top_k, jnp.float32(top_p))
        assert_same_bits(got, _reference_filter_traced_p(logits, top_k, jnp.float32(top_p)))


@pytest.mark.parametrize("top_k, top_p", [(100, 0.8), (1200, 0.5)])
def test_candidate_filter_under_vmap(top_k, top_p):
    # Per-row keys vmap the sampler over prompts: the tie fallback's lax.cond then runs both branches.
    logits = np.concatenate([_candidate_logits("normal"), _candidate_logits("ties")])
    got = jax.jit(jax.vmap(lambda x: sampling.top_k_top_p_filter(x, top_k, top_p)))(logits)
    assert_same_bits(got, _reference_filter(logits, top_k, top_p))


@pytest.mark.parametrize("top_k, top_p", [(100, 0.8), (1200, 0.5), (50, 0.0)])
def test_sample_draws_unchanged(top_k, top_p):
    # The draw is still jax.random.categorical on the filtered logits: same key, same codes as before.
    logits = _candidate_logits("normal")
    for key in jax.random.split(jax.random.key(5), 3):
        want = jax.random.categorical(key, _reference_filter(logits, top_k, top_p), axis=-1)
        np.testing.assert_array_equal(jax.jit(sampling.sample, static_argnums=(2, 3))(key, logits, top_k, top_p), want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's compiled HLO")
@pytest.mark.parametrize("top_p", [0.8, 0.0])
def test_static_top_k_sorts_no_vocabulary(top_p):
    # XLA:CPU turns top_k into a full sort when a slice of its values gets folded into the sort's slice
    # (the k-th largest read); the barrier in sampling._top_k prevents it. No sort of any kind is left.
    logits = jnp.zeros((2, 8, 4096), jnp.float32)
    hlo = _filter.lower(logits, 100, top_p).compile().as_text()
    assert " sort(" not in hlo
