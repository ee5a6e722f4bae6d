"""Official TokenFlow state dicts <-> our variables: exact round trips, strict errors, files, a converted model runs.

Reduced-size copies of ``b,res=256,enhanced`` and ``xl`` keep every structural feature (interpolated position
tables, fused q/k/v, BEiT q/v biases, nin shortcuts, CNN attention, the XL 126 -> 144 pixel branch and its unused
SigLIP layer / head / scaling layer) with small widths, depth-2 ViTs and a 64-entry codebook. No checkpoint is
downloaded; random weights come from numpy with shapes from ``jax.eval_shape``.
"""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenflow_jax import config as config_lib
from tokenflow_jax.convert import official
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.models import quantizer as quantizer_lib
from tokenflow_jax.models import tokenizer


def _reduced(variant: str, **quantizer):
    """Small-width copy of a released variant with the same module structure."""
    if variant == "b":
        config = config_lib.load_config("configs/tokenizer.py:b,res=256,enhanced")
        m = config.model
        m.image_size = 128  # 8x8 grid from a 6x6 position table: the interpolation path of res=256
        m.semantic_encoder.update(width=64, depth=2, num_heads=4, mlp_dim=128, pos_grid=6)
        m.semantic_decoder.update(width=64, depth=2, num_heads=4, mlp_dim=128, pos_grid=6)
        m.pixel_encoder.update(ch=32, num_res_blocks=1, z_channels=32)
        m.pixel_decoder.update(ch=64, num_res_blocks=2, z_channels=32)  # "enhanced": wider, deeper decoder
        m.semantic_out_dim = 48
        config.quantizer.scales = (1, 2, 4, 6, 8)
    else:
        config = config_lib.load_config("configs/tokenizer.py:xl")
        m = config.model
        m.image_size, m.pixel_resolution = 126, 144  # 9x9 grid; pixel branch bicubic 126 -> 144
        m.semantic_encoder.update(width=64, depth=2, num_heads=4, mlp_dim=96, pos_grid=9)
        m.semantic_decoder.update(width=64, depth=2, num_heads=4, mlp_dim=128, pos_grid=9)
        m.pixel_encoder.update(ch=32, num_res_blocks=1, z_channels=32)
        m.pixel_decoder.update(ch=32, num_res_blocks=1, z_channels=32)
        m.semantic_out_dim = 64
        config.quantizer.scales = (1, 2, 3, 5, 7, 9)
    config.quantizer.codebook_size = 64
    config.quantizer.update(quantizer)
    return config


