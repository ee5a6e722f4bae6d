"""The VLM trainer: sharded steps, exact resume, stage selection by regex, stage 2 from stage 1, buckets, and
the chat / eval-vqa commands on its checkpoint."""
import json
import os

import numpy as np
import pytest

from tests.recipes.runs import preempted_copy, read_metrics, restored_params
from tokenflow_jax import cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.errors import DataError
from tokenflow_jax.recipes.vlm import evaluate as vqa_eval
from tokenflow_jax.recipes.vlm import setup as vlm_setup
from tokenflow_jax.recipes.vlm import train as vlm_trainer

# A smaller decoder than configs/vlm.py:tiny and one device unless a test is about sharding keep
# every compile short; data, tokenizer and step are real.
SMALL = ["mesh.shape=(1, 1, 1)", "mesh.num_devices=1", "model.llm.width=64", "model.llm.depth=2",
         "model.llm.num_heads=4", "model.llm.num_kv_heads=2", "model.llm.mlp_dim=128", "train.global_batch_size=8",
         "train.log_every=1", "train.checkpoint_every=2", "train.async_checkpoints=False", "data.num_examples=64",
         "generate.batch_size=8"]


def small_config(arg="tiny", *overrides):
    config = config_lib.load_config(f"configs/vlm.py:{arg}")
    config_lib.apply_overrides(config, SMALL + list(overrides))
    with config.unlocked():
        config.config_spec = f"configs/vlm.py:{arg}"
        config.config_overrides = SMALL + list(overrides)
    return config


def test_steps_on_the_222_mesh_learn_and_resume_exactly(tmp_path):
    """A run preempted after its step-2 checkpoint and restarted ends with the uninterrupted run's parameters and
    losses, bit for bit, on the (2, 2, 2) mesh; only assistant tokens are trained."""
    mesh = ["mesh.shape=(2, 2, 2)", "mesh.num_devices=0", "optim.warmup_steps=1", "optim.decay_steps=4"]
    full = str(tmp_path / "full")
    vlm_trainer.train(small_config("tiny", "train.num_steps=4", *mesh), full)
    part = preempted_copy(full, str(tmp_path / "part"), step=2)
    vlm_trainer.train(small_config("tiny", "train.num_steps=4", *mesh), part)
    a, b = restored_params(full, 4), restored_params(part, 4)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows_full, rows_part = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in rows_part] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_full] == [r["loss"] for r in rows_part]
    # Short answers: a handful of trained tokens per row, never the whole sequence.
    assert all(8 <= r["trained_tokens"] <= 8 * 40 for r in rows_full)
    assert rows_full[0]["loss"] == pytest.approx(np.log(83), abs=0.5)  # vocabulary of builtin:shapes_chat


def test_stage1_trains_only_the_projector_and_stage2_starts_from_it(tmp_path):
    s1 = str(tmp_path / "s1")
    vlm_trainer.train(small_config("tiny,stage=1", "train.num_steps=3", "train.checkpoint_every=1",
                                   "optim.warmup_steps=1", "optim.decay_steps=4"), s1)
    before, after = restored_params(s1, 1), restored_params(s1, 3)
    for key in before:
        changed = not np.array_equal(before[key], after[key])
        assert changed == key.startswith("params/projector/"), key
    # Stage 2 from stage 1's checkpoint: every parameter is loaded (the aligned projector included), then
    # everything trains.
    s2 = str(tmp_path / "s2")
    vlm_trainer.train(small_config("tiny,stage=2", "train.num_steps=1", f"model.init_checkpoint={s1}/checkpoints",
                                   "optim.warmup_steps=0", "optim.decay_steps=2", "train.checkpoint_every=1"), s2)
    # Stage 2's first update starts from stage 1's final parameters (lr 2e-5 barely moves them).
    loaded = restored_params(s2, 1)
    for key in after:
        np.testing.assert_allclose(loaded[key], after[key], atol=1e-3, err_msg=key)
        assert key.startswith("params/projector/") or not np.array_equal(loaded[key], after[key]) or \
            key.endswith("bias"), key


def test_trim_to_bucket_agrees_on_the_longest_row():
    batch = {"image": np.zeros((2, 4, 4, 3)), "length": np.array([5, 9]), "valid": np.array([True, False]),
             "input_ids": np.arange(24).reshape(2, 12), "labels": np.arange(24).reshape(2, 12)}
    out = vlm_setup.trim_to_bucket(batch, (6, 10, 12))
    assert out["input_ids"].shape == (2, 10)
    np.testing.assert_array_equal(out["attention_mask"].sum(1), [5, 9])
    assert (out["labels"][1] == -100).all() and (out["labels"][0] == np.arange(10)).all()
    config = small_config("tiny", "train.length_buckets=(64, 100)")
    with pytest.raises(ValueError, match="end at config.data.max_length=128"):
        vlm_setup.length_buckets(config)


