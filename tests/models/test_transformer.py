"""The Llama-family decoder (models/transformer.py, models/llm_layers.py).

A float64 numpy reference (QK-norm, GQA, biases), masks, KV cache, block recompute.
HF parity of whole converted checkpoints lives in tests/convert/test_llm.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import official_t2i_reference
from tests.numerics import rel_err
from tokenflow_jax import parallel
from tokenflow_jax.models.llm_layers import causal_mask, positions_from_padding, rms_norm
from tokenflow_jax.models.transformer import (
    BLOCK_ORDERS,
    Transformer,
    TransformerConfig,
    abstract_variables,
    cache_shardings,
    init_cache,
)

MAX_REL_ERR = 1e-5  # max|ours - reference| / max|reference|, float32 vs float64 on CPU
CFG = TransformerConfig(
    vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, rope_theta=100.0, norm_eps=1e-5,
    qkv_bias=True, o_bias=True, qk_norm=True, max_positions=64,
)



def random_params(config: TransformerConfig, seed: int = 0):
    """Init, then every weight redrawn at a scale where attention, norms and biases all matter."""
    init = jax.jit(Transformer(config).init)
    params = nn.unbox(init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat.items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        out[path] = 1.0 + 0.2 * noise if path[-1] == "scale" else (0.5 if path[-1] == "embedding" else 0.15) * noise
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out))


# ----------------------------------------------------------------------------------------------------------
# float64 numpy reference, written from the HF modelling code (not from our module)


def _np_rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _np_rope(x, positions, theta):  # x [B, L, N, Dh], HF rotate_half convention
    dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    angles = positions[..., None] * inv_freq
    emb = np.concatenate([angles, angles], -1)[:, :, None, :]
    rotated = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def reference_logits(params, cfg: TransformerConfig, ids, positions, mask, qk_norm=None):
    """Logits [B, L, V] in float64; mask [B, L, L] boolean (True = attend)."""
    qk_norm = cfg.qk_norm if qk_norm is None else qk_norm
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed_tokens"]["embedding"][ids]
    groups = cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.depth):
        lay = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        att = lay["self_attn"]
        h = _np_rms(x, lay["input_layernorm"]["scale"], cfg.norm_eps)
        q, k, v = (
            np.einsum("bld,dhe->blhe", h, att[n]["kernel"]) + att[n].get("bias", 0.0)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        if qk_norm:
            q = _np_rms(q, att["q_norm"]["scale"], cfg.qk_norm_eps)
            k = _np_rms(k, att["k_norm"]["scale"], cfg.qk_norm_eps)
        q, k = _np_rope(q, positions, cfg.rope_theta), _np_rope(k, positions, cfg.rope_theta)
        k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(cfg.head_dim)
        scores = np.where(mask[:, None], scores, -1e30)  # finite, as HF: fully masked pad rows stay finite
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhe->bqhe", weights, v)
        x = x + np.einsum("bqhe,hed->bqd", o, att["o_proj"]["kernel"]) + att["o_proj"].get("bias", 0.0)
        h = _np_rms(x, lay["post_attention_layernorm"]["scale"], cfg.norm_eps)
        mlp = lay["mlp"]
        gate = h @ mlp["gate_proj"]["kernel"]
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = _np_rms(x, p["norm"]["scale"], cfg.norm_eps)
    head = p["embed_tokens"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.fixture(scope="module")
def params():
    return random_params(CFG)


def _padded_batch(batch=2, length=9, pad=3, seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, length))
    padding = np.ones((batch, length), bool)
    padding[1, :pad] = False  # row 1 is left-padded
    return ids, padding


# ----------------------------------------------------------------------------------------------------------
# Forward numerics


def test_rms_norm_matches_hf_formula():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    ref = _np_rms(x.astype(np.float64), w, 1e-6)
    assert rel_err(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), ref) < 1e-6
    out_bf16 = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 1e-6)
    assert out_bf16.dtype == jnp.bfloat16


def test_qk_norm_gqa_biases_match_numpy_reference(params):
    ids, padding = _padded_batch()
    positions = np.asarray(positions_from_padding(padding))
    mask = np.asarray(causal_mask(ids.shape[1], padding))
    ours = Transformer(CFG).apply({"params": params}, ids, positions=positions, mask=padding)
    ref = reference_logits(params, CFG, ids, positions, mask)
    keep = padding  # padded queries attend nothing; their outputs are meaningless on both sides
    assert rel_err(ours, ref, keep) < MAX_REL_ERR
    # The reference must be able to tell: without QK-norm it is far off.
    assert rel_err(ours, reference_logits(params, CFG, ids, positions, mask, qk_norm=False), keep) > 1e-2


def _official_state(params, cfg: TransformerConfig):
    """Our decoder params -> the released t2i model's torch state dict (HF names, nn.Linear weights [out, in])."""
    import torch

    d, dh = cfg.width, cfg.head_dim
    t = lambda a: torch.tensor(np.ascontiguousarray(np.asarray(a, np.float32)))  # noqa: E731
    state = {"model.norm.weight": t(params["norm"]["scale"]),
             "lm_head.weight": t(np.asarray(params["lm_head"]["kernel"]).T)}
    for i in range(cfg.depth):
        lay = jax.tree.map(lambda a, i=i: np.asarray(a)[i], params["layers"])
        att, p = lay["self_attn"], f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):  # [D, N, Dh] -> [N * Dh, D]
            state[p + f"self_attn.{name}.weight"] = t(att[name]["kernel"].reshape(d, -1).T)
        state[p + "self_attn.o_proj.weight"] = t(att["o_proj"]["kernel"].reshape(-1, d).T)  # [H, Dh, D] -> [D, H*Dh]
        state[p + "self_attn.qknorm.query_norm.weight"] = t(att["q_norm"]["scale"])
        state[p + "self_attn.qknorm.key_norm.weight"] = t(att["k_norm"]["scale"])
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[p + f"mlp.{name}.weight"] = t(lay["mlp"][name]["kernel"].T)
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[p + f"{name}.weight"] = t(lay[name]["scale"])
    assert dh * cfg.num_heads == d
    return state


