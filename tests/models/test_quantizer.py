"""Properties of the shared-mapping multi-scale quantizer, and parity with a torch re-implementation of
the reference algorithm (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``, ``VectorQuantizer`` and
``TokenFlow.encode``) built on ``torch.nn.functional``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_jax import parallel, prng
from tokenflow_jax.models import quantizer as qm

SCALES = (1, 2, 4, 6, 8)
K = 512
ATOL = 1e-5  # float32 agreement of maps between the JAX and torch paths


def make(scales=SCALES, k=K, **kw):
    cfg = qm.QuantizerConfig(codebook_size=k, scales=scales, **kw)
    module = qm.MultiScaleQuantizer(cfg)
    h = jnp.zeros((2, scales[-1], scales[-1], cfg.code_dim))
    variables = nn.unbox(jax.jit(module.init)(prng.make_key(0), h))
    return module, variables


def applied(module, **kwargs):
    """``module.apply`` with ``kwargs`` under one jit: (variables, inputs..., key) -> outputs, the key going to
    ``rngs={'quantizer': key}`` when given. One XLA compile per test instead of one per eager operation (most of
    this file's time when run eagerly)."""
    def run(v, *args, key=None):
        rngs = {} if key is None else {"rngs": {"quantizer": key}}
        return module.apply(v, *args, **kwargs, **rngs)
    return jax.jit(run)


def torch_reference_msvq(h_nhwc, cb_sem, cb_pix, scales, w_dis=1.0, drop=None):
    """The reference encode loop (``TokenFlow.encode``) in torch, NCHW, on normalised codebooks.

    Returns F [B, s, s, 40] (NHWC), indices per scale, the per-scale (vq, commit) losses and the
    normalised per-scale inputs z [N_k, 40].
    """
    h = torch.from_numpy(np.array(h_nhwc)).permute(0, 3, 1, 2)
    e_s = F.normalize(torch.from_numpy(np.array(cb_sem)), dim=-1)
    e_p = F.normalize(torch.from_numpy(np.array(cb_pix)), dim=-1)
    final = scales[-1]
    residual, acc, indices, losses, inputs = h, 0.0, [], [], []
    for k, s in enumerate(scales):
        r = F.interpolate(residual, size=(s, s), mode="area").permute(0, 2, 3, 1).reshape(-1, 40)
        z_s, z_p = F.normalize(r[:, :32], dim=-1), F.normalize(r[:, 32:], dim=-1)
        d_s = (z_s**2).sum(1, keepdim=True) + (e_s**2).sum(1) - 2 * z_s @ e_s.T
        d_p = (z_p**2).sum(1, keepdim=True) + (e_p**2).sum(1) - 2 * z_p @ e_p.T
        idx = torch.argmin(d_s + w_dis * d_p, dim=1)
        z = torch.cat([z_s, z_p], -1)
        inputs.append(z.numpy())
        zq = torch.cat([e_s[idx], e_p[idx]], -1)
        losses.append((torch.mean((zq - z) ** 2).item(), torch.mean((zq - z) ** 2).item()))
        q = zq.reshape(h.shape[0], s, s, 40).permute(0, 3, 1, 2)
        up = F.interpolate(q, size=(final, final), mode="bicubic")
        if drop is not None and k == drop:
            up = up * 0
        acc = acc + up
        residual = residual - up
        indices.append(idx.reshape(h.shape[0], s * s).numpy())
    return acc.permute(0, 2, 3, 1).numpy(), indices, losses, inputs


def reference(v, h, **kw):
    """torch_reference_msvq on the loss-mode codebooks of variables ``v``."""
    return torch_reference_msvq(h, v["params"]["codebook_semantic"], v["params"]["codebook_pixel"], SCALES, **kw)


def smooth_input(rng, b=2, s=8, magnitude=3.0):
    """A map with structure at every scale: sum of bicubic-upsampled random maps."""
    out = np.zeros((b, s, s, 40), np.float32)
    for c in (1, 2, 4, s):
        coarse = torch.from_numpy(rng.standard_normal((b, 40, c, c)).astype(np.float32))
        out += F.interpolate(coarse, size=(s, s), mode="bicubic").permute(0, 2, 3, 1).numpy()
    return magnitude * out


def test_codebook_init_rows_are_unit_norm():
    _, v = make()
    for name in ("codebook_semantic", "codebook_pixel"):
        np.testing.assert_allclose(np.linalg.norm(v["params"][name], axis=1), 1.0, atol=1e-6)


def test_matches_torch_reference_msvq(rng):
    module, v = make()
    h = smooth_input(rng)
    f, aux, idx = jax.jit(lambda v, h: module.apply(v, h))(v, h)
    ref_f, ref_idx, _, _ = reference(v, h)
    ours = np.split(np.asarray(idx), np.cumsum([s * s for s in SCALES])[:-1], axis=1)
    for s, a, b in zip(SCALES, ours, ref_idx):
        np.testing.assert_array_equal(a, b, err_msg=f"indices differ at scale {s}")
    np.testing.assert_allclose(np.asarray(f), ref_f, atol=ATOL)
    assert idx.dtype == jnp.int32 and idx.shape == (2, sum(s * s for s in SCALES))


def test_index_range_and_eval_has_no_losses(rng):
    module, v = make()
    _, aux, idx = applied(module)(v, smooth_input(rng))
    assert 0 <= int(idx.min()) and int(idx.max()) < K
    assert "vq_loss" not in aux and float(aux["scale_mask"].sum()) == len(SCALES)


def test_training_losses_match_reference_formula(rng):
    module, v = make(scale_drop_prob=0.0, beta=0.25)
    h = smooth_input(rng)
    _, aux, _ = applied(module, train=True)(v, h, key=prng.make_key(1))
    _, _, ref_losses, _ = reference(v, h)
    np.testing.assert_allclose(float(aux["vq_loss"]), np.mean([l[0] for l in ref_losses]), rtol=1e-5)
    np.testing.assert_allclose(float(aux["commit_loss"]), 0.25 * np.mean([l[1] for l in ref_losses]), rtol=1e-5)


def test_w_dis_changes_the_shared_mapping(rng):
    h = smooth_input(rng)
    module1, v = make(w_dis=1.0)
    module0 = qm.MultiScaleQuantizer(qm.QuantizerConfig(codebook_size=K, scales=SCALES, w_dis=0.0))
    idx1 = np.asarray(applied(module1)(v, h)[2])
    idx0 = np.asarray(applied(module0)(v, h)[2])
    ref0 = np.concatenate(
        torch_reference_msvq(h, v["params"]["codebook_semantic"], v["params"]["codebook_pixel"], SCALES, 0.0)[1], 1
    )
    np.testing.assert_array_equal(idx0, ref0)
    assert (idx0 != idx1).mean() > 0.2  # the pixel half really takes part in the mapping


def test_straight_through_gradient_reaches_both_halves(rng):
    module, v = make(scale_drop_prob=0.0)
    h = jnp.asarray(smooth_input(rng))
    probe = jnp.asarray(rng.standard_normal(h.shape), jnp.float32)

    def loss(h):
        f, aux, _ = module.apply(v, h, train=True, rngs={"quantizer": prng.make_key(0)})
        return jnp.sum(f * probe) + aux["commit_loss"]

    g = np.asarray(jax.jit(jax.grad(loss))(h))
    assert np.abs(g[..., :32]).mean() > 1e-4 and np.abs(g[..., 32:]).mean() > 1e-4


def test_codebook_loss_gradient_reaches_codebooks(rng):
    module, v = make(scale_drop_prob=0.0)
    h = jnp.asarray(smooth_input(rng))

    def loss(params):
        _, aux, _ = module.apply({**v, "params": params}, h, train=True, rngs={"quantizer": prng.make_key(0)})
        return aux["vq_loss"]

    g = jax.jit(jax.grad(loss))(v["params"])
    assert float(jnp.abs(g["codebook_semantic"]).sum()) > 0 and float(jnp.abs(g["codebook_pixel"]).sum()) > 0


def test_residual_error_does_not_grow_as_scales_are_added(rng):
    """On a fixed codebook, ||h - F_k|| is non-increasing in the number of scales k used."""
    module, v = make(k=4096)
    h = smooth_input(rng, magnitude=3.0)
    errors = [float(np.linalg.norm(h))]
    for n in range(1, len(SCALES) + 1):
        f = jax.jit(lambda v, h, n=n: _partial_sum(module, v, h, n))(v, h)
        errors.append(float(np.linalg.norm(h - np.asarray(f))))
    # Each scale removes unit-norm-per-half codes pointing along the residual: strictly decreasing.
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    np.testing.assert_allclose(np.asarray(f), np.asarray(applied(module)(v, h)[0]), atol=ATOL)


def _partial_sum(module, v, h, n):
    """F after the first n scales of the schedule (later scales contribute nothing)."""
    from tokenflow_jax.ops import resize

    def run(m, h):
        final = m.config.scales[-1]
        residual, acc = h, jnp.zeros_like(h)
        for s in m.config.scales[:n]:
            out = m.quantize_scale(resize.area_resize(residual, (s, s)))
            up = resize.bicubic_resize(out["q"], (final, final))
            acc, residual = acc + up, residual - up
        return acc

    return nn.apply(run, module)(v, h)


def test_random_scale_drop_matches_reference_with_that_scale_removed(rng):
    module, v = make(scale_drop_prob=1.0)
    h = smooth_input(rng)
    seen = set()
    step = applied(module, train=True)
    for seed in range(6):
        f, aux, idx = step(v, h, key=prng.make_key(seed))
        mask = np.asarray(aux["scale_mask"])
        assert mask.sum() == len(SCALES) - 1 and mask[0] == 1
        dropped = int(np.argmin(mask))
        seen.add(dropped)
        ref_f, _, _, _ = torch_reference_msvq(
            h, v["params"]["codebook_semantic"], v["params"]["codebook_pixel"], SCALES, drop=dropped
        )
        np.testing.assert_allclose(np.asarray(f), ref_f, atol=ATOL)
    assert len(seen) >= 2  # the dropped scale is random


def test_decode_indices_equals_encode_features_and_accepts_prefixes(rng):
    module, v = make()
    f, _, idx = applied(module)(v, smooth_input(rng))
    decode = applied(module, method="decode_indices")
    np.testing.assert_allclose(np.asarray(decode(v, idx)), np.asarray(f), atol=ATOL)
    prefix = 1 + 4 + 16
    partial = decode(v, idx[:, :prefix])
    assert partial.shape == f.shape
    with pytest.raises(ValueError, match="valid lengths"):
        decode(v, idx[:, :7])


def test_usage_state_and_perplexity(rng):
    module, v = make(scale_drop_prob=0.0, usage_window=10)
    h = smooth_input(rng)
    (_, aux, idx), state = applied(module, train=True, mutable=["quantizer"])(v, h, key=prng.make_key(0))
    used = np.unique(np.asarray(idx))
    age = np.asarray(state["quantizer"]["code_age"])
    assert set(np.flatnonzero(age == 0)) == set(used.tolist())
    np.testing.assert_allclose(float(aux["codebook_usage"]), len(used) / K)
    # Perplexity of the 1x1 scale over a batch of 2: 1 or 2 codes.
    first = np.asarray(idx[:, 0])
    assert np.isclose(float(aux["perplexity"][0]), len(np.unique(first)), rtol=1e-5)
    hist = np.bincount(np.asarray(idx[:, 1:5]).ravel(), minlength=K) / 8.0
    expected = np.exp(-np.sum(hist[hist > 0] * np.log(hist[hist > 0])))
    np.testing.assert_allclose(float(aux["perplexity"][1]), expected, rtol=1e-5)


def test_entropy_loss_matches_reference_formula(rng):
    d = torch.from_numpy(rng.standard_normal((20, 16)).astype(np.float32))
    affinity = -d / 0.01
    probs = F.softmax(affinity, -1)
    log_probs = F.log_softmax(affinity + 1e-5, -1)
    avg = probs.mean(0)
    ref = -(probs * log_probs).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum()
    np.testing.assert_allclose(float(qm.entropy_loss(-jnp.asarray(d.numpy()), 0.01)), ref.item(), rtol=1e-4)


# ----------------------------------------------------------------------------------------------- EMA
def ema_inputs(v, h):
    """Per-scale (indices, normalised inputs) of the reference loop on the EMA codebook."""
    _, idx, _, z = torch_reference_msvq(
        h, v["quantizer"]["codebook_semantic"], v["quantizer"]["codebook_pixel"], SCALES
    )
    return [(i.ravel(), zk) for i, zk in zip(idx, z)]


def test_ema_step_moves_used_codes_toward_their_inputs(rng):
    module, v = make(codebook_update="ema", ema_decay=0.5, dead_code_threshold=0.0, scale_drop_prob=0.0)
    assert "params" not in v and "codebook_semantic" in v["quantizer"]
    h = smooth_input(rng)
    (_, aux, idx), state = applied(module, train=True, mutable=["quantizer"])(v, h, key=prng.make_key(0))
    assert float(aux["vq_loss"]) == 0.0  # no codebook loss in EMA mode
    old = np.asarray(qm.l2_normalize(v["quantizer"]["codebook_semantic"]))
    new = np.asarray(qm.l2_normalize(state["quantizer"]["codebook_semantic"]))
    per_scale = ema_inputs(v, h)
    ref_idx = np.concatenate([i.reshape(h.shape[0], -1) for i, _ in per_scale], axis=1)
    np.testing.assert_array_equal(ref_idx, np.asarray(idx))
    moved = 0
    for code in np.unique(np.asarray(idx)):
        target = np.concatenate([z[i == code, :32] for i, z in per_scale]).mean(0)
        target /= np.linalg.norm(target)
        before, after = float(old[code] @ target), float(new[code] @ target)
        assert after >= before - 1e-6
        moved += after > before + 1e-4
    assert moved > 0
    # Unused codes keep their direction (no restarts with threshold 0).
    unused = np.setdiff1d(np.arange(K), np.unique(np.asarray(idx)))
    np.testing.assert_allclose(new[unused], old[unused], atol=1e-5)


def test_ema_dead_codes_restart_from_encoder_outputs(rng):
    module, v = make(codebook_update="ema", dead_code_threshold=0.995, scale_drop_prob=0.0)
    h = smooth_input(rng)
    (_, _, idx), state = applied(module, train=True, mutable=["quantizer"])(v, h, key=prng.make_key(3))
    dead = np.setdiff1d(np.arange(K), np.unique(np.asarray(idx)))
    new_sem = np.asarray(state["quantizer"]["codebook_semantic"])
    # Every dead code is now one of this step's normalised semantic inputs (from any scale).
    inputs = np.concatenate([z[:, :32] for _, z in ema_inputs(v, h)])
    dists = np.min(np.linalg.norm(new_sem[dead][:, None] - inputs[None], axis=-1), axis=1)
    assert dists.max() < 1e-5
    assert (np.asarray(state["quantizer"]["ema_count"])[dead] >= 0.995 - 1e-6).all()


def test_ema_statistics_on_mesh_equal_single_device(rng, mesh222):
    module, v = make(codebook_update="ema", ema_decay=0.9, scale_drop_prob=0.0, dead_code_threshold=0.0)
    h = jnp.asarray(smooth_input(rng, b=8))
    step = lambda v, h: module.apply(v, h, train=True, rngs={"quantizer": prng.make_key(0)}, mutable=["quantizer"])
    (_, _, idx_single), single = jax.jit(step)(v, h)
    with jax.set_mesh(mesh222), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        h_sharded = jax.device_put(h, parallel.data_sharding(mesh222, 4))
        (_, _, idx_mesh), meshed = jax.jit(step)(v, h_sharded)
    np.testing.assert_array_equal(np.asarray(idx_mesh), np.asarray(idx_single))
    for name in ("ema_count", "ema_sum_semantic", "ema_sum_pixel", "codebook_semantic"):
        np.testing.assert_allclose(np.asarray(meshed["quantizer"][name]), np.asarray(single["quantizer"][name]),
                                   atol=1e-6, err_msg=name)


def test_sharded_codebook_quantizer_equals_unsharded(rng, mesh222):
    """A codebook sharded over 'tensor' (global argmin across shards) gives the same indices."""
    module, v = make(codebook_axis="tensor")
    h = jnp.asarray(smooth_input(rng, b=8))
    _, _, ref = applied(module)(v, h)
    rules = tuple((k, "tensor") if k == "codebook" else (k, m) for k, m in parallel.DEFAULT_RULES)
    with jax.set_mesh(mesh222), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(module.init, prng.make_key(0), h)
        shardings = parallel.shardings_from_abstract(abstract, mesh222, rules)
        assert shardings["params"]["codebook_semantic"].spec == jax.sharding.PartitionSpec("tensor", None)
        v_sharded = jax.device_put(v, shardings)
        _, _, idx = jax.jit(lambda v, h: module.apply(v, h))(v_sharded, h)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref))
