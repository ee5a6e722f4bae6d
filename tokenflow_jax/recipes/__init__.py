"""One folder per recipe: what it trains, evaluates and serves.

  tokenizer/  train, losses, teacher, frozen (a trained tokenizer loaded for the other recipes), reconstruct,
              evaluate, tokenize (datasets into image-token shards)
  t2i/        setup, tokens (the shard stream), train, sample (batch generation), evaluate (ShapesEval)
  vlm/        setup, train, answer (chat and batched answers), evaluate (VQA accuracy)
  unified/    setup, train: one decoder for both t2i and VLM (built on those two recipes)

The tokenizer, t2i and VLM recipes reach each other only through ``recipes.tokenizer.frozen``; ``unified``
builds on t2i and VLM, and nothing imports it. Each ``train`` module exposes
``train(config, workdir)`` and ``aot_programs(config, mesh, rules)`` (for ``tokenflow-jax compile``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tokenflow_jax.errors import ConfigError

RECIPES = ("tokenizer", "t2i", "vlm", "unified")


def trainer(config) -> ModuleType:
    """The trainer module of ``config.recipe``; a clear error for a config that names none."""
    recipe = config.get("recipe", "")
    if recipe not in RECIPES:
        raise ConfigError(f"config.recipe {recipe!r} has no trainer; known recipes: {sorted(RECIPES)}")
    # Imported on demand: each trainer pulls in its own heavy dependencies (the VGG teacher, transformers).
    return importlib.import_module(f"tokenflow_jax.recipes.{recipe}.train")
