"""The unified recipe's set-up: its config seen as a t2i and a VLM config, its model config, and parameters
gathered from t2i and VLM runs (a VLM's projector is the unified model's vision projector)."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from tokenflow_jax import checkpoint
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import text as text_lib
from tokenflow_jax.errors import CheckpointError
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.recipes.unified import setup
from tokenflow_jax.recipes.vlm import setup as vlm_setup


@pytest.fixture(scope="module")
def config():
    return config_lib.build_config("configs/unified.py:tiny")


def test_each_half_is_its_own_recipes_config(config):
    t2i, vlm = setup.t2i_view(config), setup.vlm_view(config)
    assert t2i.train.global_batch_size == config.train.t2i_batch_size == 8
    assert vlm.train.global_batch_size == config.train.vlm_batch_size == 15
    assert t2i.data.source == "shapes" and vlm.data.source == "shapes_vqa"
    assert t2i.model.llm == vlm.model.llm == config.model.llm  # one decoder
    # The recipes' own set-up reads them: the length buckets, the text tokenizer, the frozen tokenizer's config.
    assert vlm_setup.length_buckets(vlm) == (96, 128)
    assert frozen.tokenizer_config(t2i).quantizer.scales == frozen.tokenizer_config(vlm).quantizer.scales


@pytest.mark.parametrize("head", ["separate", "extended"])
def test_model_config_has_both_halves(head):
    config = config_lib.build_config(f"configs/unified.py:tiny,head={head}")
    tok_config = frozen.tokenizer_config(config)
    tokenizer, _ = t2i_setup.text_parts(setup.t2i_view(config))
    cfg = setup.model_config(config, tok_config, tokenizer)
    text_vocab = text_lib.text_vocab_size(tokenizer)
    k = tok_config.quantizer.codebook_size
    assert cfg.llm.vocab_size == text_vocab + (1 + k if head == "extended" else 0)
    assert cfg.image_token_start == (text_vocab + 1 if head == "extended" else 0)
    assert cfg.num_tokens == sum(s * s for s in tok_config.quantizer.scales)
    assert (cfg.num_image_tokens, cfg.feature_dim) == (tok_config.quantizer.scales[-1] ** 2, 40)


def _save(directory, recipe, params):
    checkpoint.save_variables(str(directory), {"params": params}, {"recipe": recipe})
    return str(directory)


def test_parameters_come_from_t2i_and_vlm_runs_by_their_names(tmp_path, caplog):
    full = lambda shape, v: np.full(shape, v, np.float32)  # noqa: E731
    ours = {"llm": {"w": full((3, 4), 0)}, "projector": {"k": full((2, 2), 0)},
            "vision_projector": {"k": full((2, 2), 0)}, "level_embed": full((5, 4), 0), "code_head": full((4, 7), 0)}
    t2i_run = _save(tmp_path / "t2i", "t2i", {"llm": {"w": full((3, 4), 1)}, "projector": {"k": full((2, 2), 2)},
                                               "level_embed": full((5, 4), 3), "code_head": full((4, 6), 9)})
    vlm_run = _save(tmp_path / "vlm", "vlm", {"llm": {"w": full((3, 4), 4)}, "projector": {"k": full((2, 2), 5)}})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, ours)
    with caplog.at_level(logging.INFO):
        got = setup.params_from_checkpoints([t2i_run, vlm_run], ours, shardings)
    value = lambda x: float(np.asarray(x).reshape(-1)[0])  # noqa: E731
    assert value(got["llm"]["w"]) == 4  # both runs have it: the later folder wins
    assert value(got["projector"]["k"]) == 2  # the t2i run's code projector, not the VLM's projector
    assert value(got["vision_projector"]["k"]) == 5  # the VLM's projector
    assert value(got["level_embed"]) == 3
    assert value(got["code_head"]) == 0  # another shape in the t2i run: initialised as the recipe does
    assert "initialised as their recipe does: code_head" in caplog.text
    assert f"from {vlm_run}: llm, vision_projector" in caplog.text


def test_a_run_of_another_recipe_is_named(tmp_path):
    run = _save(tmp_path / "tok", "tokenizer", {"encoder": {"w": np.zeros((2,), np.float32)}})
    params = {"llm": {"w": np.zeros((2,), np.float32)}}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with pytest.raises(CheckpointError, match="'tokenizer' run"):
        setup.params_from_checkpoints([run], params, jax.tree.map(lambda _: device, params))
