"""``tokenflow-jax convert``: weights from elsewhere -> an orbax checkpoint every entry point loads.

* ``--from official``: a released TokenFlow ``.pt`` (or a safetensors export) -> full variables.
* ``--from hf``: an HF CLIP / SigLIP vision tower -> the semantic encoder; every other part of the
  tokenizer is freshly initialised (the starting point of tokenizer training, paper Table 5 "CLIP Init.").
* ``--from official-t2i``: the released text-to-image folder (ByteFlow-AI/TokenFlow-t2i) -> a t2i checkpoint.
* ``--from official-vlm``: a released understanding folder (LLaVA-Qwen2.5 / LLaVA-Llama) -> a VLM checkpoint.

``export`` writes each back in its official layout (``to_official``, ``to_official_t2i``, ``to_official_vlm``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

from tokenflow_jax import checkpoint
from tokenflow_jax.convert import llava, official, official_t2i, official_vlm, semantic_tower
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i, vlm
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.train import loop

logger = logging.getLogger(__name__)


def _meta(config, source: str) -> dict[str, Any]:
    return {
        "recipe": "tokenizer",
        "config_spec": config.get("config_spec", ""),
        "config_overrides": list(config.get("config_overrides", [])),
        "source": source,
    }


def _summary(variables: Any) -> str:
    leaves = jax.tree.leaves(variables)
    return f"{len(leaves)} arrays, {sum(int(np.prod(np.shape(x))) for x in leaves) / 1e6:.2f}M values"


def from_hf(config, id_or_path: str, out_dir: str) -> int:
    # The tower first: a hub id that cannot be fetched or a tower of the wrong shape fails before the whole
    # tokenizer is built and initialised (~15 s and ~1 GB for the ViT-B/16 config on a CPU).
    tower = semantic_tower.semantic_encoder_params(config, id_or_path)
    variables = semantic_tower.with_semantic_encoder(semantic_tower.init_variables(config, config.get("seed", 0)),
                                                     tower)
    path = checkpoint.save_variables(out_dir, variables, _meta(config, f"hf:{id_or_path}"))
    print(f"wrote {path}: semantic encoder from {id_or_path}, other parts freshly initialised ({_summary(variables)})")
    return 0


def from_official(config, checkpoint_file: str, out_dir: str) -> int:

    state = official.load_official_state_dict(checkpoint_file)
    variables = official.official_to_variables(state, config)
    path = checkpoint.save_variables(out_dir, variables, _meta(config, f"official:{checkpoint_file}"))
    print(f"wrote {path} from {checkpoint_file} ({_summary(variables)})")
    return 0


def to_official(config, checkpoint_dir: str, out_file: str) -> int:
    """Exports a checkpoint's variables to the official key layout (.pt or .safetensors)."""

    _, variables = frozen_tokenizer.load_tokenizer(config, checkpoint_dir)
    state = official.variables_to_official(jax.device_get(variables), config)
    official.save_official(state, out_file)
    print(f"wrote {out_file}: {len(state)} tensors in the official TokenFlow layout")
    return 0


# ----------------------------------------------------------------------------------------------------------
# The released text-to-image and understanding models (LLaVA folders)


def _with_folder_tokenizer(config, model_dir: str) -> list[str]:
    """The run's overrides; when the released folder carries its text tokenizer and ``--config.text.tokenizer``
    was not given, the folder becomes ``text.tokenizer`` (recorded, so every later command uses it)."""
    overrides = list(config.get("config_overrides", []))
    given = any(o.removeprefix("--").removeprefix("config.").startswith("text.tokenizer=") for o in overrides)
    if not given and llava.has_tokenizer(model_dir):
        folder = os.path.abspath(model_dir)
        config.text.tokenizer = folder
        overrides.append(f"text.tokenizer={folder}")
        logger.info("text tokenizer: the files in %s", folder)
    return overrides


def _recipe_meta(config, recipe: str, overrides: list[str], source: str) -> dict[str, Any]:
    return {"recipe": recipe, "config_spec": config.get("config_spec", ""), "config_overrides": overrides,
            "source": source}


def _t2i_model_config(config):
    tok_config = frozen_tokenizer.tokenizer_config(config)
    text_tokenizer, _ = t2i_setup.text_parts(config)
    return t2i_setup.model_config(config, tok_config, text_tokenizer)


