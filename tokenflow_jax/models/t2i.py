"""Next-scale text-to-image model: a Llama-style decoder over [text prefix | image scales] (ByteFlow-AI/TokenFlow
``t2i/llava_t2i/model/llava_arch.py`` and ``t2i/llava_t2i/model/language_model/llava_llama.py``).

Sequence layout, with P = ``text_length`` (text left-padded to P, including BOS and the "<img>" marker)
and N = sum_k s_k^2 image tokens over the n scales::

    position:  0 .. P-2        P-1               P .. P+N-2
    input:     text tokens     last text token   projected running codebook map g_1 .. g_{n-1}
    predicts:  (text, unused)  image token 0     image tokens 1 .. N-1

so position P-1+t predicts image token t, and the sequence has L = P + N - 1 positions (the reference
appends a zero input predicting "</img>" and an EOS; generation never samples them, so they are not
modelled here). RoPE positions are 0..L-1 for every row: left padding keeps its positions, so the image
block starts at the same position in every row.

Image inputs (teacher forcing, the reference's ``VQTower.forward`` in
``t2i/llava_t2i/model/multimodal_encoder/vision_tokenizer.py``): with c_k the normalised 40-d code vectors of
scale k, f_1 = c_1, g_k = bicubic(f_k -> s_{k+1}), f_{k+1} = g_k + c_{k+1}; the inputs predicting scale k+1 are g_k
flattened row-major. Added to the inputs: ``level_embed[0]`` on text positions (including P-1, which predicts
the 1x1 scale) and ``level_embed[i + 1]`` on inputs predicting a token of scale i >= 1; ``pos_embed[t]`` at
position P-1+t, t = 0..N-1.

Attention (the reference's ``prepare_inputs_labels_for_multimodal_generation`` in
``t2i/llava_t2i/model/llava_arch.py``): causal, padding keys masked, and block-causal over positions
P-1..P+N-2: a query predicting scale a sees a key predicting scale b iff b <= a (bidirectional inside a scale).

Image-code head (``head``): ``'separate'``, a K-way linear head on the final hidden states; or
``'extended'``, the reference's vocabulary extended with K ``<vq_token_i>`` rows starting at
``image_token_start``: image logits are that slice of the LM head (equal to masking every other id to -inf
before a softmax), while the training loss normalises over the whole vocabulary, as the reference does.
The extended vocabulary is laid out as the released model's: the T text ids, then ``[PAD]`` (id T), then the
K codes (ids T+1 .. T+K), so V = T + 1 + K and ``image_token_start`` = V - K (Llama-2: [PAD] = 32000,
``<vq_token_0>`` = 32001, V = 64,769). The official training script adds ``[PAD]`` to the Llama tokenizer before
the code tokens (ByteFlow-AI/TokenFlow ``t2i/llava_t2i/train/train.py``).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.config import to_dataclass
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import transformer
from tokenflow_jax.models.llm_layers import Linear
from tokenflow_jax.models.projector import Projector
from tokenflow_jax.ops import resize
from tokenflow_jax.ops.cross_entropy import softmax_cross_entropy

HEADS = ("separate", "extended")


@dataclasses.dataclass(frozen=True)
class T2IConfig:
    llm: transformer.TransformerConfig
    scales: tuple[int, ...]  # the tokenizer's scale schedule, e.g. (1, 2, 4, ..., 16)
    codebook_size: int  # K
    text_length: int  # P: text prefix length (left-padded)
    code_dim: int = 40  # width of the tokenizer's code vectors (semantic 32 + pixel 8)
    head: str = "separate"  # 'separate' | 'extended'
    image_token_start: int = 0  # 'extended': id of <vq_token_0> in the LLM vocabulary

    def __post_init__(self):
        if self.head not in HEADS:
            raise ConfigError(f"t2i head must be one of {HEADS}, got {self.head!r}")
        if list(self.scales) != sorted(set(self.scales)) or not self.scales or self.scales[0] != 1:
            raise ConfigError(f"t2i scales must be strictly increasing and start at 1, got {self.scales}")
        if self.text_length < 1:
            raise ConfigError(f"t2i text_length must be >= 1 (at least the token predicting the 1x1 scale), "
                              f"got {self.text_length}")
        if self.head == "extended" and not (
            0 <= self.image_token_start and self.image_token_start + self.codebook_size <= self.llm.vocab_size
        ):
            raise ConfigError(
                f"t2i head='extended' needs image_token_start + codebook_size <= llm.vocab_size, got "
                f"{self.image_token_start} + {self.codebook_size} > {self.llm.vocab_size}"
            )
        if self.sequence_length > self.llm.max_positions:
            raise ConfigError(f"t2i sequence length {self.sequence_length} (text_length + tokens - 1) exceeds "
                              f"llm.max_positions {self.llm.max_positions}")

    @property
    def num_tokens(self) -> int:
        """N = sum_k s_k^2."""
        return sum(s * s for s in self.scales)

    @property
    def sequence_length(self) -> int:
        """L = P + N - 1."""
        return self.text_length + self.num_tokens - 1

    @property
    def token_offsets(self) -> tuple[int, ...]:
        """First token index of each scale (n + 1 entries, the last = N)."""
        return tuple(int(x) for x in np.cumsum([0] + [s * s for s in self.scales]))


def t2i_config(config, tokenizer_config, vocab_size: int | None = None) -> T2IConfig:
    """T2IConfig from a ``configs/t2i.py`` ConfigDict and its tokenizer's config (scales, K, code width).

    ``vocab_size`` overrides ``model.llm.vocab_size`` (the tiny config's 0 = the built text tokenizer's).
    """

    llm = dict(config.model.llm)
    if vocab_size is not None:
        llm["vocab_size"] = int(vocab_size)
    if not llm["vocab_size"]:
        raise ConfigError("config.model.llm.vocab_size is 0: pass the text tokenizer's vocabulary size")
    q = tokenizer_config.quantizer
    head = config.model.head
    return to_dataclass(
        T2IConfig,
        dict(scales=tuple(q.scales), codebook_size=q.codebook_size, text_length=config.model.text_length,
             code_dim=q.semantic_dim + q.pixel_dim, head=head,
             image_token_start=llm["vocab_size"] - q.codebook_size if head == "extended" else 0),
        "model",
        llm=to_dataclass(transformer.TransformerConfig, llm, "model.llm"),
    )


def init_args(config: T2IConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    """``NextScaleT2I.init``'s inputs as shapes: text ids and mask [1, P] int32, code vectors [1, N, C]."""
    p, n = config.text_length, config.num_tokens
    return (jax.ShapeDtypeStruct((1, p), jnp.int32), jax.ShapeDtypeStruct((1, p), jnp.int32),
            jax.ShapeDtypeStruct((1, n, config.code_dim), jnp.float32))


