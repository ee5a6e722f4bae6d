"""An HF CLIP / SigLIP vision tower as the tokenizer's semantic encoder (training starts from it: the "CLIP
Init." ablation of paper Table 5; ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``, ``TokenFlow``).

    variables = with_semantic_encoder(init_variables(config), semantic_encoder_params(config, "openai/clip..."))
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax import prng
from tokenflow_jax.convert import hf, sources
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import tokenizer

logger = logging.getLogger(__name__)


def _summary(variables: Any) -> str:
    leaves = jax.tree.leaves(variables)
    return f"{len(leaves)} arrays, {sum(int(np.prod(np.shape(x))) for x in leaves) / 1e6:.2f}M values"


def init_variables(config, seed: int = 0) -> Any:
    """Freshly initialised tokenizer variables (numpy-free jitted init on the default device)."""
    model = tokenizer.build(config)
    size = config.model.image_size
    return jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, size, size, 3), jnp.float32))))(
        prng.make_key(seed)
    )


def semantic_encoder_params(config, id_or_path: str) -> dict[str, Any]:
    """The semantic encoder's params from an HF CLIP/SigLIP tower, checked against the config."""
    vit_config = tokenizer.tokenflow_config(config).semantic_encoder
    state, hf_config = sources.load_hf_model(id_or_path)
    theirs = hf.vit_config_from_hf(hf_config, vit_config.flavour, depth=vit_config.depth)
    differences = [
        f"{f.name}: model {getattr(vit_config, f.name)}, {id_or_path} {getattr(theirs, f.name)}"
        for f in dataclasses.fields(vit_config)
        if f.name != "remat" and getattr(vit_config, f.name) != getattr(theirs, f.name)
    ]
    if differences:
        raise hf.ConversionError(
            f"{id_or_path!r} does not fit config.model.semantic_encoder: " + "; ".join(differences)
        )
    if vit_config.flavour == "clip":
        params = hf.clip_vision_params(state, config=vit_config)
    elif vit_config.flavour == "siglip":
        params = hf.siglip_vision_params(state, depth=vit_config.depth, config=vit_config)
    else:
        raise ConfigError(f"semantic encoder flavour {vit_config.flavour!r} has no HF source "
                          "(config.model.semantic_encoder.flavour: clip or siglip)")
    logger.info("semantic encoder from %s: %s", id_or_path, _summary(params))
    return params


def with_semantic_encoder(variables: Any, params: dict[str, Any]) -> Any:
    """``variables`` with the semantic encoder replaced (dtype and structure kept)."""
    current = variables["params"]["semantic_encoder"]
    hf.check_tree_matches(params, current)
    new = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), params, current)
    return {**variables, "params": {**variables["params"], "semantic_encoder": new}}
