"""Decoder-only Llama-family transformer (Llama-2 / Vicuna, Qwen2 / Qwen2.5, Qwen3-style QK-norm).

One module, :class:`Transformer`, serves both recipes: the text-to-image model (Llama-2 with QK-norm, the hub
config of ByteFlow-AI/TokenFlow-t2i) and the understanding model (Llama / Qwen2, the hub config of
ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning). Numerics follow HF ``LlamaForCausalLM``:
RMSNorm in float32 (``x * rsqrt(mean(x^2) + eps)``, cast back, times the weight), rotate-half RoPE with
``inv_freq = 1 / theta^(arange(0, d, 2) / d)`` at explicitly given positions, SwiGLU MLP, grouped-query
attention with float32 logits and softmax. With ``qk_norm`` each head's q and k go through an
RMSNorm(head_dim) right after projection and BEFORE RoPE (TokenFlow-t2i's ``qknorm``, Qwen3's q/k_norm).

Block order (``block_order``): ``'pre_norm'`` is HF Llama / Qwen2, ``x + attn(norm(x))`` then
``h + mlp(norm(h))``. ``'post_sublayer_norm'`` is the released TokenFlow text-to-image decoder
(ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/language_model/modeling_llama.py``, whose decoder layer comments
out the input norms and normalises each sub-block's OUTPUT before the residual add): ``h = x + norm(attn(x))``,
``out = h + norm(mlp(h))``. The two norms keep their HF names (``input_layernorm`` follows attention,
``post_attention_layernorm`` follows the MLP), so the same checkpoint keys load into either order; the final
``norm`` before the head is applied in both.

Blocks run under ``nn.scan`` (``scan_layers=False`` unrolls the same scan, so the parameter layout never
changes) and optionally ``nn.remat``; every block parameter has a leading [depth] axis named ``layers``.
Parameter names (the converter's contract), D = width, H = num_heads, K = num_kv_heads, Dh = head_dim::

    embed_tokens/embedding [V, D]                       (vocab, embed)
    layers/input_layernorm/scale [depth, D]
    layers/self_attn/q_proj/{kernel [depth, D, H, Dh], bias [depth, H, Dh] (qkv_bias)}
    layers/self_attn/{k,v}_proj/{kernel [depth, D, K, Dh], bias [depth, K, Dh] (qkv_bias)}
    layers/self_attn/q_norm/scale, k_norm/scale [depth, Dh]   (qk_norm)
    layers/self_attn/o_proj/{kernel [depth, H, Dh, D], bias [depth, D] (o_bias)}
    layers/post_attention_layernorm/scale [depth, D]
    layers/mlp/{gate,up}_proj/kernel [depth, D, F], layers/mlp/down_proj/kernel [depth, F, D]
    norm/scale [D]
    lm_head/kernel [D, V]                               (absent with tie_embeddings)

Entry points (all through ``model.apply(variables, ..., method=...)``):

* ``__call__(ids | inputs_embeds, positions, mask)`` -> logits [B, L, V]: a whole sequence, no cache.
* ``embed(ids)`` -> [B, L, D], so callers can splice image features into the embeddings.
* ``extend(cache, ids | inputs_embeds, positions, ...)`` -> (logits, cache): writes the keys/values of L
  new tokens into a :class:`KVCache` at slot ``index`` and attends over the whole cache. L = prompt length
  is a prefill, L = 1 a decode step, and an ``index`` inside the filled part re-computes (overwrites) a
  block, as the t2i sampler does for the current scale while earlier scales stay cached.

Masks: ``True`` / 0 = attend; boolean or additive (see ``llm_layers``). The numerics (RMSNorm, RoPE,
attention, masks, ``positions_from_padding``) and the ``Linear`` / ``RMSNorm`` modules live in
``tokenflow_jax.models.llm_layers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax import parallel
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import layers
from tokenflow_jax.models.llm_layers import (
    Linear,
    RMSNorm,
    apply_rope,
    attention,
    causal_mask,
    mask_to_bias,
    rope_cos_sin,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BLOCK_ORDERS = ("pre_norm", "post_sublayer_norm")
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}
ACTIVATION_AXES = ("batch", "length", "embed")
# KVCache.k / .v: [layers, B, max_len, kv_heads, head_dim]
CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a Llama-family decoder.

    ``num_kv_heads`` defaults to ``num_heads`` (multi-head attention) and ``head_dim`` to
    ``width // num_heads``; both are filled in by ``__post_init__``.
    """

    vocab_size: int
    width: int  # D, hidden_size
    depth: int  # num_hidden_layers
    num_heads: int  # H, num_attention_heads
    mlp_dim: int  # F, intermediate_size
    num_kv_heads: int | None = None  # K, num_key_value_heads (GQA); H % K == 0
    head_dim: int | None = None  # Dh; HF's head_dim, may differ from D // H (Qwen3)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # rms_norm_eps of the block and final norms
    qkv_bias: bool = False  # q/k/v projection biases (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # output projection bias (Llama with attention_bias only)
    qk_norm: bool = False  # RMSNorm(head_dim) on per-head q and k before RoPE
    qk_norm_eps: float = 1e-6  # TokenFlow-t2i: 1e-6; Qwen3: rms_norm_eps
    block_order: str = "pre_norm"  # one of BLOCK_ORDERS (see the module docstring)
    tie_embeddings: bool = False  # lm_head shares embed_tokens (tie_word_embeddings)
    max_positions: int = 4096  # max_position_embeddings: the longest cache init_cache allows
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # dtype of initialised parameters
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True  # False unrolls the layer scan (same parameter layout)

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.num_heads > 0 and self.width % self.num_heads:
                raise ConfigError(
                    f"TransformerConfig.width {self.width} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.width // max(self.num_heads, 1))
        for name in ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "num_kv_heads", "head_dim",
                     "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"TransformerConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): num_heads % num_kv_heads == 0 is required for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"TransformerConfig.head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "qk_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"TransformerConfig.{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}"
                )
        if self.block_order not in BLOCK_ORDERS:
            raise ConfigError(f"TransformerConfig.block_order must be one of {BLOCK_ORDERS}, got {self.block_order!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"TransformerConfig.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        d, f, h, k, dh = self.width, self.mlp_dim, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * dh * 2 + d * k * dh * 2
        attn += (h + 2 * k) * dh * self.qkv_bias + d * self.o_bias + 2 * dh * self.qk_norm
        block = attn + 3 * d * f + 2 * d
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.depth * block + d


# ----------------------------------------------------------------------------------------------------------
# KV cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``max_len`` slots.

    k, v: [depth, B, max_len, num_kv_heads, head_dim] (RoPE already applied to k).
    positions: [B, max_len] int32, the RoPE position of the token held in each slot; -1 = empty slot or
      padding. The default mask of :meth:`Transformer.extend` attends slots with 0 <= position <= the
      query's position.
    length: [] int32, one past the highest slot written: where the next decode step writes by default.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache (zeros, every slot at position -1) of ``max_len`` slots in ``dtype`` (default: compute)."""
    if max_len > config.max_positions:
        raise ValueError(
            f"cache max_len {max_len} exceeds TransformerConfig.max_positions {config.max_positions}"
        )
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (config.depth, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        positions=jnp.full((batch, max_len), -1, jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES) -> KVCache:
    """NamedShardings for ``cache`` (k, v by ``CACHE_AXES``; positions by (batch, length); length replicated).

    Use as ``jax.jit(..., out_shardings=...)`` of ``init_cache`` so a large cache is never materialised whole.
    """

    def named(logical, shape):
        spec = parallel.logical_to_mesh_spec(jax.sharding.PartitionSpec(*logical), shape, mesh, rules)
        return jax.sharding.NamedSharding(mesh, spec)

    return KVCache(
        k=named(CACHE_AXES, cache.k.shape),
        v=named(CACHE_AXES, cache.v.shape),
        positions=named(("batch", "length"), cache.positions.shape),
        length=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )


# ----------------------------------------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
    """Self-attention of one layer; optionally writes its keys/values into the cache first."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, cos, sin, bias, cache):
        """x [B, L, D]; cos, sin [B, L, Dh]; bias [B|1, H|1, L, Lk], a boolean mask or a float32 additive bias.

        cache: None (keys = this block's L tokens, Lk = L) or (k_all, v_all, layer, index) with
        k_all, v_all [depth, B, S, K, Dh]: this layer's new keys/values are written at slots
        index..index+L-1 of layer ``layer`` and the queries attend the first Lk <= S slots.
        Returns ([B, L, D], cache with ``layer + 1``).
        """
        cfg = self.config
        dtype, pdtype = cfg.compute_dtype, cfg.weight_dtype

        def proj(name, heads):
            return Linear(
                (heads, cfg.head_dim), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, dtype=dtype,
                param_dtype=pdtype, name=name,
            )(x)

        q = proj("q_proj", cfg.num_heads)
        k = proj("k_proj", cfg.num_kv_heads)
        v = proj("v_proj", cfg.num_kv_heads)
        if cfg.qk_norm:  # before RoPE; results cast to v's dtype (TokenFlow-t2i's qknorm)
            q = RMSNorm(cfg.qk_norm_eps, dtype=dtype, param_dtype=pdtype, name="q_norm")(q).astype(v.dtype)
            k = RMSNorm(cfg.qk_norm_eps, dtype=dtype, param_dtype=pdtype, name="k_norm")(k).astype(v.dtype)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "heads", "kv"))
        k = apply_rope(k, cos, sin)

        if cache is not None:
            k_all, v_all, layer, index = cache
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, index, zero, zero)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k_all = nn.with_logical_constraint(k_all, CACHE_AXES)
            v_all = nn.with_logical_constraint(v_all, CACHE_AXES)
            # Attend the first Lk slots only (Lk = the bias's key length, <= S): a block whose mask ends
            # early (the t2i sampler's scale blocks) never reads the empty tail of the cache.
            lk = bias.shape[-1]
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)[:, :lk].astype(dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)[:, :lk].astype(dtype)
            cache = (k_all, v_all, layer + 1, index)

        out = attention(q, k, v, bias)
        out = Linear(
            (cfg.width,), ("heads", "kv", "embed"), in_dims=2, use_bias=cfg.o_bias, dtype=dtype,
            param_dtype=pdtype, name="o_proj",
        )(out)
        return out, cache


