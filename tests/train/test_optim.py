"""Optimizers: Adam(0.9, 0.95) + global-norm clipping against torch, regex freezing, optimizer-state
shardings with frozen parameters, parameter EMA, learning-rate schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from tokenflow_jax import config as config_lib
from tokenflow_jax import parallel
from tokenflow_jax.errors import UserError
from tokenflow_jax.train import loop, optim


def adam_config(**kw):
    return config_lib.ConfigDict(dict(dict(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                                           schedule="constant", warmup_steps=0), **kw))


def test_adam_with_clipping_matches_torch(rng):
    params = {"enc": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
              "dec": {"bias": rng.normal(size=(5,)).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: (3.0 * rng.normal(size=p.shape)).astype(np.float32), params) for _ in range(4)]

    tx, _ = optim.make_optimizer(adam_config(), params)
    ours, state = jax.tree.map(jnp.asarray, params), None
    state = tx.init(ours)
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = jax.tree.map(jnp.add, ours, updates)

    names = [("enc", "kernel"), ("dec", "bias")]
    theirs = [torch.nn.Parameter(torch.tensor(params[a][b])) for a, b in names]
    opt = torch.optim.Adam(theirs, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        for p, (a, b) in zip(theirs, names):
            p.grad = torch.tensor(g[a][b])
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert norm > 1.0  # the clip is exercised
        opt.step()
    for p, (a, b) in zip(theirs, names):
        np.testing.assert_allclose(np.asarray(ours[a][b]), p.detach().numpy(), rtol=0, atol=2e-6)


def test_regex_freezing_keeps_frozen_params_and_holds_no_moments(rng):
    params = {"pixel_decoder": {"conv": {"kernel": jnp.ones((3, 3, 4, 8))}},
              "semantic_encoder": {"proj": {"kernel": jnp.ones((8, 8))}}}
    tx, labels = optim.make_optimizer(adam_config(), params, trainable=("^pixel_decoder/",))
    assert labels == {"pixel_decoder": {"conv": {"kernel": "train"}},
                      "semantic_encoder": {"proj": {"kernel": "freeze"}}}
    assert optim.count_trainable(params, labels) == (3 * 3 * 4 * 8, 3 * 3 * 4 * 8 + 64)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    updates, state = tx.update(grads, state, params)
    assert not np.any(np.asarray(updates["semantic_encoder"]["proj"]["kernel"]))
    assert np.all(np.asarray(updates["pixel_decoder"]["conv"]["kernel"]) < 0)
    # Moments exist only for the trained parameter: the frozen tower's Adam state is not allocated.
    sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert sizes == 2 * 3 * 3 * 4 * 8

    # `frozen` wins over `trainable`.
    _, labels = optim.make_optimizer(adam_config(), params, trainable=("kernel",), frozen=("^semantic",))
    assert labels["semantic_encoder"]["proj"]["kernel"] == "freeze"


def test_optimizer_state_shardings_follow_params_with_frozen_entries():
    mesh = parallel.make_mesh((2, 2, 2))
    params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((4, 8))}}
    param_sh = {"a": {"kernel": NamedSharding(mesh, PartitionSpec("fsdp", None))},
                "b": {"kernel": NamedSharding(mesh, PartitionSpec(None, "tensor"))}}
    for trainable in ((), ("^b/",)):
        tx, _ = optim.make_optimizer(adam_config(), params, trainable=trainable)
        abstract = jax.eval_shape(tx.init, params)
        shardings = loop.optimizer_state_shardings(abstract, param_sh, mesh)
        flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
        by_shape = {}
        for path, sh in flat:
            by_shape.setdefault(len(sh.spec), []).append(("/".join(str(k) for k in path), sh.spec))
        moments = [(p, s) for p, s in (x for v in by_shape.values() for x in v) if "mu" in p or "nu" in p]
        expected = 2 * (2 if not trainable else 1)
        assert len(moments) == expected, moments
        for path, spec in moments:
            want = PartitionSpec("fsdp", None) if "'a'" in path else PartitionSpec(None, "tensor")
            assert spec == want, (path, spec)
        # Everything else (step counts) is replicated; the tree matches the state (it can be a jit out_sharding).
        assert jax.tree.structure(shardings) == jax.tree.structure(abstract)


def test_ema_update():
    ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)


def test_update_metrics_read_trained_parameters_only():
    """l2_grads / l2_params / l2_updates with labels cover the 'train' leaves alone (stage 2's frozen towers
    would otherwise dominate and keep their gradients in the compiled step)."""
    params = {"encoder": {"w": jnp.full((3,), 2.0)}, "decoder": {"w": jnp.full((4,), 1.0, jnp.bfloat16)}}
    grads = {"encoder": {"w": jnp.full((3,), 10.0)}, "decoder": {"w": jnp.full((4,), 0.5, jnp.bfloat16)}}
    labels = optim.path_labels(params, trainable=("^decoder/",))
    metrics = optim.update_metrics("", grads, params, grads, labels)
    np.testing.assert_allclose(float(metrics["l2_grads"]), 1.0)  # sqrt(4 * 0.25)
    np.testing.assert_allclose(float(metrics["l2_params"]), 2.0)
    everything = optim.update_metrics("", grads, params, grads)
    np.testing.assert_allclose(float(everything["l2_grads"]), np.sqrt(300 + 1.0), rtol=1e-6)
    assert float(optim.l2_norm({})) == 0.0


def test_cosine_schedule_with_warmup_and_bad_settings():
    sched = optim.learning_rate_schedule(adam_config(schedule="cosine", warmup_steps=10, decay_steps=110,
                                                     min_lr_ratio=0.1))
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(sched(110)) == pytest.approx(1e-4, rel=1e-5)
    with pytest.raises(ValueError, match="decay_steps"):
        optim.learning_rate_schedule(adam_config(schedule="cosine", warmup_steps=10, decay_steps=5))
    # No longer than its warmup: the warmup, then the final rate (lr x min_lr_ratio).
    short = optim.learning_rate_schedule(adam_config(schedule="cosine", warmup_steps=10, decay_steps=10,
                                                     min_lr_ratio=0.1))
    assert float(short(5)) == pytest.approx(5e-4) and float(short(10)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate_schedule(adam_config(schedule="linear"))


def test_regexes_that_freeze_everything_are_a_config_error():
    params = {"projector": {"fc1": {"kernel": jnp.zeros((2, 2))}}, "llm": {"w": jnp.zeros((3,))}}
    with pytest.raises(UserError, match=r"trainable=\('\^vision/',\) / frozen=\(\) leave no parameter"):
        optim.path_labels(params, trainable=("^vision/",))
    labels = optim.path_labels(params, frozen=("^llm/",))
    assert labels == {"projector": {"fc1": {"kernel": "train"}}, "llm": {"w": "freeze"}}
