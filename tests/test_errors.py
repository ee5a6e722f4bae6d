"""Which class each kind of failure raises: a :class:`UserError` subclass for what the person running the command
can fix (a config field or flag, a checkpoint, a weights file, their data), a plain builtin for a bug."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax import checkpoint, parallel
from tokenflow_jax import config as config_lib
from tokenflow_jax.convert import hf, sources
from tokenflow_jax.data import conversation, decode, images, llava
from tokenflow_jax.data.sources import ImageFolderSource
from tokenflow_jax.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    InputNotFoundError,
    UserError,
)
from tokenflow_jax.models import quantizer, tokenizer, transformer
from tokenflow_jax.utils import batching


# ------------------------------------------------------------------------------------------ config
def test_a_bad_config_field_is_a_config_error_naming_it():
    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny"),
                                        ["quantizer.scales=(4, 2, 8)"])
    with pytest.raises(ConfigError, match=r"config.quantizer: quantizer.scales must be strictly increasing"):
        tokenizer.tokenflow_config(config)
    with pytest.raises(ConfigError, match="codebook_update must be 'loss' or 'ema'"):
        quantizer.QuantizerConfig(codebook_size=8, codebook_update="kmeans")


def test_overrides_flags_and_variants_are_config_errors():
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    for bad in (["quantizer.w_dist=0.5"], ["quantizer.codebook_size=big"], ["quantizer.w_dis"], ["nope.x=1"]):
        with pytest.raises(ConfigError):
            config_lib.apply_overrides(config, bad)
    with pytest.raises(ConfigError, match="needs a value"):
        config_lib.split_config_args(["--config.seed"])
    with pytest.raises(ConfigError, match="unknown tokenizer variant"):
        config_lib.load_config("configs/tokenizer.py:huge")
    with pytest.raises(InputNotFoundError, match="does not exist"):
        config_lib.load_config("configs/nope.py:tiny")
    with pytest.raises(ConfigError, match="config.mesh.shape"):
        parallel.resolve_mesh_shape([3, -1], 4)


def test_a_dataclass_config_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="TransformerConfig.num_heads .* must be a multiple of num_kv_heads"):
        transformer.TransformerConfig(vocab_size=16, width=16, depth=1, num_heads=4, mlp_dim=32, num_kv_heads=3)


# -------------------------------------------------------------------------------------- checkpoints
def test_a_missing_checkpoint_is_checkpoint_not_found(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint found") as info:
        checkpoint.read_meta(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)


def test_a_mismatched_checkpoint_is_a_checkpoint_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    checkpoint.save_variables(directory, {"params": {"w": np.zeros((3,), np.float32)}}, {"recipe": "test"})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=device)}}
    with pytest.raises(CheckpointError, match=r"params/w: expected shape \(4,\)") as info:
        checkpoint.restore_variables(directory, target)
    assert isinstance(info.value, checkpoint.CheckpointMismatchError) and isinstance(info.value, ValueError)


def test_weights_and_conversion_problems_are_user_errors(tmp_path):
    with pytest.raises(sources.WeightsNotFoundError) as info:
        sources.torch_state_dict(str(tmp_path / "missing.pt"))
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)
    error = hf.ConversionError("missing keys (1):\n  a.weight")
    assert isinstance(error, UserError) and isinstance(error, KeyError) and isinstance(error, ValueError)
    assert str(error) == "missing keys (1):\n  a.weight"


# --------------------------------------------------------------------------------------------- data
def test_a_malformed_jsonl_record_is_a_data_error(tmp_path):
    path = tmp_path / "data.jsonl"
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    good = {"image": "a.png", "conversations": turns}
    path.write_text(json.dumps(good) + "\n{not json\n[1, 2]\n")
    source = llava.LlavaJsonlSource(str(path))
    assert source[0]["image"].endswith("a.png")
    with pytest.raises(DataError, match="record 1 is not valid JSON"):
        source[1]
    with pytest.raises(DataError, match="record 2 is a list, not an object"):
        source[2]
    with pytest.raises(InputNotFoundError, match="does not exist"):
        llava.LlavaJsonlSource(str(tmp_path / "missing.jsonl"))


def test_missing_inputs_are_input_not_found(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist") as info:
        ImageFolderSource(str(tmp_path / "nowhere"))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(InputNotFoundError, match="no images found"):
        ImageFolderSource(str(tmp_path))


def test_bad_records_are_data_errors_and_are_still_skipped_by_reason():
    """ImageReadError, BadRecord and ConversationError became DataErrors; the pipelines still tell them apart."""
    with pytest.raises(images.ImageReadError) as read:
        images.read_image(b"", name="x.png")
    with pytest.raises(decode.BadRecord) as bad:
        decode.decode_to_rgb(None)
    with pytest.raises(conversation.ConversationError) as conv:
        conversation.normalize_turns([{"from": "gpt", "value": "A"}], has_image=False)
    for error in (read.value, bad.value, conv.value):
        assert isinstance(error, DataError)
    assert decode.skip_reason(read.value) == "empty" and decode.skip_reason(bad.value) == "unreadable"
    assert llava.skip_reason(conv.value) == "bad_roles"
    assert llava.skip_reason(read.value) == "image_empty" and llava.skip_reason(bad.value) == "image_unreadable"
    assert llava.skip_reason(DataError("record 3 is not valid JSON")) == "bad_record"


# --------------------------------------------------------------------------------------------- bugs
def test_shape_checks_between_functions_stay_plain_bugs():
    cfg = transformer.TransformerConfig(vocab_size=16, width=16, depth=1, num_heads=2, mlp_dim=32, max_positions=8)
    model = transformer.Transformer(cfg)
    with pytest.raises(ValueError, match=r"Transformer: ids must be \[B, L\]") as info:
        model.init(jax.random.key(0), jnp.zeros((4,), jnp.int32))
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError, match="cache max_len 9 exceeds") as info:
        transformer.init_cache(cfg, 1, 9)
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError, match="do not cover a prefix of the scales") as info:
        quantizer.QuantizerConfig(codebook_size=8, scales=(1, 2)).scales_for_length(3)
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2") as info:
        batching.pad_rows([1, 2, 3], 2)
    assert not isinstance(info.value, UserError)
