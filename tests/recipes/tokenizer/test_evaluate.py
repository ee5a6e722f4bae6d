"""`tokenflow-jax eval` on a small random tokenizer checkpoint: the command's table and JSON agree with an
independent per-image computation (skimage PSNR/SSIM, our model run directly, codes counted by hand), and in the slow
tier its rFID agrees with InceptionV3 features of the same images computed directly."""
import json

import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import pipeline
from tokenflow_jax.eval import fid
from tokenflow_jax.models.inception import InceptionV3, load_fid_inception_params, resize_for_inception
from tokenflow_jax.recipes.tokenizer import evaluate as tokenizer_eval
from tokenflow_jax.recipes.tokenizer import frozen

SMALL = ["mesh.num_devices=1", "model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
         "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "quantizer.codebook_size=64"]
NUM_IMAGES = 6  # not a multiple of the batch: the padded tail must not count


def run_eval(tmp_path, *flags):
    """Saves a random tiny tokenizer, runs `eval` on it; (config, model, variables, results, printed table, the
    evaluated images [N, 32, 32, 3] in [-1, 1])."""
    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny"), SMALL)
    model, variables = frozen.load_tokenizer(config, None, seed=3)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_variables(ckpt, jax.device_get(variables), {"config_spec": "configs/tokenizer.py:tiny"})
    out = tmp_path / "eval.json"
    argv = ["eval", "--config", "configs/tokenizer.py:tiny", "--checkpoint", ckpt, "--num-images", str(NUM_IMAGES),
            "--batch-size", "4", "--out", str(out), *flags] + [f"--config.{o}" for o in SMALL]
    assert cli.main(argv) == 0
    data = tokenizer_eval.eval_data_config(config, NUM_IMAGES)
    images = np.concatenate([b["image"][b["valid"]] for b in pipeline.make_dataset(
        data, global_batch_size=4, process_index=0, process_count=1, seed=config.seed, train=False)])[:NUM_IMAGES]
    return config, model, variables, json.loads(out.read_text()), images


def uint8_images(images, recon):
    """The evaluation's 8-bit levels of the inputs and the reconstructions (reference conventions)."""
    real = np.round((images + 1.0) * 127.5).astype(np.uint8)
    fake = np.floor(np.clip(127.5 * np.asarray(recon) + 128.0, 0, 255)).astype(np.uint8)
    return real, fake


def test_eval_command_matches_an_independent_computation(tmp_path, capsys):
    """One `eval --semantic --no-fid` run (one compiled evaluation program) checked against the same images run
    through the model directly: PSNR and SSIM from skimage; per scale the codes used and exp(entropy) of the code
    histogram counted by hand; the semantic decoder's features against the teacher's, cosine per token averaged by
    hand. rFID (a 2048 x 2048 matrix square root, ~15 s on 2 cores whatever the image count) is the slow test's."""
    from collections import Counter

    from tokenflow_jax.recipes.tokenizer import teacher as teacher_lib

    config, model, variables, results, images = run_eval(tmp_path, "--semantic", "--no-fid")
    printed = capsys.readouterr().out
    assert "SSIM (data range 2, reference convention)" in printed and "rFID" not in printed
    assert results["num_images"] == NUM_IMAGES and "rfid" not in results

    # The same images, the same model, metrics from skimage.
    semantic, recon, _, _, indices = jax.jit(model.apply)(variables, images)
    real, fake = uint8_images(images, recon)
    psnr = np.mean([peak_signal_noise_ratio(r, f, data_range=255) for r, f in zip(real, fake)])
    ssim1 = np.mean([structural_similarity(r / 255.0, f / 255.0, data_range=1.0, channel_axis=-1)
                     for r, f in zip(real, fake)])
    np.testing.assert_allclose(results["psnr"], psnr, rtol=1e-5)
    np.testing.assert_allclose(results["ssim"], ssim1, atol=1e-5)
    assert results["ssim_range2"] > results["ssim"]  # the larger range inflates SSIM (the reference's convention)
    assert 0 < results["lpips"] < 2

    indices = np.asarray(indices)
    k = config.quantizer.codebook_size
    for s, (a, b) in zip((1, 2, 4), [(0, 1), (1, 5), (5, 21)]):
        assert results["codebook_usage_per_scale"][f"scale_{s}"] == len(np.unique(indices[:, a:b])) / k
        counts = np.array(list(Counter(indices[:, a:b].ravel().tolist()).values()), float)
        p = counts / counts.sum()
        assert results["codes_used_per_scale"][f"scale_{s}"] == len(counts)
        np.testing.assert_allclose(results["codebook_perplexity_per_scale"][f"scale_{s}"],
                                   np.exp(-(p * np.log(p)).sum()), rtol=1e-9)
    assert results["codebook_usage"] == len(np.unique(indices)) / k
    assert results["codebook_perplexity_per_scale"]["scale_4"] > 1.0  # a random tokenizer spreads its codes

    teacher_config = teacher_lib.teacher_config(config)
    target = np.asarray(jax.jit(teacher_lib.SemanticTeacher(teacher_config).apply)(
        {"params": teacher_lib.load_teacher_params(config, teacher_config)}, images), np.float64)
    pred = np.asarray(semantic, np.float64)
    cosine = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    np.testing.assert_allclose(results["semantic_cosine"], cosine.mean(), rtol=1e-4)


# Slow tier: the matrix square root of pytorch-fid's formula takes ~15 s on 2 cores even for 6 images. The fast tier
# checks the formula (tests/eval/test_fid.py) and the Inception network (tests/models/test_inception.py) apart.
@pytest.mark.slow
def test_eval_rfid_is_the_distance_between_inception_features_of_the_images(tmp_path, capsys):
    _, model, variables, results, images = run_eval(tmp_path)
    assert "rFID" in capsys.readouterr().out
    real, fake = uint8_images(images, jax.jit(model.apply)(variables, images)[1])
    inception = jax.jit(lambda u8: InceptionV3().apply({"params": load_fid_inception_params()},
                                                        resize_for_inception(u8)))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in
             (np.asarray(inception(u8.astype(np.float32)), np.float64) for u8 in (real, fake))]
    np.testing.assert_allclose(results["rfid"], fid.frechet_distance(*stats[0], *stats[1]), rtol=1e-3)
