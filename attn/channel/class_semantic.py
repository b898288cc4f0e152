"""`class_semantic`: Class Semantics-based Attention (Sridhar et al., "Class Semantics-based Attention for Action
Detection", ICCV 2021).

In an action detector, an action-recognition encoder produces class-semantics-rich snippet features R [T, C_r];
a localization encoder turns them into F [T, C]. CSA learns attention weights from R (not from F) jointly over the
channel axis and local temporal windows, applies them to F along the channel axis and along the temporal axis,
and fuses the two attended maps. The paper's text fixes that structure; the layer sizes below are this module's
choices:

    U     = ReLU(Conv_k(R))                                   local temporal window k, C_r -> C (all channels mix)
    a_c   = sigmoid(W_2 ReLU(W_1 mean_t(U) + b_1) + b_2)      per-channel weights [C]    (W_1: C -> C / reduction)
    a_t   = sigmoid(Conv_k(U))                                per-time-point weights [T]  (C -> 1)
    out   = F (.) a_c + F (.) a_t                             fusion: the sum of the two attended maps

With `num_classes=K`, R is first turned into its per-snippet class distribution softmax(R W_cls + b) [T, K] (the
"temporal distribution of class semantics"), and the attention is learned from that; the class logits are sown as
intermediates "class_logits" so a model can supervise them with action labels. With `semantics=None` the module
attends from F itself (R = F), an SE-style self-attention variant the paper compares against.

Layout: the input may be features [B, T, C] (the paper's temporal features; Conv_k is 1-D over T) or a feature map
[B, H, W, C] (NHWC, for CNN stages; "time" is then the H x W grid and Conv_k is k x k). `semantics`, when given,
has the same leading shape as x with any number C_r of channels.

Shapes: x [B, T, C] or [B, H, W, C] -> same. Parameters (n = 1 or 2 spatial axes, C_in = K if num_classes else
C_r, h = C / reduction): [C_r K + K] + k^n C_in C + C + C h + h + h C + C + k^n C + 1. Time O(B T k^n C_in C).
No reduction to softmax attention. The weights (a_c [B, C], a_t [B, *S]) are sown as intermediates
"attention_map" when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_divides, check_int, conv, spatial_mean
from attn.registry import register

Array = jax.Array


@register(
    "class_semantic",
    family="channel",
    paper="Class Semantics-based Attention for Action Detection",
    catalog=9,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="channel and temporal gates learned from class-semantic features (call arg semantics), fused by sum",
    option_docs={
        "kernel_size": "odd local temporal window (1-D input) or k x k window (NHWC input) of the convolutions",
        "reduction": "channel reduction of the channel-weight MLP (hidden C / reduction)",
        "num_classes": "if set, learn the attention from softmax class scores over this many classes",
    },
    fidelity="paper",
    reference="the paper's text: attention learned from class-semantic features over channels and local temporal "
    "windows, fused by sum; layer sizes are this module's choices",
)
class ClassSemanticAttention(nn.Module):
    """CSA. `__call__(x [B, T, C] | [B, H, W, C], *, semantics=None [..., C_r])` -> x * a_c + x * a_t."""

    kernel_size: int = 3
    reduction: int = 4
    num_classes: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, semantics: Array | None = None) -> Array:
        if jnp.ndim(x) not in (3, 4):
            raise ValueError(
                f"x must be features [batch, time, channels] or a map [batch, height, width, channels], got shape "
                f"{tuple(jnp.shape(x))}"
            )
        if semantics is not None and (jnp.ndim(semantics) != x.ndim or semantics.shape[:-1] != x.shape[:-1]):
            raise ValueError(
                f"semantics must have shape {tuple(x.shape[:-1])} + (C_r,) to match x, "
                f"got {tuple(jnp.shape(semantics))}"
            )
        channels = x.shape[-1]
        check_int("kernel_size", self.kernel_size, odd=True)
        check_int("reduction", self.reduction)
        check_divides("reduction", self.reduction, channels)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes)
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        window = (self.kernel_size,) * (x.ndim - 2)

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
                name=name,
                **args,
            )

        x = x.astype(self.dtype)
        r = x if semantics is None else semantics.astype(self.dtype)
        if self.num_classes is not None:
            logits = dense(self.num_classes, ("conv_in", "classes"), "class_scores")(r)
            self.sow("intermediates", "class_logits", logits)
            r = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)

        u = nn.relu(conv(channels, window, name="semantic_conv", **args)(r))
        hidden = nn.relu(dense(channels // self.reduction, ("channels", "hidden"), "channel_in")(spatial_mean(u)))
        a_c = jax.nn.sigmoid(dense(channels, ("hidden", "channels"), "channel_out")(hidden))
        a_t = jax.nn.sigmoid(conv(1, window, name="temporal_conv", **args)(u))[..., 0]
        self.sow("intermediates", "attention_map", (a_c, a_t))
        channel_shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
        return x * a_c.reshape(channel_shape) + x * a_t[..., None]
