"""`swap`: swapped spatiotemporal cross-attention (Swap-CA) in 3-D windows, from "VideoFactory: Swap Attention in
Spatiotemporal Diffusions for Text-to-Video Generation" (Wang et al., catalog [147]).

A video block has a spatial stream (attention among the tokens of one frame) and a temporal stream (attention
among the frames at one spatial location). Swap-CA couples them with a cross-attention inside 3-D (time x height x
width) windows whose query comes from one stream and whose keys and values come from the other, and the "query"
role alternates between consecutive blocks (`query_stream`): spatial queries read temporal features in one block,
temporal queries read spatial features in the next.

With x [B, T, *S, E] (frames first, then 1 or 2 spatial axes; N = T prod(S) tokens):

    F_s = SA_spatial(x)      softmax attention among the prod(S) tokens of each frame    (params spatial_*)
    F_t = SA_temporal(x)     softmax attention among the T frames of each location       (params temporal_*)
    (A, C) = (F_s, F_t) if query_stream == "spatial" else (F_t, F_s)
    Q = A W_q, K = C W_k, V = C W_v                                                        (params swap_*)
    o_i = sum_{j in win(i)} softmax_j(Q_i K_j^T / sqrt(D)) V_j      win = the 3-D window of i (window_size, shift)
    y = A + o W_o

The windowed attention is `attn.core.windows.window_attention` (non-overlapping, optional Swin shift, partial
windows at borders; a window larger than an extent covers the axis).

STATUS — INTERPRETATION. The paper's method section could not be read here (searched: arXiv 2305.10874 full text,
its HTML/markdown mirrors, which are stored only from their opening, and code search for "Swap-CA" / "swapped
cross-attention"; the authors' repository github.com/daooshee/HD-VG-130M, listed as the paper's official code,
holds the dataset's README and licence only, no model code). What the abstract fixes: cross-attention
"in 3D windows" that "alternates the 'query' role between spatial and temporal blocks".
This implementation's reading, which may differ from the paper:
  1. the streams: full-frame spatial self-attention and full-length temporal self-attention (as in the
     text-to-image U-Nets extended with temporal layers that the paper builds on); the paper's blocks may also
     hold convolutions and text cross-attention, which are outside this layer;
  2. the swap cross-attention sees both streams' outputs of the same block (rather than, e.g., the previous
     block's output), with the residual added to the query stream;
  3. window size, shift and their alternation (`window_size`, `shift`) are free options; the paper's values are
     unknown here. Models alternate query_stream (and typically shift) from layer to layer.

Shapes: x [B, T, *S, E] -> same. Time O(B H D (T prod(S)^2 + prod(S) T^2 + N prod(window))), memory
O(B H (T prod(S)^2 + prod(S) T^2 + N prod(window))). Attention dropout applies to all three attentions. No causal
masking, no decoding.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from attn import functional as F
from attn.core.layer import AttentionCall, OutputProjection, SpatialAttentionLayer
from attn.core.masks import Mask
from attn.core.neighborhood import IntPerAxis
from attn.core.validation import check_rank, choice, int_or_pair, non_negative_int, optional, positive, positive_int
from attn.core.windows import window_attention, window_plan
from attn.registry import register

Array = jax.Array

QUERY_STREAMS = ("spatial", "temporal")


@register(
    "swap",
    family="local",
    paper="VideoFactory: Swap Attention in Spatiotemporal Diffusions for Text-to-Video Generation",
    catalog=147,
    op=None,
    input_kind="spatial",
    supports_causal=False,
    supports_decode=False,
    summary="VideoFactory Swap-CA: spatial and temporal streams joined by 3-D window cross-attention whose query "
    "stream alternates between blocks",
    option_docs={
        "window_size": "3-D window (frames, height, width) of the swapped cross-attention; clipped to the extents",
        "shift": "window shift per axis, 0 <= shift < window_size (Swin-style; alternate it between blocks)",
        "query_stream": "which stream queries the other: 'spatial' or 'temporal' (alternate between blocks)",
        "scale": "logit scale of all three attentions (None = 1/sqrt(head_dim))",
    },
    fidelity="reconstructed",
    reference="the abstract of arXiv 2305.10874 only (3-D window cross-attention alternating the query role between "
    "spatial and temporal blocks); the method section was not reachable and the authors' repository "
    "(daooshee/HD-VG-130M) has no model code; the streams, residual and window options are this module's "
    "interpretation",
    validators={
        "window_size": int_or_pair(positive_int),
        "shift": int_or_pair(non_negative_int),
        "query_stream": choice(*QUERY_STREAMS),
        "scale": optional(positive),
    },
)
class SwapAttention(SpatialAttentionLayer):
    """Swap attention: x [B, T, *spatial, E] (frames first, 1 or 2 spatial axes) -> same shape."""

    window_size: IntPerAxis = 8
    shift: IntPerAxis = 0
    query_stream: str = "spatial"
    scale: float | None = None

    def validate(self, call: AttentionCall) -> None:
        super().validate(call)
        check_rank("x", call.x, (4, 5), "[batch, frames, *spatial (1 or 2 axes), embed]")

    # The output adds the query stream's features to the projected cross-attention (y = A + o W_o), and the two
    # streams run their own attention before the swap projections: the template's single pass (project, attend,
    # project out) has no place for either, so this override runs its stages (validate, attend, head_outputs)
    # around them.
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
        """x [B, T, *S, E] -> [B, T, *S, E]."""
        call = AttentionCall(
            x=x, context=context, mask=mask, positions=positions, decode=decode, deterministic=deterministic
        )
        self.validate(call)
        batch, frames, *spatial, features = x.shape
        pixels = math.prod(spatial)

        per_frame = x.reshape(batch * frames, pixels, features)
        f_spatial = self.stream(per_frame, "spatial", call).reshape(x.shape)
        per_location = x.reshape(batch, frames, pixels, features).swapaxes(1, 2).reshape(-1, frames, features)
        f_temporal = self.stream(per_location, "temporal", call).reshape(batch, pixels, frames, features)
        f_temporal = f_temporal.swapaxes(1, 2).reshape(x.shape)

        queries, memory = (f_spatial, f_temporal) if self.query_stream == "spatial" else (f_temporal, f_spatial)
        tokens = frames * pixels
        grid = lambda t: t.reshape(batch, frames, *spatial, *t.shape[-2:])
        q = grid(self.dense_heads(queries.reshape(batch, tokens, features), self.num_heads, "heads", "swap_query"))
        k = grid(self.dense_heads(memory.reshape(batch, tokens, features), self.kv_heads, "kv_heads", "swap_key"))
        v = grid(self.dense_heads(memory.reshape(batch, tokens, features), self.kv_heads, "kv_heads", "swap_value"))
        y = self.head_outputs(self.attend(q, k, v, call), call)
        return queries + self.output(y, features, "swap_out")

    def attend(self, q: Array, k: Array, v: Array, call: AttentionCall) -> Array:
        """The swapped cross-attention in 3-D windows: q [B, T, *S, H, D] (query stream), k/v [B, T, *S, KVH, D]
        (the other stream) -> [B, T, *S, H, D]."""
        # a window larger than an extent covers that axis
        window = window_plan(q.shape[1:-2], self.window_size, self.shift, clip=True, window_name="window_size")[0]
        return window_attention(
            q,
            k,
            v,
            window=window,
            shift=self.shift,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            implementation=self.implementation,
        )

    def stream(self, x: Array, prefix: str, call: AttentionCall) -> Array:
        """Self-attention within each row of x [B', L, E] -> [B', L, E] with params <prefix>_{query,key,value,out}."""
        q = self.dense_heads(x, self.num_heads, "heads", f"{prefix}_query")
        k = self.dense_heads(x, self.kv_heads, "kv_heads", f"{prefix}_key")
        v = self.dense_heads(x, self.kv_heads, "kv_heads", f"{prefix}_value")
        y = F.softmax_attention(
            q,
            k,
            v,
            scale=self.scale,
            dropout_rate=self.effective_dropout(call.deterministic),
            dropout_rng=self.dropout_rng(call.deterministic),
            implementation=self.implementation,
        )
        return self.output(y, x.shape[-1], f"{prefix}_out")

    def output(self, y: Array, features: int, name: str) -> Array:
        return OutputProjection(
            features=features, use_bias=self.output_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )(y)
