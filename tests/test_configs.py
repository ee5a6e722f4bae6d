"""Config loading, variant options and typed command-line overrides."""
import pytest

from configs import common
from tokenflow_jax.models import tokenizer


def test_variants_carry_the_reference_numbers():
    b = common.load_config("configs/tokenizer.py:b")
    assert b.model.image_size == 224 and b.quantizer.scales == (1, 2, 4, 6, 8, 10, 12, 14)
    assert sum(s * s for s in b.quantizer.scales) == 561
    b256 = common.load_config("configs/tokenizer.py:b,res=256,enhanced")
    assert b256.model.image_size == 256 and sum(s * s for s in b256.quantizer.scales) == 817
    assert b256.model.pixel_decoder.ch == 256 and b256.model.pixel_decoder.num_res_blocks == 4
    assert b256.model.semantic_encoder.pos_grid == 14  # interpolated to 16 at run time
    xl = common.load_config("configs/tokenizer.py:xl")
    assert sum(s * s for s in xl.quantizer.scales) == 2227 and len(xl.quantizer.scales) == 15
    assert xl.model.pixel_resolution == 432 and xl.model.input_scaling == "siglip"
    assert xl.model.semantic_encoder.depth == 26  # hidden_states[-2] of the 27-layer tower
    for cfg in (b, b256, xl):
        q = cfg.quantizer
        assert (q.codebook_size, q.w_dis, q.beta, q.scale_drop_prob) == (32768, 1.0, 0.25, 0.1)
        tokenizer.tokenflow_config(cfg)  # builds and validates


def test_overrides_are_typed():
    config = common.load_config("configs/tokenizer.py:tiny")
    common.apply_overrides(config, ["--config.quantizer.w_dis=0.5", "config.quantizer.codebook_update=ema",
                                    "quantizer.scales=(1, 2, 8)", "model.pixel_resolution=0"])
    assert config.quantizer.w_dis == 0.5 and config.quantizer.codebook_update == "ema"
    assert config.quantizer.scales == (1, 2, 8)
    common.apply_overrides(config, ["quantizer.w_dis=2"])  # an int where a float is expected is fine
    assert config.quantizer.w_dis == 2.0 and isinstance(config.quantizer.w_dis, float)
    with pytest.raises(KeyError, match="did you mean w_dis"):
        common.apply_overrides(config, ["quantizer.w_dist=0.5"])
    with pytest.raises(TypeError, match="quantizer.codebook_size: expected int"):
        common.apply_overrides(config, ["quantizer.codebook_size=big"])
    with pytest.raises(KeyError, match="unknown config field --config.nope"):
        common.apply_overrides(config, ["nope.x=1"])


def test_invalid_values_name_the_field():
    config = common.load_config("configs/tokenizer.py:tiny")
    common.apply_overrides(config, ["quantizer.codebook_update=kmeans"])
    with pytest.raises(ValueError, match=r"config.quantizer: .*codebook_update must be 'loss' or 'ema'"):
        tokenizer.tokenflow_config(config)
    config = common.load_config("configs/tokenizer.py:tiny")
    common.apply_overrides(config, ["quantizer.scales=(1, 2, 4)"])
    with pytest.raises(ValueError, match="must end at the token grid 8"):
        tokenizer.tokenflow_config(config)


def test_variant_options_are_checked():
    with pytest.raises(ValueError, match="unknown config option 'resolution'"):
        common.load_config("configs/tokenizer.py:b,resolution=256")
    with pytest.raises(ValueError, match="unknown tokenizer variant"):
        common.load_config("configs/tokenizer.py:huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_config("configs/nope.py:tiny")


def test_split_config_args():
    rest, overrides = common.split_config_args(["--images", "a.png", "--config.quantizer.w_dis", "0.5",
                                                "--config.seed=3"])
    assert rest == ["--images", "a.png"] and overrides == ["--config.quantizer.w_dis=0.5", "--config.seed=3"]
