"""`minimal`: attention reduced to a minimum: one bilinear similarity matrix per head, no separate V/O.

Paper: "Reducing the Transformer Architecture to a Minimum" (Bermeitinger, Hrycej, Pavone, Kath, Handschuh, 2024;
arXiv 2410.13732). No official code; the paper's experiments were written in Keras (ViT encoders on MNIST and
CIFAR-10).

What the paper states (checked against its full text, sections 1-5):
  * attention output z_i = sum_j a_ij x_j W^V W^O, with a_i = Softmax over j of the similarity
    x_i W^Q W^K^T x_j^T (its Eq. 3; the MLP is dropped, which is a block-level choice outside this layer);
  * with square matrices W^Q W^K^T collapses to one N x N matrix W^QK and W^V W^O to one W^VO; with H > 1 heads of
    width N/H the per-head collapse W^QK_h is possible but costs N^2 per head instead of 2 N^2 / H;
  * W^V and W^O may be omitted altogether: z_i is then a convex combination of the input tokens. In Keras this
    was done by setting W^V = W^O = I, and the collapse by setting W^K = I so that W^QK replaces W^Q;
  * symmetric similarity, N (N + 1) / 2 parameters: a symmetric W^QK with w_ij = w_ji (single head), or
    W^QK = T T^T with T lower triangular; the experiments implement symmetry by reusing W^Q_h as W^K_h.

This layer:

    logits_h[i, j] = scale * x_i^T W_h x_j    qk="collapsed":  W_h in R^{E x E}                  (W^QK_h)
                                              qk="symmetric":  W_h = W_h^T, upper triangle stored, E (E + 1) / 2
                                              qk="shared":     W_h = S_h S_h^T, S_h in R^{E x head_dim}
                                                               (W^Q_h = W^K_h = S_h, the paper's experiments)
    p_h            = softmax(logits_h + bias + mask)
    y              = sum_h p_h X M_h          value="collapsed": M_h in R^{E x E}  (= W^V_h W^O_h)
    y              = mean_h p_h X             value="none": no value/output parameters at all

Our choices (not fixed by the paper): scale = 1/sqrt(head_dim) as in the uncollapsed layer (head_dim is the size
the factors would have; with one head and head_dim = E this is Keras' 1/sqrt(key_dim)); with value="none" and
H > 1 heads the heads' outputs are averaged (the paper only ran value-free single-head models; the mean keeps
z_i a convex combination of the tokens, the property it argues for); the symmetric forms take no bias (a query
bias would break the symmetry). The symmetric forms make token i exactly as similar to j as j to i (before
masking); "shared" is in addition positive semi-definite, so a token is never dissimilar to itself.

Shapes: x [B, T, E] -> [B, T, E]; the per-head queries x W_h are [B, T, H, E] and the keys and values are x itself
(one shared kv head, so the KV cache stores x once). Time O(B H T^2 E), memory O(B H T^2). Parameters per layer:
H E^2 (collapsed), H E (E + 1) / 2 (symmetric) or H E head_dim (shared) for the similarity, plus H E^2 or nothing
for the values, against 4 E H head_dim for `softmax`.

Reduction to softmax: with W_h = W_q^h W_k^h^T and M_h = W_v^h W_o^h (qk="collapsed", value="collapsed",
position "none", no biases) the output is the `softmax` layer's (position="none") up to float rounding (the
products are re-associated); qk="shared" with S_h = W_q^h equals `softmax` whose key kernel is its query kernel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.core.layer import AttentionCall, AttentionLayer, HeadProjection
from attn.core.validation import choice
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array

QK_FORMS = ("collapsed", "symmetric", "shared")
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
        "qk": "'collapsed' (one E x E bilinear matrix per head), 'symmetric' (upper triangle only) or 'shared' "
        "(W_q = W_k per head: S_h S_h^T, the paper's symmetric experiments)",
        "value": "'none' (attend over x itself, heads averaged) or 'collapsed' (one E x E matrix per head)",
        "num_kv_heads": "unused: the keys and values are x itself (one shared kv head)",
    },
    fidelity="paper",
    reference="arXiv 2410.13732, Secs. 1-5 (Eq. 3; collapsed W^QK and W^VO, omitted V/O, symmetric similarity)",
    validators={
        "position": choice(*POSITIONS),
        "qk": choice(*QK_FORMS),
        "value": choice(*VALUE_FORMS),
    },
    has_attention_weights=True,
    supports_gqa=False,
)
class MinimalAttention(MultiHeadAttention):
    """Attention with a collapsed bilinear similarity per head and collapsed or no value/output projection."""

    position: str = "none"
    qk: str = "collapsed"
    value: str = "none"

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if self.qk_norm:
            raise ValueError("qk_norm=True has no query/key to normalise in the minimal layer; use qk_norm=False")
        if call.context is not None and call.context.shape[-1] != call.x.shape[-1]:
            raise ValueError(
                f"context has {call.context.shape[-1]} features but x has {call.x.shape[-1]}; expected equal"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        source = x if context is None else context
        features = x.shape[-1]
        if self.qk == "collapsed":
            q = HeadProjection(
                heads=self.num_heads,
                head_dim=features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="query_key",
            )(x)
        elif self.qk == "shared":
            factor = self.param(
                "query_key",
                nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "head_dim")
                ),
                (features, self.num_heads, self.head_dim),
                self.param_dtype,
            )
            factor = jnp.asarray(factor, self.dtype)
            # x S_h S_h^T without forming the E x E matrix: project down to head_dim, then back up
            q = jnp.einsum("bthd,ehd->bthe", jnp.einsum("bte,ehd->bthd", x.astype(self.dtype), factor), factor)
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

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        q, k, v, call = super().prepare(q, k, v, call)
        if self.scale is None:
            # the pipeline's default scale is 1/sqrt(q's last axis) = 1/sqrt(E); keep 1/sqrt(head_dim)
            q = q * jnp.asarray((q.shape[-1] / self.head_dim) ** 0.5, q.dtype)
        return q, k, v, call

    def project_out(self, y: Array, features: int) -> Array:
        if self.value == "none":
            return nn.with_logical_constraint(jnp.mean(y, axis=2), ("batch", "length", "embed"))
        return AttentionLayer.project_out(self, y, features)