def token_scale_index(scales: tuple[int, ...]) -> np.ndarray:
    """[N] int32: the scale (0-based) of each image token."""
    return np.concatenate([np.full(s * s, i, np.int32) for i, s in enumerate(scales)])


def level_ids(config: T2IConfig) -> np.ndarray:
    """[L] int32 rows of ``level_embed`` per position: 0 on text, scale index + 1 on image inputs."""
    image = token_scale_index(config.scales)[1:] + 1  # inputs at P..P+N-2 predict tokens 1..N-1
    return np.concatenate([np.zeros(config.text_length, np.int32), image])


def block_causal_mask(config: T2IConfig, text_mask: jax.Array, length: int | None = None) -> jax.Array:
    """Boolean attention mask [B, Lq, Lk] over the first ``length`` positions (default L).

    text_mask: [B, P] (1 = token, 0 = left padding).
    """
    p = config.text_length
    length = config.sequence_length if length is None else length
    allowed = np.tril(np.ones((length, length), bool))
    scale_of = token_scale_index(config.scales)[: length - p + 1]  # positions P-1 .. length-1
    allowed[p - 1 :, p - 1 :] = scale_of[None, :] <= scale_of[:, None]
    keys = jnp.concatenate(
        [jnp.asarray(text_mask, bool), jnp.ones((text_mask.shape[0], length - p), bool)], axis=1
    )
    return jnp.asarray(allowed)[None] & keys[:, None, :]


