"""`tokenflow-jax eval` on a small random tokenizer checkpoint: the command's table and JSON agree with an
independent per-image computation (skimage PSNR/SSIM, our model run directly, codes counted by hand)."""
import json

import jax
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenflow_jax import checkpoint, cli
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import pipeline
from tokenflow_jax.recipes.tokenizer import evaluate as tokenizer_eval
from tokenflow_jax.recipes.tokenizer import frozen

SMALL = ["mesh.num_devices=1", "model.image_size=32", "data.image_size=32", "model.semantic_encoder.pos_grid=4",
         "model.semantic_decoder.pos_grid=4", "quantizer.scales=(1, 2, 4)", "quantizer.codebook_size=64"]
NUM_IMAGES = 6  # not a multiple of the batch: the padded tail must not count


def test_eval_command_matches_an_independent_computation(tmp_path, capsys):
    """One `eval --semantic` run (one compiled evaluation program) checked against the same images run through the
    model directly: PSNR and SSIM from skimage; per scale the codes used and exp(entropy) of the code histogram
    counted by hand; the semantic decoder's features against the teacher's, cosine per token averaged by hand."""
    from collections import Counter

    from tokenflow_jax.recipes.tokenizer import teacher as teacher_lib

    config = config_lib.apply_overrides(config_lib.load_config("configs/tokenizer.py:tiny"), SMALL)
    model, variables = frozen.load_tokenizer(config, None, seed=3)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_variables(ckpt, jax.device_get(variables), {"config_spec": "configs/tokenizer.py:tiny"})

    out = tmp_path / "eval.json"
    argv = ["eval", "--config", "configs/tokenizer.py:tiny", "--checkpoint", ckpt, "--num-images", str(NUM_IMAGES),
            "--batch-size", "4", "--semantic", "--out", str(out)] + [f"--config.{o}" for o in SMALL]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "SSIM (data range 2, reference convention)" in printed and "rFID" in printed
    results = json.loads(out.read_text())
    assert results["num_images"] == NUM_IMAGES

    # The same images, the same model, metrics from skimage.
    data = tokenizer_eval.eval_data_config(config, NUM_IMAGES)
    images = np.concatenate([b["image"][b["valid"]] for b in pipeline.make_dataset(
        data, global_batch_size=4, process_index=0, process_count=1, seed=config.seed, train=False)])[:NUM_IMAGES]
    semantic, recon, _, _, indices = jax.jit(model.apply)(variables, images)
    real = np.round((images + 1.0) * 127.5).astype(np.uint8)
    fake = np.floor(np.clip(127.5 * np.asarray(recon) + 128.0, 0, 255)).astype(np.uint8)
    psnr = np.mean([peak_signal_noise_ratio(r, f, data_range=255) for r, f in zip(real, fake)])
    ssim1 = np.mean([structural_similarity(r / 255.0, f / 255.0, data_range=1.0, channel_axis=-1)
                     for r, f in zip(real, fake)])
    np.testing.assert_allclose(results["psnr"], psnr, rtol=1e-5)
    np.testing.assert_allclose(results["ssim"], ssim1, atol=1e-5)
    assert results["ssim_range2"] > results["ssim"]  # the larger range inflates SSIM (the reference's convention)
    assert 0 < results["lpips"] < 2 and np.isfinite(results["rfid"]) and results["rfid"] > 0

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
    target = np.asarray(teacher_lib.SemanticTeacher(teacher_config).apply(
        {"params": teacher_lib.load_teacher_params(config, teacher_config)}, images), np.float64)
    pred = np.asarray(semantic, np.float64)
    cosine = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    np.testing.assert_allclose(results["semantic_cosine"], cosine.mean(), rtol=1e-4)