class Mlp(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        gate = Linear((cfg.mlp_dim,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear((cfg.mlp_dim,), ("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Linear((cfg.width,), ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """One block in ``config.block_order``; scanned as ``((x, cache), cos, sin, bias) -> ((x, cache), None)``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, carry, cos, sin, bias):
        cfg = self.config
        x, cache = carry
        norm = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        attn_norm = RMSNorm(cfg.norm_eps, name="input_layernorm", **norm)
        mlp_norm = RMSNorm(cfg.norm_eps, name="post_attention_layernorm", **norm)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        if cfg.block_order == "pre_norm":
            h, cache = Attention(cfg, name="self_attn")(attn_norm(x), cos, sin, bias, cache)
            x = x + h
            x = x + Mlp(cfg, name="mlp")(mlp_norm(x))
        else:  # post_sublayer_norm: each sub-block's output is normalised before the residual add
            h, cache = Attention(cfg, name="self_attn")(x, cos, sin, bias, cache)
            x = x + attn_norm(h)
            x = x + mlp_norm(Mlp(cfg, name="mlp")(x))
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return (x, cache), None


class Transformer(nn.Module):
    """Llama / Qwen2 decoder with an LM head. See the module docstring for parameter names."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            embedding_init=nn.with_logical_partitioning(layers.normal_002, ("vocab", "embed")),
        )
        block = DecoderLayer
        if cfg.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            unroll=1 if cfg.scan_layers else cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg)
        self.norm = RMSNorm(cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                (cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype
            )

    # -- pieces ----------------------------------------------------------------------------------------

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, L] -> input embeddings [B, L, D] in the compute dtype."""
        return self.embed_tokens(ids)

    def unembed(self, hidden: jax.Array, ids: tuple[int, int] | None = None) -> jax.Array:
        """Final-normed hidden states [B, L, D] -> float32 logits [B, L, V].

        ``ids = (start, size)``: only the logits of ids start..start+size-1 ([B, L, size]), computed from those
        rows of the head alone (XLA computes a whole matmul before slicing its output).
        """
        if ids is None and self.config.tie_embeddings:
            logits = self.embed_tokens.attend(hidden)
        elif ids is None:
            logits = self.lm_head(hidden)
        elif self.config.tie_embeddings:  # as nn.Embed.attend, on the rows of the ids
            rows = jax.lax.slice_in_dim(self.embed_tokens.embedding, ids[0], ids[0] + ids[1], axis=0)
            dtype = self.config.compute_dtype
            logits = jnp.dot(hidden.astype(dtype), rows.astype(dtype).T)
        else:
            logits = self.lm_head(hidden, columns=ids)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _inputs(self, ids, inputs_embeds) -> jax.Array:
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("Transformer: pass exactly one of ids [B, L] or inputs_embeds [B, L, D]")
        if inputs_embeds is None:
            ids = jnp.asarray(ids)
            if ids.ndim != 2:
                raise ValueError(f"Transformer: ids must be [B, L], got shape {ids.shape}")
            return self.embed(ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.width:
            raise ValueError(
                f"Transformer: inputs_embeds must be [B, L, {self.config.width}] (width), "
                f"got shape {inputs_embeds.shape}"
            )
        return inputs_embeds.astype(self.config.compute_dtype)

    def _positions(self, positions, batch: int, length: int) -> jax.Array:
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = positions[None]
        if positions.ndim != 2 or positions.shape[1] != length or positions.shape[0] not in (1, batch):
            raise ValueError(f"Transformer: positions must be [B, L] = [{batch}, {length}], got {positions.shape}")
        return jnp.broadcast_to(positions, (batch, length)).astype(jnp.int32)

    def _trunk(self, x, positions, bias, cache):
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        (x, cache), _ = self.layers((x, cache), cos, sin, bias)
        return self.norm(x), cache

    def _outputs(self, hidden, only_last: bool, return_hidden: bool):
        logits = self.unembed(hidden[:, -1:] if only_last else hidden)
        return (logits, hidden) if return_hidden else logits

    # -- entry points ----------------------------------------------------------------------------------

    def __call__(
        self,
        ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        only_last: bool = False,
        return_hidden: bool = False,
    ):
        """A whole sequence without cache.

        Args:
          ids: token ids [B, L] (int), or
          inputs_embeds: [B, L, D] input embeddings (e.g. ``embed(ids)`` with image features spliced in).
          positions: RoPE positions [B, L] (default ``0..L-1``); a left-padded row still counts its pads.
          mask: None = causal; [B, L] (1 = token, 0 = padding) = causal with padded keys masked; or a full
            boolean / additive mask [B, L, L] or [B, 1|H, L, L] (e.g. the t2i block-causal mask).
          only_last: return logits for the last position only ([B, 1, V]).
          return_hidden: also return the final-normed hidden states [B, L, D].
        Returns:
          float32 logits [B, L, V] (or [B, 1, V]); with ``return_hidden`` a tuple (logits, hidden).
        """
        x = self._inputs(ids, inputs_embeds)
        batch, length = x.shape[:2]
        positions = self._positions(jnp.arange(length) if positions is None else positions, batch, length)
        if mask is None:
            mask = causal_mask(length)
        elif jnp.ndim(mask) == 2:
            if jnp.shape(mask) != (batch, length):
                raise ValueError(f"Transformer: a 2-D padding mask must be [B, L] = [{batch}, {length}], "
                                 f"got {jnp.shape(mask)}")
            mask = causal_mask(length, mask)
        bias = mask_to_bias(mask, batch, self.config.num_heads, length, length)
        hidden, _ = self._trunk(x, positions, bias, None)
        return self._outputs(hidden, only_last, return_hidden)

    def extend(
        self,
        cache: KVCache,
        ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array,
        index: jax.Array | int | None = None,
        valid: jax.Array | None = None,
        mask: jax.Array | None = None,
        only_last: bool = False,
        return_hidden: bool = False,
    ):
        """Runs L new tokens against a :class:`KVCache`: prefill (L = prompt), decode (L = 1) or block recompute.

        Args:
          cache: the cache; ``cache.max_len`` = S slots.
          ids / inputs_embeds: the L new tokens, [B, L] or [B, L, D].
          positions: their RoPE positions [B, L] (int).
          index: first slot to write (scalar, the same for every row); default ``cache.length`` (append).
            Slots index..index+L-1 are overwritten, so an ``index`` below ``cache.length`` re-computes a
            block in place (the t2i refinement passes). The caller keeps index + L <= S (a traced index is
            clamped by ``dynamic_update_slice``).
          valid: [B, L] bool, False for padding tokens (their slots get position -1 and are never attended by
            the default mask). Default: all valid.
          mask: None = attend every slot with 0 <= slot position <= the query's position (causal over
            positions, padding and empty slots excluded); or an explicit boolean / additive mask over the
            first Lk <= S cache slots, [B, L, Lk] or [B, 1|H, L, Lk] (e.g. block-causal across t2i scales);
            slots from Lk on are not read at all (index + L <= Lk is the caller's to keep).
          only_last, return_hidden: as in ``__call__``.
        Returns:
          (logits [B, L, V] float32 (or [B, 1, V]; with ``return_hidden`` (logits, hidden)), updated cache with
          ``length = max(length, index + L)``).
        """
        cfg = self.config
        x = self._inputs(ids, inputs_embeds)
        batch, length = x.shape[:2]
        slots = cache.max_len
        if cache.k.shape != (cfg.depth, batch, slots, cfg.num_kv_heads, cfg.head_dim):
            raise ValueError(
                f"Transformer.extend: cache.k has shape {cache.k.shape}, expected "
                f"[depth, B, S, kv_heads, head_dim] = {(cfg.depth, batch, slots, cfg.num_kv_heads, cfg.head_dim)}"
            )
        if length > slots:
            raise ValueError(f"Transformer.extend: {length} new tokens do not fit a cache of {slots} slots")
        if index is None:
            index = cache.length
        if isinstance(index, (int, np.integer)) and not 0 <= index <= slots - length:
            raise ValueError(f"Transformer.extend: index {index} + {length} tokens exceeds the {slots} cache slots")
        index = jnp.asarray(index, jnp.int32)
        positions = self._positions(positions, batch, length)
        slot_positions = positions if valid is None else jnp.where(jnp.asarray(valid, bool), positions, -1)
        cache_positions = jax.lax.dynamic_update_slice(cache.positions, slot_positions, (jnp.int32(0), index))
        if mask is None:
            mask = (cache_positions[:, None, :] >= 0) & (cache_positions[:, None, :] <= positions[:, :, None])
        key_length = jnp.shape(mask)[-1]
        if key_length > slots:
            raise ValueError(f"Transformer.extend: mask covers {key_length} key slots, the cache has {slots}")
        bias = mask_to_bias(mask, batch, cfg.num_heads, length, key_length)
        layer0 = jnp.zeros((), jnp.int32)
        hidden, (k_all, v_all, _, _) = self._trunk(x, positions, bias, (cache.k, cache.v, layer0, index))
        new_cache = KVCache(
            k=k_all, v=v_all, positions=cache_positions, length=jnp.maximum(cache.length, index + length)
        )
        return self._outputs(hidden, only_last, return_hidden), new_cache


def abstract_variables(config: TransformerConfig) -> Any:
    """Boxed ``jax.ShapeDtypeStruct`` tree ``{'params': ...}`` of ``Transformer(config)`` (nothing allocated).

    Feed it to ``tokenflow_jax.parallel.shardings_from_abstract`` for parameter shardings.
    """
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(Transformer(config).init, jax.random.key(0), ids)


def param_count(params: Any) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))
