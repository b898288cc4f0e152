"""Convolution pieces shared by the channel modules, the CNN backbone and conv-based spatial mechanisms:
NHWC input checks and convolution / normalisation layers whose parameters carry logical axis names.

Conv kernels are named ("conv_height", "conv_width", "conv_in", "channels") (1-D: ("conv_width", "conv_in",
"channels")) and biases and norm parameters ("channels",). No default sharding rule maps these names, so the small
parameters of these modules stay replicated on every mesh (a 1x1 conv kernel named ("embed", "embed") would ask
for the same mesh axis twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

KERNEL_AXES_2D = ("conv_height", "conv_width", "conv_in", "channels")
KERNEL_AXES_1D = ("conv_width", "conv_in", "channels")


def check_nhwc(x: Array, name: str = "x") -> tuple[int, int, int, int]:
    """Returns (batch, height, width, channels); ValueError unless `x` is a rank-4 NHWC array."""
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"{name} must be a feature map [batch, height, width, channels] (NHWC, rank 4), got shape "
            f"{tuple(jnp.shape(x))}"
        )
    return tuple(int(d) for d in x.shape)  # type: ignore[return-value]


def check_int(name: str, value: Any, *, minimum: int = 1, odd: bool = False) -> None:
    """ValueError naming `name` unless `value` is an int >= minimum (and odd if asked)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (odd and value % 2 == 0):
        kind = "an odd int" if odd else "an int"
        raise ValueError(f"{name}={value!r} must be {kind} >= {minimum}")


def check_divides(name: str, value: int, channels: int, what: str = "channels") -> None:
    """ValueError naming `name` unless `value` divides `channels`."""
    if channels % value:
        raise ValueError(f"{name}={value} must divide the number of {what} ({channels})")


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    groups: int = 1,
    dilation: int = 1,
    strides: int = 1,
    use_bias: bool = True,
    padding: str = "SAME",
) -> nn.Conv:
    """A 1-D or 2-D convolution (by the length of `kernel_size`; an int means 2-D square) with named axes.

    "SAME" padding with an odd kernel pads (k - 1) // 2 * dilation on each side, like PyTorch's
    `padding=k // 2 * dilation`, so the module formulas below match the papers' code.
    """
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    axes = KERNEL_AXES_2D if len(kernel) == 2 else KERNEL_AXES_1D
    return nn.Conv(
        features,
        kernel_size=kernel,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
        name=name,
    )


def group_norm(num_groups: int, *, dtype: Dtype, param_dtype: Dtype, name: str, epsilon: float = 1e-5) -> nn.Module:
    """GroupNorm over the channel (last) axis; statistics over all non-batch axes of each group."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
        name=name,
    )


def layer_norm(*, dtype: Dtype, param_dtype: Dtype, name: str, epsilon: float = 1e-5) -> nn.Module:
    """LayerNorm over the channel (last) axis."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
        name=name,
    )


def spatial_mean(x: Array) -> Array:
    """Global average pool of [B, *spatial, C] over the spatial axes -> [B, C], reduced in float32."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), dtype=jnp.float32).astype(x.dtype)
