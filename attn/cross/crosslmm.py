"""`crosslmm`: dual cross-attention; pooled visual tokens re-attend the original visual tokens of their frame
(visual-to-visual) and text tokens attend the original visual tokens (text-to-visual).

Paper: "CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms" (Yan et al., 2025;
arXiv 2505.17020; github.com/shilinyan99/CrossLMM holds the README, no code).

The LLM's sequence holds only M pooled visual tokens (`pool_frames`: each frame's P encoder tokens averaged in
groups of `factor`) followed by the text; the original tokens stay outside it as the context c [B, F * P, Ec]
(frame-major, F frames). Inside an LLM layer this mechanism updates the sequence x = [pooled | text] [B, M + Tt, E]:

    rows i < M  (V2V):  o_i = softmax_j(q'_i k'_j^T / sqrt(d) + (0 if frame(j) = frame(i) else -inf)) v'_j
                        q' = x W'_q, k' = c W'_k, v' = c W'_v; frame(i) = i // (M / F), frame(j) = j // P
    rows i >= M (T2V):  o_i = softmax_j(q_i k_j^T / sqrt(d)) v_j,   q = x W_q, k = c W_k, v = c W_v
    y = [o_{<M} W'_o | o_{>=M} W_o]

with separate projections for the two attentions (parameters v2v_query, v2v_key, v2v_value, v2v_out and query,
key, value, out). The pooled tokens keep the fine detail of their own frame at a cost linear in the number of
original tokens, and the LLM's self-attention runs over M + Tt tokens instead of F * P + Tt.

Shapes: x [B, M + Tt, E], context [B, F * P, Ec] -> [B, M + Tt, E]. Cost: O(B H (M P + Tt F P) D) for the two
cross-attentions. The frame restriction is a mask function (`Mask.mask_fn`), never a stored array.

Exact reductions: visual_tokens=0 is plain softmax cross-attention (`softmax` with the query/key/value/out
parameters, given the context). With pooling factor 1, num_frames=1 and the original tokens as the sequence
(x = c, M = Tc), V2V is softmax self-attention over the visual tokens with the v2v parameters. The paper describes
both attentions at the level of the abstract and the project page; the frame-local V2V restriction and the
separate output projections are this implementation's reading of "pooled tokens re-attend their original tokens".
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.core.layer import AttentionCall, AttentionLayer, OutputProjection
from attn.core.masks import Mask
from attn.core.softmax import softmax_attention
from attn.core.validation import non_negative_int, positive_int
from attn.cross.context import check_context_width, require_context, tokens_per_frame
from attn.registry import register

Array = jax.Array

CONTEXT_LAYOUT = "[batch, num_frames * tokens_per_frame, embed] (the original visual tokens, frame-major)"


def pool_frames(tokens: Array, num_frames: int, factor: int) -> Array:
    """Average pooling within frames: tokens [B, F * P, E] (frame-major) -> [B, F * P / factor, E], each output the
    mean of `factor` consecutive tokens of one frame. ValueError when F does not divide the length or `factor` does
    not divide P."""
    positive_int("factor", factor)
    per_frame = tokens_per_frame(tokens, num_frames)
    if per_frame % factor:
        raise ValueError(
            f"factor={factor} does not divide the {per_frame} tokens per frame (tokens shape {tuple(tokens.shape)}, "
            f"num_frames={num_frames}); expected a divisor of tokens_per_frame"
        )
    batch, length, features = tokens.shape
    return tokens.reshape(batch, length // factor, factor, features).mean(axis=2)


@dataclasses.dataclass(frozen=True)
class SameFrame:
    """Mask function of V2V: pooled row i (frame i // rows_per_frame) sees key j of frame j // keys_per_frame."""

    rows_per_frame: int
    keys_per_frame: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        return q_idx // self.rows_per_frame == kv_idx // self.keys_per_frame


@register(
    "crosslmm",
    family="cross",
    paper="CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms",
    catalog=103,
    op=pool_frames,
    input_kind="cross",
    supports_causal=False,
    supports_decode=False,
    summary="dual cross-attention: pooled visual tokens re-attend their frame's original tokens, text attends all",
    fidelity="reconstructed",
    reference="arXiv 2505.17020 abstract and the project README (github.com/shilinyan99/CrossLMM, no code): pooling, "
    "V2V with pooled queries over the original tokens, T2V over the original tokens",
    validators={"visual_tokens": non_negative_int, "num_frames": positive_int},
    option_docs={
        "visual_tokens": "number M of pooled visual tokens at the start of x (0 = plain cross-attention for every row)",
        "num_frames": "number of frames F of the context and of the pooled tokens (V2V attends within a frame)",
    },
)
class CrossLMMAttention(AttentionLayer):
    """Dual cross-attention over x = [pooled visual | text] [B, M + Tt, E] and the original visual tokens
    context [B, F * P, Ec]. -> [B, M + Tt, E]."""

    visual_tokens: int = 0
    num_frames: int = 1

    intervention_stages: ClassVar[tuple[str, ...]] = ("head_outputs",)

    def validate(self, call: AttentionCall) -> None:
        require_context("crosslmm", call.context, CONTEXT_LAYOUT)
        super().validate(call)
        if call.decode:
            raise ValueError("crosslmm does not decode (decode=True): run the sequence in one call")
        mask = call.mask
        if mask is not None and not (isinstance(mask, Mask) and mask.replace(kv_lengths=None).is_empty()):
            raise ValueError(
                f"crosslmm accepts only context padding, mask=attn.Mask(kv_lengths=...); got {mask!r} (its own "
                "masks come from visual_tokens and num_frames)"
            )
        tokens_per_frame(call.context, self.num_frames)
        if self.visual_tokens % self.num_frames or self.visual_tokens > call.x.shape[1]:
            raise ValueError(
                f"visual_tokens={self.visual_tokens} must be a multiple of num_frames={self.num_frames} and at most "
                f"the length {call.x.shape[1]} of x (shape {tuple(call.x.shape)})"
            )
        check_context_width(self, call.context)

    def project_qkv(self, x: Array, context: Array | None) -> tuple[Array, Array, Array]:
        """q [B, M + Tt, H, D] (rows < M from v2v_query); k, v [2, B, Tc, KVH, D] (index 0: V2V, 1: T2V)."""
        m = self.visual_tokens
        queries = [self.dense_heads(x[:, m:], self.num_heads, "heads", "query")]
        keys = [self.dense_heads(context, self.kv_heads, "kv_heads", "key")]
        values = [self.dense_heads(context, self.kv_heads, "kv_heads", "value")]
        if m:
            queries.insert(0, self.dense_heads(x[:, :m], self.num_heads, "heads", "v2v_query"))
            keys.insert(0, self.dense_heads(context, self.kv_heads, "kv_heads", "v2v_key"))
            values.insert(0, self.dense_heads(context, self.kv_heads, "kv_heads", "v2v_value"))
        else:  # no V2V rows: a placeholder of the T2V keys keeps the layout [2, ...]
            keys.insert(0, keys[0])
            values.insert(0, values[0])
        return jnp.concatenate(queries, axis=1), jnp.stack(keys), jnp.stack(values)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        return q, k, v, call  # cross-attention: no positions, no cache

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        m, rate = self.visual_tokens, self.effective_dropout(call.deterministic)
        padding = call.mask

        def run(rows: Array, keys: Array, values: Array, mask: Mask | None, rng: Array | None) -> Array:
            return softmax_attention(
                rows, keys, values, mask=mask, dropout_rate=rate, dropout_rng=rng, implementation=self.implementation
            )

        rngs = [None, None] if rate == 0.0 else list(jax.random.split(self.make_rng("dropout")))
        if q.shape[1] > m:
            outputs = [run(q[:, m:], k[1], v[1], padding, rngs[1])]
        else:  # every row is a pooled visual token
            outputs = [jnp.zeros((*q.shape[:1], 0, *q.shape[2:-1], v.shape[-1]), q.dtype)]
        if m:
            frames = SameFrame(m // self.num_frames, k.shape[2] // self.num_frames)
            base = padding if padding is not None else Mask()
            outputs.insert(0, run(q[:, :m], k[0], v[0], base.replace(mask_fn=frames), rngs[0]))
        return jnp.concatenate(outputs, axis=1)

    def project_out(self, y: Array, features: int) -> Array:
        m = self.visual_tokens

        def project(rows: Array, name: str) -> Array:
            return OutputProjection(
                features=features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )(rows)

        parts = [project(y[:, m:], "out")] if m == 0 else [project(y[:, :m], "v2v_out"), project(y[:, m:], "out")]
        return nn.with_logical_constraint(jnp.concatenate(parts, axis=1), ("batch", "length", "embed"))
