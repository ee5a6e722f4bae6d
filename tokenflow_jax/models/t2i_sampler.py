"""Multi-step next-scale sampling with classifier-free guidance, cached and full-recompute (paper Table 6;
ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/language_model/llava_llama.py``, ``autoregressive_infer_cfg``).

Both samplers run the same loop over scales si = 0..n-1 on a batch of 2B rows (B prompts, then B copies of
the unconditional prompt):

1. pass 0 drafts scale si from the running map of scales < si (bicubic-resized to s_si);
2. guidance t = cfg * si / (n - 1): logits = (1 + t) * cond - t * uncond; top-k then top-p; the same codes
   go to the cond and uncond rows. The code head is affine, so the guided logits are computed as
   head((1 + t) * h_cond - t * h_uncond) from the final hidden states: one head matmul per image instead of
   two, the same logits up to float rounding (the head is 40% of the FLOPs of a 2-layer 1b decoder's
   cached sampler, K = 32,768 rows of width 2,048);
3. passes 1.. (si >= 1 only) re-predict scale si with the block's input replaced by the running map
   *including* the current draft, with the next (top_k, top_p) pair.

:func:`sample_full_recompute` follows the reference: every pass runs the whole sequence up to the current
block. :func:`sample_cached` keeps a KV cache: the text prefix and every finished scale are computed once,
and a pass only computes the current block, reading only the cache slots before the block's end. A
refinement pass writes its keys/values into a copy of the cache that is then dropped, because the next
scale must see the block computed from the pass-0 input (the running map of scales < si), exactly as the
reference's next full recompute does.

Random keys are ``fold_in(fold_in(key, si), pass)``, so both samplers draw the same codes for one seed.
With one key per prompt, each row draws from its own key: batch generation gives image (i, j) the same
codes whichever batch it lands in.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from tokenflow_jax.models import t2i, transformer
from tokenflow_jax.ops import resize, sampling


def _per_row(key: jax.Array) -> bool:
    """Whether ``key`` is one key per prompt ([B] typed keys, or [B, 2] raw uint32 keys)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim > (0 if typed else 1)


def pass_key(key: jax.Array, scale_index: int, pass_index: int) -> jax.Array:
    fold = lambda k: jax.random.fold_in(jax.random.fold_in(k, scale_index), pass_index)  # noqa: E731
    return jax.vmap(fold)(key) if _per_row(key) else fold(key)


def guided_code_logits(apply, hidden: jax.Array, si: int, num_scales: int, cfg_scale: float) -> jax.Array:
    """Final hidden states [2B, T, D] (cond rows first) -> guided float32 code logits [B, T, K].

    ``(1 + t) * head(h_c) - t * head(h_u) = head((1 + t) * h_c - t * h_u)`` for an affine head (the bias, if
    any, keeps weight (1 + t) - t = 1), so the head runs on B rows, not 2B.
    """
    b = hidden.shape[0] // 2
    t = sampling.guidance_scale(cfg_scale, si, num_scales)
    return apply(sampling.apply_guidance(hidden[:b], hidden[b:], t), method=t2i.NextScaleT2I.code_logits)


def _guided_sample(apply, hidden: jax.Array, key: jax.Array, si: int, num_scales: int, cfg_scale: float,
                   top_k: int, top_p: float) -> jax.Array:
    """hidden [2B, T, D] (cond rows first) -> codes [B, T] int32; ``key`` one key or one per row."""
    guided = guided_code_logits(apply, hidden, si, num_scales, cfg_scale)
    if _per_row(key):
        return jax.vmap(lambda k, x: sampling.sample(k, x, top_k, top_p))(key, guided)
    return sampling.sample(key, guided, top_k, top_p)


def _both(x: jax.Array) -> jax.Array:
    """The same [B, ...] values for the cond and the uncond rows -> [2B, ...]."""
    return jnp.concatenate([x, x], axis=0)


def _lookup(codebook: jax.Array, codes: jax.Array, side: int) -> jax.Array:
    """codes [B, side^2] -> code vectors [B, side, side, C]."""
    return jnp.take(codebook, codes, axis=0).reshape(codes.shape[0], side, side, codebook.shape[-1])


