"""Meshes, logical-axis rules and parameter shardings.

Every weight in ``tokenflow_jax.models`` carries logical axis names (``nn.with_logical_partitioning``)
from one vocabulary::

    batch, length, embed, mlp, heads, kv, vocab, layers, codebook, code_dim,
    conv_in, conv_out, norm

The mapping from logical names to mesh axes lives in the config (``config.mesh.rules``) and defaults
to :data:`DEFAULT_RULES`. Shardings are derived from ``jax.eval_shape`` of a model's init, so nothing
is materialised before it is placed.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tokenflow_jax.errors import ConfigError

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Unlisted names are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("codebook", None),
    ("code_dim", None),
    ("norm", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> list[int]:
    """``shape`` with its (at most one) -1 entry filled by the remaining devices; an error unless the product is
    ``num_devices``."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh shape {shape}: at most one entry may be -1 (config.mesh.shape)")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh shape {shape} does not divide the {num_devices} devices; change config.mesh.shape")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {num_devices} are available; "
            "set config.mesh.shape to match (use -1 for 'the rest')"
        )
    return shape


def make_mesh(
    shape: Sequence[int],
    axis_names: Sequence[str] = MESH_AXES,
    devices: Sequence[jax.Device] | None = None,
    allow_split_physical_axes: bool = True,
) -> Mesh:
    """Builds a mesh with ``AxisType.Auto`` axes (Linen does not annotate outputs).

    Args:
      shape: mesh shape; at most one entry may be -1 (filled with the remaining devices).
      axis_names: one name per mesh dimension.
      devices: devices to use (default: all); their count must equal the product of ``shape``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(shape) != len(axis_names):
        raise ConfigError(f"mesh shape {list(shape)} and axis names {tuple(axis_names)} differ in length; give "
                          "config.mesh.shape one entry per name in config.mesh.axes")
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(
            shape, devices, allow_split_physical_axes=allow_split_physical_axes
        )
    except (AssertionError, NotImplementedError, ValueError) as e:
        # create_device_mesh only knows physical topologies (TPU slices, whole GPU hosts); a device subset
        # (config.mesh.num_devices) or fake CPU devices get the devices in order, which is what they mean.
        if devices and devices[0].platform == "tpu":
            logger.warning("mesh %s: no topology-aware device order (%s); devices taken in id order", shape,
                           str(e)[:300])  # the message lists every device
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def rules_from_config(mesh_config) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of a run: ``mesh.rules`` when the config sets them, else :data:`DEFAULT_RULES`."""
    return tuple(tuple(r) for r in mesh_config.get("rules", DEFAULT_RULES))


def mesh_from_config(mesh_config) -> Mesh:
    """The mesh of ``config.mesh``: ``shape``, ``axes`` and optionally ``num_devices`` (0 = all devices;
    N = the first N, e.g. a one-device debugging run on a multi-device host)."""
    count = int(mesh_config.get("num_devices", 0) or 0)
    devices = jax.devices()[:count] if count else None
    return make_mesh(mesh_config.shape, mesh_config.axes, devices)


def _fit_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their array dimension (e.g. a 3-channel conv output)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            fitted.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*fitted)


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Maps one logical PartitionSpec to a mesh PartitionSpec that divides ``shape``."""
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    return _fit_to_shape(mesh_spec, shape, mesh)


def unbox_without_constraints(tree: Any) -> Any:
    """``nn.unbox`` that never applies sharding constraints (safe inside ``jax.set_mesh``)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def shardings_from_abstract(abstract_boxed: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a (possibly boxed) abstract pytree from ``jax.eval_shape(model.init, ...)``.

    Leaves without logical names are replicated.
    Returns a tree with the structure of ``nn.unbox(abstract_boxed)``.
    """
    logical_specs = nn.get_partition_spec(abstract_boxed)
    unboxed = unbox_without_constraints(abstract_boxed)

    def one(spec, leaf):
        if not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        return NamedSharding(mesh, logical_to_mesh_spec(spec, leaf.shape, mesh, rules))

    return jax.tree.map(one, logical_specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated_fraction(abstract: Any, shardings: Any) -> float:
    """Fraction of parameter bytes that are fully replicated under ``shardings``."""
    total = replicated = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if all(entry is None for entry in sharding.spec):
            replicated += nbytes
    return replicated / max(total, 1)


def check_replication(abstract: Any, shardings: Any, mesh: Mesh, max_fraction: float = 0.05) -> None:
    """Fails loudly when too many parameter bytes are replicated on a multi-device mesh."""
    if mesh.size == 1:
        return
    fraction = replicated_fraction(abstract, shardings)
    if fraction > max_fraction:
        raise ConfigError(
            f"{fraction:.1%} of parameter bytes are fully replicated on mesh {dict(mesh.shape)} "
            f"(limit {max_fraction:.0%}); check config.mesh.rules or add logical axis names"
        )


def data_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-leading array: the batch dimension over the data-parallel axes."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)
