"""Shared-mapping multi-scale residual quantizer (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``:
``VectorQuantizer`` and the scale loop of ``TokenFlow.encode``).

Two codebooks of the same size K share one index space: the semantic codebook [K, 32] and the
pixel codebook [K, 8]. A 40-channel token is split into its semantic and pixel halves, each half
and each codebook row is L2-normalised, and ONE index is chosen per token:

    index = argmin_k  d_sem(k) + w_dis * d_pix(k)

That index fetches both normalised entries (the 40-d quantised vector). ``mapping`` chooses the index rule, for
the ablation of the shared mapping (the reference has only the first):

  * ``shared``: the rule above (the reference; bit-identical whatever the other options);
  * ``separate``: two independent argmins, ``argmin_k d_sem(k)`` and ``argmin_k d_pix(k)``, each fetching its own
    codebook's entry. ``indices`` (the downstream token) is then the PIXEL index: it is what the t2i model
    generates and the pixel decoder reads back into an image, and an image needs nothing of the semantic half.
    The semantic index, the understanding token, comes in ``aux['semantic_indices']``: the VLM's features
    (``final``: the accumulated map F, whose semantic half these indices fetched; ``all_scales``:
    :meth:`MultiScaleQuantizer.lookup` of both index sets) see it. Decoding pixel indices alone leaves the
    semantic half of F at zero (the image is exact, the semantic decoder's output is not meaningful);
  * ``pixel_only``: ``argmin_k d_pix(k)`` alone (the ``w_dis -> infinity`` limit: a plain pixel VQ whose index
    still fetches both entries).

Multi-scale residual
quantisation runs this at every scale of the schedule on an area-downsampled residual, upsamples
each scale's result bicubically to the final grid and accumulates it; the residual loses the
(stop-gradient) upsampled vector. Every scale has its own straight-through estimator and loss terms,
averaged over the scales used; in training one scale (never the first) is dropped with probability
``scale_drop_prob``.

Memory in K. What grows with the codebook size K is one buffer of each kind, whatever the number of scales: the
codebooks normalised once per call (the search and lookups read them), one gradient per codebook, the EMA
statistics, the dead-code restart candidates, a few [K] vectors. The residual loop reads the normalised codebooks
without gradient (its straight-through outputs carry none to the codebook); the codebook loss's gradient flows
through ONE gather of every scale's codes after the loop (one scatter-add per codebook, not a [K, D] gradient and
normalisation backward per scale); the EMA counts and sums are one scatter-add over every scale's tokens; the usage
metrics (perplexity, codes used) come from the sorted indices, not from [K] histograms per scale.

Codebook learning is either by the codebook loss (the reference) or by exponential moving averages
(``codebook_update='ema'``): decayed assignment counts with Laplace smoothing, decayed sums of the
assigned (normalised) encoder outputs, and restarts of dead codes from the step's encoder outputs.
Under a mesh the statistics are global sums over every data-parallel device, because the train
step works on global arrays.

State (collection ``'quantizer'``, updated only in training when the collection is mutable):
  code_age [K] int32          steps since each code was last chosen (usage over a window);
  ema_count [K], ema_sum_semantic [K, 32], ema_sum_pixel [K, 8], codebook_semantic, codebook_pixel
                              (EMA mode only; the codebooks then live here instead of in params).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.errors import ConfigError
from tokenflow_jax.ops import nearest_code, resize

NEVER_USED = 2**30
MAPPINGS = ("shared", "separate", "pixel_only")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    codebook_size: int = 32768
    semantic_dim: int = 32
    pixel_dim: int = 8
    scales: tuple[int, ...] = (1, 2, 4, 6, 8, 10, 12, 14, 16)
    w_dis: float = 1.0  # weight of the pixel distance in the shared mapping
    beta: float = 0.25  # commitment weight (training script and paper; ModelArgs' 1.0 is unused)
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    scale_drop_prob: float = 0.1
    codebook_update: str = "loss"  # 'loss' (reference) | 'ema'
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 1.0  # EMA count under which a code is restarted (EMA mode)
    usage_window: int = 100  # steps; a code counts as used if chosen within the window
    search_memory_bytes: int = nearest_code.DEFAULT_MEMORY_BYTES
    codebook_axis: str | None = None  # mesh axis to shard the codebook over in the search
    mapping: str = "shared"  # 'shared' (reference) | 'separate' | 'pixel_only': how a token's index is chosen

    def __post_init__(self):
        if self.codebook_update not in ("loss", "ema"):
            raise ConfigError(f"quantizer.codebook_update must be 'loss' or 'ema', got {self.codebook_update!r}")
        if self.mapping not in MAPPINGS:
            raise ConfigError(f"quantizer.mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        if self.mapping == "separate" and self.codebook_update == "ema":
            # The EMA statistics count one index per token; two independent ones would need two sets of counts.
            raise ConfigError("quantizer.mapping='separate' needs quantizer.codebook_update='loss' (the EMA update "
                              "keeps one count per code, for one index per token)")
        if self.mapping != "shared" and self.entropy_weight > 0:
            raise ConfigError(f"quantizer.entropy_weight > 0 is defined on the shared mapping's distances; "
                              f"set it to 0 with quantizer.mapping={self.mapping!r}")
        if list(self.scales) != sorted(set(self.scales)) or not self.scales or self.scales[0] < 1:
            raise ConfigError(f"quantizer.scales must be strictly increasing positive ints, got {self.scales}")

    @property
    def code_dim(self) -> int:
        return self.semantic_dim + self.pixel_dim

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def scales_for_length(self, length: int) -> tuple[int, ...]:
        """The leading scales whose token counts sum to ``length`` (a prefix of the schedule)."""
        total, used = 0, []
        for s in self.scales:
            total += s * s
            used.append(s)
            if total == length:
                return tuple(used)
        valid = np.cumsum([s * s for s in self.scales]).tolist()
        raise ValueError(f"{length} indices do not cover a prefix of the scales {self.scales}; valid lengths: {valid}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (torch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def codebook_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """uniform(-1/K, 1/K), then rows L2-normalised (the reference's initialisation)."""
    k = shape[0]
    return l2_normalize(jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k))


