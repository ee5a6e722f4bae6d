"""LLaVA-style understanding trainer on frozen TokenFlow features (ByteFlow-AI/TokenFlow ``i2t/scripts/v1_5/train.sh``).

    tokenflow-jax train --config configs/vlm.py:tiny --workdir DIR [--config.x=y ...]

One linear function in sections: set-up, mesh, frozen image tokenizer, text tokenizer and model, input,
state and shardings, initialisation or resume, the update step, the loop. Each step the frozen tokenizer
encodes the batch's images inside the jitted step (its variables are an argument, never trained or
saved), the projector maps the features to the decoder's width, and they replace the placeholder
positions of the conversation. The loss is the next-token cross-entropy over the tokens the chat template
trains (the assistant replies; for qwen_2_5 also the ChatML markers, as the reference; labels are
IGNORE_INDEX everywhere else), averaged over the global batch's trained tokens.

Which parameters train is chosen by the regexes ``train.trainable`` / ``train.frozen`` (stage 1: the
projector only); frozen parameters hold no optimizer state. Every global batch is cut to the shortest of
``train.length_buckets`` that holds its longest row (agreed across processes), so short batches run a
shorter program and at most len(buckets) programs are compiled. Records that cannot be used (missing or
broken image, no placeholder, empty reply) are skipped and counted in the metrics, as are truncated ones.
Restarting the same command continues from the newest checkpoint in ``DIR``, exactly.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax import checkpoint
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.models import vlm
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.train import llm_init, loop, optim
from tokenflow_jax.utils import logs

logger = logging.getLogger(__name__)


TrainState, rest_of_state = loop.TrainState, loop.rest_of_state


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the VLM described by ``config`` in ``workdir``; returns the last metrics."""
    # ------------------------------------------------------------------------------------- set-up
    tc = config.train
    process_count = jax.process_count()
    logs.make_workdir(workdir)  # a gs:// workdir is not a local folder named 'gs:'
    buckets = vlm_setup.length_buckets(config)

    # --------------------------------------------------------------------------------------- mesh
    mesh, rules = loop.mesh_and_rules(config)

    # ------------------------------------------------------------------- frozen image tokenizer
    tok_model, tok_vars, tok_config = vlm_setup.load_image_tokenizer(config, mesh)

    # ------------------------------------------------------------------ text tokenizer and model
    text_tokenizer = vlm_setup.text_tokenizer(config)
    model_cfg = vlm_setup.model_config(config, tok_config, text_tokenizer)
    model = vlm.VLM(model_cfg)

    # -------------------------------------------------------------------------------------- input
    global_batch = int(tc.global_batch_size)
    dataset = vlm_setup.train_dataset(config, tok_config, text_tokenizer, model_cfg.num_image_tokens,
                                      global_batch)
    data_iter = iter(dataset)

    # --------------------------------------------------------------------- state and its shardings
    step = build_step(config, model, tok_model, mesh, rules)
    trained, total = optim.count_trainable(step.abstract_state.params, step.labels)
    logger.info("vlm: %.2fM parameters, %.2fM trained (stage %d), %d image tokens of %d features (%s), "
                "vocabulary %d, template %s, buckets %s", total / 1e6, trained / 1e6, config.stage,
                model_cfg.num_image_tokens, model_cfg.feature_dim, config.model.features,
                model_cfg.llm.vocab_size, config.text.template, buckets)

    # ------------------------------------------------------------------------ initialise or resume
    def load_params(params):  # a fresh run: the LLM from HF (config.model.init), then a stage-1 run's weights
        if config.model.get("init"):
            params = llm_init.init_from_hf(config, model_cfg.llm, params, mesh, rules)
        if config.model.get("init_checkpoint"):
            params = vlm_setup.params_from_checkpoint(config.model.init_checkpoint, params, step.param_sh)
        return params

    ckpt = loop.checkpointer(workdir, config)
    state, start = loop.resume_or_init(ckpt, step, data_iter, config.seed, load_params)

    # ------------------------------------------------------------------------------- update step
    step_fn = step.step_fn

    # -------------------------------------------------------------------------------------- loop
    tail = loop.LoopTail(config, workdir, ckpt, start, recipe="vlm", unit="examples",
                         desc=f"vlm stage {config.stage}")
    with tail, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step_index in range(start, int(tc.num_steps)):
            local = next(data_iter)
            vlm_setup.add_counts(tail.counts, local)  # skipped and truncated records of this process
            host = vlm_setup.trim_to_bucket(local, buckets)
            batch = vlm_setup.to_global(host, mesh)
            state, metrics = step_fn(state, tok_vars, batch)
            if tail.end_step(step_index + 1, metrics, {"params": state.params}, rest_of_state(state), data_iter,
                             tokens=int(np.sum(host["length"])) * process_count):
                break
    return tail.last


