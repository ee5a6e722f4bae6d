"""tokenflow_jax: the TokenFlow unified image tokenizer (arXiv 2412.03069) and its downstream models
in JAX/Flax, for TPU pods and GPU clusters."""

__version__ = "0.1.0"
