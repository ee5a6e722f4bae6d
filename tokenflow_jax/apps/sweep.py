"""``tokenflow-jax sweep``: the points of a study (configs/ablations.py) one after another, each an ordinary resumable
run of the demo's stages, then the study's table and plots from the points' own files.

    tokenflow-jax sweep --config configs/ablations.py:w_dis --workdir out/w_dis [--point I] [--config.x=y ...]

Point ``i`` lives in ``DIR/points/<name>``: ``point.json`` (its settings), the demo's stage folders and records
(``stages/NAME.json``, ``tokenizer/``, ``tokenizer_eval.json``, ...) and ``step_cost.json``. A stopped sweep (Ctrl-C,
SIGTERM, a preemption notice) keeps every finished stage and the running trainer's checkpoint; the same command
continues where it stopped. ``--point I`` runs point I alone, so a cluster can run the points side by side in one
DIR; every run ends by rewriting ``DIR/results.json``, ``DIR/results.md`` and ``DIR/<study>*.png`` from whatever
points are finished (apps/ablation_report.py), so the last one to finish leaves the whole table.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.tree_util import keystr, tree_flatten_with_path

from tokenflow_jax.apps import ablation_report
from tokenflow_jax.apps import compile as aot
from tokenflow_jax.apps import demo as demo_app
from tokenflow_jax.errors import ConfigError
from tokenflow_jax.recipes.tokenizer import train as tokenizer_train
from tokenflow_jax.train import loop
from tokenflow_jax.utils import logs

POINTS_DIR = "points"


# ------------------------------------------------------------------------------------------- the step's cost

def stage_step_cost(demo, workdir: str) -> dict[str, Any]:
    """The tokenizer train step's cost at this point: its compiled memory (XLA's memory analysis of the real,
    jitted step on this run's mesh) and the measured seconds per step (the trainer's logged throughput, the first
    interval, which includes compilation, left out). Writes ``workdir/step_cost.json``."""

    config = demo_app.tokenizer_config(demo)
    mesh, rules = loop.mesh_and_rules(config)
    program = tokenizer_train.aot_programs(config, mesh, rules)[0]
    compiled = aot.compile_program(program, mesh, rules, hbm_bytes=2**62)
    leaves = tree_flatten_with_path(program.args[program.state_index])[0]
    # The codebooks and what scales with them: their Adam moments (loss update) or EMA sums (EMA update), the
    # usage ages and counts. Everything of the state's 'quantizer' entries.
    codebook = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for path, leaf in leaves
                   if "quantizer" in keystr(path))
    logged = [json.loads(line) for line in open(os.path.join(workdir, "tokenizer", "metrics.jsonl"))]
    steady = logged[1:] or logged
    images_per_second = float(np.mean([m["images_per_second"] for m in steady]))
    batch = int(config.train.global_batch_size)
    result = {
        "codebook_size": int(config.quantizer.codebook_size),
        "codebook_update": str(config.quantizer.codebook_update),
        "devices": int(mesh.size),
        "global_batch_size": batch,
        "seconds_per_step": batch / images_per_second,
        "images_per_second": images_per_second,
        # Per device. arguments: parameters, optimiser state, frozen networks, the batch; temp: every other buffer
        # the step allocates (activations, gradients, the code search's tiles).
        **{k: compiled[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "state_bytes")},
        "codebook_state_bytes": codebook,
        "flops_per_device": compiled["flops_per_device"],
    }
    result["beyond_codebook_bytes"] = result["argument_bytes"] + result["temp_bytes"] - codebook
    with open(os.path.join(workdir, "step_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


STAGES = {s.name: s for s in demo_app.STAGES} | {
    "step_cost": demo_app.Stage("step_cost", "the train step's compiled memory and measured time", stage_step_cost),
}


# --------------------------------------------------------------------------------------------------- points

def point_names(config) -> list[str]:
    return [str(p[0]) for p in config.points]


def point_demo(config, index: int):
    """The demo config of point ``index``: the study's demo config with the point's tokenizer overrides last."""
    demo = config.demo.copy_and_resolve_references()
    with demo.unlocked():
        demo.tokenizer.overrides = (*tuple(demo.tokenizer.overrides), *tuple(config.points[index][1]))
    return demo


def point_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, POINTS_DIR, name)


def _check_settings(config, index: int, directory: str) -> None:
    """``point.json`` holds the settings of the point's first run; a different setting now is a user error (the
    folder's checkpoints and results belong to the old one)."""
    settings = {"name": str(config.points[index][0]), "stages": list(config.stages),
                "demo": json.loads(point_demo(config, index).to_json())}
    path = os.path.join(directory, "point.json")
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != settings:
            changed = sorted(k for k in settings if recorded.get(k) != settings[k])
            raise ConfigError(f"{directory} holds point {settings['name']!r} run with other settings "
                              f"({', '.join(changed)} differ from {path}): delete that folder to rerun the point, or "
                              "restore its settings")
        return
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)


def stages_of(config) -> tuple[demo_app.Stage, ...]:
    unknown = [name for name in config.stages if name not in STAGES]
    if unknown:
        raise ConfigError(f"config.stages names unknown stages {unknown}; the stages are {', '.join(STAGES)}")
    return tuple(STAGES[name] for name in config.stages)


def run(config, workdir: str, point: int | None = None) -> int:
    """Runs the unfinished stages of every point (or of point ``point`` alone), then writes the study's results.
    Returns 0, or the stopped stage's exit code (143 SIGTERM / preemption notice, 130 Ctrl-C) after saving."""

    if jax.process_count() > 1:
        raise ConfigError("a sweep is a single-process run per point; run points side by side with --point I")
    names = point_names(config)
    if point is not None and not 0 <= point < len(names):
        raise ConfigError(f"--point {point}: study {config.study!r} has {len(names)} points, 0 to {len(names) - 1}")
    stages = stages_of(config)
    logs.make_workdir(workdir)
    selected = range(len(names)) if point is None else [point]
    directories = {i: point_dir(workdir, names[i]) for i in selected}
    for i in selected:
        _check_settings(config, i, directories[i])
    finished = [i for i in selected if all(demo_app.load_record(directories[i], s.name)["done"] for s in stages)]
    with logs.progress_bar(len(finished), len(selected), True, f"sweep {config.study}", unit="point") as bar:
        for i in selected:
            if i in finished:
                continue
            label = f"{config.study} point {i + 1}/{len(names)} {names[i]}:"
            stopped = demo_app.run_stages(point_demo(config, i), directories[i], stages, label=label)
            if stopped:
                return stopped
            bar.update(1)
    written = ablation_report.write(config, workdir)
    print(f"[sweep] {written['done']} of {len(names)} points done; table {written['markdown']}, plots "
          f"{', '.join(written['plots']) or '(none yet)'}", flush=True)
    return 0
