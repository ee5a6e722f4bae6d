"""Next-scale text-to-image trainer: cross-entropy on image tokens with caption dropout (the loss of
ByteFlow-AI/TokenFlow ``t2i/llava_t2i/model/language_model/llava_llama.py``, ``LlavaLlamaForCausalLM.forward``;
the hyper-parameters of ``t2i/scripts/train_t2i.sh``).

    tokenflow-jax train --config configs/t2i.py:tiny --workdir DIR [--config.x=y ...]

One linear function in sections: set-up, mesh, text and image tokenizers, input, model, state and
shardings, initialisation or resume, the update step, the loop. Image tokens come either from shards
written once by ``tokenflow-jax tokenize`` (``config.data.tokenized``) or online: each batch of images is
encoded by the frozen tokenizer in a separate jitted call. Captions are dropped (replaced by the empty
caption, the unconditional prompt the sampler's guidance contrasts with) with probability
``train.cond_drop_rate``, drawn from (seed, step, process) so a resumed run drops the same ones. The update
step is pure, ``(state, codebook, batch) -> (state, metrics)``, jitted with in/out shardings and the state
donated; restarting the same command continues from the newest checkpoint in ``DIR``.
"""
from __future__ import annotations

import collections
import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tokenflow_jax import checkpoint
from tokenflow_jax.data import pipeline, token_shards
from tokenflow_jax.errors import ConfigError, DataError
from tokenflow_jax.models import t2i
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.t2i.tokens import build_token_dataset
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.train import llm_init, loop, optim
from tokenflow_jax.utils import logs

logger = logging.getLogger(__name__)


