"""Config loading, variant options and typed command-line overrides."""
import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import tokenizer


def test_variants_carry_the_reference_numbers():
    b = config_lib.load_config("configs/tokenizer.py:b")
    assert b.model.image_size == 224 and b.quantizer.scales == (1, 2, 4, 6, 8, 10, 12, 14)
    assert sum(s * s for s in b.quantizer.scales) == 561
    b256 = config_lib.load_config("configs/tokenizer.py:b,res=256,enhanced")
    assert b256.model.image_size == 256 and sum(s * s for s in b256.quantizer.scales) == 817
    assert b256.model.pixel_decoder.ch == 256 and b256.model.pixel_decoder.num_res_blocks == 4
    assert b256.model.semantic_encoder.pos_grid == 14  # interpolated to 16 at run time
    xl = config_lib.load_config("configs/tokenizer.py:xl")
    assert sum(s * s for s in xl.quantizer.scales) == 2227 and len(xl.quantizer.scales) == 15
    assert xl.model.pixel_resolution == 432 and xl.model.input_scaling == "siglip"
    assert xl.model.semantic_encoder.depth == 26  # hidden_states[-2] of the 27-layer tower
    for cfg in (b, b256, xl):
        q = cfg.quantizer
        assert (q.codebook_size, q.w_dis, q.beta, q.scale_drop_prob) == (32768, 1.0, 0.25, 0.1)
        tokenizer.tokenflow_config(cfg)  # builds and validates


def test_overrides_are_typed():
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    config_lib.apply_overrides(config, ["--config.quantizer.w_dis=0.5", "config.quantizer.codebook_update=ema",
                                    "quantizer.scales=(1, 2, 8)", "model.pixel_resolution=0"])
    assert config.quantizer.w_dis == 0.5 and config.quantizer.codebook_update == "ema"
    assert config.quantizer.scales == (1, 2, 8)
    config_lib.apply_overrides(config, ["quantizer.w_dis=2"])  # an int where a float is expected is fine
    assert config.quantizer.w_dis == 2.0 and isinstance(config.quantizer.w_dis, float)
    with pytest.raises(ConfigError, match="did you mean w_dis"):
        config_lib.apply_overrides(config, ["quantizer.w_dist=0.5"])
    with pytest.raises(ConfigError, match="quantizer.codebook_size: expected int"):
        config_lib.apply_overrides(config, ["quantizer.codebook_size=big"])
    with pytest.raises(ConfigError, match="unknown config field --config.nope"):
        config_lib.apply_overrides(config, ["nope.x=1"])


def test_invalid_values_name_the_field():
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    config_lib.apply_overrides(config, ["quantizer.codebook_update=kmeans"])
    with pytest.raises(ValueError, match=r"config.quantizer: .*codebook_update must be 'loss' or 'ema'"):
        tokenizer.tokenflow_config(config)
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    config_lib.apply_overrides(config, ["quantizer.scales=(1, 2, 4)"])
    with pytest.raises(ValueError, match="must end at the token grid 8"):
        tokenizer.tokenflow_config(config)


