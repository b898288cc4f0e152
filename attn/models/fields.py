"""Model fields that may be given once or per layer, and hashing of models with dict-valued fields.

`attention` may be one registry name or one per layer; `attention_options` one dict or one per layer.
Models are passed to `jax.jit` as static arguments (e.g. by `generate`), which needs a hash: the
dataclass hash would fail on dict fields, so `hash_fields` hashes a frozen copy of the fields instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# One dict of `attn.build` options for every layer, or one dict per layer.
AttentionOptions = Mapping[str, Any] | Sequence[Mapping[str, Any]]


def per_layer_mechanisms(attention: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """One registry name per layer from `attention` (a name, or a sequence of `num_layers` names)."""
    if isinstance(attention, str):
        return (attention,) * num_layers
    names = tuple(attention)
    if len(names) != num_layers:
        raise ValueError(
            f"attention has {len(names)} entries but num_layers={num_layers}; give one name, or one per layer"
        )
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"attention entries must be registry names (str); got {name!r}")
    return names


def per_layer_options(
    attention_options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, num_layers: int
) -> tuple[dict[str, Any], ...]:
    """One options dict per layer from `attention_options` (a dict, None, or a sequence of dicts)."""
    if attention_options is None:
        return ({},) * num_layers
    if isinstance(attention_options, Mapping):
        return (dict(attention_options),) * num_layers
    options = tuple(attention_options)
    if len(options) != num_layers:
        raise ValueError(
            f"attention_options has {len(options)} entries but num_layers={num_layers}; give one dict, or one per layer"
        )
    for entry in options:
        if not isinstance(entry, Mapping):
            raise ValueError(f"attention_options entries must be dicts; got {entry!r}")
    return tuple(dict(entry) for entry in options)


def freeze(value: Any) -> Any:
    """A hashable copy of `value`: dicts become sorted item tuples, lists become tuples, recursively."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def hash_fields(module: Any) -> int:
    """Hash of a linen module's configuration fields (not its parent or name), dict fields included."""
    items = tuple(
        (field.name, freeze(getattr(module, field.name)))
        for field in dataclasses.fields(module)
        if field.name not in ("parent", "name")
    )
    return hash((type(module).__qualname__, items))
