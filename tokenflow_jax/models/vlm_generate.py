"""Answer generation for the understanding model: KV-cached prefill + decode, batched or streamed.

    gen = AnswerDecoder(model, max_new_tokens=32, stop_ids=[2])
    tokens, lengths = gen.batch(params, prompt_ids, prompt_mask, features)      # one jitted call
    for token in gen.stream(params, prompt_ids, prompt_mask, features): ...    # one row, token by token

Prompts are left-padded ([B, P], mask 1 = token) so every row's last prompt token sits at slot P-1 and the
new tokens are appended in lock step; RoPE positions come from the padding (HF's ``cumsum(mask) - 1``), so a
padded row is computed exactly like the unpadded one. Decoding is greedy by default (``temperature`` 0) or
samples with temperature and top-k / top-p (``ops/sampling.py``). A row stops at its first stop id (which
is not returned); ``batch`` runs a ``lax.while_loop`` until every row stopped or ``max_new_tokens``.
``full_recompute`` is the no-cache reference (every step re-runs the whole sequence), kept for the
benchmark and for the test that the cached path gives the same tokens.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import transformer
from tokenflow_jax.models.llm_layers import positions_from_padding
from tokenflow_jax.models.vlm import VLM, spliced_extend, spliced_logits_at
from tokenflow_jax.ops import sampling


class AnswerDecoder:
    """Decodes the VLM's answers token by token with a KV cache: ``batch`` (padded rows, all at once) and
    ``stream`` (one answer, yielded as it is decoded); greedy or temperature / top-k / top-p sampling."""

    def __init__(self, model: VLM, *, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0):
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens (config.generate.max_new_tokens) must be >= 1, got {max_new_tokens}")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.stop_ids = jnp.asarray(sorted({int(i) for i in stop_ids}) or [-1], jnp.int32)
        self.pad_id = int(pad_id)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self._prefill = jax.jit(self._prefill_fn)
        self._step = jax.jit(self._step_fn)
        self._batch = jax.jit(self._batch_fn)

    # -- pieces --------------------------------------------------------------------------------------

    def _pick(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] -> next tokens [B] int32."""
        if self.temperature <= 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sampling.sample(key, logits / self.temperature, self.top_k, self.top_p).astype(jnp.int32)

    def _prefill_fn(self, params, prompt_ids, prompt_mask, features):
        b, p = prompt_ids.shape
        cache = transformer.init_cache(self.model.config.llm, b, p + self.max_new_tokens)
        positions = positions_from_padding(prompt_mask)
        logits, cache = self.model.apply({"params": params}, cache, prompt_ids, features, positions=positions,
                                         valid=prompt_mask.astype(bool), method=spliced_extend)
        return logits[:, -1], cache, positions[:, -1]

    def _step_fn(self, params, cache, token, position):
        """token [B], position [B] (its RoPE position) -> (logits [B, V], cache)."""
        logits, cache = self.model.apply({"params": params}, cache, token[:, None], None,
                                         positions=position[:, None], method=spliced_extend)
        return logits[:, -1], cache

    def _batch_fn(self, params, prompt_ids, prompt_mask, features, key):
        b = prompt_ids.shape[0]
        logits, cache, last = self._prefill_fn(params, prompt_ids, prompt_mask, features)
        out = jnp.full((b, self.max_new_tokens), self.pad_id, jnp.int32)
        lengths = jnp.zeros((b,), jnp.int32)
        done = jnp.zeros((b,), bool)

        def cond(carry):
            t, _, _, _, _, done, _ = carry
            return (t < self.max_new_tokens) & ~jnp.all(done)

        def body(carry):
            t, logits, cache, out, lengths, done, last = carry
            token = self._pick(logits, jax.random.fold_in(key, t))
            stop = jnp.isin(token, self.stop_ids)
            live = ~done & ~stop
            out = out.at[:, t].set(jnp.where(live, token, self.pad_id))
            lengths = lengths + live.astype(jnp.int32)
            done = done | stop
            last = last + 1
            logits, cache = self._step_fn(params, cache, token, last)
            return t + 1, logits, cache, out, lengths, done, last

        carry = (jnp.zeros((), jnp.int32), logits, cache, out, lengths, done, last)
        _, _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths

    # -- entry points --------------------------------------------------------------------------------

    def batch(self, params: Any, prompt_ids, prompt_mask, features, key: jax.Array | None = None):
        """Left-padded prompts [B, P] -> (tokens [B, max_new_tokens] padded with pad_id, lengths [B])."""
        key = jax.random.key(0) if key is None else key
        return self._batch(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), features, key)

    def stream(self, params: Any, prompt_ids, prompt_mask, features, key: jax.Array | None = None) -> Iterator[int]:
        """Yields the tokens of row 0 one at a time (for a chat), until a stop id or max_new_tokens."""
        key = jax.random.key(0) if key is None else key
        logits, cache, last = self._prefill(params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), features)
        stops = set(np.asarray(self.stop_ids).tolist())
        for t in range(self.max_new_tokens):
            token = self._pick(logits, jax.random.fold_in(key, t))
            value = int(token[0])
            if value in stops:
                return
            yield value
            last = last + 1
            logits, cache = self._step(params, cache, token, last)


def full_recompute(model: VLM, params: Any, prompt_ids: np.ndarray, prompt_mask: np.ndarray, features,
                   max_new_tokens: int) -> np.ndarray:
    """Greedy tokens [B, max_new_tokens] without a cache: step t re-runs the prompt plus t new tokens over
    a fixed-length buffer (causal, so the unfilled tail never matters; one compile). No stop ids."""
    b, p = prompt_ids.shape
    ids = np.concatenate([prompt_ids, np.zeros((b, max_new_tokens), np.int32)], axis=1)
    mask = np.concatenate([prompt_mask, np.ones((b, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = positions_from_padding(mask)
    forward = jax.jit(lambda prm, i, index: model.apply({"params": prm}, i, features, mask, positions, index,
                                                         method=spliced_logits_at))
    for t in range(max_new_tokens):
        logits = forward(params, ids, p + t - 1)
        ids[:, p + t] = np.asarray(jnp.argmax(logits, axis=-1))
    return ids[:, p:]
