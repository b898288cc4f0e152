"""`dare`: target attention over decoupled attention and representation embeddings (DARE).

Paper: "Long-Sequence Recommendation Models Need Decoupled Embeddings" (Feng et al., 2024; arXiv 2410.02604; code
github.com/thuml/DARE, model/attention_pytorch.py `attention` and model/din_pytorch.py).

A long-sequence recommender scores a target item against a user's behaviour sequence with target attention. With
one embedding table the same vectors serve the attention scores and the aggregated representation, and the two
objectives conflict (the paper measures gradient domination and conflict); projection matrices on shared
embeddings do not fix it. DARE keeps two tables: E_att (width A) for the scores and E_rep (width R) for what is
aggregated. Each token enters this layer as the concatenation [E_att(id) | E_rep(id)] (`DecoupledEmbedding`), and the
attention has no q/k/v projections (the embeddings are the projections):

    q_t = x_t[:A], k_j = c_j[:A], v_j = c_j[A:]              (split into H heads: A = H * D, R = H * Dv)
    w_tj = softmax_j(q_t . k_j / sqrt(D) + mask)             target t over behaviours j
    o_t = sum_j w_tj v_j                                     [B, Tq, H, Dv] (the `head_outputs` stage)
    y_t = concat_h(o_t) W_o                                  [B, Tq, E]

The paper feeds o_t with E_rep(target) and E_rep(target) * o_t to an MLP; W_o is the layer template's output
projection (a linear map that the following MLP absorbs). The official code uses one head (H = 1, D = A) and splits
off a time embedding's score; H > 1 splits both tables into heads.

Shapes: x [B, Tq, E] (targets, E >= A), context [B, L, A + R] (behaviours) -> [B, Tq, E]; A = num_heads * head_dim.
Cost: O(B Tq L (A + R)); the attention width A may be smaller than R, which is the paper's faster search.

Exact reduction: with tied tables (`DecoupledEmbedding(tied=True)`: E_att = E_rep, A = R) the layer is the coupled
baseline, target attention whose keys and values are the same embedding. Decoupling: the weights w do not depend on
the representation channels (their gradient there is zero) and the values do not depend on the attention channels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import positive_int
from attn.cross.context import NO_KV_PROJECTIONS, require_context
from attn.registry import register

Array = jax.Array

CONTEXT_LAYOUT = "[batch, behaviours, attention_dim + representation_dim] ([E_att | E_rep] per behaviour)"


class DecoupledEmbedding(nn.Module):
    """ids int [...] -> [..., attention_dim + representation_dim] = [E_att(id) | E_rep(id)].

    tied=True uses one table for both halves (the coupled baseline; needs attention_dim == representation_dim).
    Tables are named ("vocab", "embed")."""

    num_items: int
    attention_dim: int
    representation_dim: int
    tied: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        positive_int("num_items", self.num_items)
        positive_int("attention_dim", self.attention_dim)
        positive_int("representation_dim", self.representation_dim)
        if self.tied and self.attention_dim != self.representation_dim:
            raise ValueError(
                f"tied=True shares one table, so attention_dim={self.attention_dim} must equal "
                f"representation_dim={self.representation_dim}"
            )
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed"))

        def table(name: str, width: int) -> Array:
            return self.param(name, init, (self.num_items, width), self.param_dtype)

        representation = table("representation", self.representation_dim)
        attention = representation if self.tied else table("attention", self.attention_dim)
        ids = jnp.asarray(ids)
        return jnp.concatenate([jnp.take(attention, ids, axis=0), jnp.take(representation, ids, axis=0)], axis=-1)


@register(
    "dare",
    family="cross",
    paper="Long-Sequence Recommendation Models Need Decoupled Embeddings",
    catalog=209,
    op=None,
    input_kind="cross",
    supports_causal=True,
    supports_decode=False,
    summary="target attention without projections: scores from attention embeddings, values from representation ones",
    fidelity="official-code",
    reference="github.com/thuml/DARE model/attention_pytorch.py (scaled_dot_product: q=E_att(target), k=E_att(hist), "
    "v=E_rep(hist), masked softmax) and model/din_pytorch.py (separate embedding tables)",
    supports_gqa=False,
    has_attention_weights=True,
    validators={**SOFTMAX_VALIDATORS, "num_kv_heads": NO_KV_PROJECTIONS},
    option_docs=SOFTMAX_OPTION_DOCS,
)
class DecoupledTargetAttention(SoftmaxAttentionLayer):
    """Target attention from x [B, Tq, E] to behaviours context [B, L, A + R] (A = num_heads * head_dim): scores
    from the first A channels, values from the other R. -> [B, Tq, E]."""

    position: str = "none"

    intervention_stages: ClassVar[tuple[str, ...]] = ("attention_logits", "attention_weights", "head_outputs")

    def validate(self, call: AttentionCall) -> None:
        require_context("dare", call.context, CONTEXT_LAYOUT)
        super().validate(call)
        width = self.num_heads * self.head_dim
        if call.x.shape[-1] < width:
            raise ValueError(
                f"x has width {call.x.shape[-1]} (shape {tuple(call.x.shape)}); expected at least the attention "
                f"width num_heads * head_dim = {width} (the target's attention embedding comes first)"
            )
        rest = call.context.shape[-1] - width
        if rest <= 0 or rest % self.num_heads:
            raise ValueError(
                f"context has width {call.context.shape[-1]} (shape {tuple(call.context.shape)}); expected "
                f"{width} attention channels plus a positive multiple of num_heads={self.num_heads} representation "
                "channels"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """No projections: q [B, Tq, H, D] and k [B, L, H, D] are the attention channels, v [B, L, H, R / H]."""
        width, heads = self.num_heads * self.head_dim, self.num_heads
        split = lambda a, n: a.reshape(*a.shape[:-1], heads, n // heads).astype(self.dtype)  # noqa: E731
        q = split(x[..., :width], width)
        k = split(context[..., :width], width)
        v = split(context[..., width:], context.shape[-1] - width)
        return q, k, v