def test_post_sublayer_norm_matches_the_official_t2i_decoder_in_torch(params):
    """block_order='post_sublayer_norm' = the released t2i decoder, on a block-causal mask over embeddings."""
    cfg = dataclasses.replace(CFG, block_order="post_sublayer_norm", qkv_bias=False, o_bias=False)
    p = random_params(cfg, seed=11)
    _, prefix_padding = _padded_batch(length=5, pad=2)
    mask = _block_causal(prefix_padding, (1, 2, 3))
    batch, total = mask.shape[:2]
    embeds = np.random.default_rng(3).standard_normal((batch, total, cfg.width)).astype(np.float32)
    positions = np.broadcast_to(np.arange(total), (batch, total))
    ours = Transformer(cfg).apply({"params": p}, inputs_embeds=embeds, positions=positions, mask=mask)
    torch = pytest.importorskip("torch")
    ref = official_t2i_reference.decoder_logits(
        _official_state(p, cfg), heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, eps=cfg.norm_eps,
        theta=cfg.rope_theta, embeds=torch.tensor(embeds), positions=torch.tensor(positions),
        mask=torch.tensor(mask)).numpy()
    keep = np.concatenate([prefix_padding, np.ones((batch, total - prefix_padding.shape[1]), bool)], 1)
    assert rel_err(ours, ref, keep) < MAX_REL_ERR
    # The order matters: the same weights in the pre-norm order are far from the official decoder.
    pre = Transformer(dataclasses.replace(cfg, block_order="pre_norm")).apply(
        {"params": p}, inputs_embeds=embeds, positions=positions, mask=mask)
    assert rel_err(pre, ref, keep) > 5e-2


