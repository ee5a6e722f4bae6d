"""PRNG keys for the whole project.

Keys use the ``rbg`` implementation by default: XLA compiles threefry's bit mixing slowly on CPU
(the tiny tokenizer's init took 13 s to compile with threefry, 1.7 s with rbg), and on TPU rbg is
the faster generator too (MaxText uses it). Streams stay deterministic for a given program and seed.
Set ``TOKENFLOW_PRNG_IMPL=threefry2x32`` (or a config's ``prng_impl``) to change it.
"""
from __future__ import annotations

import os

import jax

DEFAULT_IMPL = os.environ.get("TOKENFLOW_PRNG_IMPL", "rbg")


def make_key(seed: int, impl: str | None = None) -> jax.Array:
    """A typed PRNG key for ``seed``."""
    return jax.random.key(seed, impl=impl or DEFAULT_IMPL)
