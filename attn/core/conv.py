"""Convolution pieces shared by the channel modules, the CNN backbone and conv-based spatial mechanisms:
NHWC input checks and convolution / normalisation layers whose parameters carry logical axis names.

Conv kernels are named ("conv_height", "conv_width", "conv_in", "channels") (1-D: ("conv_width", "conv_in",
"channels")) and biases and norm parameters ("channels",). No default sharding rule maps these names, so the small
parameters of these modules stay replicated on every mesh (a 1x1 conv kernel named ("embed", "embed") would ask
for the same mesh axis twice).

For sequence layers: `HeadwiseDepthwiseConv`, a depthwise convolution over the token axis of per-head vectors
[B, T, H, D] (kernel named (None, "heads", "head_dim")), with the validator `kernel_size_or_off` for its size option
(agent's DWC term, RALA's LePE); `causal_depthwise_conv`, the causal depthwise convolution over the token axis
with a carried state for decoding (RC-MHA's and Titans' convolutions after the q/k/v projections), and
`identity_filter`, its pass-through initialiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.validation import OptionValidator, non_negative_int

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
    """Global average pool of [B, *spatial, C] over the spatial axes -> [B, C], reduced in float32 (float64 for
    float64 inputs)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


def causal_depthwise_conv(x: Array, kernel: Array, state: Array | None = None, bias: Array | None = None) -> Array:
    """y_t = bias + sum_s kernel[s] * x_{t - w + 1 + s}: x [B, T, H, D], kernel [w, D] or [w, H, D] -> [B, T, H, D].

    `state` [B, w - 1, H, D] holds the w - 1 rows before x (zeros when None: left zero padding); `bias` [D] or None.
    """
    width = kernel.shape[0]
    if state is None:
        state = jnp.zeros((x.shape[0], width - 1, *x.shape[2:]), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    kernel = jnp.asarray(kernel, x.dtype)
    length = x.shape[1]
    y = sum(kernel[s] * padded[:, s : s + length] for s in range(width))
    return y if bias is None else y + jnp.asarray(bias, x.dtype)


def identity_filter(key, shape, dtype=jnp.float32) -> Array:
    """[w, ...] filter that passes the current token through: tap w - 1 is 1, the others 0."""
    return jnp.zeros(shape, dtype).at[-1].set(1.0)


class HeadwiseDepthwiseConv(nn.Module):
    """Depthwise 1-D convolution over the token axis, one kernel per (head, channel): x [B, T, H, D] -> same.

    Zero 'same' padding (odd kernel), kernel [K, H, D] named (None, "heads", "head_dim") with PyTorch's default
    Conv init U(-1/sqrt(K), 1/sqrt(K)), bias [H, D] (zeros). Used for Agent Attention's DWC term and RALA's LePE.
    """

    kernel_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        size, (length, heads, dim) = self.kernel_size, x.shape[1:]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=(1, 2)),
                (None, "heads", "head_dim"),
            ),
            (size, heads, dim),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
            (heads, dim),
            self.param_dtype,
        )
        half = size // 2
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (half, half), (0, 0), (0, 0)))
        kernel = jnp.asarray(kernel, self.dtype)
        out = sum(padded[:, offset : offset + length] * kernel[offset] for offset in range(size))
        return out + jnp.asarray(bias, self.dtype)


# Option validator of a kernel size: 0 (off) or a positive odd int (a 'same' convolution needs a centre tap).
kernel_size_or_off = OptionValidator(
    lambda v: non_negative_int.test(v) and (v == 0 or v % 2 == 1), "0 (off) or a positive odd int", "0 or odd int"
)