def test_inputs_embeds_bool_and_additive_masks_agree(params):
    model = Transformer(CFG)
    variables = {"params": params}
    ids, padding = _padded_batch()
    positions = positions_from_padding(padding)
    base = model.apply(variables, ids, positions=positions, mask=padding)
    embeds = model.apply(variables, ids, method=model.embed)
    assert embeds.shape == (2, ids.shape[1], CFG.width)
    full = causal_mask(ids.shape[1], padding)
    additive = jnp.where(full, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # HF's 4-D float mask
    for kwargs in (dict(inputs_embeds=embeds, mask=padding), dict(mask=full), dict(mask=additive)):
        call_ids = None if "inputs_embeds" in kwargs else ids
        out = model.apply(variables, call_ids, positions=positions, **kwargs)
        np.testing.assert_allclose(out[padding], base[padding], rtol=0, atol=1e-6)
    last, hidden = model.apply(variables, ids, positions=positions, mask=padding, only_last=True, return_hidden=True)
    np.testing.assert_allclose(last[:, 0], base[:, -1], atol=1e-6)
    assert hidden.shape == (2, ids.shape[1], CFG.width)


@pytest.mark.parametrize("block_order", BLOCK_ORDERS)
def test_unrolled_and_remat_layers_are_the_same_function(params, block_order):
    ids, _ = _padded_batch()
    base_cfg = dataclasses.replace(CFG, block_order=block_order)
    base = Transformer(base_cfg).apply({"params": params}, ids)
    for change in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        cfg = dataclasses.replace(base_cfg, **change)
        np.testing.assert_allclose(Transformer(cfg).apply({"params": params}, ids), base, atol=2e-6, err_msg=change)

    def loss(p, cfg):
        return jnp.mean(Transformer(cfg).apply({"params": p}, ids) ** 2)

    g_plain = jax.grad(loss)(params, base_cfg)
    g_remat = jax.grad(loss)(params, dataclasses.replace(base_cfg, remat="full"))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_tied_embeddings_and_bfloat16_compute():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=False, o_bias=False)
    p = random_params(cfg, seed=3)
    assert "lm_head" not in p
    ids, padding = _padded_batch()
    positions = np.asarray(positions_from_padding(padding))
    ref = reference_logits(p, cfg, ids, positions, np.asarray(causal_mask(ids.shape[1], padding)))
    ours = Transformer(cfg).apply({"params": p}, ids, positions=positions, mask=padding)
    assert rel_err(ours, ref, padding) < MAX_REL_ERR
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    low = Transformer(bf16).apply({"params": p}, ids, positions=positions, mask=padding)
    assert low.dtype == jnp.float32  # logits always float32
    assert rel_err(low, ref, padding) < 5e-2


