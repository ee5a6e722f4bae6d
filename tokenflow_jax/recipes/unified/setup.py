"""What the unified recipe builds before it trains or serves: the two task views of its config, the model config,
and parameters gathered from earlier t2i, VLM or unified runs.

A unified config (configs/unified.py) holds both halves. :func:`t2i_view` and :func:`vlm_view` give each half as
its own recipe's config, so the t2i and VLM recipes' set-up (text prompts, the token-shard stream, conversations,
length buckets, the frozen tokenizer) serves here unchanged.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
from flax import traverse_util

from tokenflow_jax import checkpoint
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import CheckpointError, ConfigError
from tokenflow_jax.models import unified, vlm
from tokenflow_jax.recipes.t2i import setup as t2i_setup

logger = logging.getLogger(__name__)


def _common(config, recipe: str) -> config_lib.ConfigDict:
    view = config_lib.ConfigDict()
    view.recipe = recipe
    view.seed = config.seed
    view.tokenizer = config.tokenizer
    view.mesh = config.mesh
    view.optim = config.optim
    if "config_spec" in config:
        view.config_spec = config.config_spec
    return view


def t2i_view(config) -> config_lib.ConfigDict:
    """The generation half as a ``configs/t2i.py`` config (model, text, data, train, sample)."""
    view = _common(config, "t2i")
    m = config.model
    view.model = config_lib.ConfigDict(dict(llm=m.llm, text_length=m.text_length, head=m.head, init=m.init))
    view.text = config_lib.ConfigDict(dict(tokenizer=config.text.tokenizer, image_marker=config.text.image_marker,
                                           uncond_prompt=config.text.uncond_prompt))
    view.data = config_lib.ConfigDict(dict(config.data.t2i, num_workers=config.data.num_workers))
    tc = config.train
    view.train = config_lib.ConfigDict(dict(
        global_batch_size=tc.t2i_batch_size, cond_drop_rate=tc.cond_drop_rate, num_steps=tc.num_steps,
        log_every=tc.log_every, checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints,
        async_checkpoints=tc.async_checkpoints))
    view.sample = config.sample
    return view


def vlm_view(config) -> config_lib.ConfigDict:
    """The understanding half as a ``configs/vlm.py`` config (model, text, data, train, generate)."""
    view = _common(config, "vlm")
    m = config.model
    view.stage = 0
    view.model = config_lib.ConfigDict(dict(llm=m.llm, features=m.features, init=m.init, init_checkpoint=""))
    view.text = config_lib.ConfigDict(dict(tokenizer=config.text.tokenizer, template=config.text.template))
    view.data = config_lib.ConfigDict(dict(config.data.vlm, num_workers=config.data.num_workers))
    tc = config.train
    view.train = config_lib.ConfigDict(dict(
        global_batch_size=tc.vlm_batch_size, num_steps=tc.num_steps, log_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints,
        async_checkpoints=tc.async_checkpoints, length_buckets=tc.length_buckets, trainable=tc.trainable,
        frozen=tc.frozen))
    view.generate = config.generate
    return view


def model_config(config, tok_config, text_tokenizer=None) -> unified.UnifiedConfig:
    """The UnifiedConfig: the t2i recipe's decoder, vocabulary and scales (``model.llm.vocab_size = 0`` = the text
    tokenizer's ids, + [PAD] and the codes for head='extended'), plus the VLM recipe's feature shape."""
    t2i_cfg = t2i_setup.model_config(t2i_view(config), tok_config, text_tokenizer)
    num_tokens, dim = vlm.feature_shape(tok_config, config.model.features)
    fields = {name: getattr(t2i_cfg, name) for name in t2i_cfg.__dataclass_fields__}
    return unified.UnifiedConfig(**fields, feature_dim=dim, num_image_tokens=num_tokens)


# Where a parameter of the unified model sits in a checkpoint of each recipe (None: that recipe has none).
RECIPE_NAMES = {
    "t2i": {"vision_projector": None},
    "vlm": {"vision_projector": "projector", "projector": None, "level_embed": None, "pos_embed": None,
            "code_head": None},
    "unified": {},
}


def _stored_name(path: str, recipe: str) -> str | None:
    top, _, rest = path.partition("/")
    names = RECIPE_NAMES[recipe]
    if top not in names:
        return path
    return None if names[top] is None else "/".join(filter(None, (names[top], rest)))


def params_from_checkpoints(directories, params: Any, shardings: Any) -> Any:
    """``params`` with every entry an earlier run holds (same shape) replaced by the stored value, in the order
    given (a later folder wins). Each folder's ``meta`` says its recipe: a VLM's ``projector`` is this model's
    ``vision_projector``; a t2i run's names are this model's. Logs which parameters came from where and which
    keep their initial values."""
    flat = traverse_util.flatten_dict(params, sep="/")
    flat_sh = traverse_util.flatten_dict(shardings, sep="/")
    source_of: dict[str, str] = {}
    for directory in directories:
        recipe = checkpoint.read_meta(directory).get("recipe", "")
        if recipe not in RECIPE_NAMES:
            raise CheckpointError(f"config.model.init_checkpoints: {directory!r} is a {recipe or 'unknown'!r} run; "
                                  f"expected one of {sorted(RECIPE_NAMES)}")
        stored_names = {path: _stored_name(path, recipe) for path in flat}
        wanted = {stored: jax.ShapeDtypeStruct(flat[path].shape, flat[path].dtype, sharding=flat_sh[path])
                  for path, stored in stored_names.items() if stored is not None}
        target = {"params": traverse_util.unflatten_dict(wanted, sep="/")}
        restored, _ = checkpoint.restore_variables_partially(directory, target)
        got = traverse_util.flatten_dict(restored.get("params", {}), sep="/")
        if not got:
            raise CheckpointError(f"config.model.init_checkpoints: {directory!r} holds none of this model's "
                                  "parameters in the same shape")
        for path, stored in stored_names.items():
            if stored in got:
                flat[path] = got[stored]
                source_of[path] = directory
    for directory in dict.fromkeys(source_of.values()):
        loaded = sorted({p.split("/")[0] for p, d in source_of.items() if d == directory})
        logger.info("from %s: %s", directory, ", ".join(loaded))
    fresh = sorted({p.split("/")[0] for p in flat if p not in source_of})
    if fresh:
        logger.info("initialised as their recipe does: %s", ", ".join(fresh))
    return traverse_util.unflatten_dict(flat, sep="/")


def check_batch_split(config) -> None:
    """Each task's share of a step must be positive (the recipe trains both tasks every step)."""
    for field in ("t2i_batch_size", "vlm_batch_size"):
        if int(config.train[field]) < 1:
            raise ConfigError(f"config.train.{field} must be >= 1, got {config.train[field]}")

