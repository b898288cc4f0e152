"""`lka`: Large Kernel Attention (Guo et al., "Visual Attention Network", 2022).

A K x K convolution is decomposed into a (2d - 1) x (2d - 1) depthwise convolution, a ceil(K/d) x ceil(K/d)
depthwise convolution with dilation d, and a 1x1 convolution; its output is used as an attention map that
multiplies the input element-wise (paper eq. 2, K = 21, d = 3):

    Attention = Conv_1x1( DW-D-Conv_{7x7, dilation 3}( DW-Conv_{5x5}(x) ) )
    out       = Attention (.) x

All three convolutions have biases and "same" zero padding. The attention map has the shape of x, so it adapts
per position and per channel. The receptive field of an output pixel is
kernel_size + (dilated_kernel_size - 1) * dilation = 5 + 6 * 3 = 23 pixels per axis.

Shapes: x [B, H, W, C] -> [B, H, W, C]. Parameters: (k1^2 + 1) C + (k2^2 + 1) C + C^2 + C = C^2 + (k1^2 + k2^2 + 3) C
(= C^2 + 77 C for 5 and 7). Time O(B H W (k1^2 + k2^2 + C) C): linear in the number of pixels. This is the LKA
module alone, not VAN's attention sublayer around it (1x1 conv, GELU, LKA, 1x1 conv, shortcut). No reduction to
softmax attention. The attention map is sown as intermediates "attention_map" when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_int, check_nhwc, conv
from attn.registry import register

Array = jax.Array


@register(
    "lka",
    family="channel",
    paper="Visual Attention Network",
    catalog=114,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="x * Conv1x1(DWConv7x7,d3(DWConv5x5(x))): a decomposed 21x21 kernel as a spatial+channel gate",
    option_docs={
        "kernel_size": "depthwise kernel size, 2d - 1 (paper: 5)",
        "dilated_kernel_size": "dilated depthwise kernel size, ceil(K / d) (paper: 7)",
        "dilation": "dilation d of the second depthwise convolution (paper: 3)",
    },
    fidelity="paper",
    reference="VAN paper, Eq. 2 (LKA = 1x1 conv of a 7x7 dilation-3 depthwise conv of a 5x5 depthwise conv)",
)
class LargeKernelAttention(nn.Module):
    """VAN's LKA. x [B, H, W, C] -> x * conv1x1(dw_dilated(dw(x))), same shape."""

    kernel_size: int = 5
    dilated_kernel_size: int = 7
    dilation: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = check_nhwc(x)[-1]
        check_int("kernel_size", self.kernel_size, odd=True)
        check_int("dilated_kernel_size", self.dilated_kernel_size, odd=True)
        check_int("dilation", self.dilation)
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        attention = conv(channels, self.kernel_size, groups=channels, name="depthwise", **args)(x)
        attention = conv(
            channels,
            self.dilated_kernel_size,
            groups=channels,
            dilation=self.dilation,
            name="depthwise_dilated",
            **args,
        )(attention)
        attention = conv(channels, 1, name="pointwise", **args)(attention)
        self.sow("intermediates", "attention_map", attention)
        return x * attention
