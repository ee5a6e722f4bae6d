"""The quantizer's index rules (``quantizer.mapping``) against a float64 numpy re-derivation: the shared mapping,
two independent argmins ('separate') and the pixel distance alone ('pixel_only').

The reference below takes the squared distance as the sum of squared differences (not the code's expanded
|z|^2 + |e|^2 - 2 z.e) and writes the residual loop out by hand; only the area and bicubic resizes come from
``torch.nn.functional`` (the reference implementation's own resizes)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.models.test_quantizer import applied
from tokenflow_jax import prng
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import quantizer as qm

K = 64
SEM = 32


def make(mapping, scales, **kw):
    # A 2 KB search budget splits the 64 codes into 4 blocks: the running first minimum across blocks is exercised.
    cfg = qm.QuantizerConfig(codebook_size=K, scales=scales, mapping=mapping, search_memory_bytes=2048, **kw)
    module = qm.MultiScaleQuantizer(cfg)
    h = jnp.zeros((2, scales[-1], scales[-1], cfg.code_dim))
    return module, nn.unbox(jax.jit(module.init)(prng.make_key(3), h))


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def squared_distances(z, e):
    """[N, D], [K, D] -> [N, K] as sums of squared differences, float64."""
    return ((z[:, None, :].astype(np.float64) - e[None, :, :].astype(np.float64)) ** 2).sum(-1)


def numpy_choose(z_sem, z_pix, e_sem, e_pix, mapping, w_dis):
    """(index fetching the pixel entry, index fetching the semantic entry), each [N]."""
    d_sem, d_pix = squared_distances(z_sem, e_sem), squared_distances(z_pix, e_pix)
    if mapping == "shared":
        i = np.argmin(d_sem + w_dis * d_pix, axis=1)
        return i, i
    if mapping == "pixel_only":
        i = np.argmin(d_pix, axis=1)
        return i, i
    return np.argmin(d_pix, axis=1), np.argmin(d_sem, axis=1)


def _resize(x, size, mode):
    t = torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
    return F.interpolate(t, size=(size, size), mode=mode).permute(0, 2, 3, 1).numpy()


def numpy_msvq(h, cb_sem, cb_pix, scales, mapping, w_dis=1.0):
    """F [B, s, s, 40], pixel-side indices [B, L], semantic-side indices [B, L], per-scale vq losses."""
    e_sem, e_pix = unit(np.asarray(cb_sem)), unit(np.asarray(cb_pix))
    b, final = h.shape[0], scales[-1]
    residual, acc = np.asarray(h, np.float32), 0.0
    pix_idx, sem_idx, losses = [], [], []
    for s in scales:
        r = _resize(residual, s, "area").reshape(-1, 40) if s != final else residual.reshape(-1, 40)
        z = np.concatenate([unit(r[:, :SEM]), unit(r[:, SEM:])], -1)
        i_pix, i_sem = numpy_choose(z[:, :SEM], z[:, SEM:], e_sem, e_pix, mapping, w_dis)
        zq = np.concatenate([e_sem[i_sem], e_pix[i_pix]], -1)
        losses.append(np.mean((zq - z) ** 2))
        q = zq.reshape(b, s, s, 40)
        up = _resize(q, final, "bicubic") if s != final else q
        acc, residual = acc + up, residual - up
        pix_idx.append(i_pix.reshape(b, -1))
        sem_idx.append(i_sem.reshape(b, -1))
    return acc, np.concatenate(pix_idx, 1), np.concatenate(sem_idx, 1), losses


def random_map(rng, s, b=2):
    return (3.0 * rng.standard_normal((b, s, s, 40))).astype(np.float32)


@pytest.mark.parametrize("mapping", qm.MAPPINGS)
@pytest.mark.parametrize("scales", [(4,), (1, 2, 4)])
def test_indices_and_map_match_the_numpy_reference(rng, mapping, scales):
    module, v = make(mapping, scales, w_dis=0.7)
    h = random_map(rng, scales[-1])
    f, aux, idx = jax.jit(lambda v, h: module.apply(v, h))(v, h)
    ref_f, ref_pix, ref_sem, _ = numpy_msvq(h, v["params"]["codebook_semantic"], v["params"]["codebook_pixel"],
                                            scales, mapping, w_dis=0.7)
    np.testing.assert_array_equal(np.asarray(idx), ref_pix)
    np.testing.assert_allclose(np.asarray(f), ref_f, atol=1e-5)
    if mapping == "separate":
        np.testing.assert_array_equal(np.asarray(aux["semantic_indices"]), ref_sem)
        assert (ref_sem != ref_pix).mean() > 0.5  # two genuinely different index sets
    else:
        assert "semantic_indices" not in aux


def test_the_three_rules_choose_differently(rng):
    """On the same codebooks and input, each rule picks its own codes (a mix-up between them cannot pass)."""
    scales = (4,)
    h = random_map(rng, 4)
    shared, v = make("shared", scales)
    picks = {m: np.asarray(applied(qm.MultiScaleQuantizer(qm.QuantizerConfig(codebook_size=K, scales=scales,
                                                                            mapping=m)))(v, h)[2])
             for m in qm.MAPPINGS}
    assert (picks["shared"] != picks["pixel_only"]).mean() > 0.3
    assert (picks["shared"] != picks["separate"]).mean() > 0.3
    # separate's pixel side is the pixel-only rule; pixel_only is shared with w_dis -> infinity.
    np.testing.assert_array_equal(picks["separate"], picks["pixel_only"])
    large_w = qm.MultiScaleQuantizer(qm.QuantizerConfig(codebook_size=K, scales=scales, w_dis=1e4))
    np.testing.assert_array_equal(np.asarray(applied(large_w)(v, h)[2]), picks["pixel_only"])


def test_separate_training_losses_and_decoding(rng):
    scales = (1, 2, 4)
    module, v = make("separate", scales, scale_drop_prob=0.0)
    h = random_map(rng, 4)
    f, aux, idx = applied(module, train=True)(v, h, key=prng.make_key(1))
    _, _, _, losses = numpy_msvq(h, v["params"]["codebook_semantic"], v["params"]["codebook_pixel"], scales,
                                 "separate")
    np.testing.assert_allclose(float(aux["vq_loss"]), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(float(aux["commit_loss"]), 0.25 * np.mean(losses), rtol=1e-5)
    # Both index sets rebuild F exactly; the pixel (generation) indices alone rebuild its pixel half and leave
    # the semantic half at zero.
    decode = applied(module, method="decode_indices")
    both = decode(v, idx, aux["semantic_indices"])
    np.testing.assert_allclose(np.asarray(both), np.asarray(f), atol=1e-5)
    pixel_only = np.asarray(decode(v, idx))
    np.testing.assert_allclose(pixel_only[..., SEM:], np.asarray(f)[..., SEM:], atol=1e-5)
    assert np.all(pixel_only[..., :SEM] == 0)


def test_separate_usage_counts_codes_chosen_by_either_half(rng):
    scales = (4,)
    module, v = make("separate", scales, scale_drop_prob=0.0)
    h = random_map(rng, 4)
    (_, aux, idx), state = applied(module, train=True, mutable=["quantizer"])(v, h, key=prng.make_key(1))
    chosen = set(np.asarray(idx).ravel()) | set(np.asarray(aux["semantic_indices"]).ravel())
    fresh = np.flatnonzero(np.asarray(state["quantizer"]["code_age"]) == 0)
    assert set(fresh.tolist()) == chosen


@pytest.mark.parametrize("fields, message", [
    (dict(mapping="nearest"), "quantizer.mapping must be one of shared, separate, pixel_only"),
    (dict(mapping="separate", codebook_update="ema"), "needs quantizer.codebook_update='loss'"),
    (dict(mapping="pixel_only", entropy_weight=0.1), "entropy_weight > 0 is defined on the shared mapping"),
])
def test_unsupported_combinations_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        qm.QuantizerConfig(codebook_size=K, scales=(4,), **fields)
