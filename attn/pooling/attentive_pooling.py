"""`attentive_pooling`: Efficient Probing ([41] "Attention, Please! Revisiting Attentive Probing for Masked Image
Modeling") and the standard multi-head attentive-pooling probe it is compared with.

Both summarise the tokens x [B, N, C] of a (frozen) backbone with M learned queries.

variant="efficient_probing" (EP; the official poolings/ep.py, github.com/billpsomas/efficient-probing): no query,
key or output projection — the queries q_m in R^C score the raw tokens, and one value projection W_v: C -> C'
(C' = C / d_out) is split into M channel chunks, chunk m read by query m only:

    a_{m,n} = softmax_n(q_m . x_n / sqrt(C))          over the valid tokens
    v_n = x_n W_v  (+ b_v),   v_n = [v_n^(1), ..., v_n^(M)],  v_n^(m) in R^(C'/M)
    out = concat_m sum_n a_{m,n} v_n^(m)               [B, C']

Parameters M C + C C' (+ C'): for M = 1 and W_v = I it is single-query softmax pooling of the tokens, and with
q = 0 it is the masked mean of v. Official defaults: M = 32 queries, d_out = 1.

variant="multihead" (the attentive-probing baseline: one cross-attention block from learned queries, e.g. the
probes of CAE / V-JEPA): q = Q W_q, k = x W_k, v = x W_v with num_heads heads of head_dim, exact softmax attention
(attn.functional.softmax_attention, padding via kv_lengths), output projection W_o to C, and the M query outputs
averaged: out = mean_m (softmax(q_m k^T / sqrt(D)) v) W_o   [B, C].

Shapes: x [B, N, C] -> [B, C / d_out] (EP) or [B, C] (multihead); padding: an attn.Mask with kv_lengths (or
q_lengths) — padded tokens get weight 0 and change nothing. Time O(B N M C) (EP: one C-wide score per query and
token, plus the C C' value projection) / O(B N (C H D) + B M N H D) (multihead); memory O(B M N) for the weights.
Not a sequence-to-sequence layer: it cannot stand in a transformer block (registered with input kind "sequence",
non-causal, no decode). Reduction: multihead with M = 1 is `softmax` cross-attention of one learned query.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core.masks import Mask
from attn.core.padding import masked_softmax, valid_tokens
from attn.core.pipeline import dropout_weights
from attn.core.pooling_layer import PoolingLayer
from attn.core.validation import check_rank, choice, positive_int
from attn.registry import register

Array = jax.Array

VARIANTS = ("efficient_probing", "multihead")


def efficient_probing(
    x: Array,
    values: Array,
    queries: Array,
    *,
    lengths: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Efficient Probing pooling (module docstring) given the projected values.

    Args:
      x: [B, N, C] tokens (the keys: no key projection). values: [B, N, C'] = x W_v, C' divisible by M.
      queries: [M, C] learned queries (no query projection). lengths: int [B] valid tokens, or None.
      dropout_rate, dropout_rng: inverted dropout on the weights before pooling (`attn.core.pipeline.dropout_weights`).
    Returns:
      (pooled [B, C'] in values.dtype, weights float32 [B, M, N] (before dropout)).
    """
    check_rank("x", x, 3, "[batch, tokens, channels]")
    check_rank("values", values, 3, "[batch, tokens, value_channels]")
    check_rank("queries", queries, 2, "[num_queries, channels]")
    batch, tokens, channels = x.shape
    num_queries = queries.shape[0]
    if queries.shape[1] != channels:
        raise ValueError(f"queries has shape {queries.shape}; expected [num_queries, channels={channels}]")
    if values.shape[:2] != (batch, tokens) or values.shape[2] % num_queries:
        raise ValueError(
            f"values has shape {values.shape}; expected [{batch}, {tokens}, C'] with C' divisible by "
            f"num_queries={num_queries}"
        )
    logits = jnp.einsum("mc,bnc->bmn", queries.astype(jnp.float32), x.astype(jnp.float32)) / math.sqrt(channels)
    weights = masked_softmax(logits, valid_tokens(lengths, batch, tokens)[:, None, :], axis=-1)
    chunks = values.astype(jnp.float32).reshape(batch, tokens, num_queries, -1)
    dropped = dropout_weights(weights, dropout_rate, dropout_rng)
    pooled = jnp.einsum("bmn,bnmd->bmd", dropped, chunks).reshape(batch, -1)
    return pooled.astype(values.dtype), weights


