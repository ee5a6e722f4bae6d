"""Tokenizer trainer: TokenFlow + PatchGAN with L2/L1 + LPIPS + semantic cosine + VQ losses
(ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_train.py`` and ``vq_loss.py``; paper Table 11).

    tokenflow-jax train --config configs/tokenizer.py:tiny --workdir DIR [--config.x=y ...]

One linear function in sections: set-up, mesh, input, models, state and shardings, initialisation or
resume, the update step, the loop. The update step is pure: ``(state, batch) -> (state, metrics)``,
jitted with in/out shardings and the state donated; one generator forward serves both the generator
and the discriminator gradients. Restarting the same command continues from the newest checkpoint in
``DIR`` (model, optimizers, discriminator, EMA, data position), so the resumed steps equal the
uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from tokenflow_jax import checkpoint, parallel, prng
from tokenflow_jax.convert import semantic_tower
from tokenflow_jax.convert.sources import WeightsNotFoundError
from tokenflow_jax.data import images as image_io
from tokenflow_jax.data import pipeline
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import discriminator as disc_lib
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.models.perceptual import LPIPS, LPIPS_NETS, load_lpips_params
from tokenflow_jax.recipes.tokenizer import losses
from tokenflow_jax.recipes.tokenizer import teacher as teacher_lib
from tokenflow_jax.train import loop, optim
from tokenflow_jax.utils import images as image_utils
from tokenflow_jax.utils import logs

logger = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # generator (TokenFlow) parameters
    quantizer: Any  # the quantizer collection: usage window, EMA codebooks
    opt_state: Any
    disc_params: Any
    disc_stats: Any  # discriminator BatchNorm statistics
    disc_opt_state: Any
    ema_params: Any  # {} when config.train.ema_decay == 0

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "quantizer": self.quantizer}


def rest_of_state(state: TrainState) -> dict[str, Any]:
    """Everything but the model variables: the checkpoint's ``train_state`` item."""
    return {"step": state.step, "opt_state": state.opt_state, "disc_params": state.disc_params,
            "disc_stats": state.disc_stats, "disc_opt_state": state.disc_opt_state, "ema_params": state.ema_params}


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the tokenizer described by ``config`` in ``workdir``; returns the last metrics."""

    # ------------------------------------------------------------------------------------- set-up
    tc = config.train
    if tc.get("stage", 1) == 2 and not (config.get("resume", "") or config.init.checkpoint):
        raise ConfigError("stage 2 (decoder fine-tune) starts from a trained tokenizer: set "
                         "--config.init.checkpoint=DIR (a tokenizer checkpoint or a converted official one)")
    process = jax.process_index()
    logs.make_workdir(workdir)

    # --------------------------------------------------------------------------------------- mesh
    mesh, rules = loop.mesh_and_rules(config)

    # -------------------------------------------------------------------------------------- input
    global_batch = int(tc.global_batch_size)
    dataset = pipeline.make_dataset(config.data, global_batch_size=global_batch, process_index=process,
                                    process_count=jax.process_count(), seed=config.seed, train=True)
    data_iter = iter(dataset)

    # ------------------------------------------------------------------------------------- models
    parts = build_parts(config)
    model = parts.model
    frozen = load_frozen_params(config, parts)

    # --------------------------------------------------------------------- state and its shardings
    step = build_step(config, parts, mesh, rules, frozen)
    abstract_state, state_sh, frozen_sh = step.abstract_state, step.state_sh, step.frozen_sh
    trained, total = optim.count_trainable(abstract_state.params, step.labels)
    logger.info("tokenizer: %.2fM parameters, %.2fM trained; discriminator %.2fM", total / 1e6, trained / 1e6,
                sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.disc_params)) / 1e6)
    frozen = jax.device_put(frozen, frozen_sh)

    # ------------------------------------------------------------------------ initialise or resume
    ckpt = loop.checkpointer(workdir, config)
    init_fn = jax.jit(step.init_state, out_shardings=state_sh)
    found = ckpt.restore_newest(lambda start: resume(ckpt, start, abstract_state, state_sh,
                                                     loop.restorable_data_iterator(ckpt, start, data_iter)))
    if found is not None:  # the newest step that reads back (damaged newer ones are warned about and set aside)
        start, state = found
        logger.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        state = initialise(config, init_fn, abstract_state, state_sh, model)
        start = 0

    # ------------------------------------------------------------------------------- update step
    step_fn = step.step_fn
    recon_fn = jax.jit(lambda v, x: model.apply(v, x).image)
    replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))  # readable on every host

    # -------------------------------------------------------------------------------------- loop
    num_steps = int(tc.num_steps)
    preview = preview_batch(config, mesh) if tc.image_every else None
    tail = loop.LoopTail(config, workdir, ckpt, start, recipe="tokenizer", postfix=("loss", "psnr"),
                         scale_names=[f"scale_{s}" for s in config.quantizer.scales])
    with tail, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start, num_steps):
            local = next(data_iter)
            # Data metrics stay on the host: an in-step reduction that only depends on the input can
            # run concurrently with the gradient all-reduces, which XLA:CPU's fake devices can deadlock on.
            # bad_images, bad_images/<reason>, converted_images/<kind>: this process's, since the last log.
            pipeline.count_images(tail.counts, local)
            batch = pipeline.to_global_batch(local, mesh, keys=("image",))
            state, metrics = step_fn(state, frozen, batch)
            done = step + 1
            if preview is not None and (done % tc.image_every == 0 or done == num_steps):
                recon = np.asarray(replicate(recon_fn(state.variables(), preview[1])))
                grid = image_utils.image_grid([image_io.model_to_uint8(preview[0]), image_io.model_to_uint8(recon)])
                tail.writer.image(done, "reconstruction", grid,
                                  os.path.join(workdir, "images", f"recon_{done:08d}.png"))
            if tail.end_step(done, metrics, state.variables(), rest_of_state(state), data_iter):
                break
    return tail.last


def preview_batch(config, mesh) -> tuple[np.ndarray, jax.Array] | None:
    """The preview grid's inputs, float32 [n, S, S, 3] in [-1, 1], on the host and replicated on ``mesh``: the
    first ``config.train.preview_images`` usable training images in source order (``pipeline.preview_images``),
    so every process and every resume shows the same ones. None (no grids) when none of them decodes."""
    images = pipeline.preview_images(config.data, int(config.train.preview_images))
    if not len(images):
        logger.warning("no preview image could be read from the first records of the training data; "
                       "reconstruction grids are not written")
        return None
    # Built from the same host array on every process: multi-host safe without a collective.
    placed = jax.make_array_from_callback(images.shape, NamedSharding(mesh, PartitionSpec()), lambda i: images[i])
    return images, placed


@dataclasses.dataclass(frozen=True)
class Parts:
    """The modules a tokenizer run is made of (no parameters)."""
    model: Any  # TokenFlow
    disc: Any  # PatchDiscriminator
    teacher: Any  # SemanticTeacher (frozen)
    teacher_config: Any
    lpips: Any  # LPIPS (frozen)


def build_parts(config, teacher_cfg: teacher_lib.TeacherConfig | None = None) -> Parts:
    """The generator, discriminator, teacher and LPIPS modules of ``config``; checks the teacher width.
    ``teacher_cfg`` defaults to :func:`teacher_lib.teacher_config` (which reads an HF teacher's config)."""

    teacher_cfg = teacher_cfg or teacher_lib.teacher_config(config)
    if teacher_cfg.feature_dim != config.model.semantic_out_dim:
        raise ConfigError(f"config.model.semantic_out_dim ({config.model.semantic_out_dim}) must equal the teacher's "
                         f"feature width ({teacher_cfg.feature_dim}, teacher.kind={config.teacher.kind!r})")
    return Parts(model=tokenizer_lib.build(config),
                 disc=disc_lib.PatchDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers),
                 teacher=teacher_lib.SemanticTeacher(teacher_cfg), teacher_config=teacher_cfg,
                 lpips=LPIPS(net=lpips_net(config)))


