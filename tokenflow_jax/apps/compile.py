"""``tokenflow-jax compile``: compile a recipe's real step for a TPU slice on any CPU machine (no TPU needed).

    tokenflow-jax compile --config configs/t2i.py:7b --topology v5p-256 [--config.mesh.shape='(1, -1, 4)']
    tokenflow-jax compile --config configs/tokenizer.py:xl --topology v5p-64 --config.train.global_batch_size=256
    tokenflow-jax compile --config configs/sample.py:tiny --topology v5e-4

With ``jax[tpu]`` installed, libtpu describes the slice (:mod:`tokenflow_jax.apps.topology`), the config's mesh is
laid over its devices, and the recipe's jitted step is lowered on abstract inputs carrying the run's shardings
and compiled by XLA:TPU, exactly as the pod would compile it. Printed: the mesh, per-device HBM (arguments,
train state, temporaries, peak) against the chip's usable HBM, and XLA's FLOPs per step. Exit status 0 when
every program fits, 1 with a message saying by how much and what to change when one does not (the same
``RESOURCE_EXHAUSTED`` the pod would give), 2 for a bad config or topology name.

A recipe plugs in by exposing ``aot_programs(config, mesh, rules) -> list[train.loop.Program]`` in the
module :data:`RECIPES` names for its ``config.recipe``: its abstract train state with shardings and its
jitted train step (the same function ``train()`` runs), built without data, weights or arrays on the mesh.

The numbers hold for the libtpu release installed (``jax[tpu]==0.10.2`` pins libtpu 0.0.42.1); they prove
that XLA's buffer assignment fits, not the run's speed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from tokenflow_jax import config as config_lib
from tokenflow_jax import parallel, recipes
from tokenflow_jax.apps import topology
from tokenflow_jax.errors import ConfigError

logger = logging.getLogger(__name__)

# config.recipe -> the module exposing aot_programs(config, mesh, rules): every trainer, and the sampler.
RECIPES = {**{r: f"tokenflow_jax.recipes.{r}.train" for r in recipes.RECIPES},
           "sample": "tokenflow_jax.recipes.t2i.sample"}

_OOM = re.compile(r"resource_exhausted|exceeds available hbm|ran out of memory", re.IGNORECASE)
GIB = 2**30


class DoesNotFit(Exception):
    """A program needs more HBM per device than the chip has."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config FILE:ARG, e.g. configs/t2i.py:7b")
    parser.add_argument("--topology", required=True,
                        help="TPU slice: v5p-256, v5e-256, v6e-64, v4-32, tpu7x-64 ... or a libtpu name (v5:4x4x8)")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="multi-slice: the config's data axis is split over this many slices (DCN)")
    parser.add_argument("--json", help="also write the report as JSON to this file")


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """The ``compile`` command; returns the exit status (0 fits, 1 does not fit, 2 bad input)."""

    # Executables for compile-only devices cannot be loaded back from the persistent cache (reading one fails
    # with "PjRtCompiler must be constructed with a Client"), so writing them would only waste disk.
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        tpu = topology.parse(args.topology, args.num_slices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not topology.libtpu_available():
        print("error: compiling for a TPU topology needs libtpu: pip install 'jax[tpu]==0.10.2' (about 1 GB; any CPU "
              "machine, no TPU needed; the test extra includes it)", file=sys.stderr)
        return 2
    config = config_lib.build_config(args.config, overrides)
    report = compile_config(config, tpu)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not report["fits"]:
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0


def recipe_module(config):
    recipe = config.get("recipe", "")
    if recipe not in RECIPES:
        raise ConfigError(f"config.recipe {recipe!r} has no ahead-of-time compile entry; known recipes: "
                          f"{sorted(RECIPES)}")
    return importlib.import_module(RECIPES[recipe])


def topology_mesh(mesh_config, devices: list, num_slices: int = 1):
    """``config.mesh`` over compile-only devices; with several slices the data axis spans them (DCN)."""

    count = int(mesh_config.get("num_devices", 0) or 0)
    devices = devices[:count] if count else devices
    axes = tuple(mesh_config.axes)
    if num_slices == 1:
        return parallel.make_mesh(mesh_config.shape, axes, devices)
    # Resolve -1 first, then put the slices on the data axis: its all-reduce is the one that tolerates DCN.
    shape = parallel.resolve_mesh_shape(mesh_config.shape, len(devices))
    data = axes.index("data")
    if shape[data] % num_slices:
        raise ConfigError(f"config.mesh.shape {tuple(shape)}: the data axis ({shape[data]}) must be a multiple of "
                          f"--num-slices={num_slices} (slices are joined over the data axis)")
    ici, dcn = list(shape), [1] * len(shape)
    ici[data], dcn[data] = shape[data] // num_slices, num_slices
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(np.asarray(array), axes, axis_types=(AxisType.Auto,) * len(axes))


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the biggest shard's)."""

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def loop_trip_counts(hlo_text: str) -> list[int]:
    """Trip counts of the while loops in a compiled module (scanned layers): the one integer constant of each
    loop's condition computation (0 when it has none or several)."""
    counts = []
    for match in re.finditer(r"\bwhile\(.*?condition=(%[\w.\-]+)", hlo_text):
        start = hlo_text.find(f"\n{match.group(1)} ")
        body = hlo_text[hlo_text.find("{\n", start):hlo_text.find("\n}", start)] if start >= 0 else ""
        constants = re.findall(r"= s32\[\]\S* constant\((\d+)\)", body)
        counts.append(int(constants[0]) if len(constants) == 1 else 0)
    return counts


def compile_program(program, mesh, rules, hbm_bytes: int) -> dict[str, Any]:
    """Lowers and compiles one :class:`~tokenflow_jax.train.loop.Program`; per-device memory and FLOPs."""

    result: dict[str, Any] = {"name": program.name}
    if program.state_index is not None:
        result["state_bytes"] = per_device_bytes(program.args[program.state_index])
    start = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules or rules):
        lowered = program.fn.lower(*program.args)
    result["lower_seconds"] = time.time() - start
    start = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not _OOM.search(str(e)):
            raise
        result["compile_seconds"] = time.time() - start
        result["fits"] = False
        result["xla_error"] = str(e).strip().splitlines()[0][:500]
        # libtpu's wording varies: "Used 120.3G of 95.74G hbm" or "required for HLO temporaries (69.57G)".
        used = re.search(r"Used ([0-9.]+)([KMGT])|required for [^(]*\(([0-9.]+)([KMGT])\)", str(e))
        if used:
            number, unit = (used.group(1), used.group(2)) if used.group(1) else (used.group(3), used.group(4))
            result["needed_bytes"] = float(number) * 1024 ** " KMGT".index(unit)
        return result
    result["compile_seconds"] = time.time() - start
    memory = compiled.memory_analysis()
    for field in ("argument", "output", "alias", "temp", "generated_code"):
        result[f"{field}_bytes"] = int(getattr(memory, f"{field}_size_in_bytes", 0))
    result["peak_bytes"] = int(getattr(memory, "peak_memory_in_bytes", 0))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    result["flops_per_device"] = float((cost or {}).get("flops", 0.0))
    result["loop_trip_counts"] = loop_trip_counts(compiled.as_text())
    result["fits"] = result["peak_bytes"] <= hbm_bytes
    if not result["fits"]:
        result["needed_bytes"] = result["peak_bytes"]
    return result


