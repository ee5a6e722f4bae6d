"""The understanding model: splicing, projector and loss against torch, features, cached generation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.numerics import rel_err
from tokenflow_jax import config as config_lib
from tokenflow_jax.models import transformer, vlm
from tokenflow_jax.models.vlm_generate import AnswerDecoder, full_recompute
from tokenflow_jax.recipes.tokenizer import frozen

LLM = transformer.TransformerConfig(vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                                    max_positions=64)
CFG = vlm.VLMConfig(llm=LLM, feature_dim=40, num_image_tokens=4)
IMG = vlm.IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def params():
    ids = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(vlm.VLM(CFG).init(jax.random.key(0), ids, jnp.zeros((1, 4, 40))))["params"]


def _ids(rows):
    return np.asarray(rows, np.int32)


def test_splice_puts_the_t_th_feature_at_the_t_th_placeholder():
    rng = np.random.default_rng(0)
    ids = _ids([[5, IMG, IMG, IMG, 7, 8], [IMG, IMG, IMG, 3, 4, 9], [1, 2, 3, 4, 5, 6]])
    text = rng.normal(size=(3, 6, 8)).astype(np.float32)
    image = rng.normal(size=(3, 3, 8)).astype(np.float32)
    out = np.asarray(vlm.splice_images(jnp.asarray(text), jnp.asarray(image), jnp.asarray(ids)))
    expected = text.copy()
    for b in range(3):
        for t, pos in enumerate(np.flatnonzero(ids[b] == IMG)):
            expected[b, pos] = image[b, t]
    np.testing.assert_array_equal(out, expected)


def test_projector_matches_torch_mlp2x_gelu(params):
    p = jax.tree.map(np.array, params["projector"])  # writable copies for torch.from_numpy
    x = np.random.default_rng(1).normal(size=(2, 4, 40)).astype(np.float32)
    ours = vlm.VLM(CFG).apply({"params": params}, jnp.asarray(x), method=lambda m, f: m.projector(f))
    lin1, lin2 = torch.nn.Linear(40, 32), torch.nn.Linear(32, 32)
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(p["fc1"]["kernel"].T)), lin1.bias.copy_(torch.from_numpy(p["fc1"]["bias"]))
        lin2.weight.copy_(torch.from_numpy(p["fc2"]["kernel"].T)), lin2.bias.copy_(torch.from_numpy(p["fc2"]["bias"]))
        ref = torch.nn.Sequential(lin1, torch.nn.GELU(), lin2)(torch.from_numpy(x)).numpy()
    assert rel_err(np.asarray(ours), ref) < 1e-5


def test_forward_equals_the_decoder_on_hand_spliced_embeddings(params):
    rng = np.random.default_rng(2)
    ids = _ids([[3, IMG, IMG, IMG, IMG, 7, 8, 9], [IMG, IMG, IMG, IMG, 4, 5, 6, 0]])
    mask = np.array([[1] * 8, [1] * 7 + [0]], np.int32)
    features = rng.normal(size=(2, 4, 40)).astype(np.float32)
    model = vlm.VLM(CFG)
    logits = model.apply({"params": params}, ids, features, mask)
    proj = model.apply({"params": params}, jnp.asarray(features), method=lambda m, f: m.projector(f))
    embeds = np.asarray(params["llm"]["embed_tokens"]["embedding"])[np.maximum(ids, 0)]
    embeds[ids == IMG] = np.asarray(proj).reshape(-1, 32)
    ref = transformer.Transformer(LLM).apply({"params": params["llm"]}, inputs_embeds=jnp.asarray(embeds), mask=mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # The features matter: other features change the logits after the image, not before it.
    other = model.apply({"params": params}, ids, features + 1.0, mask)
    assert np.abs(np.asarray(other - logits)[0, :1]).max() < 1e-6
    assert np.abs(np.asarray(other - logits)[0, 5:]).max() > 1e-3


def test_token_nll_matches_torch_cross_entropy_with_ignore_index():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    labels[rng.random((3, 7)) < 0.4] = -100
    nll, weight = vlm.token_nll(jnp.asarray(logits), jnp.asarray(labels))
    ours = float(jnp.sum(nll) / jnp.sum(weight))
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, 11),
                                            torch.from_numpy(labels[:, 1:]).reshape(-1).long(), ignore_index=-100)
    assert abs(ours - float(ref)) < 1e-5 * abs(float(ref))
    np.testing.assert_array_equal(np.asarray(weight), (labels[:, 1:] != -100).astype(np.float32))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """(config, model, variables) of a randomly initialised configs/tokenizer.py:tiny."""
    tok_config = config_lib.load_config("configs/tokenizer.py:tiny")
    return (tok_config, *frozen.load_tokenizer(tok_config, None))


@pytest.mark.parametrize("kind", ["final", "final_semantic", "all_scales"])
def test_visual_features_are_the_tokenizer_maps(kind, tiny_tokenizer):
    tok_config, model, variables = tiny_tokenizer
    images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32))
    # Jitted as the trainers run it (op by op, the tokenizer's encoder takes ~10x longer to dispatch here).
    out = np.asarray(jax.jit(lambda v, x: vlm.visual_features(model, v, x, kind))(variables, images))
    assert out.shape == (2,) + vlm.feature_shape(tok_config, kind)
    features, _, indices = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, images)
    if kind == "all_scales":
        codebook = np.asarray(frozen.codebook_vectors(model, variables))
        np.testing.assert_allclose(out, codebook[np.asarray(indices)], atol=1e-6)
    else:
        flat = np.asarray(features).reshape(2, 64, 40)
        np.testing.assert_allclose(out, flat[..., :32] if kind == "final_semantic" else flat, atol=1e-6)


def test_cached_generation_equals_full_recompute_with_left_padding(params):
    # Sharpen the head so greedy tokens are not decided by float noise.
    params = jax.tree.map(lambda x: x, params)
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"] * 20
    rng = np.random.default_rng(5)
    prompt = _ids([[0, 0, 3, IMG, IMG, IMG, IMG, 7], [5, 6, IMG, IMG, IMG, IMG, 8, 9]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], np.int32)
    features = jnp.asarray(rng.normal(size=(2, 4, 40)).astype(np.float32))
    model = vlm.VLM(CFG)
    steps = 6
    ref = full_recompute(model, params, prompt, mask, features, steps)
    gen = AnswerDecoder(model, max_new_tokens=steps, stop_ids=[], pad_id=0)
    tokens, lengths = gen.batch(params, prompt, mask, features)
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    np.testing.assert_array_equal(np.asarray(lengths), [steps, steps])
    assert len(set(ref[0].tolist())) > 1  # the decode moved
    # The padded row equals the same prompt without padding.
    alone = full_recompute(model, params, prompt[:1, 2:], mask[:1, 2:], features[:1], steps)
    np.testing.assert_array_equal(alone[0], ref[0])
    # Streaming row 0 gives the same tokens; a stop id ends a row and is not returned.
    np.testing.assert_array_equal(list(gen.stream(params, prompt[:1], mask[:1], features[:1])), ref[0])
    stop = int(ref[1, 2])
    stopped, lengths = AnswerDecoder(model, max_new_tokens=steps, stop_ids=[stop], pad_id=-1).batch(
        params, prompt, mask, features)
    first = [list(r).index(stop) if stop in r else steps for r in ref]
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(stopped)[b, : first[b]], ref[b, : first[b]])
        assert (np.asarray(stopped)[b, first[b]:] == -1).all()
    np.testing.assert_array_equal(np.asarray(lengths), first)
