"""`video_ccam`: cross-attention with causal cross-attention masks (CCAMs) from queries to video frames.

Paper: "Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long
Videos" (Fei et al., 2024; arXiv 2408.14023; code github.com/QQ-MM/Video-CCAM, whose projector ships as remote code
with the released checkpoints and is not in the repository).

The queries x (the projector's learnable queries in the paper, or any ordered query sequence) attend to the tokens
of F frames, context [B, F * P, Ec] (frame-major, P tokens per frame). Plain cross-attention is blind to the order
of the frames; CCAM ties each query to a time: query i of Tq covers the interval [i / Tq, (i + 1) / Tq) of the clip
and sees every frame that starts before its interval ends (frame f starts at f / F):

    allowed(i, j) = frame(j) * Tq < (i + 1) * F,        frame(j) = j // P
    o_i = softmax_j(q_i k_j^T / sqrt(d) + (0 if allowed(i, j) else -inf)) v_j

so the mask is monotone (a later query sees every frame an earlier one sees), the first query sees frame 0, the
last sees all F frames, and with Tq = G * F (G queries per frame) query i sees frames 0..i // G: the query groups'
lower-triangular block mask. The mask depends on the fraction i / Tq and not on F, which is what lets the paper
feed 96 frames to a projector trained on 16. The caller's mask (kv padding, causal) is ANDed with it.

Shapes: x [B, Tq, E], context [B, F * P, Ec] -> [B, Tq, E]. Cost: that of softmax cross-attention,
O(B H Tq F P D); the mask is a function of (i, j) (`Mask.mask_fn`), never a stored [Tq, F * P] array.

Exact reduction: num_frames=1 is plain softmax cross-attention (`softmax` with the same query/key/value/out
parameters, given the context). Decoding is not supported: a query's frame limit depends on its place in the whole
query sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from attn.core.layer import AttentionCall
from attn.core.masks import Mask
from attn.core.softmax_layer import SOFTMAX_OPTION_DOCS, SOFTMAX_VALIDATORS, SoftmaxAttentionLayer
from attn.core.validation import positive_int
from attn.cross.context import check_context_width, require_context, tokens_per_frame
from attn.registry import register

Array = jax.Array

CONTEXT_LAYOUT = "[batch, num_frames * tokens_per_frame, embed] (frame-major)"


@dataclasses.dataclass(frozen=True)
class FrameCausalPattern:
    """The CCAM as a hashable `Mask.mask_fn`: query i of `query_length` sees key j iff frame(j) * query_length <
    (i + 1) * num_frames, with frame(j) = j // frame_tokens."""

    query_length: int
    num_frames: int
    frame_tokens: int

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        frame = kv_idx // self.frame_tokens
        return frame * self.query_length < (q_idx + 1) * self.num_frames


def causal_cross_mask(query_length: int, num_frames: int, context_length: int, base: Mask | None = None) -> Mask:
    """`base` (padding, causal, ...) AND the CCAM of `query_length` queries over a frame-major context of
    `context_length` tokens in `num_frames` frames. ValueError when num_frames does not divide context_length or
    `base` already has a mask_fn."""
    positive_int("num_frames", num_frames)
    positive_int("query_length", query_length)
    if context_length % num_frames:
        raise ValueError(
            f"num_frames={num_frames} does not divide context_length={context_length}; expected a frame-major "
            "context of num_frames * tokens_per_frame tokens"
        )
    base = Mask() if base is None else base
    if base.mask_fn is not None:
        raise ValueError("video_ccam builds its own mask_fn; the given mask already has one; pass padding or causal")
    return base.replace(mask_fn=FrameCausalPattern(query_length, num_frames, context_length // num_frames))


@register(
    "video_ccam",
    family="cross",
    paper="Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long "
    "Videos",
    catalog=121,
    op=causal_cross_mask,
    input_kind="cross",
    supports_causal=True,
    supports_decode=False,
    summary="cross-attention to video frames where query i sees the frames that start before (i+1)/Tq of the clip",
    fidelity="reconstructed",
    reference="arXiv 2408.14023 abstract and secondary summaries (emergentmind topic page: lower-triangular CCAM "
    "between learnable queries and frames); the projector code is not in github.com/QQ-MM/Video-CCAM",
    has_attention_weights=True,
    validators={**SOFTMAX_VALIDATORS, "num_frames": positive_int},
    option_docs={
        **SOFTMAX_OPTION_DOCS,
        "num_frames": "number of frames F in the frame-major context [B, F * P, Ec] (1 = plain cross-attention)",
    },
)
class VideoCCAMAttention(SoftmaxAttentionLayer):
    """Softmax cross-attention from x [B, Tq, E] to frames context [B, F * P, Ec] under the causal cross-attention
    mask. -> [B, Tq, E]."""

    num_frames: int = 1

    def validate(self, call: AttentionCall) -> None:
        require_context("video_ccam", call.context, CONTEXT_LAYOUT)
        super().validate(call)
        if call.decode:
            raise ValueError(
                "video_ccam does not decode (decode=True): a query's frame limit depends on its place in the whole "
                "query sequence; run the queries in one call"
            )
        tokens_per_frame(call.context, self.num_frames)
        check_context_width(self, call.context)

    def prepare(self, q: Array, k: Array, v: Array, call: AttentionCall) -> tuple[Array, Array, Array, Any]:
        q, k, v, call = super().prepare(q, k, v, call)
        mask = causal_cross_mask(q.shape[1], self.num_frames, k.shape[1], call.mask)
        return q, k, v, call.replace(mask=mask)
