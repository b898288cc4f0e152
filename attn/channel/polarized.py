"""`polarized`: Polarized Self-Attention (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise
Regression", 2021).

Two branches that each keep full resolution along one axis and collapse the other completely, with a softmax on
the collapsed side and a sigmoid on the output ("polarized filtering" + "enhancement"). With r = inner_channels
(C / 2 in the paper) and 1x1 convolutions W (no biases):

  channel-only branch (A_ch in R^C):
    p     = softmax_{HW}( x W_q^ch )                     W_q^ch: C -> 1       p [HW]
    z     = sum_{hw} p[hw] (x W_v^ch)[hw]                W_v^ch: C -> r       z [r]
    A_ch  = sigmoid( LayerNorm( z W_z ) )                W_z: r -> C          A_ch [C]
    Z_ch  = A_ch (.) x                                   (broadcast over H, W)

  spatial-only branch (A_sp in R^{H x W}):
    q     = softmax_r( mean_{HW}( x W_q^sp ) )           W_q^sp: C -> r       q [r]
    A_sp  = sigmoid( (x W_v^sp) q )                      W_v^sp: C -> r       A_sp [H, W]
    Z_sp  = A_sp (.) x                                   (broadcast over C)

  layout "parallel":    PSA_p(x) = Z_ch(x) + Z_sp(x)
  layout "sequential":  PSA_s(x) = Z_sp(Z_ch(x))         (the spatial branch runs on the channel-gated map)

These are the paper's equations; the released code differs in places (its parallel spatial branch applies a
softmax over HW and then the sigmoid, its sequential channel branch has a bottleneck MLP), which this module does
not follow.

Shapes: x [B, H, W, C] -> [B, H, W, C]. Parameters: C r (W_v^ch) + C (W_q^ch) + r C (W_z) + 2 C (LayerNorm) +
2 C r (spatial branch) = 4 C r + 3 C (= 2 C^2 + 3 C at r = C / 2). Time O(B H W C r), memory O(B H W r): linear in
the number of pixels. No reduction to softmax attention over tokens. The gates (A_ch [B, C], A_sp [B, H, W]) are
sown as intermediates "attention_map" when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_int, check_nhwc, conv, layer_norm
from attn.core.options import check_options
from attn.core.validation import choice
from attn.registry import register

Array = jax.Array

LAYOUTS = ("parallel", "sequential")


@register(
    "polarized",
    family="channel",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    catalog=113,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="channel-only and spatial-only softmax+sigmoid gates at full resolution; parallel or sequential",
    option_docs={
        "layout": "'parallel' (Z_ch(x) + Z_sp(x)) or 'sequential' (Z_sp(Z_ch(x)))",
        "inner_channels": "internal width r of both branches; None = C // 2 (the paper)",
    },
    fidelity="paper",
    reference="PSA paper's equations (channel-only and spatial-only branches, parallel and sequential layouts); the "
    "released code's deviations are not followed",
    validators={"layout": choice(*LAYOUTS)},
)
class PolarizedSelfAttention(nn.Module):
    """Polarized Self-Attention. x [B, H, W, C] -> [B, H, W, C]."""

    layout: str = "parallel"
    inner_channels: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = check_nhwc(x)[-1]
        check_options(self)
        inner = max(channels // 2, 1) if self.inner_channels is None else self.inner_channels
        check_int("inner_channels", inner)
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)

        def pointwise(features: int, name: str) -> nn.Conv:
            return conv(features, 1, name=name, **args)

        x = x.astype(self.dtype)

        # Channel-only branch: softmax over positions pools the C -> r values into one descriptor.
        p = jax.nn.softmax(pointwise(1, "channel_query")(x).astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        z = jnp.einsum("bhwo,bhwr->br", p, pointwise(inner, "channel_value")(x))
        z = nn.Dense(
            channels,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "channels")),
            name="channel_up",
        )(z)
        a_ch = jax.nn.sigmoid(layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name="channel_norm")(z))
        z_ch = x * a_ch[:, None, None, :]

        # Spatial-only branch on x (parallel) or on the channel-gated map (sequential).
        source = x if self.layout == "parallel" else z_ch
        q = jnp.mean(pointwise(inner, "spatial_query")(source), axis=(1, 2), dtype=jnp.float32)
        q = jax.nn.softmax(q, axis=-1).astype(self.dtype)
        a_sp = jax.nn.sigmoid(jnp.einsum("bhwr,br->bhw", pointwise(inner, "spatial_value")(source), q))
        z_sp = source * a_sp[..., None]

        self.sow("intermediates", "attention_map", (a_ch, a_sp))
        return z_ch + z_sp if self.layout == "parallel" else z_sp