def lpips_net(config) -> str:
    """``config.loss.lpips_net``: 'vgg16' (the reference's) or 'alexnet' (~10x cheaper, short CPU runs)."""

    net = config.loss.get("lpips_net", "vgg16")
    if net not in LPIPS_NETS:
        raise ConfigError(f"config.loss.lpips_net must be one of {sorted(LPIPS_NETS)}, got {net!r}")
    return net


def frozen_networks(config) -> tuple[str, ...]:
    """The frozen networks the train step runs: 'teacher' and 'lpips' unless their loss weight is 0 (a term
    with weight 0 is left out of the step, so its weights are neither read nor placed on the devices)."""
    return tuple(name for name, weight in (("teacher", config.loss.semantic_weight),
                                           ("lpips", config.loss.lpips_weight)) if weight != 0)


def load_frozen_params(config, parts: Parts) -> dict[str, Any]:
    """{'teacher': pretrained teacher params, 'lpips': the LPIPS backbone + linear heads} (host arrays), for
    the networks of :func:`frozen_networks`."""

    loaders = {"teacher": lambda: teacher_lib.load_teacher_params(config, parts.teacher_config),
               "lpips": lambda: load_lpips_params(parts.lpips.net)}
    return {name: loaders[name]() for name in frozen_networks(config)}