def entropy_loss(neg_distance: jax.Array, temperature: float) -> jax.Array:
    """Sample entropy minus batch-mean entropy of softmax(-d / T) (reference ``compute_entropy_loss``)."""
    logits = neg_distance / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    return sample_entropy - avg_entropy


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of a code histogram [K]; K for uniform use, 1 for a single code."""
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def index_statistics(indices: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(number of distinct codes, :func:`perplexity` of their histogram) of the codes ``indices`` [N] int (those
    where ``valid`` [N] bool is set), both float32.

    Counted on the sorted indices, in O(N) memory whatever the codebook size: a [K] histogram per scale would make
    the train step's memory grow with K. No valid code gives (0, 1).
    """
    n = indices.shape[0]
    past_end = jnp.iinfo(jnp.int32).max  # invalid entries sort after every code
    ordered = jnp.sort(jnp.where(valid, indices, past_end) if valid is not None else indices.astype(jnp.int32))
    is_code = ordered != past_end
    starts = is_code & jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    run = jnp.cumsum(starts) - 1  # which distinct code each sorted entry is (-1 before the first: dropped)
    counts = jax.ops.segment_sum(is_code.astype(jnp.float32), run, num_segments=n)  # [N]: one entry per code
    return jnp.sum(starts).astype(jnp.float32), perplexity(counts)


