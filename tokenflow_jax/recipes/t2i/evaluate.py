"""``tokenflow-jax eval-shapes``: ShapesEval of a t2i checkpoint, multi-step against single-step sampling.

    tokenflow-jax eval-shapes --config configs/sample.py:tiny --checkpoint RUN/checkpoints \\
        [--num-per-category 20] [--loops 1,3] [--out FILE.json]

For the prompts of :func:`shapes_eval.make_prompts` (GenEval's six categories in the shapes world) it
generates one image per prompt with each sampling strategy (``loops`` = the reference's presets: 1 = one
pass per scale with top-k 600 / top-p 0.6; 3 = the paper's default [1200, 100, 1] / [0.8, 0.8, 0]; top-k
clipped to K) and scores them with the analytic detector, the reference's Table 6 in miniature. Two
yardsticks frame the figures:

  * ceiling: the prompt's own scene rendered and passed through the tokenizer (encode + decode), what a
    perfect generator with this tokenizer would score;
  * chance: the same reconstructions paired with a different prompt of the same category (a shifted
    list), what a generator drawing good images that ignore the prompt would score.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from tokenflow_jax.data import images as image_io
from tokenflow_jax.ops import sampling
from tokenflow_jax.recipes.t2i.sample import ImageGenerator, clipped, local_rows
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.shapes import detector as shapes_eval
from tokenflow_jax.shapes import scenes as shapes
from tokenflow_jax.utils import batching
from tokenflow_jax.utils.logs import progress_bar

logger = logging.getLogger(__name__)


def _in_batches(generator, texts: list[str], schedule, desc: str = "sample") -> np.ndarray:
    """uint8 images [len(texts), H, W, 3], one per prompt (sample index 0), in global batches."""

    batch = int(generator.config.batch_size)
    out = []
    bar = progress_bar(0, len(texts), jax.process_index() == 0, desc, unit="img")
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        rows = batching.pad_rows(chunk, batch)
        index = list(range(start, start + batch))
        _, images, _ = generator.sample(rows, index, [0] * batch, schedule)
        out.append(local_rows(images)[: len(chunk)])
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(out, axis=0)


def tokenizer_round_trip(generator, prompts) -> np.ndarray:
    """The prompts' scenes rendered at the tokenizer's size, encoded and decoded: uint8 [N, H, W, 3]."""

    size = generator.image_size
    renders = np.stack([shapes.render(p.scene, size) for p in prompts]).astype(np.float32) / 127.5 - 1.0
    run = frozen.encode_decode_fn(generator.tok_model)
    recon = np.concatenate([np.asarray(run(generator.tok_vars, renders[i : i + 16])[0])
                            for i in range(0, len(renders), 16)])
    return image_io.model_to_uint8(recon)


def shifted_within_category(prompts) -> list:
    """Each prompt paired with the next prompt of its category (cyclically): the chance pairing."""
    by_category: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_category.setdefault(p.category, []).append(i)
    partner = {}
    for members in by_category.values():
        for k, i in enumerate(members):
            partner[i] = members[(k + 1) % len(members)]
    return [prompts[partner[i]] for i in range(len(prompts))]


def evaluate(generator, num_per_category: int, loops: list[int], seed: int = 0) -> dict[str, Any]:
    prompts = shapes_eval.make_prompts(num_per_category, seed)
    texts = [p.text for p in prompts]
    results: dict[str, Any] = {"num_prompts": len(prompts), "strategies": {}}
    k = generator.model.config.codebook_size
    for loop in loops:
        schedule = clipped(sampling.SamplingSchedule.preset(loop), k)
        start = time.time()
        images = _in_batches(generator, texts, schedule, f"{loop}-step sampling")
        seconds = time.time() - start
        scored = shapes_eval.evaluate(prompts, images)
        scored.update(top_k=list(schedule.top_k), top_p=list(schedule.top_p), seconds=seconds,
                      images_per_second=len(prompts) / seconds)
        results["strategies"][f"{loop}-step"] = scored
        logger.info("%d-step sampling: overall %.1f%% (%.1f images/s)", loop, 100 * scored["overall"],
                    len(prompts) / seconds)
    recon = tokenizer_round_trip(generator, prompts)
    results["ceiling"] = shapes_eval.evaluate(prompts, recon)
    results["chance"] = shapes_eval.evaluate(shifted_within_category(prompts), recon)
    results["settings"] = generator.settings()
    return results


def format_table(results: dict[str, Any]) -> str:
    columns = list(results["strategies"].items()) + [("chance (other prompt's scene)", results["chance"]),
                                                      ("ceiling (tokenizer round trip)", results["ceiling"])]
    header = "| category | " + " | ".join(name for name, _ in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for category in shapes_eval.CATEGORIES:
        cells = [f"{100 * r['categories'][category]['accuracy']:.1f}%" if category in r["categories"] else "-"
                 for _, r in columns]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{100 * r['overall']:.1f}%**" for _, r in columns) + " |")
    return "\n".join(lines)


def run(config, checkpoint_dir: str, num_per_category: int, loops: list[int], out_file: str | None) -> int:

    generator = ImageGenerator(config, checkpoint_dir)
    results = evaluate(generator, num_per_category, loops, seed=int(config.seed))
    print(format_table(results))
    out_file = out_file or os.path.join(checkpoint_dir, "shapes_eval.json")
    if jax.process_index() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out_file}")
    return 0
