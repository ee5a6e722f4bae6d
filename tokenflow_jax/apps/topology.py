"""TPU slice names -> compile-only device descriptions, for ahead-of-time compiles on any CPU machine.

With ``jax[tpu]`` installed (it brings libtpu), libtpu describes any TPU slice without a TPU: the devices
of ``devices("v5p-256")`` can build a mesh and compile a program, and the compile fails with
``RESOURCE_EXHAUSTED ... exceeds available HBM`` exactly as the real pod would. Nothing can run on them.

User names (``v5p-256``, ``v5e-256``, ``v6e-64``, ``v4-32``, ``tpu7x-64``) are not what libtpu parses: it
wants ``<generation>:<chip grid>`` (``v5:4x4x8``) plus a chip config and wrap-around links. The number in a
user name counts TensorCores for v4, v5p and tpu7x (two per chip) and chips for v5e and v6e. The table
follows MaxText's ``accelerator_to_spec_map.py``; a raw libtpu name (``v5:4x4x8``) is accepted as well.
Every figure here is specific to libtpu 0.0.42.1 (the one ``jax[tpu]==0.10.2`` pins).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from tokenflow_jax.errors import ConfigError

GIB = 2**30

# Usable HBM per JAX device as libtpu 0.0.42.1 reports it in its out-of-memory messages (a megacore v4/v5p
# device is a whole chip; a tpu7x device is one TensorCore).
HBM_BYTES = {
    "v4": int(30.75 * GIB),
    "v5p": int(95.74 * GIB),
    "v5e": int(15.75 * GIB),
    "v6e": int(31.25 * GIB),
    "tpu7x": int(94.75 * GIB),
}

# Generation -> (libtpu generation prefix, chip_config_name).
_GENERATIONS = {
    "v4": ("v4", "megacore"),
    "v5p": ("v5", "megacore"),
    "v5e": ("v5e", None),
    "v6e": ("v6e", None),
    "tpu7x": ("tpu7x", None),
}

_F, _T = False, True
# User name -> (chip grid, wrap-around per axis).
_SLICES = {
    "v4-8": ("2x2x1", (_F, _F, _F)), "v4-16": ("2x2x2", (_F, _F, _F)), "v4-32": ("2x2x4", (_F, _F, _F)),
    "v4-64": ("2x4x4", (_F, _F, _F)), "v4-128": ("4x4x4", (_T, _T, _T)), "v4-256": ("4x4x8", (_T, _T, _T)),
    "v4-512": ("4x8x8", (_T, _T, _T)), "v4-1024": ("8x8x8", (_T, _T, _T)), "v4-2048": ("8x8x16", (_T, _T, _T)),
    "v4-4096": ("8x16x16", (_T, _T, _T)),
    "v5p-8": ("2x2x1", (_F, _F, _F)), "v5p-16": ("2x2x2", (_F, _F, _F)), "v5p-32": ("2x2x4", (_F, _F, _F)),
    "v5p-64": ("2x4x4", (_F, _F, _F)), "v5p-128": ("4x4x4", (_T, _T, _T)), "v5p-256": ("4x4x8", (_T, _T, _T)),
    "v5p-512": ("4x8x8", (_T, _T, _T)), "v5p-1024": ("8x8x8", (_T, _T, _T)), "v5p-2048": ("8x8x16", (_T, _T, _T)),
    "v5p-4096": ("8x16x16", (_T, _T, _T)), "v5p-8192": ("16x16x16", (_T, _T, _T)),
    "v5e-1": ("1x1", (_F, _F, _F)), "v5e-4": ("2x2", (_F, _F, _F)), "v5e-8": ("2x4", (_F, _F, _F)),
    "v5e-16": ("4x4", (_F, _F, _F)), "v5e-32": ("4x8", (_F, _F, _F)), "v5e-64": ("8x8", (_F, _F, _F)),
    "v5e-128": ("8x16", (_F, _T, _F)), "v5e-256": ("16x16", (_T, _T, _F)),
    "v6e-1": ("1x1", (_F, _F, _F)), "v6e-4": ("2x2", (_F, _F, _F)), "v6e-8": ("2x4", (_F, _F, _F)),
    "v6e-16": ("4x4", (_F, _F, _F)), "v6e-32": ("4x8", (_F, _F, _F)), "v6e-64": ("8x8", (_F, _F, _F)),
    "v6e-128": ("8x16", (_F, _T, _F)), "v6e-256": ("16x16", (_T, _T, _F)),
    "tpu7x-8": ("2x2x1", (_F, _F, _F)), "tpu7x-16": ("2x2x2", (_F, _F, _F)), "tpu7x-32": ("2x2x4", (_F, _F, _F)),
    "tpu7x-64": ("2x4x4", (_F, _F, _F)), "tpu7x-128": ("4x4x4", (_T, _T, _T)), "tpu7x-256": ("4x4x8", (_T, _T, _T)),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
_LIBTPU_NAME = re.compile(r"^([a-z0-9]+):([0-9x]+)$")


@dataclasses.dataclass(frozen=True)
class Slice:
    """One TPU slice as libtpu describes it."""
    name: str  # the name the user gave
    generation: str  # v4 | v5p | v5e | v6e | tpu7x
    topology_name: str  # libtpu's '<generation>:<chip grid>'
    chip_config_name: str | None
    wrap: tuple[bool, ...]
    num_slices: int = 1

    @property
    def hbm_bytes(self) -> int:
        """Usable HBM per JAX device."""
        return HBM_BYTES[self.generation]

    @property
    def num_chips(self) -> int:
        n = 1
        for side in self.topology_name.split(":")[1].split("x"):
            n *= int(side)
        return n * self.num_slices


def names() -> list[str]:
    """Every user name the table knows."""
    return sorted(_SLICES, key=lambda n: (n.split("-")[0], int(n.split("-")[1])))


def parse(name: str, num_slices: int = 1) -> Slice:
    """``v5p-256`` (or a raw libtpu name such as ``v5:4x4x8``) -> :class:`Slice`; a clear error otherwise."""
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
    raw = _LIBTPU_NAME.match(name)
    if raw:
        prefix = raw.group(1)
        generation = {"v5": "v5p"}.get(prefix, prefix)
        if generation not in _GENERATIONS:
            raise ConfigError(f"topology {name!r}: unknown TPU generation {prefix!r}; known: v4, v5, v5e, v6e, tpu7x")
        sides = raw.group(2).split("x")
        wrap = tuple(_F for _ in range(3 if len(sides) == 2 else len(sides)))
        return Slice(name, generation, name, _GENERATIONS[generation][1], wrap, num_slices)
    generation, _, count = name.lower().partition("-")
    canonical = f"{_ALIASES.get(generation, generation)}-{count}"
    if canonical not in _SLICES:
        raise ConfigError(f"unknown TPU topology {name!r}; known names: {', '.join(names())} (or a libtpu name "
                          "such as v5:4x4x8)")
    grid, wrap = _SLICES[canonical]
    generation = canonical.split("-")[0]
    prefix, chip_config = _GENERATIONS[generation]
    return Slice(name, generation, f"{prefix}:{grid}", chip_config, wrap, num_slices)


def libtpu_available() -> bool:

    return importlib.util.find_spec("libtpu") is not None


def devices(tpu: Slice) -> list:
    """The compile-only devices of ``tpu`` (all slices). Needs ``jax[tpu]``; never touches a TPU."""
    if not libtpu_available():
        raise RuntimeError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]==0.10.2' "
                           "(about 1 GB; works on any CPU machine, no TPU needed)")
    # Two processes loading libtpu at once (parallel tests, two compiles) otherwise fail on libtpu's lockfile;
    # the worker variables only silence libtpu's warnings about not running on a TPU VM.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    from jax.experimental.topologies import get_topology_desc  # deferred: after the libtpu variables above

    single_chip = tpu.num_chips // tpu.num_slices == 1
    kwargs = {"chips_per_host_bounds": (1, 1, 1) if single_chip else (2, 2, 1), "wrap": tpu.wrap}
    if tpu.chip_config_name:
        kwargs["chip_config_name"] = tpu.chip_config_name
    if tpu.num_slices > 1:
        kwargs["num_slices"] = tpu.num_slices
    description = get_topology_desc(platform="tpu", topology_name=tpu.topology_name, **kwargs)
    return list(description.devices)
