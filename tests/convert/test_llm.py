"""HF Llama / Qwen2 / Qwen3 checkpoints -> Transformer: logit parity, strictness, sharded loading, vocab extension."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.numerics import rel_err
from tokenflow_jax import parallel
from tokenflow_jax.convert import llm, sources
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.models.llm_layers import positions_from_padding
from tokenflow_jax.models.transformer import Transformer, abstract_variables

MAX_REL_ERR = 1e-4  # max|ours - HF| / max|HF| over non-padding positions, float32 logits on CPU
DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)



def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF inits norms to 1, biases to 0 and weights at std 0.02: redraw so that every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_((0.5 if "embed" in name else 0.15) * noise)
    return model.eval()


def _build(kind: str, seed: int):
    if kind == "llama":  # untied, 3 layers, non-default theta
        return LlamaForCausalLM(LlamaConfig(**DIMS, num_hidden_layers=3, rope_theta=500.0, rms_norm_eps=1e-5))
    if kind == "llama_bias":  # attention_bias: q/k/v and o biases
        return LlamaForCausalLM(LlamaConfig(**DIMS, num_hidden_layers=2, attention_bias=True))
    if kind == "llama_tied":
        return LlamaForCausalLM(LlamaConfig(**DIMS, num_hidden_layers=2, tie_word_embeddings=True))
    if kind == "qwen2":  # q/k/v biases, tied
        return Qwen2ForCausalLM(Qwen2Config(**DIMS, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1e6))
    if kind == "qwen3":  # QK-norm before RoPE, head_dim 24 != 64 / 4
        return Qwen3ForCausalLM(Qwen3Config(**DIMS, num_hidden_layers=2, head_dim=24))
    raise ValueError(kind)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (saved directory, HF model)."""
    out = {}
    for seed, kind in enumerate(("llama", "llama_bias", "llama_tied", "qwen2", "qwen3")):
        torch.manual_seed(seed)
        model = _randomise(_build(kind, seed), seed)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (str(path), model)
    return out


def _left_padded_batch(seed=0, length=11, pad=4, batch=2):
    ids = np.random.default_rng(seed).integers(0, DIMS["vocab_size"], (batch, length))
    attention_mask = np.ones((batch, length), np.int64)
    attention_mask[1::2, :pad] = 0  # odd rows left-padded
    return ids, attention_mask


def _hf_logits(model, ids, attention_mask):
    # Position ids as HF's generate computes them from the mask (pads of a left-padded row start at 0).
    positions = np.asarray(positions_from_padding(attention_mask))
    with torch.no_grad():
        out = model(
            torch.tensor(ids), attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


_forward = jax.jit(
    lambda params, cfg_ids, positions, mask, cfg: Transformer(cfg).apply(
        {"params": params}, cfg_ids, positions=positions, mask=mask
    ),
    static_argnums=4,
)


def _our_logits(config, params, ids, attention_mask):
    return np.asarray(_forward(params, ids, positions_from_padding(attention_mask), attention_mask, config))


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "llama_tied", "qwen2", "qwen3"])
def test_logits_match_hf_with_left_padding(checkpoints, kind):
    path, model = checkpoints[kind]
    config, params = llm.load(path)
    assert config.tie_embeddings == (kind in ("llama_tied", "qwen2"))
    assert config.qkv_bias == (kind in ("qwen2", "llama_bias")) and config.o_bias == (kind == "llama_bias")
    assert config.qk_norm == (kind == "qwen3")
    assert ("lm_head" in params) != config.tie_embeddings
    ids, attention_mask = _left_padded_batch()
    ref = _hf_logits(model, ids, attention_mask)
    keep = attention_mask.astype(bool)
    assert rel_err(_our_logits(config, params, ids, attention_mask), ref, keep) < MAX_REL_ERR


def test_sharded_safetensors_and_pytorch_bin(checkpoints, tmp_path):
    path, model = checkpoints["llama"]
    _, reference = llm.load(path)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    files = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(path, "config.json"), binary / "config.json")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for directory in (sharded, binary):
        _, params = llm.load(str(directory))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)


