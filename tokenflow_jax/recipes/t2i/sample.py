"""``tokenflow-jax generate``: batch image generation with a trained next-scale t2i model.

    tokenflow-jax generate --config configs/sample.py:tiny --checkpoint RUN/checkpoints --prompts FILE \\
        --out DIR [--per-prompt N] [--seed S]

Writes ``DIR/images/{prompt:05d}_{sample:02d}.png`` per image, ``DIR/grids/{prompt:05d}.png`` per prompt
and ``DIR/manifest.jsonl`` (prompt, indices, seed, file, settings; one line per image). Jobs (prompt i,
sample j) run in global batches of ``config.batch_size`` sharded over the mesh's devices and processes;
each process encodes, decodes and writes only its own rows (and its own ``manifest.P#####.jsonl``,
merged into ``manifest.jsonl`` at the end). Image (i, j) is drawn with the key fold_in(fold_in(seed, i), j),
so it is the same image whatever batch it lands in, and re-running the command skips every batch whose
images all exist. The :class:`ImageGenerator` is the reusable core (ShapesEval uses it in memory).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from tokenflow_jax import checkpoint, parallel, prng
from tokenflow_jax import config as config_lib
from tokenflow_jax.data import pipeline
from tokenflow_jax.errors import CheckpointError, CheckpointNotFoundError, ConfigError, DataError, InputNotFoundError
from tokenflow_jax.models import t2i, t2i_sampler
from tokenflow_jax.models import tokenizer as tokenizer_lib
from tokenflow_jax.ops import sampling
from tokenflow_jax.recipes.t2i import setup as t2i_setup
from tokenflow_jax.recipes.tokenizer import frozen
from tokenflow_jax.train import loop
from tokenflow_jax.utils import batching
from tokenflow_jax.utils import images as image_utils

logger = logging.getLogger(__name__)


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSON lines with a ``prompt`` field."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"prompt file {path!r} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not a JSON line ({e})") from e
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise DataError(f"{path}:{number}: expected an object with a string 'prompt' field")
                line = record["prompt"]
            prompts.append(line)
    if not prompts:
        raise DataError(f"prompt file {path!r} has no prompts (empty lines are skipped)")
    return prompts


def t2i_run_config(sample_config, checkpoint_dir: str):
    """The t2i config recorded in ``checkpoint_dir`` (or ``sample_config.model_config`` when none is)."""

    if checkpoint.latest_step(checkpoint_dir) is None:
        raise CheckpointNotFoundError(f"--checkpoint {checkpoint_dir!r}: no t2i checkpoint there (expected a training "
                                      "run's checkpoints directory, e.g. WORKDIR/checkpoints)")
    meta = checkpoint.read_meta(checkpoint_dir)
    if meta.get("recipe") not in (None, "t2i"):
        raise CheckpointError(f"--checkpoint {checkpoint_dir!r} holds a {meta.get('recipe')!r} run, not a t2i model")
    spec = meta.get("config_spec") or sample_config.model_config
    config = config_lib.build_config(spec, list(meta.get("config_overrides", [])) if meta.get("config_spec") else [])
    if sample_config.get("tokenizer_checkpoint"):
        config.tokenizer.checkpoint = sample_config.tokenizer_checkpoint
    return config


def clipped(schedule: sampling.SamplingSchedule, codebook_size: int) -> sampling.SamplingSchedule:
    """``schedule`` with top-k values above K set to K (the reference's 1200 on a 1024-code tokenizer)."""
    return dataclasses.replace(schedule, top_k=tuple(min(k, codebook_size) for k in schedule.top_k))


def schedule_from_config(sample_cfg, codebook_size: int) -> sampling.SamplingSchedule:
    """The multi-step schedule (``loops`` preset or explicit lists), top-k clipped to the codebook size."""
    schedule = (sampling.SamplingSchedule.preset(sample_cfg.loops) if sample_cfg.loops
                else sampling.SamplingSchedule(tuple(sample_cfg.top_k), tuple(sample_cfg.top_p)))
    return clipped(schedule, codebook_size)


def make_sample_fn(model: t2i.NextScaleT2I, decode, *, seed: int, cfg_scale: float,
                   schedule: sampling.SamplingSchedule, cached: bool = True):
    """``(params, tok_vars, codebook [K, C], batch) -> (indices [B, N], uint8 images [B, H, W, 3])`` (to jit).

    batch: text_ids, text_mask, uncond_ids, uncond_mask [B, P]; prompt_index, sample_index [B].
    """
    fn = t2i_sampler.sample_cached if cached else t2i_sampler.sample_full_recompute

    def run(params, tok_vars, codebook, batch):
        # threefry: its draws under vmap do not depend on the batch size (rbg's do), which is what
        # makes image (i, j) the same in any batch.
        base = prng.make_key(seed, impl="threefry2x32")
        keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
            batch["prompt_index"], batch["sample_index"])
        indices = fn(model, {"params": params}, codebook, batch["text_ids"], batch["text_mask"],
                     batch["uncond_ids"], batch["uncond_mask"], keys, cfg_scale=cfg_scale, schedule=schedule)
        return indices, decode(tok_vars, indices)

    return run