def _check_inputs(config: t2i.T2IConfig, text_ids, text_mask, uncond_ids, uncond_mask) -> None:
    p = config.text_length
    for name, x in (("text_ids", text_ids), ("text_mask", text_mask), ("uncond_ids", uncond_ids),
                    ("uncond_mask", uncond_mask)):
        if x.ndim != 2 or x.shape[1] != p or x.shape[0] != text_ids.shape[0]:
            raise ValueError(f"sampler: {name} must be [B, text_length] = [{text_ids.shape[0]}, {p}], got {x.shape}")


def sample_cached(model: t2i.NextScaleT2I, variables: Any, codebook: jax.Array, text_ids: jax.Array,
                  text_mask: jax.Array, uncond_ids: jax.Array, uncond_mask: jax.Array, key: jax.Array, *,
                  cfg_scale: float, schedule: sampling.SamplingSchedule) -> jax.Array:
    """Image-token indices [B, N] for B prompts, with a KV cache. jit-able (config, cfg_scale, schedule static).

    Args:
      model, variables: the t2i model and its variables.
      codebook: [K, C] the tokenizer's normalised code vectors (semantic then pixel part).
      text_ids, text_mask: [B, P] the prompts, left-padded (mask 1 = token).
      uncond_ids, uncond_mask: [B, P] the unconditional prompt (the reference's negative prompt), per row.
      key: a PRNG key, or one per prompt ([B] keys): then each row's codes depend only on its own key and
        prompt, not on the rest of the batch.
    """
    cfg = model.config
    _check_inputs(cfg, text_ids, text_mask, uncond_ids, uncond_mask)
    p, scales, offsets = cfg.text_length, cfg.scales, cfg.token_offsets
    n, slots = len(scales), cfg.sequence_length
    rows = 2 * text_ids.shape[0]
    apply = functools.partial(model.apply, variables)

    key_valid = jnp.concatenate(
        [jnp.concatenate([text_mask, uncond_mask], 0).astype(bool), jnp.ones((rows, slots - p), bool)], axis=1
    )
    cache = transformer.init_cache(cfg.llm, rows, slots)

    # The prefix: causal over the text; its last position predicts the 1x1 scale.
    prefix = apply(jnp.concatenate([text_ids, uncond_ids], 0), method=t2i.NextScaleT2I.prefix_embeds)
    mask = key_valid[:, None, :p] & jnp.tril(jnp.ones((p, p), bool))[None]
    hidden, cache = apply(cache, prefix, 0, mask, method=t2i.NextScaleT2I.extend)
    top_k, top_p = schedule.passes(0)[0]
    codes = _guided_sample(apply, hidden[:, -1:], pass_key(key, 0, 0), 0, n, cfg_scale, top_k, top_p)
    all_codes = [codes]
    running = _lookup(codebook, codes, 1)  # f_1 [B, 1, 1, C]

    for si in range(1, n):
        side, first = scales[si], offsets[si]
        start = p - 1 + first  # slot of the input predicting token `first`
        g = resize.bicubic_resize(running, (side, side))  # running map of scales < si at s_si
        end = start + side * side  # the block attends slots [0, end): the prefix, earlier scales and itself
        mask = jnp.broadcast_to(key_valid[:, None, :end], (rows, side * side, end))

        def block(inputs, cache, first=first, start=start, mask=mask):
            emb = apply(_both(inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])), first,
                        method=t2i.NextScaleT2I.image_embeds)
            return apply(cache, emb, start, mask, method=t2i.NextScaleT2I.extend)  # (hidden, cache)

        hidden, cache = block(g, cache)  # this cache entry is what later scales attend
        draft = None
        for pi, (top_k, top_p) in enumerate(schedule.passes(si)):
            if pi > 0:
                hidden, _ = block(g + _lookup(codebook, draft, side), cache)
            draft = _guided_sample(apply, hidden, pass_key(key, si, pi), si, n, cfg_scale, top_k, top_p)
        all_codes.append(draft)
        running = g + _lookup(codebook, draft, side)
    return jnp.concatenate(all_codes, axis=1)


