"""Building full-size TokenFlow variants with random weights for the benchmarks.

``jax.jit(model.init)`` of the full models costs a long XLA compile on CPU; the weights do not matter for
speed, so the variables are shaped with ``jax.eval_shape(model.init, ...)`` and filled from numpy:
normal(0, 0.02) for kernels, embeddings and codebooks, ones for norm scales, zeros for biases and
integer state. (Magnitudes only need to stay finite and away from denormals.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import REPO
from tokenflow_jax import config as config_common
from tokenflow_jax import prng
from tokenflow_jax.models import tokenizer

VARIANTS = {
    # name: (config spec, official-issue label)
    "b256e": ("configs/tokenizer.py:b,res=256,enhanced", "b enhanced @256"),
    "xl": ("configs/tokenizer.py:xl", "xl @384"),
}


@dataclasses.dataclass
class Built:
    """A variant's module, config and random variables."""

    name: str
    model: tokenizer.TokenFlow
    config: Any
    variables: Any
    image_size: int
    grid: int
    code_dim: int
    param_count: int


def random_variables(model: nn.Module, x: jax.Array, seed: int = 0) -> Any:
    """Variables shaped like ``model.init(key, x)``, filled from numpy (see module docstring)."""
    shapes = nn.unbox(jax.eval_shape(model.init, prng.make_key(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray((rng.standard_normal(leaf.shape, dtype=np.float32) * 0.02).astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def build_variant(name: str, seed: int = 0) -> Built:
    """The variant's TokenFlow with random float32 variables."""
    spec, _ = VARIANTS[name]
    path, _, arg = spec.partition(":")
    config = config_common.load_config(f"{os.path.join(REPO, path)}:{arg}")
    model = tokenizer.build(config)
    size = config.model.image_size
    variables = random_variables(model, jnp.zeros((1, size, size, 3), jnp.float32), seed)
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    cfg = model.config
    return Built(name, model, config, variables, size, cfg.grid, cfg.quantizer.code_dim, params)


def images(batch: int, size: int, seed: int = 0) -> jax.Array:
    """Uniform [-1, 1] images [batch, size, size, 3]."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))


def features(batch: int, grid: int, code_dim: int, seed: int = 0) -> jax.Array:
    """A random quantised map F [batch, grid, grid, code_dim] for decode (its cost is data-independent)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal((batch, grid, grid, code_dim)) * 0.3).astype(np.float32))


def encode_fn(built: Built):
    """(variables, x) -> (F, aux, indices), eval mode; un-jitted (callers jit or count FLOPs)."""
    return lambda v, x: built.model.apply(v, x, method="encode")


def decode_fn(built: Built):
    """(variables, F) -> (semantic, image); un-jitted."""
    return lambda v, f: built.model.apply(v, f, method="decode")
