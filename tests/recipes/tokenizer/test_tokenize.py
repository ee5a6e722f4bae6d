"""`tokenflow-jax tokenize` on fake CPU devices with a small random tokenizer: the shards hold exactly
the codes of the tokenizer's own encode for every source image once, a re-run (on another mesh shape)
recomputes only the missing chunk, a different tokenizer or chunk layout is refused, and undecodable images
are left out and counted."""
import collections
import json
import os
import shutil

import numpy as np
import pytest

from tokenflow_jax import cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import token_shards, transforms
from tokenflow_jax.data.array_record import ArrayRecordSource
from tokenflow_jax.data.sources import ShapesSource
from tokenflow_jax.recipes.tokenizer import frozen

# Data-parallel over two devices (a re-run checks the (2, 2, 2) mesh): the same claims as over eight, cheaper.
SMALL = ["mesh.shape=(2, 1, 1)", "mesh.num_devices=2", "model.image_size=32", "data.image_size=32",
         "model.semantic_encoder.pos_grid=4",
         "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "quantizer.codebook_size=64"]
NUM_IMAGES = 20  # neither a multiple of the batch (8) nor of the chunk (8): both tails are partial
SHARDS = [f"tokens-P00000-C00000{c}.arrayrecord" for c in range(3)]


def tokenize_cli(out, *extra: str) -> int:
    return cli.main(["tokenize", "--config", "configs/tokenizer.py:tiny", "--data", "shapes", "--num-images",
                     str(NUM_IMAGES), "--batch-size", "8", "--chunk-size", "8", "--out", str(out),
                     *[f"--config.{o}" for o in SMALL], *extra])


def by_index(directory) -> dict[int, dict]:
    source = token_shards.tokenized_source(str(directory))
    records = [source[i] for i in range(len(source))]
    assert sorted(collections.Counter(r["index"] for r in records).values()) == [1] * len(records)
    return {r["index"]: r for r in records}


@pytest.fixture(scope="module")
def reference():
    """(indices [20, 21], captions) of the first 20 training shapes: the tokenizer's encode on one device."""
    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny"), SMALL)
    source = ShapesSource(NUM_IMAGES, 32, seed=0)
    images = np.stack([transforms.normalize(source[i]["image"]) for i in range(NUM_IMAGES)])
    model, variables = frozen.load_tokenizer(config, None, seed=config.seed)
    _, indices = frozen.encode_decode_fn(model)(variables, images)
    return np.asarray(indices), [source[i]["caption"] for i in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """One uninterrupted run, data-parallel over two devices."""
    out = tmp_path_factory.mktemp("tokenize") / "shapes"
    assert tokenize_cli(out) == 0
    return out


def test_shards_hold_the_tokenizers_codes_for_every_image_once(tokenized, reference):
    ref_indices, ref_captions = reference
    manifest = token_shards.read_manifest(str(tokenized))
    assert (manifest["scales"], manifest["codebook_size"], manifest["image_size"]) == ([1, 2, 4], 64, 32)
    assert manifest["tokens_per_image"] == 21 and manifest["indices_dtype"] == "uint16"
    assert manifest["num_records"] == NUM_IMAGES and manifest["num_bad_images"] == 0
    assert manifest["shards"] == [{"file": f, "records": n} for f, n in zip(SHARDS, (8, 8, 4))]
    assert sorted(os.listdir(tokenized)) == ["manifest.json"] + SHARDS  # no temporary file left
    assert ArrayRecordSource(str(tokenized / SHARDS[0]))[0]["indices"].dtype == np.uint16  # stored compactly

    records = by_index(tokenized)
    assert sorted(records) == list(range(NUM_IMAGES))
    indices = np.stack([records[i]["indices"] for i in range(NUM_IMAGES)])
    assert indices.dtype == np.int32 and indices.shape == (NUM_IMAGES, 21)
    np.testing.assert_array_equal(indices, ref_indices)
    assert [records[i]["caption"] for i in range(NUM_IMAGES)] == ref_captions
    assert len(np.unique(indices)) > 10  # random weights still spread over the codebook


def test_a_rerun_recomputes_only_the_missing_chunk_even_on_another_mesh(tokenized, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(tokenized, out)
    before = by_index(out)
    for name in SHARDS:
        os.utime(out / name, ns=(10**18, 10**18))  # a stamp no rewrite can keep
    # A run killed while writing chunk 1: no final file, half a temporary one, manifest not complete.
    (out / SHARDS[1]).unlink()
    (out / (SHARDS[1] + ".tmp")).write_bytes(b"half a chunk")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(ValueError, match="incomplete"):
        token_shards.tokenized_source(str(out))

    # Resumed on (data, fsdp, tensor) = (2, 2, 2): the batch over data x fsdp, the weights over fsdp and
    # tensor, so each process-local row comes back from two replicas; the codes must not change.
    capsys.readouterr()
    assert tokenize_cli(out, "--config.mesh.shape=(2, 2, 2)", "--config.mesh.num_devices=0") == 0
    assert "8 new in 1 chunks, 2 chunks kept" in capsys.readouterr().out
    assert [os.stat(out / n).st_mtime_ns == 10**18 for n in SHARDS] == [True, False, True]
    assert sorted(os.listdir(out)) == ["manifest.json"] + SHARDS
    after = by_index(out)
    assert sorted(after) == sorted(before)
    for i, record in before.items():
        np.testing.assert_array_equal(after[i]["indices"], record["indices"])
        assert after[i]["caption"] == record["caption"]

    assert tokenize_cli(out) == 0  # complete: nothing to encode
    assert "0 new in 0 chunks, 3 chunks kept" in capsys.readouterr().out


def test_another_tokenizer_or_chunk_layout_is_refused(tokenized, tmp_path, capsys):
    out = tmp_path / "tokens"
    shutil.copytree(tokenized, out)
    capsys.readouterr()
    assert tokenize_cli(out, "--config.quantizer.codebook_size=512") == 2
    err = capsys.readouterr().err
    assert "quantizer.codebook_size: 64 there, 512 now" in err and "another --out" in err
    assert tokenize_cli(out, "--chunk-size", "4") == 2
    assert "chunk_size: 8 there, 4 now" in capsys.readouterr().err
    assert token_shards.read_manifest(str(out)) == token_shards.read_manifest(str(tokenized))  # left alone


def test_undecodable_images_are_left_out_and_counted(broken_folder, tmp_path):
    root, files = broken_folder
    out = tmp_path / "tokens"
    assert tokenize_cli(out, "--data", root, "--num-images", "0") == 2  # a user error, one clear line
    assert cli.main(["tokenize", "--config", "configs/tokenizer.py:tiny", "--data", root, "--batch-size", "8",
                     "--out", str(out), *[f"--config.{o}" for o in SMALL]]) == 0
    names = sorted(files)
    good = {i for i, name in enumerate(names) if files[name][1] is None}
    records = by_index(out)
    assert set(records) == good
    assert records[0]["caption"] == "a red rectangle" and records[2]["caption"] == ""
    manifest = token_shards.read_manifest(str(out))
    assert manifest["num_bad_images"] == len(names) - len(good) == 3
    assert manifest["data"]["source"] == "folder" and manifest["data"]["path"] == root
