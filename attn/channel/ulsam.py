"""`ulsam`: Ultra-Lightweight Subspace Attention (Saini et al., "ULSAM: Ultra-Lightweight Subspace Attention Module
for Compact Convolutional Neural Networks", WACV 2020).

The channels are split into g subspaces F_1 .. F_g of m = C / g channels; each infers its own spatial attention
map (paper eqs. 1-3):

    A_n   = softmax_{H x W}( PW_n( maxpool_{3x3, stride 1}( DW_n(F_n) ) ) )      A_n in R^{H x W}, sums to 1
    F^_n  = A_n (x) F_n + F_n                                                     (broadcast over the m channels)
    out   = concat(F^_1, ..., F^_g)

DW_n is a depthwise 1x1 convolution (a per-channel scale and bias), the max pool pads with -inf, and PW_n a
pointwise convolution from m channels to one map (with bias). The official code also puts BatchNorm + ReLU after
DW_n and after PW_n; this module follows the paper's equation and has neither (BatchNorm would make it stateful).

Shapes: x [B, H, W, C] -> [B, H, W, C]. Parameters: g * (2m + m + 1) = 3 C + g. Time O(B H W C), memory
O(B H W C). With g = 1 it is a single spatial softmax gate shared by all channels. No reduction to softmax
attention over tokens (the map is computed from each position alone). A [B, H, W, g] is sown as intermediates
"attention_map" when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_divides, check_int, check_nhwc
from attn.registry import register

Array = jax.Array


@register(
    "ulsam",
    family="channel",
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    catalog=74,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="one spatial softmax map per channel subspace (DW 1x1, 3x3 max pool, PW), F + A*F; 3C + g params",
    option_docs={"num_subspaces": "number g of channel subspaces (groups), each with its own attention map"},
    fidelity="paper",
    reference="ULSAM paper, Eqs. 1-3 (the official code's extra BatchNorm + ReLU are left out)",
)
class ULSAM(nn.Module):
    """Subspace attention. x [B, H, W, C] -> x * (1 + A_group(c)), same shape; C % num_subspaces == 0."""

    num_subspaces: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, height, width, channels = check_nhwc(x)
        g = self.num_subspaces
        check_int("num_subspaces", g)
        check_divides("num_subspaces", g, channels)
        m = channels // g

        def param(name, init, shape, axes):
            return jnp.asarray(
                self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype), self.dtype
            )

        dw_scale = param("dw_kernel", nn.initializers.ones_init(), (g, m), ("subspaces", "channels"))
        dw_bias = param("dw_bias", nn.initializers.zeros_init(), (g, m), ("subspaces", "channels"))
        pw_kernel = param(
            "pw_kernel", nn.initializers.lecun_normal(in_axis=1, out_axis=0), (g, m), ("subspaces", "channels")
        )
        pw_bias = param("pw_bias", nn.initializers.zeros_init(), (g,), ("subspaces",))

        x = x.astype(self.dtype)
        dw = x * dw_scale.reshape(channels) + dw_bias.reshape(channels)
        pooled = nn.max_pool(dw, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        logits = jnp.einsum("bhwgm,gm->bhwg", pooled.reshape(batch, height, width, g, m), pw_kernel) + pw_bias
        probs = jax.nn.softmax(logits.reshape(batch, height * width, g).astype(jnp.float32), axis=1)
        attention = probs.reshape(batch, height, width, g).astype(self.dtype)
        self.sow("intermediates", "attention_map", attention)
        gate = jnp.repeat(attention, m, axis=-1)  # subspace n covers channels [n m, (n + 1) m)
        return x * gate + x
