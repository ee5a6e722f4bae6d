"""Inference on a unified checkpoint: `generate`, `eval-shapes`, `chat` and `eval-vqa` take it unchanged, one
loaded model serves both tasks, and `--rerank N` keeps the candidate the model's own caption likelihood ranks
first."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.recipes.unified.test_train import ONE_DEVICE, small_config
from tokenflow_jax import cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.models import vlm
from tokenflow_jax.recipes.t2i import evaluate as generation_eval
from tokenflow_jax.recipes.unified import serve
from tokenflow_jax.recipes.unified import train as unified_trainer
from tokenflow_jax.shapes import scenes as shapes

# One sampler program for every test here: the official script's one-pass strategy (eval-shapes' `--loops 1`) at
# batch 4, on one device. Answers too are asked 4 at a time (eval-vqa's batch), one answer program.
SAMPLE = ["--config.sample.loops=1", "--config.mesh.shape=(1, 1, 1)", "--config.mesh.num_devices=1",
          "--config.batch_size=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("unified"))
    # test_train.py's one-device resume trains the same step (one compile for both files).
    unified_trainer.train(small_config(*ONE_DEVICE, "train.cond_drop_rate=0.25"), workdir)
    return os.path.join(workdir, "checkpoints")


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_one_loaded_model_serves_generation_answers_and_the_judge(run):
    server = serve.UnifiedServer(serve.recorded_config(run), run)
    generator = server.image_generator(config_lib.build_config("configs/sample.py:tiny", SAMPLE))
    vqa, judge = server.vqa_model(), server.caption_judge()
    assert generator.params is vqa.params is judge.vqa.params is server.params  # the same arrays, not copies
    assert generator.tok_vars is vqa.tok_vars
    _, images, _ = generator.sample(["a red circle", "two blue squares"] * 2, [0, 1, 0, 1], [0, 0, 1, 1])
    answers = vqa.answer(list(np.asarray(images)), ["How many objects are there?"] * 4)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)

    # The judge's score is log p(prompt | image, "Describe the image.") under the VLM half: checked against the
    # model's logits summed here with an explicit loop over the trained positions.
    prompts = ["a red circle", "two blue squares"]
    pixels = np.stack([shapes.render(shapes.sample_scene(np.random.default_rng(i)), 64) for i in range(2)])
    scores = judge(prompts, pixels)
    batch = judge.encode(prompts)
    # Jitted (op by op, the tokenizer's encoder alone takes ~10 s to dispatch here).
    features = jax.jit(lambda v, x: vlm.visual_features(vqa.tok_model, v, x, "final"))(
        vqa.tok_vars, jnp.asarray(np.stack([vqa.preprocess(p) for p in pixels])))
    answer_logits = jax.jit(lambda p, *a: server.model.apply({"params": p}, *a,
                                                             method=type(server.model).answer_logits))
    logits = np.asarray(answer_logits(server.params, jnp.asarray(batch["input_ids"]), features,
                                      jnp.asarray(batch["attention_mask"])), np.float64)
    for row in range(2):
        expected = 0.0
        for t in np.nonzero(batch["labels"][row] != -100)[0]:
            z = logits[row, t - 1]
            expected += z[batch["labels"][row, t]] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
        assert expected < 0
        np.testing.assert_allclose(scores[row], expected, rtol=1e-4)
    trained = [int(t) for t in batch["labels"][0] if t != -100]
    assert vqa.tokenizer.decode(trained, skip_special_tokens=True).strip() == "a red circle"


def test_generate_with_rerank_keeps_the_judges_choice(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    checkpoint = ["--checkpoint", run, "--prompts", str(prompts)]
    assert cli.main(["generate", "--config", "configs/sample.py:tiny", *checkpoint, "--out", str(tmp_path / "all"),
                     "--per-prompt", "3", *SAMPLE]) == 0
    assert cli.main(["generate", "--config", "configs/sample.py:tiny", *checkpoint, "--out", str(tmp_path / "best"),
                     "--per-prompt", "1", "--rerank", "3", *SAMPLE]) == 0
    every = {(r["prompt_index"], r["sample_index"]): r for r in _manifest(tmp_path / "all")}
    for record in _manifest(tmp_path / "best"):
        scores = record["candidate_scores"]
        assert record["rerank"] == 3 and len(scores) == 3 and record["candidate"] == int(np.argmax(scores))
        # Candidate c of image (i, 0) is the plain sampler's image (i, c).
        kept = every[(record["prompt_index"], record["candidate"])]
        assert record["indices"] == kept["indices"]
        a = np.asarray(Image.open(tmp_path / "best" / record["file"]), np.int16)
        b = np.asarray(Image.open(tmp_path / "all" / kept["file"]), np.int16)
        assert np.abs(a - b).max() <= 1
    assert len({tuple(every[(0, c)]["indices"]) for c in range(3)}) > 1  # the candidates differ


def test_eval_shapes_chat_and_eval_vqa_accept_the_unified_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "shapes.json"
    assert cli.main(["eval-shapes", "--config", "configs/sample.py:tiny", "--checkpoint", run, "--loops", "1",
                     "--num-per-category", "1", "--rerank", "2", "--out", str(out), *SAMPLE]) == 0
    strategies = json.loads(out.read_text())["strategies"]
    assert set(strategies) == {"1-step", "1-step, mean of 2", "1-step, best of 2 by the model",
                               "1-step, best of 2 by the detector"}
    overall = {name: row["overall"] for name, row in strategies.items()}
    assert overall["1-step, best of 2 by the detector"] >= max(overall["1-step, best of 2 by the model"],
                                                               overall["1-step, mean of 2"])

    image = tmp_path / "scene.png"
    Image.fromarray(shapes.render(shapes.sample_scene(np.random.default_rng(0)), 64)).save(image)
    capsys.readouterr()
    question = ["--prompt", "How many circles are there?"]
    assert cli.main(["chat", "--checkpoint", run, "--image", str(image), *question]) == 0
    assert capsys.readouterr().out.endswith("\n")
    vqa_out = tmp_path / "vqa.json"
    assert cli.main(["eval-vqa", "--checkpoint", run, "--num-per-category", "2", "--out", str(vqa_out),
                     "--config.generate.batch_size=4"]) == 0
    results = json.loads(vqa_out.read_text())["results"]
    assert results["overall"]["n"] == 10  # 5 question categories x 2


def test_rerank_needs_a_unified_checkpoint(tmp_path):
    sample_config = config_lib.build_config("configs/sample.py:tiny")
    with pytest.raises(cli.ConfigError, match="--rerank needs a unified checkpoint"):
        generation_eval.run(sample_config, str(tmp_path), 1, [1], None, rerank=2)
