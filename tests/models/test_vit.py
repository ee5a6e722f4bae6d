"""VisionTransformer (clip / siglip / beit flavours) against tiny random HF towers, and the HF converters."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from transformers import (
    BeitConfig,
    BeitModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.numerics import rel_err
from tokenflow_jax import parallel
from tokenflow_jax.convert import hf
from tokenflow_jax.models.vit import VisionTransformer, ViTConfig

MAX_REL_ERR = 1e-5  # max|ours - torch| / max|torch|, float32 on CPU
BATCH = 4
DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)



def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF inits LayerNorms to (1, 0), biases and BEiT tables to 0: perturb all so that each weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight") and p.ndim == 1:  # LayerNorm scales
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise if p.ndim <= 1 or "embed" in name or "token" in name else 0.08 * noise)
    return model.eval()


def _saved_state_dict(model, path) -> dict[str, np.ndarray]:
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def _images(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)  # NCHW


def _run(config: ViTConfig, params, x_nchw: np.ndarray) -> np.ndarray:
    model = VisionTransformer(config)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(
        CLIPVisionModel(CLIPVisionConfig(**DIMS, num_hidden_layers=2, image_size=32, patch_size=8)), seed=0
    )
    sd = _saved_state_dict(model, tmp_path_factory.mktemp("clip"))
    config = hf.vit_config_from_hf(model.config, "clip")
    return model, sd, config, hf.clip_vision_params(sd, config=config)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(
        SiglipVisionModel(SiglipVisionConfig(**DIMS, num_hidden_layers=3, image_size=32, patch_size=8)),
        seed=1,
    )
    return model, _saved_state_dict(model, tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def beit(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BeitConfig(
        **DIMS,
        num_hidden_layers=2,
        image_size=4,
        patch_size=1,
        num_channels=32,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=False,
        layer_scale_init_value=0.0,  # HF: lambda_1 = lambda_2 = 1.0 (no parameters) unless > 0
        use_mean_pooling=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    model = _randomise(BeitModel(cfg), seed=2)
    return model, _saved_state_dict(model, tmp_path_factory.mktemp("beit"))


# ----------------------------------------------------------------------------------------------------------
# Parity with HF


def test_clip_matches_hf(clip):
    model, _, config, params = clip
    assert config == ViTConfig("clip", 64, 2, 4, 128, patch_size=8, pos_grid=4)
    x = _images((BATCH, 3, 32, 32))
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
        # HF's last_hidden_state is *before* post_layernorm (it only normalises the pooled CLS token).
        ref = model.post_layernorm(out.last_hidden_state)[:, 1:].numpy()
    ours = _run(config, params, x)
    assert ours.shape == (BATCH, 16, 64)
    err = rel_err(ours, ref)
    print(f"clip max rel err {err:.2e}")
    assert err <= MAX_REL_ERR


def test_siglip_matches_hf_hidden_states_minus_2(siglip):
    model, sd = siglip
    config = hf.vit_config_from_hf(model.config, "siglip")
    assert config.depth == 2  # num_hidden_layers - 1
    params, ignored = hf.siglip_vision_params(sd, depth=config.depth, config=config, return_ignored=True)
    assert any(k.startswith("encoder.layers.2.") for k in ignored)
    assert any(k.startswith("post_layernorm.") for k in ignored) and any(
        k.startswith("head.") for k in ignored
    )
    assert not any(k.startswith(("encoder.layers.0.", "encoder.layers.1.", "embeddings.")) for k in ignored)
    x = _images((BATCH, 3, 32, 32), seed=2)
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states
    assert len(hidden) == 4  # embeddings + 3 layers
    ours = _run(config, params, x)
    err = rel_err(ours, hidden[-2].numpy())
    print(f"siglip max rel err {err:.2e}")
    assert err <= MAX_REL_ERR


def test_beit_matches_hf(beit):
    model, sd = beit
    config = hf.vit_config_from_hf(model.config, "beit")
    assert config == ViTConfig("beit", 64, 2, 4, 128, patch_size=1, pos_grid=4, in_channels=32)
    params = hf.beit_params(sd, config=config)
    # the transformers-5 in-memory names convert to the same tree
    live = {k: v.numpy() for k, v in model.state_dict().items()}
    jax.tree.map(np.testing.assert_array_equal, hf.beit_params(live, config=config), params)
    x = _images((BATCH, 32, 4, 4), seed=3)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
        # use_mean_pooling: final norm is Identity; the reference's fc_norm = HF pooler.layernorm per patch.
        ref = model.pooler.layernorm(out.last_hidden_state[:, 1:]).numpy()
    err = rel_err(_run(config, params, x), ref)
    print(f"beit max rel err {err:.2e}")
    assert err <= MAX_REL_ERR


def test_reference_layouts_convert_like_hf(clip, beit):
    """OpenAI-CLIP and BEiT-v2 (TokenFlow checkpoint) layouts rebuilt from the HF tensors: equal trees."""
    _, sd, config, params = clip
    oa = {
        "conv1.weight": sd["embeddings.patch_embedding.weight"],
        "class_embedding": sd["embeddings.class_embedding"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "proj": np.zeros((64, 32), np.float32),  # deleted in TokenFlow; ignored if present
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            oa[f"{ours}.{s}"] = sd[f"{theirs}.{s}"]
    for i in range(config.depth):
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            qkv = [sd[f"{h}self_attn.{p}_proj.{s}"] for p in "qkv"]
            oa[f"{o}attn.in_proj_{s}"] = np.concatenate(qkv, axis=0)
            oa[f"{o}attn.out_proj.{s}"] = sd[f"{h}self_attn.out_proj.{s}"]
            oa[f"{o}ln_1.{s}"], oa[f"{o}ln_2.{s}"] = sd[f"{h}layer_norm1.{s}"], sd[f"{h}layer_norm2.{s}"]
            oa[f"{o}mlp.c_fc.{s}"], oa[f"{o}mlp.c_proj.{s}"] = sd[f"{h}mlp.fc1.{s}"], sd[f"{h}mlp.fc2.{s}"]
    prefixed = {"encoder_vqkd." + k: v for k, v in oa.items()}
    converted, ignored = hf.openai_clip_params(
        prefixed, prefix="encoder_vqkd.", config=config, return_ignored=True
    )
    assert ignored == ["encoder_vqkd.proj"]
    jax.tree.map(np.testing.assert_array_equal, converted, params)

    model, bsd = beit
    bconfig = hf.vit_config_from_hf(model.config, "beit")
    v2 = {
        "cls_token": bsd["embeddings.cls_token"],
        "pos_embed": bsd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": bsd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": bsd["embeddings.patch_embeddings.projection.bias"],
        "fc_norm.weight": bsd["pooler.layernorm.weight"],
        "fc_norm.bias": bsd["pooler.layernorm.bias"],
    }
    for i in range(bconfig.depth):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.attention."
        v2[o + "attn.qkv.weight"] = np.concatenate([bsd[f"{a}{p}.weight"] for p in ("query", "key", "value")])
        v2[o + "attn.q_bias"], v2[o + "attn.v_bias"] = bsd[a + "query.bias"], bsd[a + "value.bias"]
        for s in ("weight", "bias"):
            v2[f"{o}attn.proj.{s}"] = bsd[f"{h}attention.output.dense.{s}"]
            v2[f"{o}norm1.{s}"], v2[f"{o}norm2.{s}"] = (
                bsd[f"{h}layernorm_before.{s}"],
                bsd[f"{h}layernorm_after.{s}"],
            )
            v2[f"{o}mlp.fc1.{s}"], v2[f"{o}mlp.fc2.{s}"] = (
                bsd[f"{h}intermediate.dense.{s}"],
                bsd[f"{h}output.dense.{s}"],
            )
    jax.tree.map(np.testing.assert_array_equal, hf.beit_v2_params(v2, config=bconfig), hf.beit_params(bsd))


# ----------------------------------------------------------------------------------------------------------
# Position tables and input checks


def test_clip_position_interpolation_is_wired(clip):
    from tokenflow_jax.ops.resize import interpolate_pos_embed

    _, _, config, params = clip
    x = _images((2, 3, 48, 48), seed=4)  # grid 6 vs pos_grid 4
    native = dataclasses.replace(config, pos_grid=6)
    table = params["pos_embed"]
    resized = np.concatenate([table[:1], np.asarray(interpolate_pos_embed(jnp.asarray(table[1:]), 6))])
    assert resized.shape == (37, 64)
    want = _run(native, {**params, "pos_embed": resized}, x)
    got = _run(config, params, x)
    assert got.shape == (2, 36, 64)
    assert rel_err(got, want) <= 1e-6
    # computed from the stored parameter on every call: gradients reach the 4x4 table
    model = VisionTransformer(config)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, xj) ** 2)))(params)["pos_embed"]
    assert grad.shape == (17, 64) and np.all(np.isfinite(grad)) and np.all(np.abs(grad).sum(-1) > 0)


def test_input_checks(siglip, clip):
    model, sd = siglip
    config = hf.vit_config_from_hf(model.config, "siglip")
    params = hf.siglip_vision_params(sd, depth=config.depth)
    with pytest.raises(ValueError, match=r"patch grid is 5x5 .* 4x4"):
        VisionTransformer(config).apply({"params": params}, jnp.zeros((1, 40, 40, 3)))
    _, _, cconfig, cparams = clip
    with pytest.raises(ValueError, match="square"):
        VisionTransformer(cconfig).apply({"params": cparams}, jnp.zeros((1, 32, 48, 3)))


# ----------------------------------------------------------------------------------------------------------
# Init, logical axes, sharding


def test_beit_init_rescale_per_layer():
    config = ViTConfig("beit", 256, 3, 4, 512, patch_size=1, pos_grid=2, in_channels=8)
    init = jax.jit(VisionTransformer(config).init)
    params = jax.tree.map(np.asarray, nn.unbox(init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))["params"]))
    blocks = params["blocks"]
    for i in range(3):
        want = 0.02 / np.sqrt(2 * (i + 1))
        for kernel in (blocks["attn"]["out_proj"]["kernel"][i], blocks["mlp"]["fc2"]["kernel"][i]):
            assert np.std(kernel) == pytest.approx(want, rel=0.03)
        assert np.std(blocks["attn"]["q_proj"]["kernel"][i]) == pytest.approx(0.02, rel=0.03)
    assert np.std(params["pos_embed"]) == pytest.approx(0.02, rel=0.2)
    assert not np.any(blocks["attn"]["out_proj"]["bias"]) and not np.any(blocks["mlp"]["fc1"]["bias"])
    assert "bias" not in blocks["attn"]["k_proj"]


def test_logical_axis_names(clip):
    _, _, config, _ = clip
    model = VisionTransformer(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    specs = nn.get_partition_spec(abstract)["params"]
    b = specs["blocks"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert b["attn"][proj]["kernel"] == P("layers", "embed", "heads")
        assert b["attn"][proj]["bias"] == P("layers", "heads")
    assert b["attn"]["out_proj"]["kernel"] == P("layers", "heads", "embed")
    assert b["mlp"]["fc1"]["kernel"] == P("layers", "embed", "mlp")
    assert b["mlp"]["fc2"]["kernel"] == P("layers", "mlp", "embed")
    assert b["ln_1"]["scale"] == P("layers", "norm")
    assert specs["patch_embed"]["kernel"] == P(None, None, "conv_in", "embed")
    assert specs["pos_embed"] == P(None, "embed")
    assert specs["cls_token"] == P("embed")
    assert specs["ln_pre"]["scale"] == P("norm") and specs["ln_post"]["bias"] == P("norm")


def test_sharded_matches_unsharded(clip, mesh222):
    _, _, config, params = clip
    config = dataclasses.replace(config, remat=True)
    model = VisionTransformer(config)
    x = jnp.asarray(_images((BATCH, 3, 32, 32), seed=5).transpose(0, 2, 3, 1))
    want = np.asarray(jax.jit(model.apply)({"params": params}, x))
    # shardings are derived outside the rules context: nn.unbox inside it would constrain the abstract leaves
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shardings = parallel.shardings_from_abstract(abstract, mesh222)
    assert shardings["params"]["blocks"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["params"]["blocks"]["mlp"]["fc2"]["kernel"].spec == P(None, "tensor", "fsdp")
    variables = jax.device_put({"params": params}, shardings)
    xs = jax.device_put(x, parallel.data_sharding(mesh222, 4))
    with jax.set_mesh(mesh222), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        got = jax.jit(model.apply)(variables, xs)
    assert rel_err(got, want) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# Strictness


def test_conversion_errors_list_every_problem(clip):
    _, sd, config, _ = clip
    broken = dict(sd)
    del broken["encoder.layers.1.mlp.fc1.bias"]
    broken["embeddings.position_embedding.weight"] = np.zeros((16, 64), np.float32)
    broken["encoder.layers.1.self_attn.v_proj.weight"] = np.zeros((64, 60), np.float32)
    with pytest.raises(hf.ConversionError) as info:
        hf.clip_vision_params(broken, config=config)
    msg = str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    for name in (
        "encoder.layers.1.mlp.fc1.bias",
        "embeddings.position_embedding.weight",
        "encoder.layers.1.self_attn.v_proj.weight",
    ):
        assert name in msg, msg
    assert re.search(r"pos_embed .*expected shape \(17, 64\), found \(16, 64\)", msg), msg
    # the HF vision_model. prefix is optional (transformers 5 drops it); a wrong prefix reports every key
    assert hf.clip_vision_params({"vision_model." + k: v for k, v in sd.items()}, config=config).keys()
    with pytest.raises(KeyError, match="nothing.embeddings.class_embedding"):
        hf.clip_vision_params(sd, prefix="nothing.", config=config)


def test_check_tree_matches(clip):
    _, _, config, params = clip
    abstract = jax.eval_shape(VisionTransformer(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    hf.check_tree_matches(params, abstract)  # boxed, wrapped in {'params': ...}
    bad = {**params, "extra": np.zeros(3), "pos_embed": np.zeros((5, 64))}
    bad = {k: v for k, v in bad.items() if k != "cls_token"}
    with pytest.raises(ValueError) as info:
        hf.check_tree_matches(bad, abstract["params"])
    msg = str(info.value)
    assert "cls_token: missing (expected shape (64,))" in msg
    assert "extra: unexpected (found shape (3,))" in msg
    assert "pos_embed: expected shape (17, 64), found (5, 64)" in msg


def test_vit_config_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="hidden_act"):
        hf.vit_config_from_hf(CLIPVisionConfig(**DIMS, hidden_act="gelu"), "clip")
    with pytest.raises(ValueError, match="use_relative_position_bias"):
        hf.vit_config_from_hf(
            BeitConfig(**DIMS, use_relative_position_bias=True, layer_norm_eps=1e-6), "beit"
        )
