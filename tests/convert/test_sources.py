"""Weight files as numpy: safetensors of every float width read as float32, as PyTorch files are."""
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from tokenflow_jax.convert import sources


def test_safetensors_floats_of_any_width_come_back_as_float32(tmp_path, rng):
    weights = rng.normal(size=(3, 4)).astype(np.float32)
    path = str(tmp_path / "model.safetensors")
    # bf16 is what released LLM checkpoints use; numpy's own safetensors reader cannot represent it.
    save_file({"w32": weights, "w16": weights.astype(ml_dtypes.bfloat16), "step": np.arange(3)}, path)
    read = dict(sources.iter_tensors(path))
    assert read["w32"].dtype == np.float32 and read["w16"].dtype == np.float32
    np.testing.assert_array_equal(read["w32"], weights)
    np.testing.assert_array_equal(read["w16"], weights.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(read["step"], np.arange(3))


def test_a_truncated_or_malformed_file_is_named_not_misread(tmp_path, rng):
    path = tmp_path / "model.safetensors"
    save_file({"a": rng.normal(size=(64,)).astype(np.float32), "b": np.ones((8,), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-16])  # the last tensor loses half its bytes
    with pytest.raises(sources.WeightsNotFoundError, match=r"model\.safetensors' is truncated: tensor \w ends at"):
        sources.memmap_safetensors(str(path))
    path.write_bytes(b"\x0c\x00\x00\x00\x00\x00\x00\x00{\"a\": 5}   ")
    with pytest.raises(sources.WeightsNotFoundError, match="malformed header entry 'a'"):
        sources.memmap_safetensors(str(path))