class MultiScaleQuantizer(nn.Module):
    """Shared-mapping multi-scale residual VQ over [B, s, s, 40] maps (semantic channels first)."""

    config: QuantizerConfig

    def setup(self):
        cfg = self.config
        k = cfg.codebook_size
        axes = ("codebook", "code_dim")

        def codebook(name, dim):
            init = nn.with_logical_partitioning(codebook_init, axes)
            if cfg.codebook_update == "loss":
                return self.param(name, init, (k, dim))
            return self.variable("quantizer", name, lambda: init(self.make_rng("params"), (k, dim))).value

        # Attribute names mirror the parameter names (Linen requires it in setup).
        self.codebook_semantic = codebook("codebook_semantic", cfg.semantic_dim)
        self.codebook_pixel = codebook("codebook_pixel", cfg.pixel_dim)
        self.code_age = self.variable(
            "quantizer", "code_age",
            nn.with_logical_partitioning(lambda: jnp.full((k,), NEVER_USED, jnp.int32), ("codebook",)),
        )
        if cfg.codebook_update == "ema":
            # Counts start at 1 and sums at the codebook itself, so a code keeps its direction until
            # it is chosen (zero sums would collapse every unused code to the zero vector).
            self.ema_count = self.variable(
                "quantizer", "ema_count",
                nn.with_logical_partitioning(lambda: jnp.ones((k,), jnp.float32), ("codebook",)),
            )
            self.ema_sum_semantic = self.variable(
                "quantizer", "ema_sum_semantic", nn.with_logical_partitioning(lambda: self.codebook_semantic, axes)
            )
            self.ema_sum_pixel = self.variable(
                "quantizer", "ema_sum_pixel", nn.with_logical_partitioning(lambda: self.codebook_pixel, axes)
            )

    # ----------------------------------------------------------------------------------- codebooks
    def normalized_codebooks(self) -> tuple[jax.Array, jax.Array]:
        """L2-normalised (semantic [K, 32], pixel [K, 8]); stored rows need not be unit norm."""
        return (
            l2_normalize(jnp.asarray(self.codebook_semantic, jnp.float32)),
            l2_normalize(jnp.asarray(self.codebook_pixel, jnp.float32)),
        )

    def lookup(self, indices: jax.Array, semantic_indices: jax.Array | None = None,
               codebooks: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Normalised 40-d entries for integer ``indices`` [...] -> [..., 40].

        ``semantic_indices`` [...] (mapping 'separate') fetch the semantic half; without them that half is the
        entry of ``indices`` itself, or zero under 'separate', whose ``indices`` are pixel indices only.
        ``codebooks``: :meth:`normalized_codebooks` when the caller already holds them.
        """
        sem, pix = codebooks or self.normalized_codebooks()
        if semantic_indices is not None:
            semantic = jnp.take(sem, semantic_indices, axis=0)
        elif self.config.mapping == "separate":
            semantic = jnp.zeros((*indices.shape, sem.shape[1]), sem.dtype)
        else:
            semantic = jnp.take(sem, indices, axis=0)
        return jnp.concatenate([semantic, jnp.take(pix, indices, axis=0)], axis=-1)

    def decode_indices(self, indices: jax.Array, semantic_indices: jax.Array | None = None) -> jax.Array:
        """Indices [B, L] of any prefix of the scales -> the accumulated map F [B, s_n, s_n, 40]
        (``semantic_indices`` [B, L]: see :meth:`lookup`).

        Each scale's entries are bicubic-upsampled to the final grid and summed (the tokenizer's
        decode path; the t2i teacher-forcing path resizes progressively instead, ByteFlow-AI/TokenFlow
        ``t2i/llava_t2i/model/multimodal_encoder/vision_tokenizer.py``, ``VQTower.forward``).
        """
        final = self.config.scales[-1]
        used = self.config.scales_for_length(indices.shape[1])
        total, offset = 0.0, 0
        for s in used:
            semantic = None if semantic_indices is None else semantic_indices[:, offset : offset + s * s]
            q = self.lookup(indices[:, offset : offset + s * s], semantic).reshape(indices.shape[0], s, s, -1)
            total = total + resize.bicubic_resize(q, (final, final))
            offset += s * s
        return total

    # -------------------------------------------------------------------------------------- search
    def search(self, z_sem: jax.Array, z_pix: jax.Array,
               codebooks: tuple[jax.Array, jax.Array] | None = None) -> nearest_code.CodeSearchResult:
        """Nearest shared code for normalised token halves [N, 32], [N, 8] (no gradient); under mapping
        'pixel_only' the nearest pixel code, under 'separate' the nearest pixel code (the semantic one:
        :meth:`search_semantic`). ``codebooks``: :meth:`normalized_codebooks` when the caller holds them."""
        cfg = self.config
        e_sem, e_pix = codebooks or self.normalized_codebooks()
        if cfg.mapping == "shared":
            return self._search(z_sem, z_pix, e_sem, e_pix, cfg.w_dis)
        # One half alone: the other half's width is 0, so its distance is exactly 0 in the shared formula, and the
        # chunked / sharded searches (memory bound, first minimum on ties) serve every mapping.
        return self._search(z_sem[:, :0], z_pix, e_sem[:, :0], e_pix, 1.0)

    def search_semantic(self, z_sem: jax.Array, z_pix: jax.Array,
                        codebooks: tuple[jax.Array, jax.Array] | None = None) -> nearest_code.CodeSearchResult:
        """Nearest semantic code alone (mapping 'separate'): argmin_k d_sem(k)."""
        e_sem, e_pix = codebooks or self.normalized_codebooks()
        return self._search(z_sem, z_pix[:, :0], e_sem, e_pix[:, :0], 1.0)

    def _search(self, z_sem, z_pix, e_sem, e_pix, w_dis: float) -> nearest_code.CodeSearchResult:
        cfg = self.config
        args = [jax.lax.stop_gradient(a) for a in (z_sem, z_pix, e_sem, e_pix)]
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            # Per-device search on the local tokens (and codebook shard), never a replicated one.
            batch_axes = nn.logical_to_mesh_axes(("batch",))[0]
            batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
            codebook_axis = cfg.codebook_axis if cfg.codebook_axis in mesh.axis_names else None
            return nearest_code.nearest_code_sharded(
                *args, w_dis, codebook_axis=codebook_axis, token_axes=batch_axes,
                memory_bytes=cfg.search_memory_bytes,
            )
        return nearest_code.nearest_code_chunked(*args, w_dis, memory_bytes=cfg.search_memory_bytes)

    # ------------------------------------------------------------------------------------- forward
    def quantize_scale(self, r: jax.Array, codebooks: tuple[jax.Array, jax.Array] | None = None) -> dict[str, Any]:
        """Quantises one scale. r [B, s, s, 40] (un-normalised residual) -> dict with ``q`` [B, s, s, 40]
        (straight-through), ``indices`` [B, s*s] (``semantic_indices`` too under mapping 'separate'), ``z`` [N, 40]
        (the normalised input) and ``zq`` [N, 40] (its code entries, without gradient: the codebook loss takes its
        gradient from one lookup of every scale's codes, :meth:`scale_losses`).

        ``codebooks``: :meth:`normalized_codebooks`, computed once for all scales by the caller.
        """
        cfg = self.config
        codebooks = tuple(jax.lax.stop_gradient(c) for c in (codebooks or self.normalized_codebooks()))
        b, s = r.shape[0], r.shape[1]
        z = r.reshape(-1, cfg.code_dim).astype(jnp.float32)
        z_sem = l2_normalize(z[:, : cfg.semantic_dim])
        z_pix = l2_normalize(z[:, cfg.semantic_dim :])
        z = jnp.concatenate([z_sem, z_pix], axis=-1)
        found = self.search(z_sem, z_pix, codebooks)
        semantic = self.search_semantic(z_sem, z_pix, codebooks).indices if cfg.mapping == "separate" else None
        zq = self.lookup(found.indices, semantic, codebooks)
        out = dict(q=(z + jax.lax.stop_gradient(zq - z)).reshape(b, s, s, cfg.code_dim),
                   indices=found.indices.reshape(b, s * s), z=z, zq=zq)
        if semantic is not None:
            out["semantic_indices"] = semantic.reshape(b, s * s)
        return out

    def scale_losses(self, per_scale: list[dict[str, Any]]) -> dict[str, jax.Array]:
        """Per-scale loss terms [n_scales] (``vq_loss``, ``commit_loss``, ``entropy_loss``) of the residual loop's
        outputs (:meth:`quantize_scale` of each scale).

        The codebook loss gathers every scale's codes in ONE lookup of the stored codebooks, each gathered row
        normalised: its backward is one scatter-add per codebook into that codebook's gradient, instead of a [K, D]
        gradient (and a [K, D] normalisation backward) per scale. Same values as each scale's own lookup up to
        float rounding (the rows are normalised after the gather instead of before).
        """
        cfg = self.config
        sizes = [o["z"].shape[0] for o in per_scale]
        bounds = np.cumsum([0, *sizes]).tolist()
        per = lambda values: jnp.stack([values(bounds[k], bounds[k + 1]) for k in range(len(sizes))])  # noqa: E731
        z = jnp.concatenate([o["z"] for o in per_scale])  # [T, 40], T = every scale's tokens
        zq = jnp.concatenate([o["zq"] for o in per_scale])  # no gradient
        commit_sq = jnp.mean((zq - z) ** 2, axis=-1)  # [T]
        out = {"commit_loss": cfg.beta * per(lambda a, b: jnp.mean(commit_sq[a:b]))}
        if cfg.codebook_update == "loss":
            # In EMA mode the codebook is state, not a parameter: the codebook loss has nothing to move.
            pixel = jnp.concatenate([o["indices"].reshape(-1) for o in per_scale])
            semantic = (jnp.concatenate([o["semantic_indices"].reshape(-1) for o in per_scale])
                        if cfg.mapping == "separate" else pixel)
            gathered = jnp.concatenate([
                l2_normalize(jnp.take(jnp.asarray(self.codebook_semantic, jnp.float32), semantic, axis=0)),
                l2_normalize(jnp.take(jnp.asarray(self.codebook_pixel, jnp.float32), pixel, axis=0)),
            ], axis=-1)
            vq_sq = jnp.mean((gathered - jax.lax.stop_gradient(z)) ** 2, axis=-1)
            out["vq_loss"] = per(lambda a, b: jnp.mean(vq_sq[a:b]))
        else:
            out["vq_loss"] = jnp.zeros((len(sizes),))
        if cfg.entropy_weight > 0:
            # Materialises [N, K] per scale: only for small codebooks (the reference default is off).
            e_sem, e_pix = self.normalized_codebooks()
            d_sem = cfg.semantic_dim

            def entropy(a, b):
                d = nearest_code.shared_mapping_distances(z[a:b, :d_sem], z[a:b, d_sem:], e_sem, e_pix, cfg.w_dis)
                return cfg.entropy_weight * entropy_loss(-d, cfg.entropy_temperature)

            out["entropy_loss"] = per(entropy)
        else:
            out["entropy_loss"] = jnp.zeros((len(sizes),))
        return out

    def scale_keep_mask(self, train: bool) -> jax.Array:
        """[n_scales] float: 0 for the randomly dropped scale (training only), else 1."""
        cfg = self.config
        n = len(cfg.scales)
        if not train or cfg.scale_drop_prob <= 0 or n < 2:
            return jnp.ones((n,), jnp.float32)
        if not self.has_rng("quantizer"):
            raise ValueError("training the quantizer needs a 'quantizer' PRNG stream (random scale drop)")
        drop_key, which_key = jax.random.split(self.make_rng("quantizer"))
        dropped = jax.random.randint(which_key, (), 1, n)  # never the first scale; the last can go
        drop = jax.random.uniform(drop_key) < cfg.scale_drop_prob
        return jnp.where(drop & (jnp.arange(n) == dropped), 0.0, 1.0)

    def __call__(self, h: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, Any], jax.Array]:
        """Multi-scale residual quantisation.

        Args:
          h: [B, s_n, s_n, 40] concatenated (semantic, pixel) latents, not normalised.
          train: enables scale drop, loss terms and (if the 'quantizer' collection is mutable)
            usage / EMA state updates.
        Returns:
          F [B, s_n, s_n, 40] the accumulated straight-through quantised map; aux dict of losses and
          metrics (``semantic_indices`` [B, sum s_k^2] under mapping 'separate'); indices [B, sum s_k^2] int32
          (scale by scale, row-major within a scale; the pixel index under 'separate').
        """
        cfg = self.config
        final = cfg.scales[-1]
        if h.shape[1:] != (final, final, cfg.code_dim):
            raise ValueError(f"quantizer input must be [B, {final}, {final}, {cfg.code_dim}], got {h.shape}")
        keep = self.scale_keep_mask(train)
        # Once for every scale, and without gradient: the loop's outputs carry none to the codebooks.
        codebooks = tuple(jax.lax.stop_gradient(c) for c in self.normalized_codebooks())
        residual = h.astype(jnp.float32)
        accumulated = jnp.zeros_like(residual)
        per_scale = []
        for k, s in enumerate(cfg.scales):
            r = resize.area_resize(residual, (s, s))
            out = self.quantize_scale(r, codebooks)
            upsampled = resize.bicubic_resize(out["q"], (final, final)) * keep[k]
            accumulated = accumulated + upsampled
            residual = residual - jax.lax.stop_gradient(upsampled)
            per_scale.append(out)

        indices = jnp.concatenate([o["indices"] for o in per_scale], axis=1)
        # Every scale's tokens in one list (scale by scale, then batch-major), and whether its scale was kept.
        tokens = jnp.concatenate([o["indices"].reshape(-1) for o in per_scale])
        token_kept = jnp.concatenate([jnp.broadcast_to(keep[k] > 0, (o["z"].shape[0],))
                                      for k, o in enumerate(per_scale)])
        usage = [index_statistics(o["indices"].reshape(-1)) for o in per_scale]
        aux: dict[str, Any] = {
            "scale_mask": keep,
            "perplexity": jnp.stack([p for _, p in usage]),
            "scale_usage": jnp.stack([n for n, _ in usage]) / cfg.codebook_size,  # fraction of K chosen per scale
            "batch_usage": index_statistics(tokens, token_kept)[0] / cfg.codebook_size,
        }
        if train:
            used = jnp.sum(keep)
            for name, values in self.scale_losses(per_scale).items():
                aux[name] = jnp.sum(values * keep) / used
            if self.is_mutable_collection("quantizer"):
                self._update_state(per_scale, tokens, token_kept)
        aux["codebook_usage"] = jnp.mean(self.code_age.value < cfg.usage_window)
        if cfg.mapping == "separate":
            aux["semantic_indices"] = jnp.concatenate([o["semantic_indices"] for o in per_scale], axis=1)
        return accumulated, aux, indices

    # ------------------------------------------------------------------------------------- state
    def _update_state(self, per_scale: list[dict[str, Any]], tokens: jax.Array, token_kept: jax.Array) -> None:
        """Usage ages and (EMA mode) the codebooks from this step's codes: ``tokens`` [T] every scale's indices,
        ``token_kept`` [T] whether its scale was kept. One scatter per statistic over all T tokens (global over
        devices under a mesh: the step works on global arrays), so no [K, D] buffer per scale."""
        cfg = self.config
        k = cfg.codebook_size
        # A dropped scale's tokens point past the codebook, where the scatters below drop them.
        chosen = jnp.where(token_kept, tokens, k)
        age = jnp.minimum(self.code_age.value + 1, NEVER_USED).at[chosen].set(0, mode="drop")
        if cfg.mapping == "separate":  # a code is in use when either of its entries is chosen
            semantic = jnp.concatenate([o["semantic_indices"].reshape(-1) for o in per_scale])
            age = age.at[jnp.where(token_kept, semantic, k)].set(0, mode="drop")
        self.code_age.value = age
        if cfg.codebook_update != "ema":
            return
        d_sem = cfg.semantic_dim
        inputs = jax.lax.stop_gradient(jnp.concatenate([o["z"] for o in per_scale], axis=0))  # [T, 40]
        # The step's counts and sums are scattered straight into the decayed statistics (no [K, D] sum of this
        # step's inputs beside them): decay * old + (1 - decay) * sum, up to the rounding of where (1 - decay) applies.
        decay = cfg.ema_decay
        ema_count = (decay * self.ema_count.value).at[chosen].add(1.0 - decay, mode="drop")
        ema_sem = (decay * self.ema_sum_semantic.value).at[chosen].add((1 - decay) * inputs[:, :d_sem], mode="drop")
        ema_pix = (decay * self.ema_sum_pixel.value).at[chosen].add((1 - decay) * inputs[:, d_sem:], mode="drop")
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        total = jnp.sum(ema_count)
        smoothed = (ema_count + cfg.ema_epsilon) / (total + k * cfg.ema_epsilon) * total
        new_sem = ema_sem / smoothed[:, None]
        new_pix = ema_pix / smoothed[:, None]

        # Dead codes restart at encoder outputs of this step, drawn uniformly from all scales.
        dead = ema_count < cfg.dead_code_threshold
        pick = jax.random.randint(self.make_rng("quantizer"), (k,), 0, inputs.shape[0])
        restart_sem = jnp.take(inputs[:, :d_sem], pick, axis=0)
        restart_pix = jnp.take(inputs[:, d_sem:], pick, axis=0)
        restart_count = jnp.maximum(ema_count, cfg.dead_code_threshold)
        new_sem = jnp.where(dead[:, None], restart_sem, new_sem)
        new_pix = jnp.where(dead[:, None], restart_pix, new_pix)
        ema_sem = jnp.where(dead[:, None], restart_sem * restart_count[:, None], ema_sem)
        ema_pix = jnp.where(dead[:, None], restart_pix * restart_count[:, None], ema_pix)
        ema_count = jnp.where(dead, restart_count, ema_count)

        self.ema_count.value = ema_count
        self.ema_sum_semantic.value = ema_sem
        self.ema_sum_pixel.value = ema_pix
        self.put_variable("quantizer", "codebook_semantic", new_sem)
        self.put_variable("quantizer", "codebook_pixel", new_pix)