def running_map_inputs(codes: jax.Array, scales: tuple[int, ...]) -> jax.Array:
    """Teacher-forcing inputs g_1..g_{n-1} from per-token code vectors.

    codes: [B, N, C] code vectors of all N tokens (scale by scale, row-major inside a scale).
    Returns [B, N - 1, C]: for each scale k+1 >= 1 the running map of scales <= k, bicubic-resized to s_{k+1}.
    """
    b, _, c = codes.shape
    offsets = np.cumsum([0] + [s * s for s in scales])
    f = codes[:, :1].reshape(b, 1, 1, c)
    outputs = []
    for k in range(1, len(scales)):
        s = scales[k]
        g = resize.bicubic_resize(f, (s, s))
        outputs.append(g.reshape(b, s * s, c))
        f = g + codes[:, offsets[k] : offsets[k + 1]].reshape(b, s, s, c)
    if not outputs:
        return jnp.zeros((b, 0, c), codes.dtype)
    return jnp.concatenate(outputs, axis=1)


def trunc_normal_var_init(width: int) -> nn.initializers.Initializer:
    """VAR's level/position init: trunc_normal_(std=sqrt(1 / D / 3)); the +-2 absolute cut never binds."""
    return nn.initializers.normal(float(np.sqrt(1.0 / width / 3.0)))