def abstract_frozen_params(config, parts: Parts) -> dict[str, Any]:
    """The shapes of :func:`load_frozen_params`' tree without reading any weights (for AOT compiles)."""
    size = parts.model.config.image_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    key = prng.make_key(0)
    inits = {"teacher": lambda: jax.eval_shape(parts.teacher.init, key, image)["params"],
             "lpips": lambda: jax.eval_shape(parts.lpips.init, key, image, image)["params"]}
    return parallel.unbox_without_constraints({name: inits[name]() for name in frozen_networks(config)})


@dataclasses.dataclass(frozen=True)
class Step:
    """A tokenizer run's abstract state on a mesh, its shardings and the jitted update step."""
    abstract_state: TrainState
    state_sh: TrainState
    frozen_sh: Any  # replicated, like the frozen teacher and LPIPS weights
    labels: Any  # 'train' / 'freeze' per generator parameter
    init_state: Any  # key -> TrainState (not jitted)
    step_fn: Any  # jitted (state, frozen, batch) -> (state, metrics), state donated


def build_step(config, parts: Parts, mesh, rules, frozen: Any) -> Step:
    """Shardings from ``jax.eval_shape`` of the init and the jitted update step; ``frozen`` may be abstract.

    Creates no array on ``mesh``'s devices, so it also serves ahead-of-time compiles for TPU topologies.
    """
    tc = config.train
    size = parts.model.config.image_size
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    key = prng.make_key(0)  # outside the mesh: compile-only devices cannot hold it
    init_state = make_init_state(config, parts)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed_model = jax.eval_shape(parts.model.init, key, dummy)
        boxed_disc = jax.eval_shape(functools.partial(parts.disc.init, train=False), key, dummy)
        model_sh = parallel.shardings_from_abstract(boxed_model, mesh, rules)
        disc_sh = parallel.shardings_from_abstract(boxed_disc, mesh, rules)
        variables = parallel.unbox_without_constraints(boxed_model)
        disc_vars = parallel.unbox_without_constraints(boxed_disc)
        tx, dtx, labels = make_optimizers(config, variables, disc_vars)
        # The state's shapes from the abstract variables: tracing both inits again costs seconds per run, and the
        # result is the same.
        abstract_state = jax.eval_shape(functools.partial(state_from_variables, config, tx, dtx), variables,
                                        disc_vars)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_sh = TrainState(
            step=replicated, params=model_sh["params"], quantizer=model_sh.get("quantizer", {}),
            opt_state=loop.optimizer_state_shardings(abstract_state.opt_state, model_sh["params"], mesh),
            disc_params=disc_sh["params"], disc_stats=disc_sh["batch_stats"],
            disc_opt_state=loop.optimizer_state_shardings(abstract_state.disc_opt_state,
                                                            disc_sh["params"], mesh),
            ema_params=model_sh["params"] if tc.ema_decay > 0 else {},
        )
        parallel.check_replication(abstract_state.params, state_sh.params, mesh,
                                   config.mesh.get("max_replicated_fraction", 0.05))
        frozen_sh = jax.tree.map(lambda _: replicated, frozen)
    step_fn = jax.jit(make_train_step(config, parts, tx, dtx, labels), in_shardings=(state_sh, frozen_sh, None),
                      out_shardings=(state_sh, None), donate_argnums=0)
    return Step(abstract_state, state_sh, frozen_sh, labels, init_state, step_fn)


