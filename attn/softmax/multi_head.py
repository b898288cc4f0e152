"""`softmax`: multi-head scaled dot-product attention (Vaswani et al., "Attention Is All You Need", 2017).

The baseline every other mechanism is compared with and reduces to.

    q = x W_q, k = c W_k, v = c W_v              (c = x for self-attention, the context for cross-attention)
    q, k <- RoPE(q), RoPE(k)                      (position="rope"; or an ALiBi / T5 / Shaw logits bias)
    o_h = softmax(q_h k_g^T / sqrt(d) + bias_h + mask) v_g,   g = h // (H / KVH)   (MHA, GQA, MQA)
    y = concat_h(o_h) W_o

Shapes: x [B, T, E] -> [B, T, E]; heads H, kv heads KVH, head_dim D. Time O(B H T^2 D), memory O(B H T^2) in the
reference path (O(B H T D) with a fused kernel). Options: sliding window, logit softcap, QK-norm, sinks are in
the functional op. Positions are applied to self-attention only (cross-attention keys carry none). The layer is
`attn.core.softmax_layer.SoftmaxAttentionLayer` (the attention pipeline's named stages), registered by name.
"""

from __future__ import annotations

from attn import functional as F
from attn.core.softmax_layer import POSITIONS, SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.registry import register

__all__ = ["POSITIONS", "MultiHeadAttention"]


@register(
    "softmax",
    family="softmax",
    paper="Attention Is All You Need (baseline; not a seed paper)",
    catalog=None,
    op=F.softmax_attention,
    input_kind="sequence",
    supports_causal=True,
    supports_decode=True,
    summary="multi-head softmax attention; MHA/GQA/MQA, RoPE/ALiBi/T5/Shaw, window, softcap, KV cache",
    option_docs=SOFTMAX_OPTION_DOCS,
    validators=SOFTMAX_VALIDATORS,
    fidelity="paper",
    reference="Vaswani et al. 2017, Sec. 3.2 (scaled dot-product and multi-head attention)",
    has_attention_weights=True,
)
class MultiHeadAttention(SoftmaxAttentionLayer):
    """Multi-head softmax attention with GQA/MQA, positions, masks and a KV cache. x [B, T, E] -> [B, T, E]."""
