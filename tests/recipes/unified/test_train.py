"""The unified trainer: its loss is the weighted sum of the t2i and VLM recipes' own losses, and a run stopped and
resumed ends bit for bit where the uninterrupted run does, both input streams included."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.recipes.runs import preempted_copy, read_metrics, restored_params
from tokenflow_jax import config as config_lib
from tokenflow_jax.models import t2i, unified, vlm
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.t2i import train as t2i_trainer
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.recipes.unified import setup
from tokenflow_jax.recipes.unified import train as unified_trainer
from tokenflow_jax.recipes.vlm import train as vlm_trainer

SMALL = ["model.llm.width=32", "model.llm.depth=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=2",
         "model.llm.mlp_dim=64", "train.t2i_batch_size=4", "train.vlm_batch_size=4", "train.log_every=1",
         "train.checkpoint_every=2", "train.async_checkpoints=False", "data.t2i.num_examples=64",
         "data.vlm.num_examples=64"]


def small_config(*overrides, arg="tiny"):
    config = config_lib.load_config(f"configs/unified.py:{arg}")
    config_lib.apply_overrides(config, SMALL + list(overrides))
    with config.unlocked():
        config.config_spec = f"configs/unified.py:{arg}"
        config.config_overrides = SMALL + list(overrides)
    return config


@pytest.mark.parametrize("head", ["separate", "extended"])
def test_the_loss_is_the_weighted_sum_of_the_recipes_own_losses(head):
    """One batch of each task through the unified step equals, term by term, the t2i recipe's step on the t2i
    parameters and the VLM recipe's step on the VLM parameters (each recipe's own train_step, not a copy)."""
    config = small_config("loss.t2i_weight=0.3", "loss.vlm_weight=2.0", arg=f"tiny,head={head}")
    tok_config = frozen.tokenizer_config(config)
    tok_model, tok_vars = frozen.load_tokenizer(tok_config)
    codebook = frozen.codebook_vectors(tok_model, tok_vars)
    text_tokenizer, _ = t2i_setup.text_parts(setup.t2i_view(config))
    cfg = setup.model_config(config, tok_config, text_tokenizer)
    model = unified.UnifiedModel(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *[jnp.zeros(s.shape, s.dtype)
                                                                  for s in unified.init_args(cfg)]))["params"]
    rng = np.random.default_rng(0)
    b, p, n, size = 3, cfg.text_length, cfg.num_tokens, int(tok_config.model.image_size)
    text_mask = np.ones((b, p), np.int32)
    text_mask[0, :5] = 0
    gen = {"text_ids": rng.integers(1, 40, (b, p)).astype(np.int32), "text_mask": text_mask,
           "indices": rng.integers(0, cfg.codebook_size, (b, n)).astype(np.int32)}
    ids = np.concatenate([rng.integers(1, 40, (b, 2)), np.full((b, cfg.num_image_tokens), vlm.IMAGE_TOKEN_INDEX),
                          rng.integers(1, 40, (b, 12))], axis=1).astype(np.int32)
    labels = np.where(rng.random(ids.shape) < 0.3, ids, -100).astype(np.int32)
    labels[ids == vlm.IMAGE_TOKEN_INDEX] = -100
    conv = {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32), "input_ids": ids, "labels": labels,
            "attention_mask": np.ones_like(ids)}

    sgd = optax.sgd(0.0)
    train_all = lambda tree: jax.tree.map(lambda _: "train", tree)  # noqa: E731 - every parameter trained
    step = unified_trainer.make_train_step(config, model, tok_model, sgd, train_all(params))
    state = unified_trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=sgd.init(params))
    _, ours = jax.jit(step)(state, codebook, tok_vars, gen, conv)

    t2i_params = {k: v for k, v in params.items() if k != "vision_projector"}
    t2i_step = t2i_trainer.make_train_step(setup.t2i_view(config), t2i.NextScaleT2I(cfg), optax.sgd(0.0))
    _, t2i_metrics = jax.jit(t2i_step)(t2i_trainer.TrainState(step=state.step, params=t2i_params,
                                                                opt_state=optax.sgd(0.0).init(t2i_params)),
                                       codebook, gen)
    vlm_params = {"llm": params["llm"], "projector": params["vision_projector"]}
    vlm_step = vlm_trainer.make_train_step(setup.vlm_view(config), vlm.VLM(cfg.vlm_config()), tok_model,
                                           sgd, train_all(vlm_params))
    _, vlm_metrics = jax.jit(vlm_step)(vlm_trainer.TrainState(step=state.step, params=vlm_params,
                                                                opt_state=optax.sgd(0.0).init(vlm_params)),
                                       tok_vars, conv)
    np.testing.assert_allclose(float(ours["t2i_loss"]), float(t2i_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ours["vlm_loss"]), float(vlm_metrics["loss"]), rtol=1e-6)
    weighted = 0.3 * float(t2i_metrics["loss"]) + 2.0 * float(vlm_metrics["loss"])
    np.testing.assert_allclose(float(ours["loss"]), weighted, rtol=1e-6)
    assert float(ours["vlm_trained_tokens"]) == float(vlm_metrics["trained_tokens"]) > 0
    np.testing.assert_allclose(float(ours["t2i_accuracy"]), float(t2i_metrics["accuracy"]), rtol=1e-6)


# One device in the fast tier, with the step test_serve.py's checkpoint is trained with (one compile for both files);
# the (2, 2, 2) mesh in the slow tier (the t2i and VLM recipes' resume on that mesh stays fast).
ONE_DEVICE = ("mesh.shape=(1, 1, 1)", "mesh.num_devices=1", "train.num_steps=2", "train.checkpoint_every=1")


@pytest.mark.parametrize("overrides, preempted_at", [
    pytest.param(ONE_DEVICE, 1, id="one_device"),
    pytest.param(("mesh.shape=(2, 2, 2)", "train.num_steps=4"), 2, marks=pytest.mark.slow, id="mesh222"),
])
def test_a_resumed_run_continues_both_streams_exactly(tmp_path, overrides, preempted_at):
    """Preempted after a checkpoint and restarted: the same parameters and per-task losses as the uninterrupted run,
    bit for bit (both data positions and the condition-drop draws restored); both tasks logged apart."""
    config = small_config(*overrides, "train.cond_drop_rate=0.25")
    steps = int(config.train.num_steps)
    full = str(tmp_path / "full")
    unified_trainer.train(config, full)
    part = preempted_copy(full, str(tmp_path / "part"), step=preempted_at)
    unified_trainer.train(config, part)
    a, b = restored_params(full, steps), restored_params(part, steps)
    assert a.keys() == b.keys() and any(k.startswith("params/vision_projector/") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows_full, rows_part = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in rows_part] == list(range(1, steps + 1))
    for name in ("loss", "t2i_loss", "vlm_loss", "vlm_trained_tokens"):
        assert [r[name] for r in rows_full] == [r[name] for r in rows_part], name
    assert all(r["t2i_images_per_second"] > 0 and r["vlm_examples_per_second"] > 0 for r in rows_full)
