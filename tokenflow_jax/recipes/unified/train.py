"""Unified trainer: every step trains generation and understanding on one decoder (models/unified.py).

    tokenflow-jax train --config configs/unified.py:tiny --workdir DIR [--config.x=y ...]

One linear function in sections: set-up, mesh, frozen image tokenizer, text tokenizer and model, the two input
streams, state and shardings, initialisation or resume, the loop. Each step reads ``train.t2i_batch_size``
captioned images (their tokens from ``data.t2i.tokenized`` shards, or encoded online by the frozen tokenizer) and
``train.vlm_batch_size`` conversations (``data.vlm``), and minimises

    loss = loss.t2i_weight * (mean cross-entropy of the image tokens, as the t2i recipe)
         + loss.vlm_weight * (mean cross-entropy of the trained answer tokens, as the VLM recipe)

with one gradient; both losses, accuracies and throughputs are logged apart. Captions are dropped with
``train.cond_drop_rate`` as the t2i recipe does; conversations are cut to the shortest length bucket that holds
the longest row of the global batch (agreed across processes). The checkpoint holds both streams' positions
(items ``data_t2i`` and ``data_vlm``), so a restarted run continues both exactly.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tokenflow_jax import checkpoint
from tokenflow_jax.data import pipeline
from tokenflow_jax.data import text as text_lib
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import t2i, unified, vlm
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.recipes.t2i import train as t2i_train
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.recipes.unified import setup
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.train import llm_init, loop, optim
from tokenflow_jax.utils import logs

logger = logging.getLogger(__name__)

TrainState, rest_of_state = loop.TrainState, loop.rest_of_state
STREAMS = ("t2i", "vlm")


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the unified model described by ``config`` in ``workdir``; returns the last metrics."""

    # ------------------------------------------------------------------------------------- set-up
    tc = config.train
    setup.check_batch_split(config)
    if not 0.0 <= float(tc.cond_drop_rate) < 1.0:
        raise ConfigError(f"config.train.cond_drop_rate must be in [0, 1), got {tc.cond_drop_rate}")
    t2i_view, vlm_view = setup.t2i_view(config), setup.vlm_view(config)
    buckets = vlm_setup.length_buckets(vlm_view)
    process, process_count = jax.process_index(), jax.process_count()
    logs.make_workdir(workdir)

    # --------------------------------------------------------------------------------------- mesh
    mesh, rules = loop.mesh_and_rules(config)

    # ------------------------------------------------------------------- frozen image tokenizer
    tok_model, tok_vars, tok_config = vlm_setup.load_image_tokenizer(vlm_view, mesh)
    codebook = jax.device_put(frozen_tokenizer.codebook_vectors(tok_model, tok_vars),
                              NamedSharding(mesh, PartitionSpec()))  # [K, C]

    # ------------------------------------------------------------------ text tokenizer and model
    text_tokenizer = vlm_setup.text_tokenizer(vlm_view)
    prompt_encoder = text_lib.PromptEncoder(text_tokenizer, config.model.text_length, config.text.image_marker)
    model_cfg = setup.model_config(config, tok_config, text_tokenizer)
    model = unified.UnifiedModel(model_cfg)

    # ---------------------------------------------------------------------------- input streams
    t2i_batch, vlm_batch = int(tc.t2i_batch_size), int(tc.vlm_batch_size)
    tokenized = config.data.t2i.get("tokenized", "")
    if tokenized:
        t2i_data, encode = t2i_train.token_dataset(t2i_view, tok_config, tokenized, t2i_batch), None
    else:
        data_cfg = t2i_view.data.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.image_size = tok_config.model.image_size
        t2i_data = pipeline.make_dataset(data_cfg, global_batch_size=t2i_batch, process_index=process,
                                         process_count=process_count, seed=config.seed, train=True)
        encode = frozen_tokenizer.encode_indices_fn(tok_model)
    vlm_data = vlm_setup.train_dataset(vlm_view, tok_config, text_tokenizer, model_cfg.num_image_tokens, vlm_batch)
    data_iter = {"t2i": iter(t2i_data), "vlm": iter(vlm_data)}

    # --------------------------------------------------------------------- state and its shardings
    step = build_step(config, model, tok_model, mesh, rules)
    trained, total = optim.count_trainable(step.abstract_state.params, step.labels)
    logger.info("unified: %.2fM parameters, %.2fM trained; %d image tokens over %d scales to generate, %d feature "
                "tokens to read, vocabulary %d, head %s, template %s; per step %d captioned images + %d "
                "conversations", total / 1e6, trained / 1e6, model_cfg.num_tokens, len(model_cfg.scales),
                model_cfg.num_image_tokens, model_cfg.llm.vocab_size, model_cfg.head, config.text.template,
                t2i_batch, vlm_batch)

    # ------------------------------------------------------------------------ initialise or resume
    def load_params(params):  # a fresh run: an HF decoder, then parameters of earlier t2i / VLM / unified runs
        if config.model.get("init"):
            params = llm_init.init_from_hf(config, model_cfg.llm, params, mesh, rules)
        if config.model.get("init_checkpoints"):
            params = setup.params_from_checkpoints(list(config.model.init_checkpoints), params, step.param_sh)
        return params

    ckpt = loop.checkpointer(workdir, config, data_streams=STREAMS)
    state, start = loop.resume_or_init(ckpt, step, data_iter, config.seed, load_params)

    # -------------------------------------------------------------------------------------- loop
    tail = loop.LoopTail(config, workdir, ckpt, start, recipe="unified",
                         per_step={"t2i_images": t2i_batch, "vlm_examples": vlm_batch},
                         postfix=("t2i_loss", "vlm_loss"))
    with tail, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step_index in range(start, int(tc.num_steps)):
            t2i_local = next(data_iter["t2i"])
            if "skipped" in t2i_local:  # images tokenised online: replaced and converted ones, per reason
                pipeline.count_images(tail.counts, t2i_local)
            gen = t2i_train.generation_batch(t2i_local, prompt_encoder, float(tc.cond_drop_rate),
                                         np.random.default_rng([config.seed, step_index, process]), tail.counts,
                                         mesh, encode, tok_vars)
            local = next(data_iter["vlm"])
            vlm_setup.add_counts(tail.counts, local)
            conv = vlm_setup.trim_to_bucket(local, buckets)
            tokens = int(np.sum(conv["length"])) * process_count
            state, metrics = step.step_fn(state, codebook, tok_vars, gen, vlm_setup.to_global(conv, mesh))
            if tail.end_step(step_index + 1, metrics, {"params": state.params}, rest_of_state(state), data_iter,
                             tokens=tokens):
                break
    return tail.last