def test_variant_options_are_checked():
    with pytest.raises(ValueError, match="unknown config option 'resolution'"):
        config_lib.load_config("configs/tokenizer.py:b,resolution=256")
    with pytest.raises(ValueError, match="unknown tokenizer variant"):
        config_lib.load_config("configs/tokenizer.py:huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_lib.load_config("configs/nope.py:tiny")


def test_split_config_args():
    rest, overrides = config_lib.split_config_args(["--images", "a.png", "--config.quantizer.w_dis", "0.5",
                                                "--config.seed=3"])
    assert rest == ["--images", "a.png"] and overrides == ["--config.quantizer.w_dis=0.5", "--config.seed=3"]


def test_t2i_variants_build_with_the_reference_shapes():
    from tokenflow_jax.models import t2i

    built = {}
    for variant, tokens, vocab, head in (("7b", 817, 64769, "extended"), ("1b", 817, 32000, "separate"),
                                         ("tiny", 121, 300, "separate")):
        config = config_lib.load_config(f"configs/t2i.py:{variant}")
        tok = config_lib.load_config(config.tokenizer.config)
        built[variant] = t2i.t2i_config(config, tok, vocab_size=vocab if variant == "tiny" else None)
        assert built[variant].num_tokens == tokens and built[variant].llm.vocab_size == vocab
        assert built[variant].head == head and built[variant].sequence_length <= built[variant].llm.max_positions
    # Llama-2-7B: 4096 wide, 32 layers of 32 heads (MHA), QK-norm; <vq_token_0> right after the text vocabulary.
    seven = built["7b"]
    assert (seven.llm.width, seven.llm.depth, seven.llm.num_kv_heads, seven.llm.mlp_dim) == (4096, 32, 32, 11008)
    # Text prefix: 128 caption tokens (BOS included) + tokens("<img>") (3 with the Llama tokenizer).
    assert seven.llm.qk_norm and seven.text_length == 131
    # The released vocabulary: [PAD] = 32000, <vq_token_0> = 32001 (the official train.py adds [PAD] first).
    assert seven.image_token_start == 32001 and seven.llm.vocab_size - seven.codebook_size == 32001
    # The released decoder normalises each sub-block's output; tiny keeps the standard pre-norm block.
    assert seven.llm.block_order == built["1b"].llm.block_order == "post_sublayer_norm"
    assert built["tiny"].llm.block_order == "pre_norm"
    assert abs(seven.llm.num_params() - 7.0e9) < 0.3e9
    tiny, tiny_tok = config_lib.load_config("configs/t2i.py:tiny"), config_lib.load_config("configs/tokenizer.py:tiny")
    with pytest.raises(ValueError, match="vocab_size is 0"):
        t2i.t2i_config(tiny, tiny_tok)
    config_lib.apply_overrides(tiny, ["model.llm.num_kv_heads=3"])
    with pytest.raises(ValueError, match="config.model.llm: .*num_heads"):
        t2i.t2i_config(tiny, tiny_tok, vocab_size=300)


def test_sample_configs_take_the_t2i_variants_sampling_defaults():
    for variant, cfg_scale, top_k in (("tiny", 30.0, (64, 16, 1)), ("7b", 7.5, (1200, 100, 1))):
        config = config_lib.load_config(f"configs/sample.py:{variant}")
        assert config.recipe == "sample" and config.model_config == f"configs/t2i.py:{variant}"
        assert config.sample.cfg_scale == cfg_scale and tuple(config.sample.top_k) == top_k
    assert config_lib.load_config("configs/sample.py:7b").sample.uncond_prompt.startswith("lowres, bad anatomy")
    assert config_lib.load_config("configs/sample.py:tiny,loops=1").sample.loops == 1


def test_sampling_presets_are_the_papers_and_the_official_scripts():
    # The paper's best strategy (Table 6; 25 model runs, Table 4) is the 1b / 7b default.
    for variant in ("1b", "7b"):
        s = config_lib.load_config(f"configs/sample.py:{variant}").sample
        assert (s.preset, s.cfg_scale, tuple(s.top_k), tuple(s.top_p)) == ("paper", 7.5, (1200, 100, 1), (0.8, 0.8, 0))
    # t2i/scripts/run_t2i.sh: --cfg 7.5 --loop 1 -> one pass of top-k 600, top-p 0.6.
    s = config_lib.load_config("configs/sample.py:7b,preset=official_script").sample
    assert (s.cfg_scale, tuple(s.top_k), tuple(s.top_p), s.loops) == (7.5, (600,), (0.6,), 0)
    s = config_lib.load_config("configs/sample.py:tiny,preset=official_script").sample
    assert s.preset == "official_script" and tuple(s.top_k) == (600,)
    assert config_lib.load_config("configs/sample.py:tiny").sample.preset == ""
    with pytest.raises(ValueError, match="unknown preset 'best'"):
        config_lib.load_config("configs/sample.py:7b,preset=best")


def test_vlm_variants_have_the_reference_shapes_and_stages():
    from tokenflow_jax.models import transformer, vlm

    qwen = config_lib.load_config("configs/vlm.py:qwen14b")
    llm = transformer.TransformerConfig(**qwen.model.llm.to_dict())
    # Qwen2.5-14B (the hub config of ByteFlow-AI/Tokenflow-llava-qwen2.5-14B-finetuning):
    # 5120 wide, 48 layers, 40 heads / 8 KV heads, MLP 13824, theta 1e6, q/k/v biases.
    assert (llm.width, llm.depth, llm.num_heads, llm.num_kv_heads, llm.mlp_dim) == (5120, 48, 40, 8, 13824)
    assert llm.rope_theta == 1e6 and llm.qkv_bias and abs(llm.num_params() - 14.8e9) < 0.3e9
    # TokenFlow-XL features: the 27x27 final grid of 40-d codes (729 tokens), as the released model.
    assert vlm.feature_shape(config_lib.load_config(qwen.tokenizer.config), "final") == (729, 40)
    assert qwen.stage == 2 and qwen.text.template == "qwen_2_5" and qwen.optim.lr == 2e-5
    assert qwen.data.aspect == "pad" and tuple(qwen.train.trainable) == () and qwen.train.global_batch_size == 128
    s1 = config_lib.load_config("configs/vlm.py:qwen14b,stage=1")
    assert s1.optim.lr == 1e-3 and tuple(s1.train.trainable) == ("^projector/",) and s1.text.template == "plain"
    assert s1.optim.schedule == "cosine" and s1.optim.warmup_steps == 300 and s1.train.global_batch_size == 256
    vicuna = config_lib.load_config("configs/vlm.py:vicuna13b")
    assert (vicuna.model.llm.width, vicuna.model.llm.depth, vicuna.model.llm.vocab_size) == (5120, 40, 32000)
    assert vicuna.text.template == "vicuna_v1"
    tiny = config_lib.load_config("configs/vlm.py:tiny")
    assert tiny.stage == 0 and tiny.model.init == "" and tiny.data.source == "shapes_vqa"
    with pytest.raises(ValueError, match="stage must be 0, 1 or 2"):
        config_lib.load_config("configs/vlm.py:tiny,stage=3")
