"""Zero padding to kernel-friendly sizes (zero keys/values/queries change neither outputs nor states)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_power_of_two(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def pad_axes(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pads axis -> size (each size >= the current one)."""
    widths = [(0, 0)] * x.ndim
    for axis, size in sizes.items():
        widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if any(w[1] for w in widths) else x
