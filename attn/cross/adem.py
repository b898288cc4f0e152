"""`adem`: ADEM-VL's parameter-free cross-attention with adaptive dropping of low-similarity visual tokens.

Paper: "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning" (Hao et al., 2024; arXiv
2410.17779; code github.com/Hao840/ADEM-VL, adem/adapter.py `Adapter.forward` and adem/model.py).

Vision features are embedded into the language model's space once (projector outside this layer) and fused in every
block by a cross-attention with no projections and no softmax: a SiLU kernel is the similarity, each text token
keeps only its most similar visual tokens, and the sum of those is added next to the feed-forward output:

    S   = silu(x) silu(c + e1)^T                      [B, Tq, N]   (x: normed text states, c: visual embeddings)
    tau_t = sort(S_t)[floor(r N)]                     the r-quantile of row t (r = drop_ratio)
    S'  = S * [S >= tau]                              the lowest floor(r N) entries of each row are zeroed
    y   = s * S' (c + e2)                             [B, Tq, E]

e1, e2 are learned offsets of the visual tokens (the official code: per visual position [N, E], e1 ~ N(0, 0.02),
e2 = 0; `context_length=None` shares one offset over positions), s is a fixed scale (`output_scale`). The only
parameters are e1 and e2. With num_heads H > 1 the channels split into H heads of head_dim (E = H * head_dim) and each
head has its own similarity and dropping; H = 1, head_dim = E is the paper's layer. Dropout (dropout_rate) acts on
the kept similarities. There is no mask: every text row scores all N visual tokens (its rows are independent, so
the layer is causal in x by construction).

Shapes: x [B, Tq, E], context [B, N, E] (same width: no projections) -> [B, Tq, E]. Cost: O(B Tq N E) plus a sort
of each row, O(B H Tq N log N).

Exact reduction: drop_ratio=0 keeps every entry, y = s silu(x) silu(c + e1)^T (c + e2) (the plain SiLU-kernel
product); each row keeps N - floor(r N) entries when its scores are distinct.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core import pipeline
from attn.core.layer import AttentionCall, AttentionLayer
from attn.core.validation import in_range, optional, positive, positive_int
from attn.cross.context import NO_KV_PROJECTIONS, require_context
from attn.registry import register

Array = jax.Array


def drop_low_scores(scores: Array, drop_ratio: float) -> Array:
    """scores [..., N] with the floor(drop_ratio * N) lowest entries of each row zeroed (entries below the row's
    sorted value at that index; ties at the threshold are kept)."""
    in_range(0, 1, high_inclusive=False)("drop_ratio", drop_ratio)
    index = int(drop_ratio * scores.shape[-1])
    if index == 0:
        return scores
    threshold = jax.lax.stop_gradient(jnp.sort(scores, axis=-1)[..., index : index + 1])
    return jnp.where(scores >= threshold, scores, jnp.zeros_like(scores))


@register(
    "adem",
    family="cross",
    paper="ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning",
    catalog=192,
    op=drop_low_scores,
    input_kind="cross",
    supports_causal=False,
    supports_decode=False,
    summary="parameter-free SiLU-kernel cross-attention; each text token drops its least similar visual tokens",
    fidelity="official-code",
    reference="github.com/Hao840/ADEM-VL adem/adapter.py (Adapter.forward: silu(x) @ silu(v + emb1)^T, row quantile "
    "drop, @ (v + emb2)) and adem/model.py (adapter_emb1 ~ 0.02 N(0,1), adapter_emb2 = 0, [1, emb, dim])",
    supports_gqa=False,
    validators={
        "num_kv_heads": NO_KV_PROJECTIONS,
        "drop_ratio": in_range(0, 1, high_inclusive=False),
        "output_scale": positive,
        "context_length": optional(positive_int),
    },
    option_docs={
        "drop_ratio": "r in [0, 1): share of each row's visual tokens dropped (lowest similarity)",
        "output_scale": "s: scale of the fused output (the official code's adapter scale)",
        "context_length": "N for offsets per visual position [N, E] (official); None shares one offset [E]",
    },
)
class AdaptiveEmbeddedFusion(AttentionLayer):
    """s * drop(silu(x) silu(c + e1)^T) (c + e2) per head. x [B, Tq, E], context [B, N, E] -> [B, Tq, E],
    E = num_heads * head_dim."""

    drop_ratio: float = 0.0
    output_scale: float = 1.0
    context_length: int | None = None

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        require_context("adem", call.context, "[batch, visual_tokens, embed] (embedded into x's width)")
        super().validate(call)
        if call.decode:
            raise ValueError("adem does not decode (decode=True): run the text in one call")
        if call.mask is not None:
            raise ValueError(
                f"adem takes no mask (got {call.mask!r}): every text token scores every visual token, and the row "
                "quantile that drops tokens is taken over all N of them, as in the official code"
            )
        width = self.num_heads * self.head_dim
        if call.x.shape[-1] != width or call.context.shape[-1] != width:
            raise ValueError(
                f"x {tuple(call.x.shape)} and context {tuple(call.context.shape)} must both have width num_heads * "
                f"head_dim = {width} (adem has no projections: the visual tokens are embedded into x's width)"
            )
        if self.context_length is not None and call.context.shape[1] != self.context_length:
            raise ValueError(
                f"context has {call.context.shape[1]} tokens (shape {tuple(call.context.shape)}); expected "
                f"context_length={self.context_length} (the offsets are per visual position)"
            )

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q = silu(x), k = silu(c + e1), v = c + e2, split into heads: [B, T, H, D]."""
        shape = (self.context_length, x.shape[-1]) if self.context_length is not None else (x.shape[-1],)
        names = ("length", "embed") if self.context_length is not None else ("embed",)

        def offset(name: str, init: Any) -> Array:
            return jnp.asarray(self.param(name, nn.with_logical_partitioning(init, names), shape, self.param_dtype))

        e1 = offset("key_offset", nn.initializers.normal(stddev=0.02))
        e2 = offset("value_offset", nn.initializers.zeros)
        heads = lambda a: a.reshape(*a.shape[:-1], self.num_heads, self.head_dim).astype(self.dtype)  # noqa: E731
        return heads(jax.nn.silu(x)), heads(jax.nn.silu(context + e1)), heads(context + e2)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        return q, k, v, call  # no positions, no cache

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        scores = pipeline.grouped_logits(q, k)  # [B, H, Tq, N], unscaled
        kept = self.attention_dropout(drop_low_scores(scores, self.drop_ratio), call.deterministic)
        return (self.output_scale * pipeline.mix(kept, v)).astype(q.dtype)

    def project_out(self, y: Array, features: int) -> Array:
        """[B, Tq, H, D] -> [B, Tq, H * D]: no output projection."""
        return nn.with_logical_constraint(y.reshape(*y.shape[:-2], features), ("batch", "length", "embed"))
