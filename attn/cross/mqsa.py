"""`mqsa`: multi-query self-attention, a mix of long- and short-query causal attention (MQSA).

Paper: "Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for Sequential
Recommendation" (Zhu et al., 2023; arXiv 2311.01056; no code released).

In SASRec-style sequential recommenders the attention query of step t is the embedding of item t alone. An
L-query self-attention takes the query from the window of the last L items, which carries collaborative signal
(what users who did this short sequence did next); a long window lowers the variance and raises the bias of the
user-interest estimate, a short one the reverse, so MQSA mixes the two:

    q_t^(L) = (1 / n_t) sum_{s = t - n_t + 1}^{t} q_s,      n_t = min(L, t + 1),   q_s = x_s W_q
    o^(L)_t = sum_j softmax_j(q_t^(L) k_j^T / sqrt(d) + causal mask) v_j
    o_t     = alpha * o^(L_long)_t + (1 - alpha) * o^(L_short)_t,        y = concat_h(o) W_o

Pooling the projected queries equals projecting the pooled item embeddings (the projection is linear). Under RoPE
the pooled query averages the rotated queries, i.e. the L queries' logits are averaged; the default position is
"none" (recommenders add learned positions to the item embeddings). The paper's transition-aware embedding
distillation is a training loss on the item embeddings, not part of the layer.

Shapes: x [B, T, E] -> [B, T, E]. Cost: two softmax attentions, O(2 B H T^2 D), plus O(B T H D) for the windows.
Causal: q^(L)_t uses items up to t only. Decoding is not supported (the pooled query needs the last L queries).

Exact reductions: long_window = short_window = 1 is causal softmax self-attention (`softmax` with the same
parameters); long_weight = 1 is the L-query self-attention with L = long_window alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.softmax import softmax_attention
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import in_range, positive_int
from attn.registry import register

Array = jax.Array


def window_mean(q: Array, window: int) -> Array:
    """Causal moving mean over the sequence axis: q [B, T, ...] -> out[:, t] = mean(q[:, max(0, t - window + 1):t + 1])
    (the first steps average the items they have)."""
    positive_int("window", window)
    total = jnp.cumsum(q.astype(jnp.promote_types(q.dtype, jnp.float32)), axis=1)
    shifted = jnp.pad(total, [(0, 0), (window, 0)] + [(0, 0)] * (q.ndim - 2))[:, : q.shape[1]]
    count = jnp.minimum(jnp.arange(1, q.shape[1] + 1), window).reshape(1, -1, *([1] * (q.ndim - 2)))
    return ((total - shifted) / count).astype(q.dtype)


@register(
    "mqsa",
    family="cross",
    paper="Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for Sequential "
    "Recommendation",
    catalog=45,
    op=window_mean,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=False,
    summary="mix of causal attentions whose queries average the last L_long and the last L_short items",
    fidelity="reconstructed",
    reference="arXiv 2311.01056 abstract (L-query self-attention with flexible windows; multi-query mix of long- and "
    "short-query attention); window mean and convex mix reconstructed, no official code",
    validators={
        **SOFTMAX_VALIDATORS,
        "long_window": positive_int,
        "short_window": positive_int,
        "long_weight": in_range(0, 1),
    },
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "long_window": "L_long: items averaged into the long query",
        "short_window": "L_short: items averaged into the short query (1 = the item itself, as in SASRec)",
        "long_weight": "alpha in [0, 1]: weight of the long-query attention in the mix",
    },
)
class MultiQuerySelfAttention(SoftmaxAttentionLayer):
    """alpha * attention(long-window queries) + (1 - alpha) * attention(short-window queries). x [B, T, E] -> same."""

    position: str = "none"
    long_window: int = 4
    short_window: int = 1
    long_weight: float = 0.5

    # Two attentions are mixed, so there is no single probability matrix for interventions to act on.
    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        if call.context is not None:
            raise ValueError(f"mqsa is self-attention; got a context of shape {tuple(call.context.shape)}")
        if call.decode:
            raise ValueError("mqsa does not decode (decode=True): its pooled query needs the last L queries")

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        rate = self.effective_dropout(call.deterministic)
        rngs: list[Any] = [None, None] if rate == 0.0 else list(jax.random.split(self.make_rng("dropout")))

        def attention(window: int, rng: Any) -> Array:
            return softmax_attention(
                window_mean(q, window),
                k,
                v,
                mask=call.mask,
                bias=call.bias,
                window=self.window,
                scale=self.scale,
                softcap=self.softcap,
                dropout_rate=rate,
                dropout_rng=rng,
                implementation=self.implementation,
            )

        long, short = attention(self.long_window, rngs[0]), attention(self.short_window, rngs[1])
        return (self.long_weight * long + (1.0 - self.long_weight) * short).astype(q.dtype)
