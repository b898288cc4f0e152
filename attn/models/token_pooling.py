"""Token-aware average pooling (TAP) before a ViT block's attention (Guo, Stutz & Schiele 2023, "Robustifying Token
Attention for Vision Transformers", ICCV, catalog [148]; the ADL half is train/techniques/adl_tap.py).

Each patch token x[b, i, j] [C] of the grid [B, h, w, C] is replaced, before the block's attention norm, by a
mixture of average pools of its neighbourhood at K dilations, with mixture weights the token predicts itself:

    P_0(x)        = x                                                 dilation 0: the token itself
    P_d(x)[i, j]  = (1 / 9) sum_{u, v in {-1, 0, 1}} x[i + d u, j + d v]   d = 1..K-1; zero outside the grid
                                                                           (always divided by 9)
    s             = conv3x3_{K->K}(norm(conv3x3_{C->K}(x)))           [B, h, w, K], no biases, zero padding
    w             = softmax_k(s)                                      temperature 1
    TAP(x)        = sum_k w[..., k] P_k(x)                            [B, h, w, C]

and the block computes x + attention(attention_norm(TAP(x))), then its MLP sublayer as before: the residual adds to
the unpooled x, only the attention sublayer reads the pooled tokens. K = `num_scales` (official --num-scales 4:
dilations 0, 1, 2, 3).

Fidelity: official code. Checked against guoyongcs/TAPADL at commit 6e4dbff: TAPADL_RVT/tap_robust_models.py
(DilationPredictor: Conv2d(C, K, 3, padding 1, no bias) -> BatchNorm2d(K) -> Conv2d(K, K, 3, padding 1, no bias),
softmax over K at temperature 1; DilatedAvgPooling(d): identity for d = 0, else nn.Unfold(3, dilation=d,
padding=d) and the mean over the 9, so zero padding counts; Block.forward: x + attn(norm1(TAP(x))), then
x + mlp(norm2(x)), in every block), the same three pieces in TAPADL_FAN/models/convnext_utils.py and
TAPADL_FAN/models/tap_fan.py TAPFANBlock (TAP before norm1 and the token mixing, residual on the unpooled x), and
--num-scales 4 in both main.py. The equations, the 3x3 kernels, the dilations 0..K-1 and the place before the
attention norm match. The paper itself (Guo, Stutz & Schiele, ICCV 2023, arXiv 2303.11126) could not be read: its
full text is not among the stored pages (searched by title, arXiv id and method terms; only the abstract is, e.g.
https://huggingface.co/papers/2303.11126 and https://guoyongcs.com/publication/tapadl), and the abstract's
description (TAP, before the attention, learns an average pooling scheme per token over its neighbourhood) agrees.
One deviation: the predictor's BatchNorm2d is a per-image normalisation of each of the K channels over the grid
with a learned scale and bias (GroupNorm with K groups, eps 1e-5), since the trainer keeps no running batch
statistics; with batch statistics the prediction of one image would depend on the others in its batch. The two
convolutions start from lecun_normal (torch's Conv2d default init differs; initialisation only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.validation import int_at_least
from attn.models.block import TransformerBlock

Dtype = Any

NORM_EPS = 1e-5  # torch BatchNorm2d's eps


def dilated_average(x: jax.Array, dilation: int) -> jax.Array:
    """P_d of the module docstring: x [B, h, w, C] -> [B, h, w, C], the mean of the 3x3 neighbours at spacing
    `dilation` (zeros outside the grid, always divided by 9); dilation 0 returns x."""
    if dilation == 0:
        return x
    d = dilation
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
    total = sum(
        padded[:, d + du * d : d + du * d + height, d + dv * d : d + dv * d + width]
        for du in (-1, 0, 1)
        for dv in (-1, 0, 1)
    )
    return total / 9.0


class TokenAwarePooling(nn.Module):
    """TAP: tokens x [B, h*w, C] on the patch grid `grid` = (h, w) -> [B, h*w, C] (see the module docstring).

    Parameters: `predict_in` (3x3 conv C -> K kernel), `predict_norm` (scale, bias [K]), `predict_out` (3x3 conv
    K -> K kernel).
    """

    grid: tuple[int, int]
    num_scales: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, in_axis: str | None, name: str) -> nn.Conv:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, in_axis, None))
        return nn.Conv(
            features,
            kernel_size=(3, 3),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=init,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        int_at_least(1)("num_scales", self.num_scales)
        batch, length, features = x.shape
        height, width = self.grid
        if length != height * width:
            raise ValueError(f"token pooling needs the {height}x{width} patch grid; got {length} tokens")
        grid_x = x.reshape(batch, height, width, features)
        scores = self._conv(self.num_scales, "embed", "predict_in")(grid_x)
        scores = nn.GroupNorm(
            num_groups=self.num_scales,
            epsilon=NORM_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            name="predict_norm",
        )(scores)
        scores = self._conv(self.num_scales, None, "predict_out")(scores)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)  # [B, h, w, K]
        pooled = sum(weights[..., k : k + 1] * dilated_average(grid_x, k) for k in range(self.num_scales))
        return pooled.reshape(batch, length, features)


class TokenPoolingBlock(TransformerBlock):
    """A pre-norm TransformerBlock whose attention sublayer reads TAP(x): x + attention(attention_norm(TAP(x))),
    then the MLP sublayer unchanged. x [B, h*w, E] -> [B, h*w, E]; needs `grid` = (h, w) (no class token).
    Extra parameters: `token_pooling` (TokenAwarePooling) inside the block."""

    num_scales: int = 4

    def _norm(self, name: str) -> Callable[[jax.Array], jax.Array]:
        norm = super()._norm(name)
        if name != "attention_norm":
            return norm
        if self.norm_position != "pre":
            raise ValueError(
                f"token pooling sits before the attention norm of pre-norm blocks; got {self.norm_position=}"
            )
        if self.grid is None or len(self.grid) != 2:
            raise ValueError(
                f"token pooling needs the (h, w) patch grid of a model without class token; got {self.grid}"
            )
        pooling = TokenAwarePooling(
            grid=tuple(self.grid),
            num_scales=self.num_scales,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_pooling",
        )
        return lambda x: norm(pooling(x))
