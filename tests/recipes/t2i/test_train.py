"""The t2i trainer: sharded steps that learn, exact resume, caption dropout, HF Llama initialisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.recipes.runs import preempted_copy, read_metrics, restored_params
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import token_shards
from tokenflow_jax.recipes.t2i import train as t2i_trainer
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.train import llm_init

# A smaller decoder than configs/t2i.py:tiny and one device unless a test is about sharding keep
# every compile short; the pipeline is the real one.
SMALL = ["mesh.shape=(1, 1, 1)", "mesh.num_devices=1", "model.llm.width=64", "model.llm.depth=2",
         "model.llm.num_heads=4", "model.llm.num_kv_heads=2", "model.llm.mlp_dim=128", "train.global_batch_size=8",
         "train.log_every=1", "train.checkpoint_every=2", "train.async_checkpoints=False", "optim.warmup_steps=2",
         "data.num_examples=64"]


def small_config(*overrides):
    config = config_lib.load_config("configs/t2i.py:tiny")
    config_lib.apply_overrides(config, SMALL + list(overrides))
    return config


def test_steps_on_the_222_mesh_learn_and_resume_exactly(tmp_path):
    """Online tokenisation (random tiny tokenizer) on the (2, 2, 2) mesh: a run preempted after its step-2
    checkpoint and restarted ends with the uninterrupted run's parameters, bit for bit; the loss falls."""
    mesh = ["mesh.shape=(2, 2, 2)", "mesh.num_devices=0", "train.cond_drop_rate=0.25"]
    full = str(tmp_path / "full")
    t2i_trainer.train(small_config("train.num_steps=4", *mesh), full)
    part = preempted_copy(full, str(tmp_path / "part"), step=2)
    t2i_trainer.train(small_config("train.num_steps=4", *mesh), part)

    a, b = restored_params(full, 4), restored_params(part, 4)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows_full, rows_part = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in rows_part] == [1, 2, 3, 4]
    for r_full, r_part in zip(rows_full, rows_part):
        assert r_full["loss"] == r_part["loss"] and r_full["dropped_captions"] == r_part["dropped_captions"]
    # Caption dropout at 25% of 8 rows per step drops some captions, never all of them.
    assert 0 < sum(r["dropped_captions"] for r in rows_full) < 32
    assert {"scale_loss/scale_1", "scale_accuracy/scale_8", "grad_norm", "lr"} <= set(rows_full[-1])


def test_a_fixed_batch_is_learned(tmp_path):
    """Eight shapes images repeated: the image-token loss falls far below the uniform log K."""
    config = small_config("train.num_steps=20", "data.num_examples=8", "optim.lr=1e-2", "train.cond_drop_rate=0.0",
                          "train.checkpoint_every=20")
    t2i_trainer.train(config, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"))
    assert rows[0]["loss"] == pytest.approx(np.log(1024), abs=0.3)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_extended_head_trains(tmp_path):
    """head='extended': the vocabulary is the text ids + K codes + [PAD]; the loss normalises over all of it."""
    t2i_trainer.train(small_config("model.head=extended", "train.num_steps=2"), str(tmp_path / "ext"))
    rows = read_metrics(str(tmp_path / "ext"))
    assert rows[0]["loss"] > np.log(1024) and np.isfinite(rows[-1]["loss"])  # > log K: V = 46 + 1024 + 1


def _tiny_llama(path, vocab, **kw):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=256,
                      tie_word_embeddings=False, **kw)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return {k: v.numpy() for k, v in LlamaForCausalLM.from_pretrained(path).state_dict().items()}


def test_init_from_hf_llama_extends_the_vocabulary_and_keeps_qk_norm(tmp_path):
    hf = _tiny_llama(tmp_path / "llama", vocab=40)
    config = small_config("train.num_steps=0", f"model.init={tmp_path / 'llama'}", "model.llm.norm_eps=1e-5")
    params = _init_params(config)
    llm = params["llm"]
    embed = np.asarray(llm["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(embed[:40], hf["model.embed_tokens.weight"])
    np.testing.assert_allclose(embed[40:], np.broadcast_to(hf["model.embed_tokens.weight"].mean(0), (6, 64)), atol=1e-6)
    q = np.asarray(llm["layers"]["self_attn"]["q_proj"]["kernel"])  # [depth, D, H, Dh]
    np.testing.assert_array_equal(q[1].reshape(64, 64), hf["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(llm["layers"]["self_attn"]["q_norm"]["scale"]), 1.0)

    wrong = small_config("train.num_steps=0", f"model.init={tmp_path / 'llama'}", "model.llm.depth=3",
                         "model.llm.norm_eps=1e-5")
    with pytest.raises(ValueError, match=r"model.llm.depth: config 3, checkpoint 2"):
        _init_params(wrong)


def _init_params(config):
    """Fresh parameters overlaid with the HF checkpoint's, as the trainer's initialisation does."""
    from tokenflow_jax import parallel
    from tokenflow_jax.models import t2i
    from tokenflow_jax.recipes.t2i import setup as t2i_setup

    tok_config = frozen.tokenizer_config(config)
    model_cfg = t2i_setup.model_config(config, tok_config, t2i_setup.text_parts(config)[0])
    p, n = model_cfg.text_length, model_cfg.num_tokens
    params = nn.unbox(t2i.NextScaleT2I(model_cfg).init(
        jax.random.key(0), jnp.zeros((1, p), jnp.int32), jnp.ones((1, p), jnp.int32), jnp.zeros((1, n, 40))))["params"]
    mesh = parallel.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    return llm_init.init_from_hf(config, model_cfg.llm, params, mesh, parallel.DEFAULT_RULES)


def test_tokenized_shards_feed_training_and_a_mismatch_is_refused(tmp_path):
    from tokenflow_jax import cli
    from tokenflow_jax.recipes.t2i.tokens import build_token_dataset

    tokens = str(tmp_path / "tokens")
    assert cli.main(["tokenize", "--config", "configs/tokenizer.py:tiny", "--data", "shapes", "--num-images", "16",
                     "--batch-size", "8", "--out", tokens]) == 0
    source = token_shards.tokenized_source(tokens)
    batch = next(iter(build_token_dataset(source, num_tokens=121, global_batch_size=8, seed=0)))
    assert batch["indices"].shape == (8, 121) and batch["indices"].dtype == np.int32
    for row, index in enumerate(batch["index"]):  # shuffled records, each delivered whole
        record = next(source[i] for i in range(len(source)) if source[i]["index"] == index)
        np.testing.assert_array_equal(batch["indices"][row], record["indices"])
        assert batch["caption"][row] == record["caption"]

    last = t2i_trainer.train(small_config("train.num_steps=2", f"data.tokenized={tokens}"), str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and last["loss"] == pytest.approx(np.log(1024), abs=0.3)

    other_tokenizer = small_config("train.num_steps=2", f"data.tokenized={tokens}",
                                   "tokenizer.overrides=['quantizer.codebook_size=512']")
    with pytest.raises(ValueError, match="codebook_size=1024.*codebook_size=512"):
        t2i_trainer.train(other_tokenizer, str(tmp_path / "other"))
