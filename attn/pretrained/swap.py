"""Swapping the attention of a loaded checkpoint for another registered mechanism that uses the same parameters.

    model, params = with_attention(model, params, "sigmoid")             # every layer
    model, params = with_attention(model, params, ["softmax", "gated"])  # one name per layer

The swapped model keeps the loaded parameters, so only mechanisms whose parameters are exactly the checkpoint's (the
q/k/v/out projections of the softmax family, e.g. with another normalisation) can take over without training; any
other swap is an error listing the parameters that would be missing or left over (fine-tuning from a checkpoint is
the way to add them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from attn.pretrained.checkpoint import abstract_params


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        value = leaf.unbox() if is_box(leaf) else leaf
        out[jax.tree_util.keystr(path)] = tuple(value.shape)
    return out


def with_attention(model: nn.Module, params: Any, attention: str | Sequence[str]) -> tuple[nn.Module, Any]:
    """(model with `attention` (one registry name, or one per layer), the same params); ValueError naming the
    mechanism and the parameters that differ when the swapped model's parameters are not the loaded ones."""
    swapped = model.clone(attention=attention if isinstance(attention, str) else tuple(attention))
    try:
        needed = _shapes(abstract_params(swapped))
    except (TypeError, ValueError) as error:
        raise ValueError(f"attention={attention!r} cannot run with this checkpoint's layer options: {error}") from error
    held = _shapes(params)
    if needed != held:
        missing = sorted(f"{key} {shape}" for key, shape in needed.items() if held.get(key) != shape)
        unused = sorted(f"{key} {shape}" for key, shape in held.items() if needed.get(key) != shape)
        raise ValueError(
            f"attention={attention!r} needs parameters the checkpoint does not hold: {missing[:6]}; unused "
            f"checkpoint parameters: {unused[:6]} (swap to a mechanism with the same q/k/v/out projections)"
        )
    return swapped, params