@pytest.mark.parametrize("tie", [False, True])
def test_unembed_of_an_id_range_is_that_slice_of_the_logits_and_computes_only_it(tie):
    """The t2i sampler's image-code logits: ids 40..55 of 64, from those rows of the head alone."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    p = random_params(cfg, seed=5)
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, cfg.width)), jnp.float32)
    unembed = lambda h, ids=None: Transformer(cfg).apply({"params": p}, h, ids, method=Transformer.unembed)  # noqa: E731
    full, part = unembed(hidden), unembed(hidden, (40, 16))
    assert full.shape == (2, 3, 64) and part.shape == (2, 3, 16)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[..., 40:56]), rtol=1e-6, atol=1e-6)
    dots = [e.outvars[0].aval.shape for e in jax.make_jaxpr(lambda h: unembed(h, (40, 16)))(hidden).jaxpr.eqns
            if e.primitive.name in ("dot_general", "pjit")]
    assert dots and all(shape[-1] == 16 for shape in dots)  # no [.., 64] product is ever formed


# ----------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("block_order", BLOCK_ORDERS)
def test_greedy_decode_with_cache_equals_full_recompute(params, block_order):
    cfg = dataclasses.replace(CFG, block_order=block_order)
    model = Transformer(cfg)
    variables = {"params": params}
    prompt, padding = _padded_batch(length=7, pad=3, seed=5)
    batch, length, steps = prompt.shape[0], prompt.shape[1], 6

    extend = jax.jit(
        lambda v, c, ids, pos, valid: model.apply(v, c, ids, positions=pos, valid=valid, only_last=True,
                                                  method=model.extend)
    )
    cache = init_cache(cfg, batch, length + steps)
    positions = np.asarray(positions_from_padding(padding))
    logits, cache = extend(variables, cache, prompt, positions, padding)
    cached_tokens, cached_logits = [], []
    last = positions[:, -1]
    for step in range(steps):
        cached_logits.append(np.asarray(logits[:, -1]))
        cached_tokens.append(cached_logits[-1].argmax(-1))
        if step + 1 < steps:
            last = last + 1
            step_ids = cached_tokens[-1][:, None]
            logits, cache = extend(variables, cache, step_ids, last[:, None], np.ones((batch, 1), bool))
    assert int(cache.length) == length + steps - 1
    np.testing.assert_array_equal(np.asarray(cache.positions)[1, :3], -1)  # padding slots

    # Full recompute over a fixed-length buffer (causal, so the unfilled tail never matters): one compile.
    full = jax.jit(lambda v, ids, pos, m: model.apply(v, ids, positions=pos, mask=m))
    sequence = np.concatenate([prompt, np.zeros((batch, steps), prompt.dtype)], 1)
    seq_padding = np.concatenate([padding, np.ones((batch, steps), bool)], 1)
    seq_positions = positions_from_padding(seq_padding)
    for step in range(steps):
        logits_full = np.asarray(full(variables, sequence, seq_positions, seq_padding))[:, length + step - 1]
        token = logits_full.argmax(-1)
        np.testing.assert_array_equal(token, cached_tokens[step], err_msg=f"step {step}")
        assert rel_err(cached_logits[step], logits_full) < MAX_REL_ERR
        sequence[:, length + step] = token
    assert len({tuple(t) for t in cached_tokens}) > 1  # the decode actually moved


def _block_causal(prefix_padding, scales):
    """[B, T, T] bool: causal over a left-padded prefix, then blocks that see the prefix, earlier blocks and
    their own block in full (the t2i mask of ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/llava_arch.py``)."""
    batch, prefix = prefix_padding.shape
    total = prefix + sum(scales)
    mask = np.tril(np.ones((total, total), bool))
    start = prefix
    for size in scales:
        mask[start : start + size, : start + size] = True
        start += size
    valid = np.concatenate([prefix_padding, np.ones((batch, total - prefix), bool)], 1)
    return mask[None] & valid[:, None, :]


@pytest.mark.parametrize("block_order", BLOCK_ORDERS)
def test_block_recompute_at_an_offset_equals_full_forward(params, block_order):
    """Prefix prefill, then scale blocks; a refinement pass overwrites one block's cache slots in place."""
    cfg = dataclasses.replace(CFG, block_order=block_order)
    model = Transformer(cfg)
    variables = {"params": params}
    rng = np.random.default_rng(7)
    _, prefix_padding = _padded_batch(length=5, pad=2)
    scales = (1, 2, 3)
    prefix, total = prefix_padding.shape[1], prefix_padding.shape[1] + sum(scales)
    batch = prefix_padding.shape[0]
    embeds = rng.standard_normal((batch, total, CFG.width)).astype(np.float32)
    mask = _block_causal(prefix_padding, scales)
    positions = np.broadcast_to(np.arange(total), (batch, total))  # pads occupy positions, as in the reference

    full = jax.jit(lambda v, e, m: model.apply(v, inputs_embeds=e, positions=positions, mask=m))
    extend = jax.jit(
        lambda v, c, e, pos, idx, m: model.apply(v, c, inputs_embeds=e, positions=pos, index=idx, mask=m,
                                                 method=model.extend)
    )

    def run_block(cache, inputs, start, size):
        rows = slice(start, start + size)
        return extend(variables, cache, inputs[:, rows], positions[:, rows], start, mask[:, rows])

    cache = init_cache(cfg, batch, total)
    _, cache = run_block(cache, embeds, 0, prefix)
    reference = np.asarray(full(variables, embeds, mask))
    start = prefix
    for size in scales[:2]:
        logits, cache = run_block(cache, embeds, start, size)
        assert rel_err(logits, reference[:, start : start + size]) < MAX_REL_ERR
        start += size
    length_before = int(cache.length)

    # Refinement: block 2 (scale of size 2) gets new inputs; its slots are overwritten at the same offset.
    refined = embeds.copy()
    second = prefix + scales[0]
    refined[:, second : second + scales[1]] = rng.standard_normal((batch, scales[1], CFG.width))
    logits, cache = run_block(cache, refined, second, scales[1])
    reference = np.asarray(full(variables, refined, mask))
    assert int(cache.length) == length_before  # an overwrite does not grow the cache
    assert rel_err(logits, reference[:, second : second + scales[1]]) < MAX_REL_ERR
    # The next scale sees the refined block, not the draft.
    logits, cache = run_block(cache, refined, start, scales[2])
    assert rel_err(logits, reference[:, start:]) < MAX_REL_ERR
    stale = np.asarray(full(variables, embeds, mask))[:, start:]
    assert rel_err(logits, stale) > 1e-3


