"""``tokenflow-jax convert --from official-t2i`` and ``export`` on a tiny released-layout t2i folder built here.

The folder holds random weights under the official keys (LLaVA-Llama names, ``qknorm``, ``mm_projector``,
``lvl_embed``, ``pos_1LC``, the ``image_token_start/end`` buffers), a sharded safetensors index, config.json and
a text tokenizer with ``[PAD]`` then ``<vq_token_i>`` after its text ids. The converted checkpoint is checked
against a torch implementation of the official forward (tests/official_t2i_reference.py) and through
``generate``, the export against the original files bit for bit.
"""
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests import official_t2i_reference
from tests.numerics import rel_err
from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.apps import convert as convert_run
from tokenflow_jax.convert import official_t2i, sources
from tokenflow_jax.convert.hf import ConversionError
from tokenflow_jax.models import t2i
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.tokenizer import frozen

K, WIDTH, DEPTH, HEADS, MLP, P = 1024, 64, 2, 4, 96, 12  # K and the scales (1,2,4,6,8) of configs/tokenizer.py:tiny
SCALES = (1, 2, 4, 6, 8)
N = sum(s * s for s in SCALES)
WORDS = ["a", "an", "red", "blue", "green", "circle", "square", "triangle", "two", "three", "photo", "of", ",",
         "<", ">", "/", "img"]


def text_tokenizer(folder: str) -> int:
    """A word-level tokenizer laid out as the released one: T text ids, [PAD] = T, <vq_token_i> = T + 1 + i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "<img>" -> "<", "img", ">" (3 pieces, as with Llama)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    text_ids = len(tok)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_tokens([f"<vq_token_{i}>" for i in range(K)], special_tokens=True)
    tok.save_pretrained(folder)
    return text_ids


OVERRIDES = [
    "--config.tokenizer.config=configs/tokenizer.py:tiny", f"--config.model.llm.width={WIDTH}",
    f"--config.model.llm.depth={DEPTH}", f"--config.model.llm.num_heads={HEADS}",
    f"--config.model.llm.num_kv_heads={HEADS}", f"--config.model.llm.mlp_dim={MLP}",
    "--config.model.llm.max_positions=256", "--config.model.llm.dtype=float32", "--config.model.llm.remat=none",
    f"--config.model.text_length={P}", "--config.mesh.shape=(1, 2, 1)", "--config.mesh.num_devices=2",
]


def official_state(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under the released model's keys, at scales where every part matters."""
    rng = np.random.default_rng(seed)
    dh = WIDTH // HEADS
    draw = lambda *shape, scale=0.15: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    state = {"model.embed_tokens.weight": draw(vocab, WIDTH, scale=0.5),
             "lm_head.weight": draw(vocab, WIDTH, scale=1.0),
             "model.norm.weight": norm(WIDTH), "model.mm_projector.0.weight": draw(WIDTH, 40, scale=0.3),
             "model.mm_projector.0.bias": draw(WIDTH), "model.mm_projector.2.weight": draw(WIDTH, WIDTH),
             "model.mm_projector.2.bias": draw(WIDTH),
             "model.lvl_embed.weight": draw(len(SCALES) + 1, WIDTH, scale=0.5),
             "model.pos_1LC": draw(N, WIDTH, scale=0.5),
             "image_token_start": np.asarray(vocab - K, np.int64), "image_token_end": np.asarray(vocab - 1, np.int64)}
    for i in range(DEPTH):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = draw(WIDTH, WIDTH)
        state[p + "self_attn.qknorm.query_norm.weight"] = norm(dh)
        state[p + "self_attn.qknorm.key_norm.weight"] = norm(dh)
        state[p + "mlp.gate_proj.weight"] = draw(MLP, WIDTH)
        state[p + "mlp.up_proj.weight"] = draw(MLP, WIDTH)
        state[p + "mlp.down_proj.weight"] = draw(WIDTH, MLP)
        state[p + "input_layernorm.weight"] = norm(WIDTH)
        state[p + "post_attention_layernorm.weight"] = norm(WIDTH)
    return state


