"""``tokenflow-jax convert --from hf`` end to end on a tiny CLIP tower built in the test, and the
checkpoint it writes used by ``reconstruct`` and restored with clear errors when it does not fit."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.models.vit import VisionTransformer
from tokenflow_jax.recipes.tokenizer import frozen

TOL = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """An HF CLIPVisionModel with the tiny tokenizer's semantic-encoder shape (64 px, patch 8)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=64, patch_size=8)
    model = transformers.CLIPVisionModel(cfg).eval()
    path = str(tmp_path_factory.mktemp("hf") / "tiny_clip")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def converted(tiny_clip_dir, tmp_path_factory):
    """The tiny tokenizer checkpoint `convert --from hf` writes from the tiny tower (one conversion shared by the
    tests that read it: each builds and initialises the whole tokenizer)."""
    path, _ = tiny_clip_dir
    out = str(tmp_path_factory.mktemp("converted") / "ckpt")
    assert cli.main(["convert", "--from", "hf", "--model", path, "--config", "configs/tokenizer.py:tiny",
                     "--out", out]) == 0
    return out


def test_convert_from_hf_then_reconstruct(tiny_clip_dir, converted, tmp_path, capsys):
    path, hf_model = tiny_clip_dir
    out = converted
    meta = checkpoint.read_meta(out)
    assert meta["config_spec"] == "configs/tokenizer.py:tiny" and meta["source"] == f"hf:{path}"

    config = config_lib.load_config("configs/tokenizer.py:tiny")
    model, variables = frozen.load_tokenizer(config, out)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    tower = VisionTransformer(model.config.semantic_encoder)
    ours = np.asarray(jax.jit(tower.apply)({"params": variables["params"]["semantic_encoder"]}, x))
    with torch.no_grad():
        hidden = hf_model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
        ref = hf_model.post_layernorm(hidden)[:, 1:].numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= TOL

    # reconstruct reads the config recorded in the checkpoint when --config is omitted.
    recon = str(tmp_path / "recon")
    assert cli.main(["reconstruct", "--checkpoint", out, "--images", "builtin", "--out", recon]) == 0
    assert os.path.isfile(os.path.join(recon, "astronaut_recon.png"))
    assert "astronaut" in capsys.readouterr().out


def test_convert_rejects_a_tower_of_the_wrong_shape(tmp_path, capsys):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=64, patch_size=8)
    path = str(tmp_path / "small_clip")
    transformers.CLIPVisionModel(cfg).save_pretrained(path)
    code = cli.main(["convert", "--from", "hf", "--model", path, "--config", "configs/tokenizer.py:tiny",
                     "--out", str(tmp_path / "ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit config.model.semantic_encoder" in err and "width: model 64" in err


def test_hub_id_offline_names_the_id(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    code = cli.main(["convert", "--from", "hf", "--model", "openai/clip-vit-base-patch16", "--config",
                     "configs/tokenizer.py:b", "--out", str(tmp_path / "ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "openai/clip-vit-base-patch16" in err and "huggingface-cli download" in err


def test_restoring_into_a_different_config_lists_every_mismatch(converted):
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    config_lib.apply_overrides(config, ["quantizer.codebook_size=2048", "model.semantic_decoder.depth=1"])
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        frozen.load_tokenizer(config, converted)
    message = str(e.value)
    # The model's shape first, then what the checkpoint holds.
    assert "params/quantizer/codebook_semantic: expected shape (2048, 32), found (1024, 32)" in message
    assert "quantizer/code_age: expected shape (2048,), found (1024,)" in message
    assert "semantic_decoder/blocks" in message


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["reconstruct", "--config", "configs/tokenizer.py:tiny", "--checkpoint",
                     str(tmp_path / "nothing"), "--images", "builtin", "--out", str(tmp_path / "o")])
    assert code == 2 and "no checkpoint found" in capsys.readouterr().err


def test_official_file_to_checkpoint_and_back(tmp_path, capsys):
    """convert --from official then export: the exported file equals the input tensor for tensor."""
    from tokenflow_jax.convert import official, semantic_tower

    config = config_lib.load_config("configs/tokenizer.py:tiny")
    variables = jax.device_get(semantic_tower.init_variables(config, seed=3))
    source = official.variables_to_official(variables, config)
    official.save_official(source, str(tmp_path / "tiny.pt"))
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["convert", "--from", "official", "--checkpoint", str(tmp_path / "tiny.pt"), "--config",
                     "configs/tokenizer.py:tiny", "--out", ckpt]) == 0
    assert cli.main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "back.safetensors")]) == 0
    back = official.load_official_state_dict(str(tmp_path / "back.safetensors"))
    assert set(back) == set(source)
    for key in source:
        np.testing.assert_array_equal(back[key], source[key], err_msg=key)
    # A truncated .pt is named in a one-line error.
    (tmp_path / "bad.pt").write_bytes((tmp_path / "tiny.pt").read_bytes()[:1000])
    assert cli.main(["convert", "--from", "official", "--checkpoint", str(tmp_path / "bad.pt"), "--config",
                     "configs/tokenizer.py:tiny", "--out", str(tmp_path / "x")]) == 2
    assert "bad.pt" in capsys.readouterr().err