def test_sharded_prefill_and_decode_on_mesh222(params, mesh222):
    """Parameters and cache sharded by their logical names give the single-device results."""
    model = Transformer(CFG)
    prompt, padding = _padded_batch(batch=4, length=6, pad=2, seed=11)
    positions = np.asarray(positions_from_padding(padding))

    def run(variables, cache):
        logits, cache = model.apply(variables, cache, prompt, positions=positions, valid=padding, only_last=True,
                                    method=model.extend)
        token = jnp.argmax(logits[:, -1], -1)[:, None]
        step, cache = model.apply(variables, cache, token, positions=positions[:, -1:] + 1, method=model.extend)
        return logits, step, cache

    single = jax.jit(run)({"params": params}, init_cache(CFG, 4, 8))
    param_shardings = parallel.shardings_from_abstract(abstract_variables(CFG), mesh222)
    empty = init_cache(CFG, 4, 8)
    with jax.set_mesh(mesh222), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        variables = jax.device_put({"params": params}, param_shardings)
        cache = jax.jit(lambda: init_cache(CFG, 4, 8), out_shardings=cache_shardings(empty, mesh222))()
        assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
        sharded = jax.jit(run)(variables, cache)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Errors a user can cause


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(num_kv_heads=3), ["num_heads", "num_kv_heads", "multiple"]),
        (dict(width=30, head_dim=None), ["width", "num_heads"]),
        (dict(dtype="fp8"), ["dtype", "bfloat16"]),
        (dict(remat="some"), ["remat", "full"]),
        (dict(depth=0), ["depth", "positive"]),
        (dict(head_dim=7), ["head_dim", "even"]),
        (dict(block_order="post"), ["block_order", "post_sublayer_norm"]),
    ],
)
def test_config_errors_name_the_field(change, words):
    fields = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)} | change
    with pytest.raises(ValueError) as e:
        TransformerConfig(**fields)
    for word in words:
        assert word in str(e.value)


def test_call_and_extend_errors(params):
    model = Transformer(CFG)
    variables = {"params": params}
    ids = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="exactly one of ids"):
        model.apply(variables)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, L, 32\]"):
        model.apply(variables, inputs_embeds=np.zeros((2, 4, 16), np.float32))
    with pytest.raises(ValueError, match="attention mask must be"):
        model.apply(variables, ids, mask=np.ones((2, 4, 5), bool))
    cache = init_cache(CFG, 2, 6)
    with pytest.raises(ValueError, match="index 4 \\+ 4 tokens exceeds the 6 cache slots"):
        model.apply(variables, cache, ids, positions=np.zeros((2, 4), np.int32), index=4, method=model.extend)
    with pytest.raises(ValueError, match="max_positions"):
        init_cache(CFG, 1, CFG.max_positions + 1)
