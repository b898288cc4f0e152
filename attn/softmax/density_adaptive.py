"""`density_adaptive`: DAAM ([145] "Density Adaptive Attention-based Speech Network: Enhancing Feature
Understanding for Mental Health Disorders").

The multi-head Density Adaptive Attention Mechanism is GAAM's Gaussian gate (attn/softmax/gaussian_adaptive.py,
whose core this module reuses) with the Gaussians of a head multiplied as normalised densities — the form of the
authors' DAAM code (github.com/gioannides/DAAM-PEFT-paper-code, `DensityAdaptiveAttention`): per head, with the
statistics mu, sigma^2 of the values v along the axis,

    y_j = (v - (mu + delta_j)) / sqrt(sigma^2 + eps)
    g = prod_j N(y_j; 0, c_j^2) = prod_j exp(-y_j^2 / (2 c_j^2)) / sqrt(2 pi c_j^2)
    a = g / sum_axis(g),   out = v * a

(c_j initialised to exp(N(0, 1)) as in that code; delta_j to 0). The product of Gaussians is itself one Gaussian
in y: precision 1/c*^2 = sum_j 1/c_j^2 and offset delta* = c*^2 sum_j delta_j / c_j^2, so G Gaussians express the
same family as one (the tests check this identity); the paper stacks heads to model non-Gaussian shapes.

Axis, projections, padding, shapes and complexity as in `gaussian_adaptive`: x [B, T, E] -> [B, T, E],
O(B T H D G); axis="sequence" (default) is non-causal, axis="features" a causal per-token gate. With c -> inf the
weights are uniform (out = v / n). No setting reduces it to softmax attention.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.validation import optional, positive
from attn.registry import register
from attn.softmax.gaussian_adaptive import (
    OPTION_DOCS,
    GaussianAdaptiveAttention,
    gaussian_adaptive_attention,
)

Array = jax.Array


def density_adaptive_attention(
    v: Array,
    mean_offsets: Array,
    scales: Array,
    *,
    axis: str = "sequence",
    lengths: Array | None = None,
    eps: float = 1e-8,
) -> Array:
    """DAAM gating v * a, [B, T, H, D] in v.dtype (the product form of `gaussian_adaptive_attention`).

    Args:
      v: [B, T, H, D] per-head values. mean_offsets, scales: [H, G] offsets delta and scaled std devs c.
      axis: "sequence" (statistics over the valid tokens) or "features" (over each token's D features).
      lengths: int [B] valid tokens per row, or None; padded tokens output 0. eps: added to the variance and c^2.
    """
    return gaussian_adaptive_attention(v, mean_offsets, scales, combine="product", axis=axis, lengths=lengths, eps=eps)


def _log_normal_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jnp.exp(jax.random.normal(key, shape, dtype))


@register(
    "density_adaptive",
    family="softmax",
    paper="Density Adaptive Attention-based Speech Network: Enhancing Feature Understanding for Mental Health "
    "Disorders",
    catalog=145,
    op=density_adaptive_attention,
    input_kind="sequence",
    supports_causal=False,
    supports_decode=False,
    summary="DAAM: values re-weighted by a per-head product of learned normal densities of their normalised value",
    option_docs={
        **OPTION_DOCS,
        "num_gaussians": "Gaussian densities multiplied per head (G)",
        "initial_scale": "initial value of every scaled standard deviation c; None = exp(N(0, 1)) per Gaussian "
        "(the official DAAM code)",
    },
    fidelity="official-code",
    reference="github.com/gioannides/DAAM-PEFT-paper-code DensityAdaptiveAttention (a product of normal densities per "
    "head)",
    validators={"initial_scale": optional(positive)},
    supports_gqa=False,
)
class DensityAdaptiveAttention(GaussianAdaptiveAttention):
    """Multi-head density adaptive attention (module docstring). x [B, T, E] -> [B, T, E]."""

    initial_scale: float | None = None

    combine: ClassVar[str] = "product"
    mechanism_name: ClassVar[str] = "density_adaptive"

    def scale_init(self) -> Any:
        if self.initial_scale is None:
            return _log_normal_init
        return nn.initializers.constant(self.initial_scale)
