"""`entropy_abf`: entropy-aware adjusted base frequency: RoPE with a large base plus log-length query scaling.

Paper: "Extending LLMs' Context Window with 100 Samples" (Zhang et al., 2024; code
github.com/GAIR-NLP/Entropy-ABF, `patch/EABF.py`).

To keep the attention entropy stable beyond the original context window L, the method raises RoPE's base
(ABF, 10000 -> 500000) and scales the logits of the query at position p by log_L(p + 1) once p + 1 exceeds L:

    q, k <- RoPE(q, p; base), RoPE(k, p; base)          base = 500000 in the paper's LLaMA-2 runs
    s(p)  = max(1, log(p + 1) / log(L))                 L = original_max_len (4096 for LLaMA-2)
    q_p  <- s(p) q_p                                    (after RoPE, so the logits of row p scale by s(p))
    o     = softmax(scale q k^T + mask) v

The official code leaves the first two layers unscaled (`apply_eabf(model, count=2)`); here that is the per-layer
option `query_scaling=False`. p is the query's absolute position (the `positions` argument, or the cache index
while decoding), so packed sequences with restarted positions are scaled by their own positions.

Shapes: x [B, T, E] -> [B, T, E]. Time and memory as `softmax` (the scale folds into q, any kernel runs it).

Reduction to softmax: query_scaling=False is exactly the `softmax` layer with position="rope" and the same
rope_base; with rope_base=10000 too it is the default `softmax` layer. The scale is exactly 1 for p < L.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall
from attn.core.validation import choice, int_at_least
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def entropy_aware_scale(positions: Array, original_max_len: int) -> Array:
    """s(p) = max(1, log(p + 1) / log(L)), float32 of positions' shape."""
    int_at_least(2)("original_max_len", original_max_len)
    p = jnp.asarray(positions, jnp.float32)
    return jnp.maximum(1.0, jnp.log(p + 1.0) / math.log(original_max_len))


@register(
    "entropy_abf",
    family="softmax",
    paper="Extending LLMs' Context Window with 100 Samples",
    catalog=162,
    op=None,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="RoPE with adjusted base (500000) and entropy-aware query scaling max(1, log_L(p + 1))",
    option_docs={
        "position": "must be 'rope' (the method adjusts RoPE)",
        "rope_base": "RoPE base; the paper's adjusted base frequency is 500000",
        "original_max_len": "original context window L; queries at p + 1 > L get their logits scaled by log_L(p + 1)",
        "query_scaling": "apply the entropy-aware query scale in this layer (the paper leaves layers 0-1 unscaled)",
    },
    fidelity="official-code",
    reference="github.com/GAIR-NLP/Entropy-ABF patch/EABF.py (RoPE base 500000, query scale max(1, log_L(p + 1)), "
    "layers 0-1 unscaled)",
    validators={"position": choice("rope"), "original_max_len": int_at_least(2)},
    has_attention_weights=True,
)
class EntropyABFAttention(MultiHeadAttention):
    """RoPE attention with an adjusted base and entropy-aware log-length query scaling. x [B, T, E] -> same."""

    rope_base: float = 500000.0
    original_max_len: int = 4096
    query_scaling: bool = True

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, AttentionCall]:
        """The `softmax` layer's RoPE and cache, then q_p <- s(p) q_p at the queries' absolute positions p (the
        logits of row p scale by s(p); any softmax kernel runs it)."""
        q, k, v, call = super().prepare(q, k, v, call)
        if self.query_scaling:
            scale = entropy_aware_scale(call.q_positions, self.original_max_len)
            q = (q * scale[:, :, None, None]).astype(q.dtype)
        return q, k, v, call
