"""`ela`: Efficient Local Attention (Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural
Networks", 2024).

Coordinate-attention-like gates along H and along W, without channel reduction and with GroupNorm instead of
BatchNorm. One 1-D convolution and one GroupNorm are shared by both directions:

    z_h[h, c] = mean_w x[h, w, c]                 z_w[w, c] = mean_h x[h, w, c]
    a_h = sigmoid(GN(Conv1D_k(z_h)))              a_w = sigmoid(GN(Conv1D_k(z_w)))      (same Conv1D, same GN)
    out[h, w, c] = x[h, w, c] * a_h[h, c] * a_w[w, c]

Conv1D_k runs along H (resp. W) with C in and C out channels, `conv_groups` groups, zero padding (k - 1) / 2 and
no bias; GN normalises each of `norm_groups` channel groups over (length, channels in the group) with a learned
per-channel scale and bias. The paper's four versions (its Table of hyper-parameters; kernel size, conv groups,
GN groups):

    ELA-T: k = 5, groups = C (depthwise),  GN 32      ELA-B: k = 7, groups = C,      GN 16
    ELA-S: k = 5, groups = C / 8,          GN 16      ELA-L: k = 7, groups = C / 8,  GN 16

`variant` picks one; `kernel_size`, `conv_groups`, `norm_groups` override single entries.

Shapes: x [B, H, W, C] -> [B, H, W, C]. Parameters: k * C * (C / conv_groups) + 2 C (depthwise: k C + 2 C),
independent of H and W. Time O(B H W C + B (H + W) k C^2 / conv_groups). The gate factorises per channel as an
outer product a_h (x) a_w. No reduction to softmax attention. The gates (a_h [B, H, C], a_w [B, W, C]) are sown as
intermediates "attention_map" when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_divides, check_int, check_nhwc, conv, group_norm
from attn.core.options import check_options
from attn.core.validation import choice
from attn.registry import register

Array = jax.Array

# variant -> (kernel_size, channels per conv group (1 = depthwise), GroupNorm groups)
VARIANTS = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


@register(
    "ela",
    family="channel",
    paper="ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
    catalog=63,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="H- and W-strip gates from a shared 1-D conv + GroupNorm, no channel reduction (ELA-T/B/S/L)",
    option_docs={
        "variant": "'T', 'B', 'S' or 'L': the paper's (kernel size, conv groups, GN groups) presets",
        "kernel_size": "odd 1-D kernel size along H and W; None = the variant's (5 or 7)",
        "conv_groups": "groups of the 1-D conv; None = the variant's (C for T/B, C/8 for S/L)",
        "norm_groups": "GroupNorm groups; None = the variant's (32 for T, 16 otherwise)",
    },
    fidelity="paper",
    reference="ELA paper: the H/W strip-gate equations and its hyper-parameter table (ELA-T/B/S/L)",
    validators={"variant": choice(*VARIANTS)},
)
class ELA(nn.Module):
    """Efficient Local Attention. x [B, H, W, C] -> x * a_h[:, :, None] * a_w[:, None, :], same shape."""

    variant: str = "B"
    kernel_size: int | None = None
    conv_groups: int | None = None
    norm_groups: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def resolved(self, channels: int) -> tuple[int, int, int]:
        """(kernel_size, conv_groups, norm_groups) for `channels` input channels, validated."""
        check_options(self)
        kernel, per_group, norm = VARIANTS[self.variant]
        kernel = kernel if self.kernel_size is None else self.kernel_size
        groups = max(channels // per_group, 1) if self.conv_groups is None else self.conv_groups
        norm = norm if self.norm_groups is None else self.norm_groups
        check_int("kernel_size", kernel, odd=True)
        check_int("conv_groups", groups)
        check_int("norm_groups", norm)
        check_divides("conv_groups", groups, channels)
        check_divides("norm_groups", norm, channels)
        return kernel, groups, norm

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = check_nhwc(x)[-1]
        kernel, groups, norm_groups = self.resolved(channels)
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        line_conv = conv(channels, (kernel,), groups=groups, use_bias=False, name="conv", **args)
        norm = group_norm(norm_groups, name="norm", **args)
        x = x.astype(self.dtype)
        z_h = jnp.mean(x, axis=2, dtype=jnp.float32).astype(self.dtype)  # [B, H, C]
        z_w = jnp.mean(x, axis=1, dtype=jnp.float32).astype(self.dtype)  # [B, W, C]
        a_h = jax.nn.sigmoid(norm(line_conv(z_h)))
        a_w = jax.nn.sigmoid(norm(line_conv(z_w)))
        self.sow("intermediates", "attention_map", (a_h, a_w))
        return x * a_h[:, :, None, :] * a_w[:, None, :, :]