def test_bfloat16_checkpoint_and_parameters(tmp_path):
    """bf16 safetensors (numpy cannot represent them; read through the memory map) into bf16 or f32 params."""
    model = _randomise(_build("qwen2", 0), 0).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config, params = llm.load(str(tmp_path), param_dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    q = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1], np.float32)  # [D, H, Dh]
    np.testing.assert_array_equal(q, state["model.layers.1.self_attn.q_proj.weight"].T.reshape(64, 4, 16))
    _, params32 = llm.load(str(tmp_path))
    np.testing.assert_array_equal(params32["embed_tokens"]["embedding"], state["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------------------
# Strictness


def test_renamed_missing_and_misshapen_keys_are_all_named(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    state = load_file(os.path.join(path, "model.safetensors"))
    state["model.layers.1.mlp.upproj.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
    del state["model.norm.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:16]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ConversionError) as e:
        llm.load(str(tmp_path))
    message = str(e.value)
    for expected in (
        "missing keys (2)",
        "model.layers.1.mlp.up_proj.weight",
        "model.norm.weight",
        "unexpected keys (1)",
        "model.layers.1.mlp.upproj.weight (96, 64)",
        "shape mismatches (1)",
        "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (16, 64)",
        str(tmp_path),
    ):
        assert expected in message, (expected, message)
    # The pure entry point is equally strict; ``ignore`` and ``key_map`` are the ways out.
    with pytest.raises(ConversionError, match="upproj"):
        llm.convert(state, llm.config_from_hf(json.load(open(tmp_path / "config.json"))))


def test_key_map_and_ignore(checkpoints, tmp_path):
    path, model = checkpoints["qwen3"]
    state = load_file(os.path.join(path, "model.safetensors"))
    # TokenFlow-t2i's naming of the QK norms, plus a projector that belongs to another converter.
    renamed = {k.replace("self_attn.q_norm", "self_attn.qknorm.query_norm"): v for k, v in state.items()}
    renamed["model.mm_projector.0.weight"] = np.zeros((64, 40), np.float32)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ConversionError, match="qknorm"):
        llm.load(str(tmp_path))
    config, params = llm.load(
        str(tmp_path),
        key_map=lambda k: k.replace("self_attn.qknorm.query_norm", "self_attn.q_norm"),
        ignore=[r"^model\.mm_projector\."],
    )
    ids, attention_mask = _left_padded_batch(seed=1)
    ref = _hf_logits(model, ids, attention_mask)
    assert rel_err(_our_logits(config, params, ids, attention_mask), ref, attention_mask.astype(bool)) < MAX_REL_ERR


def test_config_from_hf_and_its_refusals():
    llama2 = {  # meta-llama/Llama-2-7b-hf config.json (older transformers layout)
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 32000, "hidden_act": "silu",
        "max_position_embeddings": 4096, "attention_bias": False,
    }
    cfg = llm.config_from_hf(llama2, qk_norm=True, vocab_size=32000 + 32769)
    assert (cfg.width, cfg.head_dim, cfg.num_kv_heads, cfg.norm_eps, cfg.qkv_bias) == (4096, 128, 32, 1e-5, False)
    assert cfg.qk_norm and cfg.qk_norm_eps == 1e-6 and cfg.vocab_size == 64769
    qwen25 = {  # Qwen/Qwen2.5-14B-Instruct
        "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 70,
        "tie_word_embeddings": False, "vocab_size": 152064, "hidden_act": "silu", "max_position_embeddings": 32768,
    }
    cfg = llm.config_from_hf(qwen25)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias, cfg.head_dim) == (8, 1e6, True, False, 128)
    assert llm.config_from_hf(LlamaConfig(**DIMS, num_hidden_layers=2, rope_theta=321.0)).rope_theta == 321.0

    llama3 = dict(llama2, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rope_scaling type 'llama3'"):
        llm.config_from_hf(llama3)
    new_style = dict(llama2, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_parameters.rope_type 'yarn'"):
        llm.config_from_hf(new_style)
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        llm.config_from_hf(dict(qwen25, use_sliding_window=True))
    with pytest.raises(ValueError, match="mlp_bias=True"):
        llm.config_from_hf(dict(llama2, mlp_bias=True))
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        llm.config_from_hf(dict(llama2, model_type="gemma"))


def test_offline_hub_id_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network from a test
    with pytest.raises(sources.WeightsNotFoundError, match="no-such-org/no-such-llm"):
        llm.load("no-such-org/no-such-llm")


# ----------------------------------------------------------------------------------------------------------
# Sharded loading


class _Recording:
    """An array-like that records the size of every slice read from it."""

    def __init__(self, array):
        self.array, self.reads, self.shape = array, [], array.shape

    def __getitem__(self, index):
        block = self.array[index]
        self.reads.append(block.size)
        return block


def test_sharded_load_on_mesh222(checkpoints, mesh222):
    path, model = checkpoints["llama"]
    config, reference = llm.load(path)
    _, params = llm.load(path, mesh=mesh222)
    expected = parallel.shardings_from_abstract(abstract_variables(config), mesh222)["params"]
    for (where, leaf), want, ref in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected), jax.tree.leaves(reference)
    ):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (jax.tree_util.keystr(where), leaf.sharding, want)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=jax.tree_util.keystr(where))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, D, H, Dh]: D over fsdp, H over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert params["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")

    # Each device block is read on its own: every matrix is split over fsdp x tensor, so no read of one
    # covers more than a quarter of it (the 1-D norms are replicated and read whole).
    state = {k: _Recording(v) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    llm.convert(state, config, mesh=mesh222)
    for key, tensor in state.items():
        assert tensor.reads, key
        assert max(tensor.reads) <= tensor.array.size // (4 if tensor.array.ndim == 2 else 1), (key, tensor.reads)

    # The sharded parameters run and give HF's logits.
    ids, attention_mask = _left_padded_batch(seed=2, batch=4)  # batch over data x fsdp
    with jax.set_mesh(mesh222):
        logits = _sharded_forward(config, params, ids, attention_mask, mesh222)
    ref = _hf_logits(model, ids, attention_mask)
    assert rel_err(logits, ref, attention_mask.astype(bool)) < MAX_REL_ERR


def _sharded_forward(config, params, ids, attention_mask, mesh):
    batch_sharding = parallel.data_sharding(mesh, 2)
    inputs = [jax.device_put(np.asarray(a), batch_sharding) for a in (ids, positions_from_padding(attention_mask),
                                                                       attention_mask)]
    with nn.logical_axis_rules(parallel.DEFAULT_RULES):
        out = jax.jit(lambda p, i, pos, m: Transformer(config).apply({"params": p}, i, positions=pos, mask=m))(
            params, *inputs
        )
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------------------
# Vocabulary extension


def test_vocab_extension_keeps_old_rows(checkpoints, mesh222):
    path, model = checkpoints["llama"]
    _, base = llm.load(path)
    old = 128
    config, params = llm.load(path, vocab_size=old + 6)  # 'mean' rows
    embedding, head = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    assert embedding.shape == (old + 6, 64) and head.shape == (64, old + 6)
    np.testing.assert_array_equal(embedding[:old], base["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(head[:, :old], base["lm_head"]["kernel"])
    np.testing.assert_allclose(embedding[old:], np.broadcast_to(embedding[:old].mean(0), (6, 64)), atol=1e-6)
    np.testing.assert_allclose(head[:, old:], np.broadcast_to(head[:, :old].mean(1)[:, None], (64, 6)), atol=1e-6)
    # Old tokens' logits are untouched; a new token scores like the average old one.
    ids, attention_mask = _left_padded_batch(seed=3)
    logits = _our_logits(config, params, ids, attention_mask)
    ref = _hf_logits(model, ids, attention_mask)
    keep = attention_mask.astype(bool)
    assert rel_err(logits[..., :old], ref, keep) < MAX_REL_ERR
    np.testing.assert_allclose(logits[..., old][keep], ref.mean(-1)[keep], rtol=1e-4, atol=1e-4)

    # 'normal' rows: N(0, 0.02), seeded per row, so a sharded load gives the very same values.
    _, normal = llm.load(path, vocab_size=old + 6, new_rows="normal", seed=1)
    _, normal_sharded = llm.load(path, vocab_size=old + 6, new_rows="normal", seed=1, mesh=mesh222)
    new_rows = np.asarray(normal["embed_tokens"]["embedding"])[old:]
    assert 0.01 < new_rows.std() < 0.03 and len(np.unique(new_rows[:, 0])) == 6
    np.testing.assert_array_equal(np.asarray(normal["embed_tokens"]["embedding"])[:old], embedding[:old])
    for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(normal_sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="extended, not shrunk"):
        llm.load(path, vocab_size=old - 1)
