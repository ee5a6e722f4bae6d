"""The unified model: one parameter tree; with a t2i model's weights it samples that model's codes, with a VLM's
it gives that VLM's logits and answers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_t2i import setup_model, tiny_config
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i, t2i_sampler, transformer, unified, vlm
from tokenflow_jax.models.vlm_generate import AnswerDecoder
from tokenflow_jax.ops import sampling

IMG = vlm.IMAGE_TOKEN_INDEX
T = 4  # image placeholders per understanding example


def unified_config(t2i_config: t2i.T2IConfig) -> unified.UnifiedConfig:
    fields = {f: getattr(t2i_config, f) for f in t2i_config.__dataclass_fields__}
    return unified.UnifiedConfig(**fields, feature_dim=40, num_image_tokens=T)


def unified_params(config: unified.UnifiedConfig, seed: int = 1):
    args = [jnp.zeros(s.shape, s.dtype) for s in unified.init_args(config)]
    return nn.unbox(jax.jit(unified.UnifiedModel(config).init)(jax.random.key(seed), *args))["params"]


@pytest.mark.parametrize("head", ["separate", "extended"])
def test_parameters_are_the_t2i_models_plus_a_vision_projector(head):
    config = unified_config(tiny_config(head=head))
    params = unified_params(config)
    _, t2i_variables, *_ = setup_model(tiny_config(head=head))
    t2i_shapes = jax.tree.map(jnp.shape, t2i_variables["params"])
    assert jax.tree.map(jnp.shape, {k: v for k, v in params.items() if k != "vision_projector"}) == t2i_shapes
    assert jax.tree.map(jnp.shape, params["vision_projector"]) == {
        "fc1": {"kernel": (40, 32), "bias": (32,)}, "fc2": {"kernel": (32, 32), "bias": (32,)}}


@pytest.mark.parametrize("head", ["separate", "extended"])
def test_with_a_t2i_models_weights_it_samples_the_same_codes(head):
    t2i_cfg = tiny_config(head=head)
    model, variables, codebook, text_ids, text_mask, indices = setup_model(t2i_cfg, batch=3)
    config = unified_config(t2i_cfg)
    params = {**variables["params"], "vision_projector": unified_params(config)["vision_projector"]}
    uncond_ids, uncond_mask = np.zeros_like(text_ids), np.zeros_like(text_mask)
    uncond_ids[:, -1], uncond_mask[:, -1] = 1, 1
    schedule = sampling.SamplingSchedule((20, 6, 1), (0.8, 0.8, 0.0))
    args = (codebook, text_ids, text_mask, uncond_ids, uncond_mask, jax.random.key(7))
    # The cached sampler (the one `generate` runs; tests/models/test_t2i.py checks it against full recompute).
    ours = t2i_sampler.make_sampler(unified.UnifiedModel(config), cfg_scale=3.0, schedule=schedule)(
        {"params": params}, *args)
    theirs = t2i_sampler.make_sampler(model, cfg_scale=3.0, schedule=schedule)(variables, *args)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert len(np.unique(np.asarray(ours))) > 5  # a real draw, not a constant
    # Teacher forcing too (the full sequence at once): the training loss reads generation_logits.
    codes = codebook[indices]
    np.testing.assert_array_equal(
        np.asarray(unified.UnifiedModel(config).apply({"params": params}, text_ids, text_mask, codes,
                                                      method=unified.UnifiedModel.generation_logits)),
        np.asarray(model.apply(variables, text_ids, text_mask, codes)))


def test_with_a_vlms_weights_it_gives_the_same_logits_and_answers():
    llm = transformer.TransformerConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                        qk_norm=True, max_positions=64)
    vlm_cfg = vlm.VLMConfig(llm=llm, feature_dim=40, num_image_tokens=T)
    vlm_params = nn.unbox(vlm.VLM(vlm_cfg).init(jax.random.key(3), *[jnp.zeros(s.shape, s.dtype)
                                                                       for s in vlm.init_args(vlm_cfg)]))["params"]
    vlm_params["llm"]["lm_head"]["kernel"] = vlm_params["llm"]["lm_head"]["kernel"] * 20  # decisive greedy steps
    config = unified_config(tiny_config(head="separate"))
    assert config.llm == llm
    params = {**unified_params(config), "llm": vlm_params["llm"], "vision_projector": vlm_params["projector"]}
    model = unified.UnifiedModel(config)

    rng = np.random.default_rng(0)
    prompt = np.asarray([[0, 0, 3, IMG, IMG, IMG, IMG, 7], [5, 6, IMG, IMG, IMG, IMG, 8, 9]], np.int32)
    mask = np.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)
    features = jnp.asarray(rng.normal(size=(2, T, 40)).astype(np.float32))
    ours = model.apply({"params": params}, prompt, features, mask, method=unified.UnifiedModel.answer_logits)
    theirs = vlm.VLM(vlm_cfg).apply({"params": vlm_params}, prompt, features, mask)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    steps = 6
    tokens, lengths = AnswerDecoder(model, max_new_tokens=steps, stop_ids=[], pad_id=0).batch(
        params, prompt, mask, features)
    ref, ref_lengths = AnswerDecoder(vlm.VLM(vlm_cfg), max_new_tokens=steps, stop_ids=[], pad_id=0).batch(
        vlm_params, prompt, mask, features)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(lengths), np.asarray(ref_lengths))
    assert len(set(np.asarray(ref)[0].tolist())) > 1  # the decode moved


def test_understanding_inputs_are_checked():
    with pytest.raises(ConfigError, match="num_image_tokens"):
        unified_config(tiny_config()).__class__(**{**unified_config(tiny_config()).__dict__, "num_image_tokens": 0})
