"""`dual_attention`: guided position + channel self-attention (Sinha & Dolz, "Multi-scale self-guided attention for
medical image segmentation", IEEE JBHI 2020).

The paper's guided attention module: a position attention module (PAM) and a channel attention module (CAM), the
DANet pair, each wrapped in convolutions, whose sum is re-weighted by the output of a small encoder-decoder (the
"semantic guidance" module); reconstruction losses on that encoder-decoder guide the attention:

    f      = x                      or concat(x, guide)  (the paper: concat(scale feature, fused multi-scale map))
    PAM(u) = gamma_p * softmax_rows(Q Kᵀ) V + u          Q, K = Conv1x1(u): C -> C_k,  V = Conv1x1(u): C -> C
    CAM(u) = gamma_c * softmax_rows(-U Uᵀ) U + u          U = u as [C, H W] (in float32); DANet's max(E) - E is a
                                                         row shift of -E, which softmax ignores
    P      = Block(PAM(Block(f)))      S = Block(CAM(Block'(f)))         Block = Conv3x3 -> GroupNorm -> PReLU
    (E, R) = Enc-Dec(f)               encoder code E [H/4, W/4, 4 C_f], reconstruction R [H, W, C_f] of f
    out    = Conv1x1( (P + S) (.) Conv3x3(R) )          (guidance=False: out = Conv1x1(P + S), plain DANet)

gamma_p, gamma_c are learned scalars initialised to 0 (each attention starts as the identity). The softmaxes use
no 1/sqrt(d) scale (as in DANet and the paper's code). Enc-Dec: two encoder blocks (two Conv3x3-GN-ReLU, 2x2
max pool; widths 2 C_f, 4 C_f) and two decoder blocks (two Conv3x3-GN-ReLU, 2x2 stride-2 transposed conv; widths
2 C_f, C_f). The paper's code uses BatchNorm; this module uses GroupNorm (`norm_groups`) so it is functional.
Guidance losses: the reconstruction loss mean((R - f)^2) is sown as losses "reconstruction"; the encoder code E is
sown as intermediates "semantic_code" so that a model can add the paper's guided loss between the codes of two
stacked stages (e.g. ||E_1 - E_2||^2). PAM's probabilities [B, 1, HW, HW] are sown as intermediates
"attention_weights" and CAM's [B, 1, C, C] as "channel_attention_weights" when that collection is mutable.

Shapes: x [B, H, W, C] (and guide [B, H, W, C_g]) -> [B, H, W, C]; with guidance, H and W divisible by 4.
Parameters (C_f = C + C_g, C_k = key_channels, n = 9 for 3x3 kernels): each branch n C_f C + C + n C^2 + C + 4 C
+ 2 (GN, PReLU); PAM 2 (C C_k + C_k) + C^2 + C + 1; CAM 1; output 1x1 C^2 + C; guidance n C_f C + C and the
encoder-decoder (counted in the tests). Time O(B (HW)^2 (C_k + C)) for PAM (quadratic in pixels, like DANet),
O(B C^2 HW) for CAM. Exact settings: PAM and CAM with gamma = 0 are the identity, and PAM is
`attn.functional.softmax_attention` (scale 1) over the H W positions with one head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.conv import check_divides, check_int, check_nhwc, conv, group_norm
from attn.registry import register

Array = jax.Array


def _gamma(module: nn.Module) -> Array:
    return module.param("gamma", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), (), module.param_dtype)


class PositionAttention(nn.Module):
    """DANet position attention. u [B, H, W, C] -> gamma * softmax(Q Kᵀ) V + u, softmax over the H W keys."""

    key_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: Array) -> Array:
        batch, height, width, channels = u.shape
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = conv(self.key_channels, 1, name="query", **args)(u).reshape(batch, height * width, 1, self.key_channels)
        k = conv(self.key_channels, 1, name="key", **args)(u).reshape(batch, height * width, 1, self.key_channels)
        v = conv(channels, 1, name="value", **args)(u).reshape(batch, height * width, 1, channels)
        out, aux = F.softmax_attention(q, k, v, scale=1.0, return_probs=True)
        self.sow("intermediates", "attention_weights", aux["probs"])
        gamma = jnp.asarray(_gamma(self), self.dtype)
        return gamma * out.reshape(u.shape) + u


class ChannelAttention(nn.Module):
    """DANet channel attention. u [B, H, W, C] -> gamma * softmax(-U Uᵀ) U + u with U = u as [C, H W]."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: Array) -> Array:
        batch, height, width, channels = u.shape
        # Channels are the tokens and the H W pixels their features; softmax(max(E) - E) = softmax(-E) per row.
        # The Gram matrix E = U Uᵀ sums over all H W pixels, so it is formed in float32 whatever the dtype.
        tokens = jnp.swapaxes(u.reshape(batch, height * width, channels), 1, 2)[:, :, None, :].astype(jnp.float32)
        out, aux = F.softmax_attention(-tokens, tokens, tokens, scale=1.0, return_probs=True)
        self.sow("intermediates", "channel_attention_weights", aux["probs"])
        out = jnp.swapaxes(out[:, :, 0, :], 1, 2).reshape(u.shape).astype(self.dtype)
        gamma = jnp.asarray(_gamma(self), self.dtype)
        return gamma * out + u


