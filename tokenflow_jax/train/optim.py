"""Optimizers with regex-selected trainable parameters, and the update metrics every trainer logs.

Which parameters train is decided by regexes over '/'-joined parameter paths
(``semantic_encoder/blocks/attn/q_proj/kernel``):

* ``trainable``: if non-empty, only paths matching one of these train (stage 2 of the tokenizer:
  ``('^pixel_decoder/',)``); everything else is frozen;
* ``frozen``: paths matching one of these never train, whatever ``trainable`` says.

Frozen parameters get ``optax.set_to_zero`` and hold no optimizer state (``optax.multi_transform``),
so freezing the big semantic tower also saves its Adam moments.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from tokenflow_jax.errors import ConfigError


def path_labels(params: Any, trainable: Sequence[str] = (), frozen: Sequence[str] = ()) -> Any:
    """A tree like ``params`` of 'train' / 'freeze' labels; a ConfigError when the regexes leave nothing to train."""
    trainable_re = [re.compile(p) for p in trainable]
    frozen_re = [re.compile(p) for p in frozen]

    def label(path: tuple[str, ...]) -> str:
        name = "/".join(path)
        if any(r.search(name) for r in frozen_re):
            return "freeze"
        if trainable_re and not any(r.search(name) for r in trainable_re):
            return "freeze"
        return "train"

    flat = traverse_util.flatten_dict(params)
    labels = {path: label(path) for path in flat}
    if labels and "train" not in labels.values():
        raise ConfigError(f"config.train.trainable={tuple(trainable)} / frozen={tuple(frozen)} leave no parameter to "
                          "train (paths look like 'projector/fc1/kernel', 'llm/layers/...')")
    return traverse_util.unflatten_dict(labels)


def count_trainable(params: Any, labels: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    sizes = jax.tree.map(lambda p: int(p.size), params)
    total = sum(jax.tree.leaves(sizes))
    trained = sum(s for s, lab in zip(jax.tree.leaves(sizes), jax.tree.leaves(labels)) if lab == "train")
    return trained, total


def learning_rate_schedule(cfg) -> optax.Schedule:
    """constant | cosine, with linear warmup (``warmup_steps``)."""
    lr, warmup = float(cfg.lr), int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "constant")
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "cosine":
        total, alpha = int(cfg.get("decay_steps", 0)), float(cfg.get("min_lr_ratio", 0.0))
        if total < max(warmup, 1):
            raise ConfigError(f"optim.decay_steps ({total}) must be >= 1 and >= optim.warmup_steps ({warmup}) for "
                              "'cosine'")
        # A schedule no longer than its warmup (a 1-step run of configs/vlm.py) ends there, at its final rate.
        decay = (optax.cosine_decay_schedule(lr, total - warmup, alpha=alpha) if total > warmup
                 else optax.constant_schedule(lr * alpha))
    else:
        raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {kind!r}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(cfg, params: Any, trainable: Sequence[str] = (), frozen: Sequence[str] = ()):
    """(optax transform, labels) for ``cfg`` = {lr, b1, b2, eps, weight_decay, grad_clip, schedule, ...}.

    Adam (AdamW when weight_decay > 0) with global-norm clipping of the trained parameters' gradients.
    """
    labels = path_labels(params, trainable, frozen)
    schedule = learning_rate_schedule(cfg)
    if float(cfg.get("weight_decay", 0.0)) > 0:
        inner = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8), weight_decay=cfg.weight_decay)
    else:
        inner = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8))
    clip = float(cfg.get("grad_clip", 0.0))
    train = optax.chain(optax.clip_by_global_norm(clip), inner) if clip > 0 else inner
    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels), labels


def l2_norm(tree: Any) -> jax.Array:
    """``optax.tree.norm`` of ``tree`` accumulated in float32 (bf16 leaves included); 0 for an empty tree."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def trained_only(tree: Any, labels: Any) -> Any:
    """The leaves of ``tree`` whose label (:func:`path_labels`) is 'train'; frozen ones become None (dropped)."""
    return jax.tree.map(lambda x, label: x if label == "train" else None, tree, labels)


def update_metrics(prefix: str, grads: Any, params: Any, updates: Any, labels: Any = None) -> dict[str, jax.Array]:
    """big_vision's l2_grads / l2_params / l2_updates for one parameter group, over its trained parameters only
    when ``labels`` are given (frozen gradients are never read, so XLA can leave them out of the program)."""
    if labels is not None:
        grads, params, updates = (trained_only(t, labels) for t in (grads, params, updates))
    return {
        f"{prefix}l2_grads": l2_norm(grads),
        f"{prefix}l2_params": l2_norm(params),
        f"{prefix}l2_updates": l2_norm(updates),
    }


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """Exponential moving average of parameters (decay 0.9999 in the reference's option):
    ``decay * ema + (1 - decay) * params`` with ``optax.incremental_update``."""
    return optax.incremental_update(jax.tree.map(lambda p, e: p.astype(e.dtype), params, ema), ema,
                                    step_size=1.0 - decay)