def _random_variables(config, seed=0, scale=1.0):
    """Random float leaves in our layout (numpy), ``code_age`` as the model initialises it."""
    rng = np.random.default_rng(seed)
    abstract = official.abstract_variables(config)

    def leaf(path, s):
        if path[-1].key == "code_age":
            return np.full(s.shape, quantizer_lib.NEVER_USED, np.int32)
        return (scale * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _random_official(config, seed=0, scale=1.0):
    """Random official state dict (every key, including the ones the model does not use)."""
    rng = np.random.default_rng(seed)
    shapes = official.official_key_shapes(config)
    sd = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    if "scaling_layer.shift" in sd:  # constants the converter checks
        sd["scaling_layer.shift"][:] = 0.5
        sd["scaling_layer.scale"][:] = 0.5
    return sd


def _assert_trees_equal(a, b):
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for path, x in flat_a.items():
        y = flat_b[path]
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


VARIANTS = ["b", "xl"]


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param, _reduced(request.param)


# ----------------------------------------------------------------------------------------------------------
# Key layout


def test_full_size_key_layout_matches_the_reference():
    """Key counts and parameter totals of the released checkpoints (one float32 state dict each, hence 1.51 GB and
    2.22 GB on the hub) and names/shapes of the official ``TokenFlow`` module (``tokenflow/tokenizer/vq_model.py``)."""
    b = official.official_key_shapes(config_lib.load_config("configs/tokenizer.py:b,res=256,enhanced"))
    xl = official.official_key_shapes(config_lib.load_config("configs/tokenizer.py:xl"))
    assert (len(b), len(xl)) == (649, 848)
    assert sum(int(np.prod(s)) for s in b.values()) == 376_700_715  # 1.51 GB in float32
    assert sum(int(np.prod(s)) for s in xl.values()) == 554_141_041  # 2.22 GB
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.4.res.0.conv1.weight": (512, 256, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (1024, 256, 3, 3),
        "decoder.conv_blocks.0.attn.4.norm.weight": (1024,),
        "decoder.conv_blocks.0.upsample.conv.weight": (1024, 1024, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (512, 1024, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_out.weight": (3, 256, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder_vqkd.positional_embedding": (197, 768),
        "encoder_vqkd.conv1.weight": (768, 3, 16, 16),
        "encoder_vqkd.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "encoder_vqkd.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
        "decoder_vqkd.cls_token": (1, 1, 768),
        "decoder_vqkd.pos_embed": (1, 197, 768),
        "decoder_vqkd.patch_embed.proj.weight": (768, 32, 1, 1),
        "decoder_vqkd.blocks.2.attn.qkv.weight": (2304, 768),
        "decoder_vqkd.blocks.2.attn.q_bias": (768,),
        "encode_task_layer.2.weight": (32, 768),
        "decode_task_layer.2.weight": (512, 768),
        "quantize.codebook_used": (131072,),
        "quantize.embedding_vqkd.weight": (32768, 32),
        "quantize.embedding_vqgan.weight": (32768, 8),
    }.items():
        assert b[key] == shape, key
    assert not any(k.startswith(("scaling_layer.", "encoder_vqkd.proj", "decoder_vqkd.norm.", "decoder_vqkd.head"))
                   for k in b)
    assert not any(k.endswith("attn.qkv.bias") for k in b)
    sig = "encoder_vqkd.vision_model."
    for key, shape in {
        sig + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        sig + "embeddings.position_embedding.weight": (729, 1152),
        sig + "encoder.layers.26.mlp.fc1.weight": (4304, 1152),
        sig + "head.attention.in_proj_weight": (3456, 1152),
        sig + "post_layernorm.weight": (1152,),
        "decoder_vqkd.pos_embed": (1, 730, 1152),
        "decode_task_layer.2.weight": (1152, 1152),
        "scaling_layer.shift": (1, 3, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
    }.items():
        assert xl[key] == shape, key
    assert not any(".layers.27." in k for k in xl)


# ----------------------------------------------------------------------------------------------------------
# Exact round trips


def test_ours_to_official_to_ours_is_exact(variant, caplog):
    name, config = variant
    ours = _random_variables(config, seed=1)
    with caplog.at_level(logging.WARNING, logger=official.logger.name):
        sd = official.variables_to_official(ours, config)
    assert "filled" in caplog.text and "quantize.codebook_used" in caplog.text
    assert {k: v.shape for k, v in sd.items()} == official.official_key_shapes(config)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    assert not sd["quantize.codebook_used"].any()
    if name == "xl":
        assert set(np.unique(sd["scaling_layer.scale"])) == {0.5}
        assert not sd["encoder_vqkd.vision_model.encoder.layers.2.self_attn.q_proj.weight"].any()
        assert not sd["encoder_vqkd.vision_model.head.mlp.fc2.weight"].any()
    _assert_trees_equal(official.official_to_variables(sd, config), ours)


def test_official_to_ours_to_official_is_exact(variant):
    name, config = variant
    sd = _random_official(config, seed=2)
    ours = official.official_to_variables(sd, config)
    back = official.variables_to_official(ours, config)
    assert back.keys() == sd.keys()
    unused = {"quantize.codebook_used"} | {
        k for k in sd if re.search(r"layers\.2\.|post_layernorm|\.head\.", k) and "vision_model" in k
    }
    for key, value in sd.items():
        if key in unused:
            assert not back[key].any(), key
        else:
            assert np.array_equal(back[key], value), key
    assert (len(unused) > 1) == (name == "xl")


def test_layouts_follow_torch_semantics():
    """Values land where the PyTorch modules read them (independent of the round trip's symmetry)."""
    config = _reduced("b")
    sd = _random_official(config, seed=3)
    p = official.official_to_variables(sd, config)["params"]
    d = config.model.semantic_encoder.width
    # nn.MultiheadAttention in_proj rows are q, k, v; Linear [out, in] -> [in, out]; layer i -> index i
    w = sd["encoder_vqkd.transformer.resblocks.1.attn.in_proj_weight"]
    assert np.array_equal(p["semantic_encoder"]["blocks"]["attn"]["k_proj"]["kernel"][1], w[d:2 * d].T)
    bias = sd["encoder_vqkd.transformer.resblocks.0.attn.in_proj_bias"]
    assert np.array_equal(p["semantic_encoder"]["blocks"]["attn"]["v_proj"]["bias"][0], bias[2 * d:])
    # BEiT: q/v biases, fused qkv weight, [1, G, D] position table
    dec = p["semantic_decoder"]
    assert np.array_equal(dec["blocks"]["attn"]["q_proj"]["bias"][1], sd["decoder_vqkd.blocks.1.attn.q_bias"])
    assert "bias" not in dec["blocks"]["attn"]["k_proj"]
    assert np.array_equal(dec["pos_embed"], sd["decoder_vqkd.pos_embed"][0])
    # A Conv2d and a 1x1-conv attention projection compute the same thing in both layouts.
    x = np.random.default_rng(0).standard_normal((1, 32, 5, 5)).astype(np.float32)
    conv_w, conv_b = sd["encoder.conv_blocks.1.res.0.conv1.weight"], sd["encoder.conv_blocks.1.res.0.conv1.bias"]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(conv_w), torch.from_numpy(conv_b), padding=1)
    conv = p["pixel_encoder"]["conv_blocks_1"]["res_0"]["conv1"]
    ours = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), conv["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + conv["bias"]
    np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    q = p["pixel_encoder"]["mid_1"]["q"]
    h = np.random.default_rng(1).standard_normal((1, 128, 2, 2)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(h), torch.from_numpy(sd["encoder.mid.1.q.weight"]),
                                     torch.from_numpy(sd["encoder.mid.1.q.bias"]))
    np.testing.assert_allclose(h.transpose(0, 2, 3, 1) @ q["kernel"] + q["bias"], ref.numpy().transpose(0, 2, 3, 1),
                               atol=1e-4)


def test_siglip_keys_with_or_without_vision_model_level():
    config = _reduced("xl")
    sd = _random_official(config, seed=4)
    flat = {k.replace("encoder_vqkd.vision_model.", "encoder_vqkd."): v for k, v in sd.items()}
    _assert_trees_equal(official.official_to_variables(flat, config), official.official_to_variables(sd, config))
    back = official.variables_to_official(official.official_to_variables(flat, config), config,
                                          siglip_prefix="encoder_vqkd.", siglip_layers=5)
    assert not any("vision_model" in k for k in back)
    assert "encoder_vqkd.encoder.layers.4.mlp.fc2.bias" in back
    assert "encoder_vqkd.encoder.layers.5.mlp.fc2.bias" not in back


def test_ema_codebooks_live_in_the_quantizer_collection():
    config = _reduced("b", codebook_update="ema")
    sd = _random_official(config, seed=5)
    variables = official.official_to_variables(sd, config)
    assert "quantizer" not in variables["params"]
    q = variables["quantizer"]["quantizer"]
    assert np.array_equal(q["codebook_semantic"], sd["quantize.embedding_vqkd.weight"])
    assert np.array_equal(q["codebook_pixel"], sd["quantize.embedding_vqgan.weight"])
    assert np.array_equal(q["ema_count"], np.ones(64, np.float32))
    assert np.array_equal(q["ema_sum_semantic"], q["codebook_semantic"])
    assert np.array_equal(q["ema_sum_pixel"], q["codebook_pixel"])
    assert np.all(q["code_age"] == quantizer_lib.NEVER_USED) and q["code_age"].dtype == np.int32
    back = official.variables_to_official(variables, config)
    assert np.array_equal(back["quantize.embedding_vqgan.weight"], sd["quantize.embedding_vqgan.weight"])


# ----------------------------------------------------------------------------------------------------------
# Strictness


def test_one_error_lists_every_problem():
    config = _reduced("b")
    sd = _random_official(config, seed=6)
    sd["decoder.conv_inn.weight"] = sd.pop("decoder.conv_in.weight")  # renamed
    del sd["quant_conv.bias"]  # missing
    sd["decoder_vqkd.blocks.1.attn.qkv.weight"] = np.zeros((190, 64), np.float32)  # wrong shape
    with pytest.raises(ConversionError) as info:
        official.official_to_variables(sd, config)
    msg = str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "4 problems" in msg, msg
    assert "decoder.conv_in.weight: expected shape (256, 32, 3, 3)" in msg
    assert "decoder.conv_inn.weight: found shape (256, 32, 3, 3) (did you mean decoder.conv_in.weight?)" in msg
    assert "quant_conv.bias: expected shape (8,)" in msg
    assert "decoder_vqkd.blocks.1.attn.qkv.weight: expected shape (192, 64), found (190, 64)" in msg
    assert "tokenizer.py:b,res=256,enhanced" in msg


def test_unused_tensors_are_logged_or_rejected(caplog):
    xl = _reduced("xl")
    sd = _random_official(xl, seed=7)
    with caplog.at_level(logging.INFO, logger=official.logger.name):
        official.official_to_variables(sd, xl)
    assert "ignored" in caplog.text and "encoder_vqkd.vision_model.encoder.layers.2." in caplog.text
    assert "quantize.codebook_used" in caplog.text and "scaling_layer.shift" in caplog.text
    # absent unused tensors are fine too
    official.official_to_variables({k: v for k, v in sd.items() if "head." not in k and "codebook_used" not in k}, xl)
    sd["scaling_layer.scale"] = np.full((1, 3, 1, 1), 0.25, np.float32)
    with pytest.raises(ConversionError, match=r"scaling_layer.scale: holds \[0.25, 0.25, 0.25\]"):
        official.official_to_variables(sd, xl)
    b = _reduced("b")
    sd = _random_official(b, seed=8)
    sd["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)  # clipb_224 has no scaling layer
    sd["encoder_vqkd.transformer.resblocks.2.ln_1.weight"] = np.zeros(64, np.float32)  # more layers than depth
    with pytest.raises(ConversionError) as info:
        official.official_to_variables(sd, b)
    assert "unexpected keys (2)" in str(info.value)


def test_variables_tree_is_checked_before_export():
    config = _reduced("b")
    ours = _random_variables(config)
    del ours["params"]["quant_conv"]["bias"]
    ours["params"]["semantic_encoder"]["pos_embed"] = np.zeros((10, 64), np.float32)
    with pytest.raises(ConversionError) as info:
        official.variables_to_official(ours, config)
    msg = str(info.value)
    assert "params/quant_conv/bias: missing" in msg
    assert "params/semantic_encoder/pos_embed: expected shape (37, 64), found (10, 64)" in msg


# ----------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, suffix):
    config = _reduced("xl")
    sd = official.variables_to_official(_random_variables(config, seed=9), config)
    path = tmp_path / f"tokenflow{suffix}"
    official.save_official(sd, path)
    loaded = official.load_official_state_dict(path)
    assert loaded.keys() == sd.keys()
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in sd.items())
    if suffix == ".pt":
        assert set(torch.load(path, weights_only=True)) == {"model"}


@pytest.mark.parametrize("nesting", ["ema", "model", "state_dict", None])
def test_load_finds_the_state_dict(tmp_path, nesting):
    sd = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    obj = sd if nesting is None else {nesting: sd, "steps": 7, "args": {"lr": 1e-4}}
    if nesting == "model":
        obj["ema"] = None  # absent EMA: fall through to model
    torch.save(obj, tmp_path / "c.pt")
    loaded = official.load_official_state_dict(tmp_path / "c.pt")
    assert loaded["a.weight"].tolist() == [[0, 1, 2], [3, 4, 5]] and loaded["b"].dtype == np.float32
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    assert set(official.load_official_state_dict(tmp_path / "ddp.pt")) == {"a.weight", "b"}


class _NotATensor:
    pass


def test_load_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt.*empty"):
        official.load_official_state_dict(empty)
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        official.load_official_state_dict(text)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable PyTorch checkpoint"):
        official.load_official_state_dict(truncated)
    torch.save({"model": _NotATensor()}, tmp_path / "code.pt")  # would need code to unpickle
    with pytest.raises(ValueError, match=r"code\.pt: .*weights_only=True\) refused it.*Unsupported global"):
        official.load_official_state_dict(tmp_path / "code.pt")
    torch.save({"optimizer": {"lr": 1.0}, "steps": 3}, tmp_path / "nosd.pt")
    with pytest.raises(ValueError, match=r"nosd\.pt: has none of the keys \['ema', 'model', 'state_dict'\]"):
        official.load_official_state_dict(tmp_path / "nosd.pt")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        official.load_official_state_dict(bad_st)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        official.load_official_state_dict(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown checkpoint suffix"):
        official.save_official({}, tmp_path / "x.npz")


# ----------------------------------------------------------------------------------------------------------
# The converted model runs


@pytest.mark.parametrize("name", ["xl", pytest.param("b", marks=pytest.mark.slow)])  # ~11 s of compiling each
def test_converted_model_encodes_and_decodes_under_jit(name):
    config = _reduced(name)
    variables = official.official_to_variables(_random_official(config, seed=10, scale=0.05), config)
    model = tokenizer.build(config)
    size = config.model.image_size
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)), jnp.float32)
    features, aux, indices = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    grid = config.quantizer.scales[-1]
    assert features.shape == (2, grid, grid, 40)
    assert indices.shape == (2, sum(s * s for s in config.quantizer.scales))
    assert 0 <= int(indices.min()) and int(indices.max()) < 64
    semantic, image = jax.jit(lambda v, f: model.apply(v, f, method="decode"))(variables, features)
    assert semantic.shape == (2, grid * grid, config.model.semantic_out_dim) and image.shape == x.shape
    assert np.isfinite(np.asarray(semantic)).all() and np.isfinite(np.asarray(image)).all()
    assert np.asarray(jnp.std(image)) > 0


# ----------------------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["b,res=256,enhanced", "xl"])
def test_full_size_round_trips_are_exact(spec):
    config = config_lib.load_config(f"configs/tokenizer.py:{spec}")
    ours = _random_variables(config, seed=11)
    sd = official.variables_to_official(ours, config)
    _assert_trees_equal(official.official_to_variables(sd, config), ours)
    del ours
    sd2 = _random_official(config, seed=12)
    back = official.variables_to_official(official.official_to_variables(sd2, config), config)
    held = official.official_key_shapes(config, include_unused=False)
    assert back.keys() == sd2.keys()
    assert all(np.array_equal(back[k], sd2[k]) for k in held)
    assert all(not back[k].any() for k in sd2 if k not in held and not k.startswith("scaling_layer."))