class ConvNormAct(nn.Module):
    """Conv3x3 -> GroupNorm -> PReLU (slope initialised to 0.25 as in PyTorch) or ReLU."""

    features: int
    norm_groups: int
    activation: str = "prelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: Array) -> Array:
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        u = conv(self.features, 3, name="conv", **args)(u)
        u = group_norm(self.norm_groups, name="norm", **args)(u)
        if self.activation == "relu":
            return nn.relu(u)
        slope = self.param(
            "prelu_slope", nn.with_logical_partitioning(nn.initializers.constant(0.25), ()), (), self.param_dtype
        )
        return jnp.where(u >= 0, u, jnp.asarray(slope, self.dtype) * u)


class SemanticGuidance(nn.Module):
    """The paper's encoder-decoder. f [B, H, W, Cf] -> (code [B, H/4, W/4, 4 Cf], reconstruction [B, H, W, Cf])."""

    norm_groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, f: Array) -> tuple[Array, Array]:
        cf = f.shape[-1]
        args = dict(norm_groups=self.norm_groups, activation="relu", dtype=self.dtype, param_dtype=self.param_dtype)

        def block(u: Array, width: int, name: str) -> Array:
            u = ConvNormAct(width, name=f"{name}_a", **args)(u)
            return ConvNormAct(width, name=f"{name}_b", **args)(u)

        def up(u: Array, width: int, name: str) -> Array:
            return nn.ConvTranspose(
                width,
                (2, 2),
                strides=(2, 2),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "channels")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
                name=name,
            )(u)

        enc1 = nn.max_pool(block(f, 2 * cf, "encoder_1"), (2, 2), strides=(2, 2))
        code = nn.max_pool(block(enc1, 4 * cf, "encoder_2"), (2, 2), strides=(2, 2))
        dec2 = up(block(code, 2 * cf, "decoder_2"), 2 * cf, "decoder_2_up")
        reconstruction = up(block(dec2, cf, "decoder_1"), cf, "decoder_1_up")
        return code, reconstruction


@register(
    "dual_attention",
    family="channel",
    paper="Multi-scale self-guided attention for medical image segmentation",
    catalog=18,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="DANet position + channel self-attention re-weighted by an encoder-decoder guide (reconstruction loss)",
    option_docs={
        "guidance": "multiply by the encoder-decoder's reconstruction and sow its loss (False: plain DANet PAM + CAM)",
        "key_channels": "query/key width of the position attention; None = max(C // 8, 1) (DANet)",
        "norm_groups": "GroupNorm groups (must divide C and the input channels C + C_guide)",
    },
    fidelity="paper",
    reference="the paper's guided attention module (PAM + CAM re-weighted by the encoder-decoder guide); unscaled "
    "softmaxes as in DANet and the paper's code; GroupNorm replaces the code's BatchNorm",
)
class DualAttention(nn.Module):
    """Guided attention module. `__call__(x [B, H, W, C], *, guide=None [B, H, W, Cg])` -> [B, H, W, C]."""

    guidance: bool = True
    key_channels: int | None = None
    norm_groups: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, guide: Array | None = None) -> Array:
        batch, height, width, channels = check_nhwc(x)
        f = x.astype(self.dtype)
        if guide is not None:
            if check_nhwc(guide, "guide")[:3] != (batch, height, width):
                raise ValueError(f"guide must have shape [{batch}, {height}, {width}, C_guide], got {guide.shape}")
            f = jnp.concatenate([f, guide.astype(self.dtype)], axis=-1)
        key_channels = max(channels // 8, 1) if self.key_channels is None else self.key_channels
        check_int("key_channels", key_channels)
        check_int("norm_groups", self.norm_groups)
        check_divides("norm_groups", self.norm_groups, channels)
        check_divides("norm_groups", self.norm_groups, f.shape[-1], "input channels (x plus guide)")
        if self.guidance and (height % 4 or width % 4):
            raise ValueError(
                f"guidance=True needs height and width divisible by 4 (two 2x2 poolings), got {height}x{width}"
            )
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(norm_groups=self.norm_groups, **args)

        position = ConvNormAct(channels, name="position_in", **block)(f)
        position = PositionAttention(key_channels, name="position_attention", **args)(position)
        position = ConvNormAct(channels, name="position_out", **block)(position)
        channel = ConvNormAct(channels, name="channel_in", **block)(f)
        channel = ChannelAttention(name="channel_attention", **args)(channel)
        channel = ConvNormAct(channels, name="channel_out", **block)(channel)
        attended = position + channel

        if self.guidance:
            code, reconstruction = SemanticGuidance(self.norm_groups, name="guidance", **args)(f)
            error = jnp.square(reconstruction.astype(jnp.float32) - f.astype(jnp.float32))
            self.sow("losses", "reconstruction", jnp.mean(error))
            self.sow("intermediates", "semantic_code", code)
            attended = attended * conv(channels, 3, name="guidance_proj", **args)(reconstruction)
        return conv(channels, 1, name="out", **args)(attended)
