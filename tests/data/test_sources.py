"""Sources: image folders, our ArrayRecord files, TFDS (mock_data and a tiny prepared builder)."""
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.data.helpers import CROP, png_bytes
from tokenflow_jax.data import pipeline
from tokenflow_jax.data.array_record import ArrayRecordSource, deserialize_record, serialize_record, write_array_record
from tokenflow_jax.data.sources import ImageFolderSource, TfdsSource


def test_image_folder_is_recursive_sorted_and_reads_sidecar_captions(tmp_path):
    layout = ["dog/b.png", "cat/x/deep.webp", "cat/a.JPG", "top.bmp", "dog/a.gif"]
    for rel in layout:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        fmt = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG", "bmp": "BMP", "gif": "GIF"}[rel.rsplit(".", 1)[1].lower()]
        (tmp_path / rel).write_bytes(png_bytes(Image.new("RGB", (8, 8)), fmt))
    (tmp_path / "dog/b.txt").write_text("  a dog  \n")
    (tmp_path / "notes.md").write_text("not an image")
    source = ImageFolderSource(str(tmp_path))
    assert source.paths == sorted(layout) and len(source) == 5
    assert source.classes == ["cat", "dog"]
    records = [source[i] for i in range(len(source))]
    assert [r["label"] for r in records] == [0, 0, 1, 1, -1]
    assert [r["caption"] for r in records] == ["", "", "", "a dog", ""]
    assert records[0]["image"] == os.path.join(str(tmp_path), "cat/a.JPG")
    assert pickle.loads(pickle.dumps(source)).paths == source.paths


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderSource(str(tmp_path))


def test_array_record_round_trip(tmp_path, rng):
    records = [
        {
            "image": png_bytes(Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))),
            "caption": f"caption {i} ünïcode",
            "label": i,
            "score": 0.5 * i,
            "mask": rng.integers(0, 2, (3, 4)).astype(bool),
            "embedding": rng.normal(size=(5,)).astype(np.float16),
            "tags": ["a", {"b": None}],
        }
        for i in range(7)
    ]
    assert write_array_record(str(tmp_path / "part-0.array_record"), records[:4]) == 4
    assert write_array_record(str(tmp_path / "part-1.array_record"), records[4:]) == 3
    source = ArrayRecordSource(str(tmp_path / "part-*.array_record"))
    assert len(source) == 7
    for i, want in enumerate(records):
        got = source[i]
        assert set(got) == set(want)
        for key in ("image", "caption", "label", "score", "tags"):
            assert got[key] == want[key]
        for key in ("mask", "embedding"):
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key])
    source = pickle.loads(pickle.dumps(source))  # grain workers get a pickled copy
    assert source[6]["label"] == 6
    # Through the pipeline: the 20..26 x 24 images are smaller than a 32 crop, hence upscaled.
    batches = list(pipeline.build_dataset(source, image_size=CROP, global_batch_size=4, train=False, num_threads=2))
    stats = pipeline.image_stats({k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    assert stats["data/valid"] == 7 and stats["data/converted/upscaled"] == 7


def test_array_record_refuses_pickle_and_missing_files(tmp_path):
    with pytest.raises(TypeError):
        serialize_record({"x": object()})
    with pytest.raises(TypeError):
        serialize_record({"x": np.array([object()])})
    assert deserialize_record(serialize_record({"x": np.int64(3)})) == {"x": 3}
    with pytest.raises(FileNotFoundError, match="matches no file"):
        ArrayRecordSource(str(tmp_path / "*.array_record"))


def test_tfds_mock_data_through_the_pipeline():
    with tfds.testing.mock_data(num_examples=6):
        source = TfdsSource("imagenet2012", "train", raw_image_bytes=False)
        assert len(source) == 6
        record = source[0]
        assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
        assert 0 <= record["label"] < 1000 and record["caption"] == ""
        ds = pipeline.make_dataset(
            dict(source="tfds", name="imagenet2012", split="train", image_size=CROP, raw_image_bytes=False,
                 num_threads=2),
            global_batch_size=4, process_index=0, process_count=1, seed=0, train=True,
        )
        batch = next(iter(ds))
    assert batch["image"].shape == (4, CROP, CROP, 3) and batch["valid"].all()
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["index"].tolist()) <= set(range(6))


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset prepared on disk: encoded PNGs (one truncated), labels and captions."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "text": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            image = png_bytes(Image.new("RGB", (40, 36 + i), (40 * i, 0, 0)))
            if i == 4:
                image = image[:60]  # truncated: TFDS stores bytes as given
            yield i, {"image": image, "label": i % 3, "text": f"red level {i}"}


def test_tfds_raw_bytes_from_a_prepared_dataset(tmp_path):
    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = TfdsSource("tiny_images", "train", str(tmp_path), caption_key="text")
    assert len(source) == 5
    record = source[0]
    assert isinstance(record["image"], bytes) and record["image"][:4] == b"\x89PNG"  # decoding is ours
    (batch,) = list(pipeline.build_dataset(source, image_size=CROP, global_batch_size=5, train=False, num_threads=2))
    # TFDS shuffles examples when preparing: check each record's fields agree, not their order.
    levels = [int(c.rsplit(" ", 1)[1]) for c in batch["caption"]]
    assert sorted(levels) == list(range(5))
    for row, level in enumerate(levels):
        assert batch["label"][row] == level % 3
        assert bool(batch["valid"][row]) == (level != 4)
        if level != 4:
            assert abs((batch["image"][row, 0, 0, 0] + 1) * 127.5 - 40 * level) < 0.5
    assert pipeline.image_stats(batch)["data/skipped/corrupt"] == 1
    with pytest.raises(FileNotFoundError, match="cannot open TFDS dataset"):
        TfdsSource("tiny_images", "train", str(tmp_path / "elsewhere"))
