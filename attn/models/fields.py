"""Model fields that may be given once or per layer, the per-layer fields of mechanisms, and hashing of models with
dict-valued fields.

`attention` may be one registry name or one per layer; `attention_options` one dict or one per layer. A mechanism
whose options depend on the layer's place in the model declares them (`register(..., layer_fields=("layer_index",
"num_layers"))`, e.g. `lightning`'s decay schedule); `with_layer_fields` fills them for each layer of a stack, so a
model built from one options dict still gives every layer its own value.
Models are passed to `jax.jit` as static arguments (e.g. by `generate`), which needs a hash: the
dataclass hash would fail on dict fields, so `hash_fields` hashes a frozen copy of the fields instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import attn

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


def with_layer_fields(name: str, options: Mapping[str, Any], *, layer_index: int, num_layers: int) -> dict[str, Any]:
    """`options` of mechanism `name` for layer `layer_index` (0-based) of a stack of `num_layers` blocks: the
    mechanism's declared per-layer fields (its spec's `layer_fields`) are filled in, except those the user set
    in `options` (an explicit value wins, also when one dict serves every layer)."""
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index={layer_index} must lie in [0, num_layers={num_layers})")
    values = {"layer_index": layer_index, "num_layers": num_layers}
    filled = dict(options)
    for field in attn.get(name).layer_fields:
        if field not in values:
            raise ValueError(
                f"mechanism {name!r} declares the per-layer field {field!r}, which the models cannot fill; "
                f"expected some of {tuple(values)}"
            )
        filled.setdefault(field, values[field])
    return filled


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
