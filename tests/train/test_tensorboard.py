"""The hand-encoded TensorBoard event files: checksums and round trip."""
import io

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax.train import tensorboard as tb


def test_crc32c_known_vectors():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c(b"") == 0
    assert tb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_scalars_and_images_round_trip(tmp_path):
    writer = tb.EventWriter(str(tmp_path))
    writer.scalars(3, {"loss": 1.5, "psnr": 20.25})
    writer.scalars(2**40, {"loss": -0.125})
    png = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(png, format="PNG")
    writer.image(7, "recon", png.getvalue(), 4, 4)
    writer.close()
    events = tb.read_events(writer.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1]["step"] == 3 and events[1]["scalars"] == {"loss": 1.5, "psnr": 20.25}
    assert events[2]["step"] == 2**40 and events[2]["scalars"]["loss"] == -0.125
    assert events[3]["images"]["recon"] == png.getvalue()


def test_corruption_is_detected(tmp_path):
    writer = tb.EventWriter(str(tmp_path))
    writer.scalars(1, {"x": 1.0})
    writer.close()
    data = bytearray(open(writer.path, "rb").read())
    data[-6] ^= 0xFF
    open(writer.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        tb.read_events(writer.path)
