"""`HeadwiseLinear`: a per-head (or per-group-of-heads) linear map of head vectors, identity-initialised; the
learnable feature maps of linear attention (`linear`'s learnable map, `hedgehog`) use it.

x [B, T, heads, D] -> [B, T, heads, features]; kernel [groups, D, features] named (heads_axis, "head_dim", None),
bias [groups, features] named (heads_axis, None).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["HeadwiseLinear", "identity_init"]


def identity_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """[groups, d, f] stacked identity matrices (rectangular when d != f)."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)


class HeadwiseLinear(nn.Module):
    """x [B, T, heads, D] -> [B, T, heads, features]: one [D, features] map and bias per group of heads.

    `groups` divides `heads`; head h uses map h // (heads / groups) (so kv-head maps also serve their queries).
    The kernel [groups, D, features] is identity-initialised and named (heads_axis, "head_dim", None).
    """

    groups: int
    features: int
    heads_axis: str = "heads"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, length, heads, dim = x.shape
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(identity_init, (self.heads_axis, "head_dim", None)),
            (self.groups, dim, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (self.heads_axis, None)),
            (self.groups, self.features),
            self.param_dtype,
        )
        grouped = x.astype(self.dtype).reshape(batch, length, self.groups, heads // self.groups, dim)
        y = jnp.einsum("btgjd,gdf->btgjf", grouped, jnp.asarray(kernel, self.dtype))
        y = y + jnp.asarray(bias, self.dtype)[:, None, :]
        return y.reshape(batch, length, heads, self.features)