def _vlm_model_config(config):
    return vlm_setup.model_config(config, frozen_tokenizer.tokenizer_config(config), vlm_setup.text_tokenizer(config))


def _from_release(config, model_dir: str, out_dir: str, recipe: str) -> int:
    """A released LLaVA folder -> a ``recipe`` ('t2i' or 'vlm') checkpoint: folder read, its tokenizer recorded,
    config.json and every key checked against ``--config`` before any tensor is read, then placed and saved."""
    source, official_module, model_config, use = {
        "t2i": ("official-t2i", official_t2i, _t2i_model_config, "generate"),
        "vlm": ("official-vlm", official_vlm, _vlm_model_config, "chat"),
    }[recipe]
    if config.get("recipe") != recipe:
        raise ConfigError(f"--from {source} needs a {recipe} config (configs/{recipe}.py:VARIANT), got recipe "
                          f"{config.get('recipe')!r}")
    what = f"{source} checkpoint {model_dir}"
    tensors, hf_config, files = llava.read_folder(model_dir)
    overrides = _with_folder_tokenizer(config, model_dir)
    cfg = model_config(config)
    official_module.check_hf_config(hf_config, cfg, what)
    mesh, rules = loop.mesh_and_rules(config)
    params = official_module.to_params(tensors, cfg, mesh=mesh, rules=rules, what=what)
    if recipe == "vlm" and (skipped := official_vlm.vision_tower_keys(tensors)):
        logger.info("%s: skipped the %d tensors of the saved vision tower (the frozen image tokenizer is "
                    "config.tokenizer.checkpoint)", model_dir, len(skipped))
    path = checkpoint.save_variables(out_dir, {"params": params},
                                     _recipe_meta(config, recipe, overrides, f"{source}:{model_dir}"))
    print(f"wrote {path} from {model_dir} ({len(files)} weight file{'s' if len(files) > 1 else ''}; "
          f"{_summary(params)}); {use} with --checkpoint {out_dir}")
    return 0


def from_official_t2i(config, model_dir: str, out_dir: str) -> int:
    """A released t2i folder (``--config configs/t2i.py:7b``) -> a t2i checkpoint that ``generate`` uses."""
    return _from_release(config, model_dir, out_dir, "t2i")


def from_official_vlm(config, model_dir: str, out_dir: str) -> int:
    """A released understanding folder (``--config configs/vlm.py:qwen14b``) -> a VLM checkpoint for ``chat``
    and ``eval-vqa``."""
    return _from_release(config, model_dir, out_dir, "vlm")


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def to_official_t2i(config, checkpoint_dir: str, out_dir: str, dtype: str = "") -> int:
    """A t2i checkpoint -> the released folder layout (config.json, safetensors, the text tokenizer's files)."""

    cfg = _t2i_model_config(config)
    params = checkpoint.restore_model(t2i.NextScaleT2I(cfg), t2i.init_args(cfg), checkpoint_dir,
                                      collections=("params",))["params"]  # on one device
    state = official_t2i.to_state_dict(params, cfg, EXPORT_DTYPES[dtype] if dtype else None)
    files = llava.write_folder(out_dir, state, official_t2i.hf_config(cfg), tokenizer_dir=config.text.tokenizer)
    print(f"wrote {out_dir}: {len(state)} tensors in the official TokenFlow-t2i layout ({len(files)} file"
          f"{'s' if len(files) > 1 else ''})")
    return 0


def to_official_vlm(config, checkpoint_dir: str, out_dir: str, dtype: str = "") -> int:
    """A VLM checkpoint -> the released LLaVA folder layout."""

    cfg = _vlm_model_config(config)
    params = checkpoint.restore_model(vlm.VLM(cfg), vlm.init_args(cfg), checkpoint_dir,
                                      collections=("params",))["params"]  # on one device
    state = official_vlm.to_state_dict(params, cfg, EXPORT_DTYPES[dtype] if dtype else None)
    hf = official_vlm.hf_config(cfg, official_vlm.family(cfg), int(config.data.max_length))
    files = llava.write_folder(out_dir, state, hf, tokenizer_dir=config.text.tokenizer)
    print(f"wrote {out_dir}: {len(state)} tensors in the official LLaVA layout ({len(files)} file"
          f"{'s' if len(files) > 1 else ''})")
    return 0
