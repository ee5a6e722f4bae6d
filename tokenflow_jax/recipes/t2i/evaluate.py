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
from tokenflow_jax.recipes.t2i.sample import ImageGenerator, check_rerank, clipped, local_rows
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.shapes import detector as shapes_eval
from tokenflow_jax.shapes import scenes as shapes
from tokenflow_jax.utils import batching
from tokenflow_jax.utils.logs import progress_bar

logger = logging.getLogger(__name__)


def _in_batches(generator, texts: list[str], schedule, desc: str = "sample", sample_index: int = 0) -> np.ndarray:
    """uint8 images [len(texts), H, W, 3], one per prompt (image (i, sample_index)), in global batches."""

    batch = int(generator.config.batch_size)
    out = []
    bar = progress_bar(0, len(texts), jax.process_index() == 0, desc, unit="img")
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        rows = batching.pad_rows(chunk, batch)
        index = list(range(start, start + batch))
        _, images, _ = generator.sample(rows, index, [sample_index] * batch, schedule)
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


def evaluate(generator, num_per_category: int, loops: list[int], seed: int = 0, judge=None,
             rerank: int = 1) -> dict[str, Any]:
    """ShapesEval per sampling strategy, with its chance and ceiling. With ``rerank`` = N > 1 and a ``judge``
    (a unified model's :class:`~tokenflow_jax.recipes.unified.serve.CaptionJudge`), each strategy draws N
    candidates per prompt (images (i, 0..N-1); candidate 0 is the plain strategy's image) and adds three rows
    at that equal N: the mean over the N candidates (keeping any one of them), the candidate the judge scores
    best, and the best of N by the detector itself (what a perfect judge would reach)."""
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
        if rerank > 1:
            results["strategies"].update(reranked(generator, judge, prompts, schedule, images, rerank, f"{loop}-step"))
    recon = tokenizer_round_trip(generator, prompts)
    results["ceiling"] = shapes_eval.evaluate(prompts, recon)
    results["chance"] = shapes_eval.evaluate(shifted_within_category(prompts), recon)
    results["settings"] = generator.settings()
    return results


def _judged(judge, texts: list[str], images: np.ndarray, batch: int) -> np.ndarray:
    """The judge's scores [len(texts)] of images [len(texts), H, W, 3], in batches of ``batch`` rows (the last one
    padded by repetition, as the sampler's)."""
    out = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        rows = batching.pad_rows(list(range(start, start + len(chunk))), batch)
        out.append(judge([texts[i] for i in rows], images[rows])[: len(chunk)])
    return np.concatenate(out)


def reranked(generator, judge, prompts, schedule, first: np.ndarray, rerank: int, name: str) -> dict[str, Any]:
    """The rows :func:`evaluate` adds for ``rerank`` candidates per prompt; ``first``: candidate 0's images."""
    texts = [p.text for p in prompts]
    candidates = [first] + [_in_batches(generator, texts, schedule, f"{name} candidate {c + 1}/{rerank}", c)
                            for c in range(1, rerank)]
    scores = np.stack([_judged(judge, texts, images, int(generator.config.batch_size))
                       for images in candidates])  # [N, prompts]
    correct = np.array([[shapes_eval.score(p, image) for p, image in zip(prompts, images)]
                        for images in candidates], bool)  # [N, prompts]
    chosen = np.argmax(scores, axis=0)
    by_judge = [candidates[c][i] for i, c in enumerate(chosen)]
    by_detector = [candidates[int(np.argmax(correct[:, i]))][i] for i in range(len(prompts))]
    per_candidate = [shapes_eval.evaluate(prompts, images) for images in candidates]
    mean = {"categories": {cat: {"accuracy": float(np.mean([r["categories"][cat]["accuracy"] for r in per_candidate]))}
                           for cat in per_candidate[0]["categories"]},
            "overall": float(np.mean([r["overall"] for r in per_candidate]))}
    rows = {f"{name}, mean of {rerank}": mean,
            f"{name}, best of {rerank} by the model": shapes_eval.evaluate(prompts, by_judge),
            f"{name}, best of {rerank} by the detector": shapes_eval.evaluate(prompts, by_detector)}
    for row_name, row in rows.items():
        logger.info("%s: overall %.1f%%", row_name, 100 * row["overall"])
    return rows


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


def run(config, checkpoint_dir: str, num_per_category: int, loops: list[int], out_file: str | None, *,
        generator=None, judge=None, rerank: int = 1) -> int:
    """The ``eval-shapes`` command. ``generator``: a model already loaded (a unified run's); ``rerank`` > 1 with
    its ``judge`` adds the reranking rows (see :func:`evaluate`)."""
    check_rerank(rerank, judge, checkpoint_dir)
    generator = generator or ImageGenerator.load(config, checkpoint_dir)
    results = evaluate(generator, num_per_category, loops, seed=int(config.seed), judge=judge, rerank=rerank)
    print(format_table(results))
    out_file = out_file or os.path.join(checkpoint_dir, "shapes_eval.json")
    if jax.process_index() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out_file}")
    return 0
