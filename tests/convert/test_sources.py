"""Weight files as numpy: safetensors of every float width read as float32, as PyTorch files are."""
import ml_dtypes
import numpy as np
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