def test_score_reports_accuracy_and_majority_chance():
    questions = [{"answer": a, "category": c} for a, c in
                 [("two", "count"), ("2", "count"), ("3", "count"), ("red", "colour"), ("blue", "colour")]]
    table = vqa_eval.score(questions, ["2", "Two.", "1", "Red", "green"])
    assert table["count"] == {"n": 3, "accuracy": 2 / 3, "chance": 2 / 3}
    assert table["colour"]["accuracy"] == 0.5 and table["overall"]["accuracy"] == 3 / 5


def test_chat_and_eval_vqa_commands_on_a_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["--config.model.llm.width=64", "--config.model.llm.depth=2", "--config.model.llm.num_heads=4",
            "--config.model.llm.num_kv_heads=2", "--config.model.llm.mlp_dim=128",
            "--config.train.global_batch_size=8", "--config.train.num_steps=2", "--config.optim.warmup_steps=1",
            "--config.optim.decay_steps=2", "--config.train.async_checkpoints=False",
            # One device (sharding is the 222 test's): eval-vqa and chat inherit it from the checkpoint's config.
            "--config.mesh.shape=(1, 1, 1)", "--config.mesh.num_devices=1"]
    assert cli.main(["train", "--config", "configs/vlm.py:tiny", "--workdir", run] + args) == 0
    from tokenflow_jax.shapes import vqa as shapes_vqa

    qfile = shapes_vqa.write_question_file(str(tmp_path / "q"), 2, seed=5, image_size=64)
    out = str(tmp_path / "vqa.json")
    ckpt = os.path.join(run, "checkpoints")
    # The checkpoint's own config (with the overrides it was trained with) is used: no --config needed.
    assert cli.main(["eval-vqa", "--checkpoint", ckpt, "--data", qfile, "--out", out,
                     "--config.generate.batch_size=4"]) == 0
    result = json.load(open(out))
    assert result["results"]["overall"]["n"] == 10
    assert 0 <= result["results"]["overall"]["accuracy"] <= 1
    first = json.loads(open(qfile).readline())
    capsys.readouterr()
    image = os.path.join(os.path.dirname(qfile), first["image"])
    question = "Describe the image."
    assert cli.main(["chat", "--checkpoint", ckpt, "--image", image, "--prompt", question]) == 0
    streamed = capsys.readouterr().out.strip()
    # The streamed reply (its exact prompt) equals the batched answer to the same question, whose prompt the
    # batched answerer pads to its length bucket.
    from tokenflow_jax.data import images as image_io
    from tokenflow_jax.recipes.vlm.answer import VqaModel

    config = cli._load_config(None, [], ckpt)
    vqa = VqaModel.load(config, ckpt)
    assert vqa.prompts([question], bucket=True)[0].shape[1] > vqa.prompts([question])[0].shape[1]
    # Four rows, eval-vqa's batch above: the same compiled answer program.
    batched = vqa.answer([np.asarray(image_io.read_image(image))] * 4, [question] * 4)
    assert batched == [streamed] * 4
    # Missing checkpoint: a clear error.
    assert cli.main(["eval-vqa", "--config", "configs/vlm.py:tiny", "--checkpoint", str(tmp_path / "none")]) == 2


def test_a_prompt_longer_than_the_model_positions_is_one_error_naming_the_lengths():
    """Checked before anything is encoded or compiled (the KV cache would otherwise fail inside the model)."""
    from types import SimpleNamespace

    from tokenflow_jax.recipes.vlm.answer import VqaModel

    config = config_lib.load_config("configs/vlm.py:tiny")
    model = SimpleNamespace(config=SimpleNamespace(num_image_tokens=64, llm=SimpleNamespace(max_positions=256)))
    vqa = VqaModel(config, model, None, None, None, vlm_setup.text_tokenizer(config),
                   SimpleNamespace(max_new_tokens=16), None, 64, None)
    ids, _ = vqa.prompts(["How many circles are there?"])
    assert 64 < ids.shape[1] <= 256 - 16
    with pytest.raises(DataError, match=r"the prompt is \d+ tokens, 64 of them the image's; with "
                                        r"config.generate.max_new_tokens=16 it needs \d+ positions, more than "
                                        r"config.model.llm.max_positions=256"):
        vqa.prompts(["How many circles are there? " * 40])
