"""The tokenizer trainer on data with nothing usable: one DataError line before any model is built."""
import os

import pytest

from tests.recipes.tokenizer.test_train import small_config
from tokenflow_jax.errors import DataError
from tokenflow_jax.recipes.tokenizer import train as trainer


def test_a_folder_without_a_usable_image_fails_before_the_first_step(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    built = []
    monkeypatch.setattr(trainer, "build_parts", lambda *a, **k: built.append(1))  # must never be reached
    config = small_config("data.source=folder", f"data.path={folder}", "train.num_steps=2")
    with pytest.raises(DataError) as info:
        trainer.train(config, str(tmp_path / "run"))
    assert str(info.value) == (f"no usable image in {folder}: all 6 images are unusable (empty: 5, not_image: 1); "
                               "check config.data.path / config.data.source")
    assert not built and not os.path.exists(tmp_path / "run" / "checkpoints")