@register(
    "attentive_pooling",
    family="pooling",
    paper="Attention, Please! Revisiting Attentive Probing for Masked Image Modeling",
    catalog=41,
    op=efficient_probing,
    input_kind="pooling",
    supports_causal=False,
    supports_decode=False,
    summary="attentive probe: learned queries pool the tokens to one vector (Efficient Probing or multi-head)",
    option_docs={
        "variant": "'efficient_probing' (EP: no q/k/o projections, value chunks per query) or 'multihead' "
        "(q/k/v/o projections, outputs averaged over the queries)",
        "num_queries": "learned queries M (EP: must divide embed // d_out)",
        "d_out": "EP value reduction: the pooled vector has embed // d_out channels",
        "num_heads": "number of heads (multihead variant; EP scores with one embed-wide head, as the paper)",
        "head_dim": "size of each head (multihead variant)",
    },
    fidelity="official-code",
    reference="github.com/billpsomas/efficient-probing poolings/ep.py (variant='efficient_probing'); 'multihead' is "
    "the standard attentive-probe baseline",
    validators={"variant": choice(*VARIANTS), "num_queries": positive_int, "d_out": positive_int},
)
class AttentivePooling(PoolingLayer):
    """Attentive pooling probe. `__call__(x [B, N, C], *, mask=None, ...)` -> [B, C // d_out] (EP) or [B, C].

    mask: an attn.Mask holding only padding lengths. context, positions and decode are not supported.
    """

    variant: str = "efficient_probing"
    num_queries: int = 32
    d_out: int = 1

    mechanism_name: ClassVar[str] = "attentive_pooling"

    def pool(self, x: Array, lengths: Array | None, deterministic: bool) -> Array:
        batch, _, channels = x.shape
        init = nn.initializers.normal(0.02)  # the official EP init of its queries
        queries = self.param(
            "queries",
            nn.with_logical_partitioning(init, (None, "embed")),
            (self.num_queries, channels),
            self.param_dtype,
        )
        if self.variant == "efficient_probing":
            if channels % self.d_out:
                raise ValueError(f"d_out={self.d_out!r} must be a positive int dividing embed={channels}")
            if (channels // self.d_out) % self.num_queries:
                raise ValueError(
                    f"num_queries={self.num_queries} must divide embed // d_out = {channels // self.d_out} "
                    "(each query reads its own chunk of the values)"
                )
            values = nn.Dense(
                channels // self.d_out,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                name="value",
            )(x)
            pooled, weights = efficient_probing(
                x.astype(self.dtype),
                values,
                jnp.asarray(queries, self.dtype),
                lengths=lengths,
                dropout_rate=self.effective_dropout(deterministic),
                dropout_rng=self.dropout_rng(deterministic),
            )
            if self.wants_weights():
                self.sow("intermediates", "attention_weights", weights[:, None])  # [B, 1, M, N]
            return pooled
        q = self.dense_heads(
            jnp.broadcast_to(queries, (batch, *queries.shape)),
            self.num_heads,
            "heads",
            "query",
        )
        k = self.dense_heads(x, self.kv_heads, "kv_heads", "key")
        v = self.dense_heads(x, self.kv_heads, "kv_heads", "value")
        kv_mask = None if lengths is None else Mask(kv_lengths=lengths)
        out = F.softmax_attention(
            q,
            k,
            v,
            mask=kv_mask,
            dropout_rate=self.effective_dropout(deterministic),
            dropout_rng=self.dropout_rng(deterministic),
            return_probs=self.wants_weights(),
            implementation=self.implementation,
        )
        if self.wants_weights():
            out, aux = out
            self.sow("intermediates", "attention_weights", aux["probs"])
        return jnp.mean(self.project_out(out, channels), axis=1)
