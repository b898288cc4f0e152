"""`minimal`: attention reduced to a minimum: one bilinear similarity matrix per head, no separate V/O.

Paper: "Reducing the Transformer Architecture to a Minimum" (Bermeitinger, Hrycej, Pavone, Kath, Handschuh, 2024).

The query and key projections only ever appear as the product W_q^h W_k^h^T, so they collapse into one E x E
matrix per head (a bilinear form); value and output projections likewise collapse into one E x E matrix per
head, or are omitted so that attention mixes the input tokens themselves; a symmetric similarity needs only the
upper triangle:

    logits_h[i, j] = scale * x_i^T W_h x_j          qk="collapsed":  W_h in R^{E x E}
                                                    qk="symmetric":  W_h = W_h^T, E (E + 1) / 2 parameters
    p_h            = softmax(logits_h + bias + mask)
    y              = sum_h p_h X M_h                value="collapsed": M_h in R^{E x E}  (= W_v^h W_o^h)
    y              = mean_h p_h X                   value="none": no value/output parameters at all

scale = 1/sqrt(head_dim) as in the uncollapsed layer (head_dim is the size the factors would have). The symmetric
form makes token i exactly as similar to j as j to i (before masking).

Shapes: x [B, T, E] -> [B, T, E]; the per-head queries x W_h are [B, T, H, E] and the keys and values are x itself
(one shared kv head, so the KV cache stores x once). Time O(B H T^2 E), memory O(B H T^2). Parameters per layer:
H E^2 (collapsed) or H E (E + 1) / 2 (symmetric) for the similarity, plus H E^2 or nothing for the values,
against 4 E H head_dim for `softmax`.

Reduction to softmax: with W_h = W_q^h W_k^h^T and M_h = W_v^h W_o^h (qk="collapsed", value="collapsed",
position "none", no biases) the output is the `softmax` layer's (position="none") up to float rounding (the
products are re-associated).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.layer import AttentionLayer, HeadProjection
from attn.core.masks import Mask
from attn.core.validation import check_choice
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

QK_FORMS = ("collapsed", "symmetric")
VALUE_FORMS = ("none", "collapsed")
POSITIONS = ("none", "alibi", "t5")


def symmetric_matrix(upper: Array, size: int) -> Array:
    """[..., size (size + 1) / 2] upper-triangle entries (row-major) -> symmetric [..., size, size]."""
    rows, cols = np.triu_indices(size)
    full = jnp.zeros((*upper.shape[:-1], size, size), upper.dtype).at[..., rows, cols].set(upper)
    return full + jnp.swapaxes(jnp.triu(full, 1), -1, -2)


@register(
    "minimal",
    family="softmax",
    paper="Reducing the Transformer Architecture to a Minimum",
    catalog=53,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="one collapsed (or symmetric) bilinear Q/K matrix per head; V/O collapsed into one matrix or omitted",
    option_docs={
        "position": "'none', 'alibi' or 't5' (relative biases; RoPE/Shaw need a head_dim-sized query)",
        "qk": "'collapsed' (one E x E bilinear matrix per head) or 'symmetric' (upper triangle only)",
        "value": "'none' (attend over x itself, heads averaged) or 'collapsed' (one E x E matrix per head)",
    },
)
class MinimalAttention(MultiHeadAttention):
    """Attention with a collapsed bilinear similarity per head and collapsed or no value/output projection."""

    position: str = "none"
    qk: str = "collapsed"
    value: str = "none"

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        check_choice("position", self.position, POSITIONS)
        check_choice("qk", self.qk, QK_FORMS)
        check_choice("value", self.value, VALUE_FORMS)
        if self.qk_norm:
            raise ValueError("qk_norm=True has no query/key to normalise in the minimal layer; use qk_norm=False")
        source = x if context is None else context
        features = x.shape[-1]
        if source.shape[-1] != features:
            raise ValueError(f"context has {source.shape[-1]} features but x has {features}; expected equal")
        if self.qk == "collapsed":
            q = HeadProjection(
                heads=self.num_heads,
                head_dim=features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="query_key",
            )(x)
        else:
            upper = self.param(
                "query_key",
                nn.with_logical_partitioning(nn.initializers.normal(features**-0.5), ("heads", None)),
                (self.num_heads, features * (features + 1) // 2),
                self.param_dtype,
            )
            matrix = symmetric_matrix(jnp.asarray(upper, self.dtype), features)
            q = jnp.einsum("bte,hef->bthf", x.astype(self.dtype), matrix)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        shared = source.astype(self.dtype)[:, :, None, :]  # keys = values = the tokens, one shared kv head
        return q, shared, shared

    def attend(self, q: Array, k: Array, v: Array, *, mask: Mask | None, bias, q_offset, deterministic: bool):
        if self.scale is None:
            # the reference's default scale is 1/sqrt(q's last axis) = 1/sqrt(E); keep 1/sqrt(head_dim)
            q = q * jnp.asarray((q.shape[-1] / self.head_dim) ** 0.5, q.dtype)
        return super().attend(q, k, v, mask=mask, bias=bias, q_offset=q_offset, deterministic=deterministic)

    def project_out(self, y: Array, features: int) -> Array:
        if self.value == "none":
            return nn.with_logical_constraint(jnp.mean(y, axis=2), ("batch", "length", "embed"))
        return AttentionLayer.project_out(self, y, features)