class NextScaleT2I(nn.Module):
    """The decoder plus the next-scale wrapper. Entry points via ``apply(..., method=...)``:

    * ``__call__(text_ids, text_mask, codes)`` -> image-code logits [B, N, K] (teacher forcing); and, for
      ``head='extended'``, ``full_logits`` for the reference's full-vocabulary loss.
    * ``prefix_embeds`` / ``image_embeds`` / ``code_logits``: the pieces the samplers assemble.
    """

    config: T2IConfig

    def setup(self):
        cfg = self.config
        llm = cfg.llm
        self.llm = transformer.Transformer(llm)
        self.projector = Projector(llm.width, dtype=llm.compute_dtype, param_dtype=llm.weight_dtype)
        init = trunc_normal_var_init(llm.width)
        self.level_embed = self.param(
            "level_embed", nn.with_logical_partitioning(init, (None, "embed")), (len(cfg.scales) + 1, llm.width),
            llm.weight_dtype,
        )
        self.pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(init, (None, "embed")), (cfg.num_tokens, llm.width),
            llm.weight_dtype,
        )
        if cfg.head == "separate":
            self.code_head = Linear(
                (cfg.codebook_size,), ("embed", "vocab"), dtype=llm.compute_dtype, param_dtype=llm.weight_dtype
            )

    # -- pieces ----------------------------------------------------------------------------------------

    def prefix_embeds(self, text_ids: jax.Array) -> jax.Array:
        """Text ids [B, P] -> input embeddings [B, P, D] with level 0 and, on the last token, pos_embed[0]."""
        x = self.llm.embed(text_ids)
        x = x + self.level_embed[0].astype(x.dtype)
        return x.at[:, -1].add(self.pos_embed[0].astype(x.dtype))

    def image_embeds(self, inputs: jax.Array, first_token: int) -> jax.Array:
        """Running-map inputs [B, T, C] predicting tokens first_token..first_token+T-1 (>= 1) -> [B, T, D]."""
        cfg = self.config
        t = inputs.shape[1]
        x = self.projector(inputs.astype(cfg.llm.compute_dtype))
        level = token_scale_index(cfg.scales)[first_token : first_token + t] + 1
        x = x + jnp.take(self.level_embed, jnp.asarray(level), axis=0).astype(x.dtype)
        return x + self.pos_embed[first_token : first_token + t].astype(x.dtype)

    def code_logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] -> float32 image-code logits [B, T, K]."""
        cfg = self.config
        if cfg.head == "separate":
            return self.code_head(hidden).astype(jnp.float32)
        # Only the K code rows of the head: the sampler's head matmul would otherwise be V / K times larger
        # (64,769 / 32,768 for the released layout) and then cut.
        return self.llm.unembed(hidden, ids=(cfg.image_token_start, cfg.codebook_size))

    def full_logits(self, hidden: jax.Array) -> jax.Array:
        """'extended' head: the whole LM vocabulary [B, T, V] (float32)."""
        return self.llm.unembed(hidden)

    def embed_sequence(self, text_ids: jax.Array, codes: jax.Array) -> jax.Array:
        """Text ids [B, P] and code vectors [B, N, C] of all tokens -> input embeddings [B, L, D]."""
        inputs = running_map_inputs(codes, self.config.scales)
        return jnp.concatenate([self.prefix_embeds(text_ids), self.image_embeds(inputs, 1)], axis=1)

    def hidden_states(self, embeds: jax.Array, mask: jax.Array) -> jax.Array:
        """Input embeddings [B, T, D] at positions 0..T-1 with a boolean mask [B, T, T] -> hidden [B, T, D]."""
        _, hidden = self.llm(inputs_embeds=embeds, mask=mask, only_last=True, return_hidden=True)
        return hidden

    # -- teacher forcing -------------------------------------------------------------------------------

    def __call__(self, text_ids: jax.Array, text_mask: jax.Array, codes: jax.Array, *, full: bool = False):
        """Teacher-forced logits of every image token.

        Args:
          text_ids: [B, P] int, left-padded; text_mask: [B, P] (1 = token).
          codes: [B, N, C] normalised code vectors of the target tokens (``codebook[indices]``).
          full: with ``head='extended'``, return full-vocabulary logits [B, N, V] instead of [B, N, K].
        Returns:
          float32 logits [B, N, K] (or [B, N, V]); position t predicts image token t.
        """
        cfg = self.config
        embeds = self.embed_sequence(text_ids, codes)
        hidden = self.hidden_states(embeds, block_causal_mask(cfg, text_mask))
        hidden = hidden[:, cfg.text_length - 1 :]
        return self.full_logits(hidden) if full else self.code_logits(hidden)

    def extend(self, cache: transformer.KVCache, embeds: jax.Array, index: int, mask: jax.Array):
        """Cached run of a block: embeds [B, T, D] at positions/slots index..index+T-1, boolean mask over cache
        slots [B, T, S] -> (hidden [B, T, D], cache)."""
        positions = jnp.arange(index, index + embeds.shape[1])[None]
        (_, hidden), cache = self.llm.extend(
            cache, inputs_embeds=embeds, positions=positions, index=index, mask=mask, only_last=True,
            return_hidden=True,
        )
        return hidden, cache


def image_nll(logits: jax.Array, indices: jax.Array, offset: int = 0) -> jax.Array:
    """Per-token cross-entropy [B, N] (float32).

    logits [B, N, K] with indices [B, N] in [0, K); or full-vocabulary logits [B, N, V] with
    ``offset`` = ``image_token_start`` (the target id of code i is offset + i).
    """
    return softmax_cross_entropy(logits, indices + offset)


def image_loss(logits: jax.Array, indices: jax.Array, offset: int = 0) -> jax.Array:
    """Mean cross-entropy over all image tokens (see :func:`image_nll`)."""
    return jnp.mean(image_nll(logits, indices, offset))
