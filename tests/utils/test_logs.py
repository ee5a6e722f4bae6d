"""The trainers' metrics writer: JSON lines, TensorBoard event files (tensorboardX) and PNG previews."""
import glob
import io
import json
import struct

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from tokenflow_jax.utils.logs import MetricsWriter


def read_events(logdir: str) -> list[event_pb2.Event]:
    """Every Event of the TFRecord files in ``logdir``: [length u64, crc u32, payload, crc u32] records."""
    events = []
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_scalars_images_and_json_lines_round_trip(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(3, {"loss": 1.5, "psnr": 20.25})
    writer.write(2**40, {"loss": -0.125})
    grid = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    writer.image(7, "recon", grid, path=str(tmp_path / "images" / "recon_7.png"))
    writer.close()

    scalars, images = {}, {}
    for event in read_events(str(tmp_path / "tensorboard")):
        for value in event.summary.value:
            if value.HasField("image"):
                images[(event.step, value.tag)] = value.image
            else:
                scalars[(event.step, value.tag)] = value.simple_value
    assert scalars == {(3, "loss"): 1.5, (3, "psnr"): 20.25, (2**40, "loss"): -0.125}
    image = images[(7, "recon")]
    assert (image.height, image.width) == (4, 4)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), grid)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / "recon_7.png")), grid)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 1.5), (2**40, -0.125)]


def test_a_resumed_run_drops_the_rows_it_repeats(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (10, 20, 30):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = MetricsWriter(str(tmp_path))
    resumed.drop_after(20)
    resumed.write(30, {"loss": -1.0})
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 10.0), (20, 20.0), (30, -1.0)]