def aot_programs(config, mesh, rules) -> list:
    """The sampler (``tokenflow-jax compile --config configs/sample.py:VARIANT``) on abstract inputs: the model
    of ``config.model_config`` and its tokenizer, one global batch of ``config.batch_size`` prompts."""

    t2i_config = config_lib.load_config(config.model_config)
    rules = parallel.rules_from_config(t2i_config.mesh)  # as ImageGenerator
    tok_config = frozen.tokenizer_config(t2i_config)
    model_cfg = t2i_setup.model_config(t2i_config, tok_config)
    model = t2i.NextScaleT2I(model_cfg)
    tok_model = tokenizer_lib.build(tok_config)
    p = model_cfg.text_length
    params = checkpoint.model_target(model, t2i.init_args(model_cfg), mesh, rules)["params"]
    tok_vars = frozen.abstract_tokenizer_variables(tok_model, mesh)
    codebook = jax.ShapeDtypeStruct((model_cfg.codebook_size, model_cfg.code_dim), jnp.float32,
                                    sharding=frozen.replicated(mesh))
    b = int(config.batch_size)
    batch = {name: loop.abstract_batch(mesh, (b, p), jnp.int32, "config.batch_size")
             for name in ("text_ids", "text_mask", "uncond_ids", "uncond_mask")}
    batch.update({name: loop.abstract_batch(mesh, (b,), jnp.int32, "config.batch_size")
                  for name in ("prompt_index", "sample_index")})
    fn = jax.jit(make_sample_fn(model, frozen.decode_indices_fn(tok_model), seed=int(config.seed),
                                cfg_scale=float(config.sample.cfg_scale),
                                schedule=schedule_from_config(config.sample, model_cfg.codebook_size),
                                cached=bool(config.sample.cached)))
    return [loop.Program("sample", fn, (params, tok_vars, codebook, batch), rules=rules)]


