"""Cutting a sequence axis into blocks and pooling each block: the shared step of the block selectors.

A length-T axis is cut into n_blocks = ceil(T / block_size) consecutive blocks of block_size entries; the last block
is padded to full length. Block b holds the real entries b * block_size .. min((b + 1) * block_size, T) - 1, so
every block has at least one real entry and only the last one can be partial.

    split_blocks(x, block_size, axis, fill)   [.., T, ..] -> [.., n_blocks, block_size, ..], the tail padded by fill
    real_token_mask(T, block_size)            bool [n_blocks, block_size]: True at the real (unpadded) entries
    pool_blocks(x, block_size, kind, axis)    [.., T, ..] -> [.., n_blocks, ..], a reduction over the real entries:
        "mean"  sum / (real entries of the block)   "sum"  sum          "first"  the block's first entry
        "max"   largest                             "min"  smallest
    (axis may be a tuple: the axes are pooled one after the other, e.g. a 2-D block max over [.., Tq, Tk]).

Padding never enters a pooled value: max and min pad with the dtype's lowest/highest value, sum and mean with 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn.core.validation import check_choice, positive_int

Array = jax.Array

POOLINGS = ("mean", "sum", "max", "min", "first")


def _axis(x: Array, axis: Any) -> int:
    """The non-negative position of `axis` in x, or ValueError."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, (bool, np.bool_)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis!r} must be an int in [-{x.ndim}, {x.ndim}) for an input of shape {x.shape}")
    return int(axis) % x.ndim


def _extreme(dtype: Any, lowest: bool) -> Any:
    """The padding value that a max (lowest=True) or min (lowest=False) never picks over a real entry."""
    if jnp.issubdtype(dtype, jnp.inexact):
        return -jnp.inf if lowest else jnp.inf
    if jnp.issubdtype(dtype, jnp.bool_):
        return not lowest
    info = jnp.iinfo(dtype)
    return info.min if lowest else info.max


def real_token_mask(length: int, block_size: int) -> Array:
    """bool [ceil(length / block_size), block_size]: entry (b, i) is True when b * block_size + i < length."""
    positive_int("block_size", block_size)
    positive_int("length", length)
    n_blocks = -(-length // block_size)
    return (jnp.arange(n_blocks * block_size) < length).reshape(n_blocks, block_size)


def split_blocks(x: Array, block_size: int, axis: int = 1, fill: Any = 0) -> tuple[Array, int]:
    """Cuts one axis into blocks.

    Args:
      x: [..., T, ...] with T at `axis` (T >= 1).
      block_size: positive int, entries per block.
      axis: int, the axis to cut (negative counts from the end).
      fill: value of the padded tail entries.
    Returns:
      (blocks [..., n_blocks, block_size, ...] with n_blocks = ceil(T / block_size) at `axis` and the entries of each
      block at axis + 1, n_blocks).
    """
    positive_int("block_size", block_size)
    axis = _axis(x, axis)
    length = x.shape[axis]
    if length == 0:
        raise ValueError(
            f"x has an empty axis {axis} (shape {x.shape}); expected at least one entry to cut into blocks"
        )
    n_blocks = -(-length // block_size)
    pad = n_blocks * block_size - length
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(*x.shape[:axis], n_blocks, block_size, *x.shape[axis + 1 :]), n_blocks


def pool_blocks(x: Array, block_size: int, kind: str, axis: int | tuple[int, ...] = 1) -> Array:
    """Pools the real entries of each block.

    Args:
      x: [..., T, ...] with T at `axis` (each axis of a tuple pooled in turn, with the same block_size).
      block_size: positive int, entries per block.
      kind: one of POOLINGS: "mean" (over the block's real entries), "sum", "max", "min", "first".
      axis: int or tuple of ints, the axis (axes) to pool.
    Returns:
      [..., ceil(T / block_size), ...]: the pooled blocks in place of each pooled axis ("mean" in x's float dtype,
      the others in x's dtype).
    """
    positive_int("block_size", block_size)
    check_choice("kind", kind, POOLINGS)
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes:
        raise ValueError(f"axis={axis!r} must be an int or a non-empty tuple of ints")
    positions = [_axis(x, a) for a in axes]
    if len(set(positions)) != len(positions):
        raise ValueError(f"axis={axis!r} names one axis twice; expected distinct axes of an input of shape {x.shape}")
    for position in positions:
        x = _pool_axis(x, block_size, kind, position)
    return x


def _pool_axis(x: Array, block_size: int, kind: str, axis: int) -> Array:
    """pool_blocks over one non-negative axis."""
    length = x.shape[axis]
    if kind == "first":
        return split_blocks(x, block_size, axis)[0].take(0, axis=axis + 1)
    if kind in ("max", "min"):
        blocks, _ = split_blocks(x, block_size, axis, fill=_extreme(x.dtype, kind == "max"))
        return (jnp.max if kind == "max" else jnp.min)(blocks, axis=axis + 1)
    total = jnp.sum(split_blocks(x, block_size, axis)[0], axis=axis + 1)
    if kind == "sum":
        return total
    counts = jnp.sum(real_token_mask(length, block_size), axis=-1, dtype=jnp.int32)
    return total / counts.reshape(-1, *([1] * (x.ndim - axis - 1)))
