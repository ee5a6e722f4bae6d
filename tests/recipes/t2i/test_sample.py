"""`tokenflow-jax generate` and `eval-shapes` on a small t2i checkpoint (random tokenizer)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tokenflow_jax import cli
from tokenflow_jax.recipes.t2i import evaluate as generation_eval
from tokenflow_jax.shapes import detector as shapes_eval
from tokenflow_jax.shapes import scenes as shapes

SMALL = ["--config.model.llm.width=64", "--config.model.llm.depth=2", "--config.model.llm.num_heads=4",
         "--config.model.llm.num_kv_heads=2", "--config.model.llm.mlp_dim=128", "--config.train.global_batch_size=8",
         "--config.train.num_steps=2", "--config.train.checkpoint_every=2", "--config.train.async_checkpoints=False",
         "--config.mesh.shape=(1, 1, 1)", "--config.mesh.num_devices=1"]
# Two devices, not the config's eight: the sampler still runs data-parallel, and compiles in half the time.
TWO_DEVICES = ["--config.mesh.shape=(2, 1, 1)", "--config.mesh.num_devices=2"]
# The official script's one-pass strategy at batch 8 is also what the eval-shapes test samples with: one sampler
# program (compiled once, then loaded from the persistent cache) serves both tests' batch-8 calls.
SAMPLE = ["--config.sample.loops=1", *TWO_DEVICES]
LONG = " ".join(["a red circle and a blue square"] * 5)  # 35 words: more than the 22 the prefix has room for


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("t2i"))
    assert cli.main(["train", "--config", "configs/t2i.py:tiny", "--workdir", workdir, *SMALL]) == 0
    return workdir


def generate(run_dir, prompts, out, *extra):
    return cli.main(["generate", "--config", "configs/sample.py:tiny",
                     "--checkpoint", os.path.join(run_dir, "checkpoints"), "--prompts", str(prompts),
                     "--out", str(out), "--per-prompt", "2", *SAMPLE, *extra])


def test_generate_writes_images_grids_manifest_and_resumes(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n" + LONG + "\n")
    out = tmp_path / "out"
    assert generate(run_dir, prompts, out, "--config.batch_size=8") == 0
    names = sorted(os.listdir(out / "images"))
    assert names == [f"{i:05d}_{j:02d}.png" for i in range(3) for j in range(2)]
    first = {n: np.asarray(Image.open(out / "images" / n)) for n in names}
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in first.values())
    assert not np.array_equal(first["00000_00.png"], first["00000_01.png"])  # two samples differ
    grid = np.asarray(Image.open(out / "grids" / "00001.png"))
    assert grid.shape == (64 + 4, 2 * 64 + 6, 3)
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in lines] == [(i, j) for i in range(3) for j in range(2)]
    assert [r["truncated"] for r in lines] == [False] * 4 + [True] * 2
    assert lines[2]["prompt"] == "two blue squares" and lines[2]["file"] == "images/00001_00.png"
    assert len(lines[0]["indices"]) == 121 and lines[0]["top_k"] == [600] and lines[0]["seed"] == 0

    # Re-running skips finished batches; a removed image is made again, identical, and nothing else changes.
    os.remove(out / "images" / "00002_01.png")
    mtimes = {n: os.path.getmtime(out / "images" / n) for n in names if n != "00002_01.png"}
    assert generate(run_dir, prompts, out, "--config.batch_size=2") == 0
    assert {n: os.path.getmtime(out / "images" / n) for n in mtimes} == {
        **mtimes, "00002_00.png": os.path.getmtime(out / "images" / "00002_00.png")}
    # Keys are per (prompt, sample): the batch redone alone at size 2 (rows 4 and 5 of the first run's batch of 8)
    # has the same codes, and the same pixels up to one uint8 level (the decoder's float sums differ with the
    # batch size).
    redone = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["indices"] for r in redone] == [r["indices"] for r in lines]
    for n in ("00002_00.png", "00002_01.png"):
        np.testing.assert_allclose(np.asarray(Image.open(out / "images" / n)), first[n], atol=1, err_msg=n)


def test_generate_errors(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert generate(run_dir, empty, tmp_path / "o") == 2
    assert "has no prompts" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert generate(str(tmp_path / "nowhere"), prompts, tmp_path / "o") == 2
    assert "no t2i or unified checkpoint there" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a red circle"}\n')
    assert generate(run_dir, bad, tmp_path / "o") == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_eval_shapes_table(run_dir, tmp_path, capsys):
    out = tmp_path / "shapes.json"
    assert cli.main(["eval-shapes", "--config", "configs/sample.py:tiny", "--checkpoint",
                     os.path.join(run_dir, "checkpoints"), "--num-per-category", "2", "--loops", "1",
                     "--out", str(out), "--config.batch_size=8", *TWO_DEVICES]) == 0
    results = json.loads(out.read_text())
    assert results["num_prompts"] == 12 and results["strategies"]["1-step"]["total"] == 12
    assert results["strategies"]["1-step"]["top_k"] == [600] and results["ceiling"]["total"] == 12
    assert "| **overall** |" in capsys.readouterr().out


def test_chance_pairs_each_prompt_with_another_of_its_category():
    prompts = shapes_eval.make_prompts(3, 0)
    shifted = generation_eval.shifted_within_category(prompts)
    assert [p.category for p in shifted] == [p.category for p in prompts]
    assert all(a.text != b.text for a, b in zip(prompts, shifted))
    # A render of the prompt's own scene passes; chance pairs score far lower.
    renders = [shapes.render(p.scene, 64) for p in prompts]
    assert shapes_eval.evaluate(prompts, renders)["overall"] == 1.0
    assert shapes_eval.evaluate(shifted, renders)["overall"] < 0.8
