"""TokenFlow composed: shapes, gradients through the straight-through estimator, decode paths, sharding
on the (2, 2, 2) mesh, and parameter counts of the full-size variants against the official module's
(ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/vq_model.py``)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax import parallel, prng
from tokenflow_jax.models import tokenizer


@pytest.fixture(scope="module")
def tiny():
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    model = tokenizer.build(config)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
    variables = nn.unbox(jax.jit(model.init)(prng.make_key(0), x))
    return config, model, variables, x


def test_tiny_shapes_and_dtypes(tiny):
    config, model, variables, x = tiny
    features, aux, indices = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    assert features.shape == (4, 8, 8, 40) and features.dtype == jnp.float32
    assert indices.shape == (4, 1 + 4 + 16 + 36 + 64) and indices.dtype == jnp.int32
    assert 0 <= int(indices.min()) and int(indices.max()) < config.quantizer.codebook_size
    assert aux.semantic_latent.shape == (4, 8, 8, 32) and aux.pixel_latent.shape == (4, 8, 8, 8)
    semantic, image = jax.jit(lambda v, f: model.apply(v, f, method="decode"))(variables, features)
    assert semantic.shape == (4, 64, config.model.semantic_out_dim) and image.shape == (4, 64, 64, 3)
    assert np.isfinite(np.asarray(image)).all()


def test_bad_image_shape_is_a_clear_error(tiny):
    _, model, variables, _ = tiny
    with pytest.raises(ValueError, match=r"expects images \[B, 64, 64, 3\]"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)), method="encode")


def test_decode_code_equals_decode_of_features_in_eval(tiny):
    _, model, variables, x = tiny
    features, _, indices = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    sem_a, img_a = jax.jit(lambda v, f: model.apply(v, f, method="decode"))(variables, features)
    decode_code = jax.jit(lambda v, i: model.apply(v, i, method="decode_code"))
    sem_b, img_b = decode_code(variables, indices)
    np.testing.assert_allclose(np.asarray(img_b), np.asarray(img_a), atol=1e-4)
    np.testing.assert_allclose(np.asarray(sem_b), np.asarray(sem_a), atol=1e-4)
    # A prefix of the scales decodes too (coarser image).
    _, coarse = decode_code(variables, indices[:, :21])
    assert coarse.shape == img_a.shape and not np.allclose(np.asarray(coarse), np.asarray(img_a))


def test_straight_through_gradient_reaches_both_encoders(tiny):
    config, model, variables, x = tiny
    probe = jax.random.normal(prng.make_key(1), (4, 64, 64, 3))

    def loss(params):
        semantic, image, _, aux, _ = model.apply(
            {**variables, "params": params}, x, train=True, rngs={"quantizer": prng.make_key(2)},
            mutable=["quantizer"],
        )[0]
        return jnp.sum(image * probe) + jnp.mean(semantic**2) + aux.quantizer["commit_loss"] + aux.quantizer["vq_loss"]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    norm = lambda tree: float(sum(np.sum(np.square(g)) for g in jax.tree.leaves(tree)) ** 0.5)  # noqa: E731
    for name in ("semantic_encoder", "encode_task_layer", "pixel_encoder", "quant_conv", "quantizer",
                 "semantic_decoder", "pixel_decoder"):
        assert norm(grads[name]) > 0, f"no gradient reaches {name}"


def test_sharded_encode_decode_on_mesh_matches_single_device(tiny, mesh222):
    config, model, variables, x = tiny
    encode_decode = lambda v, x: (lambda r: (r.semantic, r.image, r.indices))(model.apply(v, x))  # noqa: E731
    ref_sem, ref_img, ref_idx = jax.jit(encode_decode)(variables, x)
    with jax.set_mesh(mesh222), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        abstract = jax.eval_shape(model.init, prng.make_key(0), x)
        shardings = parallel.shardings_from_abstract(abstract, mesh222)
        parallel.check_replication(parallel.unbox_without_constraints(abstract)["params"], shardings["params"],
                                   mesh222)
        kernel = shardings["params"]["pixel_encoder"]["conv_blocks_1"]["res_0"]["conv1"]["kernel"]
        assert kernel.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
        q = shardings["params"]["semantic_encoder"]["blocks"]["attn"]["q_proj"]["kernel"]
        assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        v_sharded = jax.device_put(variables, shardings)
        x_sharded = jax.device_put(x, parallel.data_sharding(mesh222, 4))
        sem, img, idx = jax.jit(encode_decode)(v_sharded, x_sharded)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(img), np.asarray(ref_img), atol=1e-4)
    np.testing.assert_allclose(np.asarray(sem), np.asarray(ref_sem), atol=1e-4)


def _param_counts(spec):
    config = config_lib.load_config(f"configs/tokenizer.py:{spec}")
    model = tokenizer.build(config)
    size = config.model.image_size
    abstract = jax.eval_shape(model.init, prng.make_key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    params = nn.unbox(abstract)["params"]
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))  # noqa: E731
    return {name: count(tree) / 1e6 for name, tree in params.items()}


def test_full_size_parameter_counts_match_the_reference():
    """Millions of parameters per component of the official ``TokenFlow`` module (SigLIP: 27-layer 428.23M minus
    what is unused)."""
    b = _param_counts("b,res=256,enhanced")
    assert round(b["pixel_encoder"], 2) == 29.30 and round(b["pixel_decoder"], 2) == 237.12
    assert round(b["semantic_encoder"], 2) == 85.80 and round(b["semantic_decoder"], 2) == 21.44
    assert round(b["encode_task_layer"] + b["decode_task_layer"], 2) == 1.60
    assert round(b["quantizer"], 2) == 1.31  # 32768 x 40; the reference's 1.44M adds a 131,072 usage buffer
    xl = _param_counts("xl")
    assert round(xl["pixel_encoder"], 2) == 29.30 and round(xl["pixel_decoder"], 2) == 42.45
    assert round(xl["semantic_decoder"], 2) == 48.70
    # Counted exactly rather than to two decimals: Linear(1152,1152)+Linear(1152,32) and
    # Linear(1152,1152)+Linear(1152,1152) with biases is 4,021,664.
    assert round((xl["encode_task_layer"] + xl["decode_task_layer"]) * 1e6) == 4_021_664
    # so400m with all 27 layers, post-LN and the attention-pooling head is 428.23M; we build 26 layers.
    layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    head = 1152 + 3 * 1152 * 1152 + 3 * 1152 + 1152 * 1152 + 1152 + 2 * 1152 + 2 * 1152 * 4304 + 4304 + 1152
    assert abs(xl["semantic_encoder"] - (428.23e6 - layer - 2 * 1152 - head) / 1e6) < 0.01
