"""Device mesh, logical-axis rules and batch sharding for the training loop.

The mesh has up to four named axes (``MESH_AXES``): ``data`` (pure data parallelism), ``fsdp`` (data
parallelism with parameters sharded along ``embed``), ``tensor`` (heads / MLP / vocab split) and
``context`` (sequence split). The batch dimension is split over ``data`` x ``fsdp``.

Parameters carry *logical* axis names (flax ``nn.with_logical_partitioning``); ``rules`` map each logical
name to mesh axes. The mesh is built with ``AxisType.Auto`` on every axis: JAX's default is Explicit,
and linen's logical sharding constraints fail on Explicit meshes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "context")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", "context"),
)

_log = logging.getLogger(__name__)


def make_mesh(shape: Sequence[int], axes: Sequence[str], *, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a device mesh with every axis of type ``AxisType.Auto``.

    Args:
      shape: size of each mesh axis; at most one entry may be -1 and then takes all remaining devices.
      axes: axis names, each one of ``MESH_AXES`` and each at most once; same length as ``shape``.
      devices: devices to lay out (default: ``jax.devices()``, all processes).

    Returns:
      ``jax.sharding.Mesh`` of shape ``shape`` (with the -1 filled in).

    Raises:
      ValueError: unknown or repeated axis name, lengths differ, non-positive size, more than one -1, or
        the product of the sizes does not equal the number of devices.
    """
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"shape={shape} and axes={axes} must have the same length, got {len(shape)} and {len(axes)}")
    for name in axes:
        if name not in MESH_AXES:
            raise ValueError(f"axes={axes} contains unknown axis name {name!r}; expected names from {MESH_AXES}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes={axes} repeats an axis name; each axis may appear once")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"shape={shape} must contain positive sizes or a single -1")
    num_devices = len(devices) if devices is not None else jax.device_count()
    if shape.count(-1) > 1:
        raise ValueError(f"shape={shape} has more than one -1 entry; at most one axis can fill the rest")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(
                f"shape={shape}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices, so -1 cannot fill the rest"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"shape={shape} for axes={axes} has {math.prod(shape)} devices in total, but there are "
            f"{num_devices} devices; the product of the axis sizes must equal the device count (use -1 "
            "on one axis to fill the rest)"
        )
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _batch_axes_in(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_size_divisor(mesh: Mesh) -> int:
    """Number of batch shards: the product of the sizes of the mesh's batch axes (``data`` x ``fsdp``)."""
    return math.prod(mesh.shape[a] for a in _batch_axes_in(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the global ``batch_size`` splits evenly over the mesh's batch axes."""
    divisor = batch_size_divisor(mesh)
    if batch_size <= 0 or batch_size % divisor:
        names = " x ".join(_batch_axes_in(mesh)) or "(none)"
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in _batch_axes_in(mesh))
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the mesh's batch axes {names} = {divisor} "
            f"({sizes}); use a positive multiple of {divisor} or change the mesh shape"
        )


def _normalise_mesh_axes(logical: str, value: Any) -> MeshAxes:
    if value is None:
        return None
    if isinstance(value, str):
        names: tuple[str, ...] = (value,)
    elif isinstance(value, Sequence):
        names = tuple(value)
    else:
        raise ValueError(
            f"rules entry for {logical!r} maps to {value!r}; expected a mesh axis name, a sequence of them, or None"
        )
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(
                f"rules entry for {logical!r} maps to unknown mesh axis {name!r}; expected names from "
                f"{MESH_AXES} or None"
            )
    if isinstance(value, str):
        return value
    return names if names else None


def logical_rules(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> Rules:
    """Normalises logical-axis rules from a config into flax's format.

    Args:
      rules: ``[(logical_name, mesh_axes), ...]`` or a ``{logical_name: mesh_axes}`` mapping, where
        mesh_axes is a mesh axis name, a sequence of them (lists from configs become tuples) or None.
        ``None`` gives ``DEFAULT_RULES``.

    Returns:
      A tuple of ``(str, str | tuple[str, ...] | None)`` pairs, in precedence order.
    """
    if rules is None:
        return DEFAULT_RULES
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for entry in items:
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"rules entry {entry!r} must be a (logical_name, mesh_axes) pair")
        logical, value = entry
        if not isinstance(logical, str):
            raise ValueError(f"rules entry {entry!r} has logical name {logical!r}; expected a string")
        out.append((logical, _normalise_mesh_axes(logical, value)))
    return tuple(out)


def rules_for_mesh(rules: Any, mesh: Mesh) -> Rules:
    """``logical_rules(rules)`` without the mesh axes ``mesh`` lacks, so one rule set serves every mesh.

    Use the result for ``nn.logical_axis_rules`` (activation constraints) as well as ``shardings_for``.
    """
    out = []
    for logical, value in logical_rules(rules):
        if isinstance(value, str):
            value = value if value in mesh.shape else None
        elif isinstance(value, tuple):
            kept = tuple(a for a in value if a in mesh.shape)
            value = kept if kept else None
        out.append((logical, value))
    return tuple(out)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """Replicates dimensions whose size the assigned mesh axes do not divide (e.g. 1 KV head, tensor=2)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries, strict=True):
        wanted = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = wanted
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        if axes != wanted:
            _log.info("%s: size %d is not divisible by mesh axes %s; sharding over %s", where, dim, wanted, axes)
        fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*fitted)


def shardings_for(abstract_tree: Any, mesh: Mesh, rules: Any = DEFAULT_RULES) -> Any:
    """Shardings for a (possibly boxed) tree of arrays or ``jax.ShapeDtypeStruct``.

    Leaves boxed by flax (``nn.LogicallyPartitioned`` / ``nn.Partitioned``, e.g. the output of
    ``jax.eval_shape(model.init, ...)``) are sharded by mapping their axis names through ``rules``;
    unboxed array leaves are replicated. Rules naming mesh axes absent from ``mesh`` are dropped, and a
    dimension whose size is not divisible by its mesh axes is replicated instead of failing.

    Args:
      abstract_tree: pytree whose leaves have ``.shape`` (arrays, ShapeDtypeStruct), possibly boxed.
      mesh: the device mesh.
      rules: logical-axis rules, anything ``logical_rules`` accepts.

    Returns:
      A tree of ``NamedSharding`` shaped like the *unboxed* tree (boxes replaced by their value).
    """
    rules = rules_for_mesh(rules, mesh)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

    def one(path: Any, leaf: Any) -> NamedSharding:
        where = jax.tree_util.keystr(path)
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf.unbox() if is_box(leaf) else leaf
        if not hasattr(value, "shape"):
            raise ValueError(
                f"abstract_tree leaf at {where} is {type(value).__name__}; expected an array or jax.ShapeDtypeStruct"
            )
        if isinstance(leaf, nn.Partitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            return NamedSharding(mesh, _fit_spec(spec, tuple(value.shape), mesh, where))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_tree, is_leaf=is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (batch) dim split over ``data`` x ``fsdp``, rest replicated."""
    axes = _batch_axes_in(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's slice of a batch into global arrays sharded by ``batch_sharding``.

    Args:
      batch: ``{name: np.ndarray [local_batch, ...]}`` (nested mappings allowed); every array holds this
        process's ``global_batch / process_count`` rows, in process order.
      mesh: the device mesh.

    Returns:
      The same tree of ``jax.Array [global_batch, ...]``, batch dimension over ``data`` x ``fsdp``.
    """
    sharding = batch_sharding(mesh)

    def one(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} is a scalar; every batch entry needs a leading batch dim"
            )
        global_batch = x.shape[0] * jax.process_count()
        check_batch_size(global_batch, mesh)
        return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, dict(batch))


# Old private name, still used by train/trainer.py; prefer rules_for_mesh.
