"""``reconstruct``: one pair of PNGs per input under unique names, inputs read a batch at a time, and a summary
that counts what was written. The tokenizer is replaced by an identity stand-in: these tests are about the
command's file handling (the real model's path is covered by tests/convert/test_convert_cli.py)."""
import os

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax import config as config_lib
from tokenflow_jax.data import images as image_io
from tokenflow_jax.recipes.tokenizer import frozen, reconstruct

SIZE = 16


def test_output_names_are_unique():
    names = reconstruct.OutputNames()
    assert [names(n) for n in ("x.png", "x.jpg", "a.png", os.path.join("d", "a.png"), "A.png", "x_2.png",
                               "x.png")] == ["x", "x_2", "a", "d__a", "A_2", "x_2_2", "x_3"]


@pytest.fixture
def fake_tokenizer(monkeypatch):
    """An identity encode/decode that records, per call, how many images had been read by then."""
    reads, calls = [], []
    read_image = image_io.read_image
    monkeypatch.setattr(image_io, "read_image", lambda source, name=None: (reads.append(source),
                                                                           read_image(source, name))[1])
    monkeypatch.setattr(frozen, "load_tokenizer", lambda config, checkpoint, seed=0: (None, {}))

    def encode_decode_fn(model):
        def encode_decode(variables, batch):
            calls.append(len(reads))
            return batch, np.zeros((len(batch), 5), np.int32)
        return encode_decode

    monkeypatch.setattr(frozen, "encode_decode_fn", encode_decode_fn)
    return reads, calls


def _config():
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    return config_lib.apply_overrides(config, [f"model.image_size={SIZE}"])


def test_same_named_inputs_get_their_own_outputs_and_the_summary_counts_them(tmp_path, fake_tokenizer, capsys):
    colours = {"x.png": (250, 0, 0), "x.jpg": (0, 250, 0), "d1/a.png": (0, 0, 250), "d2/a.png": (250, 250, 0)}
    for name, colour in colours.items():
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        Image.new("RGB", (20, 20), colour).save(tmp_path / name, quality=100)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    specs = [str(tmp_path / n) for n in ("x.png", "x.jpg", "d1/a.png", "broken.png", "d2/a.png")]
    assert reconstruct.run(_config(), specs, str(out), batch_size=3) == 0
    stems = ["x", "x_2", "a", "a_2"]
    assert sorted(os.listdir(out)) == sorted(f"{s}_{kind}.png" for s in stems for kind in ("input", "recon"))
    for stem, colour in zip(stems, colours.values()):  # each output holds its own input
        pixel = np.asarray(Image.open(out / f"{stem}_recon.png"))[SIZE // 2, SIZE // 2]
        np.testing.assert_allclose(pixel, colour, atol=3)
    captured = capsys.readouterr()
    assert "4 image(s) reconstructed (8 PNGs written), 1 skipped" in captured.out
    assert "broken.png" in captured.err


def test_inputs_are_read_one_batch_at_a_time(tmp_path, fake_tokenizer):
    reads, calls = fake_tokenizer
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(folder / f"{i}.png")
    assert reconstruct.run(_config(), [str(folder)], str(tmp_path / "out"), batch_size=2) == 0
    assert calls == [2, 4, 6, 7]  # a batch is decoded only when the previous one was written
    assert len(os.listdir(tmp_path / "out")) == 14


def test_no_readable_input_is_an_error(tmp_path, fake_tokenizer, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    assert reconstruct.run(_config(), [str(tmp_path / "a.png")], str(tmp_path / "out")) == 1
    assert "no input image could be read" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