def compile_config(config, tpu) -> dict[str, Any]:
    """Every program of ``config``'s recipe compiled for ``tpu`` (a :class:`topology.Slice`); the report."""

    module = recipe_module(config)
    start = time.time()
    devices = topology.devices(tpu)
    mesh = topology_mesh(config.mesh, devices, tpu.num_slices)
    rules = parallel.rules_from_config(config.mesh)
    report: dict[str, Any] = {
        "config": config.get("config_spec", ""), "overrides": list(config.get("config_overrides", [])),
        "topology": tpu.name, "libtpu_topology": tpu.topology_name, "num_slices": tpu.num_slices,
        "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "num_hosts": 1 + max(d.process_index for d in devices), "mesh": dict(mesh.shape),
        "hbm_bytes_per_device": tpu.hbm_bytes, "libtpu": _libtpu_version(), "programs": [],
    }
    programs = module.aot_programs(config, mesh, rules)
    report["build_seconds"] = time.time() - start
    for program in programs:
        result = compile_program(program, mesh, rules, tpu.hbm_bytes)
        report["programs"].append(result)
        if not result["fits"]:
            break  # the first overflow decides; later programs would only add minutes
    report["fits"] = all(p["fits"] for p in report["programs"])
    if not report["fits"]:
        report["error"] = not_fit_message(report, config)
    return report


