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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attn.core.masks import Mask
from attn.core.validation import check_choice, check_positive
from attn.registry import register
from attn.softmax.multi_head import MultiHeadAttention

Array = jax.Array


def entropy_aware_scale(positions: Array, original_max_len: int) -> Array:
    """s(p) = max(1, log(p + 1) / log(L)), float32 of positions' shape."""
    check_positive("original_max_len", original_max_len)
    if original_max_len < 2:
        raise ValueError(f"original_max_len={original_max_len!r} must be >= 2 (log base of the query scale)")
    p = jnp.asarray(positions, jnp.float32)
    return jnp.maximum(1.0, jnp.log(p + 1.0) / math.log(original_max_len))


class QueryScale(NamedTuple):
    """What `position_bias` hands to `attend`: the per-query logit scale, float32 [B, Tq]."""

    scale: Array


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
)
class EntropyABFAttention(MultiHeadAttention):
    """RoPE attention with an adjusted base and entropy-aware log-length query scaling. x [B, T, E] -> same."""

    rope_base: float = 500000.0
    original_max_len: int = 4096
    query_scaling: bool = True

    def position_bias(self, q: Array, q_pos: Array, kv_pos: Array, mask: Mask | None) -> QueryScale | None:
        check_choice("position", self.position, ("rope",))
        if not self.query_scaling:
            return None
        return QueryScale(entropy_aware_scale(q_pos, self.original_max_len))

    def attend(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        mask: Mask | None,
        bias: QueryScale | None,
        q_offset,
        deterministic: bool,
    ) -> Array:
        if bias is not None:
            q = (q * bias.scale[:, :, None, None]).astype(q.dtype)
        return super().attend(q, k, v, mask=mask, bias=None, q_offset=q_offset, deterministic=deterministic)
