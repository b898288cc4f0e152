"""How one parameter of an `attn` model sits in a Hugging Face tensor, and reading or writing it block by block.

A `TensorRule` ties a parameter (its path in the "params" tree, e.g. ("layers_0", "attention", "query", "kernel"))
to a checkpoint tensor. The tensor's "view" is the tensor itself, its transpose for a `torch.nn.Linear` weight
(stored [out, in]; ours are [in, out]), or its axes permuted (a `torch.nn.Conv2d` weight [out, in, kh, kw] is the
view [kh, kw, in, out] of a flax Conv kernel). The parameter is the view reshaped, each view axis split into
consecutive parameter axes (e.g. a view [E, H * D] is the query kernel [E, H, D]) or, for a view axis of size 1,
dropped (ViT's position table [1, N, E] is our [N, E]), and, for a fused tensor (GPT-2's `c_attn` holds q, k and
v), part `part` of `parts` equal chunks of the view's last axis.

`read_block` reads the part of the tensor that one block of the parameter needs (what a device holds under a
sharding), and `join_parameters` turns parameters back into the tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attn.pretrained.safetensors_files import SafetensorsFiles


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Parameter `path` is (part `part` of `parts` of) the view of checkpoint tensor `name`.

    groups: how many consecutive parameter axes make up each view axis, e.g. (1, 2) for a query kernel [E, H, D]
      from a view [E, H * D], (2, 1) for an output kernel [H, D, E] from [H * D, E], (1,) for a vector; 0 for a
      view axis of size 1 that the parameter does not have, e.g. (0, 1, 1) for a table [N, E] from a view [1, N, E].

    transpose: the tensor is a 2-D torch Linear weight [out, in]; the view is its transpose [in, out].
    permute: the view is the tensor's axes permuted, `tensor.transpose(permute)` (view axis i is tensor axis
      permute[i]), e.g. (2, 3, 1, 0) for a torch Conv2d weight [out, in, kh, kw] -> view [kh, kw, in, out]; None for
      no permutation. `transpose` is the 2-D case (1, 0); a rule sets at most one of them.
    part / parts: the parameter is the part-th of `parts` equal chunks of the view's last axis (fused tensors).
    """

    name: str
    path: tuple[str, ...]
    groups: tuple[int, ...] = (1,)
    transpose: bool = False
    part: int = 0
    parts: int = 1
    permute: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.permute is not None:
            if self.transpose:
                raise ValueError(f"{self.name}: set transpose=True or permute={self.permute}, not both")
            if sorted(self.permute) != list(range(len(self.groups))):
                raise ValueError(
                    f"{self.name}: permute={self.permute} is not a permutation of the {len(self.groups)} view axes "
                    f"(groups {self.groups})"
                )
        if self.transpose and len(self.groups) != 2:
            raise ValueError(f"{self.name}: transpose=True needs a 2-D view; groups {self.groups} give another rank")

    def axes(self) -> tuple[int, ...] | None:
        """The permutation from the tensor to the view (None for the tensor itself)."""
        return (1, 0) if self.transpose else self.permute


def linear_rules(name: str, path: tuple[str, ...], groups: tuple[int, ...], bias: bool) -> list[TensorRule]:
    """A torch Linear `name`: weight [out, in] -> `path`/kernel (transposed, view [in, out], split by `groups`), and
    with `bias` its bias [out] -> `path`/bias (split like the kernel's output axis)."""
    rules = [TensorRule(f"{name}.weight", (*path, "kernel"), groups=groups, transpose=True)]
    if bias:
        rules.append(TensorRule(f"{name}.bias", (*path, "bias"), groups=(groups[1],)))
    return rules


def norm_rules(name: str, path: tuple[str, ...]) -> list[TensorRule]:
    """A torch LayerNorm `name`: weight -> `path`/scale, bias -> `path`/bias."""
    return [TensorRule(f"{name}.weight", (*path, "scale")), TensorRule(f"{name}.bias", (*path, "bias"))]


def _grouped(param_shape: Sequence[int], groups: Sequence[int]) -> list[tuple[int, ...]]:
    out, axis = [], 0
    for count in groups:
        out.append(tuple(param_shape[axis : axis + count]))
        axis += count
    return out


def tensor_shape(rule: TensorRule, param_shape: Sequence[int]) -> tuple[int, ...]:
    """The checkpoint tensor's shape that a parameter of `param_shape` implies."""
    if sum(rule.groups) != len(param_shape):
        raise ValueError(f"{rule.name}: groups {rule.groups} do not cover the parameter shape {tuple(param_shape)}")
    view = [math.prod(sizes) for sizes in _grouped(param_shape, rule.groups)]
    view[-1] *= rule.parts
    return tuple(_unpermute(view, rule.axes()))


def _unpermute(view: Sequence[Any], axes: tuple[int, ...] | None) -> list[Any]:
    """Per-tensor-axis entries from per-view-axis ones (view axis i is tensor axis axes[i])."""
    if axes is None:
        return list(view)
    out: list[Any] = [None] * len(view)
    for view_axis, tensor_axis in enumerate(axes):
        out[tensor_axis] = view[view_axis]
    return out


def read_block(
    files: SafetensorsFiles,
    rule: TensorRule,
    param_shape: Sequence[int],
    index: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """Block `index` (one slice per parameter axis, None = all) of the parameter that `rule` describes, read from
    the checkpoint through safetensors slices: numpy [*block shape] in the tensor's dtype.

    Each view axis is read over the rows its block needs (contiguous when the inner parameter axes of the group are
    whole, as under any sharding of whole heads); inner partial axes are sliced after the read.
    """
    param_shape = tuple(param_shape)
    index = tuple(slice(0, n) for n in param_shape) if index is None else tuple(index)
    bounds = [s.indices(n)[:2] for s, n in zip(index, param_shape, strict=True)]
    groups = rule.groups
    view_slices, after, axis = [], [], 0
    for count in groups:
        if count == 0:  # a view axis of size 1 without a parameter axis
            view_slices.append(slice(0, 1))
            continue
        sizes = param_shape[axis : axis + count]
        inner = math.prod(sizes[1:])
        start, stop = bounds[axis]
        view_slices.append(slice(start * inner, stop * inner))
        after.append((stop - start, *sizes[1:]))
        axis += count
    chunk = math.prod(_grouped(param_shape, groups)[-1])
    last = view_slices[-1]
    view_slices[-1] = slice(last.start + rule.part * chunk, last.stop + rule.part * chunk)
    axes = rule.axes()
    block = files.read(rule.name, tuple(_unpermute(view_slices, axes)))
    if axes is not None:
        block = block.transpose(axes)
    block = block.reshape(tuple(size for sizes in after for size in sizes))
    inner_index, axis = [], 0
    for count in groups:
        if count == 0:
            continue
        inner_index.append(slice(None))
        for offset in range(1, count):
            start, stop = bounds[axis + offset]
            inner_index.append(slice(start, stop))
        axis += count
    return block[tuple(inner_index)]


def join_parameters(rules: Sequence[TensorRule], params: Sequence[np.ndarray]) -> np.ndarray:
    """The checkpoint tensor of `rules` (all of one tensor name, in part order) from their parameters (numpy)."""
    views = []
    for rule, param in zip(rules, params, strict=True):
        sizes = _grouped(param.shape, rule.groups)
        views.append(param.reshape(tuple(math.prod(group) for group in sizes)))
    view = views[0] if len(views) == 1 else np.concatenate(views, axis=-1)
    axes = rules[0].axes()
    return np.ascontiguousarray(view if axes is None else view.transpose(np.argsort(axes)))
