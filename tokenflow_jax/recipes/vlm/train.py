"""LLaVA-style understanding trainer on frozen TokenFlow features (SPEC 4.4).

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
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokenflow_jax import checkpoint, prng
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
    process, process_count = jax.process_index(), jax.process_count()
    logs.make_workdir(workdir)  # a gs:// workdir is not a local folder named 'gs:'
    writer = logs.MetricsWriter(workdir, enabled=process == 0)
    guard = loop.PreemptionGuard()
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
    abstract_state, state_sh, param_sh, labels, tx = (step.abstract_state, step.state_sh, step.param_sh,
                                                      step.labels, step.tx)
    trained, total = optim.count_trainable(abstract_state.params, labels)
    if trained == 0:
        raise ValueError(f"config.train.trainable={tuple(tc.trainable)} / frozen={tuple(tc.frozen)} leave no "
                         "parameter to train (paths look like 'projector/fc1/kernel', 'llm/layers/...')")
    logger.info("vlm: %.2fM parameters, %.2fM trained (stage %d), %d image tokens of %d features (%s), "
                "vocabulary %d, template %s, buckets %s", total / 1e6, trained / 1e6, config.stage,
                model_cfg.num_image_tokens, model_cfg.feature_dim, config.model.features,
                model_cfg.llm.vocab_size, config.text.template, buckets)

    # ------------------------------------------------------------------------ initialise or resume
    ckpt = checkpoint.TrainCheckpointer(workdir, keep=tc.keep_checkpoints, use_async=tc.async_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = loop.resume_state(ckpt, start, step, data_iter)
        logger.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        state = jax.jit(step.init_state, out_shardings=state_sh)(prng.make_key(config.seed))
        params = state.params
        if config.model.get("init"):
            params = llm_init.init_from_hf(config, model_cfg.llm, params, mesh, rules)
        if config.model.get("init_checkpoint"):
            params = vlm_setup.params_from_checkpoint(config.model.init_checkpoint, params, param_sh)
        if params is not state.params:  # fresh optimizer moments for the loaded parameters
            state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                            out_shardings=state_sh)(params)
        start = 0
    writer.drop_after(start)

    # ------------------------------------------------------------------------------- update step
    step_fn = step.step_fn

    # -------------------------------------------------------------------------------------- loop
    meta = {"recipe": "vlm", "config_spec": config.get("config_spec", ""),
            "config_overrides": list(config.get("config_overrides", [])), "config": config.to_json()}
    num_steps = int(tc.num_steps)
    last: dict[str, float] = {}
    counts: dict[str, float] = {}
    progress = logs.progress_bar(start, num_steps, process == 0, f"vlm stage {config.stage}")
    timer, tokens_seen = time.time(), 0
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step_index in range(start, num_steps):
                local = next(data_iter)
                vlm_setup.add_counts(counts, local)
                host = vlm_setup.trim_to_bucket(local, buckets)
                tokens_seen += int(np.sum(host["length"])) * process_count
                batch = vlm_setup.to_global(host, mesh)
                state, metrics = step_fn(state, tok_vars, batch)
                done = step_index + 1
                if done % tc.log_every == 0 or done == num_steps:
                    last = loop.flatten_metrics(jax.device_get(metrics))
                    last.update(counts)  # this process, since the last log
                    counts = {}
                    loop.check_finite(done, last)
                    elapsed = max(time.time() - timer, 1e-9)
                    last["examples_per_second"] = tc.log_every * global_batch / elapsed
                    last["tokens_per_second"] = tokens_seen / elapsed
                    timer, tokens_seen = time.time(), 0
                    writer.write(done, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}",
                                         ex_s=f"{last['examples_per_second']:.1f}")
                progress.update(1)
                if loop.save_if_due(ckpt, guard, done, num_steps, tc.checkpoint_every, {"params": state.params},
                                      rest_of_state(state), data_iter, meta):
                    break
    finally:
        ckpt.close()
        writer.close()
        progress.close()
        guard.restore()
    return last


def build_step(config, model: vlm.VLM, tok_model, mesh, rules) -> loop.Step:
    """``loop.build_step`` for the VLM update ``(state, tokenizer variables, batch) -> (state, metrics)``,
    with ``train.trainable`` / ``train.frozen`` choosing the trained parameters."""
    cfg = model.config
    inputs = (((1, 8), jnp.int32), ((1, cfg.num_image_tokens, cfg.feature_dim), jnp.float32))
    return loop.build_step(config, model, inputs,
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

    def train_step(state: TrainState, tok_vars, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tok_vars, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **aux, "grad_norm": optim.l2_norm(optim.trained_only(grads, labels)),
                   "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
