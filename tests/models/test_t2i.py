"""The next-scale t2i model (ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/llava_arch.py``) and its samplers
(``autoregressive_infer_cfg`` in ``t2i/llava_t2i/model/language_model/llava_llama.py``) on a tiny random model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from tokenflow_jax.models import t2i, t2i_sampler, transformer
from tokenflow_jax.ops import sampling

SCALES = (1, 2, 3, 4)  # N = 30 tokens
K, P, C = 48, 5, 40


def tiny_config(head="separate", **llm):
    llm_config = transformer.TransformerConfig(
        **{**dict(vocab_size=64 + (K if head == "extended" else 0), width=32, depth=2, num_heads=4,
                  num_kv_heads=2, mlp_dim=64, qk_norm=True, max_positions=64), **llm}
    )
    return t2i.T2IConfig(llm=llm_config, scales=SCALES, codebook_size=K, text_length=P, head=head,
                         image_token_start=64 if head == "extended" else 0)


def setup_model(config, batch=2, seed=0, strong_tables=True):
    rng = np.random.default_rng(seed)
    model = t2i.NextScaleT2I(config)
    codebook = rng.normal(size=(config.codebook_size, C)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    text_ids = rng.integers(1, 64, size=(batch, P)).astype(np.int32)
    text_mask = np.ones((batch, P), np.int32)
    text_mask[0, :2] = 0  # a left-padded row
    indices = rng.integers(0, config.codebook_size, size=(batch, config.num_tokens)).astype(np.int32)
    codes = jnp.asarray(codebook)[indices]
    variables = jax.jit(model.init)(jax.random.key(seed), text_ids, text_mask, codes)  # one compile, not one per op
    # Level and position tables are tiny at init (std sqrt(1/3D)); scale them up so tests see their effect.
    params = dict(nn.unbox(variables)["params"])
    if strong_tables:
        params["level_embed"] = jnp.asarray(rng.normal(size=params["level_embed"].shape).astype(np.float32))
        params["pos_embed"] = jnp.asarray(rng.normal(size=params["pos_embed"].shape).astype(np.float32))
    # Random-init logits are nearly flat, so float32 rounding differences between two correct samplers
    # (different matmul shapes) could flip near-tied draws; a trained model is far more peaked. Sharpen
    # the head so that sampler-equality tests compare algorithms, not rounding.
    if config.head == "separate":
        params["code_head"] = {"kernel": params["code_head"]["kernel"] * 20.0}
    else:
        params["llm"] = {**params["llm"], "lm_head": {"kernel": params["llm"]["lm_head"]["kernel"] * 20.0}}
    return model, {"params": params}, jnp.asarray(codebook), text_ids, text_mask, indices


def torch_bicubic(x, size):
    """x [B, h, w, C] numpy -> torch F.interpolate bicubic (align_corners=False) -> numpy NHWC."""
    t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
    return F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()


def test_running_map_inputs_match_torch_progressive_resize(rng):
    codes = rng.normal(size=(2, 30, C)).astype(np.float32)
    offsets = np.cumsum([0] + [s * s for s in SCALES])
    expected, f = [], codes[:, :1].reshape(2, 1, 1, C)
    for k in range(1, len(SCALES)):
        s = SCALES[k]
        g = torch_bicubic(f, s)
        expected.append(g.reshape(2, s * s, C))
        f = g + codes[:, offsets[k] : offsets[k + 1]].reshape(2, s, s, C)
    got = np.asarray(t2i.running_map_inputs(jnp.asarray(codes), SCALES))
    np.testing.assert_allclose(got, np.concatenate(expected, 1), atol=1e-5)


def test_block_causal_mask_by_hand():
    config = tiny_config()
    config = dataclasses.replace(config, scales=(1, 2), text_length=3)  # L = 3 + 5 - 1 = 7
    mask = np.asarray(t2i.block_causal_mask(config, jnp.asarray([[0, 1, 1]])))[0]
    # Positions: 0, 1 text; 2 = last text (scale 0); 3..6 inputs predicting tokens 1..4 (scale 1).
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0],  # a padded query sees nothing but (masked) itself; its row is unused
        [0, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(t2i.level_ids(config), [0, 0, 0, 2, 2, 2, 2])


def test_teacher_forcing_equals_a_hand_built_sequence():
    config = tiny_config()
    model, variables, codebook, text_ids, text_mask, indices = setup_model(config)
    codes = codebook[indices]
    logits = model.apply(variables, text_ids, text_mask, codes)
    assert logits.shape == (2, config.num_tokens, K)

    params = variables["params"]
    llm = transformer.Transformer(config.llm)
    proj = params["projector"]
    inputs = np.asarray(t2i.running_map_inputs(codes, SCALES))
    h = inputs @ np.asarray(proj["fc1"]["kernel"]) + np.asarray(proj["fc1"]["bias"])
    h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False))
    image = h @ np.asarray(proj["fc2"]["kernel"]) + np.asarray(proj["fc2"]["bias"])
    text = np.asarray(llm.apply({"params": params["llm"]}, jnp.asarray(text_ids), method=llm.embed))
    embeds = np.concatenate([text, image], 1)
    embeds += np.asarray(params["level_embed"])[t2i.level_ids(config)]
    embeds[:, P - 1 :] += np.asarray(params["pos_embed"])
    mask = t2i.block_causal_mask(config, jnp.asarray(text_mask))
    _, hidden = llm.apply({"params": params["llm"]}, inputs_embeds=jnp.asarray(embeds), mask=mask,
                          return_hidden=True)
    head = params["code_head"]
    expected = np.asarray(hidden)[:, P - 1 :] @ np.asarray(head["kernel"])
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_logits_of_a_scale_depend_only_on_earlier_scales_and_not_on_padding():
    config = tiny_config()
    model, variables, codebook, text_ids, text_mask, indices = setup_model(config)
    offsets = config.token_offsets
    base = np.asarray(model.apply(variables, text_ids, text_mask, codebook[indices]))
    for k in range(len(SCALES)):
        changed = indices.copy()
        changed[:, offsets[k] : offsets[k + 1]] = (changed[:, offsets[k] : offsets[k + 1]] + 7) % K
        out = np.asarray(model.apply(variables, text_ids, text_mask, codebook[changed]))
        # Tokens of scales <= k are predicted from inputs built from scales < their own: unchanged.
        np.testing.assert_allclose(out[:, : offsets[k + 1]], base[:, : offsets[k + 1]], atol=1e-6)
        if k + 1 < len(SCALES):  # (random init: logits ~0.1, so a change of 1e-4 is far above rounding)
            assert np.abs(out[:, offsets[k + 1] :] - base[:, offsets[k + 1] :]).max() > 1e-4
    other_pads = text_ids.copy()
    other_pads[0, :2] = [3, 9]
    out = np.asarray(model.apply(variables, other_pads, text_mask, codebook[indices]))
    np.testing.assert_allclose(out, base, atol=1e-5)


def test_extended_head_is_the_vq_slice_of_the_lm_head_and_the_loss_normalises_over_the_vocabulary():
    config = tiny_config(head="extended")
    model, variables, codebook, text_ids, text_mask, indices = setup_model(config)
    codes = codebook[indices]
    full = model.apply(variables, text_ids, text_mask, codes, full=True)
    image = model.apply(variables, text_ids, text_mask, codes)
    assert full.shape == (2, config.num_tokens, 64 + K)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(full[..., 64:]))
    loss = t2i.image_loss(full, jnp.asarray(indices), offset=64)
    expected = F.cross_entropy(torch.from_numpy(np.array(full)).reshape(-1, 64 + K),
                               torch.from_numpy(indices + 64).long().reshape(-1))
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    assert float(t2i.image_loss(image, jnp.asarray(indices))) < float(loss)  # K-way softmax: smaller


_MODEL_FORMS = [("separate", "pre_norm"), ("extended", "pre_norm"),
                ("extended", "post_sublayer_norm")]  # the released t2i decoder: extended vocabulary, post-norms
_SCHEDULES = [((20, 6, 1), (0.8, 0.8, 0.0), 3.0), ((1,), (0.0,), 1.5),
              ((1, 1, 1), (0.0, 0.0, 0.0), 0.0)]  # greedy refinements: every pass's input must be exactly right


# Each (model form, schedule) pair compiles two samplers (~1 min). The fast tier runs the three diagonal pairs,
# so every model form and every schedule is checked once; the six others are in the slow tier.
@pytest.mark.parametrize("head, block_order, top_k, top_p, cfg_scale", [
    pytest.param(*form, *schedule, marks=() if i == j else pytest.mark.slow)
    for i, form in enumerate(_MODEL_FORMS) for j, schedule in enumerate(_SCHEDULES)])
def test_cached_sampler_equals_full_recompute(head, block_order, top_k, top_p, cfg_scale):
    # Scales up to 6, width 64, K = 1024: a refinement pass fed the previous pass's draft on top of the
    # current one (a bug this test once missed at width 32, scales up to 4, K = 48) changes codes here.
    config = dataclasses.replace(tiny_config(head=head, width=64, mlp_dim=128, block_order=block_order),
                                 scales=(1, 2, 4, 6))
    if head == "separate":
        config = dataclasses.replace(config, codebook_size=1024)
    # (Init-sized level/position tables: large ones would drown the image inputs these tests are about.)
    model, variables, codebook, text_ids, text_mask, _ = setup_model(config, batch=3, strong_tables=False)
    uncond_ids = np.zeros_like(text_ids)
    uncond_mask = np.zeros_like(text_mask)
    uncond_ids[:, -1], uncond_mask[:, -1] = 1, 1  # BOS only
    schedule = sampling.SamplingSchedule(top_k, top_p)
    args = (variables, codebook, text_ids, text_mask, uncond_ids, uncond_mask, jax.random.key(3))
    cached = t2i_sampler.make_sampler(model, cfg_scale=cfg_scale, schedule=schedule, cached=True)(*args)
    full = t2i_sampler.make_sampler(model, cfg_scale=cfg_scale, schedule=schedule, cached=False)(*args)
    assert cached.shape == (3, config.num_tokens) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
    # Not a constant: a random tiny model still spreads its draws over the codebook.
    assert len(np.unique(np.asarray(cached))) > 10
    if top_k == (1,):  # greedy: the first token is the argmax of the cond logits at the 1x1 scale
        logits = model.apply(variables, text_ids, text_mask, codebook[np.asarray(cached)])
        np.testing.assert_array_equal(np.asarray(cached)[:, 0], np.asarray(jnp.argmax(logits[:, 0], -1)))


@pytest.mark.parametrize("head", ["separate", "extended"])
def test_guidance_on_hidden_states_equals_guidance_on_logits(head):
    """The samplers run the head once on (1 + t) h_c - t h_u; the reference guides the two rows' logits."""
    model, variables, *_ = setup_model(tiny_config(head=head))
    apply = lambda *a, **k: model.apply(variables, *a, **k)  # noqa: E731
    hidden = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 32)), jnp.float32)  # [2B, T, D]
    logits = apply(hidden, method=t2i.NextScaleT2I.code_logits)
    for si, cfg_scale in ((0, 7.5), (2, 7.5), (3, 3.0)):
        t = sampling.guidance_scale(cfg_scale, si, len(SCALES))
        want = np.asarray(sampling.apply_guidance(logits[:2], logits[2:], t))
        got = np.asarray(t2i_sampler.guided_code_logits(apply, hidden, si, len(SCALES), cfg_scale))
        assert got.shape == (2, 3, K)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_forward_token_counts():
    config = tiny_config()
    schedule = sampling.SamplingSchedule((20, 6, 1), (0.8, 0.8, 0.0))
    # cached: prefix 5 + 3 passes x (4 + 9 + 16); full: 5 + 3 passes x (P - 1 + tokens up to the scale)
    assert t2i_sampler.forward_tokens(config, schedule, cached=True) == 5 + 3 * 29
    assert t2i_sampler.forward_tokens(config, schedule, cached=False) == 5 + 3 * ((4 + 5) + (4 + 14) + (4 + 30))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="head"):
        tiny_config(head="shared")
    with pytest.raises(ValueError, match="max_positions"):
        tiny_config(max_positions=20)
    with pytest.raises(ValueError, match="image_token_start"):
        dataclasses.replace(tiny_config(head="extended"), image_token_start=70)  # 70 + 48 > 112