TrainState, rest_of_state = loop.TrainState, loop.rest_of_state


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the t2i model described by ``config`` in ``workdir``; returns the last metrics."""

    # ------------------------------------------------------------------------------------- set-up
    tc = config.train
    if not 0.0 <= float(tc.cond_drop_rate) < 1.0:
        raise ConfigError(f"config.train.cond_drop_rate must be in [0, 1), got {tc.cond_drop_rate}")
    process, process_count = jax.process_index(), jax.process_count()
    logs.make_workdir(workdir)

    # --------------------------------------------------------------------------------------- mesh
    mesh, rules = loop.mesh_and_rules(config)

    # ---------------------------------------------------------------------- text and image tokenizers
    tok_config = frozen_tokenizer.tokenizer_config(config)
    text_tokenizer, prompt_encoder = t2i_setup.text_parts(config)
    model_cfg = t2i_setup.model_config(config, tok_config, text_tokenizer)
    tok_checkpoint = config.tokenizer.get("checkpoint", "")

    # -------------------------------------------------------------------------------------- input
    global_batch = int(tc.global_batch_size)
    tokenized = config.data.get("tokenized", "")
    if tokenized:
        dataset = token_dataset(config, tok_config, tokenized, global_batch)
        encode, tok_vars = None, None
        codebook = frozen_tokenizer.load_codebook(tok_config, tok_checkpoint or None)  # only the codebooks are read
    else:
        if not tok_checkpoint:
            logger.warning(
                "no tokenizer checkpoint (config.tokenizer.checkpoint): tokenising %s images ONLINE with a freshly "
                "initialised %s tokenizer; its codes carry little image structure, so this run only exercises the "
                "pipeline (train a tokenizer first, then pass --config.tokenizer.checkpoint=DIR/checkpoints)",
                config.data.source, tok_config.get("config_spec", "tokenizer"))
        tok_model, tok_vars = frozen_tokenizer.load_tokenizer(tok_config, tok_checkpoint or None, mesh=mesh)
        encode = frozen_tokenizer.encode_indices_fn(tok_model)
        codebook = frozen_tokenizer.codebook_vectors(tok_model, tok_vars)
        data_cfg = config.data.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.image_size = tok_config.model.image_size
        dataset = pipeline.make_dataset(data_cfg, global_batch_size=global_batch, process_index=process,
                                        process_count=process_count, seed=config.seed, train=True)
    data_iter = iter(dataset)
    codebook = jax.device_put(codebook, NamedSharding(mesh, PartitionSpec()))  # [K, C] code vectors

    # ------------------------------------------------------------------------------------- model
    model = t2i.NextScaleT2I(model_cfg)
    p, n = model_cfg.text_length, model_cfg.num_tokens

    # --------------------------------------------------------------------- state and its shardings
    step = build_step(config, model, mesh, rules)
    _, total = optim.count_trainable(step.abstract_state.params, step.labels)
    logger.info("t2i model: %.2fM parameters (decoder %.2fM), %d image tokens over %d scales, text prefix %d, "
                "vocabulary %d, head %s", total / 1e6, model_cfg.llm.num_params() / 1e6, n, len(model_cfg.scales),
                p, model_cfg.llm.vocab_size, model_cfg.head)

    # ------------------------------------------------------------------------ initialise or resume
    def load_params(params):  # a fresh run: decoder weights from an HF model when config.model.init names one
        return llm_init.init_from_hf(config, model_cfg.llm, params, mesh, rules) if config.model.get("init") else params

    ckpt = loop.checkpointer(workdir, config)
    state, start = loop.resume_or_init(ckpt, step, data_iter, config.seed, load_params)

    # ------------------------------------------------------------------------------- update step
    step_fn = step.step_fn

    # -------------------------------------------------------------------------------------- loop
    tail = loop.LoopTail(config, workdir, ckpt, start, recipe="t2i",
                         scale_names=[f"scale_{s}" for s in model_cfg.scales])
    with tail, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start, int(tc.num_steps)):
            # tail.counts: dropped and truncated captions of this process, logged with the next metrics, and when
            # tokenising online its replaced and converted images (pipeline.count_images)
            local = next(data_iter)
            if "skipped" in local:
                pipeline.count_images(tail.counts, local)
            batch = generation_batch(local, prompt_encoder, float(tc.cond_drop_rate),
                                     np.random.default_rng([config.seed, step, process]), tail.counts, mesh,
                                     encode, tok_vars)
            state, metrics = step_fn(state, codebook, batch)
            if tail.end_step(step + 1, metrics, {"params": state.params}, rest_of_state(state), data_iter):
                break
    return tail.last


def build_step(config, model: t2i.NextScaleT2I, mesh, rules) -> loop.Step:
    """``loop.build_step`` for the t2i update ``(state, codebook [K, C], batch) -> (state, metrics)``."""
    return loop.build_step(config, model, t2i.init_args(model.config), lambda tx, _: make_train_step(config, model, tx),
                           mesh, rules, other_in_shardings=(NamedSharding(mesh, PartitionSpec()), None))


def aot_programs(config, mesh, rules) -> list[loop.Program]:
    """The train step on abstract inputs (``tokenflow-jax compile``): state, codebook, one global batch of
    tokenized data (text ids and mask [B, P], image-token indices [B, N])."""
    model_cfg = t2i_setup.model_config(config, frozen_tokenizer.tokenizer_config(config))  # reads nothing for 1b / 7b
    model = t2i.NextScaleT2I(model_cfg)
    step = build_step(config, model, mesh, rules)
    g, p, n = int(config.train.global_batch_size), model_cfg.text_length, model_cfg.num_tokens
    codebook = jax.ShapeDtypeStruct((model_cfg.codebook_size, model_cfg.code_dim), jnp.float32,
                                    sharding=NamedSharding(mesh, PartitionSpec()))
    batch = {"text_ids": loop.abstract_batch(mesh, (g, p), jnp.int32),
             "text_mask": loop.abstract_batch(mesh, (g, p), jnp.int32),
             "indices": loop.abstract_batch(mesh, (g, n), jnp.int32)}
    args = (checkpoint.abstract_target(step.abstract_state, step.state_sh), codebook, batch)
    return [loop.Program("train_step", step.step_fn, args, state_index=0)]


def token_dataset(config, tok_config, path: str, global_batch: int):
    """The stream over ``tokenflow-jax tokenize`` shards in ``path``, checked against the tokenizer config."""

    manifest = token_shards.read_manifest(path)
    q = tok_config.quantizer
    for field, ours in (("scales", list(q.scales)), ("codebook_size", int(q.codebook_size))):
        theirs = manifest.get(field)
        if theirs is not None and (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != ours:
            raise DataError(f"config.data.tokenized={path!r} was written with {field}={theirs}, but the tokenizer "
                             f"config ({tok_config.get('config_spec', '')}) has {field}={ours}")
    written_with, ours = manifest.get("checkpoint", ""), config.tokenizer.get("checkpoint", "")
    if os.path.abspath(written_with) != os.path.abspath(ours) if (written_with and ours) else written_with != ours:
        logger.warning("tokenized data %s was written with tokenizer checkpoint %r, this run's is %r: the codebook "
                       "must be the one the indices refer to", path, written_with, config.tokenizer.get("checkpoint"))
    return build_token_dataset(token_shards.tokenized_source(path), num_tokens=sum(s * s for s in q.scales),
                               global_batch_size=global_batch, process_index=jax.process_index(),
                               process_count=jax.process_count(), seed=config.seed)


def generation_batch(local, encoder, drop_rate: float, rng: np.random.Generator, counts: collections.Counter,
                     mesh, encode=None, tok_vars=None) -> dict[str, jax.Array]:
    """A process's batch (captions with image-token ``indices``, or with ``image``s that ``encode(tok_vars,
    images)`` tokenises on the mesh) -> the global step input {'text_ids', 'text_mask' [B, P], 'indices' [B, N]}
    after caption dropout (:func:`caption_inputs`)."""
    host = caption_inputs(local["caption"], encoder, drop_rate, rng, counts)
    if encode is None:
        host["indices"] = local["indices"]
    batch = pipeline.to_global_batch(host, mesh)
    if encode is not None:
        batch["indices"] = encode(tok_vars, pipeline.to_global_batch(local, mesh, keys=("image",))["image"])
    return batch


def caption_inputs(captions, encoder, drop_rate: float, rng: np.random.Generator,
                   counts: collections.Counter) -> dict[str, np.ndarray]:
    """Captions [B] (numpy str) -> {'text_ids', 'text_mask'} [B, P] after dropout to the empty caption.

    Updates ``counts['dropped_captions']`` and ``counts['truncated_captions']`` (kept captions cut to fit).
    """
    captions = [str(c) for c in np.asarray(captions).reshape(-1)]
    dropped = rng.random(len(captions)) < drop_rate
    encoded = encoder(["" if d else c for c, d in zip(captions, dropped)])
    counts["dropped_captions"] += int(dropped.sum())
    truncated = int(encoded.truncated.sum())
    if truncated:
        _warn_truncation_once(encoder.length)
    counts["truncated_captions"] += truncated
    return {"text_ids": encoded.ids, "text_mask": encoded.mask}


@functools.cache
def _warn_truncation_once(length: int) -> None:
    logger.warning("captions longer than the text prefix (%d tokens) are truncated; counted in metrics as "
                   "truncated_captions", length)


def make_train_step(config, model: t2i.NextScaleT2I, tx):
    """The pure update ``(state, codebook [K, C], batch) -> (state, metrics)``.

    batch: text_ids, text_mask [B, P]; indices [B, N]. The loss is the mean cross-entropy of every image
    token (over the whole vocabulary for the 'extended' head, as the reference); metrics add top-1
    accuracy and both per scale, the gradient norm and the learning rate.
    """
    cfg = model.config
    schedule = optim.learning_rate_schedule(config.optim)
    scale_of = t2i.token_scale_index(cfg.scales)
    one_hot = jnp.asarray(np.eye(len(cfg.scales), dtype=np.float32)[scale_of])  # [N, n]
    start = cfg.image_token_start

    def loss_fn(params, codebook, batch):
        indices = batch["indices"]
        codes = jnp.take(codebook, indices, axis=0)
        extended = cfg.head == "extended"
        logits = model.apply({"params": params}, batch["text_ids"], batch["text_mask"], codes, full=extended)
        nll = t2i.image_nll(logits, indices, start if extended else 0)  # [B, N]
        code_logits = logits[..., start : start + cfg.codebook_size] if extended else logits
        correct = (jnp.argmax(code_logits, axis=-1) == indices).astype(jnp.float32)
        per_scale = lambda x: jnp.mean(x, axis=0) @ one_hot / one_hot.sum(0)  # noqa: E731
        return jnp.mean(nll), {"accuracy": jnp.mean(correct), "scale_loss": per_scale(nll),
                               "scale_accuracy": per_scale(correct)}

    return loop.gradient_step(loss_fn, tx, schedule)
