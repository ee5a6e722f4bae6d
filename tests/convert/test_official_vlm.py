"""``tokenflow-jax convert --from official-vlm`` and ``export`` on a tiny released-layout understanding folder.

The folder is what the released LLaVA-Qwen2.5 model looks like at a tiny size: an HF ``Qwen2ForCausalLM`` with
random weights under ``model.*`` / ``lm_head``, LLaVA's ``model.mm_projector.{0,2}`` over 40-d TokenFlow
features and a saved vision tower, in a ``pytorch_model.bin`` (read with ``weights_only=True``), config.json of
``model_type: llava_qwen``. The converted checkpoint is checked against transformers' Qwen2 fed LLaVA's spliced
input embeddings (teacher-forced logits and ``chat``'s greedy answer), the export against the original tensors.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.numerics import rel_err
from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.convert import official_vlm, sources
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.data import conversation
from tokenflow_jax.data import text as text_lib
from tokenflow_jax.models import vlm
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.recipes.vlm import answer as vlm_infer

WIDTH, DEPTH, HEADS, KV_HEADS, MLP, VOCAB = 64, 2, 4, 2, 96, 192  # VOCAB >= the builtin:shapes_chat tokenizer
OVERRIDES = [
    "--config.tokenizer.config=configs/tokenizer.py:tiny", f"--config.model.llm.width={WIDTH}",
    f"--config.model.llm.depth={DEPTH}", f"--config.model.llm.num_heads={HEADS}",
    f"--config.model.llm.num_kv_heads={KV_HEADS}", f"--config.model.llm.mlp_dim={MLP}",
    f"--config.model.llm.vocab_size={VOCAB}", "--config.model.llm.max_positions=256",
    "--config.model.llm.dtype=float32", "--config.model.llm.remat=none", "--config.text.tokenizer=builtin:shapes_chat",
    "--config.data.max_length=128", "--config.generate.max_new_tokens=8", "--config.mesh.shape=(1, 2, 1)",
    "--config.mesh.num_devices=2",
]


def _hf_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=1e6, rms_norm_eps=1e-6,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's init is too gentle for a parity test: every weight must matter
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else (0.5 if "embed" in name or "lm_head" in name else 0.15)
                    * noise)
    return model.eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, HF decoder, projector tensors, the saved state)."""
    folder = str(tmp_path_factory.mktemp("released") / "Tokenflow-llava-qwen2.5")
    os.makedirs(folder)
    model = _hf_model()
    g = torch.Generator().manual_seed(1)
    projector = {"model.mm_projector.0.weight": 0.3 * torch.randn(WIDTH, 40, generator=g),
                 "model.mm_projector.0.bias": 0.1 * torch.randn(WIDTH, generator=g),
                 "model.mm_projector.2.weight": 0.15 * torch.randn(WIDTH, WIDTH, generator=g),
                 "model.mm_projector.2.bias": 0.1 * torch.randn(WIDTH, generator=g)}
    state = {**model.state_dict(), **projector,
             "model.vision_tower.vision_tower.quantize.embedding_vqkd.weight": torch.randn(1024, 32, generator=g)}
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    config = {**model.config.to_dict(), "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
              "mm_hidden_size": 40, "mm_projector_type": "mlp2x_gelu", "mm_vision_vq_type": "TOKENFLOW",
              "mm_vision_tower": "", "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder, model, projector, state


def convert(folder, out, *extra):
    return cli.main(["convert", "--from", "official-vlm", "--model", folder, "--config", "configs/vlm.py:qwen14b",
                     *OVERRIDES, *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted") / "vlm")
    assert convert(release[0], out) == 0
    return out


def _llava_logits(model, projector, input_ids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """LLaVA's forward: projector(features) replaces the -200 placeholders, then the HF decoder."""
    ids = torch.tensor(input_ids, dtype=torch.long)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids.clamp(min=0))
        image = F.linear(F.gelu(F.linear(torch.tensor(features), projector["model.mm_projector.0.weight"],
                                         projector["model.mm_projector.0.bias"])),
                         projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"])
        for b in range(ids.shape[0]):
            embeds[b, ids[b] == vlm.IMAGE_TOKEN_INDEX] = image[b]
        return model(inputs_embeds=embeds).logits.numpy()


def test_converted_vlm_reproduces_llava_qwen(release, converted):
    _, model, projector, _ = release
    meta = checkpoint.read_meta(converted)
    assert meta["recipe"] == "vlm" and meta["source"].startswith("official-vlm:")
    config = config_lib.build_config(meta["config_spec"], meta["config_overrides"])
    vqa = vlm_infer.VqaModel.load(config, converted)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, vqa.model.config.num_image_tokens, 40)).astype(np.float32)
    ids, _ = vqa.prompts(["how many circles are there?", "what colour is the square?"])
    assert (ids == vlm.IMAGE_TOKEN_INDEX).sum(1).tolist() == [64, 64]
    assert ids.shape[1] == (ids >= 0).sum(1).max() + 64  # equal lengths: no padding in this pair
    ours = np.asarray(vqa.model.apply({"params": vqa.params}, ids, features))
    assert rel_err(ours, _llava_logits(model, projector, ids, features)) < 1e-4


# Slow tier: the fast tier checks the converted model's logits against transformers (above) and the chat
# command on a checkpoint (tests/recipes/vlm/test_train.py).
@pytest.mark.slow
def test_chat_with_the_converted_checkpoint_answers_as_hf_greedy(release, converted, tmp_path, capsys):
    """``chat`` streams the answer that transformers' greedy decoding of LLaVA-Qwen gives."""
    _, model, projector, _ = release
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
    question = "how many circles are there?"
    assert cli.main(["chat", "--checkpoint", converted, "--image", str(image), "--prompt", question]) == 0
    answer = capsys.readouterr().out.strip()
    meta = checkpoint.read_meta(converted)
    config = config_lib.build_config(meta["config_spec"], meta["config_overrides"])
    vqa = vlm_infer.VqaModel.load(config, converted)
    features = np.asarray(vqa.encode(vqa.tok_vars, vqa.preprocess(np.asarray(Image.open(image)))[None]))
    ids, _ = vqa.prompts([question])
    stops = set(conversation.stop_ids(vqa.tokenizer, config.text.template))
    tokens = []
    for _ in range(int(config.generate.max_new_tokens)):
        full = np.concatenate([ids, np.asarray(tokens, np.int32)[None]], 1) if tokens else ids
        token = int(_llava_logits(model, projector, full, features)[0, -1].argmax())
        if token in stops:
            break
        tokens.append(token)
    assert len(tokens) >= 3, f"the reference answered {tokens}: too short to compare anything"
    assert answer == vqa.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_export_round_trip_is_bit_exact(release, converted, tmp_path):
    _, _, _, state = release
    out = str(tmp_path / "exported")
    assert cli.main(["export", "--checkpoint", converted, "--out", out]) == 0
    exported = {}
    for path in sources.weight_files(out):
        exported.update({k: np.asarray(v) for k, v in sources.memmap_safetensors(path).items()})
    expected = {k: v.numpy() for k, v in state.items() if not k.startswith("model.vision_tower.")}
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == "llava_qwen" and written["mm_hidden_size"] == 40
    assert (written["num_key_value_heads"], written["rope_theta"]) == (KV_HEADS, 1e6)
    # The exported folder converts again (the round trip closes).
    assert convert(out, tmp_path / "again") == 0


def test_every_problem_is_listed(release, converted):
    _, _, _, state = release
    meta = checkpoint.read_meta(converted)
    config = config_lib.build_config(meta["config_spec"], meta["config_overrides"])
    from tokenflow_jax.recipes.vlm import setup as vlm_setup

    tok_config = frozen.tokenizer_config(config)
    cfg = vlm_setup.model_config(config, tok_config, text_lib.load_text_tokenizer("builtin:shapes_chat"))
    tensors = {k: v.numpy() for k, v in state.items()}
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    tensors["model.mm_projector.0.weight"] = np.zeros((WIDTH, 32), np.float32)
    tensors["model.image_newline"] = np.zeros((WIDTH,), np.float32)
    with pytest.raises(ConversionError) as e:
        official_vlm.to_params(tensors, cfg, what="test folder")
    message = str(e.value)
    assert "missing keys (1)" in message and "model.layers.0.self_attn.q_proj.bias" in message
    assert "unexpected keys (1)" in message and "model.image_newline" in message
    assert f"model.mm_projector.0.weight: expected ({WIDTH}, 40), found ({WIDTH}, 32)" in message


def test_a_release_of_another_shape_is_refused_with_the_fields(release, tmp_path, capsys):
    code = convert(release[0], tmp_path / "wrong", "--config.model.llm.num_kv_heads=4", "--config.model.features="
                   "final_semantic")
    assert code == 2
    err = capsys.readouterr().err
    assert "model.llm.num_kv_heads: config 4, checkpoint 2" in err and "mm_hidden_size: config 32, checkpoint 40" in err
    assert not os.path.exists(tmp_path / "wrong")