def not_fit_message(report: dict[str, Any], config) -> str:
    bad = next(p for p in report["programs"] if not p["fits"])
    hbm = report["hbm_bytes_per_device"] / GIB
    needed = f"at least {bad['needed_bytes'] / GIB:.2f} GiB" if bad.get("needed_bytes") else "more HBM than that"
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    hints = ["shard the state over more devices (--config.mesh.shape, e.g. (1, -1, 1) for FSDP over all)",
             "a smaller global batch (--config.train.global_batch_size) or a larger slice"]
    if config.get("model", {}).get("llm") is not None:
        hints.append("rematerialise the decoder blocks (--config.model.llm.remat=full) or bfloat16 activations "
                     "(--config.model.llm.dtype=bfloat16)")
    return (f"{report['config']} does not fit on {report['topology']}: {bad['name']} needs {needed} per device "
            f"(mesh {mesh}), a {report['device_kind']} device has {hbm:.2f} GiB usable. XLA: {bad.get('xla_error', '')}"
            f"\n  to fit: " + "; ".join(hints))


def _libtpu_version() -> str:
    try:

        return version("libtpu")
    except Exception:  # noqa: BLE001 - reporting only
        return "unknown"


def _gib(n: float) -> str:
    return f"{n / GIB:.3f} GiB"


def format_report(report: dict[str, Any]) -> str:
    hbm = report["hbm_bytes_per_device"]
    lines = [
        f"{report['config']} on {report['topology']} ({report['libtpu_topology']}"
        + (f" x {report['num_slices']} slices" if report["num_slices"] > 1 else "")
        + f"): {report['num_devices']} x {report['device_kind']}, {report['num_hosts']} hosts, "
        f"libtpu {report['libtpu']}",
        "mesh: " + " ".join(f"{k}={v}" for k, v in report["mesh"].items()),
    ]
    for p in report["programs"]:
        lines.append(f"{p['name']}: lowered in {p['lower_seconds']:.1f} s, compiled in {p['compile_seconds']:.1f} s")
        if not p["fits"] and "peak_bytes" not in p:
            lines.append(f"  DOES NOT FIT: {p.get('xla_error', '')}")
            continue
        state = f" (train state {_gib(p['state_bytes'])})" if "state_bytes" in p else ""
        lines.append(f"  per device: arguments {_gib(p['argument_bytes'])}{state}, outputs {_gib(p['output_bytes'])} "
                     f"(aliased {_gib(p['alias_bytes'])}), temporaries {_gib(p['temp_bytes'])}, "
                     f"code {_gib(p['generated_code_bytes'])}")
        lines.append(f"  peak {_gib(p['peak_bytes'])} of {_gib(hbm)} HBM ({100 * p['peak_bytes'] / hbm:.1f}%)"
                     + ("" if p["fits"] else "  DOES NOT FIT"))
        flops = p["flops_per_device"]
        loops = p["loop_trip_counts"]
        note = (f"; XLA counts a loop body once, and this step has loops with trip counts {loops} (scanned layers), "
                "so the true count is higher") if loops else ""
        lines.append(f"  XLA FLOPs per step: {flops:.3e} per device, {flops * report['num_devices']:.3e} in all{note}")
    lines.append("fits" if report["fits"] else "does NOT fit")
    return "\n".join(lines)