class ImageGenerator:
    """A t2i model (or a unified one: the same sampler runs on it) + its tokenizer, sampling and decoding batches
    of prompts on a mesh. :meth:`load` restores a t2i run; a unified run's server (recipes/unified/serve.py) builds
    one from the model it already holds."""

    def __init__(self, sample_config, run_config, model: t2i.NextScaleT2I, params: Any, mesh, tok_model, tok_vars,
                 text_tokenizer, encoder):
        self.config, self.t2i_config, self.mesh = sample_config, run_config, mesh
        self.rules = parallel.rules_from_config(run_config.mesh)
        self.model, self.params = model, params
        self.tok_model, self.tok_vars = tok_model, tok_vars
        self.text_tokenizer, self.encoder = text_tokenizer, encoder
        self.codebook = frozen.codebook_vectors(tok_model, tok_vars)
        self.decode = frozen.decode_indices_fn(tok_model)
        uncond = encoder([sample_config.sample.uncond_prompt])  # the same row for every prompt
        self.uncond_ids, self.uncond_mask = uncond.ids, uncond.mask
        self.schedule = schedule_from_config(sample_config.sample, model.config.codebook_size)
        self.image_size = int(frozen.tokenizer_config(run_config).model.image_size)
        self._samplers: dict[Any, Any] = {}

    @classmethod
    def load(cls, sample_config, checkpoint_dir: str, mesh=None) -> ImageGenerator:
        """Restores the t2i run in ``checkpoint_dir`` (its recorded config) and its frozen tokenizer."""
        run_config = t2i_run_config(sample_config, checkpoint_dir)
        mesh = mesh or parallel.mesh_from_config(sample_config.mesh)
        rules = parallel.rules_from_config(run_config.mesh)
        tok_config = frozen.tokenizer_config(run_config)
        text_tokenizer, encoder = t2i_setup.text_parts(run_config)
        model = t2i.NextScaleT2I(t2i_setup.model_config(run_config, tok_config, text_tokenizer))
        params = checkpoint.restore_model(model, t2i.init_args(model.config), checkpoint_dir, mesh=mesh, rules=rules,
                                          collections=("params",))["params"]
        tok_checkpoint = run_config.tokenizer.get("checkpoint", "")
        tok_model, tok_vars = frozen.load_tokenizer(tok_config, tok_checkpoint or None, mesh=mesh)
        return cls(sample_config, run_config, model, params, mesh, tok_model, tok_vars, text_tokenizer, encoder)

    def settings(self, schedule: sampling.SamplingSchedule | None = None) -> dict[str, Any]:
        s = self.config.sample
        schedule = schedule or self.schedule
        return {"preset": s.get("preset", ""), "cfg_scale": float(s.cfg_scale), "top_k": list(schedule.top_k),
                "top_p": list(schedule.top_p),
                "uncond_prompt": s.uncond_prompt, "cached": bool(s.cached), "seed": int(self.config.seed),
                "model": self.t2i_config.get("config_spec", "")}

    def _sampler(self, schedule: sampling.SamplingSchedule):
        if schedule not in self._samplers:
            self._samplers[schedule] = jax.jit(make_sample_fn(
                self.model, self.decode, seed=int(self.config.seed), cfg_scale=float(self.config.sample.cfg_scale),
                schedule=schedule, cached=bool(self.config.sample.cached)))
        return self._samplers[schedule]

    def sample(self, prompts: Sequence[str], prompt_index: Sequence[int], sample_index: Sequence[int],
               schedule: sampling.SamplingSchedule | None = None) -> tuple[jax.Array, jax.Array, np.ndarray]:
        """This process's rows -> global (indices [G, N], uint8 images [G, H, W, 3]) and the local truncation
        flags [B]. Every process calls it with the same number of rows."""

        texts = self.encoder(list(prompts))
        rows = len(prompts)
        host = {"text_ids": texts.ids, "text_mask": texts.mask, "uncond_ids": np.repeat(self.uncond_ids, rows, 0),
                "uncond_mask": np.repeat(self.uncond_mask, rows, 0),
                "prompt_index": np.asarray(prompt_index, np.int32), "sample_index": np.asarray(sample_index, np.int32)}
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            batch = pipeline.to_global_batch(host, self.mesh)
            indices, images = self._sampler(schedule or self.schedule)(self.params, self.tok_vars, self.codebook, batch)
        return indices, images, texts.truncated


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order (replicas dropped)."""
    rows = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        rows.setdefault(start, np.asarray(shard.data))
    return np.concatenate([rows[k] for k in sorted(rows)], axis=0)


def image_name(prompt_index: int, sample_index: int) -> str:
    return f"{prompt_index:05d}_{sample_index:02d}.png"


def check_rerank(rerank: int, judge, checkpoint_dir: str) -> None:
    """``--rerank N``: N >= 1, and N > 1 only with a judge (a unified checkpoint's)."""
    if rerank < 1:
        raise ConfigError(f"--rerank must be >= 1 (candidates per image), got {rerank}")
    if rerank > 1 and judge is None:
        raise ConfigError("--rerank needs a unified checkpoint: the model that generates must also read its images "
                          f"to judge them, and {checkpoint_dir!r} holds a t2i run")


def sample_best_of(generator: ImageGenerator, judge, rerank: int, prompts: Sequence[str], prompt_index: Sequence[int],
                   sample_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This process's rows -> (indices [B, N], uint8 images [B, H, W, 3], truncation flags [B], candidate
    scores [rerank, B]): the candidate the judge scores best of ``rerank`` draws per row.

    Candidate c of output (i, j) is the image (i, j * rerank + c) (so ``rerank=1`` is plain sampling, and each
    candidate is the same whatever batch it lands in). ``judge(prompts, images) -> scores [B]`` is the model's
    own reading of its candidates (a unified model's :class:`~tokenflow_jax.recipes.unified.serve.CaptionJudge`).
    """
    best = scores = None
    for c in range(rerank):
        indices, images, truncated = generator.sample(prompts, prompt_index, [j * rerank + c for j in sample_index])
        indices, images = local_rows(indices), local_rows(images)
        if rerank == 1:
            return indices, images, truncated, np.zeros((1, len(prompts)), np.float32)
        score = np.asarray(judge(prompts, images), np.float32)
        scores = score[None] if scores is None else np.concatenate([scores, score[None]])
        if best is None:
            best = [indices, images]
        else:
            better = score > scores[:-1].max(axis=0)
            best[0][better], best[1][better] = indices[better], images[better]
    return best[0], best[1], truncated, scores


def run(config, checkpoint_dir: str, prompts_file: str, out_dir: str, per_prompt: int | None = None,
        seed: int | None = None, *, generator: ImageGenerator | None = None, judge=None, rerank: int = 1) -> int:
    """The ``generate`` command; returns the exit code. ``generator``: a model already loaded (a unified run's);
    ``rerank`` > 1 keeps, per image, the best of that many candidates by ``judge`` (see :func:`sample_best_of`)."""

    with config.unlocked():
        if per_prompt is not None:
            config.per_prompt = per_prompt
        if seed is not None:
            config.seed = seed
    if config.per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {config.per_prompt}")
    check_rerank(rerank, judge, checkpoint_dir)
    prompts = read_prompts(prompts_file)
    generator = generator or ImageGenerator.load(config, checkpoint_dir)
    process, count = jax.process_index(), jax.process_count()
    global_batch = int(config.batch_size)
    local = pipeline.local_batch_size(global_batch, count)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(config.per_prompt)]
    num_real = len(jobs)
    jobs = batching.pad_rows(jobs, batching.round_up(len(jobs), global_batch))  # padding: computed, never written
    num_batches = len(jobs) // global_batch
    image_dir, grid_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "grids")
    os.makedirs(image_dir, exist_ok=True)

    def mine(b: int) -> list[tuple[int, int, int]]:
        """(global job number, prompt, sample) of this process's rows of batch b."""
        first = b * global_batch + process * local
        return [(g, *jobs[g]) for g in range(first, first + local)]

    # A batch is skipped when every process has written all its rows (agreed over processes: files may live
    # on per-host disks), so every process runs the same sampler calls.
    done_here = np.array([all(os.path.exists(os.path.join(image_dir, image_name(i, j))) for _, i, j in mine(b))
                          for b in range(num_batches)])
    done = np.asarray(multihost_utils.process_allgather(done_here)).reshape(count, -1).all(axis=0) if count > 1 \
        else done_here
    todo = [b for b in range(num_batches) if not done[b]]
    logger.info("%d prompts x %d samples = %d images; %d of %d batches of %d already written", len(prompts),
                config.per_prompt, len(prompts) * config.per_prompt, num_batches - len(todo), num_batches, global_batch)
    settings = generator.settings()
    manifest_part = os.path.join(out_dir, f"manifest.P{process:05d}.jsonl")
    truncated_prompts: set[int] = set()
    written, start_time = 0, time.time()
    with open(manifest_part, "a", encoding="utf-8") as manifest, \
            tqdm(total=len(todo) * global_batch, disable=process != 0, unit="img", desc="generate") as bar:
        for b in todo:
            rows = mine(b)
            indices, images, truncated, scores = sample_best_of(
                generator, judge, rerank, [prompts[i] for _, i, _ in rows], [i for _, i, _ in rows],
                [j for _, _, j in rows])
            for r, (g, i, j) in enumerate(rows):
                if g >= num_real:
                    continue
                name = image_name(i, j)
                tmp = os.path.join(image_dir, f".{name}.tmp")
                Image.fromarray(images[r]).save(tmp, format="PNG")
                os.replace(tmp, os.path.join(image_dir, name))  # never a half-written PNG under the final name
                if truncated[r]:
                    truncated_prompts.add(i)
                manifest.write(json.dumps({"prompt_index": i, "sample_index": j, "prompt": prompts[i],
                                           "file": os.path.join("images", name), "truncated": bool(truncated[r]),
                                           "indices": indices[r].tolist(), **settings, **chosen(scores[:, r])})
                               + "\n")
                written += 1
            manifest.flush()
            bar.update(global_batch)
    for i in sorted(truncated_prompts):
        logger.warning("prompt %d was longer than the text prefix (%d tokens) and was truncated: %r", i,
                       generator.encoder.length, prompts[i][:80])
    elapsed = time.time() - start_time
    if count > 1:
        multihost_utils.sync_global_devices("generate: all images written")
    if process == 0:
        merge_manifests(out_dir)
        if config.grid:
            write_grids(image_dir, grid_dir, len(prompts), config.per_prompt, image_utils.image_grid)
    print(f"wrote {written} images on this process in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.2f} images/s); "
          f"{len(truncated_prompts)} truncated prompts; output: {out_dir}")
    return 0


def chosen(scores: np.ndarray) -> dict[str, Any]:
    """The manifest's reranking fields for one image: its candidates' scores [N] and the one kept."""
    if len(scores) == 1:
        return {}
    return {"rerank": len(scores), "candidate": int(np.argmax(scores)), "candidate_scores": scores.round(4).tolist()}


def merge_manifests(out_dir: str) -> None:
    """``manifest.P*.jsonl`` -> ``manifest.jsonl``, one line per (prompt, sample), the newest kept, sorted."""
    entries = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "manifest.P*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    entries[(record["prompt_index"], record["sample_index"])] = line.rstrip("\n") + "\n"
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(entries[k] for k in sorted(entries))


def write_grids(image_dir: str, grid_dir: str, num_prompts: int, per_prompt: int, image_grid) -> None:
    """One PNG per prompt with its samples side by side (prompts with a missing sample are skipped)."""
    os.makedirs(grid_dir, exist_ok=True)
    for i in range(num_prompts):
        paths = [os.path.join(image_dir, image_name(i, j)) for j in range(per_prompt)]
        if all(os.path.exists(p) for p in paths):
            row = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
            Image.fromarray(image_grid([row])).save(os.path.join(grid_dir, f"{i:05d}.png"))
