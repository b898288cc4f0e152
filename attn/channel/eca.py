"""`eca`: Efficient Channel Attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", CVPR 2020).

SE-style channel attention without dimensionality reduction: the pooled channel descriptor goes through one 1-D
convolution across the channel axis (local cross-channel interaction), shared by all channels:

    y_c   = mean_{h,w} x[h, w, c]                                  (global average pooling, y in R^C)
    z_c   = sum_{j=0}^{k-1} w_j y_{c + j - (k-1)/2}                (zero padding, no bias; cross-correlation)
    out   = x * sigmoid(z)[None, None, :]

The kernel size k follows the channel count (paper eq. 12, gamma = 2, b = 1):

    k = psi(C) = | log2(C) / gamma + b / gamma |_odd

|t|_odd is the odd number nearest to t; at even integers t (two odd numbers equally near) the larger one is taken.
That rule equals the widely used `t = int(|(log2 C + b) / gamma|); k = t if t is odd else t + 1` (for t >= 0 both
give 2 * floor(t / 2) + 1): C = 16 -> 3, 64 -> 3, 128 -> 5, 256 -> 5, 512 -> 5, 1024 -> 5, 2048 -> 7.
(The paper's released ECA-ResNet-50 instead fixes k = 3, 5, 5, 7 per stage, which gives its quoted "80" parameters
over 3 + 4 + 6 + 3 blocks.)

Shapes: x [B, H, W, C] -> [B, H, W, C]. Parameters: exactly k (the 1-D kernel). Time O(B H W C + B C k), memory
O(B C) beyond the input. No reduction to softmax attention (there is no token-token matrix). The gate
sigmoid(z) [B, C] is sown as intermediates "attention_map" when that collection is mutable.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_int, check_nhwc, spatial_mean
from attn.core.options import check_options
from attn.core.validation import positive
from attn.registry import register

Array = jax.Array


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive 1-D kernel size psi(C) = |log2(C)/gamma + b/gamma|_odd (odd; ties at even t go up)."""
    check_int("channels", channels)
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r} must be > 0")
    t = abs(math.log2(channels) / gamma + b / gamma)
    return 2 * math.floor(t / 2) + 1


@register(
    "eca",
    family="channel",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    catalog=7,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="channel gate from a k-tap 1-D conv over pooled channels (k adapts to C); k parameters",
    option_docs={
        "kernel_size": "odd 1-D kernel size across channels; None = adaptive |log2(C)/gamma + b/gamma|_odd",
        "gamma": "gamma of the adaptive kernel-size rule (paper: 2)",
        "b": "b of the adaptive kernel-size rule (paper: 1)",
    },
    fidelity="paper",
    reference="ECA-Net paper: the ECA module and Eq. 12 (adaptive kernel size, gamma = 2, b = 1)",
    validators={"gamma": positive},
)
class ECA(nn.Module):
    """ECA channel gate. x [B, H, W, C] -> x * sigmoid(conv1d_k(mean_{H,W} x)), same shape and dtype."""

    kernel_size: int | None = None
    gamma: float = 2.0
    b: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = check_nhwc(x)[-1]
        check_options(self)
        k = self.kernel_size
        if k is None:
            k = eca_kernel_size(channels, self.gamma, self.b)
        else:
            check_int("kernel_size", k, odd=True)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=0, out_axis=()), ("conv_width",)),
            (k,),
            self.param_dtype,
        )
        kernel = jnp.asarray(kernel, self.dtype)
        y = spatial_mean(x.astype(self.dtype))  # [B, C]
        pad = (k - 1) // 2
        padded = jnp.pad(y, ((0, 0), (pad, pad)))
        # k shifted copies: cheaper and clearer than a general conv for k <= ~9 taps.
        z = sum(kernel[j] * padded[:, j : j + channels] for j in range(k))
        gate = jax.nn.sigmoid(z)
        self.sow("intermediates", "attention_map", gate)
        return (x.astype(self.dtype) * gate[:, None, None, :]).astype(self.dtype)
