"""Loading a TokenFlow tokenizer for inference: model, variables and a jitted encode/decode.

Shared by ``reconstruct``, evaluation and the downstream recipes that run a frozen tokenizer.
"""
from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenflow_jax import checkpoint, prng
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import images as image_io
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import tokenizer

logger = logging.getLogger(__name__)


def tokenizer_config(config) -> Any:
    """The image tokenizer's config: ``config.tokenizer.config`` (FILE:ARG) plus ``config.tokenizer.overrides``,
    or, when that is empty, the one recorded in ``config.tokenizer.checkpoint`` (the t2i and VLM configs'
    ``tokenizer`` section)."""
    spec = config.tokenizer.get("config", "")
    overrides = list(config.tokenizer.get("overrides", []))
    if not spec and config.tokenizer.get("checkpoint"):
        meta = checkpoint.read_meta(config.tokenizer.checkpoint)
        spec = meta.get("config_spec", "")
        overrides = list(meta.get("config_overrides", [])) + overrides
    if not spec:
        raise ConfigError("config.tokenizer.config is empty and config.tokenizer.checkpoint records no config: "
                          "set --config.tokenizer.config=configs/tokenizer.py:VARIANT")
    return config_lib.build_config(spec, overrides)


def abstract_tokenizer_variables(model: tokenizer.TokenFlow, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of ``model``'s variables placed as :func:`load_tokenizer` places them on ``mesh``: the
    frozen tokenizer input of an ahead-of-time compile (nothing is read or allocated)."""
    return checkpoint.model_target(model, tokenizer.init_args(model), mesh)


def load_tokenizer(
    config, checkpoint_dir: str | None = None, mesh: Mesh | None = None, seed: int = 0
) -> tuple[tokenizer.TokenFlow, Any]:
    """Builds the tokenizer of ``config`` and its variables.

    With ``checkpoint_dir`` the variables are restored (mismatches are reported key by key before
    anything is compiled); otherwise they are randomly initialised and a warning says so. With a
    ``mesh`` the variables are sharded by the project's logical-axis rules, else they live on one device.
    """
    model = tokenizer.build(config)
    target = checkpoint.model_target(model, tokenizer.init_args(model), mesh)
    if checkpoint_dir:
        variables = checkpoint.restore_variables(checkpoint_dir, target)
        logger.info("restored tokenizer variables from %s", checkpoint_dir)
        return model, variables
    logger.warning(
        "no tokenizer checkpoint given: using randomly initialised weights (seed %d); outputs are not "
        "meaningful reconstructions", seed,
    )
    (image,) = tokenizer.init_args(model)
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros(image.shape, image.dtype))),
                   out_shardings=jax.tree.map(lambda t: t.sharding, target))
    return model, init(prng.make_key(seed))


def encode_decode_fn(model: tokenizer.TokenFlow):
    """jitted (variables, images [B, H, W, 3]) -> (image [B, H, W, 3], indices [B, L]) in eval mode."""

    def run(variables, images):
        out = model.apply(variables, images)
        return out.image, out.indices

    return jax.jit(run)


def encode_indices_fn(model: tokenizer.TokenFlow):
    """jitted (variables, images [B, H, W, 3] in [-1, 1]) -> token indices [B, N] int32 (eval mode)."""
    return jax.jit(lambda variables, images: model.apply(variables, images, method=tokenizer.TokenFlow.encode).indices)


def decode_indices_fn(model: tokenizer.TokenFlow):
    """jitted (variables, indices [B, N]) -> uint8 images [B, H, W, 3] (the reference's clamp(127.5 y + 128))."""

    def run(variables, indices):
        _, image = model.apply(variables, indices, method=tokenizer.TokenFlow.decode_code)
        return image_io.uint8_levels(image, jnp).astype(jnp.uint8)

    return jax.jit(run)


def codebook_vectors(model: tokenizer.TokenFlow, variables: Any) -> jax.Array:
    """The normalised 40-d code vectors [K, C] (semantic then pixel part) that downstream models read."""
    k = model.config.quantizer.codebook_size
    return jax.jit(lambda v: model.apply(v, jnp.arange(k), method=lambda m, i: m.quantizer.lookup(i)))(variables)


def load_codebook(config, checkpoint_dir: str | None = None, seed: int = 0) -> np.ndarray:
    """The code vectors [K, C] of the tokenizer of ``config``, reading only the codebooks from a checkpoint.

    Without ``checkpoint_dir``: those of the randomly initialised tokenizer :func:`load_tokenizer` builds
    with the same ``seed``.
    """
    model = tokenizer.build(config)
    if not checkpoint_dir:
        return np.asarray(codebook_vectors(model, load_tokenizer(config, None, seed=seed)[1]))
    flat = traverse_util.flatten_dict(checkpoint.model_target(model, tokenizer.init_args(model)), sep="/")
    # Every variable of the quantizer module (codebooks, and its state, which its setup reads): a few MB.
    wanted = {k: v for k, v in flat.items() if k.split("/")[1] == "quantizer"}
    target = traverse_util.unflatten_dict(wanted, sep="/")
    restored, missing = checkpoint.restore_variables_partially(checkpoint_dir, target)
    if missing:
        raise checkpoint.CheckpointMismatchError(
            f"tokenizer checkpoint {checkpoint_dir!r} lacks quantizer entries of the configured shape: {missing} "
            f"(expected K = {model.config.quantizer.codebook_size})")
    return np.asarray(codebook_vectors(model, restored))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
