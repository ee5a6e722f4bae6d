"""The trainers, one module per recipe (``train(config, workdir)``, ``build_step``, ``aot_programs``)."""
from __future__ import annotations

import importlib
from types import ModuleType

# config.recipe -> its trainer module.
TRAINERS = {"tokenizer": "tokenflow_jax.train.tokenizer", "t2i": "tokenflow_jax.train.t2i",
            "vlm": "tokenflow_jax.train.vlm"}


def trainer(config) -> ModuleType:
    """The trainer module of ``config.recipe``; a clear error for a config that names none."""
    recipe = config.get("recipe", "")
    if recipe not in TRAINERS:
        raise ValueError(f"config.recipe {recipe!r} has no trainer; known recipes: {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[recipe])
