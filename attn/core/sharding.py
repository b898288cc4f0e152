"""Logical-axis sharding: map the logical axis names every parameter carries to the axes of a device mesh.

The mesh axes (``MESH_AXES``) are ``data`` and ``fsdp`` (the batch is split over both; ``fsdp`` also shards
parameters along ``embed``), ``tensor`` (heads / MLP / vocab) and ``context`` (sequence). ``rules`` map each logical
name (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``batch``, ``length``) to mesh axes;
``shardings_for`` turns a boxed parameter tree into ``NamedSharding``s under any mesh. Used by the trainer
(``train.mesh`` re-exports these names) and by checkpoint import, which places arrays straight onto a mesh.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "context")

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