def hf_config(vocab: int) -> dict:
    """The config.json fields of the hub's ByteFlow-AI/TokenFlow-t2i at this size."""
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": WIDTH,
            "intermediate_size": MLP, "num_attention_heads": HEADS, "num_hidden_layers": DEPTH,
            "num_key_value_heads": HEADS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": vocab,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
            "mm_hidden_size": 40, "mm_projector_type": "mlp2x_gelu", "mm_use_vq_token": True,
            "mm_vision_vq_type": "TOKEN_FLOW", "vq_codebook_size": K, "tokenizer_model_max_length": 2048,
            "cond_drop_rate": 0.1, "torch_dtype": "bfloat16"}


def write_release(folder, state, config, shards: int = 2) -> None:
    """config.json + ``shards`` safetensors files with model.safetensors.index.json, as save_pretrained."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[j % shards] for j, k in enumerate(keys)}
    for name in names:
        save_file({k: state[k] for k in keys if weight_map[k] == name}, os.path.join(folder, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("released") / "TokenFlow-t2i")
    os.makedirs(folder)
    vocab = text_tokenizer(folder) + 1 + K
    state = official_state(vocab)
    write_release(folder, state, hf_config(vocab))
    return folder, state, vocab


def convert(folder, out, *extra):
    return cli.main(["convert", "--from", "official-t2i", "--model", folder, "--config", "configs/t2i.py:7b",
                     f"--config.model.llm.vocab_size={extra_vocab(folder)}", *OVERRIDES, *extra, "--out", str(out)])


def extra_vocab(folder) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["vocab_size"]


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    folder, _, _ = release
    out = str(tmp_path_factory.mktemp("converted") / "t2i")
    assert convert(folder, out) == 0
    return out


def _model_and_params(checkpoint_dir):
    meta = checkpoint.read_meta(checkpoint_dir)
    config = config_lib.build_config(meta["config_spec"], meta["config_overrides"])
    cfg = convert_run._t2i_model_config(config)
    params = checkpoint.restore_model(t2i.NextScaleT2I(cfg), t2i.init_args(cfg), checkpoint_dir,
                                      collections=("params",))["params"]
    return config, cfg, params


def test_converted_model_reproduces_the_official_forward(release, converted):
    folder, state, vocab = release
    config, cfg, params = _model_and_params(converted)
    assert config.text.tokenizer == os.path.abspath(folder)  # the folder's tokenizer is recorded
    assert cfg.image_token_start == vocab - K and cfg.llm.block_order == "post_sublayer_norm"

    text_tokenizer, encoder = t2i_setup.text_parts(config)
    prompts = encoder(["a red circle", "two blue squares , a photo of a green triangle"])
    rng = np.random.default_rng(1)
    codebook = rng.standard_normal((K, 40)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    indices = rng.integers(0, K, (2, N))
    ours = t2i.NextScaleT2I(cfg).apply({"params": params}, prompts.ids, prompts.mask, codebook[indices], full=True)
    ref = official_t2i_reference.teacher_forced_logits(
        {k: torch.tensor(v) for k, v in state.items()}, heads=HEADS, kv_heads=HEADS, eps=1e-5, theta=1e4,
        scales=SCALES, text_ids=prompts.ids, text_mask=prompts.mask, code_vectors=codebook[indices])
    assert ours.shape == ref.shape == (2, N, vocab)
    assert rel_err(ours, ref) < 1e-5


# Slow tier: the fast tier checks the converted model's forward against the official one (above) and the
# generate command on a checkpoint (tests/recipes/t2i/test_sample.py).
@pytest.mark.slow
def test_generate_with_the_converted_checkpoint_is_greedy_under_the_official_forward(release, converted, tmp_path):
    """CFG 0, one greedy pass: every generated code is the official model's argmax given the codes before it."""
    folder, state, vocab = release
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "gen"
    assert cli.main(["generate", "--config", "configs/sample.py:7b", "--checkpoint", converted, "--prompts",
                     str(prompts), "--out", str(out), "--per-prompt", "1", "--config.sample.cfg_scale=0.0",
                     "--config.sample.top_k=(1,)", "--config.sample.top_p=(0.0,)", "--config.batch_size=2",
                     "--config.mesh.shape=(1, 1, 1)", "--config.mesh.num_devices=1"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    indices = np.asarray([row["indices"] for row in rows])
    assert indices.shape == (2, N) and len(np.unique(indices)) > 20
    config, _, _ = _model_and_params(converted)
    _, encoder = t2i_setup.text_parts(config)
    tok_config = frozen.tokenizer_config(config)
    tok_model, tok_vars = frozen.load_tokenizer(tok_config, None)  # the random tokenizer generate used
    codebook = np.asarray(frozen.codebook_vectors(tok_model, tok_vars))
    assert isinstance(tok_model, tokenizer_lib.TokenFlow)
    encoded = encoder([row["prompt"] for row in rows])
    ref = official_t2i_reference.teacher_forced_logits(
        {k: torch.tensor(v) for k, v in state.items()}, heads=HEADS, kv_heads=HEADS, eps=1e-5, theta=1e4,
        scales=SCALES, text_ids=encoded.ids, text_mask=encoded.mask, code_vectors=codebook[indices])
    greedy = ref[..., vocab - K:].argmax(-1)
    np.testing.assert_array_equal(indices, greedy)


def test_export_round_trip_is_bit_exact(release, converted, tmp_path):
    folder, state, vocab = release
    out = str(tmp_path / "exported")
    assert cli.main(["export", "--checkpoint", converted, "--out", out]) == 0
    files = sources.weight_files(out)
    exported = {}
    for path in files:
        exported.update({k: np.asarray(v) for k, v in sources.memmap_safetensors(path).items()})
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    for field, value in hf_config(vocab).items():
        if field not in ("torch_dtype", "cond_drop_rate", "max_position_embeddings"):
            assert written[field] == value, field
    # The official sampling script sets the tokenizer path through from_pretrained, which needs the field.
    assert written["mm_vision_tower"] == ""
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # the tokenizer travels with the weights


def test_bfloat16_release_converts_and_exports_bit_exact(release, tmp_path):
    """The hub's weights are bf16: float32 parameters hold them exactly and --dtype bfloat16 writes them back."""
    folder, state, vocab = release
    bf16 = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in state.items()}
    src = str(tmp_path / "bf16")
    write_release(src, bf16, hf_config(vocab), shards=1)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens")):
            os.link(os.path.join(folder, name), os.path.join(src, name))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert convert(src, ckpt) == 0
    assert cli.main(["export", "--checkpoint", ckpt, "--out", out, "--dtype", "bfloat16"]) == 0
    exported = sources.memmap_safetensors(os.path.join(out, "model.safetensors"))
    for key, value in bf16.items():
        assert exported[key].dtype == value.dtype, key
        assert np.asarray(exported[key]).tobytes() == value.tobytes(), key


class _Unreadable:
    """A tensor whose shape is known but whose data must not be touched (the check comes first)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __array__(self, *args, **kwargs):
        raise AssertionError("tensor data read before the key check")

    def __getitem__(self, index):
        raise AssertionError("tensor data read before the key check")


def test_every_problem_is_listed_before_any_data_is_read(release, converted):
    folder, state, vocab = release
    _, cfg, _ = _model_and_params(converted)
    tensors = {k: _Unreadable(np.shape(v)) for k, v in state.items()}
    del tensors["model.layers.1.self_attn.qknorm.key_norm.weight"]
    tensors["model.vision_tower.blocks.0.weight"] = _Unreadable((4, 4))
    tensors["model.pos_1LC"] = _Unreadable((N - 1, WIDTH))
    with pytest.raises(ConversionError) as e:
        official_t2i.to_params(tensors, cfg, what="test folder")
    message = str(e.value)
    assert "missing keys (1)" in message and "model.layers.1.self_attn.qknorm.key_norm.weight" in message
    assert "unexpected keys (1)" in message and "model.vision_tower.blocks.0.weight" in message
    assert f"model.pos_1LC: expected ({N}, {WIDTH}), found ({N - 1}, {WIDTH})" in message
    # A vocabulary laid out differently (codes before [PAD]) is caught by the buffers.
    shifted = dict(state, image_token_start=np.asarray(vocab - K - 1, np.int64))
    with pytest.raises(ConversionError, match=r"image_token_start: expected \d+, found \[\d+\]"):
        official_t2i.check(shifted, cfg, "test folder")


def test_a_release_of_another_shape_is_refused_with_the_fields(release, tmp_path, capsys):
    folder, _, _ = release
    code = convert(folder, tmp_path / "wrong", "--config.model.llm.depth=3", "--config.model.llm.mlp_dim=64")
    assert code == 2
    err = capsys.readouterr().err
    assert "model.llm.depth: config 3, checkpoint 2" in err and "model.llm.mlp_dim: config 64, checkpoint 96" in err
    assert not os.path.exists(tmp_path / "wrong")