def sample_full_recompute(model: t2i.NextScaleT2I, variables: Any, codebook: jax.Array, text_ids: jax.Array,
                          text_mask: jax.Array, uncond_ids: jax.Array, uncond_mask: jax.Array, key: jax.Array, *,
                          cfg_scale: float, schedule: sampling.SamplingSchedule) -> jax.Array:
    """The reference loop (no cache): every pass embeds and runs the sequence up to the current block.

    Same arguments and result as :func:`sample_cached`; the ground truth it is tested against.
    """
    cfg = model.config
    _check_inputs(cfg, text_ids, text_mask, uncond_ids, uncond_mask)
    scales, offsets = cfg.scales, cfg.token_offsets
    n = len(scales)
    apply = functools.partial(model.apply, variables)
    ids = jnp.concatenate([text_ids, uncond_ids], 0)
    both_masks = jnp.concatenate([text_mask, uncond_mask], 0)
    prefix = apply(ids, method=t2i.NextScaleT2I.prefix_embeds)

    def run(image_inputs: list[jax.Array], predict: int) -> jax.Array:
        """Inputs of blocks 1..si ([B, s^2, C] each) -> final hidden states of the last ``predict`` positions."""
        parts = [prefix]
        for si, inputs in enumerate(image_inputs, start=1):
            parts.append(apply(_both(inputs), offsets[si], method=t2i.NextScaleT2I.image_embeds))
        embeds = jnp.concatenate(parts, axis=1)
        mask = t2i.block_causal_mask(cfg, both_masks, embeds.shape[1])
        hidden = apply(embeds, mask, method=t2i.NextScaleT2I.hidden_states)
        return hidden[:, -predict:]

    top_k, top_p = schedule.passes(0)[0]
    codes = _guided_sample(apply, run([], 1), pass_key(key, 0, 0), 0, n, cfg_scale, top_k, top_p)
    all_codes = [codes]
    for si in range(1, n):
        side = scales[si]
        sampled = jnp.concatenate(all_codes, axis=1)
        # Inputs of blocks 1..si from the codes so far (a dummy code fills scale si; its own block's input
        # does not depend on it).
        dummy = jnp.ones((sampled.shape[0], side * side), jnp.int32)
        vectors = jnp.take(codebook, jnp.concatenate([sampled, dummy], 1), axis=0)
        flat = t2i.running_map_inputs(vectors, scales[: si + 1])
        blocks = [flat[:, offsets[k] - 1 : offsets[k + 1] - 1] for k in range(1, si + 1)]
        draft, pass0_input = None, blocks[-1]
        for pi, (top_k, top_p) in enumerate(schedule.passes(si)):
            if pi > 0:  # the block's input becomes the running map including the current draft, at s_si
                blocks = blocks[:-1] + [pass0_input + jnp.take(codebook, draft, axis=0)]
            draft = _guided_sample(apply, run(blocks, side * side), pass_key(key, si, pi), si, n, cfg_scale, top_k,
                                   top_p)
        all_codes.append(draft)
    return jnp.concatenate(all_codes, axis=1)


def forward_tokens(config: t2i.T2IConfig, schedule: sampling.SamplingSchedule, cached: bool) -> int:
    """Positions run through the decoder per row for one image (the benchmark's work measure)."""
    p, offsets, scales = config.text_length, config.token_offsets, config.scales
    total = p  # the prefix (with its last position predicting the 1x1 scale)
    for si in range(1, len(scales)):
        block = scales[si] ** 2
        per_pass = block if cached else p - 1 + offsets[si] + block
        total += per_pass * len(schedule.passes(si))
    return int(total)


def make_sampler(model: t2i.NextScaleT2I, *, cfg_scale: float, schedule: sampling.SamplingSchedule,
                 cached: bool = True):
    """A jitted ``(variables, codebook, text_ids, text_mask, uncond_ids, uncond_mask, key) -> indices [B, N]``."""
    fn = sample_cached if cached else sample_full_recompute
    return jax.jit(functools.partial(fn, model, cfg_scale=float(cfg_scale), schedule=schedule))