def compile_parts(config) -> Parts:
    """:func:`build_parts`, or offline, when the HF teacher's config.json cannot be read, the same parts with the
    tokenizer's own semantic-encoder architecture as the teacher's (the configs use one tower for both: CLIP
    ViT-B/16 + its 512-d projection for b, SigLIP so400m up to hidden_states[-2] for xl). Compiles only."""

    try:
        return build_parts(config)
    except WeightsNotFoundError as e:
        if config.teacher.kind not in ("clip", "siglip"):
            raise
        projection = int(config.model.semantic_out_dim) if config.teacher.kind == "clip" else 0
        vit = dataclasses.replace(tokenizer_lib.build(config).config.semantic_encoder, remat=False)
        logger.warning("teacher %s: its config is not readable here (%s); compiling with the semantic encoder's "
                       "architecture (%s, width %d, depth %d%s) as the teacher's", config.teacher.model, e,
                       vit.flavour, vit.width, vit.depth, f", projection {projection}" if projection else "")
        return build_parts(config, teacher_lib.TeacherConfig(config.teacher.kind, config.quantizer.scales[-1],
                                                             config.teacher.input_scaling, vit, projection))


def aot_programs(config, mesh, rules) -> list[loop.Program]:
    """The train step on abstract inputs (``tokenflow-jax compile``): state, frozen weights, one global batch."""
    parts = compile_parts(config)
    frozen = abstract_frozen_params(config, parts)
    step = build_step(config, parts, mesh, rules, frozen)
    size = parts.model.config.image_size
    batch = {"image": loop.abstract_batch(mesh, (int(config.train.global_batch_size), size, size, 3),
                                            jnp.float32)}
    args = (checkpoint.abstract_target(step.abstract_state, step.state_sh),
            checkpoint.abstract_target(frozen, step.frozen_sh), batch)
    return [loop.Program("train_step", step.step_fn, args, state_index=0)]


def make_init_state(config, parts: Parts):
    """``key -> TrainState``: fresh generator, discriminator, optimizer states (and EMA copy)."""
    size = parts.model.config.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)

    def init_state(key) -> TrainState:
        k_model, k_disc = jax.random.split(key)
        variables = nn.unbox(parts.model.init(k_model, dummy))
        disc_vars = nn.unbox(parts.disc.init(k_disc, dummy, train=False))
        tx, dtx, _ = make_optimizers(config, variables, disc_vars)
        return state_from_variables(config, tx, dtx, variables, disc_vars)

    return init_state


def make_optimizers(config, variables, disc_vars):
    """(generator optimizer, discriminator optimizer, generator parameter labels); they read only the variables'
    paths, so abstract variables serve."""
    tx, labels = optim.make_optimizer(config.optim, variables["params"], config.train.trainable,
                                      config.train.frozen)
    dtx, _ = optim.make_optimizer(config.disc_optim, disc_vars["params"])
    return tx, dtx, labels


