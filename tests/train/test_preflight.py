"""What `tokenflow-jax train` checks before a trainer creates anything: the workdir can be a folder, the batches
divide over the mesh (8 CPU devices here), training rows fit the decoder. Nothing is created either way."""
import os

import pytest

from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.train import preflight


@pytest.mark.parametrize("spec, override, expected", [
    ("configs/tokenizer.py:tiny", "train.global_batch_size=12",
     r"config.train.global_batch_size=12 does not divide over the 8 data-parallel devices"),
    ("configs/unified.py:tiny", "train.vlm_batch_size=12", r"config.train.vlm_batch_size=12 does not divide"),
    ("configs/t2i.py:tiny", "mesh.shape=(3, 1, 1)", r"mesh shape \(3, 1, 1\) needs 3 devices but 8"),
    ("configs/vlm.py:tiny", "data.max_length=512", r"config.data.max_length=512 is longer than .*max_positions=256"),
    ("configs/vlm.py:tiny", "train.length_buckets=(64, 96)", r"must end at config.data.max_length=128"),
    ("configs/unified.py:tiny", "data.vlm.max_length=300", r"config.data.vlm.max_length=300 is longer"),
])
def test_training_only_problems_name_the_field_and_create_nothing(tmp_path, spec, override, expected):
    config = config_lib.build_config(spec, [f"--config.{override}"])  # in range: only training can tell
    with pytest.raises(ConfigError, match=expected):
        preflight.check(config, str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_file_or_inside_one_is_refused(tmp_path):
    config = config_lib.build_config("configs/tokenizer.py:tiny")
    afile = tmp_path / "a.txt"
    afile.write_text("")
    with pytest.raises(ConfigError, match=f"--workdir {afile} is a file"):
        preflight.check(config, str(afile))
    with pytest.raises(ConfigError, match=f"is inside {afile}, which is a file"):
        preflight.check(config, str(afile / "run" / "deeper"))
    preflight.check(config, str(tmp_path / "new" / "run"))  # a new folder, or an earlier run's, is fine
    preflight.check(config, str(tmp_path))
    assert os.listdir(tmp_path) == ["a.txt"]