def build_step(config, model: vlm.VLM, tok_model, mesh, rules) -> loop.Step:
    """``loop.build_step`` for the VLM update ``(state, tokenizer variables, batch) -> (state, metrics)``,
    with ``train.trainable`` / ``train.frozen`` choosing the trained parameters."""
    return loop.build_step(config, model, vlm.init_args(model.config),
                           lambda tx, labels: make_train_step(config, model, tok_model, tx, labels), mesh, rules,
                           trainable=config.train.trainable, frozen=config.train.frozen)


def aot_programs(config, mesh, rules) -> list[loop.Program]:
    """The train step on abstract inputs (``tokenflow-jax compile``): state, the frozen tokenizer's variables
    (sharded as ``frozen_tokenizer.load_tokenizer`` places them), one global batch at the longest bucket."""

    tok_config = frozen_tokenizer.tokenizer_config(config)
    tok_model = tokenizer_lib.build(tok_config)
    model = vlm.VLM(vlm_setup.model_config(config, tok_config))  # reads no text tokenizer for the real variants
    step = build_step(config, model, tok_model, mesh, rules)
    tok_vars = frozen_tokenizer.abstract_tokenizer_variables(tok_model, mesh)
    g, length, size = (int(config.train.global_batch_size), int(config.data.max_length),
                       int(tok_config.model.image_size))
    batch = {"image": loop.abstract_batch(mesh, (g, size, size, 3), jnp.float32),
             "input_ids": loop.abstract_batch(mesh, (g, length), jnp.int32),
             "labels": loop.abstract_batch(mesh, (g, length), jnp.int32),
             "attention_mask": loop.abstract_batch(mesh, (g, length), jnp.int32)}
    args = (checkpoint.abstract_target(step.abstract_state, step.state_sh), tok_vars, batch)
    return [loop.Program("train_step", step.step_fn, args, state_index=0)]


def make_train_step(config, model: vlm.VLM, tok_model, tx, labels):
    """The pure update ``(state, tokenizer variables, batch) -> (state, metrics)``.

    batch: image [B, H, W, 3] in [-1, 1]; input_ids, labels [B, L] int32 (IMAGE_TOKEN_INDEX at image
    positions, IGNORE_INDEX where nothing is trained); attention_mask [B, L] (1 = token). Metrics: the loss
    (mean over trained tokens), next-token accuracy on them, their count, the trained parameters' gradient
    norm and the learning rate.
    """
    schedule = optim.learning_rate_schedule(config.optim)
    kind = config.model.features

    def loss_fn(params, tok_vars, batch):
        features = vlm.visual_features(tok_model, tok_vars, batch["image"], kind)
        logits = model.apply({"params": params}, batch["input_ids"], features, batch["attention_mask"])
        nll, weight = vlm.token_nll(logits, batch["labels"])
        count = jnp.sum(weight)
        correct = (jnp.argmax(logits[:, :-1], axis=-1) == batch["labels"][:, 1:]).astype(jnp.float32) * weight
        denom = jnp.maximum(count, 1.0)
        return jnp.sum(nll) / denom, {"accuracy": jnp.sum(correct) / denom, "trained_tokens": count}

    return loop.gradient_step(loss_fn, tx, schedule, labels)