def state_from_variables(config, tx, dtx, variables, disc_vars) -> TrainState:
    """A fresh TrainState around initial generator and discriminator variables: optimizer states (and the EMA
    copy). Run on ``jax.ShapeDtypeStruct`` trees under ``jax.eval_shape`` it gives the abstract state."""
    tc = config.train
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"], quantizer=variables.get("quantizer", {}),
        opt_state=tx.init(variables["params"]), disc_params=disc_vars["params"],
        disc_stats=disc_vars["batch_stats"], disc_opt_state=dtx.init(disc_vars["params"]),
        ema_params=variables["params"] if tc.ema_decay > 0 else {},
    )


def make_train_step(config, parts: Parts, tx, dtx, labels: Any = None):
    """The pure update ``(state, frozen, batch) -> (state, metrics)``.

    One generator forward gives the reconstruction for the generator loss (L2/L1 + LPIPS + semantic cosine
    + adversarial from disc_start + VQ/commitment/entropy) and, with its gradient stopped, for the
    discriminator's hinge loss; both optimizers step; the EMA params follow when enabled. Terms whose weight
    is 0 in ``config.loss`` are left out of the program (``disc_weight=0``: no discriminator at all).
    """
    model, disc, teacher, lpips = parts.model, parts.disc, parts.teacher, parts.lpips
    loss_cfg, tc = config.loss, config.train
    base_key = prng.make_key(config.seed + 1)
    # A term whose weight is zero in the config is not computed at all (its networks are the most expensive
    # part of a small tokenizer's step: the VGG16 teacher and LPIPS are ~80% of `tiny`'s). disc_weight == 0
    # also skips the discriminator's own update, so its parameters and statistics stay at their init.
    frozen_used = frozen_networks(config)
    use_teacher, use_lpips = "teacher" in frozen_used, "lpips" in frozen_used
    use_gan = loss_cfg.disc_weight != 0

    def generator_loss(params, state, frozen, images, key):
        (semantic, recon, _, aux, _), mutated = model.apply(
            {"params": params, "quantizer": state.quantizer}, images, train=True,
            rngs={"quantizer": key}, mutable=["quantizer"],
        )
        w_adv = losses.adversarial_weight(state.step, loss_cfg.disc_start, loss_cfg.disc_weight)
        terms = {"recon_loss": losses.reconstruction_loss(images, recon, loss_cfg.recon),
                 **{k: aux.quantizer[k] for k in ("vq_loss", "commit_loss", "entropy_loss")}}
        total = loss_cfg.recon_weight * terms["recon_loss"]
        if use_lpips:
            terms["lpips_loss"] = jnp.mean(lpips.apply({"params": frozen["lpips"]}, images, recon))
            total += loss_cfg.lpips_weight * terms["lpips_loss"]
        if use_teacher:
            target = jax.lax.stop_gradient(teacher.apply({"params": frozen["teacher"]}, images))
            terms["semantic_loss"] = losses.semantic_cosine_loss(semantic, target)
            total += loss_cfg.semantic_weight * terms["semantic_loss"]
        if use_gan:
            logits_fake, _ = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats}, recon,
                                        train=True, mutable=["batch_stats"])
            terms["generator_adv_loss"] = disc_lib.generator_adversarial_loss(logits_fake)
            total += w_adv * terms["generator_adv_loss"]
        total += terms["vq_loss"] + terms["commit_loss"] + terms["entropy_loss"]
        quantizer_metrics = {k: aux.quantizer[k] for k in ("codebook_usage", "batch_usage", "perplexity",
                                                            "scale_usage")}
        return total, (recon, mutated.get("quantizer", {}), {**terms, **quantizer_metrics, "w_adv": w_adv})

    def train_step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
        images = batch["image"]
        key = jax.random.fold_in(base_key, state.step)
        (loss, (recon, quantizer_state, metrics)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state.params, state, frozen, images, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        metrics.update(loss=loss, psnr=losses.batch_psnr(images, recon),
                       **optim.update_metrics("", grads, state.params, updates, labels))
        disc_params, disc_stats, disc_opt_state = state.disc_params, state.disc_stats, state.disc_opt_state
        if use_gan:
            recon = jax.lax.stop_gradient(recon)
            w_adv = metrics["w_adv"]

            def discriminator_loss(disc_params):
                variables = {"params": disc_params, "batch_stats": state.disc_stats}
                logits_real, stats = disc.apply(variables, images, train=True, mutable=["batch_stats"])
                variables = {"params": disc_params, "batch_stats": stats["batch_stats"]}
                logits_fake, stats = disc.apply(variables, recon, train=True, mutable=["batch_stats"])
                d_loss = w_adv * disc_lib.D_LOSSES[loss_cfg.disc_loss](logits_real, logits_fake)
                return d_loss, (stats["batch_stats"], jnp.mean(logits_real), jnp.mean(logits_fake))

            (d_loss, (disc_stats, real_mean, fake_mean)), d_grads = jax.value_and_grad(
                discriminator_loss, has_aux=True)(state.disc_params)
            d_updates, disc_opt_state = dtx.update(d_grads, state.disc_opt_state, state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, d_updates)
            metrics.update(disc_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean,
                           **optim.update_metrics("disc_", d_grads, state.disc_params, d_updates))

        ema = optim.ema_update(state.ema_params, params, tc.ema_decay) if tc.ema_decay > 0 else state.ema_params
        new_state = TrainState(step=state.step + 1, params=params, quantizer=quantizer_state or state.quantizer,
                               opt_state=opt_state, disc_params=disc_params, disc_stats=disc_stats,
                               disc_opt_state=disc_opt_state, ema_params=ema)
        return new_state, metrics

    return train_step


def resume(ckpt: checkpoint.TrainCheckpointer, step: int, abstract_state: TrainState, state_sh: TrainState,
           data_iter) -> TrainState:
    """The state at ``step`` from the workdir's checkpoints, on this run's shardings."""
    target = checkpoint.abstract_target(abstract_state, state_sh)
    variables, rest = ckpt.restore(step, {"params": target.params, "quantizer": target.quantizer},
                                   rest_of_state(target), data_iter)
    return TrainState(params=variables["params"], quantizer=variables["quantizer"], **rest)


def initialise(config, init_fn, abstract_state: TrainState, state_sh: TrainState, model) -> TrainState:
    """A fresh state, then weights from ``config.resume`` / ``config.init`` (resume order: a checkpoint in the
    workdir, see :func:`resume`, then ``config.resume``, then ``config.init``, then scratch)."""
    state = init_fn(prng.make_key(config.seed))
    source = config.get("resume", "") or config.init.checkpoint
    if source:
        target = checkpoint.abstract_target(
            {"params": abstract_state.params, "quantizer": abstract_state.quantizer},
            {"params": state_sh.params, "quantizer": state_sh.quantizer},
        )
        restored, fresh = checkpoint.restore_variables_partially(source, target, tuple(config.init.reinit))
        if fresh and not config.init.reinit:
            raise checkpoint.CheckpointMismatchError(
                f"{source!r} lacks (or has other shapes for) {len(fresh)} entries, e.g. {fresh[:5]}; list the "
                "parts to rebuild in config.init.reinit (e.g. ('^params/pixel_decoder/',))"
            )
        logger.info("initialised from %s; %d entries freshly initialised", source, len(fresh))
        variables = loop.merge_trees({"params": state.params, "quantizer": state.quantizer}, restored)
        state = state.replace(params=variables["params"], quantizer=variables["quantizer"])
        if config.train.ema_decay > 0:
            state = state.replace(ema_params=variables["params"])
    elif config.init.semantic_encoder:

        params = semantic_tower.semantic_encoder_params(config, config.init.semantic_encoder)
        tower = jax.tree.map(lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                             params, state.params["semantic_encoder"])
        state = state.replace(params={**state.params, "semantic_encoder": tower})
    return state