def build_step(config, model: unified.UnifiedModel, tok_model, mesh, rules) -> loop.Step:
    """``loop.build_step`` for ``(state, codebook [K, C], tokenizer variables, t2i batch, vlm batch) ->
    (state, metrics)``, with ``train.trainable`` / ``train.frozen`` choosing the trained parameters."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return loop.build_step(config, model, unified.init_args(model.config),
                           lambda tx, labels: make_train_step(config, model, tok_model, tx, labels), mesh, rules,
                           other_in_shardings=(replicated, None, None, None),
                           trainable=config.train.trainable, frozen=config.train.frozen)


def aot_programs(config, mesh, rules) -> list[loop.Program]:
    """The train step on abstract inputs (``tokenflow-jax compile``): state, codebook, the frozen tokenizer's
    variables, one global t2i batch of tokens and one global VLM batch at the longest bucket."""
    tok_config = frozen_tokenizer.tokenizer_config(config)
    tok_model = tokenizer_lib.build(tok_config)
    model_cfg = setup.model_config(config, tok_config)  # reads no text tokenizer for 7b / 14b
    model = unified.UnifiedModel(model_cfg)
    step = build_step(config, model, tok_model, mesh, rules)
    tc = config.train
    g, b = int(tc.t2i_batch_size), int(tc.vlm_batch_size)
    p, n, length = model_cfg.text_length, model_cfg.num_tokens, int(config.data.vlm.max_length)
    size = int(tok_config.model.image_size)
    codebook = jax.ShapeDtypeStruct((model_cfg.codebook_size, model_cfg.code_dim), jnp.float32,
                                    sharding=NamedSharding(mesh, PartitionSpec()))
    field = "config.train.t2i_batch_size"
    gen = {"text_ids": loop.abstract_batch(mesh, (g, p), jnp.int32, field),
           "text_mask": loop.abstract_batch(mesh, (g, p), jnp.int32, field),
           "indices": loop.abstract_batch(mesh, (g, n), jnp.int32, field)}
    field = "config.train.vlm_batch_size"
    conv = {"image": loop.abstract_batch(mesh, (b, size, size, 3), jnp.float32, field),
            **{name: loop.abstract_batch(mesh, (b, length), jnp.int32, field)
               for name in ("input_ids", "labels", "attention_mask")}}
    args = (checkpoint.abstract_target(step.abstract_state, step.state_sh), codebook,
            frozen_tokenizer.abstract_tokenizer_variables(tok_model, mesh), gen, conv)
    return [loop.Program("train_step", step.step_fn, args, state_index=0)]


def task_losses(model: unified.UnifiedModel, tok_model, features_kind: str, params, codebook, tok_vars, gen,
                conv) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """({'t2i': mean image-token cross-entropy, 'vlm': mean answer-token cross-entropy}, metrics).

    gen: text_ids, text_mask [B, P], indices [B, N] (the t2i recipe's batch); conv: image [B', H, W, 3],
    input_ids, labels, attention_mask [B', L] (the VLM recipe's). Each loss is computed exactly as its recipe
    computes it (the 'extended' head normalises over the whole vocabulary, as the reference).
    """
    cfg = model.config
    extended = cfg.head == "extended"
    start = cfg.image_token_start
    indices = gen["indices"]
    logits = model.apply({"params": params}, gen["text_ids"], gen["text_mask"], jnp.take(codebook, indices, axis=0),
                         extended, method=unified.UnifiedModel.generation_logits)
    nll = t2i.image_nll(logits, indices, start if extended else 0)
    code_logits = logits[..., start : start + cfg.codebook_size] if extended else logits
    t2i_correct = jnp.argmax(code_logits, axis=-1) == indices

    features = vlm.visual_features(tok_model, tok_vars, conv["image"], features_kind)
    logits = model.apply({"params": params}, conv["input_ids"], features, conv["attention_mask"],
                         method=unified.UnifiedModel.answer_logits)
    token_nll, weight = vlm.token_nll(logits, conv["labels"])
    count = jnp.sum(weight)
    denom = jnp.maximum(count, 1.0)
    vlm_correct = (jnp.argmax(logits[:, :-1], axis=-1) == conv["labels"][:, 1:]).astype(jnp.float32) * weight
    losses = {"t2i": jnp.mean(nll), "vlm": jnp.sum(token_nll) / denom}
    metrics = {"t2i_accuracy": jnp.mean(t2i_correct.astype(jnp.float32)),
               "vlm_accuracy": jnp.sum(vlm_correct) / denom, "vlm_trained_tokens": count}
    return losses, metrics


def make_train_step(config, model: unified.UnifiedModel, tok_model, tx, labels):
    """The pure update ``(state, codebook, tokenizer variables, t2i batch, vlm batch) -> (state, metrics)``:
    one gradient of ``t2i_weight * t2i loss + vlm_weight * vlm loss`` (:func:`task_losses`)."""
    schedule = optim.learning_rate_schedule(config.optim)
    weights = {"t2i": float(config.loss.t2i_weight), "vlm": float(config.loss.vlm_weight)}
    kind = config.model.features

    def loss_fn(params, codebook, tok_vars, gen, conv):
        losses, metrics = task_losses(model, tok_model, kind, params, codebook, tok_vars, gen, conv)
        total = sum(weights[task] * loss for task, loss in losses.items())
        return total, {**{f"{task}_loss": loss for task, loss in losses.items()}, **metrics}

    return loop.gradient_step(loss_fn, tx, schedule, labels)
