"""`cape`: Channel Attention guided by PDE Parameter Embeddings (Takamoto, Alesiani & Niepert, "Learning Neural PDE
Solvers with Parameter-Guided Channel Attention", ICML 2023).

A CAPE module turns the PDE parameters p (viscosity, advection speed, ...) into channel-attention masks that
re-weight three convolutions of the field, and the result modulates the input field before the base solver
(FNO, U-Net, ...). With w = width, h = w / 2, kernel k, `condition` p [B, P] (this module's call argument):

    e_i  = W_i2 GELU(W_i1 t(p) + b_i1) + b_i2,   i = 0, 1, 2        three parameter MLPs P -> h -> w  (the masks)
    u    = GELU(Conv_kxk(x))                                       C -> h, no bias
    y_0  = Up_s( Spectral_m( AvgPool_s(u) ) ) (.) e_0               h -> w, Fourier modes m, pooled by s
    y_1  = Conv_1x1(u) (.) e_1                                     h -> w
    y_2  = DWConv_kxk(u) (.) e_2                                   h -> w, groups h, no bias
    y    = Conv_kxk( GELU( y_0 + y_1 + y_2 + Conv_1x1'(u) ) )      w -> C, no bias
    out  = x (.) (1 + LN_{H,W}(y))

e_i multiply channel-wise (broadcast over H, W). Spectral_m is the FNO Fourier layer: rfft2, a learned complex
[h, w] matrix per kept mode (rows 0..m-1 and H'-m..H'-1, columns 0..m-1), irfft2; Up_s repeats each pooled pixel
s x s times (nearest). t(p) = p (`condition_transform="none"`, the 1-D code) or sigmoid(log p) = p / (1 + p)
("sigmoid_log", the 2-D code; needs p > 0). LN_{H,W} normalises each channel over the spatial axes with a learned
per-channel scale and bias. This is the 2-D block of the official code (`PrmEmb_Block_2d`), with two documented
changes: the LayerNorm affine is per channel instead of per pixel (the code's is tied to one grid size), and
2 m <= H / s is required (the code lets the two kept row blocks overlap and overwrites one with the other).
The paper's wrapper (concatenate x and the CAPE output, 1x1 conv, base solver) and its curriculum are outside
this module.

Shapes: x [B, H, W, C], condition [B, P] -> [B, H, W, C]; H and W divisible by `pool`. Parameters (C in, P params):
    k^2 C h + 4 h w m^2 + k^2 w + 2 (h w + w) + k^2 w C + 3 (P h + h + h w + w) + 2 C.
Time O(B H W (k^2 (C h + w + w C) + h w)) for the convolutions plus O(B h (H W / s^2) log(H W)) for the FFTs.
No reduction to softmax attention. Exact settings: with LN scale = bias = 0 the module is the identity; with the
three MLP output layers zeroed the output does not depend on the condition.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.conv import check_int, check_nhwc, conv
from attn.core.options import check_options
from attn.core.validation import choice, positive_int
from attn.registry import register

Array = jax.Array

TRANSFORMS = ("none", "sigmoid_log")


class SpectralConv2d(nn.Module):
    """FNO Fourier layer. u [B, H, W, Cin] -> [B, H, W, features], keeping `modes` low frequencies per axis."""

    features: int
    modes: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u: Array) -> Array:
        batch, height, width, cin = u.shape
        m = self.modes
        scale = 1.0 / (cin * self.features)

        def init(key, shape, dtype):
            return scale * jax.random.uniform(key, shape, dtype)

        shape = (cin, self.features, m, m)
        axes = ("conv_in", "channels", "modes_height", "modes_width")
        weights = [
            jnp.asarray(self.param(n, nn.with_logical_partitioning(init, axes), shape, self.param_dtype), jnp.float32)
            for n in ("low_real", "low_imag", "high_real", "high_imag")
        ]
        low, high = weights[0] + 1j * weights[1], weights[2] + 1j * weights[3]
        spectrum = jnp.fft.rfft2(u.astype(jnp.float32), axes=(1, 2))  # [B, H, W // 2 + 1, Cin]
        out = jnp.zeros((batch, height, width // 2 + 1, self.features), spectrum.dtype)
        out = out.at[:, :m, :m].set(jnp.einsum("bxyi,ioxy->bxyo", spectrum[:, :m, :m], low))
        out = out.at[:, height - m :, :m].set(jnp.einsum("bxyi,ioxy->bxyo", spectrum[:, height - m :, :m], high))
        return jnp.fft.irfft2(out, s=(height, width), axes=(1, 2)).astype(u.dtype)


@register(
    "cape",
    family="channel",
    paper="Learning Neural PDE Solvers with Parameter-Guided Channel Attention",
    catalog=122,
    input_kind="channels",
    supports_causal=False,
    supports_decode=False,
    summary="channel masks from an external parameter vector (call arg condition [B, P]) gate spectral/1x1/DW convs",
    option_docs={
        "width": "widening factor w: the masked convolutions have w channels, their input w / 2 (even)",
        "kernel_size": "odd kernel size of the input, depthwise and output convolutions (code: 5)",
        "modes": "Fourier modes kept per axis by the spectral convolution (needs 2 * modes <= H / pool)",
        "pool": "average-pool factor before the spectral convolution, undone by nearest upsampling (code: 4)",
        "condition_transform": "'none' (t(p) = p) or 'sigmoid_log' (t(p) = p / (1 + p), needs p > 0)",
    },
    fidelity="official-code",
    reference="the official code's 2-D block PrmEmb_Block_2d; documented deviations: per-channel LayerNorm affine, 2 "
    "m <= H / s required",
    validators={"modes": positive_int, "pool": positive_int, "condition_transform": choice(*TRANSFORMS)},
)
class CAPE(nn.Module):
    """Parameter-conditioned channel attention. `__call__(x [B, H, W, C], *, condition [B, P])` -> [B, H, W, C]."""

    width: int = 16
    kernel_size: int = 5
    modes: int = 4
    pool: int = 4
    condition_transform: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check(self, x: Array, condition: Array | None) -> None:
        batch, height, width, _ = check_nhwc(x)
        check_int("width", self.width, minimum=2)
        if self.width % 2:
            raise ValueError(f"width={self.width} must be even (the masked convolutions read width / 2 channels)")
        check_int("kernel_size", self.kernel_size, odd=True)
        check_options(self)  # modes, pool, condition_transform (the registry's validators)
        if condition is None:
            raise ValueError("cape needs condition [batch, num_params] (the PDE parameters); got condition=None")
        if jnp.ndim(condition) != 2 or condition.shape[0] != batch:
            raise ValueError(
                f"condition must have shape [batch={batch}, num_params], got {tuple(jnp.shape(condition))}"
            )
        if height % self.pool or width % self.pool:
            raise ValueError(f"pool={self.pool} must divide the feature map size {height}x{width}")
        pooled_h, pooled_w = height // self.pool, width // self.pool
        if 2 * self.modes > pooled_h or self.modes > pooled_w // 2 + 1:
            raise ValueError(
                f"modes={self.modes} is too many for the pooled {pooled_h}x{pooled_w} map: need 2 * modes <= "
                f"{pooled_h} and modes <= {pooled_w // 2 + 1}"
            )

    @nn.compact
    def __call__(self, x: Array, *, condition: Array | None = None) -> Array:
        self.check(x, condition)
        channels = x.shape[-1]
        hidden, k = self.width // 2, self.kernel_size
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)

        p = jnp.asarray(condition, self.dtype)
        if self.condition_transform == "sigmoid_log":
            p = jax.nn.sigmoid(jnp.log(p))

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
                name=name,
                **args,
            )

        masks = [
            dense(self.width, ("conv_in", "channels"), f"mask_{i}_out")(
                nn.gelu(dense(hidden, ("condition", "conv_in"), f"mask_{i}_in")(p), approximate=False)
            )[:, None, None, :]
            for i in range(3)
        ]

        u = nn.gelu(conv(hidden, k, use_bias=False, name="conv_in", **args)(x), approximate=False)
        s = self.pool
        pooled = nn.avg_pool(u, (s, s), strides=(s, s))
        spectral = SpectralConv2d(self.width, self.modes, param_dtype=self.param_dtype, name="spectral")(pooled)
        y0 = jnp.repeat(jnp.repeat(spectral, s, axis=1), s, axis=2) * masks[0]
        y1 = conv(self.width, 1, name="pointwise_masked", **args)(u) * masks[1]
        y2 = conv(self.width, k, groups=hidden, use_bias=False, name="depthwise_masked", **args)(u) * masks[2]
        y = nn.gelu(y0 + y1 + y2 + conv(self.width, 1, name="pointwise", **args)(u), approximate=False)
        y = conv(channels, k, use_bias=False, name="conv_out", **args)(y)

        # LayerNorm over the spatial axes of each channel (statistics in float32).
        y32 = y.astype(jnp.float32)
        mean = y32.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(y32 - mean).mean(axis=(1, 2), keepdims=True)
        normed = ((y32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(self.dtype)
        scale = self.param(
            "norm_scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("channels",)),
            (channels,),
            self.param_dtype,
        )
        bias = self.param(
            "norm_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
            (channels,),
            self.param_dtype,
        )
        modulation = normed * jnp.asarray(scale, self.dtype) + jnp.asarray(bias, self.dtype)
        self.sow("intermediates", "attention_map", modulation)
        return x * (1.0 + modulation)
