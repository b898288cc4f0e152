"""`softmax`: multi-head scaled dot-product attention (Vaswani et al., "Attention Is All You Need", 2017).

The baseline every other mechanism is compared with and reduces to.

    q = x W_q, k = c W_k, v = c W_v              (c = x for self-attention, the context for cross-attention)
    q, k <- RoPE(q), RoPE(k)                      (position="rope"; or an ALiBi / T5 / Shaw logits bias)
    o_h = softmax(q_h k_g^T / sqrt(d) + bias_h + mask) v_g,   g = h // (H / KVH)   (MHA, GQA, MQA)
    y = concat_h(o_h) W_o

Shapes: x [B, T, E] -> [B, T, E]; heads H, kv heads KVH, head_dim D. Time O(B H T^2 D), memory O(B H T^2) in the
reference path (O(B H T D) with a fused kernel). Options: sliding window, logit softcap, QK-norm, sinks are in
the functional op. Positions are applied to self-attention only (cross-attention keys carry none).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn import functional as F
from attn.core import kv_cache
from attn.core import positions as pos
from attn.core.layer import AttentionLayer
from attn.core.masks import Mask
from attn.core.validation import check_choice, normalize_window
from attn.registry import register

Array = jax.Array

POSITIONS = ("none", "rope", "alibi", "t5", "shaw")


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
    option_docs={
        "position": "positional encoding: 'none', 'rope', 'alibi', 't5' (bucketed bias) or 'shaw' (relative keys)",
        "rope_base": "RoPE base (theta)",
        "rope_scaling": "RoPE context extension: None, 'linear', 'ntk' or 'yarn'",
        "rope_scaling_factor": "context extension factor for rope_scaling",
        "rope_original_max_len": "training context length that YaRN's ramp refers to",
        "relative_num_buckets": "T5 bias: number of buckets",
        "relative_max_distance": "T5 bias: distance beyond which buckets saturate",
        "shaw_max_distance": "Shaw: relative distances are clipped to [-k, k]",
        "window": "sliding window: None, int w (= (w, w)) or (left, right)",
        "softcap": "logit soft-capping value (None = off)",
        "qk_norm": "RMS-normalise q and k per head before the dot product",
        "scale": "logit scale (None = 1/sqrt(head_dim))",
    },
)
class MultiHeadAttention(AttentionLayer):
    """Multi-head softmax attention with GQA/MQA, positions, masks and a KV cache. x [B, T, E] -> [B, T, E]."""

    position: str = "rope"
    rope_base: float = 10000.0
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 2048
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    shaw_max_distance: int = 16
    window: int | tuple[int, int] | None = None
    softcap: float | None = None
    qk_norm: bool = False
    scale: float | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Mask | None = None,
        positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        self.check_input(x, context)
        check_choice("position", self.position, POSITIONS)
        normalize_window(self.window)
        if decode and context is not None:
            raise ValueError("decode=True is for self-attention; got a context (cross-attention has no KV cache)")
        batch, length, features = x.shape

        q, k, v = self.project_qkv(x, context)
        if self.qk_norm:
            q, k = self.head_norm(q, "query_norm"), self.head_norm(k, "key_norm")

        offset = kv_cache.current_index(self) if decode else 0
        q_pos = self.query_positions(positions, batch, length, offset)
        self_attention = context is None
        if self_attention and self.position == "rope":
            inv_freq, multiplier = pos.rope_frequencies(
                self.head_dim,
                base=self.rope_base,
                scaling=self.rope_scaling,
                factor=self.rope_scaling_factor,
                original_max_len=self.rope_original_max_len,
            )
            q = pos.apply_rope(q, q_pos, inv_freq, multiplier)
            k = pos.apply_rope(k, q_pos, inv_freq, multiplier)

        q_offset = 0
        if decode:
            k, v, mask, q_offset = self.cache_write(k, v, mask)
        kv_pos = q_pos if (self_attention and k.shape[1] == length) else jnp.arange(k.shape[1], dtype=jnp.int32)

        bias = self.position_bias(q, q_pos, kv_pos, mask) if self_attention else None
        y = self.attend(q, k, v, mask=mask, bias=bias, q_offset=q_offset, deterministic=deterministic)
        return self.project_out(y, features)

    def position_bias(self, q: Array, q_pos: Array, kv_pos: Array, mask: Mask | None) -> Array | None:
        """Additive logits bias of the relative-position options, float32 [B|1, H, Tq, Tk], or None."""
        if self.position == "alibi":
            return pos.alibi_bias(self.num_heads, q_pos, kv_pos)
        if self.position == "t5":
            causal = mask is not None and mask.causal
            return pos.T5RelativeBias(
                self.num_heads,
                num_buckets=self.relative_num_buckets,
                max_distance=self.relative_max_distance,
                param_dtype=self.param_dtype,
                name="relative_bias",
            )(q_pos, kv_pos, bidirectional=not causal)
        if self.position == "shaw":
            scale = self.head_dim**-0.5 if self.scale is None else self.scale
            shaw = pos.ShawRelativeLogits(
                self.head_dim, max_distance=self.shaw_max_distance, param_dtype=self.param_dtype, name="shaw"
            )
            return scale * shaw(q, q_pos, kv_pos)
        return None

    def attend(
        self,
        q: Array,
        k: Array,
        v: Array,
        *,
        mask: Mask | None,
        bias: Array | None,
        q_offset,
        deterministic: bool,
    ) -> Array:
        """q [B, Tq, H, D], k/v [B, Tk, KVH, D] -> [B, Tq, H, D]; sows the probabilities when asked."""
        capture = self.wants_weights()
        result = F.softmax_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            window=self.window,
            scale=self.scale,
            softcap=self.softcap,
            q_offset=q_offset,
            dropout_rate=0.0 if deterministic else self.dropout_rate,
            dropout_rng=self.dropout_rng(deterministic),
            return_probs=capture,
            implementation=self.implementation,
        )
        if capture:
            result, aux = result
            self.sow("intermediates", "attention_weights", aux["probs"])
        return result
