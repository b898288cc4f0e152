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

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attn.core.sharding import (  # noqa: F401 - the trainer's names for them
    DEFAULT_RULES,
    MESH_AXES,
    MeshAxes,
    Rules,
    logical_rules,
    rules_for_mesh,
    shardings_for,
)

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

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
